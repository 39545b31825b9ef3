"""What runs inside a Dask worker: the client bundle, its hello, and one task at a time.

This module is pickled by value (cloudpickle ``register_pickle_by_value``, see
cluster/engines/dask.py), so a worker needs neither beowulf nor this file: only Dask and
the standard library. It must therefore import nothing from ``cluster`` or ``tasks``.

* ``BundlePlugin`` (a Dask worker plugin, registered once on the scheduler, so that workers
  joining later get it too) writes the client bundle (client/*.py) into the worker's
  local directory, in a folder named after the bundle hash, and puts it on ``sys.path``.
* ``hello(bundle)`` is the first task a worker runs for a run: it checks the bundle's hash
  on the worker, imports the client's agent module, and returns the facts the coordinator
  shows (Python, numpy, the primes engine), or why the worker cannot run the client.
* ``run_line(bundle, line)`` runs one task line exactly as an agent's worker process does
  (client/agent.py ``JobRunner.run_line``) and returns its result line (bytes).
* ``run_in_child(bundle, line, key)`` does the same in a child process of the worker: one per
  worker thread (a slot), ``client/agent.py --worker`` fed over pipes, started at the slot's
  first such task and kept, so a ``fab map`` function is imported once per slot, not once per
  task. An item that crashes or hangs kills the child, never the Dask worker: the task then
  answers ``kind: died`` like an agent whose worker died, and the slot's next task starts a new
  child. ``kill_tasks(keys)`` (run by ``Client.run``, outside the task threads) kills the
  children running cancelled tasks; ``stop_children()`` all of them at the end of a command.
  Each child gets the Dask worker's environment (its PYTHONPATH too) and the bundle's workdir.
"""

from __future__ import annotations

import os
import platform
import sys

from distributed.diagnostics.plugin import WorkerPlugin

# Folder name prefix of a bundle's workdir inside a worker's local directory: the client is
# LOCAL_DIRECTORY/beowulf-HASH/client, and LOCAL_DIRECTORY/beowulf-HASH is the worker's workdir
# (a host's WORKDIR: fab map's ship/, map/, reqs/ folders), so client/mapper.py finds it as on a host.
FOLDER_PREFIX = "beowulf-"
# Seconds a child worker has to exit by itself (its stdin closed) before it is killed.
CHILD_GRACE_SECONDS = 1.0
# The plugin's name on the scheduler, followed by the bundle hash: registering the same bundle
# again replaces it; coordinators of other beowulf versions on the same cluster keep theirs.
PLUGIN_NAME = "beowulf-client"


def bundle_folder(base: str, bundle: str) -> str:
    """Where bundle ``bundle`` lives under a worker's local directory ``base`` (WORKDIR/client)."""
    return os.path.join(base, FOLDER_PREFIX + bundle, "client")


class BundlePlugin(WorkerPlugin):
    """Dask worker plugin carrying the client bundle (file name -> bytes) to every worker.

    Equivalent of distributed's UploadDirectory, but a plain WorkerPlugin: it needs no
    nanny (``dask worker --no-nanny`` works) and puts only this bundle's folder on the path."""

    idempotent = False

    def __init__(self, bundle: str, files: dict):
        self.bundle = bundle
        self.files = dict(files)
        self.name = f"{PLUGIN_NAME}-{bundle}"

    def setup(self, worker=None):
        base = getattr(worker, "local_directory", None) or os.path.join(os.path.expanduser("~"), ".beowulf-dask")
        folder = bundle_folder(base, self.bundle)
        install(folder, self.files)



def install(folder: str, files: dict) -> None:
    """Write ``files`` into ``folder`` (each file atomically) and put it first on sys.path."""
    os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for name, data in files.items():
        if os.sep in name or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as handle:
                if handle.read() == data:
                    continue
        except OSError:
            pass
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _folder(bundle: str) -> str:
    """The bundle's folder on this worker (put first on sys.path); RuntimeError when it is not there."""
    from distributed import get_worker

    try:
        base = get_worker().local_directory
    except ValueError:  # not in a task (a worker plugin's own call)
        base = os.path.join(os.path.expanduser("~"), ".beowulf-dask")
    folder = bundle_folder(base, bundle)
    if not os.path.isdir(folder):
        raise RuntimeError(f"the client bundle {bundle} is not on this worker (the beowulf-client plugin did not run)")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


