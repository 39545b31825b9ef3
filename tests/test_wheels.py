"""Wheel resolution for hosts (cluster/wheels.py) and the probe's C library fact (client/probe.py).

The pure functions are checked against packaging (pip's own tag logic) and against real
interpreters; the downloads ask real pip and PyPI, once per (Python, platform) for the
whole session, into a session temp folder. Wheels for x86_64 glibc are unpacked and
imported by the real CPython they are for (pyenv's 3.6, 3.7, 3.9 and 3.11).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging import tags as packaging_tags
from packaging.utils import parse_wheel_filename
from packaging.version import Version

from cluster.wheels import WheelCache, host_label, host_platform_tags, python_abi
from harness import in_ci
from harness.sshd import pyenv_python

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "client" / "probe.py"
PYENV = {"36": "3.6", "37": "3.7", "39": "3.9", "311": "3.11"}
# The last numpy with wheels for these Pythons (they are end of life: this will not change).
LAST_NUMPY = {"36": "1.19.5", "37": "1.21.6", "39": "2.0.2"}
FULL = {"36": "3.6.15", "37": "3.7.16", "39": "3.9.18", "311": "3.11.7"}


def facts(python: str, arch: str = "x86_64", libc: str | None = "glibc 2.36", system: str = "Linux",
          implementation: str = "CPython") -> dict:
    return {"python": python, "arch": arch, "libc": libc, "system": system, "implementation": implementation}


def interpreter(version: str) -> str:
    """A real CPython ``version`` from pyenv: fails under CI when missing, else skips."""
    found = pyenv_python(version)
    if found is None:
        message = f"no pyenv CPython {version} on this machine (pyenv install {version})"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return str(found)


# ---------------------------------------------------------------- tags and ABI (pure)


def this_host_facts() -> dict:
    libc = os.confstr("CS_GNU_LIBC_VERSION")
    return facts(platform.python_version(), platform.machine(), libc)


def test_tags_of_this_host_are_what_pip_accepts_here():
    """For the coordinator itself, the offered platforms are exactly packaging's manylinux ones, in order."""
    ours = host_platform_tags(this_host_facts())
    pips = []
    for tag in packaging_tags.sys_tags():
        if tag.platform.startswith("manylinux") and tag.platform not in pips:
            pips.append(tag.platform)
    assert ours == pips
    assert ours[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"] or platform.machine() != "x86_64"


@pytest.mark.parametrize("host, first, last, count", [
    (facts("3.6.15", "x86_64", "glibc 2.36"), "manylinux_2_36_x86_64", "manylinux1_x86_64", 32 + 3),
    (facts("3.6.15", "x86_64", "glibc 2.12"), "manylinux_2_12_x86_64", "manylinux1_x86_64", 8 + 2),
    (facts("3.7.3", "aarch64", "glibc 2.28"), "manylinux_2_28_aarch64", "manylinux2014_aarch64", 12 + 1),
    (facts("3.7.3", "armv7l", "glibc 2.28"), "manylinux_2_28_armv7l", "manylinux2014_armv7l", 12 + 1),
    (facts("3.11.2", "x86_64", "musl 1.2.4"), "musllinux_1_2_x86_64", "musllinux_1_0_x86_64", 3),
    (facts("3.9.0", "arm64", "musl 1.1.24"), "musllinux_1_1_aarch64", "musllinux_1_0_aarch64", 2),
])
def test_platform_tags(host, first, last, count):
    tags = host_platform_tags(host)
    assert (tags[0], tags[-1], len(tags)) == (first, last, count)
    assert "manylinux2010_x86_64" in tags if host["arch"] == "x86_64" and "glibc" in host["libc"] else True


@pytest.mark.parametrize("host", [
    facts("3.7.3", "armv6l", "glibc 2.28"),  # Pi 1 / Zero: no manylinux tag exists for armv6
    facts("3.9.6", "arm64", None, system="Darwin"),
    facts("3.6.9", "x86_64", None),  # C library unknown
    facts("3.6.9", "aarch64", "glibc 2.16"),  # older than manylinux2014 allows on aarch64
    facts("3.6.9", "x86_64", "glibc 2.\x1b[31m"),
])
def test_no_platform_tags(host):
    assert host_platform_tags(host) == []


@pytest.mark.parametrize("version", sorted(PYENV.values()))
def test_abi_matches_the_real_interpreter(version):
    """``cp36m``/``cp37m`` up to 3.7, ``cp39``/``cp311`` after: what each real CPython's SOABI says."""
    python = interpreter(version)
    done = subprocess.run([python, "-c", "import platform, sysconfig; print(platform.python_version(), "
                                         "sysconfig.get_config_var('SOABI'))"],
                          capture_output=True, text=True, timeout=60)
    full, soabi = done.stdout.split()
    assert python_abi(full)[1] == "cp" + soabi.split("-")[1]  # cpython-36m-x86_64-linux-gnu -> cp36m


def test_host_label_is_short_and_printable():
    assert host_label(facts("3.7.3", "armv7l", "glibc 2.28")) == "cp37 armv7l"
    assert host_label(facts("3.6.15", "x86_64", "musl 1.2.4")) == "cp36 x86_64 musl"
    hostile = host_label(facts("3.7.3", "\x1b[2J" + "x" * 500, "glibc 2.28", system="Linux"))
    assert "\x1b" not in hostile and len(hostile) < 40


# ---------------------------------------------------------------- the probe's libc fact


@pytest.mark.parametrize("version", ["3.6", "3.7"])
def test_probe_reports_the_real_glibc_on_old_pythons(version, tmp_path):
    """Before 3.8, platform.libc_ver() understates glibc (2.34 here on 2.36): the probe asks glibc itself."""
    python = interpreter(version)
    done = subprocess.run([python, "-", str(tmp_path)], input=PROBE.read_bytes(), capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.decode().splitlines()[-1])
    assert found["libc"] == os.confstr("CS_GNU_LIBC_VERSION")


def test_probe_reads_musl_version_from_its_loader(tmp_path):
    """musl's loader, run bare, prints its version on stderr (as on Alpine); only that line is taken."""
    sys.path.insert(0, str(REPO / "client"))
    try:
        import probe
    finally:
        sys.path.remove(str(REPO / "client"))
    loader = tmp_path / "ld-musl-x86_64.so.1"
    loader.write_text("#!/bin/sh\nprintf 'musl libc (x86_64)\\nVersion 1.2.4\\nDynamic Program Loader\\n"
                      "Usage: %s [options] [--] pathname [args]\\n' \"$0\" >&2\nexit 1\n")
    loader.chmod(0o755)
    assert probe.musl_version(str(tmp_path / "ld-musl-*.so.1")) == "1.2.4"
    assert probe.musl_version(str(tmp_path / "nothing-*.so.1")) is None
    assert probe.libc_name() == os.confstr("CS_GNU_LIBC_VERSION")  # glibc here: never mistaken for musl


# ---------------------------------------------------------------- real pip, real PyPI


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> WheelCache:
    """One WheelCache for the session: each (Python, platform) is downloaded once and reused."""
    return WheelCache(tmp_path_factory.mktemp("wheels"), timeout=300)


def check_wheel(wheel: Path, host: dict) -> Version:
    """The wheel is whole, for this Python and ABI, and for one of the platforms offered; its version."""
    name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
    assert name == "numpy"
    abi = python_abi(host["python"])
    offered = set(host_platform_tags(host))
    assert any(t.interpreter == f"cp{abi[0]}" and t.abi == abi[1] and t.platform in offered for t in wheel_tags)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.testzip() is None
        assert "numpy/__init__.py" in archive.namelist()
    return version


def imports_on(python: str, wheel: Path, folder: Path) -> str:
    """Unpack ``wheel`` into ``folder`` and import numpy from there with the real ``python``: its version."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    done = subprocess.run([python, "-c", "import numpy; assert int(numpy.arange(100).sum()) == 4950; "
                                         "print(numpy.__version__)"],
                          env={"PYTHONPATH": str(folder), "PATH": os.environ.get("PATH", "")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def newest_numpy_here(tmp_path_factory) -> Version:
    """The numpy pip itself picks for the interpreter running the tests (no tags given)."""
    folder = tmp_path_factory.mktemp("native")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--dest", str(folder), "numpy"], check=True, capture_output=True, timeout=300)
    return parse_wheel_filename(next(folder.glob("numpy-*.whl")).name)[1]


@pytest.mark.slow
@pytest.mark.parametrize("py", ["36", "37", "39", "311"])
@pytest.mark.parametrize("arch, libc", [("x86_64", "glibc 2.36"), ("aarch64", "glibc 2.31")])
def test_numpy_wheel_for_glibc_hosts(wheel_cache, newest_numpy_here, tmp_path, py, arch, libc):
    host = facts(FULL[py], arch, libc)
    wheel, why = wheel_cache.for_host("numpy", host)
    assert wheel is not None, why
    version = check_wheel(wheel, host)
    if py in LAST_NUMPY:
        assert str(version) == LAST_NUMPY[py]
    elif sys.version_info[:2] == (3, 11):
        assert version == newest_numpy_here  # what pip picks for the 3.11 running this test
    else:
        assert version >= Version("2.0")
    if arch == "x86_64" and platform.machine() == "x86_64":
        assert imports_on(interpreter(PYENV[py]), wheel, tmp_path / "lib") == str(version)


@pytest.mark.slow
@pytest.mark.parametrize("py", ["36", "37", "39", "311"])
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_numpy_wheel_for_musl_hosts(wheel_cache, py, arch):
    """numpy has musllinux wheels from 3.9 on; a 3.6 or 3.7 on musl gets none, and is told so."""
    host = facts(FULL[py], arch, "musl 1.2.4")
    wheel, why = wheel_cache.for_host("numpy", host)
    if py in ("36", "37"):
        assert wheel is None and why == f"no numpy wheel for cp{py} {arch} musl"
        return
    assert wheel is not None, why
    assert "musllinux_1_" in wheel.name
    version = check_wheel(wheel, host)
    assert str(version) == LAST_NUMPY.get(py, str(version)) and version >= Version("2.0")


@pytest.mark.slow
def test_old_glibc_gets_the_newest_numpy_built_for_it(wheel_cache, newest_numpy_here):
    """glibc 2.17 (CentOS 7): numpy's newest wheels need 2.28, so pip goes back to the last manylinux2014 one."""
    host = facts(FULL["311"], "x86_64", "glibc 2.17")
    wheel, why = wheel_cache.for_host("numpy", host)
    assert wheel is not None, why
    version = check_wheel(wheel, host)
    assert "manylinux2014_x86_64" in wheel.name or "manylinux_2_17_x86_64" in wheel.name
    assert Version("1.23") <= version <= newest_numpy_here


@pytest.mark.slow
def test_no_wheel_reasons(wheel_cache, tmp_path):
    """A 32-bit Pi and a Pi Zero get a one-line reason; nothing is left in the cache."""
    armv7, why7 = wheel_cache.for_host("numpy", facts("3.7.3", "armv7l", "glibc 2.28"))
    assert armv7 is None and why7 == "no numpy wheel for cp37 armv7l"
    armv6, why6 = wheel_cache.for_host("numpy", facts("3.7.3", "armv6l", "glibc 2.28"))
    assert armv6 is None and why6 == "no numpy wheel for cp37 armv6l"
    pypy, whyp = wheel_cache.for_host("numpy", facts("3.9.18", implementation="PyPy"))
    assert pypy is None and whyp == "no numpy wheel for PyPy x86_64"
    assert not list(wheel_cache.folder.glob("*/.download-*"))


@pytest.mark.slow
def test_download_once_then_from_cache(tmp_path):
    """A second WheelCache on the same folder (another `fab setup`) finds the wheel without pip."""
    first = WheelCache(tmp_path / "w", timeout=300)
    host = facts(FULL["36"], "x86_64", "glibc 2.36")
    wheel, _ = first.for_host("numpy", host)
    assert wheel is not None and wheel.parent.name == "cp36m-manylinux_2_36_x86_64"
    second = WheelCache(tmp_path / "w", timeout=0.001)  # any pip run would time out
    assert second.for_host("numpy", host) == (wheel, "")


def test_hostile_facts_never_reach_pip_or_the_table(tmp_path):
    """Facts are the host's words: nothing of them but known arch names and digits goes to pip."""
    cache = WheelCache(tmp_path / "w", timeout=0.001)  # a pip run would time out and say so
    for host in (facts("3.6.15", "x86_64 --index-url http://127.0.0.1:9/"),
                 facts("3.6.15", "x86_64", "glibc 2.36 --pre"),
                 facts("3.x; touch /tmp/x", "x86_64"),
                 facts("3.6.15", "\x1b]0;title\x07", "musl 1.2")):
        wheel, why = cache.for_host("numpy", host)
        assert wheel is None and why.startswith("no numpy wheel for ") and "took over" not in why
        assert why.isprintable() and len(why) < 80
    assert not (tmp_path / "w").exists()
