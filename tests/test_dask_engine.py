"""--engine dask end to end on real Dask processes (README, "Engines").

A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (tests/harness/dask.py),
with different thread counts and one worker slowed; workers get nothing of beowulf on their
path. The quick tests need no cluster of their own (flags, no Dask, an unreachable scheduler,
the embedded LocalCluster).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.engines.dask import check_address, worker_name
from cluster.errors import UsageError
from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import fab_argv, fab_env
from harness.dask import DaskCluster, wait_until
from harness.hostile import assert_blocks_tile, count_of
from harness.web import WebServer

PI_1E7, PI_1E8 = 664_579, 5_761_455
# The runs that are killed or lose hosts count [1, 3e10] (`primesieve 3e10 -c`: 1,300,005,926): long
# enough to be interrupted after a few blocks of 0.5 s, short enough for the suite.
END, PI_END = 3 * 10**10, 1_300_005_926


def primes(run_fab, db, start, end, *extra, timeout=300, env=None, cwd=None):
    return run_fab(["primes", "--start", start, "--end", end, "--db", db, *extra], timeout=timeout, env=env,
                   cwd=cwd)


def local_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "local.ini"
    path.write_text("[this computer]\naddress = local\n")
    return path


def start_fab(args, log: Path) -> subprocess.Popen:
    """``fab ARGS`` in the background, in its own session (killed by its PID), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(fab_argv(args), env=fab_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def blocks_by_host(db: Path) -> dict:
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        found: dict = {}
        for block in store.blocks(run_id):
            found[block["host"]] = found.get(block["host"], 0) + 1
        return found


def committed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from blocks").fetchone()[0]
    except sqlite3.Error:
        return 0


def events(db: Path, kind: str) -> list:
    with sqlite3.connect(db) as conn:
        return conn.execute("select host, detail from events where kind = ?", (kind,)).fetchall()


@pytest.fixture
def dask_cluster(tmp_path_factory):
    """A scheduler and three workers: w1 (1 thread), w2 (2 threads), w3 (1 thread, slowed)."""
    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        cluster.add_worker("w1", threads=1, wait=False)
        cluster.add_worker("w2", threads=2, wait=False)
        cluster.add_worker("w3", threads=1, wait=False)
        for name in ("w1", "w2", "w3"):
            cluster.wait_for(name)
        cluster.workers["w3"].slow_down(running=0.3)
        yield cluster


# ---------------------------------------------------------------- quick: flags, no Dask, no scheduler


def test_addresses_and_names():
    assert check_address("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert check_address(" tls://sched.example:8786 ") == "tls://sched.example:8786"
    assert check_address("127.0.0.1:8786") == "127.0.0.1:8786"
    for bad in ("", "foo bar", "tcp://host", "http://x:1", "x:1;rm -rf /", "tcp://a:1\nb:2"):
        with pytest.raises(UsageError):
            check_address(bad)
    assert worker_name(0, "tcp://127.0.0.1:1") == "dask-0"
    assert worker_name(None, "tcp://127.0.0.1:1") == "127.0.0.1:1"
    assert worker_name("tcp://127.0.0.1:1", "tcp://127.0.0.1:1") == "127.0.0.1:1"
    assert worker_name("w\x1b[31m1\n", "tcp://x:1") == "w_[31m1_"
    assert len(worker_name("x" * 500, "tcp://x:1")) == 60


@pytest.mark.slow
def test_usage_errors_exit_2_in_one_line(run_fab, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/\n")
    cases = [
        (["primes", "--start", 1, "--end", 10, "--engine", "spark"], "--engine: expected ssh or dask"),
        (["primes", "--start", 1, "--end", 10, "--engine", "dask", "--scheduler", "not an address"], "--scheduler"),
        (["primes", "--start", 1, "--end", 10, "--scheduler", "tcp://127.0.0.1:8786"], "--engine dask"),
        (["primes", "--start", 1, "--end", 10, "--engine", "dask", "--hosts", "h1"], "--hosts"),
        (["scrape", "--urls", urls, "--engine", "dask", "--tor"], "--tor is not available with --engine dask"),
    ]
    for args, words in cases:
        done = run_fab([*args, "--db", tmp_path / "r.db"] if args[0] == "primes" else args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, done.stderr)
    assert not (tmp_path / "r.db").exists()


def test_without_dask_one_line_says_how_to_install(run_fab, tmp_path):
    blocker = tmp_path / "no-dask"
    (blocker / "distributed").mkdir(parents=True)
    (blocker / "distributed" / "__init__.py").write_text("raise ImportError('no distributed here')\n")
    done = primes(run_fab, tmp_path / "r.db", 1, 100, "--engine", "dask", env={"PYTHONPATH": str(blocker)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: --engine dask needs dask[distributed], which is not installed: "
        "pip install -r requirements-dask.txt"]


def test_scheduler_unreachable_at_start(run_fab, tmp_path):
    from harness import free_port

    address = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    done = primes(run_fab, tmp_path / "r.db", 1, 100, "--engine", "dask", "--scheduler", address, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: cannot reach the Dask scheduler at {address}: Connection refused"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_embedded_local_cluster_is_the_default(run_fab, tmp_path):
    db = tmp_path / "r.db"
    done = primes(run_fab, db, 1, 1e7, "--engine", "dask", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI_1E7
    assert_blocks_tile(db, 1, 10**7)
    assert all(name.startswith("dask-") for name in blocks_by_host(db))
    # fabric.yaml's beowulf.engine picks it too; the run is the same one (already complete).
    config = tmp_path / "fabric.yaml"
    config.write_text("beowulf:\n  engine: dask\n")
    again = run_fab(["primes", "--start", 1, "--end", 1e7, "--db", db], config=config, cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr


# ---------------------------------------------------------------- slow: a real scheduler and workers


@pytest.mark.slow
def test_primes_1e8_exact_over_workers(run_fab, tmp_path, dask_cluster):
    db, out = tmp_path / "r.db", tmp_path / "p.txt"
    done = primes(run_fab, db, 1, 1e8, "--engine", "dask", "--scheduler", dask_cluster.address,
                  "--export", out, "--block-seconds", "0.5")
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI_1E8
    sieve = np.ones(10**8 + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, 10**4 + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    exported = np.array(out.read_bytes().split(), dtype=np.int64)
    assert np.array_equal(exported, np.flatnonzero(sieve))
    assert_blocks_tile(db, 1, 10**8)
    # Every worker is a host: in the summary table and the store under its Dask name.
    by_host = blocks_by_host(db)
    assert set(by_host) <= {"w1", "w2", "w3"} and {"w1", "w2"} <= set(by_host), by_host
    table = done.stdout.split("\n")
    assert any(line.split()[:3] == ["w2", "up", "2"] for line in table), done.stdout
    stats = run_fab(["stats", "--db", db, "--last", "--format", "json"])
    assert stats.returncode == 0 and '"w2"' in stats.stdout, stats.stderr
    hosts = run_fab(["hosts", "--engine", "dask", "--scheduler", dask_cluster.address])
    assert hosts.returncode == 0, hosts.stderr
    for name, threads in (("w1", "1"), ("w2", "2"), ("w3", "1")):
        row = next(line.split() for line in hosts.stdout.splitlines() if line.startswith(name + " "))
        assert row[2] == threads and "yes" in row, hosts.stdout
    assert "3 of 3 workers" in hosts.stdout


@pytest.mark.slow
def test_scrape_politeness_at_the_server(run_fab, tmp_path, dask_cluster):
    with WebServer(robots="User-agent: *\nDisallow: /private\n") as web:
        urls = [web.url(f"/page/{i}") for i in range(10)] + [web.url("/private/x")]
        path = tmp_path / "urls.txt"
        path.write_text("\n".join(urls) + "\n")
        db = tmp_path / "r.db"
        done = run_fab(["scrape", "--urls", path, "--db", db, "--delay", "0.4", "--engine", "dask",
                        "--scheduler", dask_cluster.address], timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        starts = sorted(r.time for r in web.requests if r.path.startswith("/page/"))
        assert len(starts) == 10  # each page fetched once
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= 0.4, gaps
        assert "/private/x" not in [r.path for r in web.requests]
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        pages = [record for record, _ in iter_pages(store, run_id)]
    assert len(pages) == 11 and {p["status"] for p in pages if "/page/" in p["url"]} == {200}


@pytest.mark.slow
def test_worker_killed_and_worker_added_mid_run(tmp_path, dask_cluster):
    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    args = ["primes", "--start", 1, "--end", END, "--count-only", "--db", db, "--block-seconds", "0.5",
            "--engine", "dask", "--scheduler", dask_cluster.address]
    proc = start_fab(args, log)
    try:
        wait_until(lambda: blocks_by_host(db).get("w2", 0) >= 2 if committed(db) else False, proc=proc, log=log)
        dask_cluster.workers["w2"].kill(signal.SIGKILL)
        dask_cluster.add_worker("w4", threads=1)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert count_of(output) == PI_END, output[-3000:]
    assert_blocks_tile(db, 1, END)
    assert blocks_by_host(db).get("w4", 0) >= 1, blocks_by_host(db)
    assert [host for host, _ in events(db, "lost")].count("w2") >= 1, events(db, "lost")
    assert any(line.split()[:2] == ["w2", "lost"] for line in output.splitlines()), output[-3000:]


@pytest.mark.slow
def test_coordinator_killed_then_resumed_on_dask_then_on_ssh(run_fab, tmp_path, dask_cluster):
    db = tmp_path / "r.db"
    args = ["primes", "--start", 1, "--end", END, "--count-only", "--db", db, "--block-seconds", "0.5"]
    on_dask = [*args, "--engine", "dask", "--scheduler", dask_cluster.address]
    seen = 0
    for attempt in range(2):  # killed twice on the Dask engine, a little further each time
        log = tmp_path / f"fab{attempt}.log"
        proc = start_fab(on_dask, log)
        target = seen + 3
        wait_until(lambda target=target: committed(db) >= target, proc=proc, log=log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert committed(db) >= target
        seen = committed(db)
    with Store(db) as store:
        runs = store.runs()
    assert len(runs) == 1  # the same run both times
    done = run_fab([*args, "--inventory", local_inventory(tmp_path)], timeout=600)
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI_END
    with Store(db) as store:
        assert len(store.runs()) == 1  # the engine is not part of the run's identity
    blocks = assert_blocks_tile(db, 1, END)
    hosts = {block["host"] for block in blocks}
    assert "this computer" in hosts and hosts & {"w1", "w2", "w3"}, hosts


@pytest.mark.slow
def test_scheduler_dies_mid_run_then_resume(run_fab, tmp_path, tmp_path_factory, dask_cluster):
    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    args = ["primes", "--start", 1, "--end", END, "--count-only", "--db", db, "--block-seconds", "0.5"]
    proc = start_fab([*args, "--engine", "dask", "--scheduler", dask_cluster.address], log)
    try:
        wait_until(lambda: committed(db) >= 3, proc=proc, log=log)
        dask_cluster.kill_scheduler()
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "run the same command again to resume" in error[0], output[-3000:]
    kept = committed(db)
    assert kept >= 3
    with DaskCluster(tmp_path_factory.mktemp("dask2")) as second:
        second.add_worker("v1", threads=2)
        done = run_fab([*args, "--engine", "dask", "--scheduler", second.address], timeout=600)
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI_END
    blocks = assert_blocks_tile(db, 1, END)
    assert {"v1"} <= {block["host"] for block in blocks}


@pytest.mark.slow
def test_a_worker_that_cannot_run_the_client_is_refused_with_the_reason(run_fab, tmp_path, tmp_path_factory):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # Another package's module named agent, imported before the bundle arrives (a worker preload).
    (shadow / "agent.py").write_text("PROTOCOL = 0\n")
    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        cluster.add_worker("good", threads=1)
        cluster.add_worker("bad", threads=1, env={"PYTHONPATH": str(shadow)}, extra=["--preload", "agent"])
        hosts = run_fab(["hosts", "--engine", "dask", "--scheduler", cluster.address])
        assert hosts.returncode == 3, hosts.stdout + hosts.stderr
        bad = next(line for line in hosts.stdout.splitlines() if line.startswith("bad "))
        assert "no: a module named agent from" in bad and "shadows the client" in bad, hosts.stdout
        assert "1 of 2 workers" in hosts.stdout
        db = tmp_path / "r.db"
        done = primes(run_fab, db, 1, 1e7, "--engine", "dask", "--scheduler", cluster.address)
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI_1E7
    assert set(blocks_by_host(db)) == {"good"}
    assert "left out: bad: cannot run the client: a module named agent" in done.stdout + done.stderr


@pytest.mark.slow
def test_coordinator_killed_leaves_no_local_cluster_worker_behind(tmp_path):
    from harness import pid_alive

    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    proc = start_fab(["primes", "--start", 1, "--end", END, "--count-only", "--db", db, "--block-seconds", "2",
                      "--engine", "dask"], log)
    try:
        wait_until(lambda: committed(db) >= 2, proc=proc, log=log)
        children = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()  # forked by any thread
                    for pid in (task / "children").read_text().split()]
        assert len(children) >= 1  # the LocalCluster's workers (forked)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone: its workers must notice
        proc.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in children), timeout=20)


@pytest.mark.slow
def test_a_scheduler_without_workers_is_waited_for(tmp_path, tmp_path_factory):
    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        proc = start_fab(["primes", "--start", 1, "--end", 1e7, "--db", db, "--engine", "dask",
                          "--scheduler", cluster.address], log)
        try:
            time.sleep(2)  # a dask-jobqueue cluster whose jobs are still queued
            assert proc.poll() is None, log.read_text()
            cluster.add_worker("late", threads=1)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert count_of(log.read_text()) == PI_1E7
    assert set(blocks_by_host(db)) == {"late"}


@pytest.mark.slow
def test_transport_runs_a_job_prepare_step_on_the_worker(tmp_path, tmp_path_factory):
    # Job.prepare_host gets a transport: on the Dask engine, run() and put() reach the worker.
    from cluster.engines.dask import DaskEngine, DaskTransport
    from cluster.errors import RemoteError

    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        cluster.add_worker("w1", threads=1)
        with DaskEngine(cluster.address).start() as engine:
            address = next(iter(engine.workers))
            transport = DaskTransport(engine, address, engine.host_of(address), {}, {})
            done = transport.run("echo out; echo err >&2; cat; exit 3", stdin=b"in\n", timeout=30)
            assert (done.returncode, done.stdout, done.stderr) == (3, "out\nin\n", "err\n")
            target = tmp_path / "deep" / "file.bin"
            transport.put(b"\x00data", str(target))
            assert target.read_bytes() == b"\x00data"
            with pytest.raises(RemoteError, match="timed out"):
                transport.run("sleep 30", timeout=1)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_the_local_cluster(tmp_path):
    from harness import pid_alive

    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    proc = start_fab(["primes", "--start", 1, "--end", 1e13, "--count-only", "--db", db, "--engine", "dask"], log)
    try:
        wait_until(lambda: committed(db) >= 2, proc=proc, log=log)
        children = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted: finished blocks are kept" in log.read_text()
    wait_until(lambda: not any(pid_alive(pid) for pid in children), timeout=20)
    assert committed(db) >= 2
