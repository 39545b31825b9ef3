"""`fab stats` (what the runs did, per host, read-only) and `fab calibrate` (each host alone)."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from tabulate import tabulate, tabulate_formats

from cluster.errors import StoreError, UsageError
from cluster.jobs import hooks_of
from cluster.shown import shown, shown_cell, shown_rows

from .common import (
    HOST_HELP,
    beowulf_task,
    exit_code_over_hosts,
    load_hosts,
    parse_float,
    parse_int,
    setup_logging,
    store_path,
)

FORMATS = ("table", "json", "csv")
# calibrate --start: room above it for the benchmark's blocks (primes go up to 10**15).
MAX_START = 10**15 - 10**13
DB_HELP = "results store (SQLite file; default results.db, or beowulf.db in fabric.yaml)"


@beowulf_task(help={
    "db": DB_HELP + "; opened read-only",
    "run": "show this run (its id from the runs table) per host",
    "last": "show the most recent run, of any job",
    "format": "table (default), json, csv, or any tabulate format: github, grid, simple, ...",
    "plot": "also write PNG charts of the run into this folder (rates, sum of parts vs actual, timeline)",
})
def stats(c, db=None, run=None, last=False, format="table", plot=None):
    """Show what runs did: a table of runs, or one run per host (throughput, efficiency, tail, ETA).

    Without --run/--last: every run in the store. With one: per host its slots in that run,
    blocks, items, throughput, speed while busy, share, retries, failures, idle time (and why a
    host did nothing); the run's throughput against the sum of the hosts' standalone rates from a
    comparable fab calibrate, the tail, and the ETA of a run in progress (README.md, "Figures").
    Computed from the run's own records only. Never writes.
    """
    from cluster.store import Store

    if run is not None and last:
        raise UsageError("--run and --last cannot be used together")
    run_id = parse_int("run", run, minimum=1) if run is not None else None
    style = _check_format(format)
    setup_logging(quiet=True)  # warnings only, escaped like every log line; stats writes no log file
    if plot is not None and run_id is None and not last:
        raise UsageError("--plot draws one run: add --run N or --last")
    path = store_path(c, db)
    with Store.open_readonly(path) as store:
        runs = store.runs()
        if not runs:
            raise StoreError(f"{path}: no runs yet (fab primes ... records one)")
        if last:
            run_id = runs[-1]["id"]
        if run_id is None:
            _print_runs(store, runs, style, path)
            return
        if not any(r["id"] == run_id for r in runs):
            raise UsageError(f"--run: no run {run_id} in {path} (its runs are {_id_ranges(runs)})")
        report, blocks, events = _report(store, run_id)
        compare = _tor_counterpart(store, runs, report) if plot is not None else None
    _print_run(report, style, path)
    if plot is not None:
        from cluster.plots import write_plots

        written, messages = write_plots(report, blocks, events, Path(os.path.expanduser(plot)), compare)
        for message in messages:
            print(shown(message), file=sys.stderr)
        for png in written:
            print(f"wrote {png}", file=sys.stderr)


def _check_format(style: str) -> str:
    if style in FORMATS or style in tabulate_formats:
        return style
    raise UsageError(f"--format: expected table, json, csv or a tabulate format ({', '.join(tabulate_formats)}), "
                     f"not {style!r}")


def _id_ranges(runs: list[dict]) -> str:
    ids = [r["id"] for r in runs]
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else str(ids[0])


def run_report_of(store, run_id: int) -> dict:
    """The report of run ``run_id`` (cluster/report.py) from ``store``: fab stats and the end-of-run summary."""
    return _report(store, run_id)[0]


def _report(store, run_id: int) -> tuple[dict, list[dict], list[dict]]:
    from cluster.report import run_report

    run = store.run(run_id)
    blocks = store.blocks(run_id)
    events = store.events(run_id)
    live = run["state"] == "running" and store.lock_holder(run_id) is not None
    # Only the run's own records (what each host was in it, calibrations comparable to it):
    # a finished run's figures never change (cluster/figures.py).
    report = run_report(run, blocks, events, store.run_hosts(run_id), store.calibrations(run["job"]),
                        time.time(), live, hooks_of(run["job"]).item_counts(store, run_id))
    return report, blocks, events


def _tor_counterpart(store, runs: list[dict], report: dict):
    """The latest run of the same job with the other Tor setting and some data, as a report
    (scrape with and without --tor; a job without a Tor setting has none)."""
    run = report["run"]
    tor = bool((run["params"] or {}).get("tor"))
    others = [r for r in runs if r["job"] == run["job"] and r["id"] != run["id"] and r["state"] != "replaced"
              and r["items"] > 0 and bool((r["params"] or {}).get("tor")) != tor]
    if not others:
        return None
    return _report(store, others[-1]["id"])[0]


# ---------------------------------------------------------------- printing


def _when(epoch, now: float | None = None) -> str:
    if epoch is None:
        return ""
    now = now or time.time()
    moment = time.localtime(epoch)
    if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


def _print_runs(store, runs: list[dict], style: str, path: Path) -> None:
    from cluster.report import SCHEMA, human_params, human_seconds, run_row

    now = time.time()
    rows = []
    for run in runs:
        live = run["state"] == "running" and store.lock_holder(run["id"]) is not None
        rows.append(run_row(run, store.events(run["id"]), store.blocks(run["id"]), now, live))
    if style == "json":
        # ensure_ascii (json's default): every non-ASCII character, C1 and bidi controls included,
        # is a \uXXXX escape, so the output holds no control byte and decodes to what was stored.
        print(json.dumps({"schema": SCHEMA, "kind": "runs", "db": str(path), "runs": rows}, indent=2))
        return
    if style == "csv":
        fields = ["id", "job", "params", "state", "started", "finished", "wall_seconds", "blocks", "items",
                  "total", "throughput"]
        writer = csv.writer(sys.stdout)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([json.dumps(row["params"], sort_keys=True) if f == "params" else shown_cell(row[f])
                             for f in fields])
        return
    table = []
    for row in rows:
        done = f"{row['items']:,}"
        if row["items"] < row["total"] and row["state"] != "replaced":
            done += f" of {row['total']:,}"
        state = _state(row) + (" (no coordinator)" if row["state"] == "running" and not row["live"] else "")
        rate = row["throughput"]
        table.append([row["id"], row["job"], human_params(row["params"]), state, _when(row["started"], now),
                      human_seconds(row["wall_seconds"]), done,
                      "" if rate is None else f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"])
    headers = ["run", "job", "parameters", "state", "started", "wall time", "items", "throughput items/s"]
    print(tabulate(shown_rows(table), headers=headers, tablefmt="simple" if style == "table" else style,
                   disable_numparse=True))


def _print_run(report: dict, style: str, path: Path) -> None:
    if style == "json":
        print(json.dumps(dict(report, db=str(path)), indent=2))  # ASCII only, as in _print_runs
    elif style == "csv":
        _run_csv(report)
    else:
        _run_table(report, "simple" if style == "table" else style)


def _run_csv(report: dict) -> None:
    """One row per host, then a "(run)" row with the run's figures (throughput, sum of parts, efficiency...).

    Rates are items per second, named as in cluster/figures.py."""
    fields = ["run_id", "host", "slots", "engine", "blocks", "items", "busy_seconds", "wall_seconds",
              "throughput", "speed_busy", "speed_busy_per_slot", "share", "standalone_items_per_second",
              "retries", "failures", "idle_seconds", "idle_reason", "last_seen", "startup_seconds",
              "politeness_bound", "efficiency", "tail_seconds", "eta_seconds", "state"]
    writer = _ShownWriter(sys.stdout)
    writer.writerow(fields)
    run_id = report["run"]["id"]
    for h in report["hosts"]:
        writer.writerow([run_id, h["host"], h["slots"], h["engine"] or "", h["blocks"], h["items"],
                         h["busy_seconds"], h["wall_seconds"], _blank(h["throughput"]), _blank(h["speed_busy"]),
                         _blank(h["speed_busy_per_slot"]), h["share"], _blank(h["standalone_rate"]), h["retries"],
                         h["failures"], h["idle_seconds"], h["idle_reason"] or "", _blank(h["last_seen"]),
                         "", "", "", "", "", ""])
    tail = report["tail"]
    writer.writerow([run_id, "(run)", sum(h["slots"] for h in report["hosts"]), "", report["blocks"],
                     report["items"], sum(h["busy_seconds"] for h in report["hosts"]), report["wall_seconds"],
                     _blank(report["throughput"]), "", "", 1.0 if report["items"] else 0.0,
                     _blank(report["sum_standalone"]), sum(h["retries"] for h in report["hosts"]),
                     sum(h["failures"] for h in report["hosts"]), "", "", "", report["startup_seconds"],
                     _blank(report["politeness_bound"]), _blank(report["efficiency"]),
                     _blank(tail["seconds"] if tail else None), _blank(report["eta_seconds"]),
                     _state(report["run"])])


def _state(run: dict) -> str:
    """A run's state as shown: a replaced run is superseded (by the run --fresh started)."""
    if run["state"] == "replaced":
        return f"superseded by run {run['superseded_by']}" if run.get("superseded_by") else "superseded"
    return run["state"]


