"""`fab primes`: find every prime in [start, end] over the cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.engines import ENGINE_HELP
from cluster.errors import JobError, UsageError

from .common import (
    HOST_HELP,
    beowulf_task,
    load_hosts,
    parse_float,
    parse_int,
    print_run_summary,
    print_warnings,
    run_job,
    setup_logging,
    store_path,
)
from .engine import engine_choice, engine_hosts

log = logging.getLogger(__name__)
MAX_END = 10**15


def check_output_file(flag: str, path: Path) -> None:
    """An output file we can create: its folder exists and is writable, and it is not a folder."""
    if path.is_dir():
        raise UsageError(f"--{flag}: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"--{flag}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--{flag}: cannot write to {path}")


def _size(count: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count / 1e3:,.1f} kB"


@beowulf_task(help={
    **HOST_HELP,
    "start": "first number to search (inclusive); 1e7 and 10_000_000 are fine",
    "end": f"last number to search (inclusive), at most {MAX_END:.0e}",
    "db": "results store (SQLite file; default results.db, or beowulf.db in fabric.yaml)",
    "block_seconds": "aim for blocks that take about this long on each host (default 2)",
    "export": "write the primes, one per line in ascending order, to this file",
    "count_only": "count the primes without storing them (for huge ranges; at the counting kernel's speed)",
    "fresh": "start the run over instead of resuming it",
    "verify": "re-run this fraction of blocks (0..1) on a different host and compare",
    "dashboard": "serve fab dashboard's live page of this run while it goes (its URL is printed)",
    **ENGINE_HELP,
})
def primes(c, start=None, end=None, inventory=None, hosts=None, db=None, block_seconds="2", export=None,
           count_only=False, fresh=False, verify="0", accept_new=False, verbose=False, quiet=False,
           dashboard=False, engine=None, scheduler=None):
    """Find every prime p with START <= p <= END (both inclusive) on all hosts; resumable.

    Running the same command again resumes: finished blocks are kept. --export writes the
    primes (computing only what is missing). Exit 130 on Ctrl-C, 1 if every host was lost.
    """
    if start is None or end is None:
        raise UsageError("--start and --end are required, e.g. fab primes --start 1 --end 1e7")
    first = parse_int("start", start, minimum=0, maximum=MAX_END)
    last = parse_int("end", end, minimum=0, maximum=MAX_END)
    if first > last:
        raise UsageError(f"--start ({first:,}) must not be greater than --end ({last:,})")
    seconds = parse_float("block-seconds", block_seconds, above=0, maximum=3600)
    fraction = parse_float("verify", verify, minimum=0, maximum=1)
    if export and count_only:
        raise UsageError("--export needs the primes themselves: it cannot be used with --count-only")
    export_path = Path(os.path.expanduser(export)) if export else None
    if export_path is not None:
        check_output_file("export", export_path)
    # Imported here so that `fab --list` stays fast (numpy, the store, the engine).
    from cluster.jobs.primes import PrimesJob

    choice = engine_choice(c, engine, scheduler, inventory, hosts)
    if not choice.is_dask:
        load_hosts(c, inventory, hosts)  # a bad inventory is a usage error before anything else
    db_path = store_path(c, db)
    setup_logging(verbose, quiet, db_path.parent / "beowulf.log")
    if not fresh and _answer_from_finished_run(db_path, first, last, count_only, export_path):
        return
    job = PrimesJob(first, last, count_only=count_only)
    _check_disk(db_path, job)
    with engine_hosts(c, choice, inventory, hosts) as chosen:
        if fraction > 0 and len(chosen.hosts) < 2:
            log.warning("warning: --verify needs two hosts or more (a block is re-run on a different host); "
                        "nothing will be verified")
        outcome = run_job(c, job, chosen.hosts, db_path, fresh=fresh, accept_new=accept_new, quiet=quiet,
                          dashboard=dashboard, block_seconds=seconds, verify=fraction,
                          on_coordinator=chosen.attach, **chosen.kwargs)
    _print_summary(outcome, job, db_path)
    if export_path is not None:
        _export(db_path, outcome.run_id, export_path)


def _finished_list_run(store, first: int, last: int, count_only: bool):
    """The newest finished list-mode primes run whose range covers [first, last] (in list
    mode a bigger one: the same range is the run itself), or None."""
    for run in reversed(store.runs()):
        params = run["params"]
        if run["job"] != "primes" or run["state"] != "done" or params.get("mode") != "list":
            continue
        start, end = params.get("start"), params.get("end")
        if isinstance(start, int) and isinstance(end, int) and start <= first and last <= end \
                and (count_only or (start, end) != (first, last)):
            return run
    return None


def _answer_from_finished_run(db_path: Path, first: int, last: int, count_only: bool,
                              export_path) -> bool:
    """Answer [first, last] from a finished list run of the store that covers it: count
    it, and export it, without computing anything. False when there is none."""
    from cluster.errors import StoreError
    from cluster.jobs.primes import count_between
    from cluster.jobs.primes_export import export_between
    from cluster.store import Store

    if not db_path.is_file():
        return False
    try:
        store = Store.open_readonly(db_path)
    except StoreError:
        return False  # the run itself reports what is wrong with the store
    with store:
        run = _finished_list_run(store, first, last, count_only)
        if run is None:
            return False
        run_id = run["id"]
        blocks = []
        for block in store.blocks(run_id):
            lo, hi = block["lo"], block["hi"]
            if hi < first or lo > last:
                continue
            payload = None
            if lo < first or hi > last:  # cut by the range: count from its primes
                payload = store.payloads_between(run_id, lo, lo)[0][2]
            blocks.append((lo, hi, block["found"], payload))
        try:
            found = count_between(blocks, first, last)
        except ValueError as err:
            log.warning("run %d cannot answer [%d, %d] (%s): computing it", run_id, first, last, err)
            return False
        if export_path is not None:
            export_between(store, run_id, first, last, export_path, db_path)
    span = f"[{run['params']['start']:,}, {run['params']['end']:,}]"
    mode = "counted" if count_only else "taken"
    print(f"{found:,} {_primes(found)} in [{first:,}, {last:,}] ({mode} from finished run {run_id} of {span} "
          f"in {db_path}: nothing computed)")
    if export_path is not None:
        print(f"exported to {export_path}")
    return True


def _primes(count: int) -> str:
    return "prime" if count == 1 else "primes"


def _check_disk(db_path: Path, job) -> None:
    from cluster.jobs.primes import estimate_bytes

    if job.count_only:
        return
    folder = db_path.parent if db_path.parent.exists() else Path.cwd()
    need = estimate_bytes(job.start, job.end, "list")
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    if need > free:
        raise JobError(f"the primes in [{job.start:,}, {job.end:,}] need about {_size(need)} "
                       f"but {folder} has {_size(free)} free; use --count-only or a smaller range")


def _print_summary(outcome, job, db_path: Path) -> None:
    if outcome.already_done:
        print(f"run {outcome.run_id} already complete in {db_path}: nothing to compute")
    else:
        print_run_summary(outcome, db_path, job.name)
    print_warnings(outcome)
    if outcome.verified:
        print(f"--verify: {outcome.verified} blocks re-run elsewhere, {outcome.verify_mismatches} disagreed")
    found = outcome.found_total
    print(f"{found:,} {_primes(found)} in [{job.start:,}, {job.end:,}] (run {outcome.run_id}, {db_path})")


def _export(db_path: Path, run_id: int, export_path: Path) -> None:
    """--export: the primes job's export (cluster/jobs/primes_export.py) of run ``run_id``."""
    from cluster.jobs.primes_export import export_run
    from cluster.store import Store

    with Store(str(db_path)) as store:
        export_run(store, run_id, export_path, db_path)
    print(f"exported to {export_path}")
