"""Host facts as one JSON object on stdout: python, cores, arch, memory, load, ...

Run as ``python3 - WORKDIR < probe.py`` (the script travels on stdin, so it works
before anything is uploaded). Unknown facts are null, never an error: the host
may be a macOS laptop or an old Pi. Standard library only, Python 3.6 syntax.
"""
import glob
import json
import os
import platform
import subprocess
import sys

BUNDLE_FILE = "bundle.sha256"


def read_first_line(path):
    try:
        with open(path) as handle:
            return handle.readline().strip()
    except (OSError, IOError):
        return None


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def memory_bytes():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IOError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def temperature():
    """Hottest thermal zone in degrees Celsius, or None."""
    best = None
    base = "/sys/class/thermal"
    try:
        zones = os.listdir(base)
    except OSError:
        return None
    for zone in zones:
        raw = read_first_line(os.path.join(base, zone, "temp"))
        try:
            value = int(raw) / 1000.0
        except (TypeError, ValueError):
            continue
        if best is None or value > best:
            best = value
    return best


def os_name():
    pretty = None
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    pretty = line.split("=", 1)[1].strip().strip('"')
    except (OSError, IOError):
        pass
    return pretty or "%s %s" % (platform.system(), platform.release())


def musl_version(loaders="/lib/ld-musl-*.so.1"):
    """The musl version ("1.2.4") when the host's C library is musl (Alpine), else None.

    musl's dynamic loader prints its version when run with no arguments.
    """
    for loader in sorted(glob.glob(loaders)):
        try:
            done = subprocess.run([loader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in done.stderr.decode("ascii", "replace").splitlines()[:5]:
            words = line.split()
            if len(words) == 2 and words[0] == "Version" and len(words[1]) <= 16:
                return words[1]
    return None


def libc_name():
    """The C library binary wheels must match: "glibc 2.36", "musl 1.2.4", or None.

    glibc is asked directly first: before 3.8, platform.libc_ver() reads the symbol
    versions the python executable refers to, which understate it (2.34 on 2.36).
    """
    try:
        words = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
        if len(words) == 2 and words[0] == "glibc":
            return "glibc " + words[1]
    except (AttributeError, ValueError, OSError):
        pass
    if platform.system() == "Linux":
        musl = musl_version()
        if musl:
            return "musl " + musl
    libc = platform.libc_ver()
    return "%s %s" % libc if libc[0] else None


def has_module(name):
    """Whether ``name`` is importable, without importing it (numpy takes ~0.2 s to import)."""
    try:
        import importlib.util
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False


def has_library(name):
    """Whether the C library ``lib<name>`` can be found, without loading it."""
    try:
        import ctypes.util
        return ctypes.util.find_library(name) is not None
    except Exception:
        return False


def primes_engine():
    """The primes engine the client would pick here (client/primes.py), found, not imported:
    ``primesieve`` (package or libprimesieve), else ``numpy``, else ``python``. Cheap, so
    `fab hosts` can show it; `fab setup` runs the client itself for the exact answer.
    BEOWULF_PRIMES_ENGINE forces one when it is there, as in the client."""
    found = ["python"]
    if has_module("numpy"):
        found.insert(0, "numpy")
    if has_module("primesieve") or has_library("primesieve"):
        found.insert(0, "primesieve")
    forced = os.environ.get("BEOWULF_PRIMES_ENGINE", "").strip().lower()
    return forced if forced in found else found[0]


def installed_bundle(workdir):
    """Hash of the client files actually in WORKDIR/client (None when there are none).

    Hashing the files, not trusting bundle.sha256, means an edited or damaged client
    is seen as stale by `fab hosts` and re-uploaded by `fab setup`.
    """
    if not workdir:
        return None
    folder = os.path.join(workdir, "client")
    if not os.path.isfile(os.path.join(folder, "bundle.py")):
        return None
    try:
        sys.path.insert(0, folder)
        try:
            import bundle
        finally:
            sys.path.remove(folder)
        return bundle.bundle_hash(folder)
    except Exception:
        return read_first_line(os.path.join(workdir, BUNDLE_FILE))


def installed_packages(workdir):
    """Wheels `fab setup` unpacked into WORKDIR/lib (one file name a line in lib/.installed)."""
    if not workdir:
        return []
    try:
        with open(os.path.join(workdir, "lib", ".installed")) as handle:
            return [line.strip() for line in handle if line.strip()]
    except (OSError, IOError):
        return []


def facts(workdir):
    return {
        "python": platform.python_version(),
        "python_ok": sys.version_info[:2] >= (3, 6),
        "executable": sys.executable,
        "implementation": platform.python_implementation(),
        "cores": cpu_count(),
        "arch": platform.machine() or None,
        "system": platform.system() or None,
        "os": os_name(),
        "libc": libc_name(),
        "memory": memory_bytes(),
        "load": load_average(),
        "temp": temperature(),
        "machine_id": read_first_line("/etc/machine-id") or read_first_line(
            "/var/lib/dbus/machine-id"),
        "home": os.path.expanduser("~"),
        "workdir": workdir,
        "bundle": installed_bundle(workdir),
        "numpy": has_module("numpy"),
        "installed": installed_packages(workdir),
        "engine": primes_engine(),
    }


def main():
    workdir = os.path.expanduser(sys.argv[1]) if len(sys.argv) > 1 else None
    if workdir:
        lib = os.path.join(workdir, "lib")
        if os.path.isdir(lib):
            sys.path.insert(0, lib)
    sys.stdout.write(json.dumps(facts(workdir)) + "\n")


if __name__ == "__main__":
    main()
