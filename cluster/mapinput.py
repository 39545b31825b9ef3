"""The coordinator side of ``fab map``'s inputs: items from --args, --range or --files.

Each input form checks everything up front (``UsageError``, one line naming the flag,
file or line: nothing is run on bad input) and then yields ``Item``s lazily: a range
item is computed from its sequence number, an args file is re-read line by line.

Item keys (resume by content, README.md "fab map"): sha256 over the value's bytes, its
occurrence number among equal values (duplicate lines are two items; appending lines
keeps the old keys) and, for --files, the content's sha256. The run identity hashes the
mode, the command or function spec, the shipped files' hash and the input form, never
item values or hosts.

Non-UTF-8 bytes in an args file (or a file name) are kept: lines are decoded as UTF-8
with ``surrogateescape``, so the command gets the original bytes (mapper.fs) and the
key hashes them. Such a value is a ``str`` holding lone surrogates: JSON (ensure_ascii)
carries it to the host as is, but encode it with ``value_bytes`` before a store or a
terminal sees it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from client import mapper
from cluster.errors import UsageError

# Items of one --range at most (a store row each).
MAX_RANGE_ITEMS = 10**8
# Integers of a range: what sqlite stores as an INTEGER.
MAX_RANGE_INT = 2**63 - 1
# A --files file is sent inside a task (base64): at most this many bytes.
MAX_FILE_BYTES = mapper.MAX_FILE_BYTES
# Longest line of an args file.
MAX_LINE_BYTES = 1 << 20
_INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")


@dataclass(frozen=True)
class Item:
    """One input: ``seq`` is ``{#}`` (1-based input order); ``value`` the item (int for --range).

    ``columns`` holds --colsep's columns (None without it); ``path`` and ``sha256`` the
    local file of a --files item; ``key`` the content key (hex sha256).
    """

    seq: int
    value: str | int
    key: str
    columns: Optional[tuple] = None
    path: Optional[str] = None
    sha256: Optional[str] = None

    def task_item(self, file_data: Optional[str] = None) -> dict:
        """The item as the mapper's task wants it (``file_data``: the file's content, base64)."""
        item = {"seq": self.seq, "value": self.value}
        if self.columns is not None:
            item["columns"] = list(self.columns)
        if self.path is not None:
            item["file"] = {"name": os.path.basename(self.path), "sha256": self.sha256,
                            "data": file_data}
        return item


def value_bytes(value) -> bytes:
    """An item value's bytes (the original bytes of a line that was not UTF-8)."""
    return str(value).encode("utf-8", "surrogateescape")


def item_key(value, occurrence: int, content_sha256: Optional[str] = None) -> str:
    """Hex sha256 over (value bytes, occurrence number, file content hash)."""
    digest = hashlib.sha256()
    data = value_bytes(value)
    digest.update(b"%d:" % len(data) + data)
    digest.update(b"\0%d\0" % occurrence)
    digest.update((content_sha256 or "").encode("ascii"))
    return digest.hexdigest()


class Occurrences:
    """Counts equal values in input order; memory: one 64-bit int per distinct value.

    A collision of two values' 64-bit prefixes only raises an occurrence number: the keys
    stay distinct (they hash the value) and deterministic (the same input, the same keys).
    """

    def __init__(self):
        self.once: set = set()
        self.more: dict = {}

    def next(self, value) -> int:
        prefix = int.from_bytes(hashlib.blake2b(value_bytes(value), digest_size=8).digest(), "big")
        if prefix not in self.once:
            self.once.add(prefix)
            return 1
        count = self.more.get(prefix, 1) + 1
        self.more[prefix] = count
        return count


class MapInput:
    """Base of the input forms: ``len()``, iteration over ``Item``s, ``form`` for the run identity."""

    kind = ""
    colsep: Optional[str] = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError

    @property
    def form(self) -> dict:
        """The input FORM (not its values): what the run identity hashes."""
        return {"kind": self.kind, "colsep": self.colsep}

    def close(self) -> None:
        """Release what the input holds (stdin's spool file)."""


def _compile_colsep(colsep: Optional[str]):
    if colsep is None:
        return None
    if colsep == "":
        raise UsageError("--colsep: empty separator")
    try:
        pattern = re.compile(colsep)
    except re.error as exc:
        raise UsageError(f"--colsep: not a regular expression: {exc}") from None
    if pattern.match(""):
        raise UsageError(f"--colsep {colsep!r} matches the empty string")
    return pattern


