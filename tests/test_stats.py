"""fab stats: every figure checked against stores built through the Store API with known times.

The stores are real SQLite files; only the clock is set (time.time) while building them,
so that sessions, blocks and events happen at known moments.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.errors import StoreError
from cluster.report import human_params, human_seconds, run_report, sessions
from cluster.store import BlockRow, Store
from harness import run_fab

T0 = 1_700_000_000.0
PARAMS = {"start": 1, "end": 1000, "mode": "count"}
REPO = Path(__file__).resolve().parent.parent


class Clock:
    """A settable time.time for building stores."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> Clock:
        self.now = T0 + offset
        return self


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(time, "time", fake)
    return fake


def block(run_id, lo, hi, host, started, finished, seconds, attempts=1, engine=None, found=0, base=T0):
    return BlockRow(run_id, lo, hi, host, base + started, base + finished, hi - lo + 1, found,
                    attempts=attempts, seconds=seconds, meta={"engine": engine} if engine else None)


def build_two_sessions(path: Path, clock: Clock, calibrate=("fast", "slow"), tail_event=True) -> int:
    """Run 1: primes [1, 1000]; hosts fast (2 slots), slow (1), flaky (1, lost, one failure).

    Session 1: T0..T0+10 (interrupted); session 2: T0+100..T0+110 (done); wall time 20 s.
    fast: 800 numbers in 17 s busy; slow: 200 in 16 s busy. Tail event at T0+104.
    """
    with Store(path) as store:
        clock.at(-50)  # calibrated before the run, in its mode and range: comparable
        rates = {"fast": 100.0, "slow": 20.0}
        for host in calibrate:
            store.set_calibration(host, "primes", rates[host], mode="count", lo=1, hi=1000)
        store.set_calibration("fast", "primes", 5.0, mode="list", lo=1, hi=1000)  # another mode: never used
        store.set_calibration("fast", "primes", 7.0, mode="count", lo=10**11, hi=10**11 + 10**9)  # far away
        store.set_calibration("fast", "scrape", 999.0)  # another job: never used for primes
        clock.at(0)
        run_id = store.open_run("primes", PARAMS, 1000)
        store.record_run_host(run_id, "fast", {"slots": 2}, 2)
        store.record_run_host(run_id, "slow", {"slots": 1}, 1)
        store.record_run_host(run_id, "flaky", {"cores": 1}, 1)
        store.commit_blocks([block(run_id, 1, 200, "fast", 0, 4, 4, engine="numpy"),
                             block(run_id, 201, 400, "fast", 0, 4, 4, engine="numpy"),
                             block(run_id, 401, 500, "slow", 0, 8, 8, engine="python")])
        clock.at(3)
        store.add_event(run_id, "flaky", "failure", "[501, 550]: boom")
        clock.at(5)
        store.add_event(run_id, "flaky", "lost", "connection lost (EOF); 2 blocks back")
        clock.at(10)
        store.finish_run(run_id, "interrupted")
        clock.at(100)
        assert store.open_run("primes", PARAMS, 1000) == run_id
        store.commit_blocks([block(run_id, 501, 800, "fast", 100, 106, 6, attempts=2, engine="numpy"),
                             block(run_id, 801, 900, "slow", 100, 108, 8, engine="python")])
        clock.at(104)
        if tail_event:
            store.add_event(run_id, None, "tail", "2 blocks in flight")
        store.commit_blocks([block(run_id, 901, 1000, "fast", 104, 107, 3, engine="numpy")])
        clock.at(110)
        store.finish_run(run_id, "done")
        clock.at(120)
        store.set_calibration("fast", "primes", 1.0, mode="count", lo=1, hi=1000)  # after the run: not used
    return run_id


def report_of(path: Path, run_id: int, now: float, live: bool = False) -> dict:
    with Store.open_readonly(path) as store:
        run = store.run(run_id)
        return run_report(run, store.blocks(run_id), store.events(run_id), store.run_hosts(run_id),
                          store.calibrations(run["job"]), now, live)


def stats(*args, timeout=60):
    return run_fab(["stats", *[str(a) for a in args]], timeout=timeout)


