"""Block bookkeeping (pure): gaps, cutting, redo, endgame duplicates, stale results."""

from __future__ import annotations

import time

from cluster.scheduler import Schedule, _gaps


def test_gaps_from_committed_blocks():
    assert _gaps(1, 100, []) == [[1, 100]]
    assert _gaps(1, 100, [(1, 10), (11, 20), (50, 60)]) == [[21, 49], [61, 100]]
    assert _gaps(1, 100, [(1, 100)]) == []
    assert _gaps(5, 10, [(0, 6), (9, 20)]) == [[7, 8]]


def test_cuts_blocks_and_leaves_no_sliver():
    schedule = Schedule(0, 10_499, [], min_block=1000)
    _, first = schedule.next_block("a", 5000)
    assert (first.lo, first.hi) == (0, 4999)
    _, second = schedule.next_block("a", 5000)
    assert (second.lo, second.hi) == (5000, 10_499)  # 500 left over would be a sliver: absorbed
    assert schedule.next_block("a", 5000) is None
    assert schedule.uncut() == 0 and not schedule.finished()


def test_redo_comes_first_and_avoids_hosts_that_lied():
    schedule = Schedule(0, 99_999, [], min_block=1000)
    task, block = schedule.next_block("a", 1000)
    assert schedule.give_back(task, invalid=True) is block
    assert schedule.next_block("a", 1000)[1] is not block  # a is avoided for that block
    task_b, again = schedule.next_block("b", 1000)
    assert again is block and block.attempts == 2


def test_complete_returns_copies_to_cancel_and_ignores_stale():
    schedule = Schedule(0, 1999, [], min_block=1000)
    slow_task, block = schedule.next_block("slow", 1000)
    schedule.set_expected(slow_task, 60.0)
    fast_task, _ = schedule.next_block("fast", 1000)
    schedule.set_expected(fast_task, 10.0)
    duplicate = schedule.duplicate_for("idle", now=time.monotonic())
    assert duplicate is not None and duplicate[1] is block
    dup_task = duplicate[0]
    done, others = schedule.complete(dup_task)
    assert done is block and others == [("slow", slow_task)]
    assert schedule.complete(slow_task) is None  # the loser's late answer is stale
    assert schedule.give_back(slow_task) is None


def test_lost_host_blocks_are_redone():
    schedule = Schedule(0, 2999, [], min_block=1000)
    for _ in range(3):
        schedule.next_block("a", 1000)
    for task in schedule.tasks_of("a"):
        schedule.give_back(task)
    assert len(schedule.redo) == 3 and not schedule.in_flight
    los = sorted(schedule.next_block("b", 1000)[1].lo for _ in range(3))
    assert los == [0, 1000, 2000]


def test_no_duplicate_of_block_about_to_finish():
    schedule = Schedule(0, 999, [], min_block=1000)
    task, _ = schedule.next_block("a", 1000)
    schedule.set_expected(task, 5.0)
    assert schedule.duplicate_for("b", own_seconds=lambda block: 10.0) is None  # b would be later
    assert schedule.duplicate_for("b", own_seconds=lambda block: 1.0) is not None


def test_overdue_block_is_duplicated_first():
    schedule = Schedule(0, 2999, [], min_block=1000)
    late, late_block = schedule.next_block("a", 1000)
    schedule.set_expected(late, 0.0)  # already past its expected finish: a straggler
    other, _ = schedule.next_block("b", 1000)
    schedule.set_expected(other, 60.0)
    assert schedule.duplicate_for("c", own_seconds=lambda block: 100.0)[1] is late_block


def test_finished_after_all_complete():
    schedule = Schedule(0, 1999, [(0, 999)], min_block=1000)
    task, block = schedule.next_block("a", 5000)
    assert (block.lo, block.hi) == (1000, 1999)
    schedule.complete(task)
    assert schedule.finished()


def test_overdue_block_prefers_another_host_but_is_never_stuck():
    schedule = Schedule(0, 9_999, [], min_block=1000)
    schedule.hosts_up = {"a", "b"}
    task, block = schedule.next_block("a", 10_000)
    schedule.give_back(task, avoid=True)  # overdue on a: b should take it, a only if b cannot
    assert schedule.next_block("a", 1000) is None
    task, again = schedule.next_block("b", 1000)
    assert again is block
    schedule.give_back(task, avoid=True)  # overdue on b as well: either host may take it now
    assert schedule.next_block("a", 1000)[1] is block
    assert "[0, 9999]" not in schedule.waiting()  # in flight, not waiting
    schedule.give_back(schedule.tasks_of("a")[0], invalid=True)
    schedule.hosts_up.discard("b")
    assert schedule.next_block("a", 1000) is None  # an invalid result bans a from it
    assert schedule.waiting() == "[0, 9999] (not on a)"
