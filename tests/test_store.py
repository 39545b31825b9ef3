"""The results store on real SQLite files: runs, exactly-once blocks, locks, schema, crashes.

No mocks: every test opens real files in tmp_path; lock and crash tests use real
subprocesses. The disk-failure test makes the kernel refuse writes past a size
(RLIMIT_FSIZE): a read-only folder does not stop root, and filling a filesystem
would need a tmpfs mount.
"""

import hashlib
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from cluster import store as store_module
from cluster.errors import StoreError
from cluster.store import BlockRow, BlockWriter, Store

ROOT = Path(__file__).resolve().parents[1]
PRIMES = {"start": 1, "end": 1000, "mode": "list"}


def row(run_id, lo, size=10, payload=None, host="pi", **extra):
    """A finished block [lo, lo + size - 1] as the coordinator would hand it over."""
    return BlockRow(
        run_id=run_id, lo=lo, hi=lo + size - 1, host=host, started=100.0 + lo,
        finished=101.5 + lo, items=size, found=lo % 7, payload=payload, **extra,
    )


def python(code, *args, **popen):
    """Start `python -c code args...` with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env, stdout=subprocess.PIPE, text=True, **popen,
    )


@pytest.fixture
def db(tmp_path):
    return tmp_path / "results.db"


@pytest.fixture
def store(db):
    with Store(db) as opened:
        yield opened


# -- opening ------------------------------------------------------------------------------


def test_new_store_is_wal_with_pragmas_and_schema(db):
    with Store(db) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
        assert store.path == str(db)
        assert store.integrity_ok()
        assert store.free_disk_bytes() > 0


def test_parent_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "results.db"
    with Store(path) as store:
        store.open_run("primes", PRIMES, 1000)
    assert path.is_file()


def test_memory_store_works():
    with Store(":memory:") as store:
        run = store.open_run("primes", PRIMES, 1000)
        assert store.commit_blocks([row(run, 1, payload=b"x")]) == [True]
        assert list(store.iter_payloads(run)) == [(1, 10, b"x")]


def test_non_database_file_is_refused_in_one_line(db):
    db.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(StoreError) as caught:
        Store(db)
    assert str(caught.value) == f"{db}: not a beowulf store (file is not a database)"
    assert db.read_bytes().startswith(b"these are my notes")  # untouched


def test_foreign_sqlite_database_is_refused(db):
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a beowulf store"):
        Store(db)


def test_folder_in_place_of_the_file_is_refused(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


def test_newer_schema_is_refused(db):
    Store(db).close()
    conn = sqlite3.connect(db)
    known = store_module.SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {known + 1}")
    conn.close()
    with pytest.raises(StoreError) as caught:
        Store(db)
    assert str(caught.value) == f"{db}: made by a newer beowulf (schema {known + 1}, this one knows {known})"


def test_older_schema_is_migrated(db, monkeypatch):
    with Store(db) as store:
        run = store.open_run("primes", PRIMES, 1000)
    nxt = store_module.SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", nxt)
    monkeypatch.setitem(store_module.MIGRATIONS, nxt, ["ALTER TABLE runs ADD COLUMN note TEXT"])
    with Store(db) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == nxt
        assert [tuple(r) for r in store._conn.execute("SELECT note FROM runs")] == [(None,)]
        assert store.find_run("primes", PRIMES) == run


# The scrape job's table as the core schema v1 made it before v4 (the job owns it since).
LEGACY_PAGES_V1 = """CREATE TABLE pages (
    run_id INTEGER NOT NULL, lo INTEGER NOT NULL, url TEXT NOT NULL, final_url TEXT, status INTEGER,
    content_type TEXT, size INTEGER, truncated INTEGER NOT NULL DEFAULT 0, sha256 TEXT, title TEXT,
    elapsed REAL, host TEXT NOT NULL, tor INTEGER NOT NULL DEFAULT 0, error TEXT, error_kind TEXT,
    attempts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (run_id, lo),
    FOREIGN KEY (run_id, lo) REFERENCES blocks (run_id, lo) ON DELETE CASCADE)"""
STORE_V3_SQL = Path(__file__).parent / "fixtures" / "store_v3.sql"


def old_store(path, version: int) -> sqlite3.Connection:
    """A store as schema ``version`` made it (its migrations applied by hand), open for filling."""
    conn = sqlite3.connect(path, isolation_level=None)
    for target in range(1, version + 1):
        step = store_module.MIGRATIONS[target]
        if callable(step):
            step(conn)
        else:
            for statement in step:
                conn.execute(statement)
        if target == 1:
            conn.execute(LEGACY_PAGES_V1)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.execute(f"PRAGMA application_id = {store_module.APPLICATION_ID}")
    return conn


def test_version_1_store_gains_the_content_encoding_column(db):
    conn = old_store(db, 1)
    conn.execute("INSERT INTO runs (job, params, key, state, started, total)"
                 " VALUES ('primes', ?, ?, 'done', 1.0, 1000)",
                 (store_module.canonical_json(PRIMES), "primes:" + store_module.canonical_json(PRIMES)))
    conn.close()
    with Store(db) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
        assert "content_encoding" in [r[1] for r in store._conn.execute("PRAGMA table_info(pages)")]
        assert store.find_run("primes", PRIMES) == 1


def test_new_store_has_no_job_table_until_the_job_migrates(db):
    from cluster.jobs.scrape import FetchOptions, ScrapeJob

    job = ScrapeJob(["http://127.0.0.1:9/"], FetchOptions())
    with Store(db) as store:
        assert not store.has_table("pages")
        store.migrate_job(job)
        store.migrate_job(job)  # once only
        assert store.has_table("pages")
        assert store.query("SELECT job, version FROM job_schema") == [{"job": "scrape", "version": 1}]


def test_job_with_newer_tables_is_refused(db):
    from cluster.jobs.scrape import FetchOptions, ScrapeJob

    job = ScrapeJob(["http://127.0.0.1:9/"], FetchOptions())
    with Store(db) as store:
        store.migrate_job(job)
        store._conn.execute("UPDATE job_schema SET version = 9")
        with pytest.raises(StoreError, match="newer"):
            store.migrate_job(job)


def test_block_rows_go_to_the_jobs_tables_in_the_same_transaction(db):
    from cluster.jobs.base import Job

    class Tally(Job):
        name = "tally"
        migrations = (["CREATE TABLE tally_notes (run_id INTEGER, lo INTEGER, note TEXT)"],)

    with Store(db) as store:
        store.migrate_job(Tally())
        run = store.open_run("tally", {}, 10)
        row = BlockRow(run, 0, 9, "h", 1.0, 2.0, 10, 0, rows=[("tally_notes", {"note": "first"})])
        assert store.commit_blocks([row, row]) == [True, False]  # a second copy adds no row
        store.add_job_rows(run, 3, [("tally_notes", {"note": "attempt"})])
        assert store.query("SELECT lo, note FROM tally_notes ORDER BY lo") == [
            {"lo": 0, "note": "first"}, {"lo": 3, "note": "attempt"}]
        with pytest.raises(ValueError):
            store.add_job_rows(run, 4, [("tally_notes; DROP TABLE runs", {"note": "x"})])
        with pytest.raises(ValueError):
            store.query("DELETE FROM runs")


def test_store_made_before_the_job_interface_keeps_its_pages(db):
    """A schema 3 store (the pages table in the core schema) opens, migrates and its scrape
    run's pages are read as before; the scrape job adopts the table as its version 1."""
    from cluster.jobs.scrape import FetchOptions, ScrapeJob, iter_pages

    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(STORE_V3_SQL.read_text())
    conn.execute("PRAGMA user_version = 3")
    conn.execute(f"PRAGMA application_id = {store_module.APPLICATION_ID}")
    conn.execute("INSERT INTO runs (job, params, key, state, started, total)"
                 " VALUES ('scrape', '{}', 'k', 'done', 1, 1)")
    conn.execute("INSERT INTO blocks (run_id, lo, hi, host, started, finished, seconds, items, found)"
                 " VALUES (1, 0, 0, 'h', 1.0, 2.0, 1.0, 1, 1)")
    conn.execute("INSERT INTO payloads (run_id, lo, data) VALUES (1, 0, x'00')")
    conn.execute("INSERT INTO pages (run_id, lo, url, status, host, content_encoding)"
                 " VALUES (1, 0, 'http://a.test/', 200, 'h', 'gzip')")
    conn.close()
    with Store.open_readonly(db) as store:  # fab stats reads it before any run migrated it
        assert [r["url"] for r, _ in iter_pages(store, 1)] == ["http://a.test/"]
    with Store(db) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
        store.migrate_job(ScrapeJob(["http://a.test/"], FetchOptions()))
        assert store.query("SELECT job, version FROM job_schema") == [{"job": "scrape", "version": 1}]
        [(record, body)] = list(iter_pages(store, 1))
        assert (record["url"], record["status"], record["content_encoding"], body) == (
            "http://a.test/", 200, "gzip", b"\x00")


