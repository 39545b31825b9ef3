"""fab map --requirements: a requirements file read as pip reads it, wheels resolved with their
dependencies once per host platform on the coordinator, shipped by content, imported on the hosts.

No test sends traffic outside 127.0.0.0/8: the wheels are made here (pure-Python, a package
``bwtest-app`` that needs ``bwtest-lib``, the latter in two versions, 2.0 for Python 3.9+ only)
into a folder that pip is pointed at with PIP_NO_INDEX=1 and PIP_FIND_LINKS, with
PIP_CONFIG_FILE=/dev/null so this machine's pip.conf (its indexes) plays no part.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_map_client import agent, items, run_map, ship, workdir  # noqa: F401 (fixtures)

from cluster import mapship
from cluster import requirements as reqs_module
from cluster.errors import UsageError
from cluster.wheels import RequirementWheels, pip_reason
from harness import in_ci
from harness.hostile import provisioned_cluster
from harness.sshd import pyenv_python


def make_wheel(folder: Path, name: str, version: str, modules: dict, requires=(), python_requires=None) -> Path:
    """A pure-Python wheel (py3-none-any) of ``modules`` ({file name: source}) into ``folder``."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {requirement}" for requirement in requires]
    if python_requires:
        metadata.append(f"Requires-Python: {python_requires}")
    files = dict(modules)
    files[f"{info}/METADATA"] = "\n".join(metadata) + "\n"
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: beowulf-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in, text in sorted(files.items()):
            entry = zipfile.ZipInfo(name_in, date_time=(2020, 1, 1, 0, 0, 0))
            archive.writestr(entry, text)
    return path


