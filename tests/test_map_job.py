"""The map job's coordinator side alone: its schedule, hostile results, shipped tars, names."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest

from cluster import mapinput, mapship, mapstore
from cluster.errors import UsageError
from cluster.jobs.base import COMMIT, KIND_DIED, RETRY
from cluster.jobs.map import InvalidMapResult, MapJob, MapSpec, safe_relative
from cluster.mapschedule import MapSchedule
from cluster.store import Store


@pytest.fixture
def job_of(tmp_path):
    """``job_of(spec, input)``: a MapJob bound to a fresh store with its schedule made."""
    stores = []

    def make(spec: MapSpec, map_input, shipment=None) -> MapJob:
        job = MapJob(spec, map_input, shipment)
        store = Store(tmp_path / f"s{len(stores)}.db")
        stores.append(store)
        store.migrate_job(job)
        run_id = store.open_run(job.name, job.params(), job.total)
        job.bind(run_id, store)
        job.make_schedule(store.done_ranges(run_id), 1)
        return job

    yield make
    for store in stores:
        store.close()


def test_schedule_numbers_blocks_past_the_base_and_splits_a_dying_block():
    schedule = MapSchedule([[1, 10]], 10, base=500)
    task, block = schedule.next_block("h1", 4)
    assert (block.lo, block.hi, list(block.seqs)) == (500, 503, [1, 2, 3, 4])
    _, second = schedule.next_block("h1", 100)
    assert list(second.seqs) == list(range(5, 11)) and second.lo == 504 and schedule.uncut() == 0
    block.split_on_death = True
    schedule.give_back(task)
    halves = list(schedule.redo)
    assert [list(b.seqs) for b in halves] == [[1, 2], [3, 4]] and halves[0].lo >= 510
    assert not schedule.finished()


def test_the_endgame_never_copies_a_block_whose_worker_died():
    # A copy of it would die too; each death left the other copy in flight, so the block never came
    # back to be split: two hosts took turns copying and dying on it (seen on the Dask engine).
    schedule = MapSchedule([[1, 10]], 10, base=1)
    task, block = schedule.next_block("h1", 10)
    assert schedule.duplicate_for("h2", now=time.monotonic() + 100)[1] is block  # an ordinary straggler
    schedule = MapSchedule([[1, 10]], 10, base=1)
    task, block = schedule.next_block("h1", 10)
    block.split_on_death = True  # MapJob.failure on its first copy's death
    assert schedule.duplicate_for("h2", now=time.monotonic() + 100) is None
    schedule.give_back(task)
    assert [list(b.seqs) for b in schedule.redo] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    alone = MapSchedule([[7, 7]], 1, base=1)
    task, block = alone.next_block("h1", 1)
    assert not alone.crashed(block)  # an item alone that killed its worker once
    assert alone.duplicate_for("h2", now=time.monotonic() + 100) is None


def test_function_results_are_checked_field_by_field(job_of):
    job = job_of(MapSpec(mode="function", function="m:f"), mapinput.open_input(range_text="1:4"),
                 shipment=mapship.Shipment(b"", "ab" * 16, "m:f", 1, 1))
    task, block = job.schedule.next_block("h1", 4)
    good = {"seq": [1, 2, 3, 4], "t0": 1.7e9, "start_us": [0, 1, 2, 3], "us": [1, 1, 1, 1], "value": [1, 2, 3, 4]}
    bad_results = [
        {"columns": dict(good, seq=[1, 2, 3, 9]), "failed": [], "left": []},  # an item not sent
        {"columns": dict(good, seq=[1, 2, 3, 3]), "failed": [], "left": []},  # one twice
        {"columns": dict(good, us=[1, 1, 1]), "failed": [], "left": []},  # columns of two lengths
        {"columns": dict(good, us=[1, -1, 1, 1]), "failed": [], "left": []},
        {"columns": dict(good, t0=float("nan")), "failed": [], "left": []},
        {"columns": dict(good, seq=[1, 2, 3], start_us=[0, 1, 2], us=[1, 1, 1], value=[1, 2, 3]),
         "failed": [], "left": []},  # an item without an answer
        {"columns": dict(good, seq=[1, 2, 3], start_us=[0, 1, 2], us=[1, 1, 1], value=[1, 2, 3]),
         "failed": [], "left": ["4"]},
        {"columns": dict(good, value=[1, 2, 3, "x" * (2 << 20)]), "failed": [], "left": []},  # over the cap
        {"items": "no", "left": []},
        {"columns": dict(good, seq=[1, 2, 3], start_us=[0, 1, 2], us=[1, 1, 1], value=[1, 2, 3]),
         "failed": [{"seq": 4, "start": "soon", "seconds": 0, "error": "x"}], "left": []},
    ]
    for result in bad_results:
        with pytest.raises(InvalidMapResult):
            job.check(block.lo, block.hi, json.loads(json.dumps(result)))
    result = {"columns": dict(good), "failed": [], "left": []}
    assert job.check(block.lo, block.hi, result)[0] == 4
    assert result["_chunk"] == (1, 4)
    decision = job.decide(block, result, "h1")
    assert decision.action == COMMIT and block.size == 4
    assert job.rows(block, result, "h1") == [("map_chunks", mapstore.CHUNK_COLUMNS, [(1, 4, "h1", None)])]


def test_a_failed_item_is_retried_elsewhere_then_final(job_of):
    job = job_of(MapSpec(mode="function", function="m:f", retries=1), mapinput.open_input(range_text="1:2"),
                 shipment=mapship.Shipment(b"", "ab" * 16, "m:f", 1, 1))
    _, block = job.schedule.next_block("h1", 2)
    failed = {"seq": 2, "ok": False, "value": None, "timed_out": False, "start": 1.7e9, "seconds": 0.1,
              "error": "Traceback ...\nValueError: no"}
    columns = {"seq": [1], "t0": 1.7e9, "start_us": [0], "us": [5], "value": [10]}
    result = {"columns": columns, "failed": [failed], "left": []}
    job.check(block.lo, block.hi, result)
    job.decide(block, result, "h1")
    rows = job.rows(block, result, "h1")
    assert [(table, len(values)) for table, _, values in rows] == [("map_items", 1), ("map_attempts", 1)]
    assert block.size == 1
    again = job.schedule.redo[0]
    assert list(again.seqs) == [2] and again.elsewhere == {"h1"}
    job.schedule.redo.clear()
    job.schedule._assign(again, "h2")
    result = {"columns": dict(columns, seq=[], start_us=[], us=[], value=[]), "failed": [failed], "left": []}
    job.check(again.lo, again.hi, result)
    job.decide(again, result, "h2")
    (table, columns_, values), = job.rows(again, result, "h2")
    row = dict(zip(columns_, values[0]))
    assert table == "map_items" and row["status"] == "failed" and row["attempt"] == 2 and row["host"] == "h2"
    assert not job.schedule.redo


def test_an_item_killing_its_worker_becomes_a_verdict_after_3(job_of):
    job = job_of(MapSpec(mode="command", command="run {}"), mapinput.open_input(range_text="1:1"))
    task, block = job.schedule.next_block("h1", 1)
    for crash in (1, 2):
        decision = job.failure(block, KIND_DIED, "worker died (signal 9)", "h1")
        assert decision.action == RETRY and decision.record[0][0] == "map_attempts"
        assert decision.record[0][1]["attempt"] == crash
    decision = job.failure(block, KIND_DIED, "worker died (signal 9)", "h1")
    assert decision.action == RETRY and not decision.record and block.verdict
    assert job.task_args_for(block, type("L", (), {"name": "h1"})(), 1)["items"] == []
    result = {"items": [], "left": []}
    job.check(block.lo, block.hi, result)
    job.decide(block, result, "h2")
    (_, columns, values), = job.rows(block, result, "h2")
    row = dict(zip(columns, values[0]))
    assert row["status"] == "crashed" and row["attempt"] == 3 and row["host"] == "h1"


@pytest.mark.parametrize("name, expected", [
    ("a/b.gz", "a/b.gz"), ("/etc/passwd", "etc/passwd"), ("../../x", "_/_/x"), ("a/./../b", "a/_/b"), ("", "_"),
])
def test_returned_file_names_stay_inside_outdir(name, expected):
    assert safe_relative(name) == expected


def _tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


@pytest.mark.parametrize("name, kind", [("../evil.py", tarfile.REGTYPE), ("/abs.py", tarfile.REGTYPE),
                                        ("link.py", tarfile.SYMTYPE)])
def test_shipped_tar_with_a_bad_member_is_refused(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    data = b"x = 1\n" if kind == tarfile.REGTYPE else None
    info.size = len(data or b"")
    ship = tmp_path / "ship"
    ship.mkdir()
    tar = tmp_path / "ship.tar"
    tar.write_bytes(_tar([(info, data)]))
    done = subprocess.run([sys.executable, "-c", mapship._UNPACK, str(ship), "ab" * 16, str(tar), "t"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "refused" in done.stderr
    assert list(ship.iterdir()) == [] and not (tmp_path / "evil.py").exists()


def test_function_is_looked_for_in_the_source_not_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(
        "import sys\nfrom os import path as p\nraise SystemExit('never imported here')\n"
        "try:\n    from fast import g\nexcept ImportError:\n    def g(x):\n        return x\n"
        "h = lambda x: x\nclass C:\n    def method(self):\n        local = 1\n"
        "def setup():\n    global late\n    late = len\n")
    for name in ("sys", "p", "g", "h", "C", "setup", "late"):
        mapship.build(f"m.py:{name}")
    for name in ("missing", "local", "method"):
        with pytest.raises(UsageError, match=f"^--function m.py:{name}: m.py defines no {name} "):
            mapship.build(f"m.py:{name}")
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("def f(x):\n    return x\n")
    mapship.build("pkg.sub:f")
    with pytest.raises(UsageError, match="defines no nope"):
        mapship.build("pkg.sub:nope")
    # undecidable here: left to the hosts' import check
    (tmp_path / "dyn.py").write_text("globals()['f'] = len\n")
    (tmp_path / "star.py").write_text("from os.path import *\n")
    (tmp_path / "new.py").write_text("def f(x:\n    return x\n")  # a syntax this Python does not parse
    for spec in ("dyn.py:f", "star.py:join", "new.py:f"):
        mapship.build(spec)


def test_shipment_is_content_addressed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("1")
    first = mapship.build("m.py:f", ("data",))
    assert first.function == "m:f" and first.files == 2
    assert mapship.build("m.py:f", ("data/",)).digest == first.digest
    (tmp_path / "data" / "t.txt").write_text("2")
    assert mapship.build("m.py:f", ("data",)).digest != first.digest


def test_percentage_timeout_follows_each_hosts_median(job_of):
    job = job_of(MapSpec(mode="command", command="run {}", timeout_percent=300),
                 mapinput.open_input(range_text="1:20"))
    link = type("L", (), {"name": "h1"})()
    _, block = job.schedule.next_block("h1", 20)
    assert job.task_args_for(block, link, 1)["timeout"] is None  # nothing timed yet
    job.samples.extend([1.0, 2.0, 3.0])
    assert job.task_args_for(block, link, 1)["timeout"] == pytest.approx(6.0)
    job.host_samples["h1"] = [0.1, 0.1, 0.2]
    assert job.task_args_for(block, link, 1)["timeout"] == pytest.approx(0.3)


def test_crashes_before_a_resume_count(job_of, tmp_path):
    job = job_of(MapSpec(mode="command", command="run {}"), mapinput.open_input(range_text="1:1"))
    _, block = job.schedule.next_block("h1", 1)
    job.prior = {1: (2, 0, 2)}  # two crashes recorded by an earlier session (key of --range: the value)
    decision = job.failure(block, KIND_DIED, "worker died (signal 11)", "h1")
    assert decision.action == RETRY and block.verdict
    result = {"items": [], "left": []}
    job.check(block.lo, block.hi, result)
    job.decide(block, result, "h1")
    (_, columns, values), = job.rows(block, result, "h1")
    assert dict(zip(columns, values[0]))["attempt"] == 3


def _packed(chunk: dict, count=None, **extra) -> dict:
    import base64
    import zlib

    data = zlib.compress(json.dumps(chunk, separators=(",", ":")).encode("utf-8"), 1)
    result = {"pack": "zlib", "count": len(chunk["value"]) if count is None else count,
              "chunk": base64.b64encode(data).decode("ascii"), "failed": [], "left": [], "slot": 2}
    result.update(extra)
    return result


def _zlib_result(raw: bytes, count: int = 4) -> dict:
    import base64

    return {"pack": "zlib", "count": count, "chunk": base64.b64encode(raw).decode("ascii"), "failed": [], "left": []}


def test_packed_results_are_checked_and_stored_as_the_host_sent_them(job_of, monkeypatch):
    """A host's compressed chunk is parsed and checked like plain columns; a malformed, oversized
    or lying one is refused (the block is redone elsewhere), a good one stored byte for byte."""
    import zlib

    from cluster.jobs import map as map_module

    job = job_of(MapSpec(mode="function", function="m:f"), mapinput.open_input(range_text="1:4"),
                 shipment=mapship.Shipment(b"", "ab" * 16, "m:f", 1, 1))
    task, block = job.schedule.next_block("h1", 4)
    args = job.task_args_for(block, type("L", (), {"name": "h1"})(), task)
    assert args["pack"] == "zlib" and args["range"] == [1, 4, 1, 1]
    good = {"t0": 1.7e9, "seq0": 1, "us": [1, 2, 1, 1], "value": [1, 4, 9, 16]}
    monkeypatch.setattr(map_module, "MAX_CHUNK_BYTES", 4096)
    bad_results = [
        dict(_packed(good), chunk="not base64!"),
        _zlib_result(b"not zlib"),
        _zlib_result(zlib.compress(json.dumps(good).encode())[:-3]),  # truncated
        _zlib_result(zlib.compress(json.dumps(good).encode()) + b"tail"),  # bytes after the stream
        _zlib_result(zlib.compress(b"[" + b"1," * 5000 + b"1]")),  # a bomb: over MAX_CHUNK_BYTES once inflated
        _zlib_result(zlib.compress(b'{"t0": 1.7e9, "seq0": 1, "us": [1, 1, 1, 1], "value": [1, NaN, 3, 4]}')),
        _zlib_result(zlib.compress("\u00e9".encode("latin-1"))),  # not UTF-8
        _packed(good, count=3),  # a count that is not the columns'
        _packed(dict(good, extra=[1])),  # an unknown key
        _packed(dict(good, seq0=2)),  # an item not sent
        _packed(dict(good, seq=[1, 2, 3, 4])),  # seq0 and seq both
        _packed({k: v for k, v in good.items() if k != "seq0"}),  # neither
        _packed(dict({k: v for k, v in good.items() if k != "seq0"}, seq=[1, 2, 3, 9])),
        _packed(dict({k: v for k, v in good.items() if k != "seq0"}, seq=[1, 2, 3, 3])),  # one twice
        _packed(dict(good, us=[1, -1, 1, 1])),
        _packed(dict(good, us=[1, 1, 1, True])),
        _packed(dict(good, start_us=[0, 1, 2])),
        _packed(dict(good, t0=-5)),
        _packed(dict(good, seq0=1, us=[1, 1, 1], value=[1, 2, 3])),  # an item without an answer
        _packed(dict(good, value=[1, 2, 3, "x" * 5000])),  # a value over the cap
        _packed(good, slot=0),
        _packed(good, slot="1"),
        _packed(good, count=True),
        dict(_packed(good), pack="gzip"),
    ]
    job.spec.stdout_cap = 1000
    for result in bad_results:
        with pytest.raises(InvalidMapResult):
            job.check(block.lo, block.hi, json.loads(json.dumps(result)))
    result = _packed(good)
    assert job.check(block.lo, block.hi, result)[0] == 4
    payload = job.check(block.lo, block.hi, _packed(good))[1]
    assert payload == _raw_of(_packed(good))  # the host's bytes, not a second zlib
    assert mapstore.decode_chunk(payload, 4) == dict(good, start_us=[0, 1, 3, 4])
    job.decide(block, result, "h1")
    assert job.rows(block, result, "h1") == [("map_chunks", mapstore.CHUNK_COLUMNS, [(1, 4, "h1", 2)])]


def _raw_of(result: dict) -> bytes:
    import base64

    return base64.b64decode(result["chunk"])


def test_packed_results_with_failures_or_surrogates_become_rows(job_of):
    job = job_of(MapSpec(mode="function", function="m:f", retries=0), mapinput.open_input(range_text="1:3"),
                 shipment=mapship.Shipment(b"", "ab" * 16, "m:f", 1, 1))
    _, block = job.schedule.next_block("h1", 3)
    failed = {"seq": 2, "ok": False, "value": None, "timed_out": False, "start": 1.7e9, "seconds": 0.1,
              "error": "ValueError: no"}
    chunk = {"t0": 1.7e9, "seq": [1, 3], "us": [5, 6], "start_us": [0, 100], "value": ["a\ud800", 9]}
    result = _packed(chunk, failed=[failed])
    assert job.check(block.lo, block.hi, result) == (2, None)
    job.decide(block, result, "h1")
    (table, columns, values), = job.rows(block, result, "h1")
    rows = {row["seq"]: row for row in (dict(zip(columns, value)) for value in values)}
    assert table == "map_items" and sorted(rows) == [1, 2, 3]
    value = json.loads(rows[1]["value"])  # as cluster/agents.py stores any string: U+FFFD, never a surrogate
    assert value.startswith("a\ufffd") and set(value[1:]) == {"\ufffd"} and rows[1]["slot"] == 2
    assert rows[3]["start"] == pytest.approx(1.7e9 + 100e-6) and rows[2]["status"] == "failed"


def test_a_v1_store_is_migrated_and_its_rows_still_read(tmp_path):
    """Stores made before the map tables' version 3 (no slot column) keep working."""
    import sqlite3

    class V1:
        name = "map"
        migrations = mapstore.MIGRATIONS[:1]

    path = tmp_path / "v1.db"
    with Store(path) as store:
        store.migrate_job(V1())
        run_id = store.open_run("map", {"identity": "x"}, 3)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO map_items (run_id, lo, key, seq, status, host, start, seconds, attempt, value)"
                     " VALUES (?, 1, 3, 3, 'ok', 'h1', 1.7e9, 0.5, 1, '9')", (run_id,))
        conn.execute("INSERT INTO map_chunks (run_id, lo, seq, count, host) VALUES (?, 2, 1, 2, 'h2')", (run_id,))
        conn.execute("INSERT INTO payloads (run_id, lo, data) VALUES (?, 2, ?)", (run_id, mapstore.encode_chunk(
            1.7e9, [0, 10], [10, 10], "[1,4]")))
    conn.close()
    mapstore.ensure_tables(str(path))
    mapstore.ensure_tables(str(path))  # once only
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM job_schema WHERE job = 'map'").fetchone() == (3,)
    for table in ("map_items", "map_attempts", "map_chunks"):
        assert "slot" in [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
    conn.close()
    with Store(path) as store:
        store.migrate_job(MapJob(MapSpec(mode="function", function="m:f"), mapinput.open_input(range_text="1:3"),
                                 mapship.Shipment(b"", "ab" * 16, "m:f", 1, 1)))
    conn = mapstore.connect(str(path))
    try:
        records = list(mapstore.records_in_order(conn, run_id, mapinput.open_input(range_text="1:3")))
        assert [(r.seq, r.stdout, r.host, r.slot) for r in records] == [
            (1, b"1\n", "h2", None), (2, b"4\n", "h2", None), (3, b"9\n", "h1", None)]
        assert [r.seq for r in mapstore.attempts(conn, run_id, mapinput.open_input(range_text="1:3"))] == [1, 2, 3]
    finally:
        conn.close()


def test_chunks_are_exported_whole_as_item_by_item(tmp_path):
    """--export (text and .jsonl) and --joblog write a chunk's items from its columns, with no
    record per item: the same bytes as writing them one by one; rows of items in between merge in."""
    import sqlite3

    from cluster import mapexport

    path = tmp_path / "s.db"
    with Store(path) as store:
        run_id = store.open_run("map", {"identity": "x"}, 9)
    mapstore.ensure_tables(str(path))
    values = [1, -2, 3.5, "caf\u00e9\nline", [1, {"a": None}], None, True, 10**20]
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO map_chunks (run_id, lo, seq, count, host, slot) VALUES (?, 2, 1, 8, 'h\tx', 2)",
                     (run_id,))
        conn.execute("INSERT INTO payloads (run_id, lo, data) VALUES (?, 2, ?)", (run_id, mapstore.encode_chunk(
            1.7e9, [0, 10, 20, 30, 40, 50, 60, 70], [10] * 8, json.dumps(values, ensure_ascii=False))))
        conn.execute("INSERT INTO map_items (run_id, lo, key, seq, status, host, start, seconds, attempt, error, slot)"
                     " VALUES (?, 3, 27, 9, 'failed', 'h2', 1.7e9, 0.5, 1, 'ValueError: no', 1)", (run_id,))
    conn.close()
    conn = mapstore.connect(str(path))
    range_input = mapinput.open_input(range_text="3:27:3")

    def command_of(seq, item, slot):
        return f"f {item} slot {slot}\nx"

    try:
        for jsonl in (False, True):
            one_by_one = b"".join(mapexport.export_lines(mapstore.records_in_order(conn, run_id, range_input), jsonl))
            whole = b"".join(mapexport.export_lines(
                mapstore.records_in_order(conn, run_id, range_input, chunks=True), jsonl))
            assert whole == one_by_one and one_by_one.count(b"\n") >= 8
        text = b"".join(mapexport.export_lines(mapstore.records_in_order(conn, run_id, range_input), False))
        assert text.startswith(b"1\n-2\n3.5\n") and text.endswith(b"true\n100000000000000000000\n")
        one_by_one = b"".join(mapexport.joblog_lines(mapstore.attempts(conn, run_id, range_input), command_of))
        whole = b"".join(mapexport.joblog_lines(mapstore.attempts(conn, run_id, range_input, chunks=True), command_of))
        assert whole == one_by_one
        lines = whole.decode().splitlines()
        assert len(lines) == 10 and lines[1].split("\t")[0] == "1" and lines[1].endswith("f 3 slot 2\0x")
        assert lines[9].split("\t")[0] == "9" and lines[9].endswith("f 27 slot 1\0x")
    finally:
        conn.close()


