"""``fab map --requirements FILE``: the file read and checked, and each requirement judged for a host.

A requirements file is pip's format restricted to what can be resolved to wheels on the
coordinator and shipped (README.md, "fab map"): one requirement a line, PEP 508
(``requests==2.31.0``, ``attrs>=22``, ``foo[extra]``, ``bar; python_version >= "3.8"``), ``#``
comments, blank lines, ``\\`` continuations. Options (``-e``, ``-r``, ``-c``, ``--index-url``,
...), URLs, paths and archive names are refused with the file and line, before anything runs:
the index is pip's own configuration (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf).

pip evaluates environment markers against the Python that runs it (the coordinator's), so the
markers of the file's own lines are evaluated here for each host's Python and platform
(``for_host``), and pip gets only the lines that apply, without their markers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .errors import UsageError
from .shown import shown

# The file is read up to this many bytes; lines past the last one are refused.
MAX_FILE_BYTES = 1 << 20
MAX_LINES = 2_000
# A requirement line (after continuations are joined) at most this long.
MAX_LINE_CHARS = 2_000
# pip's comment rule: '#' at the start of a line or after whitespace.
_COMMENT = re.compile(r"(^|\s+)#.*$")
# Archive and wheel names, paths: pip would take them as files, not as requirements.
_FILE_LIKE = re.compile(r"(\.whl|\.tar\.gz|\.tgz|\.zip|\.tar\.bz2|\.tar)$|^[./~]|/", re.IGNORECASE)
# The host's facts (client/probe.py) -> PEP 508 environment markers.
_SYSTEMS = {"Linux": "linux", "Darwin": "darwin", "FreeBSD": "freebsd", "OpenBSD": "openbsd"}


@dataclass(frozen=True)
class Requirements:
    """A checked requirements file: its path as given, its requirements in canonical form
    (sorted, duplicates dropped) and ``digest``, a hash of them (part of the run's identity)."""

    path: str
    lines: tuple
    digest: str

    def __str__(self) -> str:
        return self.path


def _logical_lines(text: str):
    """(first line number, text) of each line, ``\\`` continuations joined, comments removed."""
    pending, first = "", None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw
        if first is None:
            first = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield first, _COMMENT.sub("", pending + line).strip()
        pending, first = "", None
    if first is not None:
        yield first, _COMMENT.sub("", pending).strip()


def parse(path: str, flag: str = "--requirements") -> Requirements:
    """Read and check ``FILE``; UsageError naming the file and line for anything pip-only."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{flag} {shown(path)}: {exc.strerror or exc}") from None
    where = f"{flag} {shown(path)}"
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"{where}: over {MAX_FILE_BYTES >> 20} MB")
    if b"\0" in data:
        raise UsageError(f"{where}: holds a NUL byte (not a text file)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{where} line {line}: not UTF-8") from None
    found = {}
    for number, line in _logical_lines(text):
        if not line:
            continue
        if number > MAX_LINES:
            raise UsageError(f"{where} line {number}: more than {MAX_LINES} lines")
        requirement = _check_line(line, f"{where} line {number}")
        found[str(requirement)] = requirement
    if not found:
        raise UsageError(f"{where}: no requirements in it")
    lines = tuple(sorted(found))
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]
    return Requirements(path, lines, digest)


def _check_line(line: str, where: str) -> Requirement:
    """The requirement on one line, in canonical form; UsageError for what only pip can do."""
    brief = shown(line)[:60]
    if len(line) > MAX_LINE_CHARS:
        raise UsageError(f"{where}: a line over {MAX_LINE_CHARS} characters")
    if line.startswith("-"):
        option = shown(line.split()[0].split("=")[0])[:30]
        raise UsageError(f"{where}: {option} is a pip option, not a requirement: fab map takes "
                         "requirements only (set the index with PIP_INDEX_URL, PIP_FIND_LINKS or pip.conf)")
    if "://" in line or "@" in line.split(";")[0]:
        raise UsageError(f"{where}: {brief!r} is a URL or a direct reference: give a name and a version "
                         "(name==1.2) from your index")
    if _FILE_LIKE.search(line.split(";")[0].strip()):
        raise UsageError(f"{where}: {brief!r} is a file or a path: give a name and a version "
                         "(name==1.2); put local wheels in a folder named by PIP_FIND_LINKS")
    try:
        requirement = Requirement(line)
    except InvalidRequirement as exc:
        reason = " ".join(str(exc).splitlines()[0].split())[:120]
        raise UsageError(f"{where}: not a requirement ({brief!r}: {reason})") from None
    if requirement.url:
        raise UsageError(f"{where}: {brief!r} is a direct reference: give a name and a version (name==1.2)")
    requirement.name = canonicalize_name(requirement.name)
    requirement.extras = {canonicalize_name(extra) for extra in requirement.extras}
    if requirement.marker is not None:
        try:
            requirement.marker.evaluate(marker_environment({"python": "3.12.0", "system": "Linux",
                                                            "arch": "x86_64"}))
        except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName) as exc:
            raise UsageError(f"{where}: its marker cannot be evaluated ({shown(str(exc))[:100]})") from None
    return requirement


def marker_environment(facts: dict) -> dict:
    """PEP 508 marker variables of the host the probe's ``facts`` describe."""
    python = str(facts.get("python") or "")
    parts = python.split(".")
    implementation = str(facts.get("implementation") or "CPython")
    system = str(facts.get("system") or "")
    return {
        "implementation_name": implementation.lower(),
        "implementation_version": python,
        "os_name": "nt" if system == "Windows" else "posix",
        "platform_machine": str(facts.get("arch") or ""),
        "platform_python_implementation": implementation,
        "platform_release": "",
        "platform_system": system,
        "platform_version": "",
        "python_full_version": python,
        "python_version": ".".join(parts[:2]),
        "sys_platform": _SYSTEMS.get(system, system.lower()),
    }


def for_host(requirements: Requirements, facts: dict) -> tuple:
    """The lines that apply to the host (their markers evaluated for it), without markers:
    what pip is asked for on that host's behalf."""
    environment = marker_environment(facts)
    kept = []
    for line in requirements.lines:
        requirement = Requirement(line)
        if requirement.marker is not None:
            try:
                applies = requirement.marker.evaluate(environment)
            except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
                applies = True  # let pip say what it makes of it
            if not applies:
                continue
            requirement.marker = None
        kept.append(str(requirement))
    return tuple(kept)
