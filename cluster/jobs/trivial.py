"""A job of N tiny blocks running one of the agent's built-in jobs (noop, sleep, echo, ...).

For dispatch benchmarks and scheduler tests: it measures the machinery, not the work.
It implements the few hooks of the job interface (cluster/jobs/base.py) that differ
from the defaults.
"""

from __future__ import annotations

from typing import Optional

from .base import Job


class TrivialJob(Job):
    """``count`` items in blocks of ``block`` items, each block one call of the client job ``client_job``."""

    def __init__(self, count: int, client_job: str = "noop", args: Optional[dict] = None, block: int = 1):
        self.name = client_job
        self.args = dict(args or {})
        self.block = block
        self.start, self.end, self.total = 0, count - 1, count

    def params(self) -> dict:
        return {"count": self.total, "args": self.args, "block": self.block}

    def task_args(self, lo: int, hi: int) -> dict:
        return dict(self.args, lo=lo, hi=hi)

    def check(self, lo: int, hi: int, result: dict) -> tuple[int, Optional[bytes]]:
        return hi - lo + 1, None

    def first_block(self) -> int:
        return self.block

    def max_block(self) -> int:
        return self.block

    def min_block(self) -> int:
        return self.block
