"""`fab map`: your own command or Python function over every item, on every host."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from invoke import Exit

from cluster.engines import ENGINE_HELP
from cluster.errors import UsageError
from cluster.shown import shown

from .common import (
    EXIT_FAILED,
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
from .primes import check_output_file

log = logging.getLogger(__name__)
# Failed items listed under the summary (the rest: --export x.jsonl, --joblog).
FAILED_SHOWN = 5
MAX_RETRIES = 100
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|s|m|h|d|%)?\s*$")
_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_timeout(text) -> tuple:
    """``(seconds, None)`` from ``10``, ``90s``, ``10m``, ``2h``; ``(None, percent)`` from ``300%``."""
    from client.mapper import MAX_TIMEOUT

    match = _DURATION.match(str(text))
    if not match:
        raise UsageError(f"--timeout: want seconds (10, 90s, 10m, 2h) or a percentage of the median "
                         f"item time (300%), not {shown(str(text))[:60]!r}")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not 100 <= number <= 100_000:
            raise UsageError(f"--timeout {text}: a percentage from 100% to 100000%")
        return None, number
    seconds = number * _UNITS[unit]
    if not 0 < seconds <= MAX_TIMEOUT:
        raise UsageError(f"--timeout {text}: must be more than 0 and at most {MAX_TIMEOUT / 86400:g} days")
    return seconds, None


def _split_list(text) -> tuple:
    return tuple(part for part in str(text).split(",") if part) if text else ()


@beowulf_task(iterable=["return_"], help={
    **HOST_HELP,
    "command": "the command for each item, run by /bin/sh on a host: GNU parallel's replacement strings "
               "{} {.} {/} {//} {/.} {#} {%} {1} {2} ... (every value shell-quoted); none: the item is appended",
    "function": "MODULE:FUNC, a Python function called with each item in the hosts' workers (mymodule.py:score, "
                "pkg.sub:f); its JSON-serialisable return value is the item's result",
    "args": "items: one a line of FILE (- for stdin)",
    "range": "items: the integers A:B[:STEP], both ends inclusive",
    "files": "items: the local files matching GLOB (** too), each shipped to the host that runs it",
    "colsep": "with --args: split each line into columns {1} {2} ... by this regular expression (e.g. '\\t')",
    "return": "with --command: a file the command writes (replacement strings allowed), fetched into --outdir; "
              "repeat for several",
    "outdir": "where returned files go (default results/)",
    "ship": "comma-separated files or folders uploaded once per host (content-addressed): "
            "--function imports from them; a command finds them in $BEOWULF_SHIP",
    "requirements": "a pip requirements FILE (versions, extras, markers): the wheels of it and its dependencies "
                    "for each host platform are fetched once on this computer by pip (its index: PIP_INDEX_URL, "
                    "PIP_FIND_LINKS, pip.conf) and shipped by content (no pip, no internet on the hosts); a host "
                    "without fitting wheels is left out with pip's reason",
    "retries": "tries again an item that failed (exit status, exception, timeout) this many times, "
               "each on another host when there is one (default 2)",
    "timeout": "kill an item after this long: seconds (10, 90s, 10m, 2h) or a percentage of the median "
               "item time on that host (300%)",
    "stdout_cap": "bytes of each item's stdout (or function value) kept (default 1 MiB; truncated mark beyond)",
    "export": "write each item's stdout in input order to FILE, or JSON lines (item, status, stdout, stderr) "
              "when FILE ends in .jsonl",
    "joblog": "write GNU parallel's joblog (Seq, Host, Starttime, JobRuntime, Send, Receive, Exitval, Signal, "
              "Command) of every attempt to FILE",
    "no_duplicates": "never run an item twice at once (no endgame copies): for commands with side effects",
    "retry_failed": "run again only the items that failed (their attempts go on being numbered)",
    "fresh": "start the run over instead of resuming it",
    "db": "results store (SQLite file; default results.db, or beowulf.db in fabric.yaml)",
    "block_seconds": "aim for blocks of items that take about this long on each host (default 2)",
    "dashboard": "serve fab dashboard's live page of this run while it goes (its URL is printed)",
    **ENGINE_HELP,
})
def map_(c, command=None, function=None, args=None, range_=None, files=None, colsep=None, return_=None,
         outdir="results", ship=None, requirements=None, retries="2", timeout=None, stdout_cap=None, export=None,
         joblog=None, no_duplicates=False, retry_failed=False, fresh=False, db=None, block_seconds="2", inventory=None,
         hosts=None, accept_new=False, verbose=False, quiet=False, dashboard=False, engine=None, scheduler=None):
    """Run a command or a Python function over every item (--args, --range or --files) on all hosts.

    Each item's result is stored once (exit status, stdout, stderr tail, host, times); running the
    same command again resumes, runs only new items (lines added to --args) and, with
    --retry-failed, the failed ones. Exit 0 when every item succeeded, 1 when some failed after
    their retries, 2 on bad input (nothing is run), 130 on Ctrl-C.
    """
    from client import mapper
    from cluster import mapinput, mapship
    from cluster.jobs.map import MapSpec

    if bool(command) == bool(function):
        raise UsageError("give one of --command or --function, e.g. fab map --command 'gzip -9 {}' --files '*.log'")
    returns = tuple(return_ or ())
    if returns and not command:
        raise UsageError("--return goes with --command (a function returns its value)")
    spec = MapSpec(mode="command" if command else "function", command=command or "", function=function or "",
                   returns=returns, outdir=str(outdir or "results"), duplicates=not no_duplicates,
                   retry_failed=bool(retry_failed))
    if command:
        spec.parts = mapinput.check_template(command, "--command")
        spec.return_parts = [mapinput.check_template(pattern, "--return") for pattern in returns]
    spec.retries = parse_int("retries", retries, minimum=0, maximum=MAX_RETRIES)
    if timeout is not None:
        spec.timeout, spec.timeout_percent = parse_timeout(timeout)
    if stdout_cap is not None:
        spec.stdout_cap = parse_int("stdout-cap", stdout_cap, minimum=0, maximum=mapper.MAX_STDOUT_CAP)
    seconds = parse_float("block-seconds", block_seconds, above=0, maximum=3600)
    export_path = Path(os.path.expanduser(export)) if export else None
    joblog_path = Path(os.path.expanduser(joblog)) if joblog else None
    for flag, path in (("export", export_path), ("joblog", joblog_path)):
        if path is not None:
            check_output_file(flag, path)
    outdir_path = Path(os.path.expanduser(spec.outdir))
    if returns and outdir_path.exists() and not outdir_path.is_dir():
        raise UsageError(f"--outdir: {outdir_path} is not a folder")
    if returns and not outdir_path.exists() and not outdir_path.parent.is_dir():
        raise UsageError(f"--outdir: folder {outdir_path.parent} does not exist")
    if requirements:
        spec.requirements = mapship.parse_requirements(os.path.expanduser(requirements))
    choice = engine_choice(c, engine, scheduler, inventory, hosts)
    need = mapinput.columns_needed([("--command", spec.parts)] + [("--return", p) for p in spec.return_parts])
    map_input = mapinput.open_input(args=args, range_text=range_, files=files, colsep=colsep, need=need)
    shipment = mapship.build(function, _split_list(ship))
    if not choice.is_dask:
        load_hosts(c, inventory, hosts)  # a bad inventory is a usage error before anything else
    db_path = store_path(c, db)
    setup_logging(verbose, quiet, db_path.parent / "beowulf.log")
    try:
        _run(c, spec, map_input, shipment, (choice, inventory, hosts), db_path, seconds, fresh, accept_new, quiet,
             export_path, joblog_path, outdir_path, dashboard)
    finally:
        map_input.close()


def _run(c, spec, map_input, shipment, engine, db_path: Path, seconds: float, fresh: bool, accept_new: bool,
         quiet: bool, export_path, joblog_path, outdir_path: Path, dashboard: bool) -> None:
    from cluster import mapstore
    from cluster.jobs.map import MapJob
    from cluster.store import Store

    # This computer's agent runs the checkout's client/: its map workdir is beside the store.
    os.environ.setdefault("BEOWULF_MAP_WORKDIR", str(db_path.resolve().parent / ".beowulf" / "local"))
    with Store(str(db_path)):
        pass  # creates the store (and its schema) before the map tables go in
    mapstore.ensure_tables(str(db_path))
    if spec.returns:
        outdir_path.mkdir(parents=True, exist_ok=True)
        spec.outdir = str(outdir_path)
        remove_partial_files(outdir_path)
    job = MapJob(spec, map_input, shipment)
    with engine_hosts(c, *engine) as chosen:  # --engine: hosts.ini's hosts, or a Dask cluster's workers
        outcome = run_job(c, job, chosen.hosts, db_path, fresh=fresh, accept_new=accept_new, quiet=quiet,
                          dashboard=dashboard, kept="finished items", block_seconds=seconds,
                          on_coordinator=chosen.attach, **chosen.kwargs)
        if not outcome.already_done:  # a finished run asked again: one line, nothing written (README.md)
            print_run_summary(outcome, db_path)
            if chosen.dask is not None:
                chosen.dask.remove_run_folders(job.run_hex)
            else:
                _clean_hosts(c, chosen.hosts, job.run_hex, accept_new)
    print_warnings(outcome)
    conn = mapstore.connect(str(db_path))
    try:
        failed = _summary(conn, outcome.run_id, job, db_path, export_path, joblog_path, outcome.already_done)
        if export_path is not None:
            from cluster.mapexport import write_export

            write_export(str(export_path), mapstore.records_in_order(conn, outcome.run_id, map_input, chunks=True))
            print(f"exported to {export_path}")
        if joblog_path is not None:
            from cluster.mapexport import write_joblog

            write_joblog(str(joblog_path), mapstore.attempts(conn, outcome.run_id, job.range, chunks=True),
                         _command_of(job))
            print(f"joblog in {joblog_path}")
    finally:
        conn.close()
    if failed:
        raise Exit(code=EXIT_FAILED)


def _summary(conn, run_id: int, job, db_path: Path, export_path, joblog_path, already_done: bool = False) -> int:
    """The items' line and the first failed ones; returns how many failed."""
    from cluster import mapstore

    counts = mapstore.counts(conn, run_id)
    ok = counts.get("ok", 0)
    failed = sum(count for status, count in counts.items() if status != "ok")
    parts = [f"{ok:,} ok"] + [f"{count:,} {status}" for status, count in sorted(counts.items()) if status != "ok"]
    missing = job.total - ok - failed
    if missing > 0:
        parts.append(f"{missing:,} not run")
    files = (f", {job.returned_files} file{'' if job.returned_files == 1 else 's'} returned to {job.spec.outdir}"
             if job.returned_files else "")
    line = f"{job.total:,} item{'' if job.total == 1 else 's'}: {', '.join(parts)}{files}"
    print(f"run {run_id} already complete in {db_path}: nothing to run ({line})" if already_done
          else f"{line} (run {run_id}, {db_path})")
    if failed:
        for record in mapstore.failed_items(conn, run_id, FAILED_SHOWN, job.range):
            what = record.error.splitlines()[-1] if record.error else (
                f"exit {record.exitval}" if record.exitval is not None else f"signal {record.signal}")
            print(shown(f"  #{record.seq} {str(record.item)[:60]!r}: {record.status} on {record.host} "
                        f"(attempt {record.attempt}): {what[:160]}"))
        if failed > FAILED_SHOWN:
            print(f"  ... and {failed - FAILED_SHOWN:,} more")
    deaths = [] if already_done else mapstore.worker_deaths(conn, run_id, FAILED_SHOWN + 1)
    if deaths:  # here, not as log lines during the run (MapJob.retry_line)
        said = [f"#{seq} {'once' if count == 1 else f'{count} times'} ("
                + ("not finished" if not status else "then " + status) + ")"
                for seq, count, status in deaths[:FAILED_SHOWN]]
        more = ", ..." if len(deaths) > FAILED_SHOWN else ""
        print(f"  items that killed their worker: {', '.join(said)}{more}")
    if failed:
        hint = [] if export_path and str(export_path).endswith(".jsonl") else ["--export failed.jsonl"]
        if not joblog_path:
            hint.append("--joblog FILE")
        if hint:
            print(f"  every item and attempt: run the same command with {' or '.join(hint)}; "
                  "--retry-failed runs the failed ones again")
    return failed