class _ShownWriter:
    """A csv.writer whose string cells are escaped (CSV has no escapes of its own for control bytes)."""

    def __init__(self, stream):
        self.writer = csv.writer(stream)

    def writerow(self, row) -> None:
        self.writer.writerow([shown_cell(value) for value in row])


def _blank(value):
    return "" if value is None else value


def _run_table(report: dict, style: str) -> None:
    from cluster import figures
    from cluster.report import human_rate, human_seconds, params_lines

    run, unit = report["run"], report["unit"]
    sessions = len(report["sessions"])
    params = params_lines(run["params"] or {}, width=90) or [""]  # every parameter, wrapped between pairs
    print(shown(f"run {run['id']}: {run['job']} {params[0]}"))
    for line in params[1:]:
        print(shown(f"  {line}"))
    print(f"{shown(_state(run))}, started {_when(run['started'])}, wall time {human_seconds(report['wall_seconds'])}"
          f" in {sessions} session{'s' if sessions != 1 else ''}")
    now = time.time()
    rows = []
    for h in report["hosts"]:
        rows.append([h["host"], h["slots"], h["engine"] or "", h["blocks"], f"{h['items']:,}",
                     human_rate(h["throughput"], unit), human_rate(h["speed_busy"], unit),
                     human_rate(h["speed_busy_per_slot"], unit), f"{h['share']:.1%}",
                     human_rate(h["standalone_rate"], unit), h["retries"], h["failures"],
                     human_seconds(h["idle_seconds"]), _when(h["last_seen"], now), h["idle_reason"] or ""])
    headers = ["host", hooks_of(run["job"]).slots_label(), "engine", "blocks", unit["item"],
               figures.label(figures.THROUGHPUT, unit),
               figures.label(figures.SPEED_BUSY, unit), "per slot", "share", f"alone {unit['label']}", "retries",
               "failures", "idle", "last seen", "did nothing"]
    if not any(h["engine"] for h in report["hosts"]):
        headers.pop(2)
        rows = [row[:2] + row[3:] for row in rows]
    if not any(h["idle_reason"] for h in report["hosts"]):
        headers.pop()
        rows = [row[:-1] for row in rows]
    print()
    print(tabulate(shown_rows(rows), headers=headers, tablefmt=style, disable_numparse=True) if rows
          else "no host did any work")
    print()
    for line in _summary_lines(report, human_rate, human_seconds):
        print(shown(line))