def make_index(folder: Path) -> Path:
    """bwtest-app 1.0 (needs bwtest-lib>=1.0), bwtest-lib 1.0 and 2.0 (Python >= 3.9), bwtest-shim
    1.0 (needs bwtest-lib on Python < 3.9 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_wheel(folder, "bwtest-app", "1.0",
               {"bwtest_app/__init__.py": "import bwtest_lib\n\ndef versions():\n"
                                          "    return ['app 1.0', bwtest_lib.VERSION]\n"},
               requires=["bwtest-lib>=1.0"])
    make_wheel(folder, "bwtest-lib", "1.0", {"bwtest_lib/__init__.py": "VERSION = 'lib 1.0'\n"})
    make_wheel(folder, "bwtest-lib", "2.0", {"bwtest_lib/__init__.py": "VERSION = 'lib 2.0'\n"},
               python_requires=">=3.9")
    make_wheel(folder, "bwtest-shim", "1.0", {"bwtest_shim.py": "X = 1\n"},
               requires=['bwtest-lib>=1.0; python_version < "3.9"', 'bwtest-never; python_version < "3"'])
    return folder


def pip_env(index: Path, cache: Path) -> dict:
    """pip pointed at the local folder only; the requirements cache under ``cache``."""
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
            "XDG_CACHE_HOME": str(cache)}


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    index = make_index(tmp_path / "index")
    for name, value in pip_env(index, tmp_path / "cache").items():
        monkeypatch.setenv(name, value)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    return index


def here_facts() -> dict:
    import platform

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    try:
        import probe
    finally:
        sys.path.pop(0)
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "arch": platform.machine(), "system": platform.system(), "libc": probe.libc_name()}


# ---------------------------------------------------------------- the file


def write(folder: Path, text: str) -> str:
    path = folder / "req.txt"
    path.write_text(text)
    return str(path)


def test_a_normal_requirements_file_is_read(tmp_path):
    path = write(tmp_path, "# what f needs\n\nrequests==2.31.0   # pinned\nattrs>=22\nFoo_Bar[Extra,b]\n"
                           "bar; python_version >= \"3.8\"\nold ; python_version < \"3.0\"\n"
                           "long-name \\\n  >=1.0,<2\nattrs>=22\n")
    found = reqs_module.parse(path)
    assert found.lines == ('attrs>=22', 'bar; python_version >= "3.8"', "foo-bar[b,extra]",
                           "long-name<2,>=1.0", 'old; python_version < "3.0"', "requests==2.31.0")
    host = {"python": "3.11.2", "system": "Linux", "arch": "x86_64"}
    assert reqs_module.for_host(found, host) == ("attrs>=22", "bar", "foo-bar[b,extra]", "long-name<2,>=1.0",
                                                 "requests==2.31.0")
    old = dict(host, python="2.7.18")
    assert "old" in reqs_module.for_host(found, old) and "bar" not in reqs_module.for_host(found, old)
    assert reqs_module.parse(write(tmp_path, "attrs >= 22\nrequests==2.31.0\n")).digest == \
        reqs_module.parse(write(tmp_path, "requests == 2.31.0\n# x\nattrs>=22\n")).digest


@pytest.mark.parametrize("line, words", [
    ("-e .", "-e is a pip option"),
    ("-r other.txt", "-r is a pip option"),
    ("-c constraints.txt", "-c is a pip option"),
    ("--index-url https://example.org/simple", "--index-url is a pip option"),
    ("--extra-index-url=https://example.org/simple", "--extra-index-url is a pip option"),
    ("https://example.org/a-1.0-py3-none-any.whl", "URL"),
    ("foo @ https://example.org/foo.zip", "direct reference"),
    ("git+https://example.org/foo.git", "URL"),
    ("./pkg", "a file or a path"),
    ("foo-1.0-py3-none-any.whl", "a file or a path"),
    ("foo ==", "not a requirement"),
    ("bar; no_such_marker == '1'", "not a requirement"),
    ("requests==2.31.0 --hash=sha256:abc", "not a requirement"),
])
def test_pip_only_lines_are_refused_naming_file_and_line(tmp_path, line, words):
    path = write(tmp_path, f"# first\nattrs\n{line}\n")
    with pytest.raises(UsageError) as caught:
        reqs_module.parse(path)
    message = str(caught.value)
    assert message.startswith(f"--requirements {path} line 3: ") and words in message, message
    assert "\n" not in message


def test_unreadable_empty_and_binary_files(tmp_path):
    for text, words in (("# nothing\n\n", "no requirements"), ):
        with pytest.raises(UsageError, match=words):
            reqs_module.parse(write(tmp_path, text))
    with pytest.raises(UsageError, match="No such file"):
        reqs_module.parse(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"attrs\n\xff\xfe\n")
    with pytest.raises(UsageError, match="line 2: not UTF-8"):
        reqs_module.parse(str(tmp_path / "bin.txt"))


def test_pip_reason_is_one_bounded_line():
    stderr = ("INFO: pip is looking at multiple versions\n"
              "ERROR: Ignored the following versions that require a different python version: 2.0 "
              "Requires-Python >=3.9\n"
              "ERROR: Could not find a version that satisfies the requirement bwtest-lib==2.0 (from versions: 1.0)\n"
              "ERROR: No matching distribution found for bwtest-lib==2.0\n")
    reason = pip_reason(stderr, 1)
    assert "\n" not in reason and "Requires-Python >=3.9" in reason and "bwtest-lib==2.0" in reason
    assert len(pip_reason("ERROR: " + "x\x1b" * 1000, 1)) <= 300 and "\x1b" not in pip_reason("ERROR: \x1b[2J", 1)


# ---------------------------------------------------------------- resolving on the coordinator


@pytest.mark.slow
def test_resolve_pulls_dependencies_pins_win_and_once_per_platform(local_index, tmp_path):
    facts = here_facts()
    cache = RequirementWheels(tmp_path / "resolved")
    found, why = cache.resolve(("bwtest-app==1.0", "bwtest-lib==1.0"), facts)
    assert found is not None, why
    assert [name for name, _, _ in found.wheels] == ["bwtest_app-1.0-py3-none-any.whl",
                                                      "bwtest_lib-1.0-py3-none-any.whl"]
    newest, why = cache.resolve(("bwtest-app",), facts)
    assert newest is not None, why
    assert [name for name, _, _ in newest.wheels] == ["bwtest_app-1.0-py3-none-any.whl",
                                                       "bwtest_lib-2.0-py3-none-any.whl"]
    assert cache.downloads == 2
    again = RequirementWheels(tmp_path / "resolved")  # another fab run: the cache on disk
    same, _ = again.resolve(("bwtest-app==1.0", "bwtest-lib==1.0"), facts)
    assert same.digest == found.digest and again.downloads == 0
    # An older Python: bwtest-lib 2.0 wants 3.9+; pip's reason, once for the platform.
    old = dict(facts, python="3.8.18")
    for _ in range(2):
        none, why = again.resolve(("bwtest-lib==2.0",), old)
        assert none is None and "bwtest-lib" in why and ">=3.9" in why, why
    assert again.downloads == 1
    # A host with no wheel platform at all never reaches pip.
    none, why = again.resolve(("bwtest-app",), dict(facts, arch="armv6l"))
    assert none is None and "armv6l" in why and again.downloads == 1
    # A dependency for older Pythons only: pip judges its marker for this computer; the host's
    # Python needs it, so it is asked for again.
    shim, why = again.resolve(("bwtest-shim",), old)
    assert shim is not None, why
    assert [name for name, _, _ in shim.wheels] == ["bwtest_lib-1.0-py3-none-any.whl",
                                                     "bwtest_shim-1.0-py3-none-any.whl"]
    assert again.downloads == 3
    shim, why = again.resolve(("bwtest-shim",), facts)
    assert [name for name, _, _ in shim.wheels] == ["bwtest_shim-1.0-py3-none-any.whl"] and again.downloads == 4
    # A wheel built for this computer's CPython ABI only: another Python finds none.
    version = f"{sys.version_info[0]}{sys.version_info[1]}"
    native = make_wheel(local_index, "bwtest-native", "1.0", {"bwtest_native.py": "X = 1\n"})
    native.rename(local_index / f"bwtest_native-1.0-cp{version}-cp{version}-{platform_tag(facts)}.whl")
    ok, why = again.resolve(("bwtest-native",), facts)
    assert ok is not None, why
    none, why = again.resolve(("bwtest-native",), dict(facts, python="3.8.18"))
    assert none is None and "bwtest-native" in why, why
    none, why = again.resolve(("no-such-project-bwtest",), facts)
    assert none is None and "no-such-project-bwtest" in why, why
    json.loads((tmp_path / "resolved" / found.folder.name / "manifest.json").read_text())
    assert not [p for p in (tmp_path / "resolved").iterdir() if p.name.startswith(".")]


def platform_tag(facts: dict) -> str:
    from cluster.wheels import host_platform_tags

    return host_platform_tags(facts)[-1]


@pytest.fixture
def http_index(tmp_path, monkeypatch):
    """A PEP 503 simple index of make_index's wheels served on 127.0.0.1 (pip's PIP_INDEX_URL)."""
    import functools
    import http.server
    import threading

    wheels = make_index(tmp_path / "served" / "files")
    simple = tmp_path / "served" / "simple"
    for wheel in sorted(wheels.iterdir()):
        project = simple / wheel.name.split("-")[0].replace("_", "-")
        project.mkdir(parents=True, exist_ok=True)
        with open(project / "index.html", "a") as page:
            page.write(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_resolve_through_an_index_on_loopback(http_index, tmp_path, monkeypatch):
    """PIP_INDEX_URL is honoured (pip's own configuration), and is part of the cache key."""
    cache = RequirementWheels(tmp_path / "resolved")
    found, why = cache.resolve(("bwtest-app", "bwtest-lib<2"), here_facts())
    assert found is not None, why
    assert [name for name, _, _ in found.wheels] == ["bwtest_app-1.0-py3-none-any.whl",
                                                      "bwtest_lib-1.0-py3-none-any.whl"]
    key = cache.key(("bwtest-app",), cache.target(here_facts())[0])
    monkeypatch.setenv("PIP_INDEX_URL", os.environ["PIP_INDEX_URL"] + "/")
    assert cache.key(("bwtest-app",), cache.target(here_facts())[0]) != key


# ---------------------------------------------------------------- on the host


def wheel_tar(tmp_path: Path, members: dict) -> bytes:
    """A tar holding one wheel ``x-1.0-py3-none-any.whl`` whose zip holds ``members`` (name -> text)."""
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return mapship.make_tar({wheel.name: (wheel.read_bytes(), False)})


def install(tmp_path: Path, tar: bytes, digest: str = "ab" * 16) -> subprocess.CompletedProcess:
    reqs = tmp_path / "work" / "reqs"
    reqs.mkdir(parents=True, exist_ok=True)
    (reqs / "in.tar").write_bytes(tar)
    return subprocess.run([sys.executable, "-c", mapship._INSTALL_WHEELS, str(reqs), digest, str(reqs / "in.tar"),
                           "tok"], capture_output=True, text=True, timeout=60)


def test_wheels_are_laid_out_as_pip_installs_them(tmp_path):
    done = install(tmp_path, wheel_tar(tmp_path, {
        "x/__init__.py": "A = 1\n", "x-1.0.dist-info/METADATA": "Name: x\n",
        "x-1.0.data/purelib/y.py": "B = 2\n", "x-1.0.data/platlib/z/__init__.py": "",
        "x-1.0.data/scripts/run": "#!/bin/sh\n", "x-1.0.data/data/share/file": "data\n"}))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "work" / "reqs" / ("ab" * 16)
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert found == ["x-1.0.dist-info/METADATA", "x/__init__.py", "y.py", "z/__init__.py"]
    assert sorted(p.name for p in (tmp_path / "work" / "reqs").iterdir()) == ["ab" * 16]  # tar and temp gone


@pytest.mark.parametrize("name", ["../evil.py", "/tmp/evil.py", "x/../../evil.py", "x\\..\\evil.py"])
def test_a_wheel_member_out_of_its_folder_is_refused(tmp_path, name):
    done = install(tmp_path, wheel_tar(tmp_path, {"x/__init__.py": "", name: "pwned = 1\n"}))
    assert done.returncode != 0 and "refused" in done.stderr
    assert sorted(p.name for p in (tmp_path / "work" / "reqs").iterdir()) == []
    assert not list(tmp_path.rglob("evil.py")) and not Path("/tmp/evil.py").exists()


def reqs_folder(work: Path, files: dict) -> str:
    """Put ``files`` in WORKDIR/reqs/HEX as fab map would after unpacking wheels; HEX."""
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:32]
    for name, text in files.items():
        path = work / "reqs" / digest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return digest


