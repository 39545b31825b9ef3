"""Packages for hosts, gathered on the coordinator so hosts need neither pip nor internet.

Pure-Python modules are copied from the coordinator's own installation. Binary
wheels (numpy) are downloaded once per (package, Python ABI, platform) with
``pip download --only-binary :all:`` into ``~/.cache/beowulf/wheels`` under a
time limit. pip is told exactly what the host is (``--python-version``, ``--abi``,
every ``--platform`` tag its C library accepts) and picks the newest release with a
wheel for it, e.g. numpy 1.19.5 for CPython 3.6 (``cp36m``, ``manylinux2010``). A
host with no wheel (an armv6 Pi, macOS, a Python 3.6 on musl) gets none and uses its
standard-library code path instead of an hours-long build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Optional

from .constants import REQUIREMENTS_DOWNLOAD_TIMEOUT, WHEEL_DOWNLOAD_TIMEOUT

log = logging.getLogger(__name__)
# PySocks: the SOCKS client the scrape worker uses (two top-level modules).
PURE_MODULES = ("socks", "sockshandler")
PURE_PACKAGE_NAME = "PySocks"
# platform.machine() -> the architecture word of manylinux/musllinux tags. armv6l (Pi 1, Zero)
# has no manylinux or musllinux tag at all: no wheel can exist for it.
WHEEL_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
                "i686": "i686", "i386": "i686", "ppc64le": "ppc64le", "s390x": "s390x", "armv7l": "armv7l"}
# The oldest glibc each architecture's manylinux tags go down to (PEP 600: manylinux1 is glibc
# 2.5 and exists for x86 only; every other architecture starts at manylinux2014, glibc 2.17).
OLDEST_GLIBC_MINOR = {"x86_64": 5, "i686": 5}
OLDEST_GLIBC_MINOR_OTHER = 17
# The PEP 513/571/599 names of some manylinux_2_X tags: older wheels carry only these.
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
LEGACY_ARCHES = {17: {"x86_64", "i686", "aarch64", "armv7l", "ppc64le", "s390x"},
                 12: {"x86_64", "i686"}, 5: {"x86_64", "i686"}}
# A long stderr line of pip, or a strange libc string, is cut to this in messages.
MESSAGE_CHARS = 120


def pure_package_files(modules=PURE_MODULES) -> tuple[str, Optional[dict[str, bytes]]]:
    """(package label, {file name: bytes}) of pure-Python modules installed here, or None if missing."""
    files = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return PURE_PACKAGE_NAME, None
        files[f"{module}.py"] = Path(spec.origin).read_bytes()
    return PURE_PACKAGE_NAME, files


def _libc(facts: dict) -> Optional[tuple[str, int, int]]:
    """("glibc"|"musl", major, minor) from the probe's ``libc`` fact ("glibc 2.36", "musl 1.2.4")."""
    parts = str(facts.get("libc") or "").split()
    if len(parts) != 2 or parts[0] not in ("glibc", "musl"):
        return None
    numbers = parts[1].split(".")
    if len(numbers) < 2 or not all(n.isdigit() and len(n) <= 4 for n in numbers[:2]):
        return None
    return parts[0], int(numbers[0]), int(numbers[1])


def host_platform_tags(facts: dict) -> list[str]:
    """pip ``--platform`` tags a Linux host can use, newest first; [] when none apply.

    glibc 2.X: ``manylinux_2_X`` down to the architecture's oldest (2.5 on x86, 2.17
    elsewhere), each legacy name (``manylinux2014``/``2010``/``1``) beside its
    equivalent. musl 1.X: ``musllinux_1_X`` down to ``musllinux_1_0``.
    """
    if facts.get("system") != "Linux":
        return []
    arch = WHEEL_ARCHES.get(str(facts.get("arch") or "").lower())
    libc = _libc(facts)
    if arch is None or libc is None:
        return []
    name, major, minor = libc
    if name == "musl":
        return [f"musllinux_1_{m}_{arch}" for m in range(minor, -1, -1)] if major == 1 else []
    oldest = OLDEST_GLIBC_MINOR.get(arch, OLDEST_GLIBC_MINOR_OTHER)
    if major != 2 or minor < oldest:
        return []
    tags = []
    for m in range(minor, oldest - 1, -1):
        tags.append(f"manylinux_2_{m}_{arch}")
        if arch in LEGACY_ARCHES.get(m, ()):
            tags.append(f"{LEGACY_MANYLINUX[m]}_{arch}")
    return tags


