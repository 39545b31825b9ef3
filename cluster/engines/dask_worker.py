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
"""

from __future__ import annotations

import os
import platform
import sys

from distributed.diagnostics.plugin import WorkerPlugin

# Folder name prefix of the bundle inside a worker's local directory.
FOLDER_PREFIX = "beowulf-client-"
# The plugin's name on the scheduler, followed by the bundle hash: registering the same bundle
# again replaces it; coordinators of other beowulf versions on the same cluster keep theirs.
PLUGIN_NAME = "beowulf-client"


def bundle_folder(base: str, bundle: str) -> str:
    """Where bundle ``bundle`` lives under a worker's local directory ``base``."""
    return os.path.join(base, FOLDER_PREFIX + bundle)


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
        found = importlib.import_module("bundle").bundle_hash(folder)
        facts["bundle"] = found
        if found != bundle:
            facts["error"] = f"the client bundle on the worker has hash {found}, not {bundle}"
            return facts
        agent = importlib.import_module("agent")
        where = os.path.dirname(os.path.abspath(getattr(agent, "__file__", "") or "?"))
        if where != os.path.abspath(folder):
            if os.path.basename(where).startswith(FOLDER_PREFIX):
                facts["error"] = (f"this worker process already runs another beowulf client "
                                  f"({os.path.basename(where)[len(FOLDER_PREFIX):]}): one version per worker process")
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
    return _runner(bundle).run_line(line)


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


def renice(niceness: int) -> int:
    """Lower this worker process's priority (every thread: Linux renices one thread at a time;
    threads started later inherit it). For the embedded LocalCluster only, whose workers share
    this computer with the coordinator, like a local host's agent workers (hosts.ini ``nice``)."""
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (AttributeError, OSError):
            pass
    return len(tids)


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
for _entry in (hello, run_line, renice, die_with, run_command, put_file):
    _entry.__module__ = "__main__"
