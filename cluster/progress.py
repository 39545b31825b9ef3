"""Live progress: a rich display on a terminal, plain log lines otherwise.

The display is laid out for the terminal's width at every refresh (README.md, "Progress").
The first line always holds the percentage, done/total and the ETA, down to 60 columns
and below; the bar, the overall rate and the label take what is left, in that order of
giving way; each host's rate goes on the lines below, wrapped, and the hosts that do not
fit in ``HOST_LINES`` lines are counted, not shown. The last frame shows the final figure:
100% when the run finished, else the figure reached and why the run stopped.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from typing import Optional

from .shown import shown

log = logging.getLogger(__name__)
# Seconds over which a host's current rate is measured for the display.
RATE_WINDOW = 3.0
# Lines of per-host rates under the first line, at most.
HOST_LINES = 3
# The bar is drawn only when at least this many columns are left for it.
MIN_BAR = 8
MAX_BAR = 30


def _rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _count(value: int, total: int) -> str:
    """Exact with separators while short (12,345), else in the unit of ``total`` (1.23G of 2.00G)."""
    if total < 1_000_000:
        return f"{value:,}"
    unit, scale = next((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if total >= s)
    decimals = 2 if total < 10 * scale else 1 if total < 100 * scale else 0
    return f"{value / scale:,.{decimals}f}{unit}"


def _percent(done: int, total: int) -> str:
    """Rounded down: 100% only when everything is done."""
    if total <= 0 or done >= total:
        return "100%"
    return f"{math.floor(1000 * done / total) / 10:.1f}%"


def _duration(seconds: float) -> str:
    """3s, 2m05s, 1h02m, 3d04h."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 100:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def first_line(width: int, label: str, done: int, total: int, unit: str, eta: str, speed: str,
               unicode_bar: bool = True) -> tuple[str, int, int]:
    """The first line for ``width`` columns: (text, where the bar starts, bar width; 0 = none).

    ``eta`` is the part after the figures ("ETA 2m05s", "took 3s", "stopped: interrupted").
    Percent, done/total and ``eta`` are always there (cut only below their own width);
    then the label, the rate and the bar, each when it fits.
    """
    whole = _count(total, total)  # padded so that the bar keeps its width from frame to frame
    core = f"{_percent(done, total):>5} {_count(done, total):>{len(whole)}}/{whole} {unit} {eta}"
    if len(core) > width:
        return core[: max(width - 1, 0)] + "…", 0, 0
    head = f"{label} " if label and len(label) + 1 + len(core) <= width else ""
    tail = f"  {speed}" if speed and len(head) + len(core) + 2 + len(speed) <= width else ""
    room = width - len(head) - len(core) - len(tail) - 1
    bar = min(room, MAX_BAR) if room >= MIN_BAR else 0
    if bar:
        return f"{head}{' ' * bar} {core}{tail}", len(head), bar
    return f"{head}{core}{tail}", 0, 0


def host_lines(width: int, parts: list[str], limit: int = HOST_LINES) -> list[str]:
    """``parts`` ("h1 445.3M/s") wrapped into at most ``limit`` lines of ``width`` columns.

    What does not fit is counted at the end of the last line ("+4 hosts"); a part wider
    than a line is cut.
    """
    room = max(width - 2, 1)
    parts = [part if len(part) <= room else part[: room - 1] + "…" for part in parts]
    lines: list[list[str]] = []
    for part in parts:
        if lines and len("  ".join(lines[-1] + [part])) <= room:
            lines[-1].append(part)
        else:
            lines.append([part])
    if len(lines) > limit:
        lines = lines[:limit]
        shown_count = sum(len(line) for line in lines)
        while True:
            left = len(parts) - shown_count
            more = f"+{left} host{'s' if left != 1 else ''}"
            if len("  ".join(lines[-1] + [more])) <= room or not lines[-1]:
                break
            lines[-1].pop()
            shown_count -= 1
        lines[-1].append(more)
    return ["  " + "  ".join(line) for line in lines]


class _ConsoleStream:
    """A file-like stream that prints through rich's console, above the live display."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


class _Frame:
    """What the live display shows, laid out for the console's width at each refresh."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __rich_console__(self, console, options):
        from rich.text import Text

        width = max(options.max_width, 1)
        p = self.progress
        utf = (console.encoding or "").lower().startswith("utf")
        text, at, bar = first_line(width, p.label, p.done, p.total, p.unit, p.eta_text(), p.speed_text())
        line = Text(no_wrap=True, overflow="ellipsis", end="")
        if bar:
            filled = int(round(bar * min(p.done, p.total) / p.total)) if p.total > 0 else bar
            line.append(text[:at], style="bold")
            line.append(("━" if utf else "#") * filled, style="bar.complete")
            line.append(("━" if utf else "-") * (bar - filled), style="bar.back")
            line.append(text[at + bar:])
        else:
            line.append(text)
        for extra in ([] if p.ended else host_lines(width, p.host_parts)):
            line.append("\n" + extra)
        yield line


