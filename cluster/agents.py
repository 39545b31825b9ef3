"""One agent per host: start it, read its hello, send tasks, turn its lines into events.

Each HostLink owns one transport (one SSH connection, or local processes) and
one reader thread. The reader validates results right there (decoding a block
of primes is real work, and hosts then validate in parallel) and puts events on
the coordinator's queue. A link that is reconnected gets a new generation, so
events from the old connection are recognised and dropped.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import queue
import re
import shlex
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import BeowulfError, ConnectError
from .inventory import MAX_SLOTS, Host
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
# A line is read in pieces of at most this many bytes: paramiko's readline copies the whole
# line so far for every packet, which for a 64 MB line is minutes of CPU (and the GIL).
READ_PIECE = 256 * 1024
# Lines that are not protocol tolerated on one connection (a shell startup file's chatter before
# the hello); one more is a protocol error: the link is dropped (and retried with back-off).
MAX_JUNK_LINES = 10
# Largest hello accepted (its facts are stored in the hosts table).
MAX_HELLO_BYTES = 64 * 1024
# Longest error text of a failed result kept (one line).
MAX_ERROR_CHARS = 500
# Task ids whose result came (or that were cancelled) remembered per link, so that a late or
# repeated answer is ignored quietly while a result for a task never sent is a protocol error.
REMEMBERED_IDS = 4096
# A JSON escape of a UTF-16 surrogate: only then can a decoded line hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Results checked at once across all hosts: checking a full primes block builds ~60 MB of arrays,
# so hosts finishing together must not multiply that (coordinator RSS stays flat).
_checks = threading.BoundedSemaphore(1)
# Bytes of agents' lines the coordinator holds at once, over all hosts: lines being read, checked,
# and results waiting for the loop (the store's writer has its own bound, MAX_PENDING_BYTES).
# A reader waits before reading more while they are spent, so a host's output waits in its SSH
# window (back-pressure), not in the coordinator's memory.
RESULT_BUDGET_BYTES = 8 * 1024 * 1024
# A failed result's error kind (Job.failure decides on it): a short identifier, else "error".
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


class ByteBudget:
    """Bytes in flight from all hosts' readers, bounded (RESULT_BUDGET_BYTES).

    A reader calls ``wait(holding)`` before reading a piece and ``take(n)`` for what it read.
    It waits while the budget is spent, except that a reader in the middle of a line goes on
    when no finished line is waiting to be released: finished lines are released by the
    coordinator without any reader's help, so waiting for them cannot deadlock, and lines
    still being read all get finished. ``settle(n)`` marks a reader's bytes as a finished
    line; ``release(n)`` gives them back (the coordinator handled the result).
    """

    def __init__(self, limit: Optional[int] = None):
        self.limit = RESULT_BUDGET_BYTES if limit is None else limit
        self.used = 0  # every byte taken and not released
        self.settled = 0  # of which: finished lines, released without a reader's help
        self._cond = threading.Condition()

    def wait(self, holding: int, stop: Callable[[], bool], waiting: Callable[[bool], None]) -> None:
        """Return once a reader holding ``holding`` bytes of an unfinished line may read more
        (or ``stop()`` is true); ``waiting(True/False)`` is told when it starts and stops waiting."""
        with self._cond:
            if not self._must_wait(holding):
                return
            waiting(True)
            try:
                while self._must_wait(holding) and not stop():
                    self._cond.wait(0.5)
            finally:
                waiting(False)

    def _must_wait(self, holding: int) -> bool:
        return self.used >= self.limit and (holding == 0 or self.settled > 0)

    def take(self, size: int) -> None:
        with self._cond:
            self.used += size

    def settle(self, size: int) -> None:
        with self._cond:
            self.settled += size

    def release(self, size: int, settled: bool = True) -> None:
        with self._cond:
            self.used -= size
            if settled:
                self.settled -= size
            self._cond.notify_all()


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
    claim: Optional[tuple] = None  # (ByteBudget, bytes) this result holds until release()

    def release(self) -> None:
        """Give back this result's share of the readers' byte budget (once; the coordinator
        calls it when it is done with the event: the payload, if any, went to the store's writer)."""
        claim, self.claim = self.claim, None
        if claim is not None:
            claim[0].release(claim[1])


class HostLink:
    """The coordinator's handle on one host's agent."""

    def __init__(self, host: Host, config, accept_new: bool, events: queue.Queue,
                 check: Callable[[int, int, dict], Any], bundle: str, beat_seconds: float = 2.0,
                 preload: str = "", prepare: Optional[Callable[[Transport], None]] = None,
                 slot_factor: int = 1, budget: Optional[ByteBudget] = None, encoded_fields: tuple = ()):
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
        # Result fields that hold the encoded payload (Job.encoded_fields): the check decodes
        # them into the payload, so they are dropped once checked (not kept twice).
        self.encoded_fields = tuple(encoded_fields)
        self.budget = budget
        if budget is not None:
            _limit_heap_retention()
        # Its reader is not reading (it handles a line, waits for its turn to check one, or for the
        # byte budget): the agent's lines wait unread, and that silence is the coordinator's.
        self.held_back = False
        self.generation = 0
        self.transport: Optional[Transport] = None
        self.stream: Optional[Stream] = None
        self.hello: dict = {}
        self.slots = host.slots or 1
        self.last_heard = time.monotonic()
        self.retired = False
        self._sent: dict[int, tuple[int, int]] = {}
        self._finished: OrderedDict[int, None] = OrderedDict()  # answered or cancelled, newest last
        self.protocol_error = ""  # why the last connection's agent was cut off, if it was
        self.ended: tuple[int, str] = (0, "")  # (generation, reason) of the last reader that stopped
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
            self._finished.clear()
        self.protocol_error = ""
        self.held_back = False
        generation = self.generation
        transport = self.transport = self._open_transport()
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
            detail = self.protocol_error or (tail[-1] if tail else "no output")
            hint = "" if self.host.is_local else "; run fab setup"
            raise ConnectError(f"{self.name}: the agent did not start ({detail}){hint}")
        if hello.get("bundle") != self.bundle and not self.host.is_local:
            self.close()
            raise ConnectError(f"{self.name}: client bundle is stale ({hello.get('bundle')} != {self.bundle}); "
                               "run fab setup")
        problem = _hello_problem(hello)
        if problem:
            self.close()
            raise ConnectError(f"{self.name}: the agent's hello is not valid ({problem}); run fab setup")
        self.hello = hello
        self.slots = int(hello.get("slots") or self.host.slots or hello.get("cores") or 1)
        self.last_heard = time.monotonic()
        self._check_retired()
        return hello

    def _open_transport(self) -> Transport:
        """The connection the agent is spawned on (cluster/engines/dask.py: a Dask worker)."""
        return connect(self.host, self.config, accept_new=self.accept_new)

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
        """Seconds since the agent last sent anything: a whole line, or part of a long one.

        While the reader is held back (handling a line, waiting for its turn to check a result,
        or for the byte budget) the agent's lines wait unread in the SSH window: that silence
        is the coordinator's, not the host's, and counts as none."""
        if self.held_back:
            return 0.0
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
            self._remember(task_id)
        try:
            self.send({"type": "cancel", "id": task_id})
        except (ConnectionError, OSError):
            pass

    # ------------------------------------------------------------ reader

    def _read(self, stream: Stream, generation: int, hello_box: queue.Queue) -> None:
        said_hello = False
        reason = "connection closed"
        junk = 0
        try:
            while True:
                line = self._read_line(stream)
                if not line:
                    break
                self.held_back = True  # until it reads again
                # The line's bytes stay taken from the budget until it is handled: given back
                # below, or, for a result with a payload, by the coordinator (Event.release).
                claim = None
                if self.budget is not None and line is not _TOO_LONG:
                    claim = (self.budget, len(line))
                    self.budget.settle(len(line))
                try:
                    if line is _TOO_LONG or not line.endswith(b"\n"):
                        reason = self._cut_off(stream, f"a line of over {MAX_LINE_BYTES // 2**20} MB "
                                                       "(or cut short)")
                        break
                    message = _parse(line)
                    if message is None:
                        junk += 1
                        if self.stream is stream and junk <= 3:
                            log.warning("%s: not protocol: %r", self.name, line[:120])
                        if junk > MAX_JUNK_LINES:
                            reason = self._cut_off(stream, f"more than {MAX_JUNK_LINES} lines that are not protocol")
                            break
                        continue
                    size, line = len(line), None  # the parsed message holds what is needed
                    self.last_heard = time.monotonic()
                    kind = message.get("type")
                    if kind == "hello" and not said_hello:
                        if size > MAX_HELLO_BYTES:
                            reason = self._cut_off(stream, f"a hello of over {MAX_HELLO_BYTES // 1024} kB")
                            break
                        said_hello = True
                        hello_box.put(message)
                    elif kind == "result":
                        event = self._result_event(message, generation)
                        if event is None:
                            reason = self._cut_off(stream, f"a result for task {_short(message.get('id'))}, "
                                                           "which was never sent to it")
                            break
                        _drop_encoded(message, self.encoded_fields)
                        if event.checked is not None and event.checked[1] is not None:
                            event.claim, claim = claim, None  # until the coordinator is done with it
                        self.events.put(event)
                    elif kind == "beat":
                        self.events.put(Event("beat", self, generation, message))
                finally:
                    if claim is not None:
                        claim[0].release(claim[1])
        except Exception as err:  # the reader must always report the link as lost
            reason = f"reader failed: {err}"
            log.exception("%s: reader failed", self.name)
        if self.stream is stream:
            self.held_back = False  # the host's silence counts again (it is lost anyway)
        if not said_hello:
            hello_box.put(None)
        else:
            # Noted on the link too: the lost event can overtake the "up" of the same start.
            self.ended = (generation, reason)
            self.events.put(Event("lost", self, generation, reason=reason))

    def _cut_off(self, stream: Stream, what: str) -> str:
        """Stop reading an agent that broke the protocol; the reason, for the lost event and the logs."""
        reason = f"protocol error: {what}"
        if self.stream is stream:  # not just the tail of a stream we closed ourselves
            self.protocol_error = reason
            log.warning("%s: %s", self.name, reason)
        return reason

    def _remember(self, task_id: int) -> None:
        """Note an answered or cancelled task (the caller holds the lock)."""
        self._finished[task_id] = None
        while len(self._finished) > REMEMBERED_IDS:
            self._finished.popitem(last=False)

    def _read_line(self, stream: Stream) -> bytes:
        """_read_line(stream), within the byte budget (when there is one)."""
        budget = self.budget
        if budget is None:
            self._resume_reading()
            return _read_line(stream)
        pieces: list[bytes] = []
        size = 0
        try:
            while True:
                budget.wait(size, lambda: self.stream is not stream or self.retired, self._hold)
                self._resume_reading()
                piece = stream.readline(READ_PIECE)
                if not piece:
                    break
                budget.take(len(piece))
                pieces.append(piece)
                size += len(piece)
                if piece.endswith(b"\n"):
                    break
                if size > MAX_LINE_BYTES:
                    return _TOO_LONG
            size = 0  # the caller settles and releases the line's bytes
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        finally:
            if size:
                budget.release(size, settled=False)

    def _hold(self, waiting: bool) -> None:
        if waiting:
            self.held_back = True

    def _resume_reading(self) -> None:
        """The reader goes back to its stream: from now on, silence is the host's again."""
        if self.held_back:
            self.last_heard = max(self.last_heard, time.monotonic())
            self.held_back = False

    def _result_event(self, message: dict, generation: int) -> Optional[Event]:
        """The event for a result line; None for a result of a task never sent on this link."""
        task_id = message.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            return None
        with self._lock:
            bounds = self._sent.pop(task_id, None)
            if bounds is None and task_id not in self._finished:
                return None
            self._remember(task_id)
        event = Event("result", self, generation, message)
        if not message.get("ok"):
            error = message.get("error")
            error = " ".join(error.split())[:MAX_ERROR_CHARS] if isinstance(error, str) else ""
            message["error"] = error or "failed (no error message)"
            kind = message.get("kind")
            message["kind"] = kind if isinstance(kind, str) and _KIND.match(kind) else "error"
            return event
        if bounds is None:
            return event  # a late copy (cancelled) or a repeated answer: the coordinator ignores it
        elapsed = message.get("elapsed", 0.0)
        if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not math.isfinite(elapsed) \
                or elapsed < 0:
            event.invalid = f"elapsed is not a number of seconds: {_short(elapsed)}"
            return event
        if not isinstance(message.get("result") or {}, dict):
            event.invalid = "result is not an object"
            return event
        try:
            with _checks:
                event.checked = self.check(bounds[0], bounds[1], message.get("result") or {})
        except BeowulfError as err:
            event.invalid = str(err)
        except Exception as err:  # garbage from a host must never kill the reader
            event.invalid = f"{type(err).__name__}: {err}"
        return event


_TOO_LONG = b"(a line over MAX_LINE_BYTES)"


_heap_tuned = False


def _limit_heap_retention() -> None:
    """Serve large buffers (result lines, payloads, the check's arrays) from mmap, so freeing
    one gives its memory back. glibc raises its mmap threshold after each large free (up to
    32 MB); from then on such buffers come from the heaps of the many reader threads, which
    keep their pages: ~90 MB of RSS held for nothing with 3 SSH hosts (BENCHMARKS.md,
    coordinator memory). Fixing the threshold turns that off; elsewhere this does nothing."""
    global _heap_tuned
    if _heap_tuned or not sys.platform.startswith("linux"):
        return
    _heap_tuned = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(256 * 1024))  # M_MMAP_THRESHOLD (glibc, musl ignores)
    except (OSError, AttributeError):
        pass