def test_version_2_store_gains_run_hosts_and_calibration_history(db):
    """Old runs get what each host was from their 'up' events ("N slots"), or else the facts the
    store held at the migration, frozen; old calibrations become count mode, range unknown."""
    conn = old_store(db, 2)
    key = "primes:" + store_module.canonical_json(PRIMES)
    conn.execute("INSERT INTO runs (job, params, key, state, started, total) VALUES ('primes', ?, ?, 'done', 1.0, 9)",
                 (store_module.canonical_json(PRIMES), key))
    conn.execute("INSERT INTO events (run_id, time, host, kind, detail) VALUES (1, 2.0, 'a', 'up', '4 slots')")
    conn.execute("INSERT INTO events (run_id, time, host, kind, detail) VALUES (1, 3.0, 'a', 'up', '4 slots')")
    conn.execute("INSERT INTO blocks (run_id, lo, hi, host, started, finished, seconds, items, found)"
                 " VALUES (1, 1, 9, 'b', 5.0, 6.0, 1.0, 9, 4)")
    conn.execute("""INSERT INTO hosts (name, facts, last_seen) VALUES ('a', '{"slots": 8}', 9.0),"""
                 """ ('b', '{"cores": 3, "python": "3.6.9"}', 9.0)""")
    conn.execute("INSERT INTO calibration (host, job, variant, rate, measured) VALUES ('a', 'primes', '', 5.0, 1.5)")
    conn.close()
    with Store(db) as store:
        hosts = {h["name"]: h for h in store.run_hosts(1)}
        assert (hosts["a"]["slots"], hosts["a"]["joined"], hosts["a"]["facts"]) == (4, 2.0, {})
        assert (hosts["b"]["slots"], hosts["b"]["joined"]) == (3, 5.0)
        assert hosts["b"]["facts"]["python"] == "3.6.9"
        (calibration,) = store.calibrations("primes")
        assert (calibration["mode"], calibration["lo"], calibration["rate"]) == ("count", None, 5.0)
        store.upsert_host("a", {"slots": 16})  # a later hello changes nothing of run 1
        assert store.run_hosts(1)[0]["slots"] == 4


