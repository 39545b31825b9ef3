"""``fab map``'s shipped files: the --function module or package and the --ship paths.

Everything shipped for a run is one deterministic tar, named by the sha256 of its content
(README.md, "fab map"): a host keeps it unpacked in WORKDIR/ship/HEX, so a second run
with the same files uploads nothing, and the agent imports a --function only from that
folder (client/mapper.py ``load_function``; SECURITY.md, "fab map").

``prepare(transport, ...)`` runs once per host before its agent starts: upload when the
folder is missing, unpack it safely (regular files and folders only, no path out of the
folder), then for a --function import it there once; a host where that fails is left out
with the reason (the others go on).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import shlex
import stat
import tarfile
from dataclasses import dataclass
from typing import Optional

from client import mapper

from .errors import ConnectError, UsageError
from .machine import host_python
from .provision import CLIENT_DIR, host_workdir

log = logging.getLogger(__name__)
# Bytes shipped at most (all files together): the tar is held in memory once.
MAX_SHIP_BYTES = 256 << 20
# Files shipped at most.
MAX_SHIP_FILES = 20_000
# Never shipped: byte code and the folders of tools.
SKIPPED = ("__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache")
# Runs on the host (Python 3.6+): unpack the tar into WORKDIR/ship/HEX, atomically (a
# temporary folder renamed into place), refusing any member that is not a plain file or
# folder, or whose path leaves the folder.
_UNPACK = r"""
import os, shutil, sys, tarfile
ship, digest, tar = sys.argv[1], sys.argv[2], sys.argv[3]
os.umask(0o077)
final = os.path.join(ship, digest)
if os.path.isdir(final):
    os.remove(tar)
    sys.exit(0)
