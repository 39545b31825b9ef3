"""beowulf's agent: one per host, JSON lines with the coordinator, one worker process per slot.

    python3 agent.py --host NAME --slots N [--nice N] [--lib DIR] [--beat SECONDS]
                     [--job NAME=MODULE[:FUNC]] [--preload JOB,...] [--log-level LEVEL]
    python3 agent.py --probe

Stdin carries the coordinator's messages and stdout the agent's, one JSON object a
line, UTF-8 (docs/ARCHITECTURE.md, "The wire protocol"); stdout carries nothing else,
logs go to stderr.

    agent -> {"type": "hello", "bundle", "python", "cores", "slots", "host", "pid",
              "engines": {JOB: ENGINE or null}, "protocol": 1, "jobs", "nice"}
    coord -> {"type": "task", "id": ID, "job": NAME, "args": {...}}   queued, run by a free slot
    agent -> {"type": "result", "id": ID, "ok": true, "result": {...}, "elapsed": S, "slot": K}
             {"type": "result", "id": ID, "ok": false, "error": "one line", "kind": KIND,
              "elapsed": S[, "slot"]}   KIND: "error", "died" (its worker), or the exception's
                                        ``failure_kind`` (client/scrape.py ProxyError: "proxy")
    coord -> {"type": "cancel", "id": ID}     queued: dropped; running: its worker is killed;
                                              no result for ID is written after this is read
    agent -> {"type": "beat", "t", "load": [1m, 5m, 15m] or null, "temp", "busy", "queued"}
    coord -> {"type": "ping", "id": X}   agent -> {"type": "pong", "id": X, "t": time}
    coord -> {"type": "bye"}, or stdin EOF: kill every worker, exit 0 within about a second

Each slot has a worker: this same file run as ``agent.py --worker``, fed one task at a
time over its own pipes, importing job modules lazily from a whitelist (``JOBS``).
The agent is one thread around a selector: it queues tasks, hands each to the next
free worker, forwards the worker's result line as is, kills a worker whose task is
cancelled and replaces any worker that dies. A worker whose agent vanished (SIGKILL)
notices within PARENT_POLL_SECONDS and kills itself and its process group.

Shipped to every host: standard library only, Python 3.6 syntax, degrades on macOS.
"""
import argparse
import collections
import importlib
import json
import logging
import os
import platform
import select
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # not a POSIX system: stdout stays blocking
    fcntl = None

# Version of the wire protocol, sent in the hello.
PROTOCOL = 1
# The folder this file lives in: the client bundle (bundle.py, probe.py, job modules).
HERE = os.path.dirname(os.path.abspath(__file__))
AGENT_PATH = os.path.abspath(__file__)
# Seconds between heartbeats (--beat).
DEFAULT_BEAT = 2.0
# Niceness added to workers (--nice); the agent itself keeps its own.
DEFAULT_NICE = 10
# Seconds between a worker's checks that its agent is still its parent.
PARENT_POLL_SECONDS = 0.5
# Seconds the agent waits for killed workers to be reaped when it exits.
EXIT_GRACE_SECONDS = 1.0
# Bytes asked of each read from stdin or a worker (a pipe holds 64 KiB; bigger reads
# would make every read allocate a fresh mmap).
READ_SIZE = 1 << 16
# Longest error message sent in a failed result.
MAX_ERROR_CHARS = 500
# Seconds allowed for importing the job modules to learn their engines (numpy on a Pi);
# below the coordinator's wait for the hello (60 s).
ENGINE_PROBE_SECONDS = 30
# A worker that dies this soon after start without a task counts as failing to start:
# it is respawned with back-off (0.2 s, 0.4 s, ... up to MAX_RESPAWN_DELAY).
QUICK_DEATH_SECONDS = 5.0
MAX_RESPAWN_DELAY = 10.0
# The module holding the built-in jobs, and their names (functions of that module).
BUILTIN_MODULE = "jobs_builtin"
BUILTIN_JOBS = ("noop", "sleep", "spin", "fail", "crash", "echo", "blob")
# The whitelist: job name -> (module in the bundle or --lib, function called with args).
JOBS = dict([("primes", ("primes", "run")), ("scrape", ("scrape", "run")), ("map", ("mapper", "run"))]
            + [(name, (BUILTIN_MODULE, name)) for name in BUILTIN_JOBS])