def test_failed_migration_leaves_the_store_as_it_was(db, monkeypatch):
    Store(db).close()

    def broken(conn):
        conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")
        raise RuntimeError("migration bug")

    now = store_module.SCHEMA_VERSION
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", now + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, now + 1, broken)
    with pytest.raises(RuntimeError):
        Store(db)
    monkeypatch.undo()
    with Store(db) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == now
        columns = [r[1] for r in store._conn.execute("PRAGMA table_info(runs)")]
        assert "note" not in columns


def test_corrupt_store_is_reported_not_crashed_on(db):
    with Store(db) as store:
        run = store.open_run("primes", PRIMES, 10**6)
        store.commit_blocks([row(run, lo * 10, payload=os.urandom(3000)) for lo in range(200)])
    size = db.stat().st_size
    with open(db, "r+b") as handle:  # keep page 1 (header, schema), garble the rest
        handle.seek(4096)
        handle.write(os.urandom(size - 4096))
    try:
        with Store(db) as store:
            assert not store.integrity_ok()
    except StoreError as err:  # acceptable too: refused on open, in one line
        assert "\n" not in str(err) and str(db) in str(err)


def test_readers_are_not_blocked_by_a_writer(db):
    with Store(db) as store:
        run = store.open_run("primes", PRIMES, 1000)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runs SET total = 5")
    started = time.monotonic()
    with Store(db) as reader:
        assert reader.run(run)["total"] == 1000  # uncommitted change not seen
        assert reader.done_ranges(run) == []
    assert time.monotonic() - started < 1.0
    writer.execute("ROLLBACK")
    writer.close()