def hello(bundle: str) -> dict:
    """The worker's hello: bundle hash as found on the worker, Python, numpy, engines, or ``error``."""
    facts = {"python": platform.python_version(), "executable": sys.executable, "pid": os.getpid(),
             "numpy": None, "engines": {}}
    try:
        import importlib

        folder = _folder(bundle)
        facts["workdir"] = os.path.dirname(folder)
        found = importlib.import_module("bundle").bundle_hash(folder)
        facts["bundle"] = found
        if found != bundle:
            facts["error"] = f"the client bundle on the worker has hash {found}, not {bundle}"
            return facts
        agent = importlib.import_module("agent")
        where = os.path.dirname(os.path.abspath(getattr(agent, "__file__", "") or "?"))
        if where != os.path.abspath(folder):
            parent = os.path.basename(os.path.dirname(where))
            if os.path.basename(where) == "client" and parent.startswith(FOLDER_PREFIX):
                facts["error"] = (f"this worker process already runs another beowulf client "
                                  f"({parent[len(FOLDER_PREFIX):]}): one version per worker process")
            else:
                facts["error"] = f"a module named agent from {where} shadows the client's (on the worker's sys.path)"
            return facts
        facts["protocol"] = agent.PROTOCOL
        facts["engines"] = agent.engines()
        try:
            import numpy

            facts["numpy"] = numpy.__version__
        except Exception as exc:  # numpy missing or broken: the client falls back
            facts["numpy_error"] = f"{type(exc).__name__}: {exc}"
        _runner(bundle)
    except BaseException as exc:  # whatever keeps the client from running is the reason shown
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def _runner(bundle: str):
    """The worker's JobRunner, kept on the bundle's own agent module: this module's globals are
    unpickled afresh with every task (pickled by value), so nothing can be cached here."""
    import importlib

    agent = sys.modules.get("agent")
    runner = getattr(agent, "beowulf_dask_runner", None)
    if runner is None or getattr(agent, "beowulf_dask_bundle", None) != bundle:
        folder = _folder(bundle)
        agent = importlib.import_module("agent")
        if os.path.dirname(os.path.abspath(getattr(agent, "__file__", "") or "?")) != os.path.abspath(folder):
            raise RuntimeError("a module named agent shadows the client's on this worker")
        runner = agent.JobRunner(agent.job_table(), 0)
        agent.beowulf_dask_runner, agent.beowulf_dask_bundle = runner, bundle
    return runner


def run_line(bundle: str, line: bytes) -> bytes:
    """One task line in, one result line out (client/agent.py's JobRunner; it never raises)."""
    _nice_thread()
    return _runner(bundle).run_line(line)


def _children(agent) -> dict:
    """The state of this worker process's child workers, kept on the bundle's agent module (this
    module's globals are unpickled afresh with every task): thread -> child, task key -> child."""
    import threading

    state = getattr(agent, "beowulf_dask_children", None)
    if state is None:  # setdefault: two threads starting at once share one
        state = vars(agent).setdefault("beowulf_dask_children",
                                       {"lock": threading.Lock(), "by_thread": {}, "by_key": {}})
    return state


def _start_child(agent, folder: str, slot: int):
    """``agent.py --worker`` for one slot of this Dask worker: its own session (a kill takes its
    commands too), watching this process (it exits when the Dask worker dies), with this
    process's environment (PYTHONPATH included: the user's packages) and the bundle's workdir."""
    import subprocess

    env = dict(os.environ)
    env["BEOWULF_MAP_WORKDIR"] = os.path.dirname(folder)
    command = [sys.executable or "python3", os.path.join(folder, "agent.py"), "--worker", "--slot", str(slot),
               "--parent", str(os.getpid()), "--nice", "0", "--log-level", "error", "--preload", "map"]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, close_fds=True, start_new_session=True)


