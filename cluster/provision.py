"""Probe a host, upload the client bundle, unpack packages, set up tor.

Instead of a venv (which needs python3-venv, often missing on old machines) each
host gets a private site folder, ``WORKDIR/lib``, that the agent puts on its
``sys.path``. Packages arrive as wheels from the coordinator and are unpacked
there with the host's own ``zipfile``: no pip, no internet needed on the host.
Pure-Python packages (PySocks) are shipped from the coordinator's own install;
binary ones (numpy) are fetched once per platform on the coordinator and
uploaded once per machine, and skipped with a note when no wheel exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .constants import MIN_HOST_PYTHON
from .errors import RemoteError, SetupError
from .inventory import Host
from .ssh import remote_path
from .transport import Transport
from .wheels import PURE_MODULES, WheelCache, host_platform_tags, pure_package_files

log = logging.getLogger(__name__)
CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"
BUNDLE_FILE = "bundle.sha256"
_UNTAR = "import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])"
_UNZIP = "import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"


def local_bundle_hash() -> str:
    """Hash of this checkout's client/ (the same function the agent runs on the host)."""
    from client.bundle import bundle_hash

    return bundle_hash(str(CLIENT_DIR))


def bundle_tar() -> bytes:
    """client/*.py as an uncompressed tar, deterministic (fixed mtimes and owners)."""
    from client.bundle import bundle_files

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in bundle_files(str(CLIENT_DIR)):
            data = (CLIENT_DIR / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def host_python(host: Host) -> str:
    """The interpreter command for a host (quoted for the shell)."""
    if host.is_local:
        import sys

        return shlex.quote(sys.executable)
    return shlex.quote(host.remote_python)


def host_workdir(host: Host, store_dir: Optional[Path] = None) -> str:
    """The workdir as a shell word (``~`` still expands); local hosts keep theirs beside the store."""
    if host.is_local and not host.workdir:
        return shlex.quote(str((store_dir or Path.cwd()) / ".beowulf" / "local"))
    return remote_path(host.remote_workdir)


def probe(transport: Transport, workdir_word: Optional[str] = None, timeout: float = 60) -> dict:
    """Run client/probe.py on the host (sent on stdin); raise SetupError when it is not Python 3.6+."""
    host = transport.host
    python = host_python(host)
    script = (CLIENT_DIR / "probe.py").read_bytes()
    command = f"{python} - {workdir_word}" if workdir_word else f"{python} -"
    result = transport.run(command, stdin=script, timeout=timeout)
    facts = None
    if result.ok:
        for line in reversed(result.stdout.splitlines()):
            try:
                facts = json.loads(line)
                break
            except ValueError:
                continue
    if not isinstance(facts, dict) or "python" not in facts:
        what = host.python or "python3"
        raise SetupError(
            f"{host.name}: {what!r} did not run the probe as Python 3.6+ "
            f"({result.error_line() if not result.ok else 'unexpected output: ' + result.stdout.strip()[:80]!s}); "
            f"set python = /path/to/python3 in hosts.ini"
        )
    version = tuple(int(part) for part in facts["python"].split(".")[:2] if part.isdigit())
    if not facts.get("python_ok") or version < MIN_HOST_PYTHON:
        raise SetupError(f"{host.name}: Python {facts['python']} is too old (need 3.6 or newer); "
                         "set python = /path/to/python3 in hosts.ini")
    return facts


@dataclass
class SetupReport:
    """One row of `fab setup`'s table."""

    facts: dict = field(default_factory=dict)
    bundle: str = ""
    packages: str = ""
    tor: str = "-"
    uploaded_bytes: int = 0


class MachineOnce:
    """Steps done once per machine (several inventory entries can be one computer)."""

    def __init__(self):
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self.results: dict[tuple, object] = {}

    def run(self, key: tuple, step):
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.results:
                self.results[key] = step()
            return self.results[key]


class Provisioner:
    """Provision hosts (one Provisioner for a whole `fab setup`, shared by the host threads)."""

    def __init__(self, wheels: WheelCache, tor: bool = False, numpy: bool = True):
        self.wheels = wheels
        self.tor = tor
        self.numpy = numpy
        self.bundle_hash = local_bundle_hash()
        self._bundle_tar = bundle_tar()
        self.once = MachineOnce()

    def setup(self, transport: Transport) -> SetupReport:
        host = transport.host
        report = SetupReport()
        if host.is_local:
            report.facts = probe(transport)
            report.bundle = "checkout (local)"
            report.packages = "from requirements.txt"
            if self.tor:
                report.tor = self.setup_tor(transport, report.facts)
            return report
        word = host_workdir(host)
        self._check(transport.run(f"mkdir -p {word}/lib", timeout=60), host, "cannot create workdir")
        report.facts = facts = probe(transport, word)
        workdir = facts["workdir"]
        if facts.get("bundle") == self.bundle_hash:
            report.bundle = "up to date"
        else:
            report.uploaded_bytes += self.upload_bundle(transport, workdir)
            report.bundle = "uploaded"
        report.packages = self.install_packages(transport, facts, report)
        if self.tor:
            report.tor = self.setup_tor(transport, facts)
        return report

    def upload_bundle(self, transport: Transport, workdir: str) -> int:
        python = host_python(transport.host)
        tar_path = f"{workdir}/.bundle.tar"
        transport.put(self._bundle_tar, tar_path)
        w = shlex.quote(workdir)
        script = (
            f"set -e; cd {w}; rm -rf client.new; mkdir client.new; "
            f"{python} -c {shlex.quote(_UNTAR)} .bundle.tar client.new; "
            f"rm -rf client; mv client.new client; rm -f .bundle.tar; "
            f"printf '%s\\n' {shlex.quote(self.bundle_hash)} > {BUNDLE_FILE}.new; mv {BUNDLE_FILE}.new {BUNDLE_FILE}"
        )
        self._check(transport.run(script, timeout=120), transport.host, "cannot unpack the client bundle")
        return len(self._bundle_tar)

    def install_packages(self, transport: Transport, facts: dict, report: SetupReport) -> str:
        """Unpack PySocks (and numpy when a wheel exists) into WORKDIR/lib; say what happened."""
        installed = set(facts.get("installed") or [])
        notes = []
        pure_name, pure_files = pure_package_files(PURE_MODULES)
        if pure_files is None:
            notes.append("PySocks missing on coordinator")
        elif pure_name in installed:
            notes.append("PySocks")
        else:
            report.uploaded_bytes += self._install_pure(transport, facts, pure_name, pure_files)
            notes.append("PySocks (new)")
        if not self.numpy:
            return ", ".join(notes)
        if facts.get("numpy"):
            notes.append("numpy")
            return ", ".join(notes)
        tags = host_platform_tags(facts)
        wheel = self.wheels.find("numpy", facts.get("python", ""), tags) if tags else None
        if wheel is None:
            reason = self.wheels.last_error("numpy", facts.get("python", ""), tags) if tags else \
                f"no wheels for {facts.get('system')}/{facts.get('arch')}"
            notes.append(f"numpy skipped ({reason}): pure-Python sieve")
            return ", ".join(notes)
        report.uploaded_bytes += self._install_wheel(transport, facts, wheel)
        notes.append("numpy (new)")
        return ", ".join(notes)

    def _install_pure(self, transport: Transport, facts: dict, name: str, files: dict) -> int:
        lib = f"{facts['workdir']}/lib"
        size = 0
        for relative, data in files.items():
            transport.put(data, f"{lib}/{relative}")
            size += len(data)
        self._record(transport, lib, name)
        return size

    def _install_wheel(self, transport: Transport, facts: dict, wheel: Path) -> int:
        """Upload the wheel once per machine (into ~/.cache/beowulf), unpack it into this workdir."""
        host = transport.host
        cache = f"{facts['home']}/.cache/beowulf/wheels"
        remote = f"{cache}/{wheel.name}"
        key = (facts.get("machine_id") or host.name, facts.get("home"), wheel.name)

        def upload() -> int:
            size = wheel.stat().st_size
            have = transport.run(f"stat -c %s {shlex.quote(remote)} 2>/dev/null || wc -c < {shlex.quote(remote)}",
                                 timeout=30)
            if have.ok and have.stdout.strip() == str(size):
                return 0
            self._check(transport.run(f"mkdir -p {shlex.quote(cache)}", timeout=30), host, "cannot create wheel cache")
            transport.put(wheel.read_bytes(), remote)
            return size

        sent = self.once.run(key, upload)
        lib = f"{facts['workdir']}/lib"
        python = host_python(host)
        result = transport.run(f"{python} -c {shlex.quote(_UNZIP)} {shlex.quote(remote)} {shlex.quote(lib)}",
                               timeout=300)
        self._check(result, host, f"cannot unpack {wheel.name}")
        self._record(transport, lib, wheel.name.split("-")[0])
        return sent

    def _record(self, transport: Transport, lib: str, name: str) -> None:
        marker = shlex.quote(f"{lib}/.installed")
        self._check(transport.run(f"printf '%s\\n' {shlex.quote(name)} >> {marker}", timeout=30),
                    transport.host, "cannot record installed package")

    def setup_tor(self, transport: Transport, facts: dict) -> str:
        """Install tor if missing (apt through sudo, once per machine) and make sure it runs."""
        from .tor import ensure_tor

        key = ("tor", facts.get("machine_id") or transport.host.name)
        return self.once.run(key, lambda: ensure_tor(transport))

    @staticmethod
    def _check(result, host: Host, what: str) -> None:
        if not result.ok:
            raise RemoteError(f"{host.name}: {what}: {result.error_line()}")


def teardown(transport: Transport) -> str:
    """Remove the host's workdir; refuses a workdir that is the home folder or the root."""
    host = transport.host
    if host.is_local:
        return "nothing to remove (local host runs from the checkout)"
    word = host_workdir(host)
    result = transport.run(f"cd {word} 2>/dev/null && pwd -P || true", timeout=30)
    home = transport.run('cd "$HOME" && pwd -P', timeout=30).stdout.strip()
    resolved = result.stdout.strip()
    if not resolved:
        return "nothing to remove"
    if resolved in ("/", home) or not resolved.startswith("/"):
        raise SetupError(f"{host.name}: refusing to remove {resolved} (it is the home or root folder)")
    done = transport.run(f"rm -rf -- {shlex.quote(resolved)}", timeout=300)
    if not done.ok:
        raise RemoteError(f"{host.name}: cannot remove {resolved}: {done.error_line()}")
    return f"removed {resolved}"


__all__ = ["Provisioner", "SetupReport", "probe", "teardown", "local_bundle_hash", "os"]