# The jobs whose module names the engine it computes with (``module.ENGINE``, in the hello's
# ``engines``): an agent preloading none of them starts no engine probe (tests/test_agent.py
# checks this list against the modules).
ENGINE_JOBS = ("primes",)

logger = logging.getLogger("agent")
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def encode_line(message):
    """One protocol line: compact JSON, UTF-8 bytes, newline-terminated."""
    return _ENCODE(message).encode("utf-8") + b"\n"


def one_line_error(exc):
    """``"TypeName: message"`` on one line, at most MAX_ERROR_CHARS long."""
    text = str(exc).strip()
    text = "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS - 3] + "..."
    return text


def failure_kind(exc):
    """The kind of a task's failure (the coordinator's job decides on it, never on the text):
    the exception's ``failure_kind`` when it names one, else "error"."""
    kind = getattr(exc, "failure_kind", None)
    return kind if isinstance(kind, str) and kind else "error"


def exit_description(returncode):
    """``"signal 9"`` or ``"exit code 3"`` for a Popen return code."""
    if returncode is not None and returncode < 0:
        return "signal %d" % -returncode
    return "exit code %s" % returncode


def job_table(extra=None):
    """The job whitelist, plus ``NAME=MODULE[:FUNCTION]`` entries from ``--job``."""
    table = dict(JOBS)
    for spec in extra or ():
        name, _, target = spec.partition("=")
        module, _, function = target.partition(":")
        if not name or not module:
            raise ValueError("--job wants NAME=MODULE[:FUNCTION], not %r" % spec)
        table[name] = (module, function or "run")
    return table


def setup_path(lib):
    """Put the agent's folder and the private site dir ``lib`` (if any) on ``sys.path``."""
    for folder in (lib, HERE):
        if folder and os.path.isdir(folder) and folder not in sys.path:
            sys.path.insert(0, folder)


def default_lib():
    """``<agent folder>/../lib`` when it exists (where ``fab setup`` unpacks wheels), else None."""
    lib = os.path.join(os.path.dirname(HERE), "lib")
    return lib if os.path.isdir(lib) else None


def client_module(name):
    """Import a module of the client bundle by its plain name (``bundle``, ``probe``, ...)."""
    setup_path(None)
    return importlib.import_module(name)


def engines(only=None):
    """``{JOB: module.ENGINE}`` of each job whose module (``JOBS``) names the engine it computes
    with; None for a job whose module does not import. ``only``: these jobs alone (the agent's
    --preload: the coordinator starts an agent for one job, so the others' modules, numpy's
    for primes, are not imported just to say which engine they would use)."""
    found = {}
    for job, (module, _) in sorted(JOBS.items()):
        if only and job not in only:
            continue
        try:
            imported = client_module(module)
        except Exception as exc:  # an import of a job module may fail in any way
            logger.info("%s not available: %s", job, one_line_error(exc))
            found[job] = None
            continue
        if hasattr(imported, "ENGINE"):
            found[job] = imported.ENGINE
    return found


def start_engine_probe(opts):
    """Start ``agent.py --engines`` (job modules import there, not in the agent: numpy's
    memory and threads stay out of it, and an import that crashes cannot kill it); None
    when the --preload jobs have no engine to name (no process to start and wait for)."""
    preload = set(filter(None, (opts.preload or "").split(",")))
    if preload and not preload & set(ENGINE_JOBS):
        return None
    command = [sys.executable or "python3", AGENT_PATH, "--engines", "--log-level",
               opts.log_level]
    if opts.preload:
        command += ["--preload", opts.preload]
    if opts.lib:
        command += ["--lib", opts.lib]
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
    except OSError as exc:
        logger.warning("cannot start the engine probe: %s", exc)
        return None