def _drop_encoded(message: dict, fields: tuple) -> None:
    """Forget a result's encoded payload once it was checked (or rejected, or is a late copy):
    what is kept is the decoded payload, not both."""
    result = message.get("result")
    if isinstance(result, dict):
        for key in fields:
            if isinstance(result.get(key), str):
                result[key] = None


def _read_line(stream: Stream) -> bytes:
    """The next line (b"" at the end of the stream, a last one may lack its newline), or
    _TOO_LONG once more than MAX_LINE_BYTES arrived without a newline (what came is dropped)."""
    pieces: list[bytes] = []
    size = 0
    while True:
        piece = stream.readline(READ_PIECE)
        if not piece:
            break
        pieces.append(piece)
        size += len(piece)
        if piece.endswith(b"\n"):
            break
        if size > MAX_LINE_BYTES:
            return _TOO_LONG
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _parse(line: bytes) -> Optional[dict]:
    """A protocol line as a dict; None for anything else (not JSON, not UTF-8, not an object,
    nested too deep). Lone surrogates (JSON escapes that are no text) become U+FFFD, so every
    string can be stored."""
    try:
        message = json.loads(line)
        if _SURROGATE_ESCAPE.search(line):
            message = _text_only(message)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return message if isinstance(message, dict) else None


def _text_only(value):
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text_only(item) for item in value]
    if isinstance(value, dict):
        return {_text_only(key): _text_only(item) for key, item in value.items()}
    return value


def _hello_problem(hello: dict) -> str:
    """What is wrong with a hello's fields (the coordinator relies on them), or ""."""
    if not isinstance(hello.get("bundle"), str):
        return "no bundle hash"
    for key in ("slots", "cores"):
        value = hello.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= MAX_SLOTS):
            return f"{key} is {_short(value)}, not 1..{MAX_SLOTS}"
    if not isinstance(hello.get("engines") or {}, dict):
        return "engines is not an object"
    return ""


def _short(value, limit: int = 40) -> str:
    """repr(value) cut to ``limit`` characters, for messages about junk."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["Event", "HostLink", "Path"]
