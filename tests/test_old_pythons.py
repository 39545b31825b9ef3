"""Hosts whose ``python`` is a real CPython 3.6 and 3.7 (pyenv's), over real sshd (issue 11).

h1 runs Python 3.6, h2 Python 3.7. ``fab setup`` runs with each host's Python inside a
network namespace of its own (``unshare --net``: no network at all, not even loopback),
so numpy can only get there the way it is meant to: the coordinator downloads the wheel
for cp36m/cp37m and ships it over SSH. Then primes (list and count) are checked exactly
against the primesieve CLI, a scrape goes through the local test web server, and the
fault paths run on those interpreters: a host killed mid-run, and a run cancelled with
Ctrl-C. Under CI a missing interpreter fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import SshCluster, agent_pids, fab_argv, fab_env, in_ci, require_sshd, run_fab
from harness.hostile import assert_blocks_tile, count_of
from harness.sshd import pyenv_python
from harness.web import WebServer

pytestmark = pytest.mark.slow
VERSIONS = {"h1": "3.6", "h2": "3.7"}
NUMPY = {"h1": "1.19.5", "h2": "1.21.6"}  # the last numpy releases for cp36 / cp37
FAST_ENGINES = ("primesieve", "numpy")


def _fail_or_skip(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def pi(start, end) -> int:
    """Primes in [start, end] from the primesieve CLI (tests/system-deps.sh installs it)."""
    if shutil.which("primesieve") is None:
        _fail_or_skip("needs the primesieve command (tests/system-deps.sh)")
    done = subprocess.run(["primesieve", str(start), str(end), "--count", "--quiet"],
                          capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


def rows(stdout: str) -> dict:
    """Cells of a tabulate table by host and column name (columns cut where the rule of dashes says)."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans, at = [], 0
    for dashes in lines[rule].split("  "):
        if dashes.strip():
            begin = lines[rule].index(dashes.strip(), at)
            spans.append((begin, begin + len(dashes.strip())))
            at = spans[-1][1]
    def cut(line):
        return [line[begin:end + 2].strip() for begin, end in spans]
    header = cut(lines[rule - 1])
    table = {}
    for line in lines[rule + 1:]:
        cells = cut(line)
        if cells[0] in VERSIONS:
            table[cells[0]] = dict(zip(header, cells))
    return table


def cell(table: dict, host: str, column: str) -> str:
    return table[host][column]


def blocks_by_host(db: Path) -> dict:
    if not db.exists():
        return {}
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            return dict(conn.execute("SELECT host, count(*) FROM blocks GROUP BY host").fetchall())
    except sqlite3.Error:
        return {}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)
    return value


@dataclass
class OldHosts:
    cluster: SshCluster
    inventory: Path  # the plain interpreters
    config: Path
    setup: subprocess.CompletedProcess  # `fab setup` with no network on the hosts
    pythons: dict


@pytest.fixture(scope="module")
def old_hosts(tmp_path_factory) -> OldHosts:
    require_sshd()
    pythons = {}
    for name, version in VERSIONS.items():
        found = pyenv_python(version)
        if found is None:
            _fail_or_skip(f"no pyenv CPython {version} on this machine (pyenv install {version})")
        pythons[name] = str(found)
    if shutil.which("unshare") is None:
        _fail_or_skip("needs unshare (util-linux) to take the network away from the test hosts")
    base = tmp_path_factory.mktemp("oldpy")
    offline = {}
    for name, python in pythons.items():
        wrapper = base / f"offline-{name}"
        wrapper.write_text(f'#!/bin/sh\nexec unshare --net -- {python} "$@"\n')
        wrapper.chmod(0o755)
        offline[name] = wrapper
    with SshCluster(base / "cluster", 2, pythons=offline) as cluster:
        config = cluster.write_fabric_config(base / "fabric.yaml")
        setup = run_fab(["setup", "--inventory", cluster.write_inventory(base / "offline.ini")], config=config,
                        timeout=600)
        cluster.pythons = dict(pythons)
        yield OldHosts(cluster, cluster.write_inventory(base / "hosts.ini"), config, setup, pythons)


