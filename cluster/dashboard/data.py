"""The dashboard's data: one JSON-ready snapshot of a store, read-only.

The figures are cluster/report.py's, computed from the same rows the same way as
``fab stats`` (tasks/stats.py): ``run_report(run, blocks, events, run_hosts,
calibrations, now, live)``, so the page shows the same names and the same values.
What is added here only arranges those rows for drawing: each host's rate over the
run's time (blocks' items spread over their compute spans), the blocks as bars on
slot lanes, the events, and per host its facts and state now.

Every string in the snapshot is data (host names, errors, titles, URLs) that the
page puts in with ``textContent`` only (README.md, "Dashboard"); strings are cut
to a bounded length here so that one hostile value cannot make the page heavy.
"""

from __future__ import annotations

import time
from typing import Optional

from cluster.jobs import hooks_of
from cluster.report import run_report, run_row

# Bounds on what one snapshot holds (the page stays light with 100 hosts and big runs).
MAX_RUNS = 200            # the latest runs listed
MAX_BARS = 4000           # the latest blocks drawn on the timeline
MAX_EVENTS = 200          # the latest events listed
MAX_PAGES = 40            # the latest pages of a scrape run listed
MAX_TEXT = 300            # characters of any one string (detail, title, URL, error)
SERIES_POINTS = 120       # points of each host's rate-over-time line
# Event kinds marked on the timeline.
MARK_KINDS = ("lost", "quarantine", "up", "failure", "invalid", "mismatch", "left-out", "overdue", "tail",
              "start", "resume", "interrupted", "failed", "done")
# Host facts shown per host (from its hello in the run, else the latest recorded facts).
FACT_KEYS = ("python", "implementation", "cores", "slots", "engine", "arch", "os", "memory", "load", "temp")


