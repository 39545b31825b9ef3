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
import re
import secrets
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .constants import MIN_HOST_PYTHON
from .errors import RemoteError, SetupError
from .inventory import Host
from .machine import MachineOnce, host_python, machine_of
from .ssh import remote_path
from .tor import ensure_tor
from .transport import Transport
from .wheels import PURE_MODULES, WheelCache, pure_package_files

log = logging.getLogger(__name__)
CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"
BUNDLE_FILE = "bundle.sha256"
# Runs on the host (Python 3.6+): unpack WORKDIR/.setup.tar; client/ replaces the old bundle as a
# whole, lib/ files are added; then record new packages and, last, the bundle hash.
# What it creates is private (umask 077), like the workdir itself (0700).
_UNPACK = """
import os, shutil, sys, tarfile
workdir, tar, bundle, packages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.umask(0o077)
os.chdir(workdir)
shutil.rmtree(".new", True)
with tarfile.open(tar) as archive:
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    archive.extractall(".new", **safe)
if os.path.isdir(".new/client"):
    shutil.rmtree("client", True)
    os.rename(".new/client", "client")
if os.path.isdir(".new/lib"):
    for name in os.listdir(".new/lib"):
        os.replace(os.path.join(".new/lib", name), os.path.join("lib", name))
shutil.rmtree(".new", True)
os.remove(tar)
if packages:
    with open("lib/.installed", "a") as handle:
        handle.write("".join(name + "\\n" for name in packages))
if bundle:
    with open("bundle.sha256.new", "w") as handle:
        handle.write(bundle + "\\n")
    os.replace("bundle.sha256.new", "bundle.sha256")
"""
_UNZIP = "import os,sys,zipfile; os.umask(0o077); zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"


def local_bundle_hash() -> str:
    """Hash of this checkout's client/ (the same function the agent runs on the host)."""
    from client.bundle import bundle_hash

    return bundle_hash(str(CLIENT_DIR))


def bundle_files() -> dict[str, bytes]:
    """The client bundle: client/*.py by name."""
    from client.bundle import bundle_files as names

    return {name: (CLIENT_DIR / name).read_bytes() for name in names(str(CLIENT_DIR))}