class ArgsInput(MapInput):
    """``--args FILE``: one item per line (``-`` = stdin, spooled to a private temporary file)."""

    kind = "args"

    def __init__(self, path: str, colsep: Optional[str] = None, need: Optional[tuple] = None):
        self.colsep = colsep
        self.pattern = _compile_colsep(colsep)
        width, used = need or (1, "")
        self.name = "stdin" if path == "-" else _shown(path)
        self.spool = None
        if path == "-":
            self.spool = tempfile.TemporaryFile(prefix="beowulf-map-args-")
            shutil.copyfileobj(sys.stdin.buffer, self.spool)
            self.spool.flush()
        elif not os.path.isfile(path):
            raise UsageError(f"--args {path}: " + ("no such file" if not os.path.exists(path)
                                                   else "not a regular file"))
        self.path = path
        count = 0
        for count, line in enumerate(self._lines(), 1):  # checks every line now
            got = len(self.pattern.split(line)) if width > 1 else width
            if got < width:
                raise UsageError(f"--args {self.name} line {count}: {got} column{'s' if got != 1 else ''}, "
                                 f"but {used} needs {width}")
        self.count = count
        if not self.count:
            raise UsageError(f"--args {self.name}: no lines")

    def _open(self):
        if self.spool is not None:
            self.spool.seek(0)
            return open(os.dup(self.spool.fileno()), "rb")
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise UsageError(f"--args {self.name}: {exc.strerror or exc}") from None

    def _lines(self) -> Iterator[str]:
        with self._open() as handle:
            try:
                for number, line in enumerate(handle, 1):
                    if line.endswith(b"\n"):
                        line = line[:-1]
                    if len(line) > MAX_LINE_BYTES:
                        raise UsageError(f"--args {self.name} line {number}: over {MAX_LINE_BYTES} bytes")
                    if b"\0" in line:
                        raise UsageError(f"--args {self.name} line {number}: NUL byte")
                    yield line.decode("utf-8", "surrogateescape")
            except OSError as exc:
                raise UsageError(f"--args {self.name}: {exc.strerror or exc}") from None

    def __iter__(self) -> Iterator[Item]:
        seen = Occurrences()
        for seq, value in enumerate(self._lines(), 1):
            columns = tuple(self.pattern.split(value)) if self.pattern else None
            yield Item(seq, value, item_key(value, seen.next(value)), columns)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def parse_range(text: str) -> tuple:
    """``(start, stop, step)`` from ``A:B[:STEP]`` (both ends inclusive), or UsageError."""
    fields = text.split(":") if isinstance(text, str) else []
    if len(fields) not in (2, 3) or not all(_INTEGER.match(field.strip()) for field in fields):
        raise UsageError(f"--range {text!r}: want A:B or A:B:STEP with integers")
    numbers = [int(field) for field in fields]
    if any(abs(number) > MAX_RANGE_INT for number in numbers):
        raise UsageError(f"--range {text!r}: integers beyond 64 bits")
    start, stop = numbers[:2]
    step = numbers[2] if len(numbers) == 3 else 1
    if step == 0:
        raise UsageError(f"--range {text!r}: STEP is 0")
    count = (stop - start) // step + 1
    if count <= 0:
        raise UsageError(f"--range {text!r} is empty" + (" (give a negative STEP to count down)"
                                                          if start > stop and step > 0 else ""))
    if count > MAX_RANGE_ITEMS:
        raise UsageError(f"--range {text!r}: {count} items, over the limit of {MAX_RANGE_ITEMS}")
    return start, stop, step