def test_a_worker_follows_the_requirements_folder_of_each_task(agent, workdir):  # noqa: F811
    """Tasks naming reqs A, then B, then A again in the same workers: each imports its own
    version (the previous folder's modules forgotten); a command finds them on PYTHONPATH."""
    first = reqs_folder(workdir, {"bwmod/__init__.py": "VALUE = 'a'\n"})
    second = reqs_folder(workdir, {"bwmod/__init__.py": "VALUE = 'b'\n"})
    digest = ship(workdir, {"uses.py": "import bwmod\ndef f(x):\n    return [x, bwmod.VALUE]\n"})
    seen = []
    for number, reqs in enumerate([first, second, first, second, second, first]):
        message = run_map(agent, f"t{number}", mode="function", function="uses:f", ship=digest, reqs=reqs,
                          items=items(number))
        assert message["ok"], message
        seen.append(message["result"]["items"][0]["value"][1])
    assert seen == ["a", "b", "a", "b", "b", "a"]
    command = run_map(agent, "c", mode="command", command="python3 -c 'import bwmod; print(bwmod.VALUE)'",
                      reqs=second, items=items("x"))
    assert command["result"]["items"][0]["stdout"] == "b\n", command
    outside = workdir.parent / "outside"
    (outside / "bwmod").mkdir(parents=True)
    (outside / "bwmod" / "__init__.py").write_text("VALUE = 'pwned'\n")
    (workdir / "reqs" / ("ef" * 16)).symlink_to(outside)
    for bad, error in (("cd" * 16, "no requirements folder"), ("../../etc", "hex digest"),
                       ("ef" * 16, "no requirements folder"), ("/tmp", "hex digest")):
        message = run_map(agent, f"bad{bad[:2]}", mode="function", function="uses:f", ship=digest, reqs=bad,
                          items=items("x"))
        assert not message["ok"] and error in message["error"], message


