"""``fab map --export FILE`` and ``--joblog FILE``: per-item records written to files.

``parse_item_result`` turns one item result sent by a host (client/mapper.py) into an
``ItemRecord`` and its returned files, checking every field: a host is not trusted.

Both files are written to a temporary name beside the target and renamed over it, so a
reader never sees half a file.

- export: each item's stdout in input order (like ``parallel -k``), or, when FILE ends in
  ``.jsonl``, one JSON object a line: seq, item, status, stdout, stderr (text; bytes that
  are not UTF-8 go in ``*_base64`` fields instead, with the text field null).
- joblog: GNU parallel's --joblog format: a header line, then one tab-separated line per
  attempt with Seq, Host, Starttime (epoch seconds, 3 decimals), JobRuntime (seconds,
  ``%10.3f``), Send, Receive (bytes), Exitval, Signal, Command; as parallel does, the
  newlines of a command are written as NUL bytes, one attempt per line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

from client import mapper

JOBLOG_COLUMNS = ("Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
                  "Command")


@dataclass
class ItemRecord:
    """One attempt at one item, as the exports need it.

    ``status`` is the item's outcome ("ok", "failed", "timeout", "crashed", ...);
    ``stdout`` and ``stderr`` are bytes (stderr: its tail); ``send`` the bytes of input
    files sent, ``receive`` the bytes of stdout and returned files received.
    """

    seq: int
    item: str | int
    status: str
    host: str = ""
    start: float = 0.0
    runtime: float = 0.0
    exitval: Optional[int] = None
    signal: Optional[int] = None
    command: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    send: int = 0
    receive: int = 0
    attempt: int = 1
    timed_out: bool = False
    truncated: bool = False
    error: str = ""
    value: object = None
    slot: Optional[int] = None  # the worker slot, {%} (None: not known)


def _bytes(text) -> bytes:
    """Text as bytes; undecodable input bytes (surrogateescape) come back as they were."""
    return str(text).encode("utf-8", "surrogateescape")


@dataclass
class Chunk:
    """The items of a stored chunk (cluster/mapstore.py map_chunks: a block of a function over
    --range whose items all succeeded at their first try), kept as its columns: the exports
    write them a chunk at a time, with no record per item."""

    seq: int  # the first item's
    count: int
    host: str
    slot: Optional[int]
    t0: float
    start_us: list
    us: list
    values: list
    start: int  # the --range: item i's value is start + (i - 1) * step
    step: int

    @property
    def attempt(self) -> int:
        return 1

    @property
    def last(self) -> int:
        return self.seq + self.count - 1

    def items(self) -> range:
        first = self.start + (self.seq - 1) * self.step
        return range(first, first + self.count * self.step, self.step) if self.step else [first] * self.count

    def texts(self) -> list:
        """Each value's JSON text (the item's output line, without its newline)."""
        if set(map(type, self.values)) <= _INT:
            return list(map(str, self.values))
        return [json.dumps(value, ensure_ascii=False) for value in self.values]

    def records(self):
        """The chunk's items as ItemRecords (for a reader that wants one per item)."""
        for index, (item, start, took, text) in enumerate(zip(self.items(), self.start_us, self.us, self.texts())):
            yield ItemRecord(self.seq + index, item, "ok", host=self.host, start=self.t0 + start / 1e6,
                             runtime=took / 1e6, exitval=0, stdout=_bytes(text) + b"\n", attempt=1,
                             value=text, receive=len(text), slot=self.slot)


_INT = {int}


def _text_or_base64(data: bytes) -> tuple:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(data).decode("ascii")


