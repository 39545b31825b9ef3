"""The job interface: every hook the engine (coordinator, agents, store, calibrate) calls on a job.

A job says how to split the work into blocks of items, what a host runs for a block,
how to check and judge what comes back, and what to store with it. The engine names
no job: it calls these hooks only, and every hook has a default here, so a job defines
only what differs. docs/ARCHITECTURE.md ("The job interface", "How to add a job") walks
through them.

Items are numbered ``start`` .. ``end`` (inclusive, ``total`` of them); a block is a range
``[lo, hi]`` of items (``Block`` of cluster/scheduler.py: ``lo``, ``hi``, ``size``,
``attempts``, ...). A host runs the client job module named ``name`` (client/<name>.py,
or a built-in of client/jobs_builtin.py) on ``task_args`` of the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# What to do with an answer (Decision.action).
COMMIT = "commit"        # a valid, final result: store it (the block is done)
RETRY = "retry"          # not final yet: the block goes out again after ``delay`` (not a failure)
GIVE_BACK = "give_back"  # a failure: counted against the host and the block, the block is redone
LOSE_HOST = "lose_host"  # the host, not the block, is at fault: it is taken out (with back-off)
ACTIONS = (COMMIT, RETRY, GIVE_BACK, LOSE_HOST)

# Error kinds of a failed result (its "kind" field; client/agent.py sets it): a job's
# ``failure`` decides on the kind, never on the error text.
KIND_ERROR = "error"  # the task raised (the default when a host does not say)
KIND_DIED = "died"    # the worker running it died
KIND_PROXY = "proxy"  # the host's proxy (Tor) failed: nothing was fetched
KIND_INVALID = "invalid"  # the result came back but failed the job's check


def engine_in(hello, job: str) -> str:
    """What a host's hello says it runs job ``job`` with ('' when it does not say)."""
    engines = hello.get("engines") if isinstance(hello, dict) else None
    if not isinstance(engines, dict):
        return ""
    return str(engines.get(job) or "")


@dataclass(frozen=True)
class Decision:
    """A job's verdict on one answer (``decide``) or one failure (``failure``).

    ``delay``: RETRY only, seconds before the block may go out again.
    ``avoid``: RETRY/GIVE_BACK, prefer another host next time (only when another is up).
    ``reason``: LOSE_HOST, why (logged and recorded as the host's loss reason).
    ``record``: rows to store right away, whatever the action (e.g. an attempt row for a
    failed item): a sequence of (table, row dict) pairs for the job's own tables
    (``migrations``); the store adds ``run_id`` and ``lo`` to each.
    """

    action: str
    delay: float = 0.0
    avoid: bool = False
    reason: str = ""
    record: Sequence[tuple] = ()

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown decision {self.action!r}")