# ---------------------------------------------------------------- fab map, this computer


def fab_map(run_fab, folder: Path, env: dict, *args, inventory=None, config=None, timeout=300):
    if inventory is None:
        inventory = folder / "local.ini"
        inventory.write_text("[local]\naddress = local\n")
    return run_fab(["map", "--inventory", inventory, "--db", folder / "r.db", *args], cwd=folder, config=config,
                   timeout=timeout, env=env)


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


F = "import bwtest_app\ndef f(x):\n    return [x] + bwtest_app.versions()\n"

# A barrier for the functions of the over-sshd tests: the call marks its host (the shipped
# module's folder lies in that host's workdir) and waits until the number of hosts written in
# the file "want" have marked theirs, so no host can miss a run by connecting late.
BARRIER = """import os, sys, time
SEEN = {seen!r}


def barrier():
    os.makedirs(SEEN, exist_ok=True)
    mark = os.path.dirname(os.path.abspath(__file__)).replace(os.sep, "_")
    open(os.path.join(SEEN, mark), "w").close()
    with open(os.path.join(os.path.dirname(SEEN), "want")) as f:
        want = int(f.read())
    deadline = time.time() + 60
    while len(os.listdir(SEEN)) < want and time.time() < deadline:
        time.sleep(0.05)
"""