def test_export_of_args_follows_the_input_when_lines_moved(tmp_path):
    """--export of an --args run: items still at the seq they ran with come from one ordered
    scan, items whose line moved are looked up by key; the order is the input's either way."""
    import sqlite3

    path = tmp_path / "s.db"
    with Store(path) as store:
        run_id = store.open_run("map", {"identity": "x"}, 4)
    mapstore.ensure_tables(str(path))
    (tmp_path / "old.txt").write_text("a\nb\nc\n")
    old = list(mapinput.open_input(args=str(tmp_path / "old.txt")))
    conn = sqlite3.connect(path)
    with conn:
        for item in old:
            conn.execute("INSERT INTO map_items (run_id, lo, key, seq, status, host, attempt, stdout)"
                         " VALUES (?, 1, ?, ?, 'ok', 'h', 1, ?)",
                         (run_id, item.key, item.seq, f"{item.value}!\n".encode()))
    conn.close()
    (tmp_path / "new.txt").write_text("a\nnew\nb\nc\nd\n")
    conn = mapstore.connect(str(path))
    try:
        records = list(mapstore.records_in_order(conn, run_id, mapinput.open_input(args=str(tmp_path / "new.txt"))))
    finally:
        conn.close()
    assert [(r.seq, r.stdout) for r in records] == [(1, b"a!\n"), (3, b"b!\n"), (4, b"c!\n")]


def test_ensure_tables_takes_a_slot_column_already_there(tmp_path):
    """A store whose slot column exists without its version recorded is brought to the last version."""
    import sqlite3

    path = tmp_path / "s.db"
    with Store(path):
        pass
    mapstore.ensure_tables(str(path))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE job_schema SET version = 2 WHERE job = 'map'")
    conn.close()
    mapstore.ensure_tables(str(path))
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM job_schema WHERE job = 'map'").fetchone() == (len(mapstore.MIGRATIONS),)
    conn.close()