def finish_engine_probe(proc):
    """The engines the probe started by ``start_engine_probe`` found ({} if none)."""
    found = {}
    if proc is None:
        return found
    try:
        output = proc.communicate(timeout=ENGINE_PROBE_SECONDS)[0]
        found.update(json.loads(output.decode("utf-8").strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        logger.warning("engine probe took over %ds: engines unknown", ENGINE_PROBE_SECONDS)
    except (ValueError, IndexError):
        logger.warning("engine probe failed (%s)", exit_description(proc.poll()))
    finally:
        kill_process(proc)
        proc.wait()
    return found


def usable_cores():
    """CPUs this process may use (sched_getaffinity where it exists)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def claim_stdout_fd():
    """Reserve fd 1 for the protocol: return a private (non-inherited) copy, send fd 1 to stderr.

    Anything a job or a library prints (``print``, C code writing to fd 1) then lands on
    stderr instead of corrupting the JSON stream.
    """
    fd = os.dup(1)
    try:
        os.dup2(2, 1)
    except OSError:
        pass
    sys.stdout = sys.stderr
    return fd


def claim_stdout():
    """Like ``claim_stdout_fd`` but return a buffered binary writer on the private copy."""
    return os.fdopen(claim_stdout_fd(), "wb")


def kill_process(proc):
    """SIGKILL a worker and its process group (workers lead their own session)."""
    if proc is None or proc.returncode is not None:
        return  # already reaped: its pid may belong to someone else now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        return
    except (AttributeError, OSError):
        pass
    try:
        proc.kill()
    except OSError:
        pass


# ---------------------------------------------------------------------------- worker side


def _die_with_group():
    """Kill this worker and anything it started (its process group), then exit."""
    try:
        if os.getpgrp() == os.getpid():
            os.killpg(0, signal.SIGKILL)
    except (AttributeError, OSError):
        pass
    os._exit(1)


def _watch_parent(parent, interval):
    """Worker thread: exit as soon as the agent (``parent``) is no longer our parent."""
    while True:
        if os.getppid() != parent:
            _die_with_group()
        time.sleep(interval)


class JobRunner(object):
    """Runs one task line in a worker: import the job lazily, call it, encode the result."""

    def __init__(self, table, slot):
        self.table = table
        self.slot = slot
        self.cache = {}

    def resolve(self, job):
        """The function for job name ``job`` (imported on first use, then cached)."""
        function = self.cache.get(job)
        if function is None:
            module_name, attr = self.table[job]
            function = getattr(importlib.import_module(module_name), attr)
            self.cache[job] = function
        return function

    def run_line(self, line):
        """Run the task in ``line`` (bytes) and return the result line (bytes)."""
        task_id = None
        started = time.perf_counter()
        try:
            message = json.loads(line.decode("utf-8"))
            task_id = message.get("id")
            job = message.get("job")
            function = self.resolve(job)
            args = message.get("args") or {}
            started = time.perf_counter()  # the import is not part of the job's time
            result = function(args)
            elapsed = time.perf_counter() - started
            if not isinstance(result, dict):
                raise TypeError("job %r returned %s, not a dict" % (job, type(result).__name__))
            return encode_line({"type": "result", "id": task_id, "ok": True, "result": result,
                                "elapsed": round(elapsed, 6), "slot": self.slot})
        except BaseException as exc:  # a job may raise anything, SystemExit included
            elapsed = time.perf_counter() - started
            logger.debug("slot %d: task %r failed", self.slot, task_id, exc_info=True)
            return encode_line({"type": "result", "id": task_id, "ok": False,
                                "error": one_line_error(exc), "kind": failure_kind(exc),
                                "elapsed": round(elapsed, 6), "slot": self.slot})


def worker_main(opts):
    """A worker: read task lines on stdin, answer each with one result line on stdout."""
    out = claim_stdout()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we stop
    if opts.parent:
        watcher = threading.Thread(target=_watch_parent, name="watch-agent",
                                   args=(opts.parent, PARENT_POLL_SECONDS))
        watcher.daemon = True
        watcher.start()
    if opts.nice:
        try:
            os.nice(opts.nice)
        except (AttributeError, OSError) as exc:
            logger.info("slot %d: cannot renice by %d: %s", opts.slot, opts.nice, exc)
    os.environ["BEOWULF_WORKER_SLOT"] = str(opts.slot)  # scrape: one Tor circuit per worker slot
    runner = JobRunner(job_table(opts.job), opts.slot)
    for job in filter(None, (opts.preload or "").split(",")):
        try:
            runner.resolve(job)
        except Exception as exc:
            logger.warning("slot %d: cannot preload %s: %s", opts.slot, job, one_line_error(exc))
    readline = sys.stdin.buffer.readline
    while True:
        line = readline()
        if not line:
            break  # the agent closed our stdin or died
        try:
            out.write(runner.run_line(line))
            out.flush()
        except (OSError, ValueError):
            break  # the agent is gone
    _die_with_group()


# ---------------------------------------------------------------------------- agent side


class _Stop(BaseException):
    """Unwinds the agent's loop: a termination signal (code 128+n) or a fatal condition."""

    def __init__(self, code, reason):
        BaseException.__init__(self, code, reason)
        self.code = code
        self.reason = reason


def _raise_stop(signum, frame):
    raise _Stop(128 + signum, "signal %d" % signum)


def task_key(task_id):
    """A hashable key for a task id (ids are normally strings or integers)."""
    if isinstance(task_id, (str, int, float)):
        return task_id
    return json.dumps(task_id, sort_keys=True)


class LineSplitter(object):
    """Cuts a byte stream read in arbitrary chunks into lines (without their newline)."""

    def __init__(self):
        self.parts = []

    def feed(self, data):
        """The complete lines in ``data`` plus what came before it; keeps the remainder."""
        if b"\n" not in data:
            self.parts.append(data)
            return []
        if self.parts:
            self.parts.append(data)
            data = b"".join(self.parts)
            self.parts = []
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest:
            self.parts.append(rest)
        return lines


class Task(object):
    """A task the agent holds: queued (slot None) or running on a slot."""

    __slots__ = ("id", "key", "line", "slot", "started", "delivered")

    def __init__(self, task_id, line):
        self.id = task_id
        self.key = task_key(task_id)
        self.line = line
        self.slot = None
        self.started = None
        self.delivered = False


class Worker(object):
    """One worker process: its pipes and the partial line read from it."""

    __slots__ = ("slot", "proc", "fd_in", "fd_out", "lines", "spawned", "closed")

    def __init__(self, slot, proc):
        self.slot = slot
        self.proc = proc
        self.fd_in = proc.stdin.fileno()
        self.fd_out = proc.stdout.fileno()
        self.lines = LineSplitter()
        self.spawned = time.monotonic()
        self.closed = False


class Slot(object):
    """A place for one worker and the task it runs (``task`` None when idle)."""

    __slots__ = ("index", "worker", "task", "quick_deaths")

    def __init__(self, index):
        self.index = index
        self.worker = None
        self.task = None
        self.quick_deaths = 0


def _open_selector(fd):
    """A selector watching ``fd`` for reading; select() where epoll refuses (files, /dev/null)."""
    selector = selectors.DefaultSelector()
    try:
        selector.register(fd, selectors.EVENT_READ, STDIN)
        return selector
    except (OSError, ValueError):
        selector.close()
    selector = selectors.SelectSelector()
    selector.register(fd, selectors.EVENT_READ, STDIN)
    return selector


def _can_be_nonblocking(fd):
    """True when ``fd`` is a pipe or socket of its own (never a tty or a file, nor stderr's)."""
    try:
        info = os.fstat(fd)
        if not (stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode)):
            return False
        other = os.fstat(2)
        return (info.st_dev, info.st_ino) != (other.st_dev, other.st_ino)
    except (OSError, ValueError):
        return False


# Selector tags of the agent's own streams (workers are tagged with their Worker).
STDIN = "stdin"
STDOUT = "stdout"


class Agent(object):
    """The coordinator-facing process: one thread, one selector loop.

    The loop waits on stdin, every worker's stdout and (while output is pending) stdout,
    with a timeout for the next heartbeat. Results are forwarded as the worker wrote
    them; stdout is non-blocking where that is safe, so a slow link never keeps a free
    worker waiting for its next task.
    """

    def __init__(self, opts):
        self.opts = opts
        self.host = opts.host or platform.node() or "?"
        self.jobs = job_table(opts.job)
        self.queue = collections.deque()
        self.tasks = {}
        self.slots = [Slot(index) for index in range(opts.slots)]
        self.workers = set()
        self.respawns = {}
        self.closing = False
        self.parent = os.getppid()
        self.probe = None
        self.selector = None
        self.stdin_lines = LineSplitter()
        self.last_heard = time.monotonic()
        self.out_fd = None
        self.out_flags = None
        self.pending = collections.deque()

    # -- output

    def write(self, data):
        """Send one protocol line (bytes), or queue it behind output still pending."""
        if self.pending:
            self.pending.append(data)
            return
        try:
            written = os.write(self.out_fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            raise _Stop(0, "stdout closed (%s)" % exc) from None
        if written < len(data):
            self.pending.append(memoryview(data)[written:])
            self.selector.register(self.out_fd, selectors.EVENT_WRITE, STDOUT)

    def flush_some(self):
        """Write what stdout takes now of the pending output."""
        while self.pending:
            data = self.pending[0]
            try:
                written = os.write(self.out_fd, data)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _Stop(0, "stdout closed (%s)" % exc) from None
            if written < len(data):
                self.pending[0] = memoryview(data)[written:]
                return
            self.pending.popleft()
        self.selector.unregister(self.out_fd)

    def send(self, message):
        """Send one protocol message (a dict)."""
        self.write(encode_line(message))

    def reject(self, task_id, error, elapsed=0.0, slot=None, kind="error"):
        """Answer a task with a failed result."""
        message = {"type": "result", "id": task_id, "ok": False, "error": error, "kind": kind,
                   "elapsed": round(elapsed, 6)}
        if slot is not None:
            message["slot"] = slot
        self.send(message)

    # -- workers

    def worker_command(self, slot):
        """The command line of slot ``slot``'s worker process."""
        command = [sys.executable or "python3", AGENT_PATH, "--worker", "--slot", str(slot),
                   "--parent", str(os.getpid()), "--nice", str(self.opts.nice),
                   "--log-level", self.opts.log_level]
        if self.opts.lib:
            command += ["--lib", self.opts.lib]
        for spec in self.opts.job or ():
            command += ["--job", spec]
        if self.opts.preload:
            command += ["--preload", self.opts.preload]
        return command

    def spawn(self, slot):
        """Start a worker for ``slot`` (retried in a second if the system refuses)."""
        try:
            proc = subprocess.Popen(self.worker_command(slot.index), bufsize=0,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            logger.error("%s/%d: cannot start a worker: %s", self.host, slot.index, exc)
            self.respawns[slot.index] = time.monotonic() + 1.0
            return
        worker = Worker(slot, proc)
        slot.worker = worker
        self.workers.add(worker)
        self.selector.register(worker.fd_out, selectors.EVENT_READ, worker)
        logger.debug("%s/%d: worker %d started", self.host, slot.index, proc.pid)

    def dispatch(self):
        """Hand queued tasks to idle workers."""
        while self.queue:
            for slot in self.slots:
                if slot.task is None and slot.worker is not None:
                    break
            else:
                return
            task = self.queue.popleft()
            slot.task = task
            task.slot = slot
            task.started = time.monotonic()
            try:
                view = memoryview(task.line)
                while view:
                    view = view[os.write(slot.worker.fd_in, view):]
                task.delivered = True
            except OSError:
                task.delivered = False  # the worker is dead: its EOF requeues the task

    def on_worker_data(self, worker):
        """A worker's stdout is readable: forward its results, or handle its death."""
        try:
            data = os.read(worker.fd_out, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.on_worker_exit(worker)
            return
        for line in worker.lines.feed(data):
            slot = worker.slot
            task = slot.task if slot.worker is worker else None
            if task is None:
                if slot.worker is worker:
                    logger.warning("%s/%d: stray line from worker %d", self.host, slot.index,
                                   worker.proc.pid)
                continue  # or the output of a worker killed by a cancel
            slot.task = task.slot = None
            del self.tasks[task.key]
            slot.quick_deaths = 0
            self.dispatch()  # the worker's next task first, then the result
            self.write(line + b"\n")

    def close_worker(self, worker):
        """Forget a worker whose stdout closed: unregister, close its pipes, reap it."""
        worker.closed = True
        self.workers.discard(worker)
        try:
            self.selector.unregister(worker.fd_out)
        except (KeyError, ValueError):
            pass
        for pipe in (worker.proc.stdout, worker.proc.stdin):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            return worker.proc.wait(EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            kill_process(worker.proc)
            return worker.proc.wait()

    def on_worker_exit(self, worker):
        """A worker died: fail its task, start a new one (with back-off if it keeps dying)."""
        returncode = self.close_worker(worker)
        slot = worker.slot
        if self.closing or slot.worker is not worker:
            return  # killed on purpose (cancel): nothing to report
        task, slot.task, slot.worker = slot.task, None, None
        if task is not None:
            task.slot = None
            if not task.delivered:
                self.queue.appendleft(task)  # it never reached the dead worker
                task = None
            else:
                del self.tasks[task.key]
        quick = task is None and time.monotonic() - worker.spawned < QUICK_DEATH_SECONDS
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        what = exit_description(returncode)
        if slot.quick_deaths:
            delay = min(0.1 * 2 ** slot.quick_deaths, MAX_RESPAWN_DELAY)
            self.respawns[slot.index] = time.monotonic() + delay
            logger.warning("%s/%d: worker %d died idle (%s); new one in %.1fs", self.host,
                           slot.index, worker.proc.pid, what, delay)
        else:
            self.spawn(slot)
        if task is not None:
            logger.warning("%s/%d: worker %d died (%s) running task %r", self.host, slot.index,
                           worker.proc.pid, what, task.id)
            self.reject(task.id, "worker died (%s)" % what, time.monotonic() - task.started,
                        slot.index, kind="died")
        self.dispatch()

    def respawn_due(self, now):
        """Start the workers whose back-off has passed."""
        for index, when in list(self.respawns.items()):
            if when <= now:
                del self.respawns[index]
                self.spawn(self.slots[index])
        self.dispatch()

    # -- messages

    def on_task(self, message, line):
        """Queue a task; the next free slot runs it."""
        task_id = message.get("id")
        job = message.get("job")
        if task_id is None:
            logger.warning("%s: task without an id ignored", self.host)
        elif not isinstance(job, str) or job not in self.jobs:
            self.reject(task_id, "unknown job %r" % (job,))
        elif not isinstance(message.get("args", {}), dict):
            self.reject(task_id, "args must be a JSON object")
        else:
            task = Task(task_id, line + b"\n")
            if task.key in self.tasks:
                self.reject(task_id, "duplicate task id (already queued or running)")
                return
            self.tasks[task.key] = task
            self.queue.append(task)
            self.dispatch()

    def on_cancel(self, message):
        """Drop a queued task, or kill the worker running it; no result will follow."""
        task = self.tasks.pop(task_key(message.get("id")), None)
        if task is None:
            logger.debug("%s: cancel of unknown task %r", self.host, message.get("id"))
        elif task.slot is None:
            self.queue.remove(task)
            logger.debug("%s: cancelled queued task %r", self.host, task.id)
        else:
            slot = task.slot
            slot.task = task.slot = None
            kill_process(slot.worker.proc)  # its EOF comes later; its output is ignored
            slot.worker = None
            logger.info("%s/%d: cancelled running task %r", self.host, slot.index, task.id)
            self.spawn(slot)
            self.dispatch()

    def handle(self, line):
        """Act on one line from the coordinator; False means stop (``bye``)."""
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError:
            if line.strip():
                logger.warning("%s: invalid JSON line ignored: %r", self.host, line[:200])
            return True
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "task":
            self.on_task(message, line)
        elif kind == "ping":
            self.send({"type": "pong", "id": message.get("id"), "t": time.time()})
        elif kind == "cancel":
            self.on_cancel(message)
        elif kind == "bye":
            logger.info("%s: bye", self.host)
            return False
        else:
            logger.warning("%s: message of unknown type ignored: %r", self.host, line[:200])
        return True

    def on_stdin(self):
        """Stdin is readable: handle every complete line; False on EOF or bye."""
        try:
            data = os.read(0, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            logger.info("%s: stdin closed", self.host)
            return False
        self.last_heard = time.monotonic()
        for line in self.stdin_lines.feed(data):
            try:
                if not self.handle(line):
                    return False
            except Exception:
                logger.exception("%s: error handling %r", self.host, line[:200])
        return True

    def hello(self, found_engines):
        """The first message: who we are and what we run."""
        try:
            bundle = client_module("bundle").bundle_hash(HERE)
        except Exception as exc:
            logger.error("%s: cannot hash the bundle: %s", self.host, one_line_error(exc))
            bundle = None
        return {"type": "hello", "bundle": bundle, "python": platform.python_version(),
                "cores": usable_cores(), "slots": len(self.slots), "host": self.host,
                "pid": os.getpid(), "engines": found_engines, "protocol": PROTOCOL,
                "jobs": sorted(self.jobs), "nice": self.opts.nice}

    def beat(self):
        """A heartbeat message: load, temperature, running and queued task counts."""
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except (AttributeError, OSError):
            load = None
        try:
            temp = self.probe.temperature() if self.probe else None
        except Exception:
            temp = None
        busy = sum(1 for slot in self.slots if slot.task is not None)
        return {"type": "beat", "t": round(time.time(), 3), "load": load, "temp": temp,
                "busy": busy, "queued": len(self.queue)}

    # -- life cycle

    def run(self):
        """Start the workers, say hello, serve stdin until EOF or bye; return the exit code."""
        for name in ("SIGTERM", "SIGHUP", "SIGINT"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _raise_stop)
        code = 0
        try:
            self.out_fd = claim_stdout_fd()
            if fcntl is not None and _can_be_nonblocking(self.out_fd):
                self.out_flags = fcntl.fcntl(self.out_fd, fcntl.F_GETFL)
                fcntl.fcntl(self.out_fd, fcntl.F_SETFL, self.out_flags | os.O_NONBLOCK)
            self.selector = _open_selector(0)
            engine_probe = start_engine_probe(self.opts)
            try:
                for slot in self.slots:
                    self.spawn(slot)
                try:
                    self.probe = client_module("probe")
                except Exception:
                    self.probe = None
                found = finish_engine_probe(engine_probe)
            finally:
                kill_process(engine_probe)
            self.send(self.hello(found))
            logger.info("%s: agent %d up, %d slots, bundle %s", self.host, os.getpid(),
                        len(self.slots), HERE)
            self.loop()
        except _Stop as stop:
            logger.log(logging.INFO if stop.code != 1 else logging.ERROR, "%s: stopping: %s",
                       self.host, stop.reason)
            code = stop.code
        finally:
            for name in ("SIGTERM", "SIGHUP", "SIGINT"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
            self.shutdown()
        return code

    def loop(self):
        """Serve until stdin closes or ``bye`` (returns), or a _Stop is raised."""
        select = self.selector.select
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                if os.getppid() != self.parent:
                    raise _Stop(0, "parent process %d is gone" % self.parent)
                if self.opts.idle_timeout and now - self.last_heard > self.opts.idle_timeout:
                    # A link that dropped without closing (Wi-Fi gone, partition): stdin never
                    # reaches EOF, so silence from the coordinator is the only sign.
                    raise _Stop(0, "nothing from the coordinator for %.0f s" % (now - self.last_heard))
                self.send(self.beat())
                next_beat = now + self.opts.beat
            timeout = next_beat - now
            if self.respawns:
                timeout = min(timeout, min(self.respawns.values()) - now)
            for key, _ in select(max(0.0, timeout)):
                source = key.data
                if source is STDIN:
                    if not self.on_stdin():
                        return
                elif source is STDOUT:
                    self.flush_some()
                elif not source.closed:
                    self.on_worker_data(source)
            if self.respawns:
                self.respawn_due(time.monotonic())

    def shutdown(self):
        """Kill every worker (SIGKILL to its process group), reap them, flush stdout: ~1 s."""
        self.closing = True
        workers = list(self.workers)
        for worker in workers:
            kill_process(worker.proc)
        deadline = time.monotonic() + EXIT_GRACE_SECONDS
        for worker in workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s: worker %d did not exit", self.host, worker.proc.pid)
        self.drain(deadline)
        if self.out_flags is not None:
            try:
                fcntl.fcntl(self.out_fd, fcntl.F_SETFL, self.out_flags)
            except OSError:
                pass

    def drain(self, deadline):
        """Write the pending output until ``deadline`` (the coordinator may be gone)."""
        while self.pending and time.monotonic() < deadline:
            try:
                self.flush_some()
            except _Stop:
                return
            if self.pending:
                try:
                    select.select([], [self.out_fd], [], max(0.0, deadline - time.monotonic()))
                except (OSError, ValueError):
                    return


# ---------------------------------------------------------------------------- entry point


def parse_args(argv=None):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="beowulf agent: runs tasks for the coordinator")
    parser.add_argument("--host", default=None, help="this host's name in the inventory")
    parser.add_argument("--slots", type=int, default=None,
                        help="worker processes (default: usable cores)")
    parser.add_argument("--slot-factor", type=int, default=1,
                        help="worker processes per slot, for jobs that wait on the network (default 1)")
    parser.add_argument("--nice", type=int, default=DEFAULT_NICE,
                        help="niceness added to workers (default %d)" % DEFAULT_NICE)
    parser.add_argument("--lib", default=None,
                        help="private site dir for job modules (default ../lib if it exists)")
    parser.add_argument("--idle-timeout", type=float, default=0,
                        help="exit after this many seconds without a message from the coordinator "
                             "(0: never; the coordinator pings every few seconds)")
    parser.add_argument("--beat", type=float, default=DEFAULT_BEAT,
                        help="seconds between heartbeats (default %g)" % DEFAULT_BEAT)
    parser.add_argument("--job", action="append", default=[], metavar="NAME=MODULE[:FUNC]",
                        help="add a job to the whitelist (repeatable)")
    parser.add_argument("--preload", default="",
                        help="comma-separated jobs each worker imports at start")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.add_argument("--probe", action="store_true",
                        help="print host facts and the bundle hash as JSON and exit")
    parser.add_argument("--engines", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.slots is None:
        opts.slots = usable_cores()
    if opts.slots < 1 or opts.slot_factor < 1:
        parser.error("--slots and --slot-factor must be at least 1")
    opts.slots *= opts.slot_factor
    if opts.beat <= 0:
        parser.error("--beat must be positive")
    try:
        job_table(opts.job)
    except ValueError as exc:
        parser.error(str(exc))
    if opts.lib is None:
        opts.lib = default_lib()
    elif opts.lib:
        opts.lib = os.path.abspath(os.path.expanduser(opts.lib))
    return opts


def probe_main():
    """``--probe``: client/probe.py's facts, the bundle hash and the engines, as JSON."""
    facts = client_module("probe").facts(os.path.dirname(HERE))
    facts["bundle_hash"] = client_module("bundle").bundle_hash(HERE)
    facts["engines"] = engines()
    sys.stdout.write(json.dumps(facts) + "\n")
    return 0


def main(argv=None):
    """Run as the agent, a worker (``--worker``) or the probe (``--probe``)."""
    opts = parse_args(argv)
    os.umask(0o077)  # what the agent and its workers create (__pycache__ too) is private: SECURITY.md
    # Cache the job modules' bytecode even where the environment says not to (PYTHONDONTWRITEBYTECODE):
    # otherwise every agent, worker and probe compiles them again at each start (README.md, "fab map").
    sys.dont_write_bytecode = False
    setup_path(opts.lib)
    name = "worker-%d" % opts.slot if opts.worker else "agent"
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, opts.log_level.upper()),
                        format="%(asctime)s " + name + "[%(process)d] %(levelname)s %(message)s")
    if opts.worker:
        return worker_main(opts)
    if opts.probe:
        return probe_main()
    if opts.engines:
        sys.stdout.write(json.dumps(engines(set(filter(None, opts.preload.split(","))))) + "\n")
        return 0
    code = Agent(opts).run()
    logging.shutdown()
    os._exit(code)  # daemon threads may sit in blocking reads: skip interpreter teardown


if __name__ == "__main__":
    sys.exit(main())