@pytest.fixture
def hosts(old_hosts) -> OldHosts:
    """The two hosts, running, with no agent left over from an earlier test."""
    old_hosts.cluster.ensure_running()
    wait_for(lambda: not any(agent_pids(str(h.workdir)) for h in old_hosts.cluster), 30, "old agents to exit")
    yield old_hosts
    old_hosts.cluster.ensure_running()


def test_the_hosts_python_has_no_network(hosts):
    """The wrapper used for `fab setup` really cuts the host's Python off (even from loopback)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        wrapper = hosts.inventory.parent / "offline-h1"
        cut = subprocess.run([str(wrapper), "-c", probe], capture_output=True, text=True, timeout=60)
        assert cut.returncode != 0 and "Network is unreachable" in cut.stderr
        assert subprocess.run([hosts.pythons["h1"], "-c", probe], timeout=60).returncode == 0


def test_setup_ships_numpy_to_offline_old_pythons(hosts):
    done = hosts.setup
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    for name, version in VERSIONS.items():
        assert cell(table, name, "python").startswith(version + ".")
        assert "numpy (new)" in cell(table, name, "packages")
        assert cell(table, name, "engine") in FAST_ENGINES, done.stdout
        lib = hosts.cluster[name].workdir / "lib"
        check = subprocess.run([hosts.pythons[name], "-c", "import numpy; print(numpy.__version__)"],
                               env={"PYTHONPATH": str(lib)}, capture_output=True, text=True, timeout=120)
        assert check.stdout.strip() == NUMPY[name], check.stderr
    again = run_fab(["setup", "--inventory", hosts.inventory], config=hosts.config, timeout=300)
    assert again.returncode == 0 and "nothing uploaded: every host was up to date" in again.stdout
    assert all(cell(rows(again.stdout), name, "engine") in FAST_ENGINES for name in VERSIONS)


def test_hosts_table(hosts):
    done = run_fab(["hosts", "--inventory", hosts.inventory], config=hosts.config)
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    for name, version in VERSIONS.items():
        assert cell(table, name, "reachable") == "yes" and cell(table, name, "bundle") == "fresh"
        assert cell(table, name, "python").startswith(version + ".")
        assert cell(table, name, "engine") in FAST_ENGINES
    assert "pure-Python sieve" not in done.stdout


def test_hosts_table_says_which_host_runs_pure_python(hosts, tmp_path):
    """A host with no numpy and no libprimesieve shows ``python`` and the summary says what to install.

    h2's workdir is a fresh one (setup --no-numpy: no numpy there) and its python runs
    with BEOWULF_PRIMES_ENGINE=python (libprimesieve is on this machine): the probe says
    what the client picks, as the client does (client/primes.py).
    """
    extra = {"h2": {"workdir": tmp_path / "bare"}}
    wrapper = tmp_path / "no-libs-h2"
    wrapper.write_text(f'#!/bin/sh\nBEOWULF_PRIMES_ENGINE=python exec {hosts.pythons["h2"]} "$@"\n')
    wrapper.chmod(0o755)
    extra["h2"]["python"] = wrapper
    inventory = hosts.cluster.write_inventory(tmp_path / "bare.ini", extra=extra)
    setup = run_fab(["setup", "--inventory", inventory, "--hosts", "h2", "--no-numpy"], config=hosts.config,
                    timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    done = run_fab(["hosts", "--inventory", inventory], config=hosts.config)
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert cell(table, "h1", "engine") in FAST_ENGINES and cell(table, "h2", "engine") == "python", done.stdout
    hint = [line for line in done.stdout.splitlines() if "pure-Python sieve" in line]
    assert len(hint) == 1 and hint[0].startswith("h2:") and "fab setup --system-packages" in hint[0]


def test_primes_list_and_count_exact(hosts, tmp_path):
    """Each old host alone lists 1..1e7 (exported, byte for byte primesieve's); both count 1e9..4e9."""
    reference = subprocess.run(["primesieve", "1e7", "--print"], capture_output=True, timeout=120, check=True)
    for name in VERSIONS:
        exported = tmp_path / f"primes-{name}.txt"
        listed = run_fab(["primes", "--inventory", hosts.inventory, "--hosts", name, "--start", 1, "--end", "1e7",
                          "--db", tmp_path / f"list-{name}.db", "--block-seconds", "0.05", "--export", exported],
                         config=hosts.config)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert count_of(listed.stdout) == pi(1, 10**7)
        assert exported.read_bytes().split() == reference.stdout.split()
        assert cell(rows(listed.stdout), name, "engine") in FAST_ENGINES
        stats = run_fab(["stats", "--db", tmp_path / f"list-{name}.db", "--last"], config=hosts.config)
        assert stats.returncode == 0, stats.stdout + stats.stderr
        assert cell(rows(stats.stdout), name, "engine") in FAST_ENGINES, stats.stdout
    counted = run_fab(["primes", "--inventory", hosts.inventory, "--start", "1e9", "--end", "4e9",
                       "--db", tmp_path / "count.db", "--count-only", "--block-seconds", "0.3"],
                      config=hosts.config, timeout=300)
    assert counted.returncode == 0, counted.stdout + counted.stderr
    assert count_of(counted.stdout) == pi(10**9, 4 * 10**9)
    assert_blocks_tile(tmp_path / "count.db", 10**9, 4 * 10**9)
    table = rows(counted.stdout)
    assert {cell(table, name, "engine") for name in VERSIONS if name in table} <= set(FAST_ENGINES)


def test_scrape_through_the_local_web_server(hosts, tmp_path):
    with WebServer() as web:
        for name in VERSIONS:
            urls = tmp_path / f"urls-{name}.txt"
            urls.write_text("".join(web.url(f"/page/{i}") + "\n" for i in range(5)))
            db = tmp_path / f"{name}.db"
            done = run_fab(["scrape", "--inventory", hosts.inventory, "--hosts", name, "--urls", urls, "--db", db,
                            "--delay", "0"], config=hosts.config, timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
            with Store(db) as store:
                run_id = store.runs()[-1]["id"]
                pages = [record for record, _ in iter_pages(store, run_id)]
            assert len(pages) == 5 and all(p["status"] == 200 and p["host"] == name for p in pages)
            assert {p["title"] for p in pages} == {f"Page {i}" for i in range(5)}


def start_primes(hosts: OldHosts, db: Path, end: str) -> subprocess.Popen:
    argv = fab_argv(["primes", "--inventory", hosts.inventory, "--start", 1, "--end", end, "--db", db,
                     "--count-only", "--block-seconds", "0.3"], config=hosts.config)
    return subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_host_killed_mid_run_blocks_redone(hosts, tmp_path):
    """The Python 3.6 host drops off (sshd and every session SIGKILLed): its blocks are redone, the count exact."""
    db = tmp_path / "r.db"
    child = start_primes(hosts, db, "1e10")
    try:
        wait_for(lambda: all(blocks_by_host(db).get(name, 0) >= 2 for name in VERSIONS), 120,
                 "both hosts to commit blocks")
        hosts.cluster["h1"].kill()
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, out + err
    assert count_of(out) == pi(1, 10**10)
    assert_blocks_tile(db, 1, 10**10)
    assert "h1" in err  # the loss is reported
    assert agent_pids(str(hosts.cluster["h1"].workdir)) == []


def test_ctrl_c_cancels_then_resume_is_exact(hosts, tmp_path):
    db = tmp_path / "r.db"
    child = start_primes(hosts, db, "1e10")
    try:
        wait_for(lambda: all(blocks_by_host(db).get(name, 0) >= 1 for name in VERSIONS), 120,
                 "both hosts to commit blocks")
        assert all(agent_pids(str(h.workdir)) for h in hosts.cluster)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, out + err
    assert "run the same command again to resume" in err
    # The agents on 3.6 and 3.7 see the coordinator go, cancel their work and exit with their workers.
    wait_for(lambda: not any(agent_pids(str(h.workdir)) for h in hosts.cluster), 15, "agents to exit")
    done_before = sum(blocks_by_host(db).values())
    resumed = run_fab(["primes", "--inventory", hosts.inventory, "--start", 1, "--end", "1e10", "--db", db,
                       "--count-only", "--block-seconds", "0.3"], config=hosts.config, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert count_of(resumed.stdout) == pi(1, 10**10)
    assert len(assert_blocks_tile(db, 1, 10**10)) > done_before > 0


def test_setup_says_why_a_host_runs_pure_python(hosts, tmp_path):
    """The engine column names the reason: no wheel at all, or a wheel that does not import.

    ``setarch i686`` makes the host's Python see a 32-bit machine (as a 32-bit Pi OS on a
    64-bit kernel does the other way round): PyPI has no numpy for cp313 i686, and the
    i686 numpy 1.19.5 that does exist for cp36 cannot load into a 64-bit Python.
    """
    if shutil.which("setarch") is None:
        _fail_or_skip("needs setarch (util-linux)")
    python313 = pyenv_python("3.13")
    if python313 is None:
        _fail_or_skip("no pyenv CPython 3.13 on this machine (pyenv install 3.13)")
    extra, setarch = {}, shutil.which("setarch")
    for name, python in (("h1", hosts.pythons["h1"]), ("h2", python313)):
        wrapper = tmp_path / f"i686-{name}"
        # libprimesieve hidden too (it would make the engine primesieve, numpy or not): in a
        # mount namespace of its own ldconfig finds nothing, and no gcc/ld on the PATH.
        wrapper.write_text(f"#!/bin/sh\nexec unshare --mount sh -c 'mount --bind /bin/false /sbin/ldconfig && "
                           f"PATH=/nonexistent exec {setarch} i686 {python} \"$@\"' sh \"$@\"\n")
        wrapper.chmod(0o755)
        extra[name] = {"python": wrapper, "workdir": tmp_path / f"work-{name}"}
    inventory = hosts.cluster.write_inventory(tmp_path / "i686.ini", extra=extra)
    done = run_fab(["setup", "--inventory", inventory], config=hosts.config, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert cell(table, "h1", "arch") == "i686" and "numpy (new)" in cell(table, "h1", "packages")
    assert cell(table, "h1", "engine") == "python: numpy does not import on this host"
    assert cell(table, "h2", "engine") == "python: no numpy wheel for cp313 i686"
    assert "no numpy" in cell(table, "h2", "packages")
    hint = [line for line in done.stdout.splitlines() if "pure-Python sieve" in line]
    assert len(hint) == 1 and hint[0].startswith("h1, h2:") and "fab setup --system-packages" in hint[0]


# Blocks for the payload comparison: the start, the first gap >= 128 (132 after 1357201) and
# one >= 256 (282 after 436273009) inside, 1e9 and near the top.
PAYLOAD_BLOCKS = [(0, 10**6), (1_357_000, 1_358_000), (436_273_000, 436_274_000),
                  (10**9, 10**9 + 2 * 10**6), (10**12, 10**12 + 10**6),
                  (10**15 - 10**6, 10**15)]


def test_list_payload_without_numpy_is_the_numpy_engines(tmp_path):
    """On a real CPython 3.6 with no numpy, list mode runs on libprimesieve with the stdlib
    encoder, and each block's result (data, checksum, count, first, last) is byte for byte
    the numpy engine's here."""
    import json

    from client import primes

    if "numpy" not in primes.AVAILABLE:
        _fail_or_skip("numpy is not importable in the test environment")
    if "primesieve" not in primes.AVAILABLE:
        _fail_or_skip("needs libprimesieve (tests/system-deps.sh)")
    python = pyenv_python("3.6")
    if python is None:
        _fail_or_skip("no pyenv CPython 3.6 on this machine (pyenv install 3.6)")
    root = Path(__file__).resolve().parent.parent
    script = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom client import primes\n"
              "assert primes._numpy() is None, 'numpy importable'\n"
              "blocks = json.loads(sys.argv[2])\n"
              "print(json.dumps([primes.ENGINE] + [primes.run({'lo': lo, 'hi': hi, 'mode': 'list'}) "
              "for lo, hi in blocks]))\n")
    done = subprocess.run([str(python), "-I", "-c", script, str(root), json.dumps(PAYLOAD_BLOCKS)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    engine, *results = json.loads(done.stdout)
    assert engine == "primesieve"
    for (lo, hi), got in zip(PAYLOAD_BLOCKS, results):
        want = primes.run({"lo": lo, "hi": hi, "mode": "list"}, engine="numpy")
        assert got.pop("engine") == "primesieve" and want.pop("engine") == "numpy"
        assert got == want, (lo, hi)
    assert len(results) == len(PAYLOAD_BLOCKS)