def python_abi(python: str) -> Optional[tuple[str, str]]:
    """``("36", "cp36m")`` for CPython 3.6.15: up to 3.7 the default build's ABI carries ``m``."""
    parts = str(python).split(".")
    if len(parts) < 2 or not all(p.isdigit() and len(p) <= 3 for p in parts[:2]):
        return None
    major, minor = int(parts[0]), int(parts[1])
    version = f"{major}{minor}"
    return version, f"cp{version}m" if (major, minor) <= (3, 7) else f"cp{version}"


def _word(value: object) -> str:
    """A fact from the host as a short, printable word for messages ("?" when there is nothing left)."""
    kept = "".join(ch for ch in str(value) if ch.isascii() and (ch.isalnum() or ch in "._-"))
    return kept[:20] or "?"


def host_label(facts: dict) -> str:
    """The host as a wheel sees it, for messages: ``cp37 armv7l``, ``cp39 x86_64 musl``."""
    abi = python_abi(facts.get("python") or "")
    python = f"cp{abi[0]}" if abi else "Python " + _word(facts.get("python"))
    implementation = facts.get("implementation") or "CPython"
    if implementation != "CPython":
        python = _word(implementation)
    label = f"{python} {_word(facts.get('arch'))}"
    libc = _libc(facts)
    if facts.get("system") != "Linux":
        label += f" {_word(facts.get('system'))}"
    elif libc and libc[0] == "musl":
        label += " musl"
    elif libc is None:
        label += " (C library unknown)"
    return label


class WheelCache:
    """Binary wheels on the coordinator, one download per (package, ABI, platform)."""

    def __init__(self, folder: Optional[Path] = None, timeout: float = WHEEL_DOWNLOAD_TIMEOUT):
        self.folder = folder or Path(os.path.expanduser("~/.cache/beowulf/wheels"))
        self.timeout = timeout
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._errors: dict[tuple, str] = {}

    def for_host(self, package: str, facts: dict) -> tuple[Optional[Path], str]:
        """(wheel, "") for the host the probe's ``facts`` describe, or (None, why there is none)."""
        label = host_label(facts)
        none = f"no {package} wheel for {label}"
        abi = python_abi(facts.get("python") or "")
        tags = host_platform_tags(facts)
        if (facts.get("implementation") or "CPython") != "CPython" or abi is None or not tags:
            return None, none
        wheel = self.find(package, facts["python"], tags)
        if wheel is None:
            error = self.last_error(package, facts["python"], tags)
            return None, none if error == "no wheel" else f"{package}: {error}"
        return wheel, ""

    def _key(self, package: str, python: str, tags: list[str]) -> tuple:
        abi = python_abi(python) or ("", "unknown")
        return package, abi[0], abi[1], tags[0] if tags else "none"

    def last_error(self, package: str, python: str, tags: list[str]) -> str:
        """Why the last ``find`` returned None: "no wheel", or what went wrong downloading."""
        return self._errors.get(self._key(package, python, tags), "no wheel")

    def find(self, package: str, python: str, tags: list[str]) -> Optional[Path]:
        """Path of a wheel for that host, downloading it the first time; None if there is none."""
        key = self._key(package, python, tags)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            folder = self.folder / f"{key[2]}-{key[3]}"
            found = sorted(folder.glob(f"{package}-*.whl")) if folder.exists() else []
            if found:
                return found[-1]
            if key in self._errors or not tags or not key[1]:
                return None
            return self._download(key, package, tags, folder)

    def _download(self, key: tuple, package: str, tags: list[str], folder: Path) -> Optional[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        _, version, abi, _ = key
        # pip writes into a folder of its own: a wheel appears in ``folder`` only whole (os.replace),
        # so another `fab setup` looking at the same cache never takes a half-written one.
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "--only-binary", ":all:", "--dest", str(scratch),
                   "--python-version", version, "--implementation", "cp", "--abi", abi]
        for tag in tags:
            command += ["--platform", tag]
        command.append(package)
        log.info("downloading %s wheel for %s %s", package, abi, tags[0])
        try:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._errors[key] = f"download took over {self.timeout:.0f}s"
                return None
            found = sorted(scratch.glob(f"{package}-*.whl"))
            if done.returncode != 0 or not found:
                lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
                last = lines[-1] if lines else f"pip exited with {done.returncode}"
                if "No matching distribution" in done.stderr or "Could not find a version" in done.stderr:
                    self._errors[key] = "no wheel"
                else:
                    self._errors[key] = f"download failed ({last[:MESSAGE_CHARS]})"
                log.info("%s wheel download for %s %s failed: %s", package, abi, tags[0], last)
                return None
            target = folder / found[-1].name
            os.replace(found[-1], target)
            return target
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ fab map --requirements

# pip's environment variables that change what a resolve finds: part of the cache key.
_PIP_KEY_VARIABLES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX",
                      "PIP_CONSTRAINT", "PIP_CONFIG_FILE", "PIP_PRE", "PIP_ONLY_BINARY")
