"""The scheduler loop: agents, blocks in flight, adaptive sizes, retries, endgame, resume.

One thread (the caller's) makes every decision, from events the host readers
and the store's writer put on one queue; so the bookkeeping needs no locks.
A block is committed once (the writer ignores a second result; the loop never
sends one); a block whose host was lost goes back to be redone elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .agents import PING_SECONDS, ByteBudget, Event, HostLink
from .errors import BeowulfError, JobError
from .fanout import MAX_CONCURRENT_HOSTS
from .inventory import Host
from .jobs.base import COMMIT, KIND_ERROR, KIND_INVALID, LOSE_HOST, RETRY, Decision
from .provision import local_bundle_hash
from .scheduler import MAX_BLOCK_FAILURES
from .store import BlockRow, BlockWriter, Store

log = logging.getLogger(__name__)
# A host that has not said anything (result or heartbeat) for this long is lost.
BEAT_TIMEOUT = 20.0
# Task failures in a row after which a host is quarantined (reconnected later).
FAILURES_TO_QUARANTINE = 3
# Reconnection back-off: first wait, doubling up to the cap.
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 120.0
# With no host up, give up after this many failed reconnects of every host.
RECONNECTS_BEFORE_GIVING_UP = 2
# A host lost this many times without a valid result in between counts as gone for good
# when deciding whether every host is lost.
LOSSES_BEFORE_GIVING_UP = 4
# A host's rate is (decayed items) / (decayed seconds): older blocks count this much less each
# time a block arrives, and a tiny block barely moves it (it carries little work).
RATE_DECAY = 0.7
# As the range runs out blocks shrink so that hosts finish together, but not below this
# fraction of --block-seconds of a slot's work: tinier blocks leave a host behind a slow
# link waiting on round trips (the endgame's duplicates take care of stragglers).
TAIL_FLOOR = 1 / 8
# Task deadline (docs/ARCHITECTURE.md, "Slow hosts"): a task still out after OVERDUE_FACTOR times its expected
# time on that host (from the host's own rate), and at least the job's floor (TASK_FLOOR
# unless the job says: a fetch is bounded by --timeout), is cancelled there and handed to a
# host with a free slot; OVERDUE_TO_QUARANTINE overdue tasks in a row quarantine the host.
OVERDUE_FACTOR = 4.0
TASK_FLOOR = 10.0
OVERDUE_TO_QUARANTINE = 2
# Seconds with work left, none in flight and nothing the hosts up may take before the run ends.
STALL_SECONDS = 2.0


@dataclass
class HostStats:
    """What one host did during this coordinator's run."""

    name: str
    slots: int = 0
    state: str = "starting"
    blocks: int = 0
    items: int = 0
    found: int = 0
    busy: float = 0.0
    rate: float = 0.0  # items per second per slot (work-weighted moving average)
    rate_items: float = 0.0
    rate_seconds: float = 0.0
    retries: int = 0  # blocks given back (host lost, cancelled by a failure)
    failures: int = 0  # tasks that failed or returned an invalid result
    invalid: int = 0
    failures_in_row: int = 0
    reconnects_failed: int = 0
    # Losses since its last valid result: a host that connects fine and then fails
    # (sends junk, dies) must back off too, not be reconnected every second.
    losses_in_row: int = 0
    next_attempt: float = 0.0
    reason: str = ""
    engine: str = ""
    overdue: int = 0  # tasks cancelled for being overdue and handed to another host
    overdue_in_row: int = 0
    # How much longer than expected its results take to come back (a slow link adds the
    # transfer, which ``elapsed`` leaves out): a decayed maximum, at least 1; widens its deadlines.
    turnaround: float = 1.0


@dataclass
class RunOutcome:
    """What the task layer prints: per-host stats, totals, messages."""

    run_id: int
    hosts: list[HostStats]
    items_total: int
    found_total: int
    seconds: float
    already_done: bool = False
    warnings: list[str] = field(default_factory=list)
    verify_mismatches: int = 0
    verified: int = 0