# -- runs ---------------------------------------------------------------------------------


def test_same_job_and_params_reopen_the_same_run(db):
    with Store(db) as store:
        run = store.open_run("primes", PRIMES, 1000)
        store.finish_run(run, "interrupted")
    with Store(db) as store:
        assert store.open_run("primes", PRIMES, 1000) == run
        info = store.run(run)
        assert info["state"] == "running" and info["finished"] is None
        assert info["params"] == PRIMES
        assert [e["kind"] for e in store.events(run)] == ["start", "interrupted", "resume"]


def test_params_order_does_not_matter(store):
    run = store.open_run("primes", {"start": 1, "end": 9, "mode": "list"}, 9)
    assert store.open_run("primes", {"mode": "list", "end": 9, "start": 1}, 9) == run
    assert store.find_run("primes", {"end": 9, "mode": "list", "start": 1}) == run
    assert store.open_run("primes", {"start": 1, "end": 10, "mode": "list"}, 10) != run
    assert store.open_run("scrape", {"start": 1, "end": 9, "mode": "list"}, 9) != run
    assert store.find_run("primes", {"start": 2}) is None


def test_fresh_replaces_the_old_run_keeping_its_history_and_frees_its_results(store):
    old = store.open_run("primes", PRIMES, 1000)
    store.commit_blocks([row(old, 1, payload=b"old result")])
    store.record_run_host(old, "a", {"slots": 2}, 2)
    new = store.open_run("primes", PRIMES, 1000, fresh=True)
    assert new != old
    assert store.run(old)["state"] == "replaced" and store.run(old)["superseded_by"] == new
    assert store.run(new)["superseded_by"] is None
    assert len(store.blocks(old)) == 1 and store.run_hosts(old)[0]["slots"] == 2  # its history, for stats
    assert store.blocks(old)[0]["bytes"] is None
    assert store._conn.execute("SELECT count(*) FROM payloads").fetchone()[0] == 0
    assert store.find_run("primes", PRIMES) == new
    assert store.open_run("primes", PRIMES, 1000) == new
    assert [r["id"] for r in store.runs()] == [old, new]


def test_finish_run_records_state_and_time(store):
    run = store.open_run("primes", PRIMES, 1000)
    store.finish_run(run, "done")
    info = store.run(run)
    assert info["state"] == "done" and info["finished"] >= info["started"]
    with pytest.raises(ValueError):
        store.finish_run(run, "great")
    assert store.run(run + 1) is None


