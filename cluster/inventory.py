"""hosts.ini -> [Host]. Every error names the file and the line.

One section a machine; the section name is the host's name in every table.
A ``[DEFAULT]`` section holds keys shared by all hosts. ``;`` and ``#`` start
comments, also after a value. Interpolation is off: ``%`` is just a character.
"""

from __future__ import annotations

import ast
import configparser
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .constants import DEFAULT_NICE, DEFAULT_SOCKS, DEFAULT_TOR_CONTROL, DEFAULT_WORKDIR
from .errors import InventoryError, UsageError

LOCAL = "local"
COMMENT_PREFIXES = (";", "#")
KEYS = ("address", "port", "slots", "python", "workdir", "identity", "nice", "socks", "tor_control",
        "tor_cookie")
# Most worker processes a host may be given (a typo such as slots = 80000 would fork-bomb it).
MAX_SLOTS = 1024
_ADDRESS = re.compile(r"^(?:(?P<user>[^@\s\[\]]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^@\s\[\]:]+))$")


@dataclass(frozen=True)
class Host:
    """One machine of the inventory, with every default already applied."""

    name: str
    address: str  # as written: "local", "user@host", "host", "user@[v6]", an ssh_config alias
    user: Optional[str] = None
    hostname: Optional[str] = None  # what to connect to (or the ssh_config alias)
    port: Optional[int] = None  # None: from ~/.ssh/config or 22
    slots: Optional[int] = None  # None: the cores the host reports
    python: Optional[str] = None  # None: python3 (local: the coordinator's interpreter)
    workdir: Optional[str] = None  # None: ~/beowulf (local: beside the store)
    identity: Optional[str] = None  # absolute path of a private key file
    nice: int = DEFAULT_NICE
    socks: str = DEFAULT_SOCKS
    tor_control: str = DEFAULT_TOR_CONTROL
    tor_cookie: Optional[str] = None  # tor's control cookie file on the host (None: the usual places)

    @property
    def is_local(self) -> bool:
        return self.address == LOCAL

    @property
    def remote_workdir(self) -> str:
        return self.workdir or DEFAULT_WORKDIR

    @property
    def remote_python(self) -> str:
        return self.python or "python3"


class _LineTracker:
    """Finds the line of a section or key, since configparser does not keep them.

    Walks the text exactly as configparser's reader does (lines split on newlines
    only; its comment, continuation and header rules), so the numbers agree with
    the ones configparser puts in its own errors.
    """

    def __init__(self, text: str, parser: configparser.ConfigParser):
        self.sections: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        section: Optional[str] = None
        key: Optional[str] = None
        indent = sys.maxsize
        for number, line in enumerate(io.StringIO(text), start=1):
            value = line[:_comment_start(line)].strip()
            if not value:
                indent = sys.maxsize  # an empty line ends a value (empty_lines_in_values=False)
                continue
            level = parser.NONSPACECRE.search(line).start()
            if section is not None and key and level > indent:
                continue  # the value of ``key`` goes on
            indent = level
            header = parser.SECTCRE.match(value)
            if header:
                section, key = header.group("header"), None
                self.sections.setdefault(section, number)
            elif section is not None:
                option = parser._optcre.match(value)
                if option:
                    key = parser.optionxform(option.group("option").rstrip())
                    self.keys.setdefault((section, key), number)

    def where(self, section: str, key: Optional[str] = None) -> int:
        if key is not None and (section, key) in self.keys:
            return self.keys[(section, key)]
        if key is not None and ("DEFAULT", key) in self.keys:
            return self.keys[("DEFAULT", key)]
        return self.sections.get(section, 1)


def _comment_start(line: str) -> Optional[int]:
    """Where configparser's reader cuts ``line`` for a comment (None: no comment); same algorithm."""
    if line.strip().startswith(COMMENT_PREFIXES):
        return 0
    start = sys.maxsize
    found = {prefix: -1 for prefix in COMMENT_PREFIXES}
    while start == sys.maxsize and found:
        following = {}
        for prefix, index in found.items():
            index = line.find(prefix, index + 1)
            if index == -1:
                continue
            following[prefix] = index
            if index == 0 or (index > 0 and line[index - 1].isspace()):
                start = min(start, index)
        found = following
    return None if start == sys.maxsize else start


