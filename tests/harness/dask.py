"""A real Dask cluster on 127.0.0.1: one ``dask scheduler`` and ``dask worker`` processes.

Every process is started here and stopped here by its PID (never by name). Workers run with
``--no-nanny`` (the PID is the worker: SIGKILL really kills it), in a folder of their own,
with an environment that does not put this checkout on their path: what they run of beowulf
reaches them through Dask (README, "Engines"). A worker can be slowed: a thread stops and
continues it (SIGSTOP/SIGCONT) so that it runs only a fraction of the time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from .sshd import free_port, pid_alive

IP = "127.0.0.1"
START_SECONDS = 60.0


class DaskWorker:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path):
        self.name = name
        self.proc = proc
        self.log = log
        self._slow_stop: Optional[threading.Event] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def slow_down(self, running: float = 0.3, period: float = 0.1) -> None:
        """Let it run only ``running`` of each ``period`` seconds (SIGSTOP / SIGCONT)."""
        stop = self._slow_stop = threading.Event()

        def cycle():
            while not stop.is_set() and self.proc.poll() is None:
                try:
                    os.kill(self.pid, signal.SIGSTOP)
                    time.sleep(period * (1 - running))
                    os.kill(self.pid, signal.SIGCONT)
                except ProcessLookupError:
                    return
                time.sleep(period * running)
            if self.proc.poll() is None:
                try:
                    os.kill(self.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

        threading.Thread(target=cycle, name=f"slow-{self.name}", daemon=True).start()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._slow_stop is not None:
            self._slow_stop.set()
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


class DaskCluster:
    """``with DaskCluster(tmp) as cluster: cluster.add_worker("w1", threads=2)``; ``cluster.address``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port(IP)
        self.address = f"tcp://{IP}:{self.port}"
        self.scheduler: Optional[subprocess.Popen] = None
        self.workers: Dict[str, DaskWorker] = {}

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # workers get nothing of beowulf but what Dask brings them
        env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
        return env

    def start(self) -> DaskCluster:
        log = open(self.root / "scheduler.log", "wb")
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", IP, "--port", str(self.port),
             "--no-dashboard", "--no-show"],
            cwd=str(self.root), env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_port()
        return self

    def _wait_port(self) -> None:
        import socket

        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError("dask scheduler exited: " + (self.root / "scheduler.log").read_text()[-2000:])
            try:
                with socket.create_connection((IP, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("dask scheduler did not listen in time")

    def add_worker(self, name: str, threads: int = 1, wait: bool = True, env: Optional[dict] = None,
                   extra: Optional[List[str]] = None) -> DaskWorker:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        log = open(folder / "worker.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--name", name,
             "--nthreads", str(threads), "--no-nanny", "--no-dashboard", "--host", IP,
             "--local-directory", str(folder), *(extra or [])],
            cwd=str(folder), env={**self._env(), **(env or {})}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        worker = self.workers[name] = DaskWorker(name, proc, folder / "worker.log")
        if wait:
            self.wait_for(name)
        return worker

    def wait_for(self, name: str, timeout: float = START_SECONDS) -> None:
        """Until the scheduler lists worker ``name`` (its log says it registered)."""
        worker = self.workers[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"dask worker {name} exited: {worker.log.read_text()[-2000:]}")
            if b"Registered to:" in worker.log.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"dask worker {name} did not register in time")

    def worker_names(self) -> List[str]:
        return [name for name, w in self.workers.items() if w.proc.poll() is None]

    def kill_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            os.kill(self.scheduler.pid, signal.SIGKILL)
            self.scheduler.wait(timeout=15)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.kill(signal.SIGTERM)
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
                self.scheduler.wait(timeout=15)

    def pids(self) -> List[int]:
        procs = [w.proc for w in self.workers.values()] + ([self.scheduler] if self.scheduler else [])
        return [p.pid for p in procs if pid_alive(p.pid)]

    def __enter__(self) -> DaskCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(what, timeout: float = 120, proc=None, log=None) -> None:
    """Poll ``what()`` until true; fail when ``timeout`` passes or the fab process ``proc`` ends
    first (the tail of ``log`` in the message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fab ended early ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {log.read_text()[-3000:] if log else ''}")
