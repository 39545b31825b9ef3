"""Live progress: a rich display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Optional

from .shown import shown

log = logging.getLogger(__name__)
# Seconds over which a host's current rate is measured for the display.
RATE_WINDOW = 3.0


def _rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class _ConsoleStream:
    """A file-like stream that prints through rich's console, above the live display."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


class Progress:
    """Call with (done, total, host stats); use as a context manager around the run."""

    def __init__(self, unit: str = "numbers", enabled: Optional[bool] = None, interval: float = 5.0,
                 label: str = "", per_minute: bool = False):
        self.unit = unit
        self.per_minute = per_minute
        self.label = label or unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._live = None
        self._task = None
        self._swapped: list = []
        self._history: dict = {}
        self._began = time.monotonic()
        self._first_done: Optional[int] = None
        self._last_log = 0.0

    @property
    def per(self) -> str:
        return "/min" if self.per_minute else "/s"

    def __enter__(self):
        return self

    def _start_live(self) -> None:
        """Start the rich display at the first update, so setup messages print plainly before it."""
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._live = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), TaskProgressColumn(),
            TextColumn("ETA"), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
            TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[hosts]}", markup=False),
            console=Console(stderr=True), transient=False, refresh_per_second=4,
        )
        self._live.__enter__()
        self._task = self._live.add_task(self.label, total=None, speed="", hosts="")
        # Log lines (a host lost, a warning) go through the same console, above the bars.
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_beowulf", False) and isinstance(handler, logging.StreamHandler) \
                    and getattr(handler, "stream", None) is sys.stderr:
                self._swapped.append(handler)
                handler.setStream(_ConsoleStream(self._live.console))

    def _host_rates(self, now: float, hosts) -> str:
        """Each host's rate over the last few seconds (items it completed / time)."""
        parts = []
        for host in hosts:
            history = self._history.setdefault(host.name, deque())
            history.append((now, host.items))
            while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
                history.popleft()
            then, items_then = history[0]
            if host.state == "up" and now > then:
                rate = (host.items - items_then) / (now - then) * (60 if self.per_minute else 1)
                parts.append(f"{shown(host.name)}:{_rate(rate)}{self.per}")
        return " ".join(parts)

    def __exit__(self, *exc):
        if self._live is not None:
            for handler in self._swapped:
                handler.setStream(sys.stderr)
            self._live.__exit__(*exc)

    def __call__(self, done: int, total: int, hosts) -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done, self._began, self._last_log = done, now, now
        elapsed = max(now - self._began, 1e-9)
        speed = (done - self._first_done) / elapsed * (60 if self.per_minute else 1)
        per_host = self._host_rates(now, hosts)
        if self.enabled and self._live is None:
            self._start_live()
        if self._live is not None:
            self._live.update(self._task, total=total, completed=done, speed=f"{_rate(speed)} {self.unit}{self.per}",
                              hosts=per_host)
        elif now - self._last_log >= self.interval:
            self._last_log = now
            per_second = speed / (60 if self.per_minute else 1)
            eta = f"ETA {(total - done) / per_second:.0f}s" if speed > 0 else "ETA unknown"
            log.info("%.1f%% (%s of %s %s), %s %s%s, %s; %s", 100 * done / max(total, 1), f"{done:,}",
                     f"{total:,}", self.unit, _rate(speed), self.unit, self.per, eta, per_host or "starting")