def test_runs_and_totals_count_committed_blocks(store):
    run = store.open_run("primes", PRIMES, 1000)
    other = store.open_run("primes", {"start": 5, "end": 6}, 2)
    store.commit_blocks([row(run, 0), row(run, 10), row(run, 20, size=5)])
    totals = store.run_totals(run)
    assert totals == {"blocks": 3, "items": 25, "found": 0 + 3 + 6, "seconds": 4.5}
    assert store.run_totals(other) == {"blocks": 0, "items": 0, "found": 0, "seconds": 0.0}
    listed = {r["id"]: r for r in store.runs()}
    assert (listed[run]["blocks"], listed[run]["items"], listed[run]["found"]) == (3, 25, 9)
    assert listed[other]["items"] == 0


# -- blocks -------------------------------------------------------------------------------


def test_block_commits_exactly_once(store):
    run = store.open_run("primes", PRIMES, 1000)
    assert store.commit_blocks([row(run, 1, payload=b"first")]) == [True]
    assert store.commit_blocks([row(run, 1, payload=b"second", host="other")]) == [False]
    assert list(store.iter_payloads(run)) == [(1, 10, b"first")]
    assert [b["host"] for b in store.blocks(run)] == ["pi"]
    assert store.run_totals(run)["blocks"] == 1


def test_batch_commit_flags_each_row(store):
    run = store.open_run("primes", PRIMES, 1000)
    store.commit_blocks([row(run, 20)])
    flags = store.commit_blocks([row(run, 0), row(run, 10), row(run, 20), row(run, 10)])
    assert flags == [True, True, False, False]
    assert store.done_ranges(run) == [(0, 9), (10, 19), (20, 29)]


def test_batch_is_one_transaction(store):
    run = store.open_run("primes", PRIMES, 1000)
    bad = row(run, 50)
    bad.hi = 40  # hi < lo violates a CHECK: the whole batch must be rolled back
    with pytest.raises(StoreError) as caught:
        store.commit_blocks([row(run, 0), row(run, 10), bad])
    assert "\n" not in str(caught.value)
    assert store.done_ranges(run) == []
    assert store.commit_blocks([row(run, 0)]) == [True]


def test_block_details_for_stats(store):
    run = store.open_run("primes", PRIMES, 1000)
    store.commit_blocks([
        row(run, 10, payload=b"12345", attempts=2, meta={"b": 1, "a": [1, 2]}),
        row(run, 0, seconds=0.25),
    ])
    first, second = store.blocks(run)
    assert (first["lo"], first["hi"], first["seconds"], first["bytes"]) == (0, 9, 0.25, None)
    assert (second["lo"], second["attempts"], second["bytes"]) == (10, 2, 5)
    assert second["meta"] == {"a": [1, 2], "b": 1}
    assert second["seconds"] == pytest.approx(1.5)  # finished - started by default
    assert "payload" not in second and "data" not in second


def test_iter_payloads_in_order_of_lo(store):
    run = store.open_run("primes", PRIMES, 10**9)
    los = list(range(0, 30000, 10))
    random.Random(5).shuffle(los)
    for start in range(0, len(los), 500):
        store.commit_blocks([
            row(run, lo, payload=None if lo % 70 == 0 else lo.to_bytes(4, "big"))
            for lo in los[start:start + 500]
        ])
    got = list(store.iter_payloads(run))
    assert [lo for lo, _, _ in got] == sorted(los)
    for lo, hi, payload in got:
        assert hi == lo + 9
        assert payload == (None if lo % 70 == 0 else lo.to_bytes(4, "big"))
    assert store.done_ranges(run) == [(lo, lo + 9) for lo in sorted(los)]


def test_iter_payloads_streams(store):
    run = store.open_run("primes", PRIMES, 10**9)
    chunk = 256 * 1024
    for start in range(0, 200, 50):  # 200 blocks, 50 MB of results
        store.commit_blocks([
            row(run, lo, payload=bytes([lo % 256]) * chunk) for lo in range(start, start + 50)
        ])
    tracemalloc.start()
    try:
        total = count = 0
        for lo, _hi, payload in store.iter_payloads(run):
            assert payload[0] == lo % 256
            total += len(payload)
            count += 1
            del payload
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (count, total) == (200, 200 * chunk)
    assert peak < 8 * chunk, f"peak {peak} bytes: payloads were not streamed"