class Progress:
    """Call with (done, total, host stats); use as a context manager around the run.

    Call ``finish(done, total)`` with the run's final figures once it has returned; leaving
    the context on an exception shows the figure reached and why the run stopped.
    """

    def __init__(self, unit: str = "numbers", enabled: Optional[bool] = None, interval: float = 5.0,
                 label: str = "", per_minute: bool = False):
        self.unit = unit
        self.per_minute = per_minute
        self.label = label or unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._live = None
        self._swapped: list = []
        self._history: dict = {}
        self._began = time.monotonic()
        self._first_done: Optional[int] = None
        self._changed_at = 0.0  # when ``done`` last grew, and the ETA then (eta_seconds)
        self._eta_at_change: Optional[float] = None
        self._last_log = 0.0
        self.done = 0
        self.total = 0
        self.speed = 0.0
        self.host_parts: list[str] = []
        self.ended = False
        self.stopped = ""  # why the run stopped early ("interrupted", "every host is lost")
        self.took = 0.0

    @property
    def per(self) -> str:
        return "/min" if self.per_minute else "/s"

    def __enter__(self):
        return self

    def _start_live(self) -> None:
        """Start the rich display at the first update, so setup messages print plainly before it."""
        from rich.console import Console
        from rich.live import Live

        self._live = Live(_Frame(self), console=Console(stderr=True), transient=False, refresh_per_second=4,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.__enter__()
        # Log lines (a host lost, a warning) go through the same console, above the display.
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_beowulf", False) and isinstance(handler, logging.StreamHandler) \
                    and getattr(handler, "stream", None) is sys.stderr:
                self._swapped.append(handler)
                handler.setStream(_ConsoleStream(self._live.console))

    def eta_text(self) -> str:
        if self.ended:
            if self.stopped:
                return f"stopped: {self.stopped}"
            return f"took {_duration(self.took)}"
        seconds = self.eta_seconds()
        return "ETA --" if seconds is None else f"ETA {_duration(seconds)}"

    def eta_seconds(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left: the estimate made when ``done`` last grew (items left / the average rate
        so far), counted down since. Between commits of big blocks the average falls while
        nothing is committed; estimating from it made the ETA rise every second until the next
        commit. Past that estimate (slower than so far) it is the current average's again."""
        if self.done >= self.total:
            return 0.0
        if self.speed <= 0:
            return None
        now = time.monotonic() if now is None else now
        if self._eta_at_change is not None and self._eta_at_change - (now - self._changed_at) > 0:
            return self._eta_at_change - (now - self._changed_at)
        return (self.total - self.done) / (self.speed / (60 if self.per_minute else 1))

    def speed_text(self) -> str:
        return f"{_rate(self.speed)} {self.unit}{self.per}" if self.speed > 0 else ""

    def _host_rates(self, now: float, hosts) -> list[str]:
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
                parts.append(f"{shown(host.name)} {_rate(rate)}{self.per}")
        return parts

    def finish(self, done: int, total: int) -> None:
        """The run returned with ``done`` of ``total`` items: the last frame shows that."""
        self._end(done, total, "")

    def _end(self, done: Optional[int], total: Optional[int], reason: str) -> None:
        if self.ended:
            return
        if done is not None:
            self.done, self.total = done, total if total is not None else self.total
        self.took = time.monotonic() - self._began
        self.stopped = reason
        self.ended = True
        if self._live is not None:
            self._live.refresh()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.ended:
            if issubclass(exc_type, KeyboardInterrupt):
                reason = "interrupted"
            else:
                # "every host is lost (...); finished blocks ..." -> "every host is lost"
                reason = shown(str(exc)).split(" (")[0].split(";")[0].split(":")[0].strip() or "error"
            self._end(None, None, reason)
        if self._live is not None:
            for handler in self._swapped:
                handler.setStream(sys.stderr)
            self._live.__exit__(exc_type, exc, tb)

    def __call__(self, done: int, total: int, hosts) -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done, self._began, self._last_log = done, now, now
        elapsed = max(now - self._began, 1e-9)
        speed = (done - self._first_done) / elapsed * (60 if self.per_minute else 1)
        parts = self._host_rates(now, hosts)
        grew = done != self.done or total != self.total
        self.done, self.total, self.speed, self.host_parts = done, total, speed, parts
        if grew:
            self._eta_at_change, self._changed_at = None, now
            self._eta_at_change = self.eta_seconds(now)
        if self.enabled and self._live is None:
            self._start_live()
        if self._live is None and now - self._last_log >= self.interval:
            self._last_log = now
            per_host = " ".join(part.replace(" ", ":", 1) for part in parts)
            seconds = self.eta_seconds(now)
            eta = f"ETA {seconds:.0f}s" if seconds is not None else "ETA unknown"
            log.info("%.1f%% (%s of %s %s), %s %s%s, %s; %s", 100 * done / max(total, 1), f"{done:,}",
                     f"{total:,}", self.unit, _rate(speed), self.unit, self.per, eta, per_host or "starting")
