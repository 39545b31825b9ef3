"""`fab calibrate`: each host's standalone rate, measured on the host alone.

The seed's "sum of parts" is the sum of what each machine does on its own; a rate
measured inside a cluster run is not that (the machines share the coordinator,
the network, here even the CPUs). So hosts are benchmarked one at a time, with
all their slots busy: the agent is started as for a run (``HostLink``), one
block keeps each slot busy plus one queued (slots + 1 in flight, as in a run),
for ``seconds``. The rate is items completed / wall seconds, from the first task
sent to the last result received before the deadline; tasks still running then
are cancelled. The caller stores it with ``Store.set_calibration``.

Workloads:

- **primes**: count mode (nothing to transfer) or list mode (the primes come back,
  as in a list run) from 10**11 upwards (``start``), up to ``end`` and then from
  ``start`` again; a block's cost depends on where it lies and on the mode, so a
  run's efficiency only uses a calibration of its mode near its range
  (cluster/figures.py; ``fab calibrate --run N`` measures exactly that). A
  probe block, grown fourfold until it takes 0.2 s (twice), sizes the blocks to
  ~0.5 s a slot, and every result resizes them.
- **scrape**: one URL a task from the user's list (never repeated: when the list
  runs out the measurement ends there); pages that got an HTTP answer count.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Any, Optional

from .agents import HostLink
from .errors import BeowulfError, ConnectError
from .inventory import Host

log = logging.getLogger(__name__)

# Where the primes benchmark sieves: high enough that a block's cost is a big run's.
PRIMES_START = 10**11
# Width of the first probe block; it grows PROBE_GROWTH-fold until it takes PROBE_SECONDS
# (long enough that a host throttled in time slices shows its average speed).
PROBE_WIDTH = 100_000
PROBE_GROWTH = 4
PROBE_SECONDS = 0.2
# Seconds a benchmark block should take on one slot.
BLOCK_SECONDS = 0.5
# Failed tasks after which a host's calibration is abandoned.
MAX_FAILURES = 3
# Extra seconds to wait past the deadline for the first result (a very slow host).
GRACE_SECONDS = 60.0
# Default fetch options of the scrape benchmark (the task args of the "scrape" client job).
SCRAPE_TIMEOUT = 30
SCRAPE_MAX_BYTES = 5_000_000


@dataclass
class Calibration:
    """One host's benchmark: what it did and its rate (items/s; None if it failed)."""

    host: str
    slots: int = 0
    engine: str = ""
    tasks: int = 0
    items: int = 0
    seconds: float = 0.0
    rate: Optional[float] = None
    failures: int = 0
    error: str = ""
    hello: Optional[dict] = None
    lo: Optional[int] = None  # the lowest and highest item measured (primes: numbers)
    hi: Optional[int] = None


class PrimesBench:
    """Prime blocks (count or list mode) from ``start`` upwards, wrapping around at ``end``."""

    name = "primes"
    encoded_fields = ("data",)

    def __init__(self, start: int = PRIMES_START, mode: str = "count", end: Optional[int] = None):
        from .jobs.primes import MAX_END, PrimesJob

        self.start = start
        self.end = MAX_END if end is None else end
        self.mode = mode
        self.job = PrimesJob(start, self.end, count_only=mode == "count")
        self.max_width = self.job.max_block()
        self.next_lo = start
        self.width = PROBE_WIDTH

    def check(self, lo: int, hi: int, result: dict) -> tuple[int, Any]:
        return self.job.check(lo, hi, result)

    def items(self, lo: int, hi: int, checked) -> int:
        return hi - lo + 1

    def next_task(self) -> Optional[tuple[int, int, dict]]:
        if self.next_lo > self.end:
            self.next_lo = self.start  # a small range: measure it again
        lo = self.next_lo
        hi = min(self.end, lo + self.width - 1)
        self.next_lo = hi + 1
        return lo, hi, self.job.task_args(lo, hi)

    def prepare(self, run_one) -> None:
        """Grow a probe block until it takes PROBE_SECONDS twice in a row (the first call of a
        fresh worker can be slow: imports, caches), then size blocks to BLOCK_SECONDS."""
        self.next_lo, self.width = self.start, PROBE_WIDTH
        long_enough = 0
        while True:
            elapsed = run_one()
            long_enough = long_enough + 1 if elapsed >= PROBE_SECONDS else 0
            if long_enough >= 2 or self.width >= self.max_width:
                break
            if not long_enough:
                self.width = min(self.max_width, self.width * PROBE_GROWTH)
            if self.width >= self.end - self.start + 1:
                break
        self.adapt(self.width, elapsed)
        log.debug("primes benchmark: blocks of %d numbers", self.width)

    def adapt(self, items: int, elapsed: float) -> None:
        """Resize blocks from a finished one so that they keep taking about BLOCK_SECONDS."""
        if elapsed > 0:
            target = items / elapsed * BLOCK_SECONDS
            self.width = int(max(PROBE_WIDTH, min(self.max_width, target)))


