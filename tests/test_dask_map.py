"""fab map --engine dask end to end on real Dask processes (README, "Engines").

A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (tests/harness/dask.py);
the workers get nothing of beowulf on their path. Map tasks run in a child worker per Dask
worker thread (cluster/engines/dask_worker.py ``run_in_child``): an item that crashes or hangs
kills the child, never the Dask worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from cluster import mapstore
from harness import fab_argv, fab_env
from harness.dask import DaskCluster, wait_until

FUNCTION = "def f(x):\n    return {'x': x, 'sq': x * x}\n"
# One item in ~2 ms: a few thousand items take a few seconds over the workers (time to kill something).
SLOW_FUNCTION = "import time\n\ndef f(x):\n    time.sleep(0.002)\n    return x * 3\n"


def local_inventory(folder: Path) -> Path:
    path = folder / "local.ini"
    path.write_text("[this computer]\naddress = local\n")
    return path


def start_fab(args, log: Path, cwd: Path) -> subprocess.Popen:
    """``fab ARGS`` in the background, in its own session (killed by its PID), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(fab_argv(args), cwd=str(cwd), env=fab_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def committed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from blocks").fetchone()[0]
    except sqlite3.Error:
        return 0


def blocks_by_host(db: Path) -> dict:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return dict(conn.execute("select host, count(*) from blocks group by host").fetchall())
    except sqlite3.Error:
        return {}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def item_counts(db: Path) -> tuple:
    """(runs, status -> items, seqs stored more than once) of the store's only map run."""
    conn = mapstore.connect(str(db))
    try:
        runs = conn.execute("select id from runs").fetchall()
        run_id = runs[-1][0]
        twice = conn.execute("select count(*) from (select seq from map_items where run_id = ? group by seq "
                             "having count(*) > 1)", (run_id,)).fetchone()[0]
        return len(runs), mapstore.counts(conn, run_id), twice
    finally:
        conn.close()


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def dask_cluster(tmp_path_factory):
    """A scheduler and three workers: w1 (1 thread), w2 (2 threads), w3 (1 thread, slowed)."""
    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        for name, threads in (("w1", 1), ("w2", 2), ("w3", 1)):
            cluster.add_worker(name, threads=threads, wait=False)
        for name in ("w1", "w2", "w3"):
            cluster.wait_for(name)
        cluster.workers["w3"].slow_down(running=0.3)
        yield cluster


@pytest.fixture(scope="module")
def path_cluster(tmp_path_factory):
    """Two workers whose environment has PYTHONPATH=extra/ (a module the user's function imports)."""
    extra = tmp_path_factory.mktemp("extra")
    (extra / "extramod.py").write_text("OFFSET = 1000\n")
    with DaskCluster(tmp_path_factory.mktemp("dask")) as cluster:
        for name in ("p1", "p2"):
            cluster.add_worker(name, threads=2, wait=False, env={"PYTHONPATH": str(extra)})
        for name in ("p1", "p2"):
            cluster.wait_for(name)
        yield cluster


# ---------------------------------------------------------------- exact results


@pytest.mark.slow
def test_map_command_and_function_exact_over_workers(run_fab, tmp_path, dask_cluster):
    on_dask = ["--engine", "dask", "--scheduler", dask_cluster.address]
    lines = [f"line {n} it's $HOME" for n in range(1, 3001)]
    (tmp_path / "items.txt").write_text("".join(f"{line}\n" for line in lines))
    done = run_fab(["map", "--command", "echo {#} {}", "--args", "items.txt", "--db", "c.db", "--export", "c.out",
                    "--joblog", "c.log", "--block-seconds", "0.5", *on_dask], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "c.out").read_text().splitlines() == [f"{n} {line}" for n, line in enumerate(lines, 1)]
    joblog = [line.split("\t") for line in (tmp_path / "c.log").read_text().splitlines()]
    assert joblog[0][:2] == ["Seq", "Host"] and len(joblog) == 3001
    assert {row[1] for row in joblog[1:]} <= {"w1", "w2", "w3"} and {row[6] for row in joblog[1:]} == {"0"}
    assert "3,000 items: 3,000 ok" in done.stdout
    runs, counts, twice = item_counts(tmp_path / "c.db")
    assert (runs, counts, twice) == (1, {"ok": 3000}, 0)
    assert len(blocks_by_host(tmp_path / "c.db")) >= 2  # spread over the workers
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr

    (tmp_path / "fn.py").write_text(FUNCTION)
    done = run_fab(["map", "--function", "fn.py:f", "--range", "1:5000", "--db", "f.db", "--export", "f.jsonl",
                    *on_dask], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [record["value"] for record in jsonl(tmp_path / "f.jsonl")] == [{"x": x, "sq": x * x}
                                                                          for x in range(1, 5001)]
    assert item_counts(tmp_path / "f.db") == (1, {"ok": 5000}, 0)
    # The run folders on the workers are removed at the end; the shipped function stays (by content).
    for name in ("w1", "w2", "w3"):
        folders = list((dask_cluster.root / name).glob("beowulf-*/map/*"))
        assert folders == [], folders


@pytest.mark.slow
def test_worker_sigkilled_mid_map_every_item_exactly_once(tmp_path, dask_cluster):
    (tmp_path / "slow.py").write_text(SLOW_FUNCTION)
    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    args = ["map", "--function", "slow.py:f", "--range", "1:6000", "--db", db, "--block-seconds", "0.3",
            "--export", "out.jsonl", "--engine", "dask", "--scheduler", dask_cluster.address]
    proc = start_fab(args, log, tmp_path)
    try:
        wait_until(lambda: blocks_by_host(db).get("w2", 0) >= 2, proc=proc, log=log)
        dask_cluster.workers["w2"].kill(signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    assert item_counts(db) == (1, {"ok": 6000}, 0)
    assert [record["value"] for record in jsonl(tmp_path / "out.jsonl")] == [x * 3 for x in range(1, 6001)]
    with sqlite3.connect(db) as conn:
        lost = conn.execute("select host from events where kind = 'lost'").fetchall()
    assert ("w2",) in lost, lost
    assert set(blocks_by_host(db)) - {"w2"}, blocks_by_host(db)  # the others finished it


@pytest.mark.slow
def test_resume_of_a_map_run_on_dask_then_on_the_local_default(run_fab, tmp_path, dask_cluster):
    (tmp_path / "slow.py").write_text(SLOW_FUNCTION)
    db, log = tmp_path / "r.db", tmp_path / "fab.log"
    args = ["map", "--function", "slow.py:f", "--range", "1:6000", "--db", db, "--block-seconds", "0.3"]
    proc = start_fab([*args, "--engine", "dask", "--scheduler", dask_cluster.address], log, tmp_path)
    try:
        wait_until(lambda: committed(db) >= 3, proc=proc, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator (and anything in its session)
        proc.wait()
    kept = committed(db)
    runs, counts, _ = item_counts(db)
    assert runs == 1 and 0 < counts.get("ok", 0) < 6000, counts
    done = run_fab([*args, "--inventory", local_inventory(tmp_path), "--export", "out.jsonl"], cwd=tmp_path,
                   timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert item_counts(db) == (1, {"ok": 6000}, 0)  # the engine is not part of the run's identity
    assert [record["value"] for record in jsonl(tmp_path / "out.jsonl")] == [x * 3 for x in range(1, 6001)]
    hosts = blocks_by_host(db)
    assert "this computer" in hosts and set(hosts) & {"w1", "w2", "w3"}, hosts
    assert committed(db) > kept


# ---------------------------------------------------------------- shipping, the worker's environment, isolation


@pytest.mark.slow
def test_ship_return_and_the_workers_pythonpath_on_dask(run_fab, tmp_path, path_cluster):
    on_dask = ["--engine", "dask", "--scheduler", path_cluster.address]
    data = tmp_path / "data"
    data.mkdir()
    for n in range(1, 41):
        (data / f"{n}.txt").write_text(f"word {n}\n")
    (tmp_path / "names.txt").write_text("".join(f"{n}\n" for n in range(1, 41)))
    done = run_fab(["map", "--command", 'tr a-z A-Z < "$BEOWULF_SHIP"/data/{}.txt > {}.up', "--return", "{}.up",
                    "--outdir", "back", "--args", "names.txt", "--ship", "data", "--db", "c.db", *on_dask],
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for n in range(1, 41):
        assert (tmp_path / "back" / f"{n}.up").read_text() == f"WORD {n}\n"
    done = run_fab(["map", "--command", "wc -c < {}", "--files", "data/*.txt", "--db", "w.db", "--export", "w.out",
                    *on_dask], cwd=tmp_path, timeout=300)  # each file travels in its task
    assert done.returncode == 0, done.stdout + done.stderr
    sizes = sorted(int(line) for line in (tmp_path / "w.out").read_text().split())
    assert sizes == sorted(len(f"word {n}\n") for n in range(1, 41))
    # A function reading a shipped file and importing a module found only on the workers' PYTHONPATH
    # (the child workers keep the Dask worker's environment).
    (tmp_path / "words.txt").write_text("alpha\nbeta\n")
    (tmp_path / "fn.py").write_text(
        "import os\nimport extramod\n\n"
        "WORDS = open(os.path.join(os.path.dirname(__file__), 'words.txt')).read().split()\n\n"
        "def f(x):\n    return [WORDS[x % 2], x + extramod.OFFSET]\n")
    done = run_fab(["map", "--function", "fn.py:f", "--range", "1:300", "--ship", "words.txt", "--db", "f.db",
                    "--export", "f.jsonl", *on_dask], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    values = [record["value"] for record in jsonl(tmp_path / "f.jsonl")]
    assert values == [["alpha" if x % 2 == 0 else "beta", x + 1000] for x in range(1, 301)]


@pytest.mark.slow
def test_a_crashing_or_hanging_item_kills_a_child_not_the_dask_worker(run_fab, tmp_path, path_cluster):
    (tmp_path / "bad.py").write_text(
        "import os, time\n\ndef f(x):\n    if x == 7:\n        os._exit(3)\n"
        "    if x == 11:\n        time.sleep(600)\n    return x + 1\n")
    done = run_fab(["map", "--function", "bad.py:f", "--range", "1:200", "--timeout", "2", "--db", "r.db",
                    "--export", "r.jsonl", "--engine", "dask", "--scheduler", path_cluster.address],
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "200 items: 198 ok, 1 crashed, 1 timeout" in done.stdout, done.stdout
    records = {record["seq"]: record for record in jsonl(tmp_path / "r.jsonl")}
    assert records[7]["status"] == "crashed" and records[11]["status"] == "timeout"
    assert all(records[x]["value"] == x + 1 for x in range(1, 201) if x not in (7, 11))
    assert all(worker.proc.poll() is None for worker in path_cluster.workers.values())  # no Dask worker died
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_cancelled_task_kills_its_child(tmp_path, path_cluster):
    # The coordinator cancels a copy (endgame, overdue): a Dask cancel does not stop a running task,
    # dask_worker.kill_tasks (Client.run, outside the task threads) kills its child.
    from cluster.engines import dask_worker
    from cluster.engines.dask import DaskEngine

    with DaskEngine(path_cluster.address).start() as engine:
        address = sorted(engine.workers)[0]
        assert not engine.hello(address).get("error")
        key = f"beowulf-test-{uuid.uuid4().hex}"
        line = json.dumps({"type": "task", "id": 5, "job": "sleep", "args": {"seconds": 600}}).encode() + b"\n"
        future = engine.client.submit(dask_worker.run_in_child, engine.bundle, line, key, key=key,
                                      workers=[address], allow_other_workers=False, pure=False)
        wait_until(lambda: engine.client.run(_has_key, key, workers=[address])[address], timeout=60)
        assert engine.client.run(dask_worker.kill_tasks, [key], workers=[address])[address] == 1
        answer = json.loads(future.result(timeout=60))
    assert answer["id"] == 5 and answer["ok"] is False and answer["kind"] == "died", answer
    assert "signal 9" in answer["error"]


def _has_key(key):
    import sys

    state = getattr(sys.modules.get("agent"), "beowulf_dask_children", None)
    return bool(state) and key in state["by_key"]


_has_key.__module__ = "__main__"  # pickled by value: the workers have no tests/ on their path


# ---------------------------------------------------------------- the embedded LocalCluster


@pytest.mark.slow
def test_embedded_local_cluster_map_no_warning_when_8787_is_taken(run_fab, tmp_path):
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
        holder.listen()
    except OSError:
        pass  # someone holds it already: the case itself
    try:
        (tmp_path / "fn.py").write_text(FUNCTION)
        done = run_fab(["map", "--function", "fn.py:f", "--range", "1:2000", "--db", "r.db", "--engine", "dask",
                        "--export", "r.jsonl"], cwd=tmp_path, timeout=300)
    finally:
        holder.close()
    assert done.returncode == 0, done.stdout + done.stderr
    for words in ("warn", "8787", "traceback", "error"):  # Dask said "UserWarning: Port 8787 is already in use"
        assert words not in done.stderr.lower(), done.stderr
    assert item_counts(tmp_path / "r.db") == (1, {"ok": 2000}, 0)
    assert all(name.startswith("dask-") for name in blocks_by_host(tmp_path / "r.db"))
    # fabric.yaml's beowulf.engine picks it too; the run is the same one (already complete).
    config = tmp_path / "fabric.yaml"
    config.write_text("beowulf:\n  engine: dask\n")
    again = run_fab(["map", "--function", "fn.py:f", "--range", "1:2000", "--db", "r.db"], config=config,
                    cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr
