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
    assert job.rows(block, result, "h1") == [("map_chunks", mapstore.CHUNK_COLUMNS, [(1, 4, "h1")])]


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