def cut(value, limit: int = MAX_TEXT):
    """A string bounded to ``limit`` characters (an ellipsis marks a cut); other values as they are."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit - 1] + "\u2026"
    return value


def clock(spans: list[list[float]]):
    """Epoch seconds -> seconds of run time, the run's sessions joined end to end (as fab stats' wall time)."""
    bases, offset = [], 0.0
    for start, end in spans:
        bases.append((start, end, offset))
        offset += end - start

    def at(t: float) -> float:
        chosen = bases[0]
        for item in bases:
            if t >= item[0]:
                chosen = item
        start, end, base = chosen
        return base + min(max(t - start, 0.0), end - start)

    return at


def rate_series(blocks: list[dict], names: list[str], at, wall: float, points: int = SERIES_POINTS,
                live: bool = False) -> dict:
    """Each host's rate (items/s) over run time: ``{'step': seconds, 'hosts': {name: [rate, ...]}}``.

    A block's items are spread evenly over its compute span [finished - seconds, finished]
    (its slot's time), so a 2 s block does not look like a spike when it lands.
    """
    if wall <= 0:
        return {"step": 0.0, "hosts": {name: [] for name in names}}
    count = max(2, min(points, int(wall * 4) + 1))  # a point per quarter second at least
    step = wall / count
    series: dict[str, list] = {name: [0.0] * count for name in names}
    for block in blocks:
        line = series.get(block["host"])
        if line is None or not block["items"]:
            continue
        x1 = at(block["finished"])
        x0 = min(x1, at(max(block["finished"] - max(block["seconds"], 0.0), block["started"])))
        if x1 - x0 < 1e-9:
            line[min(count - 1, int(x1 / step))] += block["items"] / step
            continue
        per_second = block["items"] / (x1 - x0)
        first, last = int(x0 / step), min(count - 1, int(x1 / step))
        for i in range(first, last + 1):
            overlap = min(x1, (i + 1) * step) - max(x0, i * step)
            if overlap > 0:
                line[i] += per_second * overlap / step
    if live:
        # Blocks in flight are not in the store yet: a host's last block-length of time would
        # read low. Its line stops where its committed blocks still tell the whole story.
        for name, line in series.items():
            mine = [b for b in blocks if b["host"] == name]
            if not mine:
                continue
            typical = sorted(b["seconds"] for b in mine)[len(mine) // 2]
            cutoff = at(max(b["finished"] for b in mine)) - typical
            for i in range(count):
                if (i + 1) * step > cutoff:
                    line[i] = None
    return {"step": step, "hosts": {name: [None if v is None else round(v, 6) for v in line]
                                    for name, line in series.items()}}


def lanes(blocks: list[dict], at, slots: int) -> list[list[float]]:
    """One host's blocks as [lane, x0, x1] bars on at most ``slots`` lanes (as the timeline plot packs them)."""
    bars: list[list[float]] = []
    ends: list[float] = []
    for block in sorted(blocks, key=lambda b: b["started"]):
        x0, x1 = at(block["started"]), at(block["finished"])
        free = [i for i, end in enumerate(ends) if x0 >= end - 1e-3]
        if free:
            lane = free[0]
        elif len(ends) < max(1, slots):
            ends.append(x1)
            lane = len(ends) - 1
        else:
            lane = min(range(len(ends)), key=ends.__getitem__)
        bars.append([lane, round(x0, 3), round(x1, 3)])
        ends[lane] = max(ends[lane], x1)
    return bars


def host_state(events: list[dict], name: str, live: bool) -> str:
    """What a host is now in the run, from its latest up/lost/quarantine/left-out event."""
    state, was_lost = "", False
    for event in events:
        if event.get("host") != name:
            continue
        kind = event["kind"]
        if kind in ("lost", "quarantine"):
            state, was_lost = ("lost" if kind == "lost" else "quarantined"), True
        elif kind == "up":
            state = "rejoined" if was_lost else "up"
        elif kind == "left-out":
            state = "left out"
        elif kind == "starting" and not state:
            state = "starting"
    if not live and state in ("up", "rejoined", "starting"):
        return "finished" if state != "starting" else "never started"
    return state or ("" if live else "finished")


def runs_list(store, now: float, cache: Optional[dict] = None) -> list[dict]:
    """The latest runs as the runs table of ``fab stats`` (cluster/report.py ``run_row``), newest last.

    ``cache``: rows of runs no longer running, by (id, state, blocks, events): such a row never
    changes, so a store with many big past runs is read once, not every second.
    """
    rows = []
    for run in store.runs()[-MAX_RUNS:]:
        events = store.events(run["id"])
        key = (run["id"], run["state"], run["blocks"], len(events))
        row = cache.get(key) if cache is not None and run["state"] != "running" else None
        if row is None:
            live = run["state"] == "running" and store.lock_holder(run["id"]) is not None
            row = run_row(run, events, store.blocks(run["id"]), now, live)
            row["progress"] = row["items"] / row["total"] if row["total"] else None
            if cache is not None and run["state"] != "running":
                cache[key] = row
        rows.append(row)
    return rows


def pick_run(runs: list[dict], wanted: Optional[int]) -> Optional[int]:
    """The run to show: ``wanted`` if it exists, else the latest live run, else the latest run."""
    ids = [r["id"] for r in runs]
    if wanted is not None and wanted in ids:
        return wanted
    live = [r["id"] for r in runs if r["live"]]
    if live:
        return live[-1]
    return ids[-1] if ids else None


def run_view(store, run_id: int, now: float) -> dict:
    """Everything the page draws for one run: ``report`` (exactly fab stats' JSON) plus the drawings' data."""
    run = store.run(run_id)
    blocks = store.blocks(run_id)
    events = store.events(run_id)
    run_hosts = store.run_hosts(run_id)
    live = run["state"] == "running" and store.lock_holder(run_id) is not None
    # The same call as tasks/stats.py's _report: the same figures, the same values.
    report = run_report(run, blocks, events, run_hosts, store.calibrations(run["job"]), now, live,
                        hooks_of(run["job"]).item_counts(store, run_id))
    spans = report["sessions"]
    at = clock(spans)
    wall = report["wall_seconds"]
    names = [h["host"] for h in report["hosts"]]
    recorded = {h["name"]: h for h in store.hosts()}
    in_run = {h["name"]: h for h in run_hosts}
    hosts = []
    for row in report["hosts"]:
        name = row["host"]
        facts = dict((recorded.get(name) or {}).get("facts") or {})
        facts.update((in_run.get(name) or {}).get("facts") or {})
        shown_facts = {key: facts.get(key) for key in FACT_KEYS if facts.get(key) is not None}
        if (in_run.get(name) or {}).get("slots"):
            shown_facts["slots"] = in_run[name]["slots"]
        if row["engine"]:
            shown_facts["engine"] = row["engine"]
        hosts.append({"host": name, "state": host_state(events, name, live),
                      "facts": {k: cut(v) if isinstance(v, str) else v for k, v in shown_facts.items()
                                if isinstance(v, (str, int, float, bool)) or
                                (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v[:3]))}})
    latest = sorted(blocks, key=lambda b: b["finished"])[-MAX_BARS:]
    by_host: dict[str, list[dict]] = {}
    for block in latest:
        by_host.setdefault(block["host"], []).append(block)
    slots = {h["host"]: h["slots"] for h in report["hosts"]}
    timeline = {name: lanes(by_host.get(name, []), at, slots.get(name) or 1) for name in names}
    marks = [{"x": round(at(e["time"]), 3), "host": e.get("host"), "kind": e["kind"]}
             for e in events if e["kind"] in MARK_KINDS][-MAX_EVENTS:]
    shown_events = [{"time": e["time"], "x": round(at(e["time"]), 3), "host": cut(e.get("host")),
                     "kind": cut(e["kind"], 40), "detail": cut(e.get("detail") or "")}
                    for e in events[-MAX_EVENTS:]]
    view = {
        "report": report,
        "hosts": hosts,
        "series": rate_series(blocks, names, at, wall, live=live),
        "timeline": {"bars": timeline, "marks": marks, "wall": wall, "shown_blocks": len(latest),
                     "blocks": len(blocks)},
        "events": shown_events,
        "pages": recent_pages(store, run_id, run["job"]),
    }
    _cut_report_strings(report)
    return view


def _cut_report_strings(report: dict) -> None:
    """Bound the free text of a report (notes, idle reasons) for the page; numbers are untouched."""
    report["notes"] = [cut(n) for n in report["notes"]][:50]
    for row in report["hosts"]:
        row["idle_reason"] = cut(row["idle_reason"])


def recent_pages(store, run_id: int, job: str) -> list[dict]:
    """The latest items of a run that has some to show (Job.recent_items; scrape: its pages:
    URL, status, title, error, no bodies), at most MAX_PAGES."""
    rows = hooks_of(job).recent_items(store, run_id, MAX_PAGES)
    return [{key: cut(value) for key, value in row.items()} for row in rows]


def snapshot(store, wanted: Optional[int] = None, now: Optional[float] = None,
             cache: Optional[dict] = None) -> dict:
    """The whole page's data: ``{'now', 'runs', 'run_id', 'run'}`` (``run`` None in an empty store)."""
    now = time.time() if now is None else now
    runs = runs_list(store, now, cache)
    chosen = pick_run(runs, wanted)
    return {"now": now, "runs": runs, "run_id": chosen,
            "run": run_view(store, chosen, now) if chosen is not None else None}