def test_local_run_imports_the_pinned_dependency_and_bad_lines_run_nothing(run_fab, tmp_path):
    index = make_index(tmp_path / "index")
    env = pip_env(index, tmp_path / "cache")
    (tmp_path / "f.py").write_text(F)
    (tmp_path / "req.txt").write_text("bwtest-app  # pulls bwtest-lib in\nbwtest-lib==1.0\n")
    done = fab_map(run_fab, tmp_path, env, "--function", "f.py:f", "--range", "1:5", "--requirements", "req.txt",
                   "--export", "v.jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line["value"] for line in jsonl(tmp_path / "v.jsonl")] == [[x, "app 1.0", "lib 1.0"] for x in range(1, 6)]
    # A command finds them too (PYTHONPATH).
    done = fab_map(run_fab, tmp_path, env, "--command", "python3 -c 'import bwtest_lib; print(bwtest_lib.VERSION)'",
                   "--range", "1:2", "--requirements", "req.txt", "--export", "c.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "c.txt").read_text() == "lib 1.0\nlib 1.0\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "f.py").write_text(F)
    (other / "bad.txt").write_text("bwtest-app\n--index-url http://127.0.0.1:9/simple\n")
    bad = fab_map(run_fab, other, env, "--function", "f.py:f", "--range", "1:5", "--requirements", "bad.txt")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --requirements bad.txt line 2: --index-url is a pip option, not a requirement: fab map takes "
        "requirements only (set the index with PIP_INDEX_URL, PIP_FIND_LINKS or pip.conf)"], bad.stderr
    assert not (other / "r.db").exists()


# ---------------------------------------------------------------- fab map over real sshd hosts


def _old_python() -> Path:
    python = pyenv_python("3.8")
    if python is None:
        if in_ci():
            pytest.fail("needs pyenv's CPython 3.8 for a host with an older Python")
        pytest.skip("needs pyenv's CPython 3.8 for a host with an older Python")
    return python


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    yield from provisioned_cluster(tmp_path_factory, "mapreqs", 3)


def uploads(log: Path) -> list:
    """The "--requirements: N wheels uploaded" lines of beowulf.log."""
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if "--requirements:" in line and " uploaded (" in line]


