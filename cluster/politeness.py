"""Handing out URLs so the whole cluster behaves like one careful crawler.

The coordinator sees every host, so it enforces politeness per origin
(``scheme://host:port``) across all of them: at most ``per_domain`` requests in
flight and at least ``delay`` seconds (or the site's ``Crawl-delay``, whichever is
longer) between request starts. The first URL of an origin goes out alone and
fetches robots.txt on its way; the origin's other URLs wait for its rules.
A 429/503 or a server error pushes the whole origin back (Retry-After, or an
exponential back-off). Origins wait in a heap ordered by when they may start next,
so picking a URL costs O(log origins), not a scan.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Block, Schedule
from .urls import origin

# Added to each origin's gap between request starts: dispatch to a host is not the
# request's start there (one more hop), and the gap must hold at the server.
START_MARGIN = 0.05
UNKNOWN, FETCHING = "unknown", "fetching"
# Longest Crawl-delay honoured (seconds).
MAX_CRAWL_DELAY = 120.0


@dataclass
class Origin:
    """One site: its waiting URLs, its requests in flight, when it may start the next one."""

    key: str
    queue: deque = field(default_factory=deque)  # URL indices, retries first
    in_flight: int = 0
    next_start: float = 0.0  # monotonic time of the earliest next request start
    crawl_delay: float = 0.0
    robots: object = UNKNOWN  # UNKNOWN, FETCHING, or the rules {"status": ..., "text": ...}
    scheduled: bool = False  # in the heap


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

    # ------------------------------------------------------------ handing out

    def next_block(self, host: str, size: int = 1, allow_verify: bool = True, queued: bool = False):
        """The next URL ``host`` may fetch now, or None.

        ``queued``: every worker of the host is busy, so the request would start later
        than now, when a worker frees up. Only an origin with no gap between starts
        (no --delay, no Crawl-delay) may be fetched that way: an origin with a gap
        needs its request to start when it is handed out."""
        if queued and self.delay > 0:
            return None
        now = time.monotonic()
        skipped = []
        chosen = None
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            site = self.origins[entry[2]]
            site.scheduled = False
            if site.next_start > now:
                self._push(site)  # held back since it was queued (Retry-After, robots.txt): requeue
                continue
            if not site.queue or site.in_flight >= self.per_domain or site.robots == FETCHING:
                continue  # put back when one of its requests ends
            if queued and site.crawl_delay > 0:
                skipped.append(site)  # must start when handed out: wait for an idle worker
                continue
            index = next((i for i in site.queue if host not in self._block(i, site).avoid), None)
            if index is None:
                skipped.append(site)
                continue
            site.queue.remove(index)
            self.queued -= 1
            block = self._block(index, site)
            block.fetch_robots = site.robots == UNKNOWN
            if block.fetch_robots:
                site.robots = FETCHING
            site.in_flight += 1
            gap = max(self.delay, site.crawl_delay)
            site.next_start = now + gap + (START_MARGIN if gap > 0 else 0.0)
            self._push(site)
            chosen = self._assign(block, host)
            break
        for site in skipped:
            self._push(site)
        return chosen

    def duplicate_for(self, host: str, now: Optional[float] = None, own_seconds=None):
        """Never: a second copy of a request would be one request too many for the site."""
        return None

    def next_ready_in(self) -> Optional[float]:
        """Seconds until some origin may start a request (None when nothing waits)."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    # ------------------------------------------------------------ outcomes

    def complete(self, task_id: int):
        done = super().complete(task_id)
        if done is not None:
            self._ended(self.origins[done[0].origin], done[0])
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
        if invalid or avoid:
            block.avoid.add(host)
        site = self.origins[block.origin]
        site.queue.appendleft(block.lo)
        self.queued += 1
        if retry_at is not None:
            site.next_start = max(site.next_start, retry_at)
        self._ended(site, block)
        return block

    def set_robots(self, block: Block, rules: Optional[dict], crawl_delay: Optional[float]) -> None:
        """The robots.txt rules fetched with this block's URL now apply to its whole origin."""
        site = self.origins[block.origin]
        site.robots = rules
        if crawl_delay:
            # A site asking for more than MAX_CRAWL_DELAY still gets it, capped: otherwise one
            # robots.txt line (or a lying host) could stall its URLs, and the run, for ever.
            site.crawl_delay = min(float(crawl_delay), MAX_CRAWL_DELAY)
            site.next_start = max(site.next_start, time.monotonic() + site.crawl_delay)

    def robots_of(self, block: Block) -> object:
        return self.origins[block.origin].robots

    # ------------------------------------------------------------ internals

    def _block(self, index: int, site: Origin) -> Block:
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = Block(index, index)
            block.origin = site.key
        return block

    def _ended(self, site: Origin, block: Block) -> None:
        site.in_flight = max(0, site.in_flight - 1)
        if getattr(block, "fetch_robots", False):
            # That task made two requests (robots.txt, then the page a gap later); the page's
            # start is known only to have been before now: count the next gap from now.
            gap = max(self.delay, site.crawl_delay)
            if gap > 0:
                site.next_start = max(site.next_start, time.monotonic() + gap + START_MARGIN)
        if getattr(block, "fetch_robots", False) and site.robots == FETCHING:
            site.robots = UNKNOWN  # the robots fetch did not come back: the next URL fetches it
        block.fetch_robots = False
        self._push(site)

    def _push(self, site: Origin) -> None:
        if site.queue and not site.scheduled:
            site.scheduled = True
            heapq.heappush(self._heap, (site.next_start, next(self._seq), site.key))