def _command_of(job):
    """The joblog's Command of an attempt (seq, item, slot): the command as rendered for the item in
    the slot it ran in ({%}), or MODULE:FUNC ITEM."""
    from client import mapper

    if job.spec.mode == "function":
        prefix = f"{job.spec.function} "
        return lambda seq, item, slot: prefix + str(item)

    def rendered(seq, item, slot):
        try:
            return mapper.render(job.parts, item, seq, slot or 1)
        except (ValueError, TypeError):
            return job.spec.command

    return rendered


def remove_partial_files(outdir: Path) -> None:
    """Temporary files of returned files left by a coordinator that was killed."""
    from cluster.jobs.map import PARTIAL_MARK

    for folder, _, names in os.walk(outdir):
        for name in names:
            if name.startswith(".") and PARTIAL_MARK in name:
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass


def _clean_hosts(c, selected, run_hex: str, accept_new: bool) -> None:
    """Remove each host's run folder (WORKDIR/map/RUN): the run is over."""
    from cluster import mapship
    from cluster.fanout import fan_out
    from cluster.transport import connect

    def clean(host, outcome):
        with connect(host, c.config, accept_new=accept_new) as transport:
            mapship.remove_run_folder(transport, run_hex)

    try:
        for outcome in fan_out(selected, clean, 60.0):
            if not outcome.ok:
                log.info("%s: run folder not removed: %s", outcome.host.name, outcome.error)
    except Exception as err:  # cleaning up is a courtesy: never fail a finished run for it
        log.info("run folders not removed: %s", err)