def _summary_lines(report: dict, human_rate, human_seconds) -> list[str]:
    from cluster import figures

    unit, label = report["unit"], report["unit"]["label"]
    lines = [f"{figures.THROUGHPUT}: {report['items']:,} {unit['item']} in {human_seconds(report['wall_seconds'])}"
             f" = {human_rate(report['throughput'], unit) or '?'} {label}"]
    if report["sum_standalone"] is not None:
        lines.append(f"sum of parts: {human_rate(report['sum_standalone'], unit)} {label}"
                     " (each host alone, comparable fab calibrate)")
    if report["politeness_bound"] is not None:
        lines.append(f"politeness bound: {human_rate(report['politeness_bound'], unit)} {label}"
                     " (per site one request per delay: --delay or its robots Crawl-delay, the longer)")
    if report["efficiency"] is not None:
        lines.append(f"efficiency: {report['efficiency']:.1%} ({figures.THROUGHPUT} / {report['efficiency_against']})")
    else:
        lines.append("efficiency: none (no comparable calibration)")
    if report["startup_seconds"] > 0:
        lines.append(f"start-up: {human_seconds(report['startup_seconds'])} (from the start to the first block: "
                     "connecting, starting agents)")
    tail = report["tail"]
    if tail:
        how = "" if tail["source"] == "event" else ", approximated from the latest block start"
        what = "in the tail for" if tail["ongoing"] else "tail:"
        lines.append(f"{what} {human_seconds(tail['seconds'])} (from the last block handed out to the end{how})")
    if report["run"]["state"] == "running" and report["progress"] is not None:
        eta = report["eta_seconds"]
        lines.append(f"progress: {report['progress']:.1%}" + (f", ETA {human_seconds(eta)}" if eta is not None
                                                              else ""))
    lines += [f"note: {note}" for note in report["notes"]]
    return lines


# ---------------------------------------------------------------- calibrate


@beowulf_task(help={
    **HOST_HELP,
    "db": DB_HELP,
    "job": "what to measure: primes (default) or scrape",
    "run": "measure each host on the job and mode of this run (its range; a scrape run's URLs): its efficiency",
    "mode": "primes: count (default) or list (the primes come back, as in a run without --count-only)",
    "urls": "scrape: file with one URL a line to fetch (required with --job scrape; each host fetches them)",
    "seconds": "how long to measure each host (default 5)",
    "tor": "scrape: fetch through each host's Tor SOCKS port (stored as the 'tor' variant)",
    "start": "primes: count primes from this number up (default 1e11); pick the region your runs cover",
})
def calibrate(c, inventory=None, hosts=None, db=None, job=None, run=None, mode=None, urls=None, seconds="5",
              tor=False, start=None, accept_new=False, verbose=False, quiet=False):
    """Measure each host's standalone rate, one host at a time, for fab stats' sum of parts.

    Each host runs a short benchmark alone with all its slots busy (primes: count or list
    mode from 1e11 or --start; scrape: fetching --urls); its rate is stored in the results
    store and shown. A run's efficiency only uses a calibration of its job, mode and range
    (README.md, "Figures"): --run N measures exactly that. Exit status 3 when some hosts
    could not be measured, 1 when none could.
    """
    from invoke import Exit

    if run is not None and (job is not None or mode is not None or start is not None or tor):
        raise UsageError("--run takes the job, mode, range and Tor setting from the run: "
                         "leave out --job, --mode, --start and --tor")
    from cluster.jobs import names

    run_id = parse_int("run", run, minimum=1) if run is not None else None
    job = job or "primes"
    measured = [name for name in names() if hooks_of(name).calibrated]
    if job not in measured:
        raise UsageError(f"--job: expected {' or '.join(measured)}, not {shown(repr(job))}")
    duration = parse_float("seconds", seconds, above=0, maximum=3600)
    first = None if start is None else parse_int("start", start, minimum=0, maximum=MAX_START)
    db_path = store_path(c, db)
    if run_id is not None:
        bench, tor = _bench_of_run(db_path, run_id, urls)
    else:  # each job checks the flags that are its own (Job.bench)
        bench = hooks_of(job).bench(urls=urls, tor=tor, start=first, mode=mode)
    path, selected = load_hosts(c, inventory, hosts)
    setup_logging(verbose, quiet, db_path.parent / "beowulf.log")
    results = _calibrate_all(c, selected, bench, duration, accept_new, db_path, tor, quiet, run_id)
    _print_calibration(results, bench, tor)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"warning: {shown(r.error)}", file=sys.stderr)
    if failed:
        raise Exit(f"{len(failed)} of {len(results)} hosts could not be measured",
                   code=exit_code_over_hosts(len(failed), len(results)))


