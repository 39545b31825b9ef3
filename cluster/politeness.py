"""Handing out URLs so the whole cluster behaves like one careful crawler.

The coordinator sees every host, so it enforces politeness per origin
(``scheme://host:port``) across all of them: at most ``per_domain`` requests in
flight and at least ``delay`` seconds (or the site's ``Crawl-delay``, whichever is
longer) between requests, as the site sees them. The first URL of an origin goes
out alone and fetches robots.txt on its way; the origin's other URLs wait for its
rules. A 429/503 or a server error pushes the whole origin back (Retry-After, or an
exponential back-off). Origins wait in a heap ordered by when they may start next,
so picking a URL costs O(log origins), not a scan.

The gap is kept where it counts, at the site (README, "Politeness"), not between
dispatch times here (the hop to a host and a loaded host's delays would eat it).
With a gap, a site's requests in flight are on one host at a time (its holder).
Each result says when, on its host's own monotonic clock, the answer had arrived
(``answered_at``): the holder may get the site's next URL a little before the gap
is over, with ``after`` = that moment + the gap, and waits by its own clock before
it starts the request. Another host gets the site only once the gap has passed
since the result reached the coordinator (after the answer reached the host, which
is after the request reached the site). A task that ended without an answer (host
lost, overdue, failed) starts the gap when it is given back.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Block, Schedule
from .urls import origin

# Added to the gap between dispatches of one site's concurrent requests (--per-domain > 1,
# on its holder): dispatch is not the request's start there (one more hop).
START_MARGIN = 0.05
# The holder of a site gets its next URL this long before the gap is over (it waits the
# rest by its own clock), so the hop from here to it does not add to every gap.
HOLDER_LEAD = 0.25
UNKNOWN, FETCHING = "unknown", "fetching"
# Longest Crawl-delay honoured (seconds).
MAX_CRAWL_DELAY = 120.0


@dataclass
class Origin:
    """One site: its waiting URLs, its requests in flight, when it may start the next one."""

    key: str
    queue: deque = field(default_factory=deque)  # URL indices, retries first
    in_flight: int = 0
    next_start: float = 0.0  # monotonic time of the earliest next request start on a host other than its holder
    hold_until: float = 0.0  # nobody starts before this (Retry-After, back-off)
    crawl_delay: float = 0.0
    robots: object = UNKNOWN  # UNKNOWN, FETCHING, or the rules {"status": ..., "text": ...}
    scheduled: bool = False  # in the heap
    holder: Optional[str] = None  # the host its requests go to while it has a gap (see the module doc)
    after: Optional[float] = None  # holder's clock: its next request starts no earlier (None: unknown)
    holder_ready: float = 0.0  # monotonic time here from which the holder may get its next URL
    held: int = 0  # which entry of the holder's heap is current


class DomainSchedule(Schedule):
    """The Schedule interface over URL indices, politely: one origin never sees bursts."""

    def __init__(self, urls: list[str], done: list[tuple[int, int]], delay: float, per_domain: int,
                 robots: bool):
        super().__init__(0, len(urls) - 1, done, min_block=1)
        self.gaps.clear()
        self.urls = urls
        self.delay = delay
        self.per_domain = per_domain
        self.use_robots = robots
        self.origins: dict[str, Origin] = {}
        self.blocks: dict[int, Block] = {}  # URL index -> its Block (keeps attempts across retries)
        self._heap: list = []
        self._held: dict[str, list] = {}  # host -> heap of (ready, seq, origin key) of the sites it holds
        self._seq = itertools.count()
        finished = {lo for lo, _ in done}
        self.queued = 0
        for index, url in enumerate(urls):
            if index in finished:
                continue
            key = origin(url)
            site = self.origins.get(key) or self.origins.setdefault(key, Origin(key))
            site.queue.append(index)
            self.queued += 1
        for site in self.origins.values():
            if not robots:
                site.robots = None  # --ignore-robots
            self._push(site)
        self.remaining_at_start = self.queued

    # ------------------------------------------------------------ queries

    def uncut(self) -> int:
        return self.queued

    def finished(self) -> bool:
        return self.queued == 0 and not self.in_flight

    def origin_of(self, block: Block) -> Origin:
        return self.origins[block.origin]

    def gap_of(self, site: Origin) -> float:
        """Seconds between two requests of ``site``, as the site sees them."""
        return max(self.delay, site.crawl_delay)

    def waiting(self, limit: int = 5) -> str:
        left = [index for site in self.origins.values() for index in site.queue]
        named = [self.urls[index] for index in left[:limit]]
        more = len(left) - len(named)
        return ", ".join(named) + (f" and {more} more" if more > 0 else "")

    # ------------------------------------------------------------ handing out

    def next_block(self, host: str, size: int = 1, allow_verify: bool = True, queued: bool = False):
        """The next URL ``host`` may fetch now, or None.

        ``queued``: every worker of the host is busy, so the request would start later
        than now, when a worker frees up. Only an origin with no gap between starts
        (no --delay, no Crawl-delay) may be fetched that way: an origin with a gap
        is handed out when a worker can start it."""
        if queued and self.delay > 0:
            return None
        now = time.monotonic()
        chosen = self._next_held(host, now, queued)
        if chosen is not None:
            return chosen
        skipped = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            site = self.origins[entry[2]]
            site.scheduled = False
            if max(site.next_start, site.hold_until) > now:
                self._push(site)  # held back since it was queued (Retry-After, robots.txt): requeue
                continue
            if not site.queue or site.in_flight >= self.per_domain or site.robots == FETCHING:
                continue  # put back when one of its requests ends
            pinned = site.in_flight > 0 and site.holder not in (None, host) and self.gap_of(site) > 0
            if pinned or (queued and site.crawl_delay > 0):
                skipped.append(site)  # on another host while in flight; or must start when handed out
                continue
            chosen = self._take(site, host, now)
            if chosen is None:
                skipped.append(site)
                continue
            break
        for site in skipped:
            self._push(site)
        return chosen

    def _next_held(self, host: str, now: float, queued: bool):
        """A URL of a site ``host`` holds (see the module doc) whose gap is (nearly) over by its clock."""
        heap = self._held.get(host)
        while heap and heap[0][0] <= now:
            ready, seq, key = heapq.heappop(heap)
            site = self.origins[key]
            if site.holder != host or site.held != seq or site.in_flight or site.after is None:
                continue  # stale: the site moved, or is in flight again
            if not site.queue:
                continue  # a URL given back makes it held again (_ended)
            if site.robots == FETCHING or (queued and site.crawl_delay > 0):
                self._hold(site, host, now + HOLDER_LEAD)  # look again later (or when its worker is free)
                return None
            if site.hold_until > now:
                self._hold(site, host, site.hold_until)
                continue
            chosen = self._take(site, host, now)
            if chosen is None:  # none of its URLs for this host: another host takes it after the gap
                self._hold(site, host, site.next_start)
                return None
            return chosen
        return None

    def _take(self, site: Origin, host: str, now: float):
        """Hand ``host`` the first URL of ``site`` it may fetch (None if none)."""
        index = next((i for i in site.queue if not self.shuns(self._block(i, site), host)), None)
        if index is None:
            return None
        site.queue.remove(index)
        self.queued -= 1
        block = self._block(index, site)
        block.fetch_robots = site.robots == UNKNOWN
        if block.fetch_robots:
            site.robots = FETCHING
        gap = self.gap_of(site)
        block.after = site.after if (gap > 0 and site.holder == host and not site.in_flight) else None
        site.in_flight += 1
        if gap > 0:
            site.holder = host
            site.after = None  # known again when this request's answer is
            site.held = next(self._seq)
            if self.per_domain > 1:  # its next request may go out before this one ends (on this host)
                site.next_start = max(site.next_start, now + gap + START_MARGIN)
        self._push(site)
        return self._assign(block, host)

    def duplicate_for(self, host: str, now: Optional[float] = None, own_seconds=None):
        """Never: a second copy of a request would be one request too many for the site."""
        return None

    def next_ready_in(self) -> Optional[float]:
        """Seconds until some origin may start a request (None when nothing waits)."""
        now = time.monotonic()
        heads = [self._heap[0][0]] if self._heap else []
        # A site held by a host is looked at when that host's worker is free (an event wakes
        # the loop then): only its coming moment counts here, not one already past.
        heads += [heap[0][0] for heap in self._held.values() if heap and heap[0][0] > now]
        if not heads:
            return None
        return max(0.0, min(heads) - now)

    # ------------------------------------------------------------ outcomes

    def complete(self, task_id: int):
        entry = self.tasks.get(task_id)
        done = super().complete(task_id)
        if done is not None:
            self._ended(self.origins[done[0].origin], done[0], entry[1])
        return done

    def give_back(self, task_id: int, failed: bool = False, invalid: bool = False,
                  retry_at: Optional[float] = None, avoid: bool = False):
        """The URL goes back to the front of its origin's queue; ``retry_at`` holds the whole origin back."""
        entry = self._pop_task(task_id)
        if entry is None:
            return None
        block, host = entry
        block.copies.pop(host, None)
        self.in_flight.pop(block.lo, None)
        if failed:
            block.failures += 1
            block.failed_on.add(host)
        if invalid:
            block.avoid.add(host)
        if avoid:
            block.elsewhere.add(host)
        site = self.origins[block.origin]
        site.queue.appendleft(block.lo)
        self.queued += 1
        if retry_at is not None:
            site.hold_until = max(site.hold_until, retry_at)
        self._ended(site, block, host)
        return block

    def set_robots(self, block: Block, rules: Optional[dict], crawl_delay: Optional[float]) -> None:
        """The robots.txt rules fetched with this block's URL now apply to its whole origin."""
        site = self.origins[block.origin]
        site.robots = rules
        if crawl_delay:
            # A site asking for more than MAX_CRAWL_DELAY still gets it, capped: otherwise one
            # robots.txt line (or a lying host) could stall its URLs, and the run, for ever.
            site.crawl_delay = min(float(crawl_delay), MAX_CRAWL_DELAY)

    def robots_of(self, block: Block) -> object:
        return self.origins[block.origin].robots

    # ------------------------------------------------------------ internals

    def _block(self, index: int, site: Origin) -> Block:
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = Block(index, index)
            block.origin = site.key
            block.answered_at = None
        return block

    def _ended(self, site: Origin, block: Block, host: Optional[str]) -> None:
        """One request of ``site`` ended (answered or not) on ``host``: when may the next start, and where."""
        now = time.monotonic()
        site.in_flight = max(0, site.in_flight - 1)
        answered = getattr(block, "answered_at", None)
        block.answered_at = None
        if getattr(block, "fetch_robots", False) and site.robots == FETCHING:
            site.robots = UNKNOWN  # the robots fetch did not come back: the next URL fetches it
        block.fetch_robots = False
        gap = self.gap_of(site)
        if gap > 0:
            # The answer reached its host before its result reached us: on another host the
            # next request starts a gap from now at the earliest.
            site.next_start = max(site.next_start, now + gap)
            if site.holder == host and not site.in_flight and _is_clock(answered):
                site.after = max(site.after or 0.0, answered + gap)
                site.held = next(self._seq)
                self._hold(site, host, max(now + gap - HOLDER_LEAD, site.hold_until))
            elif not site.in_flight:
                site.holder, site.after = None, None  # no answer: nobody knows when its request was
        self._push(site)

    def _hold(self, site: Origin, host: str, ready: float) -> None:
        heapq.heappush(self._held.setdefault(host, []), (ready, site.held, site.key))

    def _push(self, site: Origin) -> None:
        if site.queue and not site.scheduled:
            site.scheduled = True
            heapq.heappush(self._heap, (max(site.next_start, site.hold_until), next(self._seq), site.key))


def _is_clock(value) -> bool:
    """A host's monotonic reading as it should be: a finite, non-negative number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