def test_iter_payloads_reads_one_snapshot(db, store):
    run = store.open_run("primes", PRIMES, 10**6)
    store.commit_blocks([row(run, lo, payload=b"r") for lo in range(100, 200, 10)])
    rows = store.iter_payloads(run)
    assert next(rows)[0] == 100
    with Store(db) as other:  # commits while the export is half-way
        other.commit_blocks([row(run, 0, payload=b"late"), row(run, 500, payload=b"late")])
    assert [lo for lo, _, _ in rows] == list(range(110, 200, 10))
    assert len(store.done_ranges(run)) == 12


# -- the run lock -------------------------------------------------------------------------

HOLD_LOCK = """
    import sys, time
    from cluster.store import Store
    store = Store(sys.argv[1])
    store.lock_run(int(sys.argv[2]))
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_is_refused_while_its_holder_lives_then_taken_over(db, store):
    run = store.open_run("primes", PRIMES, 1000)
    holder = python(HOLD_LOCK, db, run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as caught:
            store.lock_run(run)
        message = str(caught.value)
        assert message.startswith(
            f"run {run} is already being worked on by PID {holder.pid}"
            f" on host {socket.gethostname()} (started "
        )
        assert "\n" not in message
        assert store.lock_holder(run)["pid"] == holder.pid
        with pytest.raises(StoreError, match="already being worked on"):
            store.open_run("primes", PRIMES, 1000, fresh=True)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead (SIGKILL, no unlock): its lock is stale and taken over.
    assert store.lock_holder(run) is None
    store.lock_run(run)
    assert store.lock_holder(run)["pid"] == os.getpid()


@pytest.mark.slow
def test_lock_is_race_free_between_processes(db, store):
    run = store.open_run("primes", PRIMES, 1000)
    race = """
        import sys, time
        from cluster.errors import StoreError
        from cluster.store import Store
        store = Store(sys.argv[1])
        time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
        try:
            store.lock_run(int(sys.argv[2]))
        except StoreError:
            print("lost", flush=True)
        else:
            print("won", flush=True)
            time.sleep(1)
    """
    start_at = time.time() + 1.5
    procs = [python(race, db, run, start_at) for _ in range(4)]
    outcomes = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert outcomes == ["lost", "lost", "lost", "won"]


def test_lock_from_another_host_is_refused_unless_forced(db, store):
    run = store.open_run("primes", PRIMES, 1000)
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO locks (run_id, pid, hostname, since) VALUES (?, 1, 'elsewhere', ?)",
        (run, time.time()),
    )
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="by PID 1 on host elsewhere"):
        store.lock_run(run)
    store.lock_run(run, force=True)
    assert store.lock_holder(run)["hostname"] == socket.gethostname()


def test_lock_whose_pid_was_reused_is_stale(db, store):
    run = store.open_run("primes", PRIMES, 1000)
    store.lock_run(run)
    conn = sqlite3.connect(db)  # same PID, but another process's start time
    conn.execute("UPDATE locks SET token = 'another-boot:123'")
    conn.commit()
    conn.close()
    assert store.lock_holder(run) is None
    with Store(db) as other:
        other.lock_run(run)


def test_unlock_releases_only_our_own_lock(db, store):
    run = store.open_run("primes", PRIMES, 1000)
    store.lock_run(run)
    store.unlock_run(run)
    assert store.lock_holder(run) is None
    holder = python(HOLD_LOCK, db, run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        store.unlock_run(run)  # not ours: stays
        assert store.lock_holder(run)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


# -- crashes ------------------------------------------------------------------------------

CRASHY_WRITER = """
    import hashlib, sys
    from cluster.store import BlockRow, BlockWriter, Store

    def committed(row, new):
        print(row.lo, int(new), flush=True)

    store = Store(sys.argv[1])
    run = store.open_run("primes", {"end": 4000}, 4000)
    done = {lo for lo, _ in store.done_ranges(run)}
    store.close()
    writer = BlockWriter(sys.argv[1], on_commit=committed, max_batch=8, max_delay=0.01)
    for lo in range(0, 4000, 10):
        if lo in done and lo % 50:
            continue  # resume: skip done blocks, but offer a few again (duplicates)
        payload = hashlib.sha256(str(lo).encode()).digest() * 2048
        writer.put(BlockRow(run, lo, lo + 9, "pi", 0.0, 1.0, 10, 1, payload=payload))
    writer.close()
    print("finished", flush=True)
