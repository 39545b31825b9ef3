"""Built-in trivial jobs for dispatch benchmarks and tests of the agent.

Each job is ``name(args) -> dict``, like a job module's ``run(args)``; the agent's
whitelist maps the job names in ``JOBS`` to the functions here. They do no real
work: they measure and exercise the machinery around a task (dispatch, failure,
worker crash, cancel, large results). Standard library only, Python 3.6 syntax.
"""
import base64
import hashlib
import os
import signal
import time


def noop(args):
    """Do nothing: the cheapest possible task (for round-trip measurements)."""
    return {}


def sleep(args):
    """Sleep ``args["seconds"]`` (default 1) without using the CPU."""
    seconds = float(args.get("seconds", 1.0))
    time.sleep(seconds)
    return {"slept": seconds}


def spin(args):
    """Keep one CPU busy in pure Python for ``args["seconds"]`` (default 1)."""
    deadline = time.monotonic() + float(args.get("seconds", 1.0))
    loops = 0
    while time.monotonic() < deadline:
        loops += 1
    return {"loops": loops}


def fail(args):
    """Raise ``RuntimeError(args["message"])``: a job that fails cleanly."""
    raise RuntimeError(args.get("message", "requested failure"))


def crash(args):
    """Kill the worker process itself: ``{"code": N}`` exits with N, else signal (default 9)."""
    if "code" in args:
        os._exit(int(args["code"]))
    os.kill(os.getpid(), int(args.get("signal", signal.SIGKILL)))
    time.sleep(5)  # a signal that does not kill (caught or ignored) still ends the worker
    os._exit(70)


def echo(args):
    """Return the args and facts about the worker; ``{"sleep": S}`` waits first.

    The result: ``{"args": args, "pid": worker pid, "ppid": agent pid, "nice": niceness}``.
    """
    delay = float(args.get("sleep", 0) or 0)
    if delay > 0:
        time.sleep(delay)
    try:
        niceness = os.nice(0)
    except (AttributeError, OSError):
        niceness = None
    return {"args": args, "pid": os.getpid(), "ppid": os.getppid(), "nice": niceness}


def blob(args):
    """Return ``args["bytes"]`` (default 1 MiB) random bytes as base64, with their sha256."""
    size = int(args.get("bytes", 1 << 20))
    data = os.urandom(size)
    return {
        "bytes": size,
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": base64.b64encode(data).decode("ascii"),
    }


JOBS = {
    "noop": noop,
    "sleep": sleep,
    "spin": spin,
    "fail": fail,
    "crash": crash,
    "echo": echo,
    "blob": blob,
}
