"""`fab scrape`: fetch a list of URLs over the cluster, politely, optionally through Tor."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

from cluster.engines import ENGINE_HELP
from cluster.errors import UsageError
from cluster.shown import shown
from cluster.tally import tallied

from .common import (
    HOST_HELP,
    beowulf_config,
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

# Distinct page errors listed under the summary (each once, with its count).
SUMMARY_ERRORS = 10
MAX_ERROR_SHOWN = 300  # characters of one error (a host sends it)


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
    "user_agent": "User-Agent header (default: beowulf.user_agent in fabric.yaml, else beowulf/VERSION, "
                  "plus (+URL) when beowulf.contact is set)",
    "allow_private_redirects": "follow redirects from a public address to a loopback, private, link-local or "
                               "multicast one (refused by default)",
    "ignore_robots": "do not fetch or obey robots.txt (say so loudly; be sure you may)",
    "insecure": "do not verify TLS certificates",
    "no_bodies": "store status, size, sha256 and title but not the bodies",
    "fresh": "start the run over instead of resuming it",
    "skip_bad": "skip (and list) lines of the URL file that are not http(s) URLs instead of refusing to start",
    "export": "write the pages out: FILE.jsonl (one record a line) or a folder (index.jsonl + bodies/)",
    "dashboard": "serve fab dashboard's live page of this run while it goes (its URL is printed)",
    **ENGINE_HELP,
})
def scrape(c, urls=None, tor=False, inventory=None, hosts=None, db=None, delay="1.0", per_domain="1",
           concurrency="4", timeout="30", max_bytes="5000000", user_agent=None, ignore_robots=False,
           insecure=False, no_bodies=False, fresh=False, skip_bad=False, export=None, accept_new=False,
           allow_private_redirects=False, verbose=False, quiet=False, dashboard=False, engine=None,
           scheduler=None):
    """Fetch every URL of a file once across all hosts, politely; resumable.

    Per site, across the whole cluster: at most --per-domain requests at once and --delay
    seconds between starts (robots.txt's Crawl-delay when longer). robots.txt is obeyed.
    With --tor every request leaves each host only through its Tor SOCKS port (fails closed).
    A redirect from a public address to a private one is refused (--allow-private-redirects).
    """
    from cluster.jobs.scrape import FetchOptions, ScrapeJob
    from cluster.urls import describe_bad, read_url_file

    if not urls:
        raise UsageError("--urls FILE is required (one URL per line; - reads stdin)")
    options = FetchOptions(
        timeout=parse_float("timeout", timeout, above=0, maximum=3600),
        # A result travels as one protocol line (base64 of the compressed body), capped at 64 MB.
        max_bytes=parse_int("max-bytes", max_bytes, minimum=1, maximum=32_000_000),
        user_agent=_user_agent(c, user_agent), robots=not ignore_robots, insecure=insecure,
        bodies=not no_bodies, tor=tor, allow_private_redirects=bool(allow_private_redirects),
        private_networks=_private_networks(c),
    )
    pause = parse_float("delay", delay, minimum=0, maximum=86400)
    in_flight = parse_int("per-domain", per_domain, minimum=1, maximum=1000)
    per_slot = parse_int("concurrency", concurrency, minimum=1, maximum=64)
    export_path = Path(os.path.expanduser(export)) if export else None
    url_list, bad, duplicates = read_url_file(urls, skip_bad=skip_bad)
    choice = engine_choice(c, engine, scheduler, inventory, hosts, tor=tor)
    if not choice.is_dask:
        load_hosts(c, inventory, hosts)  # a bad inventory is a usage error before anything else
    db_path = store_path(c, db)
    setup_logging(verbose, quiet, db_path.parent / "beowulf.log")
    for line in describe_bad(bad, "stdin" if urls == "-" else urls):
        print(f"skipped: {shown(line)}")
    if duplicates:
        print(f"{duplicates} duplicate URL{'s' if duplicates != 1 else ''} fetched once")
    if ignore_robots:
        print("WARNING: --ignore-robots is on: robots.txt is neither fetched nor obeyed")
    if insecure:
        print("WARNING: --insecure is on: TLS certificates are not verified")
    job = ScrapeJob(url_list, options, delay=pause, per_domain=in_flight, concurrency=per_slot)
    with engine_hosts(c, choice, inventory, hosts) as chosen:
        outcome = run_job(c, job, chosen.hosts, db_path, fresh=fresh, accept_new=accept_new, quiet=quiet,
                          dashboard=dashboard, kept="fetched pages", on_coordinator=chosen.attach,
                          **chosen.kwargs)
    _print_summary(outcome, job, db_path)
    if export_path is not None:
        _export(db_path, outcome.run_id, export_path)


def _header_text(value, where: str, spaces: bool = True) -> str:
    """``value`` if it is printable ASCII on one line (it goes into an HTTP header), else UsageError."""
    text = str(value)
    if not text.strip() or len(text) > 1000 or any(not 32 <= ord(ch) < 127 for ch in text) or (
            not spaces and " " in text):
        raise UsageError(f"{where}: must be printable ASCII on one line{'' if spaces else ' without spaces'} "
                         "(at most 1000 characters)")
    return text.strip()


def _user_agent(c, flag) -> str:
    """--user-agent, else beowulf.user_agent, else beowulf/VERSION (+beowulf.contact when set)."""
    from cluster.jobs.scrape import default_user_agent

    if flag is not None:
        return _header_text(flag, "--user-agent")
    config = beowulf_config(c)
    if config.get("user_agent") is not None:
        return _header_text(config["user_agent"], "beowulf.user_agent in fabric.yaml")
    contact = config.get("contact")
    if contact is not None:
        contact = _header_text(contact, "beowulf.contact in fabric.yaml", spaces=False)
    return default_user_agent(contact)


def _private_networks(c) -> tuple:
    """beowulf.private_networks (a list of address ranges), else the default ranges."""
    from cluster.jobs.scrape import PRIVATE_NETWORKS

    value = beowulf_config(c).get("private_networks")
    if value is None:
        return PRIVATE_NETWORKS
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UsageError("beowulf.private_networks in fabric.yaml: must be a list of address ranges")
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise UsageError("beowulf.private_networks in fabric.yaml: not an address range: "
                             f"{ascii(str(item))[:100]}") from None
    return tuple(networks)


def _print_summary(outcome, job, db_path: Path) -> None:
    from cluster.jobs.scrape import iter_pages as _iter_pages
    from cluster.store import Store

    if outcome.already_done:
        print(f"run {outcome.run_id} already complete in {db_path}: nothing to fetch")
    else:
        _record_politeness(db_path, outcome.run_id, job)
        print_run_summary(outcome, db_path, job.name)
    print_warnings(outcome)
    statuses: dict = {}
    errors = []
    with Store(str(db_path)) as store:
        for record, _ in _iter_pages(store, outcome.run_id):
            key = record["error_kind"] or (f"{record['status'] // 100}xx" if record["status"] else "?")
            statuses[key] = statuses.get(key, 0) + 1
            if record["error"]:
                errors.append(record["error"][:MAX_ERROR_SHOWN])
    breakdown = ", ".join(f"{shown(key)} {count}" for key, count in sorted(statuses.items()))
    print(f"{sum(statuses.values())} of {job.total} URLs fetched ({breakdown}) (run {outcome.run_id}, {db_path})")
    for line in tallied(errors, limit=SUMMARY_ERRORS):  # each distinct error once, with its count
        print(f"  error: {shown(line)}")


def _record_politeness(db_path: Path, run_id: int, job) -> None:
    """Store each site's delay this session (--delay or its robots Crawl-delay, the larger) with the
    run: fab stats' politeness bound (README.md, "Figures")."""
    from cluster.errors import BeowulfError
    from cluster.store import Store

    schedule = getattr(job, "schedule", None)
    if schedule is None or not schedule.origins:
        return
    delays = sorted(max(float(job.delay), float(site.crawl_delay or 0.0)) for site in schedule.origins.values())
    try:
        with Store(str(db_path)) as store:
            store.add_event(run_id, None, "politeness", json.dumps({"delays": delays}))
    except BeowulfError as err:
        print(f"warning: cannot record the politeness bound: {shown(str(err))}", file=sys.stderr)


def _export(db_path: Path, run_id: int, target: Path) -> None:
    """--export: the scrape job's export (cluster/jobs/scrape_export.py) of run ``run_id``."""
    from cluster.jobs.scrape_export import export_pages
    from cluster.store import Store

    def warn(message: str) -> None:
        print(f"warning: --export: {shown(message)}", file=sys.stderr)

    with Store(str(db_path)) as store:
        count, damaged = export_pages(store, run_id, target, warn)
    print(f"exported {count} pages to {target}" + (f" ({damaged} damaged bodies left out)" if damaged else ""))