@pytest.mark.slow
def test_over_sshd_pins_dependencies_old_python_left_out_and_second_run_uploads_nothing(cluster3, run_fab, tmp_path):
    """h3 runs Python 3.8; h1 and h3 have no network. A pin (bwtest-lib==1.0) wins over the newer
    2.0 on the find-links and the dependency comes with bwtest-app; then bwtest-lib>=2 (Python
    3.9+) leaves h3 out with pip's reason while h1 and h2 do every item; the same requirements
    again upload nothing and ask pip nothing for h1 and h2."""
    cluster, config = cluster3
    old = _old_python()
    if shutil.which("unshare") is None:
        if in_ci():
            pytest.fail("needs unshare (util-linux) to take the network away from the test hosts")
        pytest.skip("needs unshare (util-linux) to take the network away from the test hosts")
    # h1 and h3 run their Python in a network namespace of their own (no network at all, not even
    # loopback): the wheels can only reach them through fab map.
    offline = {}
    for name, python in (("h1", "python3"), ("h3", str(old))):
        wrapper = tmp_path / f"offline-{name}"
        wrapper.write_text(f'#!/bin/sh\nexec unshare --net -- {python} "$@"\n')
        wrapper.chmod(0o755)
        offline[name] = {"python": wrapper}
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra=offline)
    index = make_index(tmp_path / "index")
    env = pip_env(index, tmp_path / "cache")
    # Every host that can run the function must join before the run may end (a fast run once ended
    # before h1 had connected, so h1 never installed its wheels): each call marks its host's
    # workdir and waits, up to a minute, until WANT hosts have marked theirs.
    body = F.replace("return [x]", "barrier()\n    return [x, sys.version_info[1]]")
    (tmp_path / "f.py").write_text(BARRIER.format(seen=str(tmp_path / "seen")) + body)
    (tmp_path / "want").write_text("3")
    (tmp_path / "pinned.txt").write_text("bwtest-app\nbwtest-lib==1.0\n")
    done = fab_map(run_fab, tmp_path, env, "--function", "f.py:f", "--range", "1:60", "--requirements", "pinned.txt",
                   "--export", "a.jsonl", "--block-seconds", "0.2", inventory=inventory, config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    values = [line["value"] for line in jsonl(tmp_path / "a.jsonl")]
    assert [v[0] for v in values] == list(range(1, 61))
    assert {tuple(v[2:]) for v in values} == {("app 1.0", "lib 1.0")}
    log = tmp_path / "beowulf.log"
    assert len(uploads(log)) == 3 and log.read_text().count("with pip download") == 2, uploads(log)
    for name in ("h1", "h2", "h3"):
        folders = list((Path(cluster[name].workdir) / "reqs").iterdir())
        assert [f.name for f in folders if not f.name.startswith(".")], name
        assert (folders[0] / "bwtest_lib" / "__init__.py").read_text() == "VERSION = 'lib 1.0'\n"

    (tmp_path / "newest.txt").write_text("bwtest-app\nbwtest-lib>=2\n")
    log.write_text("")
    (tmp_path / "want").write_text("2")  # h3 is left out: h1 and h2
    shutil.rmtree(tmp_path / "seen")
    done = fab_map(run_fab, tmp_path, env, "--function", "f.py:f", "--range", "1:60", "--requirements", "newest.txt",
                   "--export", "b.jsonl", "--joblog", "b.joblog", "--block-seconds", "0.2", inventory=inventory,
                   config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "h3: --requirements" in out and "bwtest-lib" in out and ">=3.9" in out, out
    values = [line["value"] for line in jsonl(tmp_path / "b.jsonl")]
    assert [v[0] for v in values] == list(range(1, 61)) and {tuple(v[2:]) for v in values} == {("app 1.0", "lib 2.0")}
    lines = (tmp_path / "b.joblog").read_text().splitlines()
    hosts = {line.split("\t")[1] for line in lines[1:]}
    assert lines[0].startswith("Seq\tHost\t") and hosts and "h3" not in hosts, hosts
    # Once per platform: cp311 for h1 and h2 together, cp38 for h3.
    assert len(uploads(log)) == 2 and log.read_text().count("with pip download") == 2

    log.write_text("")
    shutil.rmtree(tmp_path / "seen")
    again = fab_map(run_fab, tmp_path, env, "--function", "f.py:f", "--range", "1:60", "--requirements", "newest.txt",
                    "--fresh", inventory=inventory, config=config)
    assert again.returncode == 0, again.stdout + again.stderr
    text = log.read_text()
    # The wheels for h1 and h2 come from the cache; only h3's failed resolve is asked again (the
    # index may have gained a wheel since).
    assert uploads(log) == [] and text.count("nothing uploaded") == 2, text
    assert text.count("with pip download") == 1 and "for cp38 " in text, text