def stats_json(*args) -> dict:
    done = stats(*args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the figures


def test_every_figure_of_a_resumed_run(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock)
    report = report_of(db, run_id, now=T0 + 500)
    assert report["sessions"] == [[T0, T0 + 10], [T0 + 100, T0 + 110]]
    assert report["wall_seconds"] == pytest.approx(20.0)  # not finished - started (110)
    assert report["items"] == 1000 and report["blocks"] == 6
    assert report["throughput"] == pytest.approx(50.0)
    hosts = {h["host"]: h for h in report["hosts"]}
    assert list(hosts) == ["fast", "flaky", "slow"]
    fast, slow, flaky = hosts["fast"], hosts["slow"], hosts["flaky"]
    assert (fast["slots"], fast["blocks"], fast["items"]) == (2, 4, 800)
    assert fast["busy_seconds"] == pytest.approx(17.0)
    assert fast["speed_busy_per_slot"] == pytest.approx(800 / 17)
    assert fast["speed_busy"] == pytest.approx(2 * 800 / 17)
    assert fast["throughput"] == pytest.approx(800 / 20)
    assert fast["share"] == pytest.approx(0.8)
    assert fast["idle_seconds"] == pytest.approx(20 - 17 / 2)
    assert fast["last_seen"] == pytest.approx(T0 + 107)
    assert fast["engine"] == "numpy"
    assert (fast["retries"], fast["failures"]) == (0, 0)
    assert (slow["slots"], slow["blocks"], slow["items"]) == (1, 2, 200)
    assert slow["speed_busy"] == pytest.approx(12.5) and slow["speed_busy_per_slot"] == pytest.approx(12.5)
    assert slow["throughput"] == pytest.approx(10.0)
    assert slow["share"] == pytest.approx(0.2)
    assert slow["idle_seconds"] == pytest.approx(4.0)
    assert (flaky["slots"], flaky["items"], flaky["speed_busy"], flaky["throughput"]) == (1, 0, None, 0.0)
    assert flaky["idle_reason"] == "lost"
    assert (flaky["retries"], flaky["failures"]) == (2, 1)
    assert flaky["idle_seconds"] == pytest.approx(20.0)
    assert flaky["last_seen"] == pytest.approx(T0 + 5)
    assert fast["standalone_rate"] == 100.0 and slow["standalone_rate"] == 20.0
    assert report["sum_standalone"] == pytest.approx(120.0)  # flaky did nothing: not a part
    assert report["efficiency"] == pytest.approx(50 / 120)
    assert report["tail"]["seconds"] == pytest.approx(6.0) and report["tail"]["source"] == "event"
    assert report["eta_seconds"] is None
    assert report["redone_blocks"] == 1
    assert not any("calibration" in note for note in report["notes"])


def test_without_a_comparable_calibration_there_is_no_efficiency(tmp_path, clock):
    """Only other modes, other ranges, other jobs and later calibrations: none is comparable."""
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, calibrate=())
    report = report_of(db, run_id, now=T0 + 500)
    assert report["sum_standalone"] is None and report["efficiency"] is None
    assert any(note.startswith("no comparable calibration (primes in count mode near 5e2)")
               for note in report["notes"])
    done = stats("--db", db, "--run", run_id)
    assert "efficiency: none (no comparable calibration)" in done.stdout


def test_partial_calibration_gives_no_efficiency_and_names_the_host(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, calibrate=("fast",))
    report = report_of(db, run_id, now=T0 + 500)
    assert report["sum_standalone"] is None and report["efficiency"] is None
    assert any(note.startswith("no comparable calibration for slow") for note in report["notes"])


def test_a_calibration_for_the_run_counts_even_when_measured_later(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, calibrate=())
    with Store(db) as store:
        clock.at(500)
        store.set_calibration("fast", "primes", 80.0, mode="count", lo=1, hi=1000, run_id=run_id)
        store.set_calibration("slow", "primes", 40.0, mode="count", lo=1, hi=1000, run_id=run_id)
        store.set_calibration("slow", "primes", 50.0, mode="count", lo=1, hi=1000, run_id=run_id + 1)
    report = report_of(db, run_id, now=T0 + 600)
    assert report["sum_standalone"] == pytest.approx(120.0)
    assert report["efficiency"] == pytest.approx(50 / 120)


def test_tail_without_event_is_approximated_from_the_latest_block_start(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, tail_event=False)
    report = report_of(db, run_id, now=T0 + 500)
    assert report["tail"]["seconds"] == pytest.approx(110 - 104)  # latest block start: T0+104
    assert report["tail"]["source"] == "latest block start"
    assert any("no tail event" in note for note in report["notes"])


def test_a_resume_with_nothing_left_keeps_the_tail_of_the_working_session(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock)
    with Store(db) as store:
        clock.at(200)
        store.open_run("primes", PARAMS, 1000)
        clock.at(200.5)
        store.finish_run(run_id, "done")
    report = report_of(db, run_id, now=T0 + 500)
    assert report["wall_seconds"] == pytest.approx(20.5)
    assert report["tail"]["seconds"] == pytest.approx(6.0)