def _kill_child(child) -> None:
    import signal

    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except OSError:
            pass
    for pipe in (child.stdin, child.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    try:
        child.wait(CHILD_GRACE_SECONDS)
    except Exception:  # noqa: BLE001 (subprocess.TimeoutExpired: it is reaped later)
        pass


def run_in_child(bundle: str, line: bytes, key: str) -> bytes:
    """One task line run by this thread's child worker (see the module docstring); its result
    line, or a ``died`` result when the child died running it (a crash, a kill_tasks)."""
    import json
    import threading
    import time

    _nice_thread()  # before a child starts: it inherits the thread's niceness
    _runner(bundle)  # the bundle's agent module, checked
    agent = sys.modules["agent"]
    folder = _folder(bundle)
    state = _children(agent)
    ident = threading.get_ident()
    with state["lock"]:
        child, slot = state["by_thread"].get(ident, (None, None))
        if child is None or child.poll() is not None:
            if slot is None:
                used = {entry[1] for entry in state["by_thread"].values()}
                slot = min(set(range(len(used) + 1)) - used)
            child = _start_child(agent, folder, slot)
            state["by_thread"][ident] = (child, slot)
        state["by_key"][key] = child
    started = time.perf_counter()
    try:
        child.stdin.write(line if line.endswith(b"\n") else line + b"\n")
        child.stdin.flush()
        answer = child.stdout.readline()
    except (OSError, ValueError):
        answer = b""
    finally:
        with state["lock"]:
            state["by_key"].pop(key, None)
    if answer.endswith(b"\n"):
        return answer
    _kill_child(child)
    with state["lock"]:
        if state["by_thread"].get(ident, (None,))[0] is child:
            state["by_thread"][ident] = (None, slot)
    try:
        task_id = json.loads(line.decode("utf-8")).get("id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        task_id = None
    return agent.encode_line({"type": "result", "id": task_id, "ok": False,
                              "error": f"worker died ({agent.exit_description(child.returncode)})",
                              "kind": "died", "elapsed": round(time.perf_counter() - started, 6), "slot": slot})


async def kill_tasks(keys: list) -> int:
    """Kill the children running the tasks ``keys`` (cancelled by the coordinator): run by
    ``Client.run`` on the worker's event loop, outside the task threads, so it works while every
    slot is busy (a coroutine: Dask runs only those without waiting for the answer)."""
    import signal

    agent = sys.modules.get("agent")
    state = getattr(agent, "beowulf_dask_children", None) if agent is not None else None
    if state is None:
        return 0
    killed = 0
    with state["lock"]:
        children = [state["by_key"].get(key) for key in keys]
    for child in children:
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def stop_children() -> int:
    """End every child worker of this Dask worker (a command's end): their stdin closed (they
    exit), killed after CHILD_GRACE_SECONDS. The next command starts new ones."""
    agent = sys.modules.get("agent")
    state = getattr(agent, "beowulf_dask_children", None) if agent is not None else None
    if state is None:
        return 0
    with state["lock"]:
        children = [entry[0] for entry in state["by_thread"].values() if entry[0] is not None]
        state["by_thread"].clear()
    for child in children:
        try:
            child.stdin.close()
        except OSError:
            pass
    for child in children:
        try:
            child.wait(CHILD_GRACE_SECONDS)
        except Exception:  # noqa: BLE001 (still running: killed below)
            pass
        _kill_child(child)
    return len(children)


def remove_run(bundle: str, run: str) -> bool:
    """Remove WORKDIR/map/RUN of the bundle's workdir on this worker (fab map's run is over)."""
    import re
    import shutil

    if not re.match(r"^[0-9a-f]{16,64}\Z", str(run)):
        return False
    try:
        folder = os.path.dirname(_folder(bundle))
    except RuntimeError:
        return False
    shutil.rmtree(os.path.join(folder, "map", run), ignore_errors=True)
    return True


def run_command(command: str, stdin: bytes, timeout, max_output: int) -> dict:
    """``sh -c COMMAND`` on the worker (a job's prepare step: DaskTransport.run), its output cut at
    ``max_output`` bytes each; the process group is killed at ``timeout``."""
    import signal
    import subprocess

    process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(stdin or b"", timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        process.communicate()
        return {"timeout": True}
    return {"returncode": process.returncode, "stdout": out[:max_output].decode("utf-8", "replace"),
            "stderr": err[:max_output].decode("utf-8", "replace")}


def put_file(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` on the worker atomically (a temporary file, then a rename)."""
    target = os.path.expanduser(path)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    temp = f"{target}.tmp{os.getpid()}"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, target)


# The niceness of the threads that run tasks, set by ``renice`` (the embedded LocalCluster): kept in
# the worker process's environment, since this module's globals are unpickled afresh with every task.
TASK_NICE = "BEOWULF_DASK_TASK_NICE"


def renice(niceness: int) -> int:
    """Lower the priority of the threads that run this worker's tasks (and of what they start) to
    ``niceness``, not of the worker's event loop: like a local host's agent workers (hosts.ini
    ``nice``) under an agent that keeps its own. For the embedded LocalCluster only, whose workers
    share this computer with the coordinator. Each task thread renices itself (``_nice_thread``)."""
    os.environ[TASK_NICE] = str(int(niceness))
    return int(niceness)


def _nice_thread() -> None:
    """This task thread at the niceness ``renice`` asked for (Linux: niceness is per thread, and a
    process started from the thread inherits it); nothing when none was asked."""
    wanted = os.environ.get(TASK_NICE)
    if not wanted:
        return
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(wanted))
    except (AttributeError, OSError, ValueError):
        pass


def die_with(parent: int, interval: float = 0.5) -> bool:
    """Exit this worker process as soon as ``parent`` (the coordinator, which started the embedded
    LocalCluster) is no longer its parent: a coordinator killed by SIGKILL leaves no worker behind
    (client/agent.py's workers do the same)."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    if os.getppid() != parent:
        return False
    threading.Thread(target=watch, name="beowulf-die-with-coordinator", daemon=True).start()
    return True


# Dask pickles a task graph with plain pickle first, which would name these functions by
# reference (cluster.engines.dask_worker.hello): a worker or scheduler without beowulf could
# not load them. Under the name of __main__ plain pickle fails, and Dask falls back to
# cloudpickle, which ships them (and the helpers they call: this module is registered to be
# pickled by value) as code.
for _entry in (hello, run_line, run_in_child, kill_tasks, stop_children, remove_run, renice, die_with,
               run_command, put_file):
    _entry.__module__ = "__main__"
