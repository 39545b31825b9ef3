"""The coordinator in-process with real local agents: exactly once, invalid results, failures."""

from __future__ import annotations

import os

import pytest
from fabric import Config

from cluster.coordinator import Coordinator
from cluster.errors import JobError
from cluster.inventory import Host
from cluster.jobs.primes import InvalidResult
from cluster.jobs.trivial import TrivialJob
from cluster.store import Store


def local(name: str, nice: int = 10, slots: int = 2) -> Host:
    return Host(name=name, address="local", slots=slots, nice=nice)


def committed(db) -> list[dict]:
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        return sorted(store.blocks(run_id), key=lambda b: b["lo"])


def test_many_tiny_blocks_each_committed_once(tmp_path):
    db = tmp_path / "r.db"
    outcome = Coordinator(TrivialJob(3000, "noop"), [local("a"), local("b")], Config(), str(db)).run()
    assert outcome.items_total == 3000 and outcome.found_total == 3000
    blocks = committed(db)
    assert [b["lo"] for b in blocks] == list(range(3000))
    assert {b["host"] for b in blocks} == {"a", "b"}


class RejectNice(TrivialJob):
    """Echo blocks; results from workers at niceness 5 (host "liar") are declared invalid.

    The agents add their niceness to this process's own (os.nice increments), so a suite run
    under ``nice -n 10`` has the liar's workers at 15."""

    def check(self, lo, hi, result):
        if result.get("nice") == os.nice(0) + 5:
            raise InvalidResult("wrong answer")
        return super().check(lo, hi, result)


def test_invalid_results_are_redone_elsewhere_and_host_flagged(tmp_path):
    db = tmp_path / "r.db"
    job = RejectNice(40, "echo", args={"sleep": 0.05}, block=1)  # long enough for both hosts to start
    outcome = Coordinator(job, [local("honest", nice=10), local("liar", nice=5)], Config(), str(db)).run()
    assert outcome.found_total == 40
    assert {b["host"] for b in committed(db)} == {"honest"}
    liar = next(h for h in outcome.hosts if h.name == "liar")
    assert liar.invalid >= 1
    with Store(db) as store:
        kinds = {e["kind"] for e in store.events() if e["host"] == "liar"}
    assert "invalid" in kinds


@pytest.mark.slow
def test_a_block_that_always_fails_stops_the_run(tmp_path):
    db = tmp_path / "r.db"
    job = TrivialJob(5, "fail", args={"message": "disk on fire"})
    # Twice at least: if b comes up late (a loaded machine), a may fail the block again first.
    with pytest.raises(JobError, match=r"failed [2-6] times \(on a, b\); last: RuntimeError: disk on fire"):
        Coordinator(job, [local("a"), local("b")], Config(), str(db)).run()
    with Store(db) as store:
        assert store.runs()[-1]["state"] == "failed"


def test_resume_redoes_only_what_is_missing(tmp_path):
    db = tmp_path / "r.db"
    hosts = [local("a")]
    Coordinator(TrivialJob(50, "noop"), hosts, Config(), str(db)).run()
    again = Coordinator(TrivialJob(50, "noop"), hosts, Config(), str(db)).run()
    assert again.already_done and again.items_total == 50
    fresh = Coordinator(TrivialJob(50, "noop"), hosts, Config(), str(db), fresh=True).run()
    assert not fresh.already_done and fresh.items_total == 50


def test_second_coordinator_on_the_same_run_is_refused(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as store:
        run_id = store.open_run("noop", TrivialJob(10).params(), 10)
        store.lock_run(run_id)
        with pytest.raises(Exception, match="already being worked on by PID"):
            Coordinator(TrivialJob(10, "noop"), [local("a")], Config(), str(db)).run()
        store.unlock_run(run_id)


class RejectOne(TrivialJob):
    """Echo blocks; the result for item 3 is declared invalid (on whichever host ran it)."""

    def check(self, lo, hi, result):
        if lo == 3:
            raise InvalidResult("wrong answer for 3")
        return super().check(lo, hi, result)


@pytest.mark.slow
def test_a_run_with_nothing_left_it_may_do_ends_naming_it(tmp_path):
    # Item 3 was invalid on the only host: that host may not take it again and no other host
    # can come: the run used to wait for ever; it ends, naming what it gave up on.
    import threading

    db = tmp_path / "r.db"
    errors = []

    def run():
        try:
            Coordinator(RejectOne(8, "echo", block=1), [local("only")], Config(), str(db)).run()
        except JobError as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the run did not end"
    assert errors and "gave up on [3, 3] (not on only)" in str(errors[0]), errors
    assert [b["lo"] for b in committed(db)] == [0, 1, 2, 4, 5, 6, 7]  # the rest is kept


def test_link_factory_and_a_host_joining_mid_run(tmp_path):
    # The hooks another engine uses (cluster/engines/dask.py): links made by a factory, and a host
    # handed over by join() while the run goes (a Dask worker that joined) starts and gets work.
    from cluster.agents import HostLink

    made = []

    def factory(host, *args, **kwargs):
        made.append(host.name)
        return HostLink(host, *args, **kwargs)

    db = tmp_path / "r.db"
    job = TrivialJob(60, "echo", args={"sleep": 0.05}, block=1)
    coordinator = Coordinator(job, [local("first", slots=1)], Config(), str(db), link_factory=factory)
    original = coordinator._committed

    def committed_then_join(event):
        original(event)
        if coordinator.done_items == 5:
            coordinator.join(local("joiner", slots=1))

    coordinator._committed = committed_then_join
    outcome = coordinator.run()
    assert outcome.items_total == 60
    assert made == ["first", "joiner"]
    assert {b["host"] for b in committed(db)} == {"first", "joiner"}
    assert [b["lo"] for b in committed(db)] == list(range(60))