def test_eta_of_a_running_run(tmp_path, clock):
    db = tmp_path / "r.db"
    with Store(db) as store:
        clock.at(0)
        run_id = store.open_run("primes", PARAMS, 1000)
        store.upsert_host("a", {"slots": 1})
        store.commit_blocks([block(run_id, 1, 100, "a", 0, 4, 4), block(run_id, 101, 300, "a", 4, 9, 5)])
    report = report_of(db, run_id, now=T0 + 10, live=True)
    assert report["sessions"] == [[T0, T0 + 10]]
    assert report["throughput"] == pytest.approx(30.0)
    assert report["progress"] == pytest.approx(0.3)
    # the estimate at the last commit (T0 + 9: 300 in 9 s, 21 s for 700) counted down since
    assert report["eta_seconds"] == pytest.approx(700 / (300 / 9) - 1)
    later = report_of(db, run_id, now=T0 + 14, live=True)
    assert later["eta_seconds"] == pytest.approx(700 / (300 / 9) - 5)  # not rising as the average falls
    stalled = report_of(db, run_id, now=T0 + 100, live=True)
    assert stalled["eta_seconds"] == pytest.approx(700 / (300 / 100))  # past it: the rate until now
    assert report["tail"] is None  # still handing out blocks
    with Store(db) as store:
        clock.at(12)
        store.add_event(run_id, None, "tail", "1 block in flight")
    report = report_of(db, run_id, now=T0 + 15, live=True)
    assert report["tail"]["ongoing"] and report["tail"]["seconds"] == pytest.approx(3.0)


def test_eta_counts_only_the_current_session(tmp_path, clock):
    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock)
    with Store(db) as store:  # a third session, still running: 0 items left -> ETA 0
        clock.at(300)
        store.open_run("primes", PARAMS, 2000)  # the total grew (as when resumed with more work)
        store.commit_blocks([block(run_id, 1001, 1400, "fast", 300, 304, 4)])
    report = report_of(db, run_id, now=T0 + 310, live=True)
    assert report["wall_seconds"] == pytest.approx(30.0)
    assert report["eta_seconds"] == pytest.approx(600 / (400 / 10))


def test_a_killed_coordinator_ends_its_session_at_the_last_activity(tmp_path, clock):
    db = tmp_path / "r.db"
    with Store(db) as store:
        clock.at(0)
        run_id = store.open_run("primes", PARAMS, 1000)
        store.commit_blocks([block(run_id, 1, 100, "a", 0, 7, 7)])
        clock.at(50)  # killed; resumed later, which closes nothing
        store.open_run("primes", PARAMS, 1000)
        store.commit_blocks([block(run_id, 101, 1000, "a", 50, 53, 3)])
        clock.at(54)
        store.finish_run(run_id, "done")
    report = report_of(db, run_id, now=T0 + 500)
    assert report["sessions"] == [[T0, T0 + 7], [T0 + 50, T0 + 54]]
    with Store(db) as store:
        clock.at(60)
        store.open_run("primes", PARAMS, 1000)  # killed again: marked running, no coordinator
    report = report_of(db, run_id, now=T0 + 500, live=False)
    assert report["sessions"][-1] == [T0 + 60, T0 + 60]
    assert report["eta_seconds"] is None
    assert any("no coordinator holds it" in note for note in report["notes"])


def test_start_up_is_the_time_before_the_first_block_of_each_session(tmp_path, clock):
    db = tmp_path / "r.db"
    with Store(db) as store:
        clock.at(0)
        run_id = store.open_run("primes", PARAMS, 1000)
        store.commit_blocks([block(run_id, 1, 500, "a", 2.5, 6, 3.5)])
        clock.at(8)
        store.finish_run(run_id, "interrupted")
        clock.at(20)
        store.open_run("primes", PARAMS, 1000)
        store.commit_blocks([block(run_id, 501, 1000, "a", 21, 25, 4)])
        clock.at(26)
        store.finish_run(run_id, "done")
    report = report_of(db, run_id, now=T0 + 100)
    assert report["startup"] == [[T0, T0 + 2.5], [T0 + 20, T0 + 21]]
    assert report["startup_seconds"] == pytest.approx(3.5)
    assert report["wall_seconds"] == pytest.approx(14.0)


def test_timeline_lanes_never_exceed_the_slots():
    """A block recorded as starting a few ms before the previous one ended stays on its slot's lane."""
    from cluster.plots import _lanes

    def b(start, end):
        return {"started": start, "finished": end}

    blocks = [b(0, 1.0), b(0.98, 2.0), b(1.99, 3.0), b(0, 3.0)]
    one = _lanes(blocks[:3], lambda t: t, 1)
    assert len(one) == 1 and len(one[0]) == 3
    two = _lanes(blocks, lambda t: t, 2)
    assert sorted(len(lane) for lane in two) == [1, 3]


def test_sessions_without_events_fall_back_to_the_run_times():
    run = {"started": 10.0, "finished": 25.0}
    assert sessions(run, [], [], now=100.0, live=False) == [[10.0, 25.0]]


