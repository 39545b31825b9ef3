"""`fab scrape`: fetch a list of URLs over the cluster, politely, optionally through Tor."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from invoke import Exit
from tabulate import tabulate

from cluster.errors import UsageError
from cluster.shown import json_text, shown, shown_rows

from .common import EXIT_INTERRUPTED, HOST_HELP, beowulf_task, load_hosts, parse_float, parse_int, setup_logging
from .primes import store_path


@beowulf_task(help={
    **HOST_HELP,
    "urls": "file with one URL per line (# comments and blank lines skipped); - reads stdin",
    "tor": "send every request (robots.txt too) through each host's Tor SOCKS port; hosts without it are left out",
    "db": "results store (SQLite file; default results.db, or beowulf.db in fabric.yaml)",
    "delay": "at least this many seconds between request starts at one site, across all hosts (default 1)",
    "per_domain": "at most this many requests in flight at one site, across all hosts (default 1)",
    "concurrency": "requests in flight per slot of each host (default 4)",
    "timeout": "seconds for one whole fetch, connect to last byte (default 30)",
    "max_bytes": "keep at most this many bytes of a body; longer ones are cut and marked (default 5000000)",
    "user_agent": "User-Agent header (default names beowulf and its version)",
    "ignore_robots": "do not fetch or obey robots.txt (say so loudly; be sure you may)",
    "insecure": "do not verify TLS certificates",
    "no_bodies": "store status, size, sha256 and title but not the bodies",
    "fresh": "start the run over instead of resuming it",
    "skip_bad": "skip (and list) lines of the URL file that are not http(s) URLs instead of refusing to start",
    "export": "write the pages out: FILE.jsonl (one record a line) or a folder (index.jsonl + bodies/)",
})
def scrape(c, urls=None, tor=False, inventory=None, hosts=None, db=None, delay="1.0", per_domain="1",
           concurrency="4", timeout="30", max_bytes="5000000", user_agent=None, ignore_robots=False,
           insecure=False, no_bodies=False, fresh=False, skip_bad=False, export=None, accept_new=False,
           verbose=False, quiet=False):
    """Fetch every URL of a file once across all hosts, politely; resumable.

    Per site, across the whole cluster: at most --per-domain requests at once and --delay
    seconds between starts (robots.txt's Crawl-delay when longer). robots.txt is obeyed.
    With --tor every request leaves each host only through its Tor SOCKS port (fails closed).
    """
    from cluster.jobs.scrape import DEFAULT_USER_AGENT, FetchOptions, ScrapeJob
    from cluster.urls import describe_bad, read_url_file

    if not urls:
        raise UsageError("--urls FILE is required (one URL per line; - reads stdin)")
    options = FetchOptions(
        timeout=parse_float("timeout", timeout, above=0, maximum=3600),
        # A result travels as one protocol line (base64 of the compressed body), capped at 64 MB.
        max_bytes=parse_int("max-bytes", max_bytes, minimum=1, maximum=32_000_000),
        user_agent=user_agent or DEFAULT_USER_AGENT, robots=not ignore_robots, insecure=insecure,
        bodies=not no_bodies, tor=tor,
    )
    pause = parse_float("delay", delay, minimum=0, maximum=86400)
    in_flight = parse_int("per-domain", per_domain, minimum=1, maximum=1000)
    per_slot = parse_int("concurrency", concurrency, minimum=1, maximum=64)
    if user_agent is not None and (not user_agent.strip() or any(ord(ch) < 32 for ch in user_agent)):
        raise UsageError("--user-agent: must be printable text on one line")
    export_path = Path(os.path.expanduser(export)) if export else None
    url_list, bad, duplicates = read_url_file(urls, skip_bad=skip_bad)
    path, selected = load_hosts(c, inventory, hosts)
    db_path = store_path(c, db)
    setup_logging(verbose, quiet, db_path.parent / "beowulf.log")
    for line in describe_bad(bad, "stdin" if urls == "-" else urls):
        print(f"skipped: {shown(line)}")
    if duplicates:
        print(f"{duplicates} duplicate URLs fetched once")
    if ignore_robots:
        print("WARNING: --ignore-robots is on: robots.txt is neither fetched nor obeyed")
    if insecure:
        print("WARNING: --insecure is on: TLS certificates are not verified")
    job = ScrapeJob(url_list, options, delay=pause, per_domain=in_flight, concurrency=per_slot)
    outcome = _run(c, job, selected, db_path, fresh, accept_new, quiet)
    _print_summary(outcome, job, db_path)
    if export_path is not None:
        _export(db_path, outcome.run_id, export_path)


def _run(c, job, selected, db_path: Path, fresh: bool, accept_new: bool, quiet: bool):
    from cluster.coordinator import Coordinator
    from cluster.progress import Progress

    coordinator = Coordinator(job, selected, c.config, str(db_path), fresh=fresh, accept_new=accept_new)
    try:
        with Progress("pages", enabled=None if not quiet else False, label="scrape", per_minute=True) as progress:
            coordinator.progress = progress
            return coordinator.run()
    except KeyboardInterrupt:
        raise Exit("interrupted: fetched pages are kept; run the same command again to resume",
                   code=EXIT_INTERRUPTED) from None


def _print_summary(outcome, job, db_path: Path) -> None:
    from cluster.store import Store

    if outcome.already_done:
        print(f"run {outcome.run_id} already complete in {db_path}: nothing to fetch")
    else:
        busy = [h for h in outcome.hosts if h.blocks or h.state != "excluded"]
        total = sum(h.items for h in busy) or 1
        minutes = max(outcome.seconds, 1e-9) / 60
        rows = [[h.name, h.state, h.slots, h.items, h.found, h.items - h.found, f"{h.items / minutes:,.1f}",
                 f"{100 * h.items / total:.1f}%", h.retries, h.failures] for h in busy]
        rows = shown_rows(rows)
        print(tabulate(rows, headers=["host", "state", "workers", "pages", "ok", "errors", "pages/min", "share",
                                      "retries", "failures"]))
    for warning in outcome.warnings:
        print(f"warning: {shown(warning)}")
    statuses: dict = {}
    with Store(str(db_path)) as store:
        for record, _ in store.iter_pages(outcome.run_id):
            key = record["error_kind"] or (f"{record['status'] // 100}xx" if record["status"] else "?")
            statuses[key] = statuses.get(key, 0) + 1
    breakdown = ", ".join(f"{shown(key)} {count}" for key, count in sorted(statuses.items()))
    print(f"{sum(statuses.values())} of {job.total} URLs fetched ({breakdown}) (run {outcome.run_id}, {db_path})")


def _export(db_path: Path, run_id: int, target: Path) -> None:
    """FILE.jsonl: one record a line; a folder: index.jsonl plus each body once, named by its sha256."""
    from cluster.store import Store

    as_folder = not target.name.endswith(".jsonl")
    index = target / "index.jsonl" if as_folder else target
    if as_folder:
        (target / "bodies").mkdir(parents=True, exist_ok=True)
    elif not target.parent.exists():
        raise UsageError(f"--export: folder {target.parent} does not exist")
    temp = index.with_name(f".{index.name}.part")
    count = 0
    try:
        with Store(str(db_path)) as store, open(temp, "w", encoding="utf-8") as handle:
            for record, payload in store.iter_pages(run_id):
                record["tor"], record["truncated"] = bool(record["tor"]), bool(record["truncated"])
                if as_folder and payload is not None and record["sha256"]:
                    body = target / "bodies" / record["sha256"]
                    if not body.exists():
                        body.write_bytes(zlib.decompress(payload))
                    record["body"] = f"bodies/{record['sha256']}"
                handle.write(json_text(record) + "\n")  # safe to cat (cluster/shown.py)
                count += 1
        os.replace(temp, index)
    finally:
        if temp.exists():
            temp.unlink()
    print(f"exported {count} pages to {target}")