# A resolve's reason, as shown: at most this many characters of pip's lines.
REASON_CHARS = 300
# Wheels of one resolve at most, and their bytes together (held in memory once to ship them).
MAX_RESOLVED_WHEELS = 500
MAX_RESOLVED_BYTES = 512 << 20


def requirements_cache_folder() -> Path:
    """Where resolved requirement sets are kept: $XDG_CACHE_HOME/beowulf/requirements
    (default ~/.cache/beowulf/requirements)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "beowulf" / "requirements"


def pip_reason(stderr: str, returncode: int) -> str:
    """pip's reason for a failed resolve, on one line: its first ERROR line, with the
    "Ignored the following versions that require a different python version" note when there is one."""
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    errors = [line[len("ERROR: "):] for line in lines if line.startswith("ERROR: ")]
    ignored = [line.split(": ", 1)[-1] for line in lines if "require a different python version" in line]
    main = [line for line in errors if "require a different python version" not in line]
    reason = main[0] if main else (lines[-1] if lines else f"pip exited with {returncode}")
    if ignored:
        reason += f" ({ignored[0]})"
    text = "".join(ch if ch.isprintable() else "?" for ch in reason)
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


# pip runs for one resolve at most: each adds the dependencies whose markers hold on the
# host but not on this computer (a backport for an older Python), found in the last run's wheels.
MARKER_ROUNDS = 4
# Bytes of a wheel's METADATA read at most.
MAX_METADATA_BYTES = 1 << 20


def requires_dist(wheel: Path) -> list:
    """The ``Requires-Dist`` lines of a wheel's METADATA ([] when it cannot be read)."""
    from email.parser import HeaderParser

    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > MAX_METADATA_BYTES:
                return []
            text = archive.read(names[0]).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    return HeaderParser().parsestr(text).get_all("Requires-Dist") or []


def missing_for_host(wheels: list, asked: list, facts: dict) -> list:
    """Requirements (markers dropped) of the downloaded ``wheels`` whose markers hold for the host
    ``facts`` describe, naming projects none of the wheels is: pip evaluated them for this computer."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    from .requirements import marker_environment

    environment = marker_environment(facts)
    extras: dict = {}
    for line in asked:
        requirement = Requirement(line)
        extras.setdefault(canonicalize_name(requirement.name), set()).update(requirement.extras)
    names = {}
    for wheel in wheels:
        try:
            names[wheel] = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        except InvalidWheelFilename:
            continue
    have = set(names.values())
    missing = set()
    for wheel, name in names.items():
        for line in requires_dist(wheel):
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is None or canonicalize_name(requirement.name) in have:
                continue
            try:
                wanted = any(requirement.marker.evaluate(dict(environment, extra=extra))
                             for extra in ["", *sorted(extras.get(name, ()))])
            except Exception:  # a marker packaging cannot judge: pip's choice stands
                continue
            if wanted:
                requirement.marker = None
                requirement.name = canonicalize_name(requirement.name)
                missing.add(str(requirement))
    return sorted(missing)


class Resolved:
    """A resolved requirement set for one host platform: its wheels (in the cache) and
    ``digest``, the hash of their names and content (the host folder's name)."""

    def __init__(self, folder: Path, wheels: list):
        self.folder = folder
        self.wheels = wheels  # [(file name, sha256, size)], sorted
        listing = "".join(f"{name} {sha}\n" for name, sha, _ in wheels)
        self.digest = hashlib.sha256(listing.encode()).hexdigest()[:32]

    def paths(self) -> list:
        return [self.folder / name for name, _, _ in self.wheels]

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.wheels)


