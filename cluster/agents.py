"""One agent per host: start it, read its hello, send tasks, turn its lines into events.

Each HostLink owns one transport (one SSH connection, or local processes) and
one reader thread. The reader validates results right there (decoding a block
of primes is real work, and hosts then validate in parallel) and puts events on
the coordinator's queue. A link that is reconnected gets a new generation, so
events from the old connection are recognised and dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import BeowulfError, ConnectError
from .inventory import Host
from .provision import CLIENT_DIR, host_python, host_workdir
from .transport import Stream, Transport, connect

log = logging.getLogger(__name__)
HELLO_TIMEOUT = 60.0
# The coordinator pings each agent this often; an agent that hears nothing for
# AGENT_IDLE_TIMEOUT seconds assumes the link dropped and exits with its workers.
PING_SECONDS = 5.0
AGENT_IDLE_TIMEOUT = 45.0
# Longest line accepted from an agent (the largest result is a few MB); longer is a protocol error.
MAX_LINE_BYTES = 64 * 1024 * 1024
# Results checked at once across all hosts: checking a full primes block builds a ~60 MB array,
# so a few hosts finishing together must not multiply that (coordinator RSS stays flat).
_checks = threading.BoundedSemaphore(2)


@dataclass
class Event:
    """Something a host said or did, for the coordinator's loop."""

    kind: str  # "result" | "beat" | "lost"
    link: HostLink
    generation: int
    message: Optional[dict] = None
    checked: Any = None  # (found, payload) from the job's check, for valid results
    invalid: Optional[str] = None  # why a result was rejected
    reason: str = ""


