"""fab dashboard, the server alone: read-only, GET only, headers, the token off loopback, the same
figures as fab stats, bounded snapshots, and the data endpoint answering while a run writes."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from cluster.dashboard import data
from cluster.dashboard.server import CSP, Dashboard
from cluster.store import BlockRow, Store
from harness import fab_argv, fab_env


def local_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "local.ini"
    path.write_text("[this computer]\naddress = local\n")
    return path


def get(host: str, port: int, path: str, method: str = "GET", headers: dict | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A store with one finished local primes run (a real fab primes)."""
    folder = tmp_path_factory.mktemp("dash")
    db = folder / "r.db"
    done = subprocess.run(fab_argv(["primes", "--inventory", local_inventory(folder), "--start", 1, "--end", "2e7",
                                    "--db", db, "--block-seconds", "0.1", "--quiet"]),
                          env=fab_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return db


@pytest.fixture
def board(finished_store):
    server = Dashboard(finished_store, port=0).start()
    yield server
    server.stop()


def test_headers_get_only_and_fixed_files(board, finished_store):
    before = finished_store.read_bytes()
    for path in ("/", "/static/app.js", "/static/app.css", "/api/state", "/nope", "/static/../server.py",
                 "/static/%2e%2e/server.py", "/static/data.py"):
        status, headers, body = get("127.0.0.1", board.port, path)
        assert status == (200 if path in ("/", "/static/app.js", "/static/app.css", "/api/state") else 404), path
        assert headers["Content-Security-Policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "default-src 'none'" in CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        if status == 404:
            assert b"import" not in body
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        status, headers, _ = get("127.0.0.1", board.port, "/api/state", method)
        assert status == 405 and headers["Allow"] == "GET", method
    assert finished_store.read_bytes() == before
    assert not Path(f"{finished_store}-wal").exists() or Path(f"{finished_store}-wal").stat().st_size == 0
    page = get("127.0.0.1", board.port, "/")[2].decode()
    # No inline script or style, no handler attributes: the CSP would block them anyway.
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/app.js" defer>']
    assert not re.search(r"\son\w+\s*=", page) and "style=" not in page
    script = (Path(__file__).resolve().parent.parent / "cluster/dashboard/static/app.js").read_text()
    script = re.sub(r"^\s*//.*$", "", script, flags=re.M)  # the comments say what is never used
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_loopback_refuses_other_host_names(board):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 cannot read the data."""
    status, _, body = get("127.0.0.1", board.port, "/api/state", headers={"Host": f"evil.example:{board.port}"})
    assert status == 421 and b"runs" not in body
    for host in (f"127.0.0.1:{board.port}", f"localhost:{board.port}"):
        assert get("127.0.0.1", board.port, "/api/state", headers={"Host": host})[0] == 200


def test_same_figures_as_fab_stats(board, finished_store, run_fab):
    stats = run_fab(["stats", "--db", finished_store, "--run", "1", "--format", "json"])
    assert stats.returncode == 0, stats.stderr
    expected = json.loads(stats.stdout)
    shown = json.loads(get("127.0.0.1", board.port, "/api/state?run=1")[2])
    report = shown["run"]["report"]
    for key in ("items", "blocks", "wall_seconds", "throughput", "progress", "sum_standalone", "efficiency",
                "startup_seconds", "found"):
        assert report[key] == expected[key], key
    assert report["hosts"] == expected["hosts"]
    assert shown["runs"][0]["state"] == "done" and shown["runs"][0]["progress"] == 1.0


def test_token_required_on_another_address(finished_store, tmp_path):
    """--bind 127.0.0.2 (not the default loopback address): the page and the data need the printed token."""
    proc = subprocess.Popen(fab_argv(["dashboard", "--db", finished_store, "--bind", "127.0.0.2", "--port", "0"]),
                            env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+", line).group()
        parts = urllib.parse.urlsplit(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        assert parts.hostname == "127.0.0.2" and len(token) >= 32
        wrong = token[:-1] + ("x" if token[-1] != "x" else "y")
        for path in ("/", "/api/state", "/api/state?token=", "/api/state?token=" + wrong,
                     "/api/state?token=" + token[:-1], "/?token=" + token.swapcase()):
            status, _, body = get("127.0.0.2", parts.port, path)
            assert status == 403 and b"runs" not in body, path
        status, _, body = get("127.0.0.2", parts.port, f"/api/state?token={token}")
        assert status == 200 and json.loads(body)["runs"][0]["id"] == 1
        assert get("127.0.0.2", parts.port, f"/?token={token}")[0] == 200
    finally:
        os.killpg(proc.pid, 15)
        _, err = proc.communicate(timeout=10)
    assert "token in the URL is required" in err
    assert err.count(token) == 0  # printed once, on stdout


@pytest.mark.parametrize("args, words", [
    (["--port", "abc"], "--port: expected a whole number"),
    (["--port", "70000"], "--port: must be at most 65,535"),
    (["--bind", "example.com"], "--bind: expected an IP address"),
    (["--db", "/nonexistent/x.db"], "--db: folder /nonexistent does not exist"),
])
def test_bad_flags(run_fab, args, words):
    done = run_fab(["dashboard", *args], timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_store_is_a_usage_error(run_fab, tmp_path):
    """fab dashboard --db MISSING: one line, exit 2, nothing served and no store created."""
    done = run_fab(["dashboard", "--db", tmp_path / "typo.db", "--port", "0"], timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--db" in done.stderr and "no such store" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "dashboard of" not in done.stdout
    assert not (tmp_path / "typo.db").exists()


def test_wait_serves_a_store_not_there_yet(tmp_path):
    """--wait: the dashboard opened before the run (the page says "no store yet" until it exists)."""
    proc = subprocess.Popen(fab_argv(["dashboard", "--db", tmp_path / "later.db", "--port", "0", "--wait"]),
                            env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = urllib.parse.urlsplit(re.search(r"http://\S+", proc.stdout.readline()).group())
        state = json.loads(get("127.0.0.1", url.port, "/api/state")[2])
        assert "no store yet" in state["error"] and not (tmp_path / "later.db").exists()
    finally:
        os.killpg(proc.pid, 15)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("query", ["run=99", "run=abc", "run=-1", "run=1x", "run=" + "9" * 20])
def test_an_unknown_run_is_404_with_a_json_error(board, query):
    status, headers, body = get("127.0.0.1", board.port, "/api/state?" + query)
    assert status == 404 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["error"].startswith("no run ") and "runs" not in answer
    assert get("127.0.0.1", board.port, "/api/state?run=1")[0] == 200
    assert get("127.0.0.1", board.port, "/api/state?run=")[0] == 200  # no run asked: the current one


def test_port_taken_is_one_line(board, run_fab):
    done = run_fab(["dashboard", "--db", board.db_path, "--port", str(board.port)], timeout=30)
    assert done.returncode != 0 and "--port: cannot listen" in done.stderr and "Traceback" not in done.stderr


def test_missing_store_says_so(tmp_path):
    server = Dashboard(tmp_path / "none.db", port=0).start()
    try:
        state = json.loads(get("127.0.0.1", server.port, "/api/state")[2])
        assert "no store yet" in state["error"] and state["run"] is None
    finally:
        server.stop()
    assert not (tmp_path / "none.db").exists()


def big_store(db: Path, hosts: int = 100, blocks: int = 20000, events: int = 300) -> None:
    """A map run of 1e6 items over ``hosts`` hosts in ``blocks`` blocks, with long event details."""
    names = [f"host{i:03d}" for i in range(hosts)]
    with Store(db) as store:
        run_id = store.open_run("map", {"items": 10**6}, 10**6)
        for name in names:
            store.record_run_host(run_id, name, {"python": "3.11.2", "cores": 4}, 4, "python")
        t0 = time.time() - 600
        per = 10**6 // blocks
        rows = [BlockRow(run_id=run_id, lo=i * per, hi=i * per + per - 1, host=names[i % hosts],
                         started=t0 + i * 0.03, finished=t0 + i * 0.03 + 1.0, seconds=1.0, items=per, found=0)
                for i in range(blocks)]
        for start in range(0, len(rows), 2000):
            store.commit_blocks(rows[start:start + 2000])
        for i in range(events):
            store.add_event(run_id, names[i % hosts], "failure", "x" * 10000)


def test_snapshot_stays_bounded_with_100_hosts_and_a_million_items(tmp_path):
    """100 hosts, 20,000 blocks of a 1e6-item run, hostile long strings: the snapshot is bounded."""
    db = tmp_path / "big.db"
    big_store(db)
    with Store.open_readonly(db) as store:
        snap = data.snapshot(store)
    body = json.dumps(snap)
    assert snap["run"]["report"]["items"] == 10**6 and len(snap["run"]["hosts"]) == 100
    assert sum(len(b) for b in snap["run"]["timeline"]["bars"].values()) == data.MAX_BARS
    assert len(snap["run"]["events"]) == data.MAX_EVENTS
    assert all(len(e["detail"]) <= data.MAX_TEXT for e in snap["run"]["events"])
    assert all(len(line) <= data.SERIES_POINTS for line in snap["run"]["series"]["hosts"].values())
    assert len(body) < 1_500_000


@pytest.mark.slow
def test_data_endpoint_answers_while_the_coordinator_writes(tmp_path):
    """A real fab primes (list mode: every prime stored) committing small blocks as fast as it can:
    every poll is answered, with rising items."""
    db = tmp_path / "r.db"
    proc = subprocess.Popen(fab_argv(["primes", "--inventory", local_inventory(tmp_path), "--start", 1, "--end",
                                      "6e8", "--db", db, "--block-seconds", "0.05", "--quiet"]),
                            env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    server = Dashboard(db, port=0).start()
    seen, errors = [], []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            status, _, body = get("127.0.0.1", server.port, "/api/state", timeout=10)
            if status != 200:
                errors.append(status)
                continue
            state = json.loads(body)
            if state.get("run"):
                seen.append((state["run"]["report"]["items"], state["run"]["report"]["run"]["state"]))
            time.sleep(0.02)
        out, err = proc.communicate(timeout=120)
    finally:
        server.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, err
    assert not errors
    running = [items for items, state in seen if state == "running"]
    assert len(running) >= 3, seen[:5]
    assert running == sorted(running) and running[-1] > running[0]
    with Store.open_readonly(db) as store:
        assert store.runs()[-1]["blocks"] > 20  # small blocks: the writer was busy committing


def test_pick_run_follows_the_live_run():
    runs = [{"id": 1, "live": False}, {"id": 2, "live": True}, {"id": 3, "live": False}]
    assert data.pick_run(runs, None) == 2
    assert data.pick_run(runs, 3) == 3
    assert data.pick_run(runs, 99) == 2
    assert data.pick_run([{"id": 1, "live": False}], None) == 1
    assert data.pick_run([], None) is None


def test_host_state_from_events():
    events = [{"host": "a", "kind": "up"}, {"host": "b", "kind": "up"}, {"host": "a", "kind": "lost"},
              {"host": "c", "kind": "up"}, {"host": "c", "kind": "quarantine"}, {"host": "c", "kind": "up"}]
    assert data.host_state(events, "a", True) == "lost"
    assert data.host_state(events, "b", True) == "up"
    assert data.host_state(events, "c", True) == "rejoined"
    assert data.host_state(events, "b", False) == "finished"


def test_rate_series_spreads_items_over_compute_time():
    blocks = [{"host": "a", "started": 0.0, "finished": 10.0, "seconds": 10.0, "items": 100}]
    series = data.rate_series(blocks, ["a"], lambda t: t, 10.0, points=10)
    assert series["step"] == 1.0 and series["hosts"]["a"] == pytest.approx([10.0] * 10)


def test_a_thread_safe_cache(board):
    results = []

    def hit():
        results.append(get("127.0.0.1", board.port, "/api/state")[0])

    threads = [threading.Thread(target=hit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20