def _write_atomically(path: str, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename; bytes written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return written


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Every --export *.jsonl record has these keys, in this order.
EXPORT_KEYS = ("seq", "item", "item_base64", "status", "exit", "signal", "value", "error", "host", "attempt",
               "truncated", "stdout", "stdout_base64", "stderr", "stderr_base64")


def _in_order(records: Iterable) -> Iterable:
    last = 0
    for record in records:
        if record.seq <= last:
            raise ValueError(f"export records out of input order: {record.seq} after {last}")
        last = record.last if isinstance(record, Chunk) else record.seq
        yield record


def _chunk_export(chunk: Chunk, jsonl: bool) -> bytes:
    """A chunk's part of the export, the same bytes export_lines writes for its items one by one."""
    texts = chunk.texts()
    if not jsonl:
        return _bytes("\n".join(texts)) + b"\n"
    lines = []
    host = json.dumps(chunk.host, ensure_ascii=False)
    for seq, item, text in zip(range(chunk.seq, chunk.seq + chunk.count), chunk.items(), texts):
        out = json.dumps(text + "\n", ensure_ascii=False) if not text.isdigit() else '"' + text + '\\n"'
        lines.append(f'{{"seq": {seq}, "item": {item}, "item_base64": null, "status": "ok", "exit": 0, '
                     f'"signal": null, "value": {text}, "error": null, "host": {host}, "attempt": 1, '
                     f'"truncated": false, "stdout": {out}, "stdout_base64": null, "stderr": "", '
                     '"stderr_base64": null}\n')
    return "".join(lines).encode("utf-8", "surrogatepass")


def export_lines(records: Iterable, jsonl: bool) -> Iterable[bytes]:
    """The export's content, chunk by chunk (records: one per item, or a Chunk of items, in input order)."""
    for record in _in_order(records):
        if isinstance(record, Chunk):
            yield _chunk_export(record, jsonl)
            continue
        if not jsonl:
            yield record.stdout
            continue
        item, item_b64 = (record.item, None) if isinstance(record.item, int) else _text_or_base64(_bytes(record.item))
        # The same keys in every record (README.md, "fab map": EXPORT_KEYS), null when not applicable.
        value = json.loads(record.value) if isinstance(record.value, str) else record.value
        line = {"seq": record.seq, "item": item, "item_base64": item_b64, "status": record.status,
                "exit": record.exitval, "signal": record.signal, "value": value, "error": record.error or None,
                "host": record.host, "attempt": record.attempt, "truncated": record.truncated}
        for name in ("stdout", "stderr"):
            text, encoded = _text_or_base64(getattr(record, name))
            line[name], line[name + "_base64"] = text, encoded
        yield json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"


def write_export(path: str, records: Iterable[ItemRecord]) -> int:
    """``--export FILE``: stdout in input order, or JSON lines for ``*.jsonl``; bytes written."""
    return _write_atomically(path, export_lines(records, path.endswith(".jsonl")))


def joblog_line(record: ItemRecord) -> bytes:
    """One joblog line, as GNU parallel writes it (newlines of the command as NUL)."""
    fields = [str(record.seq), record.host.replace("\t", " ").replace("\n", " ") or ":",
              f"{record.start:.3f}", f"{record.runtime:10.3f}", str(record.send), str(record.receive),
              str(_exitval(record)), str(record.signal or 0)]
    command = _bytes(record.command).replace(b"\n", b"\0")
    return "\t".join(fields).encode("utf-8") + b"\t" + command + b"\n"


def _exitval(record: ItemRecord) -> int:
    """The exit code (a function: 0 returned, 1 raised); 0 for a process killed by a signal (as
    parallel: ``$? >> 8``); -1 for an item killed on --timeout (as parallel's --timeout) or whose
    worker died (crashed), and for none (README.md, "fab map")."""
    if record.status in ("timeout", "crashed"):
        return -1
    if record.exitval is not None:
        return record.exitval
    return 0 if record.signal else -1


def _chunk_joblog(chunk: Chunk, command_of) -> bytes:
    """A chunk's joblog lines, the same bytes joblog_line writes for its items one by one."""
    host = chunk.host.replace("\t", " ").replace("\n", " ") or ":"
    t0, lines = chunk.t0, []
    for seq, item, start, took, text in zip(range(chunk.seq, chunk.seq + chunk.count), chunk.items(),
                                            chunk.start_us, chunk.us, chunk.texts()):
        command = command_of(seq, item, chunk.slot) if command_of else ""
        if "\n" in command:
            command = command.replace("\n", "\0")
        lines.append(f"{seq}\t{host}\t{t0 + start / 1e6:.3f}\t{took / 1e6:10.3f}\t0\t{len(text)}\t0\t0\t{command}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def joblog_lines(records: Iterable, command_of=None) -> Iterable[bytes]:
    """The joblog's content: the header, then one line per attempt in the order given (a Chunk:
    each of its items). ``command_of(seq, item, slot)``, when given, is each line's Command."""
    yield ("\t".join(JOBLOG_COLUMNS) + "\n").encode("ascii")
    for record in records:
        if isinstance(record, Chunk):
            yield _chunk_joblog(record, command_of)
            continue
        if command_of is not None:
            record.command = command_of(record.seq, record.item, record.slot)
        yield joblog_line(record)


def write_joblog(path: str, records: Iterable, command_of=None) -> int:
    """``--joblog FILE``: GNU parallel's columns, one line per attempt; bytes written."""
    return _write_atomically(path, joblog_lines(records, command_of))


# ------------------------------------------------------------------------ a host's item result

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Longest error text or returned-file path accepted from a host.
MAX_ERROR_CHARS = 2 * mapper.MAX_TRACEBACK_CHARS
MAX_PATH_CHARS = 4096


class ResultError(ValueError):
    """A host sent an item result that breaks the protocol (the message is safe to show)."""


@dataclass
class ReturnedFile:
    """A --return file as a host sent it: checked content, or the host's reason it has none."""

    path: str
    sha256: str = ""
    data: bytes = b""
    error: str = ""


def _field(raw: dict, name: str, kinds, optional: bool = False):
    value = raw.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ResultError(f"field {name!r} is {type(value).__name__}")
    return value


def _number(raw: dict, name: str, low: float, high: float) -> float:
    value = _field(raw, name, (int, float))
    if not math.isfinite(value) or not low <= value <= high:
        raise ResultError(f"field {name!r} out of range")
    return float(value)


def _output(raw: dict, name: str, cap: int) -> bytes:
    text = _field(raw, name, (str,))
    if _field(raw, name + "_b64", (bool,), optional=True):
        if len(text) > (cap + 2) // 3 * 4:
            raise ResultError(f"field {name!r} over {cap} bytes")
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise ResultError(f"field {name!r} is not base64") from None
    if len(text) > cap:
        raise ResultError(f"field {name!r} over {cap} bytes")
    data = text.encode("utf-8", "replace")
    if len(data) > cap:
        raise ResultError(f"field {name!r} over {cap} bytes")
    return data


def _returned(entry, return_cap: int) -> ReturnedFile:
    if not isinstance(entry, dict):
        raise ResultError("a returned file is not an object")
    path = _field(entry, "path", (str,))
    if len(path) > MAX_PATH_CHARS:
        raise ResultError("a returned file's path is too long")
    if entry.get("error") is not None:
        error = _field(entry, "error", (str,))
        return ReturnedFile(path, error=error[:mapper.MAX_ERROR_CHARS])
    digest = _field(entry, "sha256", (str,))
    if not _SHA256.match(digest):
        raise ResultError("a returned file's sha256 is not a hex digest")
    data = _output({"data": _field(entry, "data", (str,)), "data_b64": True}, "data", return_cap)
    if hashlib.sha256(data).hexdigest() != digest or entry.get("size") != len(data):
        raise ResultError(f"returned file {path!r}: content does not match its sha256 or size")
    return ReturnedFile(path, digest, data)


def parse_item_result(raw, expected: dict, host: str, mode: str, returns: int = 0,
                      stdout_cap: int = mapper.DEFAULT_STDOUT_CAP, stderr_tail: int = mapper.DEFAULT_STDERR_TAIL,
                      return_cap: int = mapper.DEFAULT_RETURN_CAP, attempt: int = 1) -> tuple:
    """``(ItemRecord, [ReturnedFile])`` from one entry of a map task's ``items``, or ResultError.

    ``expected`` maps the seqs sent in the task to their item values; the status is
    derived from the exit code, signal, timeout and error, never from the host's ``ok``.
    ``command`` and ``send`` of the record are the caller's to fill.
    """
    if not isinstance(raw, dict):
        raise ResultError("an item result is not an object")
    seq = _field(raw, "seq", (int,))
    if seq not in expected:
        raise ResultError(f"item {seq} was not sent")
    start = _number(raw, "start", 0, 1e11)
    seconds = _number(raw, "seconds", 0, 1e8)
    timed_out = bool(_field(raw, "timed_out", (bool,), optional=True))
    error = _field(raw, "error", (str,), optional=True) or ""
    if len(error) > MAX_ERROR_CHARS:
        error = error[-MAX_ERROR_CHARS:]
    record = ItemRecord(seq, expected[seq], "failed", host=host, start=start, runtime=seconds,
                        attempt=attempt, timed_out=timed_out, error=error)
    files = []
    if mode == "function":
        record.value = raw.get("value")
        ok = not error and not timed_out
    else:
        exitval = _field(raw, "exit", (int,), optional=True)
        signal = _field(raw, "signal", (int,), optional=True)
        if exitval is not None and not 0 <= exitval <= 255 or signal is not None and not 1 <= signal <= 128:
            raise ResultError("exit code or signal out of range")
        record.exitval, record.signal = exitval, signal
        record.stdout = _output(raw, "stdout", stdout_cap)
        record.stderr = _output(raw, "stderr", min(stderr_tail, mapper.MAX_STDERR_TAIL))
        record.truncated = bool(_field(raw, "truncated", (bool,), optional=True))
        entries = _field(raw, "returned", (list,), optional=True) or []
        if len(entries) > returns:
            raise ResultError(f"{len(entries)} returned files for {returns} --return patterns")
        files = [_returned(entry, return_cap) for entry in entries]
        record.receive = len(record.stdout) + sum(len(f.data) for f in files)
        ok = (exitval == 0 and signal is None and not timed_out and not error
              and len(files) == returns and not any(f.error for f in files))
    record.status = "ok" if ok else "timeout" if timed_out else "failed"
    return record, files