class HostLink:
    """The coordinator's handle on one host's agent."""

    def __init__(self, host: Host, config, accept_new: bool, events: queue.Queue,
                 check: Callable[[int, int, dict], Any], bundle: str, beat_seconds: float = 2.0,
                 preload: str = "", prepare: Optional[Callable[[Transport], None]] = None,
                 slot_factor: int = 1):
        self.host = host
        self.name = host.name
        self.config = config
        self.accept_new = accept_new
        self.events = events
        self.check = check
        self.bundle = bundle
        self.beat_seconds = beat_seconds
        self.preload = preload
        self.prepare = prepare
        self.slot_factor = slot_factor
        self.generation = 0
        self.transport: Optional[Transport] = None
        self.stream: Optional[Stream] = None
        self.hello: dict = {}
        self.slots = host.slots or 1
        self.last_heard = time.monotonic()
        self.retired = False
        self._sent: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def agent_command(self) -> str:
        host = self.host
        flags = (f"--host {shlex.quote(host.name)} --nice {int(host.nice)} --beat {self.beat_seconds:g}"
                 f" --idle-timeout {AGENT_IDLE_TIMEOUT:g}")
        if host.slots:
            flags += f" --slots {int(host.slots)}"
        if self.preload:
            flags += f" --preload {shlex.quote(self.preload)}"
        if self.slot_factor > 1:
            flags += f" --slot-factor {int(self.slot_factor)}"
        if host.is_local:
            agent = shlex.quote(str(CLIENT_DIR / "agent.py"))
            return f"exec {shlex.quote(sys.executable)} {agent} {flags}"
        workdir = host_workdir(host)
        return f"exec {host_python(host)} {workdir}/client/agent.py {flags} --lib {workdir}/lib"

    def start(self) -> dict:
        """Connect, start the agent, wait for its hello; raise BeowulfError if the host cannot work."""
        self.close()
        with self._lock:
            self.generation += 1
            self._sent.clear()
        generation = self.generation
        transport = self.transport = connect(self.host, self.config, accept_new=self.accept_new)
        self._check_retired()
        if self.prepare is not None:
            try:
                self.prepare(transport)
            except BaseException:
                self.close()
                raise
        self.stream = transport.spawn(self.agent_command())
        hello_box: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.stream, generation, hello_box),
                         name=f"agent-{self.name}", daemon=True).start()
        try:
            hello = hello_box.get(timeout=HELLO_TIMEOUT)
        except queue.Empty:
            self.close()
            raise ConnectError(f"{self.name}: the agent did not say hello within {HELLO_TIMEOUT:.0f}s") from None
        if hello is None:
            tail = self.stream.stderr_tail().strip().splitlines() if self.stream else []
            self.close()
            detail = tail[-1] if tail else "no output"
            hint = "" if self.host.is_local else "; run fab setup"
            raise ConnectError(f"{self.name}: the agent did not start ({detail}){hint}")
        if hello.get("bundle") != self.bundle and not self.host.is_local:
            self.close()
            raise ConnectError(f"{self.name}: client bundle is stale ({hello.get('bundle')} != {self.bundle}); "
                               "run fab setup")
        self.hello = hello
        self.slots = int(hello.get("slots") or self.host.slots or hello.get("cores") or 1)
        self.last_heard = time.monotonic()
        self._check_retired()
        return hello

    def _check_retired(self) -> None:
        if self.retired:
            self.close()
            raise ConnectError(f"{self.name}: the run is over")

    def retire(self) -> None:
        """close() for good (the run is over): a start() still connecting, e.g. through a
        partition that just healed, then gives up instead of leaving an agent nobody stops."""
        self.retired = True
        self.close()

    def close(self) -> None:
        """Stop the agent (its stdin closes, it kills its workers) and drop the connection."""
        stream, transport = self.stream, self.transport
        self.stream = self.transport = None
        if stream is not None:
            stream.kill()
        if transport is not None:
            transport.close()

    def close_in_background(self) -> None:
        """close() without blocking the caller (a partitioned link can hang on close)."""
        threading.Thread(target=self.close, name=f"close-{self.name}", daemon=True).start()

    def silent_for(self, now: float) -> float:
        """Seconds since the agent last sent anything: a whole line, or part of a long one."""
        stream = self.stream
        heard = max(self.last_heard, stream.last_received()) if stream is not None else self.last_heard
        return now - heard

    # ------------------------------------------------------------ messages

    def send(self, message: dict) -> None:
        stream = self.stream
        if stream is None:
            raise ConnectionError("not connected")
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")
        with self._write_lock:
            stream.write(data)

    def send_task(self, task_id: int, job: str, lo: int, hi: int, args: dict) -> None:
        with self._lock:
            self._sent[task_id] = (lo, hi)
        self.send({"type": "task", "id": task_id, "job": job, "args": args})

    def ping(self) -> None:
        """Keep the agent's idle timer from firing (and the link's NAT/keepalive state warm)."""
        try:
            self.send({"type": "ping", "id": int(time.monotonic())})
        except (ConnectionError, OSError):
            pass

    def cancel(self, task_id: int) -> None:
        with self._lock:
            self._sent.pop(task_id, None)
        try:
            self.send({"type": "cancel", "id": task_id})
        except (ConnectionError, OSError):
            pass

    # ------------------------------------------------------------ reader

    def _read(self, stream: Stream, generation: int, hello_box: queue.Queue) -> None:
        said_hello = False
        reason = "connection closed"
        try:
            while True:
                line = stream.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
                    reason = f"protocol error: a line of over {MAX_LINE_BYTES // 2**20} MB (or cut short)"
                    if self.stream is stream:  # not just the tail of a stream we closed ourselves
                        log.warning("%s: %s", self.name, reason)
                    break
                try:
                    message = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    if self.stream is stream:
                        log.warning("%s: not protocol: %r", self.name, line[:120])
                    continue
                if not isinstance(message, dict):
                    continue
                self.last_heard = time.monotonic()
                kind = message.get("type")
                if kind == "hello" and not said_hello:
                    said_hello = True
                    hello_box.put(message)
                elif kind == "result":
                    self.events.put(self._result_event(message, generation))
                elif kind == "beat":
                    self.events.put(Event("beat", self, generation, message))
        except Exception as err:  # the reader must always report the link as lost
            reason = f"reader failed: {err}"
            log.exception("%s: reader failed", self.name)
        if not said_hello:
            hello_box.put(None)
        else:
            self.events.put(Event("lost", self, generation, reason=reason))

    def _result_event(self, message: dict, generation: int) -> Event:
        event = Event("result", self, generation, message)
        with self._lock:
            bounds = self._sent.pop(message.get("id"), None)
        if bounds is None or not message.get("ok"):
            return event
        try:
            with _checks:
                event.checked = self.check(bounds[0], bounds[1], message.get("result") or {})
        except BeowulfError as err:
            event.invalid = str(err)
        except Exception as err:  # garbage from a host must never kill the reader
            event.invalid = f"{type(err).__name__}: {err}"
        return event


__all__ = ["Event", "HostLink", "Path"]