class RequirementWheels:
    """``pip download`` of a requirement set with its dependencies, binary wheels only, once
    per (requirements, host platform): pip is told the host's Python version, ABI and
    platform tags (as for fab setup's numpy above). Results are kept in
    ``requirements_cache_folder()/KEY`` (a folder renamed into place whole, with a
    manifest); a failure is remembered for the run, so hosts of one platform ask pip once."""

    def __init__(self, folder: Optional[Path] = None, timeout: float = REQUIREMENTS_DOWNLOAD_TIMEOUT):
        self.folder = folder or requirements_cache_folder()
        self.timeout = timeout
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._errors: dict[str, str] = {}
        self.downloads = 0  # pip runs made (tests and logs)

    def target(self, facts: dict) -> tuple:
        """(python version "3.8.18", abi "cp38", platform tags) of a host, or a reason it can take no wheel.

        The whole version goes to pip: a Requires-Python of ">=3.8.1" is judged against it."""
        python = str(facts.get("python") or "")
        abi = python_abi(python)
        tags = host_platform_tags(facts)
        if (facts.get("implementation") or "CPython") != "CPython":
            return None, f"wheels are fetched for CPython hosts only, not {host_label(facts)}"
        if abi is None or not tags:
            return None, f"no wheel platform for {host_label(facts)}"
        parts = python.split(".")[:3]
        version = ".".join(parts) if len(parts) == 3 and all(p.isdigit() and len(p) <= 3 for p in parts) else abi[0]
        return (version, abi[1], tuple(tags)), ""

    def key(self, lines: tuple, target: tuple) -> str:
        pip_env = [f"{name}={os.environ[name]}" for name in _PIP_KEY_VARIABLES if name in os.environ]
        text = "\n".join(["v1", *lines, "--", *target[:2], *target[2], "--", *pip_env])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def resolve(self, lines: tuple, facts: dict) -> tuple:
        """(Resolved, "") for the host ``facts`` describe, or (None, the reason in one line)."""
        target, why = self.target(facts)
        if target is None:
            return None, why
        key = self.key(lines, target)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._errors:
                return None, self._errors[key]
            found = self._cached(self.folder / key)
            if found is not None:
                return found, ""
            found, why = self._download(key, lines, target, facts)
            if found is None:
                self._errors[key] = why
            return found, why

    def _cached(self, folder: Path) -> Optional[Resolved]:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            wheels = [(str(name), str(sha), int(size)) for name, sha, size in manifest["wheels"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name, _, size in wheels:
            path = folder / name
            if path.name != name or not path.is_file() or path.stat().st_size != size:
                return None
        return Resolved(folder, sorted(wheels))

    def _download(self, key: str, lines: tuple, target: tuple, facts: dict) -> tuple:
        version, abi, tags = target
        self.folder.mkdir(parents=True, exist_ok=True)
        # pip writes into a folder of its own; the folder is renamed into place whole, with its
        # manifest, so another fab looking at the same cache never takes half a set.
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.folder))
        wheels = scratch / "wheels"
        try:
            asked = list(lines)
            for _ in range(MARKER_ROUNDS):
                shutil.rmtree(wheels, ignore_errors=True)
                (scratch / "requirements.txt").write_text("".join(line + "\n" for line in asked))
                command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                           "--no-input", "--progress-bar", "off", "--only-binary", ":all:", "--dest", str(wheels),
                           "--python-version", version, "--implementation", "cp", "--abi", abi]
                for tag in tags:
                    command += ["--platform", tag]
                command += ["-r", str(scratch / "requirements.txt")]
                log.info("resolving %d requirement(s) for %s %s with pip download", len(asked), abi, tags[0])
                self.downloads += 1
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout,
                                          stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    return None, f"pip download took over {self.timeout:.0f}s"
                except OSError as exc:
                    return None, f"cannot run pip: {exc}"
                if done.returncode != 0:
                    log.debug("pip download for %s %s failed:\n%s", abi, tags[0], done.stderr[-4000:])
                    return None, pip_reason(done.stderr, done.returncode)
                # pip judged the dependencies' markers for this computer's Python: add those
                # the host needs and pip left out, and ask again (README.md, "fab map").
                missing = missing_for_host(sorted(wheels.glob("*.whl")), asked, facts)
                if not missing:
                    return self._keep(key, scratch, wheels)
                log.info("dependencies for %s %s that pip judged for this computer: %s", abi, tags[0],
                         ", ".join(missing))
                asked += missing
            return None, f"dependency markers still unresolved after {MARKER_ROUNDS} pip runs"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _keep(self, key: str, scratch: Path, wheels: Path) -> tuple:
        files = sorted(wheels.iterdir()) if wheels.is_dir() else []
        if not files:
            return None, "pip download fetched nothing"
        if len(files) > MAX_RESOLVED_WHEELS:
            return None, f"more than {MAX_RESOLVED_WHEELS} wheels"
        entries = []
        for path in files:
            if not path.name.endswith(".whl") or not path.is_file():
                return None, f"pip download left {path.name[:80]!r}, not a wheel"
            data = path.read_bytes()
            entries.append((path.name, hashlib.sha256(data).hexdigest(), len(data)))
            os.replace(path, scratch / path.name)
        if sum(size for _, _, size in entries) > MAX_RESOLVED_BYTES:
            return None, f"the wheels hold more than {MAX_RESOLVED_BYTES >> 20} MB"
        wheels.rmdir()
        (scratch / "requirements.txt").unlink()
        (scratch / "manifest.json").write_text(json.dumps({"wheels": entries}))
        final = self.folder / key
        try:
            os.rename(scratch, final)
        except OSError:
            pass  # another fab got there first: take its set
        found = self._cached(final)
        return (found, "") if found is not None else (None, "the requirements cache could not be written")
