"""The Dask engine: each Dask worker is a host to the coordinator (README, "Engines").

The coordinator keeps every decision (block sizes, pipelining, endgame, validation, the
store); Dask only carries each task to the worker the coordinator chose. A ``DaskLink`` is
a HostLink whose "agent" is a ``DaskStream``: the same JSON lines as an SSH agent (hello,
results), but each task line is submitted to the scheduler with ``workers=[address]``,
``allow_other_workers=False``, ``retries=0``, ``pure=False`` and a unique key, and the
worker's result line is read back through HostLink's own reader, which validates it
exactly as an SSH host's. A watcher thread follows the scheduler: a worker that joins is
handed to the coordinator (``Coordinator.join``); one that leaves ends its stream, so its
blocks are redone elsewhere like a lost SSH host's; a lost scheduler ends them all.

The code run on workers (cluster/engines/dask_worker.py) is pickled by value, and the
client bundle (client/*.py) travels in a worker plugin: workers need only Dask.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import queue
import re
import sys
import threading
import time
import uuid
from typing import Optional

from ..agents import HostLink
from ..errors import ConnectError, RemoteError, UsageError
from ..inventory import DEFAULT_NICE, MAX_SLOTS, Host
from ..provision import CLIENT_DIR, local_bundle_hash
from ..transport import MAX_OUTPUT_BYTES, CommandResult, Transport
from . import dask_worker

log = logging.getLogger(__name__)
# Seconds to reach the scheduler before giving up (a dask-jobqueue scheduler on a busy login
# node may be slow; an address nobody listens on fails after this).
CONNECT_TIMEOUT = 10.0
# Seconds between the watcher's looks at the scheduler's workers.
WATCH_SECONDS = 0.5
# Seconds a worker's hello task may take (importing numpy on a cold worker).
HELLO_TIMEOUT = 60.0
# Jobs whose tasks run in a child worker process of the Dask worker (dask_worker.run_in_child):
# fab map runs the user's code, which may crash, hang, or need its timeout's signal (README, "Engines").
CHILD_JOBS = frozenset({"map"})
# Seconds the end of a command waits for the workers to stop their child workers.
STOP_CHILDREN_SECONDS = 5.0
# Longest worker name shown; longer ones are cut (names come from the cluster: hostile text).
MAX_NAME = 60
_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ws|wss|ucx)://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}\Z")
_NAME_JUNK = re.compile(r"[^A-Za-z0-9_.:@\-\[\]]")


def check_address(address: str) -> str:
    """A scheduler address as Dask takes it (``tcp://host:port``, ``tls://...``, ``host:port``)."""
    text = str(address).strip()
    if not _ADDRESS.match(text):
        raise UsageError(f"--scheduler: expected a Dask scheduler address such as tcp://10.0.0.5:8786, "
                         f"not {text[:60]!r}")
    return text


def worker_name(name, address: str) -> str:
    """A worker's name for tables and the store: its Dask name, or host:port of its address."""
    text = str(name) if name is not None else ""
    if not text or text == address:
        text = address.split("://", 1)[-1]
    elif text.isdigit() or (text.startswith("-") and text[1:].isdigit()):
        text = f"dask-{text}"
    text = _NAME_JUNK.sub("_", text)
    return text[:MAX_NAME] or "dask-worker"


def bundle_files() -> dict:
    """client/*.py as name -> bytes: what the worker plugin writes on each worker."""
    from client.bundle import bundle_files as names

    return {name: (CLIENT_DIR / name).read_bytes() for name in names(str(CLIENT_DIR))}


class DaskEngine:
    """One connection to a Dask scheduler (or an embedded LocalCluster) for one command."""

    def __init__(self, address: Optional[str] = None, *, local_workers: Optional[int] = None):
        self.address = address
        self.local_workers = local_workers
        self.client = None
        self.cluster = None
        self.bundle = local_bundle_hash()
        self.workers: dict[str, dict] = {}  # address -> scheduler facts (name, nthreads, memory_limit)
        self.names: dict[str, str] = {}  # our name -> address
        self.seen: dict[str, float] = {}  # address -> monotonic time the watcher last saw it
        self.streams: dict[str, set] = {}  # address -> open DaskStreams
        self.lost_scheduler = ""
        self._versions: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self.coordinator = None
        self.children = False  # some task ran in a child worker (dask_worker.run_in_child)
        self._kills: list = []  # (worker address, task keys) whose children kill_later kills
        self._killer: Optional[threading.Thread] = None

    # ------------------------------------------------------------ life cycle

    def start(self, plugin: bool = True) -> DaskEngine:
        """Connect (or start the embedded LocalCluster); ConnectError (exit 1) when it cannot."""
        import cloudpickle
        from distributed import Client

        log.debug("dask: starting")
        cloudpickle.register_pickle_by_value(dask_worker)  # workers need no beowulf install
        # Dask's own lines (an embedded scheduler's every step; a lost scheduler's tracebacks) stay
        # out of beowulf's console: what they mean is said once, in beowulf's words (a worker left,
        # the scheduler is gone, a worker cannot run the client).
        names = [name for name in logging.root.manager.loggerDict if name.startswith("distributed.")]
        for name in ["distributed", "tornado", "bokeh", *names]:  # Dask sets levels of its children too
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if self.address:
            _probe(self.address)
        try:
            if self.address:
                self.client = Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
            else:
                self.cluster = _local_cluster(self.local_workers)
                self.client = Client(self.cluster, set_as_default=False)
        except (OSError, TimeoutError) as err:
            self.close()
            raise ConnectError(f"cannot reach the Dask scheduler at {self.address}: {_one_line(err)}") from None
        except ValueError as err:  # a malformed address that passed our check
            self.close()
            raise UsageError(f"--scheduler: {_one_line(err)}") from None
        log.debug("dask: connected to %s", self.scheduler_address)
        if self.cluster is not None:
            # Its workers share this computer with the coordinator: niced like a local host's
            # agent workers (hosts.ini's nice, default 10), so that checking and storing results
            # is not starved by the sieving (BENCHMARKS.md, "Dask engine").
            self.client.run(dask_worker.renice, DEFAULT_NICE)
            # Forked from this process: they go when it goes, even by SIGKILL.
            watched = self.client.run(dask_worker.die_with, os.getpid())
            if not all(watched.values()):
                log.debug("dask: LocalCluster workers not children of this process: %s", watched)
        if plugin:
            files = bundle_files()
            bundle_plugin = dask_worker.BundlePlugin(self.bundle, files)
            self.client.register_plugin(bundle_plugin, name=bundle_plugin.name)
        self.refresh()
        return self

    def close(self) -> None:
        log.debug("dask: closing")
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for streams in list(self.streams.values()):
            for stream in list(streams):
                stream.end("the run is over")
        client, cluster = self.client, self.cluster
        if client is not None and self.children and not self.lost_scheduler:
            self._stop_children(client)
        self.client = self.cluster = None
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception as err:  # the scheduler may be gone already
                log.debug("closing the Dask client: %s", err)
        if cluster is not None:
            try:
                cluster.close(timeout=10)
            except Exception as err:
                log.debug("closing the LocalCluster: %s", err)
        log.debug("dask: closed")

    def kill_later(self, address: str, keys: list) -> None:
        """Have ``address`` kill the children running ``keys`` (dask_worker.kill_tasks), from a thread
        of its own; nothing when the worker has left (its children went with it)."""
        with self._lock:
            if address not in self.workers:
                return
            self._kills.append((address, keys))
            if self._killer is None or not self._killer.is_alive():
                self._killer = threading.Thread(target=self._kill_loop, name="dask-kill", daemon=True)
                self._killer.start()

    def _kill_loop(self) -> None:
        while True:
            with self._lock:
                if not self._kills:
                    self._killer = None
                    return
                address, keys = self._kills.pop(0)
            client = self.client
            if client is None or address not in self.workers:
                continue
            try:
                client.run(dask_worker.kill_tasks, keys, workers=[address], wait=False, on_error="ignore")
            except Exception as err:  # the worker or the scheduler is gone: nothing left to kill
                log.debug("%s: killing cancelled tasks: %s", address, _one_line(err))

    def _stop_children(self, client) -> None:
        """Every worker ends its child workers (dask_worker.stop_children): on a cluster that
        outlives the command they would otherwise wait, idle, for tasks that never come."""
        _run_everywhere(client, "stopping the child workers", dask_worker.stop_children)

    def remove_run_folders(self, run: str) -> None:
        """fab map's run is over: each worker removes WORKDIR/map/RUN (dask_worker.remove_run)."""
        client = self.client
        if client is not None and not self.lost_scheduler:
            _run_everywhere(client, "removing the run folders", dask_worker.remove_run, self.bundle, run)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def scheduler_address(self) -> str:
        return self.address or (self.cluster.scheduler_address if self.cluster is not None else "")

    # ------------------------------------------------------------ workers

    def refresh(self) -> dict[str, dict]:
        """The scheduler's workers now (address -> facts); raises on a lost scheduler."""
        info = self.client.scheduler_info(n_workers=-1) if _takes_n_workers(self.client) \
            else self.client.scheduler_info()
        workers = {}
        for address, facts in (info.get("workers") or {}).items():
            workers[str(address)] = {
                "name": worker_name(facts.get("name"), str(address)),
                "nthreads": min(MAX_SLOTS, max(1, int(facts.get("nthreads") or 1))),
                "memory_limit": int(facts.get("memory_limit") or 0),
            }
        now = time.monotonic()
        with self._lock:
            self.workers = workers
            for address, facts in workers.items():
                self.names[facts["name"]] = address
                self.seen[address] = now
        return workers

    def hosts(self) -> list[Host]:
        """The workers as hosts (name, slots = threads), in name order."""
        return [self.host_of(address) for address in sorted(self.workers, key=lambda a: self.workers[a]["name"])]

    def host_of(self, address: str) -> Host:
        facts = self.workers[address]
        return Host(name=facts["name"], address=f"dask {address}", slots=facts["nthreads"], nice=0)

    def address_of(self, name: str) -> Optional[str]:
        with self._lock:
            address = self.names.get(name)
            return address if address in self.workers else None

    def versions(self, addresses=()) -> dict:
        """Per worker address: {'python', 'packages': {...}} as Dask reports them (built-in code only).
        Asked of the cluster (every worker at once) only when one of ``addresses`` is not known yet:
        a hundred workers starting must not make a hundred rounds of the whole cluster."""
        with self._lock:
            known = dict(self._versions)
        if addresses and all(address in known for address in addresses):
            return known
        found = self.client.get_versions(check=False)
        workers = found.get("workers") or {}
        out = {}
        for address, facts in workers.items():
            if not isinstance(facts, dict):
                continue
            host = facts.get("host") or {}
            out[str(address)] = {"python": str(host.get("python") or "").split()[0] or "?",
                                 "packages": {str(k): str(v) for k, v in (facts.get("packages") or {}).items()
                                              if v is not None}}
        with self._lock:
            self._versions.update(out)
        return out

    def hello(self, address: str, timeout: float = HELLO_TIMEOUT) -> dict:
        """Run the hello task on one worker: its facts, with ``error`` when it cannot run the client."""
        return self.hellos([address], timeout)[address]

    def hellos(self, addresses: list, timeout: float = HELLO_TIMEOUT) -> dict:
        """The hello of each worker (at once): address -> facts, with ``error`` when it cannot run
        the client (a Python other than ours, the bundle missing or different, an import failing)."""
        versions = self.versions(addresses)
        here = platform.python_version()
        out, futures = {}, {}
        for address in addresses:
            known = versions.get(address) or {}
            python = known.get("python", "")
            if python and python.split(".")[:2] != here.split(".")[:2]:
                # Code pickled by value (and Dask itself) needs the same Python minor version.
                out[address] = {"python": python, "engines": {}, "packages": known.get("packages", {}),
                                "error": f"Python {python} on the worker, {here} on the coordinator (Dask ships "
                                         "code pickled by value: the minor versions must match)"}
                continue
            futures[address] = self.client.submit(
                dask_worker.hello, self.bundle, key=f"beowulf-hello-{uuid.uuid4().hex}", workers=[address],
                allow_other_workers=False, retries=0, pure=False)
        deadline = time.monotonic() + timeout
        for address, future in futures.items():
            known = versions.get(address) or {}
            try:
                facts = self._wait(address, future, deadline)
                if not isinstance(facts, dict):
                    facts = {"error": "the hello task returned junk"}
            except Exception as err:
                _cancel(future)
                facts = {"python": known.get("python", "?"), "engines": {}, "error": _one_line(err)}
            facts.setdefault("packages", known.get("packages", {}))
            out[address] = facts
        return out

    def _wait(self, address: str, future, deadline: float):
        """``future``'s result; a worker that leaves meanwhile (its task would wait for it for ever:
        ``allow_other_workers=False``), the deadline, or the end of the command, is an error."""
        while True:
            if self._stop.is_set() or self.client is None:
                raise ConnectionError("the run is over")
            try:
                return future.result(timeout=min(WATCH_SECONDS, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if self.lost_scheduler:
                    raise ConnectionError(self.lost_scheduler) from None
                if self._watcher is not None and address not in self.workers:
                    raise ConnectionError("the worker left the Dask cluster") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no answer within {HELLO_TIMEOUT:.0f}s") from None

    # ------------------------------------------------------------ links

    def link_factory(self, host: Host, *args, **kwargs) -> DaskLink:
        """Coordinator(link_factory=...): a DaskLink where HostLink would be."""
        return DaskLink(self, host, *args, **kwargs)

    def watch(self, coordinator) -> None:
        """Follow the scheduler: workers joining go to ``coordinator.join``, leaving ones lose their links."""
        self.coordinator = coordinator
        self._watcher = threading.Thread(target=self._watch, name="dask-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        known = set(self.workers)
        while not self._stop.wait(WATCH_SECONDS):
            client = self.client
            if client is None:
                return
            try:
                if client.status != "running":
                    raise ConnectionError(f"client {client.status}")
                workers = self.refresh()
            except Exception as err:
                if self._stop.is_set():
                    return
                if not self.lost_scheduler:
                    self.lost_scheduler = f"the Dask scheduler is gone ({_one_line(err)})"
                    log.warning("%s", self.lost_scheduler)
                    with self._lock:
                        self.workers = {}
                    known = set()
                    self._end_all(self.lost_scheduler)
                if client.status in ("closed", "closing"):
                    return  # Dask gave up reconnecting: so does the run (every host lost: exit 1)
                continue
            if self.lost_scheduler:  # the client reconnected: its workers may start again
                log.warning("the Dask scheduler is back")
                self.lost_scheduler = ""
            for address in known - set(workers):
                log.warning("dask worker %s left the cluster", address)
                self._end(address, "the worker left the Dask cluster")
            for address in set(workers) - known:
                log.info("dask worker %s joined", address)
                if self.coordinator is not None:
                    self.coordinator.join(self.host_of(address))
            known = set(workers)

    def _end(self, address: str, reason: str) -> None:
        with self._lock:
            streams = list(self.streams.get(address, ()))
        for stream in streams:
            stream.end(reason)

    def _end_all(self, reason: str) -> None:
        with self._lock:
            addresses = list(self.streams)
        for address in addresses:
            self._end(address, reason)

    def register(self, stream: DaskStream) -> None:
        with self._lock:
            self.streams.setdefault(stream.address, set()).add(stream)

    def unregister(self, stream: DaskStream) -> None:
        with self._lock:
            self.streams.get(stream.address, set()).discard(stream)


class DaskLink(HostLink):
    """A HostLink whose agent is a Dask worker (see DaskStream)."""

    def __init__(self, engine: DaskEngine, host: Host, *args, **kwargs):
        super().__init__(host, *args, **kwargs)
        self.engine = engine

    def agent_command(self) -> str:
        return ""

    def _open_transport(self):
        engine = self.engine
        if engine.client is None or engine.lost_scheduler:
            raise ConnectError(f"{self.name}: {engine.lost_scheduler or 'not connected to the Dask scheduler'}")
        address = engine.address_of(self.name)
        if address is None:
            raise ConnectError(f"{self.name}: the worker is not in the Dask cluster (any more)")
        try:
            facts = engine.hello(address)
        except Exception as err:  # the client closed under it (the run ended while it started), the scheduler went
            raise ConnectError(f"{self.name}: {_one_line(err)}") from None
        if facts.get("error"):
            raise ConnectError(f"{self.name}: cannot run the client: {_one_line(facts['error'])}")
        executable = facts.get("executable")
        if isinstance(executable, str) and executable.startswith("/") and len(executable) < 4096:
            # The worker's own interpreter, for a job's prepare commands (Job.prepare_host).
            self.host = dataclasses.replace(self.host, python=executable)
        workdir = facts.get("workdir")
        if isinstance(workdir, str) and workdir.startswith("/") and len(workdir) < 4096 and "\0" not in workdir:
            # The bundle's folder on the worker (LOCAL_DIRECTORY/beowulf-HASH, the client in its
            # client/): a job's prepare step (fab map's shipping) uses it as the host's workdir.
            self.host = dataclasses.replace(self.host, workdir=workdir)
        return DaskTransport(engine, address, self.host, facts, engine.workers.get(address, {}))


class DaskTransport(Transport):
    """Stands where an SSH transport would: spawn() gives the worker's stream; run() and put()
    carry a job's prepare step (Job.prepare_host) to the worker, each as one Dask task."""

    def __init__(self, engine: DaskEngine, address: str, host: Host, facts: dict, worker: dict):
        self.engine, self.address, self.host, self.facts, self.worker = engine, address, host, facts, worker
        self.name = host.name

    def _call(self, function, *args, timeout: Optional[float] = None):
        client = self.engine.client
        if client is None:
            raise ConnectError(f"{self.name}: not connected to the Dask scheduler")
        future = client.submit(function, *args, key=f"beowulf-{function.__name__}-{uuid.uuid4().hex}",
                               workers=[self.address], allow_other_workers=False, retries=0, pure=False)
        deadline = time.monotonic() + (timeout if timeout is not None else HELLO_TIMEOUT) + 5
        try:
            return self.engine._wait(self.address, future, deadline)
        except Exception as err:
            _cancel(future)
            raise RemoteError(f"{self.name}: {_one_line(err)}") from None

    def run(self, command: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None) -> CommandResult:
        done = self._call(dask_worker.run_command, command, stdin or b"", timeout, MAX_OUTPUT_BYTES, timeout=timeout)
        if not isinstance(done, dict) or done.get("timeout"):
            raise RemoteError(f"{self.name}: command timed out after {timeout or 0:.0f}s")
        return CommandResult(int(done.get("returncode", -1)), str(done.get("stdout", "")),
                             str(done.get("stderr", "")))

    def put(self, data: bytes, path: str) -> None:
        self._call(dask_worker.put_file, data, path)

    def spawn(self, command: str) -> DaskStream:
        return DaskStream(self.engine, self.address, self.name, self.facts, self.worker)

    def sudo(self, command: str, timeout: Optional[float] = None) -> CommandResult:
        raise RemoteError(f"{self.name}: beowulf does not use sudo on a Dask worker")

    def close(self) -> None:
        pass


class DaskStream:
    """An agent's stdin/stdout over Dask: task lines in become futures, result lines come out."""

    def __init__(self, engine: DaskEngine, address: str, name: str, facts: dict, worker: dict):
        self.engine = engine
        self.address = address
        self.name = name
        self._lines: queue.Queue = queue.Queue()
        self._buffer = b""
        self._futures: dict[int, object] = {}
        self._lock = threading.Lock()
        self._ended = ""
        self._last = time.monotonic()
        slots = int(worker.get("nthreads") or 1)
        hello = {"type": "hello", "bundle": facts.get("bundle"), "python": facts.get("python"),
                 "cores": slots, "slots": slots, "host": name, "pid": facts.get("pid"),
                 "engines": facts.get("engines") or {}, "protocol": facts.get("protocol"),
                 "numpy": facts.get("numpy"), "engine": "dask", "address": address,
                 "memory": worker.get("memory_limit"), "nice": 0}
        engine.register(self)
        self._put(hello)

    def _put(self, message: dict) -> None:
        self._lines.put((json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8"))

    # -- the coordinator writes task, cancel, ping, bye lines

    def write(self, data: bytes) -> None:
        if self._ended:
            raise ConnectionError(self._ended)
        for line in data.splitlines():
            message = json.loads(line)
            kind = message.get("type")
            if kind == "task":
                self._submit(message["id"], line + b"\n", message.get("job"))
            elif kind == "cancel":
                with self._lock:
                    future = self._futures.pop(message.get("id"), None)
                if future is not None:
                    future.cancel()
                    self._kill([future])
            elif kind == "bye":
                self.end("bye")

    def _submit(self, task_id: int, line: bytes, job=None) -> None:
        client = self.engine.client
        if client is None:
            raise ConnectionError("not connected to the Dask scheduler")
        key = f"beowulf-{self.name}-{task_id}-{uuid.uuid4().hex[:12]}"
        if job in CHILD_JOBS:  # in a child worker process of the Dask worker (dask_worker.run_in_child)
            self.engine.children = True
            future = client.submit(dask_worker.run_in_child, self.engine.bundle, line, key, key=key,
                                   workers=[self.address], allow_other_workers=False, retries=0, pure=False)
            future.beowulf_child = True
        else:
            future = client.submit(dask_worker.run_line, self.engine.bundle, line, key=key,
                                   workers=[self.address], allow_other_workers=False, retries=0, pure=False)
        with self._lock:
            self._futures[task_id] = future
        future.add_done_callback(lambda done, task_id=task_id: self._done(task_id, done))

    def _kill(self, futures) -> None:
        """Kill the child workers running cancelled tasks (a Dask cancel does not stop a running
        task): Client.run reaches the worker outside its task threads, busy or not. Never here: a
        Client.run waits for the scheduler (and on a worker that is gone, for its connect timeout),
        and this runs in the coordinator's loop or the watcher (DaskEngine.kill_later)."""
        keys = [future.key for future in futures if getattr(future, "beowulf_child", False)]
        if keys:
            self.engine.kill_later(self.address, keys)

    def _done(self, task_id: int, future) -> None:
        with self._lock:
            if self._futures.pop(task_id, None) is not future or self._ended:
                return  # cancelled, or the stream ended: no result after a cancel (client/agent.py)
        try:
            if future.status == "finished":
                line = future.result()
                if not isinstance(line, bytes):
                    line = b"(not bytes)\n"  # junk: HostLink's reader counts it as not protocol
                self._last = time.monotonic()
                self._lines.put(line if line.endswith(b"\n") else line + b"\n")
                return
            if future.status != "error":  # cancelled by Dask, not by us: the scheduler connection went
                self.end(f"task {future.status} by Dask (the connection to the scheduler was lost?)")
                return
            text = _one_line(future.exception())
        except Exception as err:  # the client closed under us
            self.end(f"the Dask client failed: {_one_line(err)}")
            return
        self._put({"type": "result", "id": task_id, "ok": False, "error": f"dask: {text}", "elapsed": 0.0})

    # -- the coordinator reads

    def readline(self, limit: int = -1) -> bytes:
        if not self._buffer:
            line = self._lines.get()
            if line is None:
                self._lines.put(None)  # stays at the end for any later read
                return b""
            self._buffer = line
        if limit is None or limit < 0 or len(self._buffer) <= limit:
            line, self._buffer = self._buffer, b""
            return line
        piece, self._buffer = self._buffer[:limit], self._buffer[limit:]
        return piece

    def last_received(self) -> float:
        """Heard from lately: its last result, or the watcher seeing it in the scheduler's list."""
        return max(self._last, self.engine.seen.get(self.address, 0.0))

    def stderr_tail(self) -> str:
        return self._ended

    # -- ending

    def end(self, reason: str) -> None:
        """Cancel what it has in flight and end its output (the reader reports the link lost)."""
        with self._lock:
            if self._ended:
                return
            self._ended = reason
            futures, self._futures = list(self._futures.values()), {}
        self.engine.unregister(self)
        if futures and self.engine.client is not None:
            try:
                self.engine.client.cancel(futures)
            except Exception as err:
                log.debug("%s: cancelling: %s", self.name, err)
            self._kill(futures)
        self._lines.put(None)

    def kill(self) -> None:
        self.end("closed by the coordinator")

    def close_stdin(self) -> None:
        self.end("closed by the coordinator")


def worker_rows(engine: DaskEngine) -> tuple[list, list, int]:
    """fab hosts --engine dask: (headers, rows, workers that can run the client)."""
    addresses = sorted(engine.workers, key=lambda a: engine.workers[a]["name"])
    facts = engine.hellos(addresses) if addresses else {}
    rows, able = [], 0
    for address in addresses:
        worker, found = engine.workers[address], facts.get(address) or {}
        packages = found.get("packages") or {}
        listed = [f"{name} {packages[name]}" for name in ("dask", "distributed", "numpy") if packages.get(name)]
        if found.get("error"):
            can = f"no: {found['error']}"
        else:
            able += 1
            engine_name = (found.get("engines") or {}).get("primes") or "?"
            can = f"yes (primes engine: {engine_name})"
        memory = worker["memory_limit"]
        rows.append([worker["name"], address, worker["nthreads"], f"{memory / 2**30:.1f} GiB" if memory else "?",
                     found.get("python") or "?", ", ".join(listed), can])
    return ["worker", "address", "threads", "memory", "python", "packages", "runs the client"], rows, able


def _local_cluster(workers: Optional[int]):
    """The embedded LocalCluster: one single-threaded worker process per core, no dashboard."""
    import dask.config
    from distributed import LocalCluster

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    method = {}
    if sys.platform.startswith("linux") and dask.config.get("distributed.worker.multiprocessing-method") == "spawn":
        # Dask's default, spawn, starts each worker as a fresh Python that imports Dask again:
        # ~1 s per worker at start and ~0.7 s to stop, most of a short run's fixed cost
        # (BENCHMARKS.md, "Dask engine"). A fork of this process starts in ~0.1 s; the user's
        # own choice in Dask's configuration wins.
        method = {"distributed.worker.multiprocessing-method": "fork"}
    # Dask's statistical profiler samples every thread's stack every 10 ms in each worker: for
    # a dashboard nobody looks at here (none is started), at the cost of the sieving's CPU.
    method["distributed.worker.profile.enabled"] = False
    # The scheduler runs in this process: its work stealing (a 100 ms periodic balance; beowulf's
    # tasks are pinned to a worker, never stolen) and memory manager only cost the coordinator CPU.
    method["distributed.scheduler.work-stealing"] = False
    method["distributed.scheduler.active-memory-manager.start"] = False
    # Each Dask server (the scheduler, the nannies, here; the workers) times its event loop every
    # 20 ms to warn of a blocked loop: every 500 ms is plenty for that.
    method["distributed.admin.tick.interval"] = "500ms"
    with dask.config.set(method):
        # No dashboard, and the scheduler's HTTP routes (it serves some even without one) on a
        # free loopback port: Dask's default, 8787, warned "Port 8787 is already in use" on the
        # console whenever another cluster (or a second fab run) held it.
        return LocalCluster(n_workers=workers or cores, threads_per_worker=1, processes=True,
                            dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                            host="127.0.0.1", silence_logs=logging.ERROR)


def _run_everywhere(client, what: str, function, *args) -> None:
    """``function(*args)`` on every worker (Client.run), waited for at most STOP_CHILDREN_SECONDS
    (a worker that died but is still listed would hold Client.run for its connect timeout):
    a courtesy at the end of a command, never a failure of it."""
    def call():
        try:
            client.run(function, *args, on_error="ignore")
        except Exception as err:  # a worker or the scheduler going away meanwhile
            log.debug("%s: %s", what, _one_line(err))

    thread = threading.Thread(target=call, name=f"dask-{function.__name__}", daemon=True)
    thread.start()
    thread.join(STOP_CHILDREN_SECONDS)


def _cancel(future) -> None:
    """Cancel a future whose answer is no longer wanted; nothing when the client is closed already
    (the end of a run while a worker was still starting: ClosedClientError)."""
    try:
        future.cancel()
    except Exception as err:
        log.debug("cancelling %s: %s", getattr(future, "key", "?"), _one_line(err))


def _probe(address: str) -> None:
    """Fail at once (ConnectError) when nothing listens at a TCP scheduler address: Dask's client
    would retry for CONNECT_TIMEOUT seconds before saying the same."""
    import socket

    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp", "tls"):
        return
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
        raise ConnectError(f"cannot reach the Dask scheduler at {address}: {reason}") from None


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _one_line(err) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, BaseException) and type(err).__name__ not in text:
        text = f"{type(err).__name__}: {text}"
    return " ".join(text.split())[:300]