temp = os.path.join(ship, "." + digest + "." + sys.argv[4])
os.makedirs(temp)
try:
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            name = member.name
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                sys.exit("refused tar member %r" % name)
            target = os.path.join(temp, *parts)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = archive.extractfile(member)
            with open(target, "wb") as handle:
                shutil.copyfileobj(source, handle)
            os.chmod(target, 0o700 if member.mode & 0o100 else 0o600)
    try:
        os.rename(temp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
finally:
    shutil.rmtree(temp, True)
    os.remove(tar)
"""
# Runs on the host: import the --function from the shipped folder once, as a worker will.
_IMPORT_CHECK = (
    "import os, sys; sys.dont_write_bytecode = False; sys.path.insert(0, sys.argv[1]); "
    "os.path.isdir(sys.argv[4]) and sys.path.insert(1, sys.argv[4]); import mapper; "
    "mapper.use_requirements(sys.argv[5] if len(sys.argv) > 5 else None); "
    "mapper.load_function(sys.argv[2], sys.argv[3])"
)


@dataclass
class Shipment:
    """What is shipped: the tar, its content hash (``digest``, 32 hex digits), the
    function spec as the host imports it (``module:func``) and what it holds."""

    tar: bytes
    digest: str
    function: Optional[str]
    files: int
    size: int


def _walk(root: str, name: str, flag: str, out: dict) -> None:
    """Add file or folder ``root`` to ``out`` (archive name -> (bytes, executable)) as ``name``."""
    if os.path.isdir(root):
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
            for file in sorted(files):
                if file.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(folder, file)
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                _add(path, f"{name}/{relative}", flag, out)
        return
    _add(root, name, flag, out)


def _add(path: str, name: str, flag: str, out: dict) -> None:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{flag} {_shown(path)}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        return  # sockets, fifos, devices: nothing to ship
    if name in out:
        raise UsageError(f"{flag} {_shown(path)}: a second file named {_shown(name)} in the shipped folder")
    if len(out) >= MAX_SHIP_FILES:
        raise UsageError(f"{flag}: more than {MAX_SHIP_FILES} files to ship")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SHIP_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{flag} {_shown(path)}: {exc.strerror or exc}") from None
    out[name] = (data, bool(info.st_mode & stat.S_IXUSR))
    if sum(len(d) for d, _ in out.values()) > MAX_SHIP_BYTES:
        raise UsageError(f"{flag}: more than {MAX_SHIP_BYTES >> 20} MB to ship")


def function_source(spec: str) -> tuple:
    """``(local path, archive name, host spec)`` of ``--function MODULE:FUNC``.

    MODULE is a ``.py`` file (any folder: shipped under its own name), or a dotted
    name whose first part is a ``.py`` file or a package folder in the current folder.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UsageError(f"--function: want MODULE:FUNC (e.g. mymodule.py:score), not {_shown(str(spec))}")
    module, function = spec.rsplit(":", 1)
    if module.endswith(".py") and (os.sep in module or "/" in module):
        path = module
        name = os.path.basename(module)
        host_spec = f"{name[:-3]}:{function}"
        _check_spec(host_spec, spec)
        if not os.path.isfile(path):
            raise UsageError(f"--function {_shown(path)}: no such file")
        return path, name, host_spec
    host_module, _ = _check_spec(spec, spec)
    top = host_module.split(".")[0]
    if os.path.isdir(top) and os.path.isfile(os.path.join(top, "__init__.py")):
        return top, top, f"{host_module}:{function}"
    if os.path.isfile(top + ".py") and "." not in host_module:
        return top + ".py", top + ".py", f"{host_module}:{function}"
    raise UsageError(f"--function {_shown(spec)}: no {top}.py file or {top}/ package in the current folder")


def check_defined(spec: str, path: str, host_spec: str) -> None:
    """UsageError when the module's source binds no FUNC at its top level (read, not imported:
    importing would run the user's code here, with libraries maybe only the hosts have).
    Anything undecidable passes (a syntax this Python does not know, ``import *``, a module
    ``__getattr__``, ``globals()``/``exec``, a module that is not a .py file): the hosts'
    import check says then."""
    import ast

    module, function = host_spec.rsplit(":", 1)
    source = path
    if os.path.isdir(path):  # a package: pkg.sub -> pkg/sub.py or pkg/sub/__init__.py
        inner = os.path.join(path, *module.split(".")[1:])
        source = next((f for f in (inner + ".py", os.path.join(inner, "__init__.py")) if os.path.isfile(f)), "")
    try:
        with open(source, "rb") as handle:
            tree = ast.parse(handle.read(), source)
    except (OSError, ValueError, SyntaxError, RecursionError, MemoryError):
        return
    bound = set()
    todo = list(tree.body)
    while todo:  # the module's statements, into if/try/with/for blocks, not into def or class bodies
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            todo.extend(node.decorator_list)
            continue
        if isinstance(node, ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and node.id in ("globals", "exec", "setattr", "vars", "locals"):
            bound.add(node.id)  # names made at run time: undecidable here
    bound.update(name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names)
    if function in bound or bound & {"*", "__getattr__", "globals", "exec", "setattr", "vars", "locals"}:
        return
    raise UsageError(f"--function {_shown(spec)}: {_shown(source)} defines no {function} "
                     "(no def, class, assignment or import of that name)")


def _check_spec(spec: str, shown_spec: str) -> tuple:
    try:
        return mapper.check_function_spec(spec)
    except mapper.TaskError:
        raise UsageError(f"--function: want MODULE:FUNC with Python names (e.g. mymodule.py:score), "
                         f"not {_shown(shown_spec)}") from None


def build(function: Optional[str] = None, ship: tuple = ()) -> Optional[Shipment]:
    """The shipment for ``--function`` and ``--ship`` paths; None when there is nothing to ship."""
    files: dict = {}
    host_spec = None
    if function:
        path, name, host_spec = function_source(function)
        check_defined(function, path, host_spec)
        _walk(path, name, "--function", files)
    for path in ship:
        if not path:
            continue
        if not os.path.exists(path):
            raise UsageError(f"--ship {_shown(path)}: no such file or folder")
        name = os.path.basename(os.path.normpath(path))
        if name in ("", ".", ".."):
            raise UsageError(f"--ship {_shown(path)}: give a file or a folder with a name")
        _walk(path, name, "--ship", files)
    if not files:
        return None
    tar = make_tar(files)
    digest = hashlib.sha256(tar).hexdigest()[:32]
    return Shipment(tar, digest, host_spec, len(files), sum(len(d) for d, _ in files.values()))


def make_tar(files: dict) -> bytes:
    """A deterministic tar of ``files`` (name -> (bytes, executable)): fixed owners and times."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, executable) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            info.mode = 0o700 if executable else 0o600
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def host_workdir_path(transport) -> str:
    """The host's workdir as an absolute path (``~`` resolved there), created if missing."""
    host = transport.host
    word = map_workdir_word(host)
    result = transport.run(f"umask 077 && mkdir -p -- {word} && cd -- {word} && pwd -P", timeout=60)
    path = result.stdout.strip().splitlines()[-1] if result.ok and result.stdout.strip() else ""
    if not result.ok or not path.startswith("/"):
        raise ConnectError(f"{host.name}: cannot use its workdir ({result.error_line() if not result.ok else path!r})")
    return path


def map_workdir_word(host) -> str:
    """The workdir map uses on ``host``, as a shell word: BEOWULF_MAP_WORKDIR for this computer."""
    if host.is_local and not host.workdir:
        return shlex.quote(local_workdir())
    return host_workdir(host)


def local_workdir() -> str:
    """This computer's map workdir: $BEOWULF_MAP_WORKDIR (set by fab map: beside the store)."""
    return os.environ.get("BEOWULF_MAP_WORKDIR") or os.path.join(os.getcwd(), ".beowulf", "local")


def client_dir_on(host, workdir: str) -> str:
    """Where the client (mapper.py) lives on ``host``."""
    return str(CLIENT_DIR) if host.is_local else f"{workdir}/client"


def upload(transport, workdir: str, shipment: Shipment) -> int:
    """Unpack the shipment into WORKDIR/ship/HEX unless it is there; bytes uploaded."""
    host = transport.host
    folder = f"{workdir}/{mapper.SHIP_FOLDER}"
    final = f"{folder}/{shipment.digest}"
    have = transport.run(f"test -d {shlex.quote(final)}", timeout=30)
    if have.ok:
        return 0
    mkdir = transport.run(f"umask 077 && mkdir -p -- {shlex.quote(folder)}", timeout=30)
    if not mkdir.ok:
        raise ConnectError(f"{host.name}: cannot create {folder}: {mkdir.error_line()}")
    token = secrets.token_hex(6)
    tar_path = f"{folder}/.{shipment.digest}.{token}.tar"
    transport.put(shipment.tar, tar_path)
    command = " ".join([host_python(host), "-c", shlex.quote(_UNPACK), shlex.quote(folder),
                        shlex.quote(shipment.digest), shlex.quote(tar_path), token])
    result = transport.run(command, timeout=300)
    if not result.ok:
        raise ConnectError(f"{host.name}: cannot unpack the shipped files: {result.error_line()}")
    return len(shipment.tar)


def import_check(transport, workdir: str, shipment: Shipment, reqs: Optional[str] = None) -> None:
    """Import the --function on the host as its workers will (with the --requirements folder
    ``reqs`` on the path); ConnectError with the reason if it fails."""
    host = transport.host
    command = " ".join([
        f"BEOWULF_MAP_WORKDIR={shlex.quote(workdir)}", host_python(host), "-c", shlex.quote(_IMPORT_CHECK),
        shlex.quote(client_dir_on(host, workdir)), shlex.quote(shipment.digest), shlex.quote(shipment.function),
        shlex.quote(f"{workdir}/lib")] + ([shlex.quote(mapper.check_hex(reqs, "reqs"))] if reqs else []))
    result = transport.run(command, timeout=120)
    if not result.ok:
        lines = [line for line in (result.stderr or "").strip().splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else result.error_line()
        if reason.startswith("mapper.TaskError: "):  # our own check's words, not a traceback of the user's
            reason = reason[len("mapper.TaskError: "):]
        raise ConnectError(f"{host.name}: --function {shipment.function} does not import there ({reason[:300]})")


# Runs on the host (Python 3.6+): unpack the wheels of a tar into WORKDIR/reqs/HEX, as pip
# installs them into a site folder (a wheel's NAME.data/purelib and platlib at the top, its
# scripts, headers and data left out), atomically: a temporary folder renamed into place.
# A member with an absolute path, a "..", or a name that is not a wheel is refused.
_INSTALL_WHEELS = r"""
import os, shutil, sys, tarfile, zipfile
reqs, digest, tar = sys.argv[1], sys.argv[2], sys.argv[3]
os.umask(0o077)
final = os.path.join(reqs, digest)
if os.path.isdir(final):
    os.remove(tar)
    sys.exit(0)
temp = os.path.join(reqs, "." + digest + "." + sys.argv[4])
os.makedirs(temp)
try:
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            if not member.isfile() or "/" in member.name or not member.name.endswith(".whl"):
                sys.exit("refused tar member %r" % member.name)
            with zipfile.ZipFile(archive.extractfile(member)) as wheel:
                for info in wheel.infolist():
                    parts = info.filename.split("/")
                    if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                        sys.exit("refused %r in %s" % (info.filename, member.name))
                    if parts[0].endswith(".data"):
                        if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                            continue
                        parts = parts[2:]
                    if info.filename.endswith("/") or not parts[-1]:
                        continue
                    target = os.path.join(temp, *parts)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with wheel.open(info) as source, open(target, "wb") as handle:
                        shutil.copyfileobj(source, handle)
    try:
        os.rename(temp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
finally:
    shutil.rmtree(temp, True)
    os.remove(tar)
"""


def parse_requirements(path: str):
    """``--requirements FILE`` read and checked (cluster/requirements.py): UsageError naming the line."""
    from .requirements import parse

    return parse(path)


def install_requirements(transport, workdir: str, requirements, cache) -> tuple:
    """``(HEX or None, bytes uploaded)``: the wheels of ``requirements`` and their dependencies
    for this host's Python and platform (resolved once per platform on the coordinator by
    ``cache``, a cluster/wheels.py RequirementWheels), unpacked into WORKDIR/reqs/HEX, named
    by their content: a second run uploads nothing. None when no line applies to the host
    (markers). ConnectError with pip's reason when they cannot be had for it (the host is
    left out; README.md, "fab map")."""
    from .provision import probe
    from .requirements import for_host

    host = transport.host
    facts = probe(transport, shlex.quote(workdir))
    lines = for_host(requirements, facts)
    if not lines:
        return None, 0
    resolved, why = cache.resolve(lines, facts)
    if resolved is None:
        raise ConnectError(f"{host.name}: --requirements {_shown(str(requirements))}: {why}")
    folder = f"{workdir}/{mapper.REQS_FOLDER}"
    final = f"{folder}/{resolved.digest}"
    if transport.run(f"test -d {shlex.quote(final)}", timeout=30).ok:
        log.debug("%s: --requirements: %d wheels already there (reqs/%s), nothing uploaded",
                 host.name, len(resolved.wheels), resolved.digest)
        return resolved.digest, 0
    mkdir = transport.run(f"umask 077 && mkdir -p -- {shlex.quote(folder)}", timeout=30)
    if not mkdir.ok:
        raise ConnectError(f"{host.name}: cannot create {folder}: {mkdir.error_line()}")
    tar = make_tar({path.name: (path.read_bytes(), False) for path in resolved.paths()})
    token = secrets.token_hex(6)
    tar_path = f"{folder}/.{resolved.digest}.{token}.tar"
    transport.put(tar, tar_path)
    command = " ".join([host_python(host), "-c", shlex.quote(_INSTALL_WHEELS), shlex.quote(folder),
                        shlex.quote(resolved.digest), shlex.quote(tar_path), token])
    result = transport.run(command, timeout=300)
    if not result.ok:
        raise ConnectError(f"{host.name}: cannot unpack the --requirements wheels: {result.error_line()}")
    log.info("%s: --requirements: %d wheels uploaded (%d bytes) into reqs/%s",
             host.name, len(resolved.wheels), len(tar), resolved.digest)
    return resolved.digest, len(tar)


def remove_run_folder(transport, run: str) -> None:
    """Remove WORKDIR/map/RUN on the host (the end of a run): what is left there is the run's."""
    mapper.check_hex(run, "run")
    word = map_workdir_word(transport.host)
    transport.run(f"rm -rf -- {word}/{mapper.RUN_FOLDER}/{run}", timeout=60)


def _shown(text: str) -> str:
    return text if text.isprintable() else ascii(text)