def _bench_of_run(db_path: Path, run_id: int, urls):
    """The benchmark of run ``run_id`` (Job.bench_of_run: its job, mode and range, or URLs); (bench, tor)."""
    from cluster.jobs import names
    from cluster.store import Store

    with Store.open_readonly(db_path) as store:
        run = store.run(run_id)
        if run is None:
            raise UsageError(f"--run: no run {run_id} in {db_path}")
        got = hooks_of(run["job"]).bench_of_run(run, store, urls=urls)
    if got is None:
        measured = " and ".join(name for name in names() if hooks_of(name).calibrated)
        raise UsageError(f"--run: run {run_id} is a {shown(run['job'])} run: only {measured} are measured")
    return got


def _calibrate_all(c, selected, bench, duration, accept_new, db_path, tor, quiet, run_id=None):
    from cluster.calibrate import calibrate_host
    from cluster.store import Store

    results = []
    with Store(db_path) as store:
        for host in selected:
            if not quiet:
                print(f"{host.name}: measuring {bench.name} for {duration:g}s ...", file=sys.stderr)
            if tor:
                bench.proxy = host.socks
            result = calibrate_host(host, c.config, bench, duration, accept_new=accept_new)
            if result.hello:
                store.upsert_host(host.name, result.hello)
            if not result.error:
                ranged = bench.records_range  # the items measured matter (primes: the numbers)
                store.set_calibration(host.name, bench.name, result.rate, variant="tor" if tor else "",
                                      mode=bench.mode, lo=result.lo if ranged else None,
                                      hi=result.hi if ranged else None, run_id=run_id, slots=result.slots or None)
            results.append(result)
    return results


def _print_calibration(results, bench, tor: bool) -> None:
    from cluster.report import human_rate, unit_of

    unit = unit_of(bench.name)
    label = unit["label"]
    rows = []
    for r in results:
        per_slot = r.rate / r.slots if r.rate and r.slots else None
        rows.append([r.host, r.slots or "", r.engine, r.tasks, f"{r.items:,}", f"{r.seconds:.2f}",
                     human_rate(r.rate, unit), human_rate(per_slot, unit), "stored" if not r.error else "failed"])
    headers = ["host", "slots", "engine", "tasks", unit["item"], "seconds", f"alone {label}", f"{label}/slot",
               "result"]
    print(tabulate(shown_rows(rows), headers=headers, disable_numparse=True))
    good = [r.rate for r in results if not r.error]
    if good:
        variant = " through Tor" if tor else ""
        hosts = f"{len(good)} host" + ("s" if len(good) != 1 else "")
        print(f"sum of parts{variant}: {human_rate(sum(good), unit)} {label} ({hosts}, each alone)")
        if bench.records_range:
            los = [r.lo for r in results if not r.error and r.lo is not None]
            his = [r.hi for r in results if not r.error and r.hi is not None]
            if los and his:
                print(f"measured: {bench.mode} mode over [{min(los):,}, {max(his):,}]; it counts for {bench.name} runs"
                      " in that mode near that range (README.md, Figures)")