def test_formatting_helpers():
    assert human_seconds(5.04) == "5.0 s"
    assert human_seconds(245) == "4m05s"
    assert human_seconds(7380) == "2h03m"
    assert human_params({"end": 10**9, "mode": "count", "start": 1}) == "start=1 end=1,000,000,000 mode=count"


# ---------------------------------------------------------------- the command


def test_runs_table_and_run_table(tmp_path, clock):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    with Store(db) as store:
        clock.at(1000)
        other = store.open_run("primes", {"start": 1, "end": 10, "mode": "list"}, 10)
        store.commit_blocks([block(other, 1, 10, "fast", 1000, 1002, 2)])
        clock.at(1004)
        store.finish_run(other, "done")
    listing = stats("--db", db)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:8] == ["run", "job", "parameters", "state", "started", "wall", "time", "items"]
    first = next(line for line in lines if line.startswith("1 "))
    assert "start=1 end=1,000 mode=count" in first and "done" in first
    assert "20.0 s" in first and "1,000" in first and first.rstrip().endswith("50")
    second = next(line for line in lines if line.startswith("2 "))
    assert "4.0 s" in second and second.rstrip().endswith("2.5")
    shown = stats("--db", db, "--run", 1)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "wall time 20.0 s in 2 sessions" in out
    assert "throughput numbers/s" in out and "speed while busy numbers/s" in out and "alone numbers/s" in out
    row = next(line for line in out.splitlines() if line.startswith("fast "))
    assert row.split()[:10] == ["fast", "2", "numpy", "4", "800", "40", "94.1", "47.1", "80.0%", "100"]
    assert "11.5 s" in row
    flaky = next(line for line in out.splitlines() if line.startswith("flaky "))
    assert flaky.rstrip().endswith("lost")
    assert "throughput: 1,000 numbers in 20.0 s = 50 numbers/s" in out
    assert "sum of parts: 120 numbers/s (each host alone, comparable fab calibrate)" in out
    assert "efficiency: 41.7% (throughput / sum of parts)" in out
    assert "tail: 6.0 s" in out
    last = stats("--db", db, "--last")
    assert last.returncode == 0 and "run 2: primes" in last.stdout
    github = stats("--db", db, "--run", 1, "--format", "github")
    assert github.returncode == 0 and "| fast " in github.stdout


def test_json_and_csv(tmp_path, clock):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    data = stats_json("--db", db, "--run", 1)
    assert data["schema"] == 2 and data["kind"] == "run"
    assert data["run"]["params"] == PARAMS
    assert data["wall_seconds"] == pytest.approx(20.0)
    assert data["throughput"] == pytest.approx(50.0)
    assert data["efficiency"] == pytest.approx(50 / 120)
    assert data["tail"]["seconds"] == pytest.approx(6.0)
    assert {h["host"]: h["share"] for h in data["hosts"]} == pytest.approx({"fast": 0.8, "flaky": 0.0, "slow": 0.2})
    runs = stats_json("--db", db)
    assert runs["schema"] == 2 and runs["kind"] == "runs"
    assert [(r["id"], r["items"], r["state"]) for r in runs["runs"]] == [(1, 1000, "done")]
    assert runs["runs"][0]["throughput"] == pytest.approx(50.0)
    done = stats("--db", db, "--run", 1, "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["host"] for r in rows] == ["fast", "flaky", "slow", "(run)"]
    fast, total = rows[0], rows[-1]
    assert float(fast["speed_busy"]) == pytest.approx(2 * 800 / 17)
    assert float(fast["throughput"]) == pytest.approx(40.0)
    assert float(fast["idle_seconds"]) == pytest.approx(11.5)
    assert float(total["throughput"]) == pytest.approx(50.0)
    assert float(total["standalone_items_per_second"]) == pytest.approx(120.0)
    assert float(total["efficiency"]) == pytest.approx(50 / 120)
    assert float(total["tail_seconds"]) == pytest.approx(6.0)
    assert float(total["wall_seconds"]) == pytest.approx(20.0)
    assert float(total["startup_seconds"]) == 0.0  # both sessions had a block at once
    listing = stats("--db", db, "--format", "csv")
    assert next(csv.DictReader(io.StringIO(listing.stdout)))["throughput"] == "50.0"


def test_running_run_through_the_command_shows_eta(tmp_path):
    """A live run (this process holds its lock): fab stats shows progress and an ETA."""
    db = tmp_path / "r.db"
    now = time.time()
    with Store(db) as store:
        run_id = store.open_run("primes", PARAMS, 1000)
        store.lock_run(run_id)
        store.upsert_host("a", {"slots": 1})
        time.sleep(0.2)
        store.commit_blocks([block(run_id, 1, 300, "a", -0.1, 0, 0.1, base=time.time())])
        data = stats_json("--db", db, "--last")
        shown = stats("--db", db, "--last")
    elapsed = time.time() - now
    assert data["run"]["state"] == "running" and data["live"]
    # 300 of 1000 in the session so far (which began at open_run, ~now): ETA = 700 / (300 / elapsed)
    assert 0 < data["eta_seconds"] <= 700 / (300 / (elapsed + 0.1))
    assert "progress: 30.0%, ETA" in shown.stdout


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args, code, message", [
    (["--run", "1", "--last"], 2, "--run and --last cannot be used together"),
    (["--run", "x"], 2, "--run: expected a whole number"),
    (["--run", "9"], 2, "--run: no run 9 in"),
    (["--format", "bogus"], 2, "--format: expected table, json, csv"),
    (["--plot", "out"], 2, "--plot draws one run: add --run N or --last"),
])
def test_usage_errors(tmp_path, clock, args, code, message):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    done = stats("--db", db, *args)
    assert done.returncode == code
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_store_errors(tmp_path):
    empty = tmp_path / "empty.db"
    Store(empty).close()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 500)
    cases = [(tmp_path / "missing.db", 1, "no such store"), (empty, 1, "no runs yet"),
             (corrupt, 1, "not a beowulf store"), (tmp_path, 2, "is a folder"),
             (tmp_path / "nowhere" / "r.db", 2, "does not exist")]
    for path, code, message in cases:
        done = stats("--db", path)
        assert done.returncode == code, (path, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "missing.db").exists()


HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("UPDATE hosts SET last_seen = last_seen + 1")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_locked_store_is_a_one_line_error(tmp_path, clock):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = stats("--db", db)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1
    assert "locked" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_writer_in_an_exclusive_transaction_does_not_block_stats(tmp_path, clock):
    """WAL: an open write transaction (even BEGIN EXCLUSIVE) leaves readers the last commit."""
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace(
        'conn.execute("PRAGMA locking_mode = EXCLUSIVE")\n', ""), str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        data = stats_json("--db", db, "--last")
    finally:
        holder.kill()
        holder.wait()
    assert data["items"] == 1000


WRITER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from cluster.store import BlockRow, Store
store = Store(sys.argv[1])
run_id = store.open_run("primes", {"start": 0, "end": 10**6, "mode": "count"}, 10**6 + 1)
store.upsert_host("w", {"slots": 1})
print("ready", flush=True)
lo = 0
stop = time.time() + float(sys.argv[3])
while time.time() < stop:
    now = time.time()
    store.commit_blocks([BlockRow(run_id, lo, lo + 99, "w", now - 0.01, now, 100, 0, seconds=0.01)])
    lo += 100
store.finish_run(run_id, "done")
store.close()
print(lo // 100, flush=True)
"""


@pytest.mark.slow
def test_stats_reads_while_another_process_writes(tmp_path):
    db = tmp_path / "r.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(REPO), "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    seen = []
    try:
        while writer.poll() is None and len(seen) < 4:
            data = stats_json("--db", db, "--last")
            seen.append(data["items"])
    finally:
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err  # the writer was never blocked into an error
    committed = int(out.split()[-1])
    assert seen and seen == sorted(seen) and seen[-1] <= committed * 100
    assert stats_json("--db", db, "--last")["items"] == committed * 100


def test_stats_never_writes(tmp_path, clock):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    before = db.read_bytes()
    stamp = os.stat(db).st_mtime_ns
    for args in (["--db", db], ["--db", db, "--last", "--format", "json"]):
        assert stats(*args).returncode == 0
    assert db.read_bytes() == before and os.stat(db).st_mtime_ns == stamp
    with pytest.raises(StoreError):  # and read-only really is read-only
        with Store.open_readonly(db) as store:
            store.add_event(None, None, "x")


# ---------------------------------------------------------------- plots


def assert_png(path: Path, min_width=500, min_height=250) -> None:
    from matplotlib.image import imread

    assert path.exists() and path.stat().st_size > 5000, path
    pixels = imread(str(path))
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (path, width, height)
    assert pixels[..., :3].std() > 0.05, f"{path} looks blank"


def test_plots_of_a_run(tmp_path, clock):
    db = tmp_path / "r.db"
    build_two_sessions(db, clock)
    out = tmp_path / "img"
    done = stats("--db", db, "--run", 1, "--plot", out)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["run1-rates.png", "run1-sum.png", "run1-timeline.png"]
    for name in names:
        assert_png(out / name)
        assert f"wrote {out / name}" in done.stderr


def test_no_plot_for_a_run_without_data(tmp_path, clock):
    db = tmp_path / "r.db"
    with Store(db) as store:
        store.open_run("primes", PARAMS, 1000)
    out = tmp_path / "img"
    done = stats("--db", db, "--last", "--plot", out)
    assert done.returncode == 0, done.stderr
    assert "run 1 has no finished blocks yet: no plots written" in done.stderr
    assert not out.exists() or not list(out.iterdir())


def test_scrape_plots_with_and_without_tor(tmp_path, clock):
    """Two scrape runs, with and without Tor: rates in pages/min, drawn side by side."""
    db = tmp_path / "r.db"
    with Store(db) as store:
        clock.at(-10)
        store.set_calibration("pi", "scrape", 0.5, variant="tor")
        for offset, tor, seconds in ((0, False, 1.0), (100, True, 4.0)):
            clock.at(offset)
            params = {"urls": "abc", "count": 40, "options": {}, "tor": tor}
            run_id = store.open_run("scrape", params, 40)
            rows = []
            for i in range(40):
                host = ("pi", "desktop")[i % 2]
                start = offset + (i // 2) * seconds * (2 if host == "pi" else 1)
                rows.append(block(run_id, i, i, host, start, start + seconds, seconds))
            store.commit_blocks(rows)
            clock.at(offset + 40 * seconds)
            store.finish_run(run_id, "done")
        store.upsert_host("pi", {"slots": 1})
        store.upsert_host("desktop", {"slots": 1})
    data = stats_json("--db", db, "--last")
    assert data["unit"]["label"] == "pages/min"
    pi = next(h for h in data["hosts"] if h["host"] == "pi")
    assert pi["speed_busy"] == pytest.approx(0.25) and pi["standalone_rate"] == 0.5  # the 'tor' variant
    shown = stats("--db", db, "--last")
    assert "pages/min" in shown.stdout and "15" in shown.stdout  # 0.25 pages/s = 15 pages/min
    out = tmp_path / "img"
    done = stats("--db", db, "--last", "--plot", out)
    assert done.returncode == 0, done.stderr
    for name in ("run2-rates.png", "run2-sum.png", "run2-timeline.png"):
        assert_png(out / name)


def test_plot_functions_directly(tmp_path, clock):
    """The plot module on its own, as a library: three PNGs and their paths."""
    from cluster.plots import write_plots

    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, calibrate=())
    report = report_of(db, run_id, now=T0 + 500)
    with Store.open_readonly(db) as store:
        blocks, events = store.blocks(run_id), store.events(run_id)
    written, messages = write_plots(report, blocks, events, tmp_path / "direct")
    assert not messages and len(written) == 3
    for path in written:
        assert_png(path)


def test_sum_bar_without_calibration_fits_and_legends_do_not_overlap_labels(tmp_path, clock):
    """With no comparable calibration the stack is the hosts' speed while busy, above the
    throughput: the axis holds all of it and its figure; every legend sits apart from the
    x label (a map run's plots once cut the bar and wrote the legend over the label)."""
    import warnings

    from cluster import plots

    db = tmp_path / "r.db"
    run_id = build_two_sessions(db, clock, calibrate=())
    report = report_of(db, run_id, now=T0 + 500)
    with Store.open_readonly(db) as store:
        blocks, events = store.blocks(run_id), store.events(run_id)
    plt = plots._pyplot()
    colors = plots._host_colors(report, None)
    scale = report["unit"]["scale"]
    stacked = sum(h["speed_busy"] * scale for h in report["hosts"] if h["items"] and h["speed_busy"])
    assert stacked > report["throughput"] * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's layout warnings fail the test
        figures = [plots.rates_figure(plt, report, colors), plots.sum_figure(plt, report, colors),
                   plots.timeline_figure(plt, report, blocks, events, colors)]
        for figure in figures:
            figure.canvas.draw()
    try:
        ax = figures[1].axes[0]
        assert ax.get_ylim()[1] > stacked * 1.05, (ax.get_ylim(), stacked)
        inside = ax.get_window_extent()
        for text in ax.texts:
            box = text.get_window_extent()
            assert inside.y0 <= box.y0 and box.y1 <= inside.y1, text.get_text()
        for figure in (figures[0], figures[2]):
            label = figure.axes[0].xaxis.label.get_window_extent()
            for legend in figure.legends + [a.get_legend() for a in figure.axes if a.get_legend()]:
                assert not legend.get_window_extent().overlaps(label), legend
    finally:
        for figure in figures:
            plt.close(figure)


def test_stats_is_registered():
    done = run_fab(["--list"])
    assert done.returncode == 0
    listed = textwrap.dedent(done.stdout)
    assert "stats " in listed and "calibrate " in listed


# ---------------------------------------------------------------- past runs never change


def _inventory(tmp_path: Path, slots: int) -> Path:
    path = tmp_path / f"hosts-{slots}.ini"
    path.write_text(f"[this computer]\naddress = local\nslots = {slots}\n")
    return path


def _snapshot(db: Path, run_id: int, folder: Path) -> dict:
    """What fab stats shows of a run: its JSON, CSV and table, and the bytes of its plots."""
    got = {}
    for style in ("json", "csv"):
        done = stats("--db", db, "--run", run_id, "--format", style)
        assert done.returncode == 0, done.stderr
        got[style] = done.stdout
    done = stats("--db", db, "--run", run_id, "--format", "json", "--plot", folder)
    assert done.returncode == 0, done.stderr
    for png in sorted(folder.glob(f"run{run_id}-*.png")):
        got[png.name] = png.read_bytes()
    assert len(got) == 5
    return got


@pytest.mark.slow
def test_a_past_run_never_changes(tmp_path):
    """Run 1 (1 slot); then a run with 2 slots, a scrape, fab calibrate, and --fresh of another run:
    run 1's JSON, CSV and plots stay the same bytes, its slots stay 1 (not the latest hello's)."""
    from harness.web import WebServer

    db = tmp_path / "r.db"
    one, two = _inventory(tmp_path, 1), _inventory(tmp_path, 2)
    done = run_fab(["primes", "--inventory", one, "--start", "1", "--end", "3e6", "--db", db], timeout=300)
    assert done.returncode == 0, done.stderr
    before = _snapshot(db, 1, tmp_path / "before")
    assert json.loads(before["json"])["hosts"][0]["slots"] == 1
    # 1..5e6 is not inside finished run 1, so it is a run of its own (not answered from run 1).
    done = run_fab(["primes", "--inventory", two, "--start", "1", "--end", "5e6", "--count-only", "--db", db],
                   timeout=300)
    assert done.returncode == 0, done.stderr
    with WebServer(robots="User-agent: *\nDisallow: /private\n") as web:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(web.url(f"/page/{i}") + "\n" for i in range(4)))
        done = run_fab(["scrape", "--urls", urls, "--inventory", two, "--delay", "0", "--db", db], timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    done = run_fab(["calibrate", "--inventory", two, "--seconds", "0.5", "--start", "1", "--db", db])
    assert done.returncode == 0, done.stderr
    done = run_fab(["primes", "--inventory", two, "--start", "1", "--end", "5e6", "--count-only", "--fresh",
                    "--db", db], timeout=300)
    assert done.returncode == 0, done.stderr
    after = _snapshot(db, 1, tmp_path / "after")
    for key in before:
        assert after[key] == before[key], key
    runs = stats_json("--db", db)["runs"]
    assert [(r["id"], r["state"], r["superseded_by"]) for r in runs][1:] == [
        (2, "replaced", 4), (3, "done", None), (4, "done", None)]
    listing = stats("--db", db)
    assert "superseded by run 4" in listing.stdout
    old = stats_json("--db", db, "--run", 2)  # its history is kept
    assert old["items"] == 5 * 10**6 and old["hosts"][0]["slots"] == 2


@pytest.mark.slow
def test_one_figure_has_one_value_in_summary_table_json_csv_and_plot(tmp_path):
    """A real run: each host's throughput and speed while busy, and the run's throughput, read the
    same in the end-of-run summary, the fab stats table, JSON, CSV and the rates plot's labels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from cluster import plots
    from cluster.report import human_rate

    db = tmp_path / "r.db"
    done = run_fab(["primes", "--inventory", _inventory(tmp_path, 2), "--start", "1", "--end", "2e7",
                    "--count-only", "--db", db], timeout=300)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.splitlines()
    data = stats_json("--db", db, "--run", 1)
    unit = data["unit"]
    (host,) = [h for h in data["hosts"] if h["items"]]
    throughput, busy = human_rate(host["throughput"], unit), human_rate(host["speed_busy"], unit)
    header = next(line for line in summary if line.startswith("host"))
    assert "throughput numbers/s" in header and "speed while busy numbers/s" in header
    row = next(line for line in summary if line.startswith("this computer"))
    assert throughput in row.split() and busy in row.split()
    run_line = f"({'throughput'} {human_rate(data['throughput'], unit)} numbers/s)"
    assert any(line.endswith(run_line) for line in summary), summary
    table = stats("--db", db, "--run", 1).stdout
    assert "throughput numbers/s" in table and "speed while busy numbers/s" in table
    row = next(line for line in table.splitlines() if line.startswith("this computer"))
    assert throughput in row.split() and busy in row.split()
    assert f"= {human_rate(data['throughput'], unit)} numbers/s" in table
    rows = list(csv.DictReader(io.StringIO(stats("--db", db, "--run", 1, "--format", "csv").stdout)))
    assert float(rows[0]["throughput"]) == pytest.approx(host["throughput"])
    assert float(rows[0]["speed_busy"]) == pytest.approx(host["speed_busy"])
    assert float(rows[-1]["throughput"]) == pytest.approx(data["throughput"])
    figure = plots.rates_figure(plt, data, plots._host_colors(data, None))
    texts = [t.get_text() for t in figure.findobj(Text)]
    plt.close(figure)
    assert throughput in texts and busy in texts
    assert "throughput" in texts and "speed while busy" in texts  # the legend: the same names


@pytest.mark.slow
def test_scrape_shows_the_politeness_bound_beside_the_throughput(tmp_path):
    """Two sites, --delay 0.25 and one robots Crawl-delay 0.5: at most 1/0.25 + 1/0.5 = 6 pages/s
    (360 pages/min); the efficiency is against that bound (there is no calibration)."""
    from harness.web import WebServer

    db = tmp_path / "r.db"
    with WebServer(robots="User-agent: *\nDisallow: /private\n") as quick, \
            WebServer(robots="User-agent: *\nCrawl-delay: 0.5\n") as polite:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{site.url(f'/page/{i}')}\n" for site in (quick, polite) for i in range(3)))
        done = run_fab(["scrape", "--urls", urls, "--inventory", _inventory(tmp_path, 2), "--delay", "0.25",
                        "--db", db], timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        data = stats_json("--db", db, "--last")
        assert data["politeness_bound"] == pytest.approx(6.0)
        assert data["sum_standalone"] is None
        assert data["efficiency_against"] == "politeness bound"
        assert data["efficiency"] == pytest.approx(data["throughput"] / 6.0)
        table = stats("--db", db, "--last").stdout
        assert "politeness bound: 360 pages/min" in table
        assert "(throughput / politeness bound)" in table
        rows = list(csv.DictReader(io.StringIO(stats("--db", db, "--last", "--format", "csv").stdout)))
        assert float(rows[-1]["politeness_bound"]) == pytest.approx(6.0)
        # fab calibrate --run 1 fetches the run's own URLs on each host alone: now there is a sum of
        # parts too, and the efficiency is against the lower of it and the politeness bound.
        done = run_fab(["calibrate", "--inventory", _inventory(tmp_path, 2), "--run", "1", "--seconds", "1",
                        "--db", db])
        assert done.returncode == 0, done.stdout + done.stderr
    data = stats_json("--db", db, "--last")
    with Store(db) as store:
        (calibration,) = store.calibrations("scrape")
    assert calibration["run_id"] == 1
    assert data["sum_standalone"] == pytest.approx(calibration["rate"])
    ceiling = min(calibration["rate"], 6.0)
    assert data["efficiency"] == pytest.approx(data["throughput"] / ceiling)
    assert data["efficiency_against"] == ("politeness bound" if ceiling == 6.0 else "sum of parts")


def test_each_host_has_its_own_start_up_and_hosts_that_did_nothing_stay_in_the_plots(tmp_path, clock):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from cluster import plots

    db = tmp_path / "r.db"
    with Store(db) as store:
        clock.at(0)
        run_id = store.open_run("primes", PARAMS, 1000)
        for name, at, slots in (("local", 0.2, 2), ("h1", 3.3, 3), ("late", 9.0, 1)):
            clock.at(at)
            store.add_event(run_id, name, "up", f"{slots} slots")
            store.record_run_host(run_id, name, {"python": "3.6.9"}, slots)
        store.add_event(run_id, "gone", "left-out", "gone: the agent did not start")
        store.commit_blocks([block(run_id, 1, 600, "local", 0.5, 6, 5.5), block(run_id, 601, 1000, "h1", 3.8, 8, 4.2)])
        clock.at(9.5)
        store.add_event(run_id, "never", "starting", "still starting when the run ended")
        store.finish_run(run_id, "done")
    report = report_of(db, run_id, now=T0 + 100)
    hosts = {h["host"]: h for h in report["hosts"]}
    assert hosts["local"]["startup"] == [[T0, T0 + 0.5]] and hosts["h1"]["startup"] == [[T0, T0 + 3.8]]
    assert hosts["h1"]["slots"] == 3 and hosts["h1"]["python"] == "3.6.9"
    assert hosts["late"]["idle_reason"] == "joined after the work was done"
    assert hosts["gone"]["idle_reason"] == "left out: gone: the agent did not start"
    assert hosts["never"]["idle_reason"] == "still starting when the run ended"
    colors = plots._host_colors(report, None)
    figure = plots.rates_figure(plt, report, colors)
    texts = [t.get_text() for t in figure.findobj(Text)]
    plt.close(figure)
    assert any(t.startswith("0 (joined after the work was done)") for t in texts), texts
    assert any("left out" in t for t in texts) and any(t.startswith("late\n1 slot") for t in texts)
    figure = plots.timeline_figure(plt, report, [], [], colors)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    plt.close(figure)
    assert "h1\n3 slots" in labels and len(labels) == 5


def test_resume_marks_close_together_share_one_label():
    from cluster.plots import _resumes

    assert _resumes([10.0, 11.0, 50.0], 100.0) == [(10.0, 2), (50.0, 1)]
    assert _resumes([], 100.0) == []
