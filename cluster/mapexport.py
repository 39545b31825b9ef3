"""``fab map --export FILE`` and ``--joblog FILE``: per-item records written to files.

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
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

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


def _bytes(text) -> bytes:
    """Text as bytes; undecodable input bytes (surrogateescape) come back as they were."""
    return str(text).encode("utf-8", "surrogateescape")


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


def _in_order(records: Iterable[ItemRecord]) -> Iterable[ItemRecord]:
    last = 0
    for record in records:
        if record.seq <= last:
            raise ValueError(f"export records out of input order: {record.seq} after {last}")
        last = record.seq
        yield record


def export_lines(records: Iterable[ItemRecord], jsonl: bool) -> Iterable[bytes]:
    """The export's content, chunk by chunk (records: one per item, in input order)."""
    for record in _in_order(records):
        if not jsonl:
            yield record.stdout
            continue
        item, item_b64 = (record.item, None) if isinstance(record.item, int) else _text_or_base64(_bytes(record.item))
        line = {"seq": record.seq, "item": item, "status": record.status}
        if item_b64 is not None:
            line["item_base64"] = item_b64
        for name in ("stdout", "stderr"):
            text, encoded = _text_or_base64(getattr(record, name))
            line[name] = text
            if encoded is not None:
                line[name + "_base64"] = encoded
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
    """The exit code; 0 for a process killed by a signal (as parallel: ``$? >> 8``), -1 for none."""
    if record.exitval is not None:
        return record.exitval
    return 0 if record.signal else -1


def joblog_lines(records: Iterable[ItemRecord]) -> Iterable[bytes]:
    """The joblog's content: the header, then one line per attempt in the order given."""
    yield ("\t".join(JOBLOG_COLUMNS) + "\n").encode("ascii")
    for record in records:
        yield joblog_line(record)


def write_joblog(path: str, records: Iterable[ItemRecord]) -> int:
    """``--joblog FILE``: GNU parallel's columns, one line per attempt; bytes written."""
    return _write_atomically(path, joblog_lines(records))
