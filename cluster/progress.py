"""Live progress: a rich display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger(__name__)


def _rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Call with (done, total, host stats); use as a context manager around the run."""

    def __init__(self, unit: str = "numbers", enabled: Optional[bool] = None, interval: float = 5.0):
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._live = None
        self._task = None
        self._began = time.monotonic()
        self._first_done: Optional[int] = None
        self._last_log = 0.0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), TextColumn("{task.fields[hosts]}"),
                console=Console(stderr=True), transient=False, refresh_per_second=4,
            )
            self._live.__enter__()
            self._task = self._live.add_task("primes", total=None, speed="", hosts="")
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def __call__(self, done: int, total: int, hosts) -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done, self._began, self._last_log = done, now, now
        elapsed = max(now - self._began, 1e-9)
        speed = (done - self._first_done) / elapsed
        per_host = " ".join(f"{h.name}:{_rate(h.rate * h.slots)}/s" for h in hosts if h.state == "up" and h.rate)
        if self._live is not None:
            self._live.update(self._task, total=total, completed=done, speed=f"{_rate(speed)} {self.unit}/s",
                              hosts=per_host)
        elif now - self._last_log >= self.interval:
            self._last_log = now
            eta = f"ETA {(total - done) / speed:.0f}s" if speed > 0 else "ETA unknown"
            log.info("%.1f%% (%s of %s %s), %s %s/s, %s; %s", 100 * done / max(total, 1), f"{done:,}",
                     f"{total:,}", self.unit, _rate(speed), self.unit, eta, per_host or "starting")
