"""Repeated identical messages said once, with a count (README.md, "Scrape": errors in the summary).

``12 x connection refused (127.0.0.9:1)`` instead of twelve lines: end-of-run warnings
and the errors of a scrape's pages are shown through these.
"""

from __future__ import annotations

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