class Coordinator:
    """Runs one job over the given hosts, storing results in the store at ``store_path``."""

    def __init__(self, job, hosts: list[Host], config, store_path: str, *, fresh: bool = False,
                 block_seconds: float = 2.0, accept_new: bool = False, verify: float = 0.0,
                 progress: Optional[Callable[[int, int, list[HostStats]], None]] = None,
                 beat_seconds: float = 2.0, beat_timeout: float = BEAT_TIMEOUT,
                 task_floor: Optional[float] = None, link_factory: Optional[Callable[..., HostLink]] = None):
        self.job = job
        # What starts a host's agent: HostLink over SSH, or another engine's (cluster/engines/).
        self.link_factory = link_factory or HostLink
        self.hosts = hosts
        self.config = config
        self.store_path = str(store_path)
        self.fresh = fresh
        self.block_seconds = block_seconds
        self.accept_new = accept_new
        self.verify = verify
        self.progress = progress
        self.beat_seconds = beat_seconds
        self.beat_timeout = max(beat_timeout, 5 * beat_seconds)
        self.events: queue.Queue = queue.Queue()
        self._starting = threading.BoundedSemaphore(MAX_CONCURRENT_HOSTS)
        self.stats = {host.name: HostStats(host.name) for host in hosts}
        self.links: dict[str, HostLink] = {}
        self.up: set[str] = set()
        self.reconnecting: set[str] = set()
        self.warnings: list[str] = []
        self.verify_expect: dict[int, tuple] = {}
        self.verify_mismatches = 0
        self.verified = 0
        self.done_items = 0
        self.found_committed = 0
        self.task_floor = task_floor
        self.deadlines: dict[int, float] = {}  # task id -> monotonic time it is overdue
        self.stalled_since: Optional[float] = None
        self.overdue_checked = 0.0

    # ------------------------------------------------------------ entry point

    def run(self) -> RunOutcome:
        began = time.monotonic()
        store = Store(self.store_path)
        try:
            store.migrate_job(self.job)
            complete = None if self.fresh else self._already_complete(store, began)
            if complete is not None:
                return complete
            run_id = store.open_run(self.job.name, self.job.params(), self.job.total, fresh=self.fresh)
            store.lock_run(run_id)
            try:
                return self._run_locked(store, run_id, began)
            finally:
                store.unlock_run(run_id)
        finally:
            store.close()

    def _already_complete(self, store: Store, began: float) -> Optional[RunOutcome]:
        """The outcome of a finished run asked again, read without writing anything (no
        session, no event, no lock: its stats stay the same; README.md, "fab stats"); None
        when there is no such run or the job's schedule has work left (items added to the
        input, failed items the job runs again)."""
        run_id = store.find_run(self.job.name, self.job.params())
        run = store.run(run_id) if run_id is not None else None
        if run is None or run["state"] != "done" or run["total"] != self.job.total:
            return None
        self.run_id = run_id
        self.job.bind(run_id, store)
        schedule = self.job.make_schedule(store.done_ranges(run_id), self.job.min_block())
        if not schedule.finished():
            return None
        self.done_items = self.job.total
        self.found_committed = int(store.run_totals(run_id).get("found") or 0)
        return self._outcome(began, already_done=True)

    def _run_locked(self, store: Store, run_id: int, began: float) -> RunOutcome:
        self.run_id = run_id
        self.store = store
        self.tail_recorded = False
        done = store.done_ranges(run_id)
        self.job.bind(run_id, store)
        self.min_block = self.job.min_block()
        self.schedule = self.job.make_schedule(done, self.min_block)
        self.max_block = self.job.max_block()
        self.schedule.hosts_up = self.up  # who else could take a block (Schedule.shuns)
        if self.task_floor is None:
            floor = self.job.task_floor()
            self.task_floor = TASK_FLOOR if floor is None else floor
        totals = store.run_totals(run_id)
        self.done_items = self.job.total - self.schedule.remaining_at_start
        self.found_committed = int(totals.get("found") or 0)
        if self.schedule.finished():
            store.finish_run(run_id, "done")
            return self._outcome(began, already_done=True)
        self.writer = BlockWriter(self.store_path, on_commit=self._on_commit)
        state = "interrupted"
        try:
            self._start_links(store)
            self._loop()
            self.writer.flush()
            while not self.events.empty():
                event = self.events.get_nowait()
                if event.kind == "committed":
                    self._committed(event)
            if self.writer.error:
                raise JobError(f"cannot write results: {self.writer.error}")
            state = "done"
        except JobError:
            state = "failed"
            raise
        finally:
            self._close_links()
            self.writer.close()
            for stats in self.stats.values():  # listed by fab stats with 0 and this reason
                if stats.state == "starting":
                    self.writer_event(stats.name, "starting", "still starting when the run ended")
            store.finish_run(run_id, state)
        return self._outcome(began)

    def _close_links(self, timeout: float = 5.0) -> None:
        """Stop every agent (each closes its workers), waiting a little so none is left behind."""
        threads = [threading.Thread(target=link.retire, daemon=True) for link in self.links.values()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _outcome(self, began: float, already_done: bool = False) -> RunOutcome:
        for stats in self.stats.values():
            if stats.state == "starting" and not already_done:
                self.warnings.append(f"not used: {stats.name} was still starting when the run ended")
        return RunOutcome(self.run_id, list(self.stats.values()), self.done_items, self.found_committed,
                          time.monotonic() - began, already_done, self.warnings,
                          self.verify_mismatches, self.verified)

    # ------------------------------------------------------------ hosts

    def _start_links(self, store: Store) -> None:
        self.bundle = local_bundle_hash()
        self.budget = ByteBudget()  # results in flight, in bytes, over all hosts (agents.RESULT_BUDGET_BYTES)
        for host in self.hosts:
            self.links[host.name] = self._make_link(host)
        # Each host starts working as soon as it has said hello: a slow host (or one
        # that never answers) must not hold the others back.
        for name in self.links:
            self.reconnecting.add(name)
            threading.Thread(target=self._connect, args=(name,), name=f"connect-{name}", daemon=True).start()

    def _make_link(self, host: Host) -> HostLink:
        return self.link_factory(host, self.config, self.accept_new, self.events, self.job.check,
                                 self.bundle, beat_seconds=self.beat_seconds, preload=self.job.name,
                                 prepare=self.job.prepare_host, slot_factor=self.job.slot_factor(),
                                 budget=self.budget, encoded_fields=self.job.encoded_fields)

    def join(self, host: Host) -> None:
        """A host that appeared mid-run (a Dask worker that joined): it starts and gets work.
        Thread-safe: it goes through the event queue."""
        self.events.put(Event("join", _CommitLink, 0, {"host": host}))

    def _joined(self, host: Host) -> None:
        stats = self.stats.get(host.name)
        if stats is None:
            self.stats[host.name] = HostStats(host.name)
            self.links[host.name] = self._make_link(host)
        elif host.name in self.up or host.name in self.reconnecting:
            return
        else:  # known and lost (a worker back under its name): try it now
            self.links[host.name].host = host
            stats.next_attempt = 0.0
            stats.reconnects_failed = 0
            if stats.state == "excluded":
                stats.state = "starting"
            return
        self.reconnecting.add(host.name)
        threading.Thread(target=self._connect, args=(host.name,), name=f"connect-{host.name}", daemon=True).start()

    def _connect(self, name: str) -> None:
        link = self.links[name]
        try:
            # Starting an agent costs the host (and us) a second or so of CPU: a hundred at once
            # would push the last ones past the hello timeout. The first ones work meanwhile.
            with self._starting:
                link.start()
            self.events.put(Event("up", link, link.generation))
        except BeowulfError as err:
            self.events.put(Event("down", link, link.generation, reason=str(err)))
        except Exception as err:  # an unexpected library error: report, never crash the loop
            log.exception("%s: cannot start", name)
            self.events.put(Event("down", link, link.generation, reason=f"{name}: {type(err).__name__}: {err}"))

    def _reconnect_due(self, now: float) -> None:
        for name, stats in self.stats.items():
            if name in self.up or name in self.reconnecting or stats.state == "excluded":
                continue
            if now >= stats.next_attempt:
                self.reconnecting.add(name)
                threading.Thread(target=self._connect, args=(name,), daemon=True).start()

    def _lose(self, name: str, reason: str, quarantine: bool = False) -> None:
        """Take a host out: its blocks go back to be redone, it is retried with back-off."""
        stats = self.stats[name]
        self.up.discard(name)
        given_back = 0
        for task_id in self.schedule.tasks_of(name):
            self.schedule.give_back(task_id)
            given_back += 1
        stats.retries += given_back
        stats.state = "quarantined" if quarantine else "lost"
        stats.reason = reason
        stats.losses_in_row += 1
        backoff = _backoff(stats)
        if quarantine:
            backoff = max(backoff, 10.0)
        stats.next_attempt = time.monotonic() + backoff
        self.links[name].close_in_background()
        self.writer_event(name, "quarantine" if quarantine else "lost", f"{reason}; {given_back} blocks back")
        log.warning("%s: %s (%d blocks given back; retrying in %.0fs)", name, reason, given_back, backoff)

    def writer_event(self, host: Optional[str], kind: str, detail: str) -> None:
        """Record an event for stats (lost, quarantine, failure, invalid, mismatch, tail)."""
        try:
            self.store.add_event(self.run_id, host, kind, detail)
        except BeowulfError as err:
            log.warning("cannot record event: %s", err)

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        last_progress = last_ping = 0.0
        while self._work_left():
            # Overdue tasks first, so that a host with a free slot takes them before anything new.
            self._check_overdue(time.monotonic())
            # Every host's idle slots first, then the queues behind busy ones: a block (a
            # site's URL) held in one host's queue while another host has an idle slot would
            # wait for nothing.
            for name in list(self.up):
                self._fill(name, queue=False)
            for name in list(self.up):
                self._fill(name)
            self._note_tail()
            wait = 0.25
            ready_in = self.schedule.next_ready_in()
            if ready_in is not None and self.up:
                wait = min(wait, ready_in + 0.001)
            try:
                event = self.events.get(timeout=wait)
            except queue.Empty:
                event = None
            if event is not None:
                self._handle(event)
                while True:  # handle everything that is waiting before refilling
                    try:
                        self._handle(self.events.get_nowait())
                    except queue.Empty:
                        break
            now = time.monotonic()
            if now - last_ping >= PING_SECONDS:
                last_ping = now
                for name in self.up:
                    self.links[name].ping()
            self._check_heartbeats(now)
            self._reconnect_due(now)
            self._check_all_lost()
            self._check_stalled(now)
            if self.progress and now - last_progress > 0.2:
                last_progress = now
                self.progress(self.done_items, self.job.total, list(self.stats.values()))
        if self.progress:
            self.progress(self.done_items, self.job.total, list(self.stats.values()))

    def _work_left(self) -> bool:
        """Blocks to compute, or --verify re-runs that a second host (up or still starting) can do."""
        if not self.schedule.finished():
            return True
        if not self.schedule.verify:
            return False
        starting = any(self.stats[n].state == "starting" for n in self.reconnecting)
        return len(self.up) > 1 or starting

    def _note_tail(self) -> None:
        """Record when the last block was handed out for the first time (the tail starts)."""
        nothing_left = self.schedule.uncut() == 0 and not self.schedule.redo
        if nothing_left and not self.tail_recorded:
            self.writer_event(None, "tail", f"{len(self.schedule.in_flight)} blocks in flight")
        self.tail_recorded = nothing_left

    def _check_heartbeats(self, now: float) -> None:
        for name in list(self.up):
            silent = self.links[name].silent_for(now)
            if silent > self.beat_timeout:
                self._lose(name, f"no heartbeat for {silent:.0f}s")

    def _check_all_lost(self) -> None:
        if self.up or self.reconnecting:
            return
        candidates = [s for s in self.stats.values() if s.state != "excluded"]
        if not candidates:
            reasons = "; ".join(s.reason for s in self.stats.values())
            raise JobError(f"no host could start: {reasons}")
        if all(s.reconnects_failed >= RECONNECTS_BEFORE_GIVING_UP or s.losses_in_row >= LOSSES_BEFORE_GIVING_UP
               for s in candidates):
            reasons = "; ".join(f"{s.reason}" for s in self.stats.values())
            raise JobError(f"every host is lost ({reasons}); finished blocks are kept: run the same "
                           "command again to resume")

    def _block_size(self, stats: HostStats) -> int:
        if stats.rate <= 0:
            size = self.job.first_block()
        else:
            size = int(stats.rate * self.block_seconds)
        size = min(size, self.max_block)
        slots = sum(self.stats[name].slots for name in self.up) or 1
        tail = self.schedule.uncut() // (2 * slots)
        floor = min(size, int(stats.rate * self.block_seconds * TAIL_FLOOR))
        return max(self.min_block, min(size, max(tail, floor, self.min_block)))

    def _seconds_on(self, stats: HostStats, items: int) -> float:
        """How long ``items`` should take on one slot of that host (from its measured rate)."""
        return items / stats.rate if stats.rate > 0 else self.block_seconds

    def _fill(self, name: str, queue: bool = True) -> None:
        """Send ``name`` tasks up to its capacity (``queue``) or only up to its slots."""
        link, stats = self.links[name], self.stats[name]
        capacity = self.job.capacity(link.slots)
        if not queue:
            capacity = min(capacity, link.slots)
        while name in self.up and self.schedule.load_of(name) < capacity:
            got = self.schedule.next_block(name, self._block_size(stats), allow_verify=len(self.up) > 1,
                                           queued=self.schedule.load_of(name) >= link.slots)
            if got is None and self.schedule.load_of(name) < link.slots:
                got = self.schedule.duplicate_for(name, own_seconds=lambda b: self._seconds_on(stats, b.size))
            if got is None:
                return
            task_id, block = got
            expected = self._seconds_on(stats, block.size)
            if self.schedule.load_of(name) > link.slots:
                expected *= 2  # queued behind a running block on that host: it starts about one block later
            self.schedule.set_expected(task_id, expected)
            floor = self.task_floor * (2 if self.schedule.load_of(name) > link.slots else 1)
            self.deadlines[task_id] = time.monotonic() + max(floor, OVERDUE_FACTOR * expected * stats.turnaround)
            args = self.job.task_args_for(block, link, task_id)
            try:
                link.send_task(task_id, self.job.name, block.lo, block.hi, args)
            except (ConnectionError, OSError) as err:
                self._lose(name, f"cannot send: {err}")
                return

    # ------------------------------------------------------------ task deadline, nothing left to do

    def _check_overdue(self, now: float) -> None:
        """Hand tasks past their deadline to a host with a free slot (docs/ARCHITECTURE.md, "Slow hosts")."""
        if now - self.overdue_checked < 0.5:
            return
        self.overdue_checked = now
        for task_id, deadline in list(self.deadlines.items()):
            entry = self.schedule.tasks.get(task_id)
            if entry is None:
                del self.deadlines[task_id]
                continue
            if now < deadline:
                continue
            block, name = entry
            # Only when another host up could take it (it is redone before anything new): a task
            # that only this host would take anyway is better left to finish.
            if not any(other != name and other not in block.avoid and other not in block.copies
                       for other in self.up):
                continue
            del self.deadlines[task_id]
            self._overdue(task_id, block, name, now)
            if name not in self.up:
                return  # quarantined: its other tasks went back with it

    def _overdue(self, task_id: int, block, name: str, now: float) -> None:
        stats = self.stats[name]
        started, expected = block.copies[name][1], block.copies[name][2]
        # Cancelled on the slow host first, so that it stops (a fetch must not run twice at once).
        self.links[name].cancel(task_id)
        self.schedule.give_back(task_id, avoid=True)
        stats.retries += 1
        stats.overdue += 1
        stats.overdue_in_row += 1
        detail = (f"[{block.lo}, {block.hi}] not done after {now - started:.1f}s (expected {expected:.1f}s): "
                  "cancelled there, handed to another host")
        self.writer_event(name, "overdue", detail)
        log.warning("%s: task %s", name, detail)
        if stats.overdue_in_row >= OVERDUE_TO_QUARANTINE:
            self._lose(name, f"{stats.overdue_in_row} tasks overdue in a row", quarantine=True)

    def _check_stalled(self, now: float) -> None:
        """End a run that has work left that no host up will take and no other host can come back
        for (every block left must not go to the hosts up, and none is in flight)."""
        if not self.up or self.schedule.in_flight or self.schedule.finished() or self.schedule.verify:
            self.stalled_since = None
            return
        if self.schedule.next_ready_in() not in (None, 0.0):
            self.stalled_since = None  # something waits for its time (Retry-After, a gap)
            return
        if any(s.state != "excluded" and s.name not in self.up
               and s.reconnects_failed < RECONNECTS_BEFORE_GIVING_UP and s.losses_in_row < LOSSES_BEFORE_GIVING_UP
               for s in self.stats.values()):
            self.stalled_since = None  # a host that may come back could take it
            return
        if self.stalled_since is None:
            self.stalled_since = now
            return
        if now - self.stalled_since >= STALL_SECONDS:
            raise JobError(f"nothing left that the hosts up may do; gave up on {self.schedule.waiting()} "
                           "(finished blocks are kept: run the same command again to resume)")

    # ------------------------------------------------------------ events

    def _handle(self, event: Event) -> None:
        name = event.link.name
        if event.kind == "committed":
            return self._committed(event)
        if event.kind == "join":
            return self._joined(event.message["host"])
        if event.generation != event.link.generation:
            event.release()
            return  # from a connection we already gave up on
        stats = self.stats[name]
        if event.kind == "up":
            self.reconnecting.discard(name)
            self.up.add(name)
            self.writer_event(name, "up", f"{event.link.slots} slots")
            engine = self.job.engine_of(event.link.hello)
            try:
                self.store.upsert_host(name, event.link.hello)
                # What the host is in this run, kept with the run (fab stats of past runs).
                self.store.record_run_host(self.run_id, name, event.link.hello, event.link.slots, engine)
            except BeowulfError as err:
                log.warning("cannot record host %s: %s", name, err)
            stats.state = "up"
            self.overdue_checked = 0.0  # a host that could take overdue tasks: look now
            stats.slots = event.link.slots
            stats.reconnects_failed = 0
            stats.failures_in_row = 0
            stats.engine = engine
            ended, reason = event.link.ended
            if ended == event.generation:  # its lost event came first, while it was not up yet
                self._lose(name, f"connection lost ({reason})")
        elif event.kind == "down":
            self.reconnecting.discard(name)
            stats.reason = event.reason
            if stats.state == "starting":
                stats.state = "excluded"
                self.warnings.append(f"left out: {event.reason}")
                log.warning("left out: %s", event.reason)
                self.writer_event(name, "left-out", event.reason)
            else:
                stats.reconnects_failed += 1
                stats.next_attempt = time.monotonic() + _backoff(stats)
        elif event.kind == "lost":
            if name in self.up:
                self._lose(name, f"connection lost ({event.reason})")
        elif event.kind == "result":
            try:
                self._result(event, stats)
            finally:
                event.release()  # its payload, if kept, is the store writer's now (bounded there)

    def _result(self, event: Event, stats: HostStats) -> None:
        message = event.message or {}
        task_id = message.get("id")
        if task_id not in self.schedule.tasks or self.schedule.tasks[task_id][1] != stats.name:
            return  # a cancelled copy, a task of a host we gave up on, or another host's task id
        if not message.get("ok") or event.invalid:
            return self._failed(task_id, stats, event.invalid or message.get("error") or "failed",
                                bool(event.invalid), message.get("kind"))
        if event.checked is None:
            return
        result = message.get("result") or {}
        block = self.schedule.tasks[task_id][0]
        if block.verify_of is None:
            decision = self.job.decide(block, result, stats.name)
            self._record(block, decision)
            if decision.action == RETRY:
                self._retry(task_id, block, stats, decision, str(result.get("error") or result.get("status")))
                return
            if decision.action != COMMIT:
                return self._failed(task_id, stats, decision.reason or "the job refused the result", False,
                                    decision=decision)
        copy = self.schedule.tasks[task_id][0].copies.get(stats.name)
        done = self.schedule.complete(task_id)
        if done is None:
            return
        if copy is not None and copy[2] > 0:
            took = (time.monotonic() - copy[1]) / copy[2]
            stats.turnaround = max(1.0, took, stats.turnaround * RATE_DECAY)
        block, others = done
        for other, other_id in others:
            if other in self.links:
                self.links[other].cancel(other_id)
        stats.failures_in_row = 0
        stats.losses_in_row = 0
        stats.overdue_in_row = 0
        found, payload = event.checked[0], event.checked[1]
        if block.verify_of is not None:
            self._verified(block, found, result)
            return
        self._commit(block, stats, found, payload, result, float(message.get("elapsed") or 0.0))

    def _record(self, block, decision: Decision) -> None:
        """Store the rows a decision carries (an attempt row of a failed item, ...) right away."""
        if decision.record:
            try:
                self.store.add_job_rows(self.run_id, block.lo, decision.record)
            except BeowulfError as err:
                log.warning("cannot record rows of [%d, %d]: %s", block.lo, block.hi, err)

    def _retry(self, task_id: int, block, stats: HostStats, decision: Decision, why: str) -> None:
        """The job wants the block again later (not a failure): it goes back, due after the delay."""
        self.schedule.give_back(task_id, retry_at=time.monotonic() + decision.delay,
                                avoid=decision.avoid and len(self.up) > 1)
        stats.retries += 1
        line = self.job.retry_line(block, decision.delay, why)
        log.log(logging.INFO if line else logging.DEBUG, "%s: %s", stats.name,
                line or f"block {block.lo} again in {decision.delay:.1f}s ({why})")

    def _failed(self, task_id: int, stats: HostStats, error: str, invalid: bool, kind=None,
                decision: Optional[Decision] = None) -> None:
        """A task failed on its host, or its result was invalid: the job decides what it means
        (Job.failure, from the error's kind); by default the block goes back as a failure."""
        name = stats.name
        if decision is None:
            if invalid:
                kind = KIND_INVALID
            elif not isinstance(kind, str) or not kind:
                kind = KIND_ERROR
            block = self.schedule.tasks[task_id][0]
            decision = self.job.failure(block, kind, error, name)
            self._record(block, decision)
        if decision.action == LOSE_HOST:
            self.schedule.give_back(task_id)
            self._lose(name, decision.reason or error)
            return
        if decision.action == RETRY:
            self._retry(task_id, self.schedule.tasks[task_id][0], stats, decision, error)
            return
        block = self.schedule.give_back(task_id, failed=True, invalid=invalid, avoid=decision.avoid)
        stats.failures += 1
        if len(block.failed_on) == 1:
            stats.failures_in_row += 1  # only this host fails it: count it against the host
        if invalid:
            stats.invalid += 1
        kind = "invalid" if invalid else "failure"
        self.writer_event(name, kind, f"[{block.lo}, {block.hi}]: {error}")
        log.warning("%s: block [%d, %d] %s: %s", name, block.lo, block.hi, kind, error)
        usable = sum(1 for s in self.stats.values() if s.state != "excluded")
        if block.failures >= MAX_BLOCK_FAILURES or (
                block.failures >= 2 and len(block.failed_on) >= min(3, usable)):
            hosts = ", ".join(sorted(block.failed_on))
            raise JobError(f"block [{block.lo}, {block.hi}] failed {block.failures} times (on {hosts}); "
                           f"last: {error}")
        if stats.failures_in_row >= FAILURES_TO_QUARANTINE:
            self._lose(name, f"{stats.failures_in_row} failures in a row", quarantine=True)

    def _commit(self, block, stats: HostStats, found: int, payload, result: dict, elapsed: float) -> None:
        """Hand a valid first result to the writer (which commits it exactly once)."""
        name = stats.name
        if elapsed > 0:
            stats.rate_items = stats.rate_items * RATE_DECAY + block.size
            stats.rate_seconds = stats.rate_seconds * RATE_DECAY + elapsed
            stats.rate = stats.rate_items / stats.rate_seconds
        stats.busy += elapsed
        stats.blocks += 1
        stats.items += block.size
        stats.found += found
        now_wall = time.time()
        meta = self.job.block_meta(result)
        rows = self.job.rows(block, result, name)
        self.writer.put(BlockRow(
            run_id=self.run_id, lo=block.lo, hi=block.hi, host=name, started=now_wall - elapsed,
            finished=now_wall, seconds=elapsed, items=block.size, found=found, attempts=block.attempts,
            payload=payload, meta=dict(meta, elapsed=elapsed), rows=rows,
        ))
        if self.verify > 0 and len(self.links) > 1 and _sampled(block.lo, self.verify):
            self.verify_expect[block.lo] = (found, self.job.verify_key(found, result))
            self.schedule.add_verify(block.lo, block.hi, name)

    def _verified(self, block, found: int, result: dict) -> None:
        expected = self.verify_expect.pop(block.lo, None)
        self.verified += 1
        if expected is not None and expected[1] != self.job.verify_key(found, result):
            self.verify_mismatches += 1
            message = (f"--verify: block [{block.lo}, {block.hi}] from {block.verify_of} disagrees with "
                       f"a re-run ({expected[0]} vs {found} items)")
            self.warnings.append(message)
            self.writer_event(block.verify_of, "mismatch", message)
            log.warning("%s", message)

    def _on_commit(self, row: BlockRow, new: bool) -> None:
        """Called in the writer thread after a transaction: hand it to the loop."""
        self.events.put(Event("committed", _CommitLink, 0, {"row": row, "new": new}))

    def _committed(self, event: Event) -> None:
        row, new = event.message["row"], event.message["new"]
        if new:
            self.done_items += row.items
            self.found_committed += row.found
        else:
            log.warning("block [%d, %d] was already committed; second result ignored", row.lo, row.hi)


class _CommitLink:
    """Stand-in link for events coming from the store's writer."""

    name = "(store)"
    generation = 0


def _sampled(lo: int, fraction: float) -> bool:
    """Deterministically pick about ``fraction`` of blocks for --verify."""
    digest = hashlib.sha256(str(lo).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _backoff(stats: HostStats) -> float:
    """Seconds before the next attempt to start a host: doubling with each failed
    reconnect and each loss since its last valid result, up to BACKOFF_CAP."""
    failures = stats.reconnects_failed + max(0, stats.losses_in_row - 1)
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(failures, 10))