def make_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files`` (relative path -> bytes), deterministic (fixed mtimes and owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0  # private (SECURITY.md)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def host_workdir(host: Host, store_dir: Optional[Path] = None) -> str:
    """The workdir as a shell word (``~`` still expands); local hosts keep theirs beside the store."""
    if host.is_local and not host.workdir:
        return shlex.quote(str((store_dir or Path.cwd()) / ".beowulf" / "local"))
    return remote_path(host.remote_workdir)


def probe(transport: Transport, workdir_word: Optional[str] = None, timeout: float = 60,
          create: bool = False) -> dict:
    """Run client/probe.py on the host (sent on stdin); raise SetupError when it is not Python 3.6+.

    ``create`` makes the workdir (and its lib/) first, in the same command, and makes
    it (new or not) readable by the login user only: 0700.
    """
    host = transport.host
    python = host_python(host)
    script = (CLIENT_DIR / "probe.py").read_bytes()
    command = f"{python} - {workdir_word}" if workdir_word else f"{python} -"
    if create and workdir_word:
        command = f"umask 077 && mkdir -p -- {workdir_word}/lib && chmod 700 -- {workdir_word} && {command}"
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


# --system-packages: distributions whose python3-numpy and libprimesieve apt installs (os-release's
# PRETTY_NAME), the system Python they are built for, and the library's package name (libprimesieve11,
# libprimesieve11t64 ...: the soname differs between releases).
_APT_SYSTEMS = ("Debian", "Ubuntu", "Raspbian")
_SYSTEM_PYTHON = "import os, sys; print(os.path.realpath(sys.executable), sys.prefix)"
_SYSTEM_EXECUTABLE = re.compile(r"^/usr/bin/python3(\.[0-9]{1,2})?$")
_PRIMESIEVE_PACKAGE = re.compile(r"^libprimesieve[0-9]{1,3}(t64)?$")


@dataclass
class SetupReport:
    """One row of `fab setup`'s table."""

    facts: dict = field(default_factory=dict)
    bundle: str = ""
    packages: str = ""
    tor: str = "-"
    uploaded_bytes: int = 0
    engine: str = "-"  # the primes engine the host picks, and why when it is the pure-Python one


class Provisioner:
    """Provision hosts (one Provisioner for a whole `fab setup`, shared by the host threads)."""

    def __init__(self, wheels: WheelCache, tor: bool = False, numpy: bool = True, system_packages: bool = False):
        self.wheels = wheels
        self.system_packages = system_packages
        self.tor = tor
        self.numpy = numpy
        self.bundle_hash = local_bundle_hash()
        self._bundle_files = bundle_files()
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
        report.facts = facts = probe(transport, host_workdir(host), create=True)
        # Everything missing travels in one tar and is unpacked by one command.
        files: dict[str, bytes] = {}
        installed = set(facts.get("installed") or [])
        new_bundle = facts.get("bundle") != self.bundle_hash
        if new_bundle:
            files.update({f"client/{name}": data for name, data in self._bundle_files.items()})
        notes, new_packages = [], []
        pure_name, pure_files = pure_package_files(PURE_MODULES)
        if pure_files is None:
            notes.append(f"{pure_name} missing on the coordinator")
        elif pure_name in installed:
            notes.append(pure_name)
        else:
            files.update({f"lib/{name}": data for name, data in pure_files.items()})
            new_packages.append(pure_name)
            notes.append(f"{pure_name} (new)")
        if files:
            report.uploaded_bytes += self.upload(transport, facts["workdir"], files, new_bundle, new_packages)
        report.bundle = "uploaded" if new_bundle else "up to date"
        if self.system_packages:
            notes.append(self.install_system_packages(transport, facts))
            if notes[-1].startswith("apt: installed"):  # numpy and libprimesieve may now be there
                report.facts = facts = probe(transport, host_workdir(host))
        if self.numpy:
            numpy_note = self.install_numpy(transport, facts, report)
            notes.append("no numpy" if numpy_note.startswith("python:") else numpy_note)
            report.engine = self.host_engine(transport, facts, numpy_note)
        report.packages = ", ".join(notes)
        if self.tor:
            report.tor = self.setup_tor(transport, facts)
        return report

    def upload(self, transport: Transport, workdir: str, files: dict, new_bundle: bool, packages: list) -> int:
        """Send ``files`` (paths relative to the workdir) as one tar and unpack it with one command."""
        data = make_tar(files)
        tar_path = f"{workdir}/.setup.tar"
        transport.put(data, tar_path)
        bundle = self.bundle_hash if new_bundle else ""
        command = " ".join([host_python(transport.host), "-c", shlex.quote(_UNPACK), shlex.quote(workdir),
                            shlex.quote(tar_path), shlex.quote(bundle), *map(shlex.quote, packages)])
        self._check(transport.run(command, timeout=120), transport.host, "cannot unpack the upload")
        return len(data)

    def install_numpy(self, transport: Transport, facts: dict, report: SetupReport) -> str:
        """numpy from the host, or a wheel fetched on the coordinator, or a note saying why not."""
        if facts.get("numpy"):
            return "numpy"
        wheel, reason = self.wheels.for_host("numpy", facts)
        if wheel is None:
            return f"python: {reason}"
        report.uploaded_bytes += self._install_wheel(transport, facts, wheel)
        return "numpy (new)"

    def host_engine(self, transport: Transport, facts: dict, numpy_note: str) -> str:
        """The primes engine the host's own client picks now; with the reason when it is ``python``."""
        agent = shlex.quote(f"{facts['workdir']}/client/agent.py")
        result = transport.run(f"{host_python(transport.host)} {agent} --engines --log-level error", timeout=120)
        engine = None
        if result.ok and result.stdout.strip():
            try:
                engine = json.loads(result.stdout.strip().splitlines()[-1]).get("primes")
            except (ValueError, AttributeError):
                engine = None
        if not isinstance(engine, str) or not engine.isascii() or not engine.isalnum() or len(engine) > 20:
            return "unknown (the engine check failed)"
        if engine != "python":
            return engine
        if numpy_note.startswith("python:"):
            return numpy_note
        return "python: numpy does not import on this host"

    def _install_wheel(self, transport: Transport, facts: dict, wheel: Path) -> int:
        """Upload the wheel once per machine (into ~/.cache/beowulf), unpack it into this workdir."""
        host = transport.host
        cache = f"{facts['home']}/.cache/beowulf/wheels"
        remote = f"{cache}/{wheel.name}"
        # Once per machine: same reported machine id AND same verified SSH host key (cluster/machine.py).
        machine = machine_of(transport, facts.get("machine_id"))

        def upload() -> int:
            size = wheel.stat().st_size
            have = transport.run(f"stat -c %s {shlex.quote(remote)} 2>/dev/null || wc -c < {shlex.quote(remote)}",
                                 timeout=30)
            if have.ok and have.stdout.strip() == str(size):
                return 0
            self._check(transport.run(f"mkdir -p {shlex.quote(cache)}", timeout=30), host, "cannot create wheel cache")
            # A name of its own, then a rename: two machines sharing one home (NFS) may upload at once.
            temp = f"{remote}.{secrets.token_hex(8)}"
            transport.put(wheel.read_bytes(), temp)
            self._check(transport.run(f"mv -f -- {shlex.quote(temp)} {shlex.quote(remote)}", timeout=30), host,
                        f"cannot store {wheel.name}")
            return size

        sent = self.once.run(machine, ("wheel", facts.get("home"), wheel.name), upload)
        lib = f"{facts['workdir']}/lib"
        python = host_python(host)
        result = transport.run(f"{python} -c {shlex.quote(_UNZIP)} {shlex.quote(remote)} {shlex.quote(lib)}",
                               timeout=300)
        self._check(result, host, f"cannot unpack {wheel.name}")
        self._record(transport, lib, wheel.name.split("-")[0])
        return sent

    def _record(self, transport: Transport, lib: str, name: str) -> None:
        marker = shlex.quote(f"{lib}/.installed")
        self._check(transport.run(f"umask 077 && printf '%s\\n' {shlex.quote(name)} >> {marker}", timeout=30),
                    transport.host, "cannot record installed package")

    def install_system_packages(self, transport: Transport, facts: dict) -> str:
        """``python3-numpy`` and libprimesieve from the host's own distribution (apt through
        sudo, once per machine), only when the host's ``python`` is the system Python they are
        built for (README: Adding machines). A note for the packages column."""
        if not any(name in (facts.get("os") or "") for name in _APT_SYSTEMS):
            return "apt: not Debian/Ubuntu/Raspbian, nothing installed"
        check = transport.run(f"{host_python(transport.host)} -c {shlex.quote(_SYSTEM_PYTHON)}", timeout=60)
        words = check.stdout.strip().split("\n")[-1].split(" ") if check.ok else []
        if len(words) != 2 or not _SYSTEM_EXECUTABLE.match(words[0]) or words[1] != "/usr":
            return "apt: python is not the system python3, nothing installed"
        machine = machine_of(transport, facts.get("machine_id"))
        return self.once.run(machine, ("system-packages",), lambda: self._apt_install(transport))

    def _apt_install(self, transport: Transport) -> str:
        names = transport.run("apt-cache pkgnames libprimesieve", timeout=120)
        libs = sorted((n for n in names.stdout.split() if _PRIMESIEVE_PACKAGE.match(n)),
                      key=lambda n: int(re.sub(r"\D", "", n) or 0)) if names.ok else []
        packages = ["python3-numpy"] + libs[-1:]
        done = transport.sudo("DEBIAN_FRONTEND=noninteractive apt-get install -y -q " + " ".join(packages),
                              timeout=1800)
        if not done.ok:
            raise SetupError(f"{transport.host.name}: apt-get install {' '.join(packages)} failed: "
                             f"{done.error_line()}")
        return "apt: installed " + " ".join(packages)

    def setup_tor(self, transport: Transport, facts: dict) -> str:
        """Install tor if missing (apt through sudo, once per machine) and make sure it runs."""
        machine = machine_of(transport, facts.get("machine_id"))
        return self.once.run(machine, ("tor",), lambda: ensure_tor(transport))

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