class RangeInput(MapInput):
    """``--range A:B[:STEP]``: integers, both ends inclusive; items computed from their seq."""

    kind = "range"

    def __init__(self, text: str):
        self.start, self.stop, self.step = parse_range(text)
        self.count = (self.stop - self.start) // self.step + 1

    @property
    def form(self) -> dict:
        """The range itself is the input's form: 1:10 and 1:99 are two runs (an item's key is
        its value, its seq follows from it)."""
        return {"kind": self.kind, "colsep": None, "start": self.start, "stop": self.stop, "step": self.step}

    def item(self, seq: int) -> Item:
        """Item number ``seq`` (1-based)."""
        if not 1 <= seq <= self.count:
            raise IndexError(seq)
        value = self.start + (seq - 1) * self.step
        return Item(seq, value, item_key(str(value), 1))

    def __iter__(self) -> Iterator[Item]:
        return (self.item(seq) for seq in range(1, self.count + 1))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FilesInput(MapInput):
    """``--files GLOB``: the matching local regular files, sorted; each hashed now."""

    kind = "files"

    def __init__(self, pattern: str, colsep: Optional[str] = None):
        if colsep is not None:
            raise UsageError("--colsep goes with --args, not --files")
        if not pattern:
            raise UsageError("--files: empty pattern")
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise UsageError(f"--files {pattern!r} matches nothing")
        self.files = []
        for path in matches:
            if not os.path.isfile(path):
                continue
            try:
                size = os.path.getsize(path)
                if size > MAX_FILE_BYTES:
                    raise UsageError(f"--files {_shown(path)}: {size} bytes, over the limit of "
                                     f"{MAX_FILE_BYTES} per file")
                self.files.append((path, file_sha256(path)))
            except OSError as exc:
                raise UsageError(f"--files {_shown(path)}: {exc.strerror or exc}") from None
        if not self.files:
            raise UsageError(f"--files {pattern!r} matches no regular file")
        self.count = len(self.files)

    def __iter__(self) -> Iterator[Item]:
        seen = Occurrences()
        for seq, (path, digest) in enumerate(self.files, 1):
            yield Item(seq, path, item_key(path, seen.next(path), digest), path=path, sha256=digest)


def _shown(path: str) -> str:
    """A local path for a message: quoted and escaped when it holds control characters or bad bytes."""
    return path if path.isprintable() else ascii(path)


def open_input(args: Optional[str] = None, range_text: Optional[str] = None,
               files: Optional[str] = None, colsep: Optional[str] = None, need: Optional[tuple] = None) -> MapInput:
    """The one input form given (``--args``, ``--range`` or ``--files``), checked; ``need``:
    ``columns_needed`` of the templates, every line must have that many columns (a missing
    column is an error naming the line, where parallel would put nothing)."""
    given = [name for name, value in (("--args", args), ("--range", range_text), ("--files", files))
             if value is not None]
    if len(given) != 1:
        raise UsageError("give one of --args, --range, --files" + (f" (not {' and '.join(given)})"
                                                                    if given else ""))
    width, used = need or (1, "")
    if width > 1 and colsep is None:
        raise UsageError(f"{used}: an item has one column, {{1}}, without --colsep (--args FILE --colsep SEP "
                         "splits each line into {1} {2} ...)")
    if args is not None:
        return ArgsInput(args, colsep, need)
    if colsep is not None:
        raise UsageError("--colsep goes with --args")
    if range_text is not None:
        return RangeInput(range_text)
    return FilesInput(files)


def check_template(template: str, flag: str = "--command") -> list:
    """The parsed template (mapper.parse_template), or UsageError naming ``flag``."""
    try:
        return mapper.parse_template(template)
    except mapper.TemplateError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def columns_needed(templates) -> tuple:
    """``(width, "--command's {3}")``: the most columns an item needs for the parsed templates
    (``(flag, parts)`` pairs; ``{N}`` and ``{-N}`` need N), ``(1, "")`` when none needs more than one."""
    width, used = 1, ""
    for flag, parts in templates:
        for part in parts:
            if isinstance(part, tuple) and part[0] == "column" and abs(part[1]) > width:
                width, used = abs(part[1]), f"{flag}'s {{{part[1]}{part[2]}}}"
    return width, used


def check_function(spec: str, flag: str = "--function") -> tuple:
    """``(module, function)`` from ``MODULE:FUNC``, or UsageError naming ``flag``."""
    try:
        return mapper.check_function_spec(spec)
    except mapper.TaskError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def run_identity(mode: str, spec: str, form: dict, shipped: Optional[str] = None,
                 returns: tuple = ()) -> str:
    """Hex sha256 over the mode, the command template or function spec, the shipped files'
    hash, the --return patterns and the input form; item values and hosts stay out."""
    if mode not in ("command", "function"):
        raise ValueError(f"mode {mode!r}")
    identity = {"mode": mode, "spec": spec, "shipped": shipped or "", "returns": list(returns),
                "form": form}
    data = json.dumps(identity, sort_keys=True, ensure_ascii=True).encode("ascii")
    return hashlib.sha256(data).hexdigest()
