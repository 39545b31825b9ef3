"""Repeated identical messages said once, with a count (README.md, "Scrape": errors in the summary).

``12 x connection refused (127.0.0.9:1)`` instead of twelve lines: end-of-run warnings
and the errors of a scrape's pages are shown through these, and the console log
lines of a run through RepeatFilter.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterable, List, Optional, Tuple


def counted(texts: Iterable[str]) -> List[Tuple[int, str]]:
    """(count, text) for each distinct text, most frequent first, then in first-seen order."""
    counts = Counter()
    first = {}
    for position, text in enumerate(texts):
        counts[text] += 1
        first.setdefault(text, position)
    return sorted(((n, text) for text, n in counts.items()), key=lambda item: (-item[0], first[item[1]]))


def tallied(texts: Iterable[str], limit: Optional[int] = None) -> List[str]:
    """Each distinct text once: ``N x text`` when it came N > 1 times; at most ``limit`` lines
    (the last says how many other distinct texts were left out)."""
    lines = [text if n == 1 else f"{n} x {text}" for n, text in counted(texts)]
    if limit is not None and len(lines) > limit:
        rest = len(lines) - (limit - 1)
        lines = lines[:limit - 1] + [f"... and {rest} other messages"]
    return lines


# Numbers in a log line (item numbers, seconds, ports; not those in a name such as h2): lines
# that differ only in these repeat.
_NUMBERS = re.compile(r"(?<![A-Za-z_\d])\d+(?:\.\d+)?")
# Times a line is shown on the console before its repeats are only counted.
SHOWN_REPEATS = 2
# Loggers whose lines are all shown: the progress lines (without a terminal) differ only in numbers.
UNFILTERED_LOGGERS = ("cluster.progress",)


class RepeatFilter(logging.Filter):
    """Console lines that repeat one already shown, but for their numbers, are counted, not shown.

    ``h1: item 7 again in 4.0s (connection refused (127.0.0.9:1))`` is shown
    SHOWN_REPEATS times; later lines like it are counted and ``summary()`` says how many
    (the log file keeps every line). Errors are always shown.
    """

    def __init__(self, shown: int = SHOWN_REPEATS):
        super().__init__()
        self.shown = shown
        self.counts: Counter = Counter()
        self.last: dict = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name in UNFILTERED_LOGGERS:
            return True
        try:
            text = record.getMessage()
        except Exception:  # a bad format string: let the handler report it
            return True
        key = (record.levelno, _NUMBERS.sub("#", text))
        self.counts[key] += 1
        self.last[key] = text
        return self.counts[key] <= self.shown

    def summary(self) -> List[str]:
        """``N more like: LAST LINE`` for each line whose repeats were not shown."""
        return [f"{count - self.shown} more like: {self.last[key]}"
                for key, count in self.counts.items() if count > self.shown]


def repeats_not_shown() -> List[str]:
    """The summary of every RepeatFilter on the root logger's handlers (see tasks/common.py)."""
    lines = []
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, RepeatFilter):
                lines += found.summary()
    return lines