"""


def test_sigkill_mid_commit_leaves_a_consistent_store(db):
    news: list[int] = []
    rng = random.Random(7)
    for _ in range(4):
        child = python(CRASHY_WRITER, db)
        wanted = rng.randrange(5, 60)
        seen = 0
        for line in child.stdout:
            lo, new = map(int, line.split())
            news.extend([lo] if new else [])
            seen += 1
            if seen >= wanted:
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
        assert child.returncode == -signal.SIGKILL
        with Store(db) as store:
            assert store.integrity_ok()
            run = store.find_run("primes", {"end": 4000})
            stored = [lo for lo, _ in store.done_ranges(run)]
            assert len(stored) == len(set(stored))
            assert set(news) <= set(stored)  # every commit that was reported is there
    child = python(CRASHY_WRITER, db)
    for line in child.stdout:
        if line.strip() != "finished":
            lo, new = map(int, line.split())
            news.extend([lo] if new else [])
    assert child.wait() == 0
    # A block committed just before a kill may never have been reported; none twice.
    assert len(news) == len(set(news)), "a block was committed twice"
    with Store(db) as store:
        assert store.integrity_ok()
        run = store.find_run("primes", {"end": 4000})
        assert store.done_ranges(run) == [(lo, lo + 9) for lo in range(0, 4000, 10)]
        for lo, _hi, payload in store.iter_payloads(run):
            assert payload == hashlib.sha256(str(lo).encode()).digest() * 2048


# -- the writer thread --------------------------------------------------------------------


def test_writer_commits_and_calls_back_per_row(db, store):
    run = store.open_run("primes", PRIMES, 10**6)
    store.commit_blocks([row(run, 0)])
    calls = []

    def on_commit(block, new):
        calls.append((block.lo, new, threading.current_thread().name))

    with BlockWriter(db, on_commit=on_commit, max_batch=16) as writer:
        for lo in range(0, 1000, 10):
            writer.put(row(run, lo, payload=str(lo).encode()))
        writer.put(row(run, 500))
        writer.flush(timeout=30)
        assert writer.pending == 0
        assert len(calls) == 101
        assert [(lo, new) for lo, new, _ in calls] == (
            [(0, False)] + [(lo, True) for lo in range(10, 1000, 10)] + [(500, False)]
        )
        assert {name for _, _, name in calls} != {threading.current_thread().name}
        assert len(store.done_ranges(run)) == 100
    assert writer.error is None


def test_writer_close_commits_what_is_queued(db, store):
    run = store.open_run("primes", PRIMES, 10**6)
    writer = BlockWriter(db, max_delay=5.0)
    for lo in range(0, 500, 10):
        writer.put(row(run, lo))
    writer.close()
    assert len(store.done_ranges(run)) == 50
    with pytest.raises(RuntimeError):
        writer.put(row(run, 1000))
    writer.close()  # twice is fine


def test_writer_flush_times_out_while_the_store_is_locked(db, store):
    run = store.open_run("primes", PRIMES, 10**6)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with BlockWriter(db) as writer:
        writer.put(row(run, 0))
        with pytest.raises(StoreError, match="not written within"):
            writer.flush(timeout=0.3)
        blocker.execute("ROLLBACK")  # released within the busy timeout: no harm done
        writer.flush(timeout=30)
        assert writer.error is None
    blocker.close()
    assert store.done_ranges(run) == [(0, 9)]


def test_writer_on_a_bad_file_fails_at_once(db):
    db.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a beowulf store"):
        BlockWriter(db)


def test_writer_error_when_the_disk_refuses_writes(db, store):
    """A real write failure: the kernel refuses to grow files past RLIMIT_FSIZE (EFBIG),
    as it would with ENOSPC on a full disk. SIGXFSZ is ignored so write() fails instead."""
    run = store.open_run("primes", PRIMES, 10**6)
    committed = []
    writer = BlockWriter(db, on_commit=lambda block, new: committed.append(block.lo))
    writer.put(row(run, 0, payload=b"small"))
    writer.flush(timeout=30)
    files = [db, Path(f"{db}-wal")]
    limit = max(path.stat().st_size for path in files if path.exists()) + 64 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        writer.put(row(run, 10, payload=os.urandom(2 * 1024 * 1024)))
        with pytest.raises(StoreError) as caught:
            writer.flush(timeout=30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(caught.value).startswith(f"{db}: committing blocks failed (")
    assert "\n" not in str(caught.value)
    assert isinstance(writer.error, StoreError)
    with pytest.raises(StoreError):
        writer.put(row(run, 20))
    writer.close()
    assert committed == [0]
    assert store.integrity_ok()  # the failed transaction left nothing behind
    assert store.done_ranges(run) == [(0, 9)]
    with BlockWriter(db) as again:  # space is back: resume works
        again.put(row(run, 10, payload=b"retry"))
    assert store.done_ranges(run) == [(0, 9), (10, 19)]


# -- hosts, events, calibration -----------------------------------------------------------


def test_hosts_merge_facts_and_track_last_seen(store):
    store.upsert_host("pi", {"cores": 4, "python": "3.7.3"})
    first = store.hosts()[0]["last_seen"]
    store.upsert_host("desktop", {"cores": 8})
    store.upsert_host("pi", {"python": "3.9.2", "temp": 51.0})
    hosts = store.hosts()
    assert [h["name"] for h in hosts] == ["desktop", "pi"]
    assert hosts[1]["facts"] == {"cores": 4, "python": "3.9.2", "temp": 51.0}
    assert hosts[1]["last_seen"] >= first


def test_events_are_kept_in_order(store):
    run = store.open_run("primes", PRIMES, 1000)
    store.add_event(run, "pi", "retry", "block 10: timeout")
    store.add_event(run, "pi", "quarantine")
    store.add_event(None, "desktop", "lost")
    kinds = [(e["kind"], e["host"], e["detail"]) for e in store.events(run)]
    assert kinds == [("start", None, ""), ("retry", "pi", "block 10: timeout"),
                     ("quarantine", "pi", "")]
    assert len(store.events()) == 4


def test_calibrations_are_all_kept_with_what_they_measured(store):
    store.set_calibration("pi", "primes", 1.0e6, mode="count", lo=1, hi=10)
    store.set_calibration("pi", "primes", 2.0e6, mode="list", lo=5, hi=50, run_id=3, slots=4)
    store.set_calibration("pi", "scrape", 3.0, variant="tor")
    rates = [(c["host"], c["job"], c["variant"], c["mode"], c["lo"], c["hi"], c["run_id"], c["rate"])
             for c in store.calibrations()]
    assert rates == [("pi", "primes", "", "count", 1, 10, None, 1.0e6), ("pi", "primes", "", "list", 5, 50, 3, 2.0e6),
                     ("pi", "scrape", "tor", "", None, None, None, 3.0)]
    assert len(store.calibrations("scrape")) == 1
