"""Packages for hosts, gathered on the coordinator so hosts need neither pip nor internet.

Pure-Python modules are copied from the coordinator's own installation. Binary
wheels (numpy) are downloaded once per (package, Python, platform) with
``pip download --only-binary :all:`` into ``~/.cache/beowulf/wheels`` under a
time limit; a platform with no wheel (an armv6 Pi, macOS, musl) gets none and
the host uses its standard-library code path instead of an hours-long build.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from .constants import WHEEL_DOWNLOAD_TIMEOUT

log = logging.getLogger(__name__)
# PySocks: the SOCKS client the scrape worker uses (two top-level modules).
PURE_MODULES = ("socks", "sockshandler")
PURE_PACKAGE_NAME = "PySocks"
WHEEL_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
                "i686": "i686", "i386": "i686", "ppc64le": "ppc64le", "s390x": "s390x"}


def pure_package_files(modules=PURE_MODULES) -> tuple[str, Optional[dict[str, bytes]]]:
    """(package label, {file name: bytes}) of pure-Python modules installed here, or None if missing."""
    files = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return PURE_PACKAGE_NAME, None
        files[f"{module}.py"] = Path(spec.origin).read_bytes()
    return PURE_PACKAGE_NAME, files


def host_platform_tags(facts: dict) -> list[str]:
    """pip ``--platform`` tags a Linux/glibc host can use, newest first; [] when none apply."""
    if facts.get("system") != "Linux":
        return []
    arch = WHEEL_ARCHES.get((facts.get("arch") or "").lower())
    libc = (facts.get("libc") or "").split()
    if arch is None or len(libc) != 2 or libc[0] != "glibc":
        return []
    try:
        major, minor = (int(part) for part in libc[1].split(".")[:2])
    except ValueError:
        return []
    if major != 2 or minor < 17:
        return []
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


class WheelCache:
    """Binary wheels on the coordinator, one download per (package, python, platform)."""

    def __init__(self, folder: Optional[Path] = None, timeout: float = WHEEL_DOWNLOAD_TIMEOUT):
        self.folder = folder or Path(os.path.expanduser("~/.cache/beowulf/wheels"))
        self.timeout = timeout
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._errors: dict[tuple, str] = {}

    def _key(self, package: str, python: str, tags: list[str]) -> tuple:
        version = "".join(python.split(".")[:2])
        return package, version, tags[0] if tags else "none"

    def last_error(self, package: str, python: str, tags: list[str]) -> str:
        return self._errors.get(self._key(package, python, tags), "no wheel")

    def find(self, package: str, python: str, tags: list[str]) -> Optional[Path]:
        """Path of a wheel for that host, downloading it the first time; None if there is none."""
        key = self._key(package, python, tags)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            folder = self.folder / f"cp{key[1]}-{key[2]}"
            found = sorted(folder.glob(f"{package}-*.whl")) if folder.exists() else []
            if found:
                return found[-1]
            if key in self._errors:
                return None
            return self._download(key, package, tags, folder)

    def _download(self, key: tuple, package: str, tags: list[str], folder: Path) -> Optional[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        version = key[1]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary", ":all:", "--dest", str(folder),
                   "--python-version", version, "--implementation", "cp", "--abi", f"cp{version}"]
        for tag in tags:
            command += ["--platform", tag]
        command.append(package)
        log.info("downloading %s wheel for cp%s %s", package, version, tags[0])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._errors[key] = f"download took over {self.timeout:.0f}s"
            return None
        found = sorted(folder.glob(f"{package}-*.whl"))
        if done.returncode != 0 or not found:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            self._errors[key] = f"no wheel for cp{version} {tags[0]}"
            log.info("%s wheel download failed: %s", package, lines[-1] if lines else done.returncode)
            return None
        return found[-1]