class Job:
    """The declared job interface with its defaults (a subclass overrides what differs).

    Set by the job itself: ``name`` (the client job module), ``start``, ``end``, ``total``.
    Set by the coordinator through ``bind``: ``run_id`` and ``store``.
    """

    #: The client job a host runs (client/<name>.py) and the run's job name in the store.
    name: str = ""
    #: First and last item (inclusive) and their count.
    start: int = 0
    end: int = -1
    total: int = 0
    #: The job's own tables: ``migrations[n]`` is a list of SQL statements taking the job's
    #: tables from version n to n + 1 (``migrations[0]`` creates them). Store.migrate_job
    #: applies the missing ones before a run and records the version in ``job_schema``.
    #: Each table has ``run_id`` and ``lo`` columns (its rows go with a block or an item).
    migrations: Sequence[Sequence[str]] = ()
    #: Result fields that hold the encoded payload (``check`` decodes them into the payload):
    #: the host link drops them once checked, so the encoded copy is not kept twice.
    encoded_fields: Sequence[str] = ()
    #: What an item is, singular and plural (progress bar, fab calibrate tables).
    unit: tuple = ("item", "items")
    #: How rates read in stats and reports: (items name, seconds per display unit, unit).
    rate_unit: tuple = ("items", 1.0, "s")
    #: The progress bar shows items per minute (slow items, like pages) instead of per second.
    progress_per_minute: bool = False

    run_id: int = 0
    store: Any = None

    # ------------------------------------------------------------ identity and shape

    def params(self) -> dict:
        """The run's identity: two runs with equal name and params are the same run (resume)."""
        return {"start": self.start, "end": self.end}

    def bind(self, run_id: int, store) -> None:
        """Called once by the coordinator before any other per-run hook: the run's id and the
        open store (for reading; write through ``rows`` and ``Decision.record``)."""
        self.run_id = run_id
        self.store = store

    def min_block(self) -> int:
        """Narrowest block handed out (the scheduler's MIN_BLOCK by default)."""
        from cluster.scheduler import MIN_BLOCK

        return MIN_BLOCK

    def first_block(self) -> int:
        """Width of a host's first (probe) block, from which its rate is measured."""
        return min(self.min_block(), self.total) or 1

    def max_block(self) -> int:
        """Widest block handed out."""
        return max(1, self.total)

    def make_schedule(self, done: list, min_block: int):
        """The schedule of the run (cluster/scheduler.py ``Schedule``: ranges left, redo,
        endgame, verify), given the ranges already committed. A job with its own order
        (scrape: per-site politeness) returns a subclass."""
        from cluster.scheduler import Schedule

        return Schedule(self.start, self.end, done, min_block)

    def task_floor(self) -> Optional[float]:
        """Seconds a task may take on any host before it is overdue; None: the coordinator's
        TASK_FLOOR."""
        return None

    # ------------------------------------------------------------ per host

    def prepare_host(self, transport) -> None:
        """Check or set up a host before its agent starts (raise BeowulfError to leave it out)."""

    def slot_factor(self) -> int:
        """Agent workers per slot (a job that waits on the network runs several a slot)."""
        return 1

    def capacity(self, slots: int) -> int:
        """Tasks in flight per host: one per slot plus one queued."""
        return slots + 1

    def engine_of(self, hello: dict) -> str:
        """The engine this host runs the job with, from its hello (``engines`` by job name)."""
        return engine_in(hello, self.name)

    def task_args(self, lo: int, hi: int) -> dict:
        """Arguments of the client job's run() for the block of items [lo, hi]."""
        return {"lo": lo, "hi": hi}

    def task_args_for(self, block, link, task_id: int) -> dict:
        """``task_args`` for the host behind ``link`` (its address, proxy, ...)."""
        return self.task_args(block.lo, block.hi)

    # ------------------------------------------------------------ results

    def check(self, lo: int, hi: int, result: dict) -> tuple:
        """Verify a result (hostile until checked; runs in the host's reader thread):
        (found, payload bytes or None), or raise BeowulfError (the result is invalid)."""
        return hi - lo + 1, None

    def decide(self, block, result: dict, host: str) -> Decision:
        """Whether a checked answer is final (COMMIT) or must be tried again (RETRY)."""
        return Decision(COMMIT)

    def failure(self, block, kind: str, message: str, host: str) -> Decision:
        """What a failed task means (``kind``: KIND_ERROR, KIND_DIED, KIND_PROXY,
        KIND_INVALID, or a job's own): by default the block failed (GIVE_BACK)."""
        return Decision(GIVE_BACK)

    def block_meta(self, result: dict) -> dict:
        """Result fields kept with the block in the store (``blocks.meta``, JSON)."""
        return {}

    def rows(self, block, result: dict, host: str) -> list:
        """Rows of the job's own tables stored with the block, in the same transaction:
        a list of (table, row dict); the store adds ``run_id`` and ``lo``."""
        return []

    def verify_key(self, found: int, result: dict) -> tuple:
        """What a --verify re-run must reproduce for the block to agree."""
        return (found,)

    # ------------------------------------------------------------ calibrate (fab calibrate)

    #: fab calibrate measures this job (``bench`` and ``bench_of_run`` return benchmarks).
    calibrated: bool = False

    @classmethod
    def bench(cls, *, urls=None, tor: bool = False, start=None, mode=None):
        """A benchmark of one host alone for ``fab calibrate --job NAME`` (cluster/calibrate.py
        protocol: ``name``, ``encoded_fields``, ``records_range``, ``mode``, ``check``, ``items``,
        ``next_task``, ``prepare``, ``adapt``); UsageError for a flag the job does not take."""
        from cluster.errors import UsageError

        raise UsageError(f"fab calibrate does not measure {cls.name or 'this job'}")

    @classmethod
    def bench_of_run(cls, run: dict, store, *, urls=None):
        """(benchmark, tor) measuring what run ``run`` (a store run dict) did, for
        ``fab calibrate --run N``; None when the job has none."""
        return None

    # ------------------------------------------------------------ presentation (stats, report)

    @classmethod
    def slots_label(cls) -> str:
        """Column heading of a host's parallelism in tables."""
        return "slots"

    @classmethod
    def found_label(cls) -> str:
        """Column heading of what a host found (a block's ``found``) in the end-of-run table."""
        return "found"

    @classmethod
    def mode_of(cls, run: dict) -> str:
        """A run's mode (a variant whose rates are not comparable with another's), or ''."""
        return ""

    @classmethod
    def describe_run(cls, run: dict) -> str:
        """Words added to the job's name when a report names what a run measured (its mode...)."""
        return ""

    @classmethod
    def comparable_calibration(cls, run: dict, calibration: dict) -> bool:
        """Whether a calibration of the same job and variant, measured before the run ended,
        measured what ``run`` did (cluster/figures.py comparable)."""
        return True

    @classmethod
    def describe_calibration(cls, row: dict) -> str:
        """What a calibration measured, in words (fab stats' calibration column)."""
        return f"variant {row.get('variant')}" if row.get("variant") else ""

    @classmethod
    def recent_items(cls, store, run_id: int, limit: int) -> list:
        """The run's latest items for the dashboard (dicts of short fields; scrape: pages)."""
        return []

    @classmethod
    def item_counts(cls, store, run_id: int) -> dict:
        """What a host's items add to its ``retries`` and ``failures`` in the run's report, for a
        job whose items fail inside tasks that succeed (map): ``{host: {"retries": n, "failures": n}}``."""
        return {}

    def retry_line(self, block, delay: float, why: str) -> str:
        """The console line when ``decide``/``failure`` sends a block again (RETRY); '' logs it
        only in the log file (the job says it in its own summary)."""
        return f"item {block.lo} again in {delay:.1f}s ({why})"

    @classmethod
    def summary_notes(cls, report: dict) -> list:
        """Lines printed under the end-of-run table (a run report of cluster/report.py)."""
        return []


@dataclass
class FakeBlock:
    """A block outside a schedule (calibration, tests): the fields hooks read."""

    lo: int
    hi: int
    attempts: int = 1
    avoid: set = field(default_factory=set)

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1
