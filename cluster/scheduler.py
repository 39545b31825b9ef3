"""Block bookkeeping, free of I/O: what is left, what is in flight, what to hand out next.

Items are integers (primes: the numbers themselves). Blocks are inclusive
``[lo, hi]`` ranges cut lazily from the gaps the store has not committed yet,
each sized for the host that will run it. Blocks given back (a host was lost,
a result was invalid) are handed out again before new ones are cut. When
nothing is left to cut, idle slots get duplicates of the in-flight blocks that
will finish last (the endgame), so one slow machine cannot hold the run up.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

# A block is duplicated at most this many times in the endgame (copies in flight).
MAX_COPIES = 2
# Blocks are never cut narrower than this many items (except at the very end of a gap).
MIN_BLOCK = 1_000
# A block that failed this many times on any hosts stops the run (something is wrong with it).
MAX_BLOCK_FAILURES = 6


@dataclass
class Block:
    """One inclusive range of items and everything about its attempts."""

    lo: int
    hi: int
    failures: int = 0
    attempts: int = 0
    # host name -> (task id, time handed out, expected seconds)
    copies: dict = field(default_factory=dict)
    avoid: set = field(default_factory=set)  # hosts that returned an invalid result for it
    # Hosts it should go elsewhere from when another host can take it (a retry away from the
    # host that got a server error, a task that went overdue there): a preference, never a
    # ban, so a block that every host up has tried still gets done (README, "When a scrape
    # goes wrong").
    elsewhere: set = field(default_factory=set)
    failed_on: set = field(default_factory=set)  # hosts on which it failed
    verify_of: Optional[str] = None  # set for a --verify re-run: the host whose result it checks
    ready_at: float = 0.0  # a block given back to retry later (Decision RETRY): not out before then

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def expected_finish(self) -> float:
        """When the earliest of its copies should finish."""
        return min(started + expected for _, started, expected in self.copies.values())


class Schedule:
    """The run's blocks: gaps to cut from, blocks to redo, blocks in flight, by task id."""

    def __init__(self, start: int, end: int, done: list[tuple[int, int]], min_block: int = MIN_BLOCK):
        self.start, self.end = start, end
        self.min_block = min_block
        self.gaps: deque[list[int]] = deque(_gaps(start, end, done))
        self.redo: deque[Block] = deque()
        self.verify: deque[Block] = deque()
        self.in_flight: dict[int, Block] = {}  # keyed by lo
        self.tasks: dict[int, tuple[Block, str]] = {}  # task id -> (block, host)
        self._ids = itertools.count(1)
        self._load: Counter = Counter()  # host -> tasks in flight
        self.total = end - start + 1
        self.remaining_at_start = sum(hi - lo + 1 for lo, hi in self.gaps)
        # The hosts up now (the coordinator hands its own set): who else could take a block.
        self.hosts_up: set = set()

    # ------------------------------------------------------------ queries

    def uncut(self) -> int:
        """Items not yet handed out for the first time."""
        return sum(hi - lo + 1 for lo, hi in self.gaps)

    def finished(self) -> bool:
        return not self.gaps and not self.redo and not self.in_flight

    def load_of(self, host: str) -> int:
        """How many tasks ``host`` has in flight."""
        return self._load[host]

    def shuns(self, block: Block, host: str) -> bool:
        """Whether ``host`` must not take ``block`` now: it returned an invalid result for it, or
        the block should go elsewhere and another host up could take it."""
        if host in block.avoid:
            return True
        if host not in block.elsewhere:
            return False
        return any(other != host and other not in block.avoid and other not in block.elsewhere
                   for other in self.hosts_up)

    def waiting(self, limit: int = 5) -> str:
        """What is left to do that no task is running for, for a message (at most ``limit`` named)."""
        blocks = list(self.redo) + list(self.verify)
        named = [f"[{b.lo}, {b.hi}]" + (f" (not on {', '.join(sorted(b.avoid))})" if b.avoid else "")
                 for b in blocks[:limit]]
        more = len(blocks) - len(named) + len(self.gaps)
        return ", ".join(named) + (f" and {more} more" if more > 0 else "")

    # ------------------------------------------------------------ handing out

    def next_block(self, host: str, size: int, allow_verify: bool = True,
                   queued: bool = False) -> Optional[tuple[int, Block]]:
        """A (task id, block) for ``host``: a block to redo, else a new one of about ``size`` items.

        ``queued``: the host has no idle slot, so the block waits there behind another
        (blocks of a range do not mind when they start)."""
        now = time.monotonic()
        for queue in (self.redo, self.verify) if allow_verify else (self.redo,):
            for block in list(queue):
                if self.shuns(block, host) or host == block.verify_of or block.ready_at > now:
                    continue
                queue.remove(block)
                return self._assign(block, host)
        if not self.gaps:
            return None
        gap = self.gaps[0]
        width = max(self.min_block, size)
        lo, hi = gap[0], min(gap[1], gap[0] + width - 1)
        if gap[1] - hi < self.min_block:  # don't leave a sliver behind
            hi = gap[1]
        if hi == gap[1]:
            self.gaps.popleft()
        else:
            gap[0] = hi + 1
        return self._assign(Block(lo, hi), host)

    def duplicate_for(self, host: str, now: Optional[float] = None,
                      own_seconds: Optional[Callable[[Block], float]] = None) -> Optional[tuple[int, Block]]:
        """Endgame: a copy of the in-flight block that will finish last, for an idle ``host``.

        An overdue block (past its expected finish: a straggler, a host that slowed down
        or went quiet) is copied first, the most overdue of all. Otherwise the block expected
        to finish last is copied, unless ``host`` would not finish it sooner
        (``own_seconds(block)``: how long it would take there).
        """
        now = now or time.monotonic()
        candidates = [b for b in self.in_flight.values()
                      if host not in b.copies and not self.shuns(b, host) and len(b.copies) < MAX_COPIES
                      and b.verify_of is None and self.may_copy(b)]
        if not candidates:
            return None
        overdue = [b for b in candidates if b.expected_finish() <= now]
        if overdue:
            return self._assign(min(overdue, key=lambda b: b.expected_finish()), host)
        block = max(candidates, key=lambda b: b.expected_finish())
        mine = own_seconds(block) if own_seconds else 0.0
        if block.expected_finish() - now <= max(0.05, mine):
            return None  # it will be done before a copy here would be: a copy only wastes a slot
        return self._assign(block, host)

    def may_copy(self, block: Block) -> bool:
        """Whether the endgame may duplicate ``block`` (a job's schedule may say no for some)."""
        return True

    def _assign(self, block: Block, host: str) -> tuple[int, Block]:
        task_id = next(self._ids)
        block.attempts += 1
        block.copies[host] = (task_id, time.monotonic(), 0.0)
        self.in_flight[block.lo] = block
        self.tasks[task_id] = (block, host)
        self._load[host] += 1
        return task_id, block

    def _pop_task(self, task_id: int) -> Optional[tuple[Block, str]]:
        """Forget a task (it ended, or its copy lost the race); None if it was not in flight."""
        entry = self.tasks.pop(task_id, None)
        if entry is not None:
            self._load[entry[1]] -= 1
        return entry

    def set_expected(self, task_id: int, seconds: float) -> None:
        block, host = self.tasks[task_id]
        copy = block.copies[host]
        block.copies[host] = (copy[0], copy[1], seconds)

    # ------------------------------------------------------------ outcomes

    def complete(self, task_id: int) -> Optional[tuple[Block, list[tuple[str, int]]]]:
        """A valid result arrived: the block and the other copies to cancel; None if it is stale."""
        entry = self._pop_task(task_id)
        if entry is None:
            return None
        block, host = entry
        others = [(name, copy[0]) for name, copy in block.copies.items() if name != host]
        for _, other_id in others:
            self._pop_task(other_id)
        block.copies.clear()
        self.in_flight.pop(block.lo, None)
        return block, others

    def next_ready_in(self) -> Optional[float]:
        """Seconds until a block given back to retry later is due (None when none waits)."""
        now = time.monotonic()
        later = [block.ready_at for block in self.redo if block.ready_at > now]
        return max(0.0, min(later) - now) if later else None

    def give_back(self, task_id: int, failed: bool = False, invalid: bool = False,
                  avoid: bool = False, retry_at: Optional[float] = None) -> Optional[Block]:
        """A copy ended without a valid result (host lost, error, invalid, overdue): redo the block
        if no copy is left; ``avoid``: preferably on another host; ``retry_at``: not before then."""
        entry = self._pop_task(task_id)
        if entry is None:
            return None
        block, host = entry
        block.copies.pop(host, None)
        if failed:
            block.failures += 1
            block.failed_on.add(host)
        if invalid:
            block.avoid.add(host)
        if avoid:
            block.elsewhere.add(host)
        if retry_at is not None:
            block.ready_at = max(block.ready_at, retry_at)
        if not block.copies:
            self.in_flight.pop(block.lo, None)
            if block.verify_of is not None:
                self.verify.append(block)
            else:
                self.redo.appendleft(block)
        return block

    def tasks_of(self, host: str) -> list[int]:
        return [task_id for task_id, (_, name) in self.tasks.items() if name == host]

    def add_verify(self, lo: int, hi: int, host: str) -> None:
        """Queue a --verify re-run of a committed block on a host other than ``host``."""
        self.verify.append(Block(lo, hi, verify_of=host))


def _gaps(start: int, end: int, done: list[tuple[int, int]]) -> list[list[int]]:
    """The parts of [start, end] not covered by the (sorted) committed ranges."""
    gaps, cursor = [], start
    for lo, hi in done:
        if hi < cursor:
            continue
        if lo > end:
            break
        if lo > cursor:
            gaps.append([cursor, lo - 1])
        cursor = max(cursor, hi + 1)
    if cursor <= end:
        gaps.append([cursor, end])
    return gaps
