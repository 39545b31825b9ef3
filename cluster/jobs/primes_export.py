"""The primes job's export: a run's primes as text, one a line in ascending order.

``fab primes --export`` streams a run's stored blocks (``export_run``), or the part of a
finished run that covers a smaller range (``export_between``), into a temporary file beside
the target, then puts it in place: nothing half-written is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.errors import JobError
from cluster.jobs.primes import write_text


def export_run(store, run_id: int, export_path: Path, db_path: Path) -> None:
    """Every prime of run ``run_id`` (its blocks in order) into ``export_path``."""
    write_export(export_path, db_path, lambda handle: write_text(
        ((lo, payload) for lo, _hi, payload in store.iter_payloads(run_id)), handle))


def export_between(store, run_id: int, first: int, last: int, export_path: Path, db_path: Path) -> None:
    """The primes in [first, last] from a finished run's stored blocks, streamed block by block."""

    def blocks():
        lo = first
        while lo <= last:
            rows = store.payloads_between(run_id, lo, last, limit=16)
            if not rows:
                return
            for row in rows:
                yield row[0], row[2]
            lo = rows[-1][1] + 1

    write_export(export_path, db_path, lambda handle: write_text(blocks(), handle, first, last))


def write_export(export_path: Path, db_path: Path, write) -> None:
    """``write(handle)`` into a temporary file beside ``export_path``, then put it in place."""
    temp = export_path.with_name(f".{export_path.name}.part")
    try:
        with open(temp, "w", encoding="ascii") as handle:
            write(handle)
        os.replace(temp, export_path)
    except OSError as err:
        raise JobError(f"--export: cannot write {export_path}: {err.strerror or err}; the primes are kept in "
                       f"{db_path}: run the command again to export") from None
    finally:
        if temp.exists():
            temp.unlink()