class ScrapeBench:
    """One URL a task; a page counts when it got an HTTP status."""

    name = "scrape"
    encoded_fields = ("body",)

    def __init__(self, urls: list[str], user_agent: str, proxy: Optional[str] = None):
        self.urls = list(urls)
        self.user_agent = user_agent
        self.proxy = proxy
        self.index = 0

    def check(self, lo: int, hi: int, result: dict) -> tuple[int, Any]:
        return (1 if isinstance(result.get("status"), int) else 0), None

    def items(self, lo: int, hi: int, checked) -> int:
        return int(checked[0])

    def next_task(self) -> Optional[tuple[int, int, dict]]:
        if self.index >= len(self.urls):
            return None
        lo = self.index
        self.index += 1
        args = {"url": self.urls[lo], "timeout": SCRAPE_TIMEOUT, "max_bytes": SCRAPE_MAX_BYTES,
                "user_agent": self.user_agent, "bodies": False, "robots": None}
        if self.proxy:
            args["proxy"] = self.proxy
            args["isolation"] = f"beowulf-calibrate-{lo}"
        return lo, lo, args

    def prepare(self, run_one) -> None:
        self.index = 0  # every host fetches the same pages, from the first

    def adapt(self, items: int, elapsed: float) -> None:
        pass  # one URL a task


def calibrate_host(host: Host, config, bench, seconds: float, accept_new: bool = False,
                   bundle: Optional[str] = None) -> Calibration:
    """Benchmark one host alone (all its slots) for ``seconds``; errors go into ``.error``."""
    from .provision import local_bundle_hash

    outcome = Calibration(host.name)
    events: queue.Queue = queue.Queue()
    link = HostLink(host, config, accept_new, events, bench.check, bundle or local_bundle_hash(),
                    preload=bench.name, encoded_fields=bench.encoded_fields)
    try:
        outcome.hello = link.start()
        outcome.slots = link.slots
        outcome.engine = str((outcome.hello.get("engines") or {}).get(bench.name) or "")
        _measure(link, events, bench, seconds, outcome)
    except BeowulfError as err:
        outcome.error = str(err)
    except (ConnectionError, OSError) as err:
        outcome.error = f"{host.name}: connection failed ({err})"
    finally:
        link.close()
    if outcome.rate is not None and outcome.rate <= 0 and not outcome.error:
        outcome.error = f"{host.name}: nothing completed in {outcome.seconds:.1f}s"
    return outcome


class _Tasks:
    """Tasks sent to the link and not answered yet, by id."""

    def __init__(self, link: HostLink, bench):
        self.link, self.bench = link, bench
        self.open: dict[int, tuple[int, int]] = {}
        self.next_id = 1

    def send(self) -> bool:
        task = self.bench.next_task()
        if task is None:
            return False
        lo, hi, args = task
        self.open[self.next_id] = (lo, hi)
        self.link.send_task(self.next_id, self.bench.name, lo, hi, args)
        self.next_id += 1
        return True

    def cancel_all(self) -> None:
        for task_id in list(self.open):
            self.link.cancel(task_id)
        self.open.clear()


def _result(events: queue.Queue, link: HostLink, tasks: _Tasks, timeout: float):
    """The next result event of this link (None on timeout); a lost link raises ConnectError."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            return None
        if event.kind == "lost":
            raise ConnectError(f"{link.name}: connection lost ({event.reason})")
        if event.kind == "result" and (event.message or {}).get("id") in tasks.open:
            return event


def _answer(event, tasks: _Tasks, outcome: Calibration) -> Optional[tuple[int, int, Any]]:
    """(lo, hi, checked) of a good result; counts and raises on repeated failures."""
    message = event.message or {}
    lo, hi = tasks.open.pop(message.get("id"))
    if message.get("ok") and event.checked is not None and not event.invalid:
        return lo, hi, event.checked
    outcome.failures += 1
    error = event.invalid or message.get("error") or "failed"
    log.warning("%s: benchmark task [%d, %d] failed: %s", outcome.host, lo, hi, error)
    if outcome.failures >= MAX_FAILURES:
        raise BeowulfError(f"{outcome.host}: {outcome.failures} benchmark tasks failed (last: {error})")
    return None


def _measure(link: HostLink, events: queue.Queue, bench, seconds: float, outcome: Calibration) -> None:
    tasks = _Tasks(link, bench)

    def run_one() -> float:
        """Run one task alone (the probe); its compute time."""
        while True:
            if not tasks.send():
                return 0.0
            event = _result(events, link, tasks, GRACE_SECONDS)
            if event is None:
                raise BeowulfError(f"{link.name}: no answer to a probe task in {GRACE_SECONDS:.0f}s")
            if _answer(event, tasks, outcome) is not None:
                return float((event.message or {}).get("elapsed") or 0.0)

    bench.prepare(run_one)
    began = time.monotonic()
    deadline = began + seconds
    last = began
    while len(tasks.open) < link.slots + 1 and tasks.send():
        pass
    while tasks.open:
        now = time.monotonic()
        if now >= deadline and outcome.tasks:
            break
        wait = deadline - now if outcome.tasks else deadline + GRACE_SECONDS - now
        event = _result(events, link, tasks, max(wait, 0.0))
        if event is None:
            if not outcome.tasks:
                raise BeowulfError(f"{link.name}: no result within {seconds + GRACE_SECONDS:.0f}s")
            break
        got = _answer(event, tasks, outcome)
        if got is not None:
            lo, hi, checked = got
            outcome.tasks += 1
            outcome.items += bench.items(lo, hi, checked)
            outcome.lo = lo if outcome.lo is None else min(outcome.lo, lo)
            outcome.hi = hi if outcome.hi is None else max(outcome.hi, hi)
            last = time.monotonic()
            bench.adapt(hi - lo + 1, float((event.message or {}).get("elapsed") or 0.0))
        while time.monotonic() < deadline and len(tasks.open) < link.slots + 1 and tasks.send():
            pass
    tasks.cancel_all()
    outcome.seconds = last - began
    outcome.rate = outcome.items / outcome.seconds if outcome.seconds > 0 else 0.0