def _shown(text: str) -> str:
    """``text`` for a one-line message: characters that are not printable (newlines, controls) escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _parser() -> configparser.ConfigParser:
    return configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=COMMENT_PREFIXES,
        comment_prefixes=COMMENT_PREFIXES,
        strict=True,
        empty_lines_in_values=False,
    )


def _positive_int(value: str, what: str, fail) -> int:
    try:
        number = int(value.replace("_", ""), 10)
    except ValueError:
        fail(f"{what} must be a positive integer, not {value!r}")
    if number < 1:
        fail(f"{what} must be a positive integer, not {value!r}")
    return number


def parse_address(address: str) -> tuple[Optional[str], str]:
    """Split ``user@host`` / ``user@[v6]`` / ``host`` into (user or None, host); ValueError if malformed."""
    match = _ADDRESS.match(address)
    if not match:
        raise ValueError(address)
    return match.group("user"), match.group("v6") or match.group("host")


def load_inventory(path: str | os.PathLike) -> list[Host]:
    """Read and check an inventory file; raise InventoryError naming file and line."""
    path = Path(path)
    try:
        text = decode_text(path.read_bytes())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such inventory file") from None
    except UnicodeDecodeError as err:
        raise InventoryError(f"{path}:{line_of(err)}: cannot read inventory: not UTF-8 text "
                             f"(byte {err.object[err.start]:#04x})") from None
    except OSError as err:
        raise InventoryError(f"{path}: cannot read inventory: {getattr(err, 'strerror', None) or err}") from None
    return parse_inventory(text, path)


def decode_text(data: bytes) -> str:
    """UTF-8 text with universal newlines, as ``read_text`` gives it; a BOM (Windows editors) is dropped."""
    return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


def line_of(err: UnicodeDecodeError) -> int:
    """The line (universal newlines) holding the byte that did not decode."""
    before = err.object[: err.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return before.count(b"\n") + 1


def parse_inventory(text: str, path: Path) -> list[Host]:
    """Parse inventory text; ``path`` is used in messages and to resolve ``identity``."""
    parser = _parser()
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as err:
        raise InventoryError(f"{path}:{err.lineno}: duplicate host [{_shown(err.section)}]") from None
    except configparser.DuplicateOptionError as err:
        raise InventoryError(
            f"{path}:{err.lineno}: key {err.option!r} given twice in [{_shown(err.section)}]") from None
    except configparser.MissingSectionHeaderError as err:
        raise InventoryError(
            f"{path}:{err.lineno}: expected a [host name] section before {err.line.strip()!r}"
        ) from None
    except configparser.ParsingError as err:
        lineno, line = err.errors[0]
        try:
            line = ast.literal_eval(line)  # configparser keeps the line as its repr
        except (ValueError, SyntaxError):
            pass
        raise InventoryError(f"{path}:{lineno}: cannot parse {str(line).strip()!r} (expected key = value)") from None
    lines = _LineTracker(text, parser)
    for key in parser.defaults():
        if key not in KEYS:
            raise InventoryError(
                f"{path}:{lines.where('DEFAULT', key)}: unknown key {key!r} in [DEFAULT] (known: {', '.join(KEYS)})"
            )
    hosts = [_host(parser, name, path, lines) for name in parser.sections()]
    if not hosts:
        raise InventoryError(f"{path}: no hosts (add a section such as [this computer] with address = local)")
    return hosts


def _host(parser: configparser.ConfigParser, name: str, path: Path, lines: _LineTracker) -> Host:
    section = parser[name]

    def fail(message: str, key: Optional[str] = None):
        raise InventoryError(f"{path}:{lines.where(name, key)}: [{_shown(name)}] {message}")

    if not name.strip():
        fail("host name is empty")
    for key in section:
        if key not in KEYS:
            fail(f"unknown key {key!r} (known: {', '.join(KEYS)})", key)
    address = section.get("address", "").strip()
    if not address:
        fail("has no address (use address = local, or user@host)", "address")
    user = hostname = None
    if address != LOCAL:
        try:
            user, hostname = parse_address(address)
        except ValueError:
            fail(f"bad address {address!r} (expected user@host, host, user@[v6addr] or local)", "address")
    values: dict = {"name": name, "address": address, "user": user, "hostname": hostname}
    if "port" in section:
        port = _positive_int(section["port"], "port", lambda m: fail(m, "port"))
        if port > 65535:
            fail(f"port must be 1..65535, not {section['port']!r}", "port")
        values["port"] = port
    if "slots" in section:
        slots = _positive_int(section["slots"], "slots", lambda m: fail(m, "slots"))
        if slots > MAX_SLOTS:
            fail(f"slots must be at most {MAX_SLOTS}, not {section['slots']!r}", "slots")
        values["slots"] = slots
    if "nice" in section:
        try:
            nice = int(section["nice"])
        except ValueError:
            nice = None
        if nice is None or not 0 <= nice <= 19:
            fail(f"nice must be an integer 0..19, not {section['nice']!r}", "nice")
        values["nice"] = nice
    for key in ("python", "workdir", "socks", "tor_control"):
        if key in section and section[key].strip():
            values[key] = section[key].strip()
    if "tor_cookie" in section and section["tor_cookie"].strip():
        cookie = section["tor_cookie"].strip()
        if not cookie.startswith(("/", "~")):
            fail(f"tor_cookie must be an absolute path on the host, not {_shown(cookie)}", "tor_cookie")
        values["tor_cookie"] = cookie
    if "identity" in section and section["identity"].strip():
        identity = Path(os.path.expanduser(section["identity"].strip()))
        if not identity.is_absolute():
            identity = path.resolve().parent / identity
        try:
            exists = identity.is_file()
        except OSError:  # a name too long for the file system, a loop of links
            exists = False
        if not exists:
            fail(f"identity file {_shown(str(identity))} does not exist", "identity")
        values["identity"] = str(identity)
    if address == LOCAL and "port" in values:
        fail("a local host has no port", "port")
    return Host(**values)


def select_hosts(hosts: list[Host], names: Optional[str], path: str | os.PathLike) -> list[Host]:
    """The subset named by ``--hosts a,b`` (all when names is empty), in inventory order."""
    if not names:
        return list(hosts)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    if not wanted:
        raise UsageError(f"--hosts: no host names in {names!r} (expected NAME,NAME from {path})")
    known = {host.name for host in hosts}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UsageError(f"--hosts: {', '.join(unknown)} not in {path} (known: {', '.join(sorted(known))})")
    return [host for host in hosts if host.name in wanted]
