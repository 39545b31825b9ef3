"""The numbers behind ``fab stats``: pure functions over rows read from the store.

Nothing here touches the store or the clock: the caller passes the rows (as
``Store.runs()``, ``blocks()``, ``events()``, ``hosts()``, ``calibrations()``
return them), ``now`` and whether a coordinator is working on the run, so every
figure can be checked against a hand-built store.

Definitions (the README's "fab stats" section says the same in prose):

- **wall time**: a run can have several sessions (it was interrupted and resumed).
  A session runs from a ``start``/``resume`` event to the next ``done``,
  ``interrupted`` or ``failed`` event; the run's wall time is their sum, not
  finished - started. A session with no end (the coordinator was killed) ends at
  its last recorded activity, or at ``now`` while a coordinator holds the run.
- **busy**: the sum of a host's block compute times (``seconds``); its slots run
  in parallel, so it was working for busy / slots of its wall time.
- **throughput**, **speed while busy** (per host and per slot), **sum of parts**,
  **efficiency**, **politeness bound**: defined once in cluster/figures.py.
- **idle**: the host's wall time - busy / slots, never below 0.
- a host that did nothing is listed with 0 and why (still starting, left out, lost,
  joined after the work was done).
- **tail**: from the last block handed out (the coordinator's ``tail`` event; the
  latest block start when there is none) to the end of the run's last session.
- **start-up**: per session, from its start to the first block's start
  (connecting to hosts, starting agents): time no host computes.
- **ETA** (a run in progress): items left / the rate of the current session.
"""

from __future__ import annotations

import json
import math
import re
from typing import Optional

from . import figures
from .jobs import hooks_of

SCHEMA = 2
# Event kinds that open and close a session of a run (written by the store).
SESSION_OPEN = ("start", "resume")
SESSION_CLOSE = ("done", "interrupted", "failed")
# Event kinds (from the coordinator) that count against a host.
RETRY_KINDS = ("lost", "quarantine")
FAILURE_KINDS = ("failure", "invalid")
_BLOCKS_BACK = re.compile(r"(\d+) blocks? back")


def unit_of(job: str) -> dict:
    """How a job's rates read: {'item', 'scale' (seconds per unit), 'per', 'label'}."""
    item, scale, per = hooks_of(job).rate_unit  # how each job's items are named and displayed
    return {"item": item, "scale": scale, "per": per, "label": f"{item}/{per}"}


# ---------------------------------------------------------------- sessions


def sessions(run: dict, events: list[dict], blocks: list[dict], now: float,
             live: bool) -> list[list[float]]:
    """The run's sessions as [start, end] pairs in time order (see the module doc).

    ``live``: a coordinator holds the run now, so an open session lasts until ``now``.
    """
    activity = sorted([b["finished"] for b in blocks] + [e["time"] for e in events])
    marks = sorted((e for e in events if e["kind"] in SESSION_OPEN + SESSION_CLOSE),
                   key=lambda e: (e["time"], e.get("id") or 0))
    result: list[list[float]] = []
    opened: Optional[float] = None
    for event in marks:
        if event["kind"] in SESSION_OPEN:
            if opened is not None:  # the previous session never closed: a crash
                result.append([opened, _last_activity(activity, opened, event["time"])])
            opened = event["time"]
        elif opened is not None:
            result.append([opened, event["time"]])
            opened = None
    if opened is not None:
        end = now if live else _last_activity(activity, opened, math.inf)
        result.append([opened, max(end, opened)])
    if not result:  # no events at all (an old or hand-made store): the run's own times
        end = run.get("finished") or (now if live else (activity[-1] if activity else run["started"]))
        result.append([run["started"], max(end, run["started"])])
    return result


def _last_activity(times: list[float], after: float, before: float) -> float:
    inside = [t for t in times if after <= t < before]
    return inside[-1] if inside else after


def wall_seconds(spans: list[list[float]]) -> float:
    """Sum of the sessions' durations."""
    return sum(end - start for start, end in spans)


# ---------------------------------------------------------------- the list of runs


def run_row(run: dict, events: list[dict], blocks: list[dict], now: float, live: bool) -> dict:
    """One line of the runs table: the run's fields plus wall time, items done and rate."""
    wall = wall_seconds(sessions(run, events, blocks, now, live))
    items = run["items"] if "items" in run else sum(b["items"] for b in blocks)
    return {
        "id": run["id"], "job": run["job"], "params": run["params"], "state": run["state"],
        "started": run["started"], "finished": run.get("finished"), "total": run["total"],
        "blocks": run["blocks"] if "blocks" in run else len(blocks), "items": items,
        "wall_seconds": wall, "throughput": figures.throughput(items, wall),
        "superseded_by": run.get("superseded_by"), "unit": unit_of(run["job"]), "live": live,
    }


# ---------------------------------------------------------------- one run


def run_report(run: dict, blocks: list[dict], events: list[dict], hosts: list[dict],
               calibrations: list[dict], now: float, live: bool, item_counts: Optional[dict] = None) -> dict:
    """Every figure ``fab stats --run N`` shows, as plain data (this is also the JSON).

    ``hosts``: what each host was in this run (``Store.run_hosts``); ``calibrations``: every
    stored calibration of the job (only comparable ones count, cluster/figures.py).
    Everything comes from the run's own records, so a finished run's report never changes.
    ``item_counts``: the job's ``item_counts`` (added to the hosts' retries and failures).
    """
    spans = sessions(run, events, blocks, now, live)
    wall = wall_seconds(spans)
    items = sum(b["items"] for b in blocks)
    notes: list[str] = []
    unit = unit_of(run["job"])
    variant = "tor" if (run.get("params") or {}).get("tor") else ""
    ended = spans[-1][1] if spans else run["started"]
    chosen = figures.comparable_rates(run, calibrations, ended)
    facts = {h["name"]: h for h in hosts}
    names = sorted({b["host"] for b in blocks} | {e["host"] for e in events if e.get("host")} | set(facts))
    last_block = max((b["finished"] for b in blocks), default=None)
    rows = [_host_row(name, blocks, events, facts.get(name), chosen.get(name), items, spans, last_block, notes)
            for name in names]
    for row in rows:
        extra = (item_counts or {}).get(row["host"]) or {}
        row["retries"] += int(extra.get("retries") or 0)
        row["failures"] += int(extra.get("failures") or 0)
    worked = [r for r in rows if r["items"] > 0]
    missing = [r["host"] for r in worked if r["standalone_rate"] is None]
    what = run["job"] + (" through Tor" if variant else "")
    what += hooks_of(run["job"]).describe_run(run)
    politeness = _politeness(run, events)
    instead = "the efficiency is against the politeness bound" if politeness is not None else "no efficiency"
    if worked and len(missing) == len(worked):
        notes.append(f"no comparable calibration ({what}): no sum of parts, {instead}"
                     f" (fab calibrate --run {run['id']} measures one)")
    elif missing:
        notes.append(f"no comparable calibration for {', '.join(missing)} ({what}): no sum of parts, {instead}"
                     f" (fab calibrate --run {run['id']} measures them)")
    total_standalone = sum(r["standalone_rate"] for r in worked) if worked and not missing else None
    rate = figures.throughput(items, wall)
    startup = _startup(spans, blocks)
    tail = _tail(spans, blocks, events, run, live, now, notes)
    eta = _eta(run, spans, blocks, items, live, now, notes)
    redone = sum(1 for b in blocks if b.get("attempts", 1) > 1)
    if redone:
        notes.append(f"{_plural(redone, 'block')} sent more than once (retries or endgame copies)")
    mismatches = sum(1 for e in events if e["kind"] == "mismatch")
    if mismatches:
        notes.append(f"{_plural(mismatches, 'block')} disagreed when re-run by --verify")
    ceiling = total_standalone
    if politeness is not None:
        ceiling = politeness if ceiling is None else min(ceiling, politeness)
    return {
        "schema": SCHEMA,
        "kind": "run",
        "run": {k: run.get(k) for k in ("id", "job", "params", "state", "started", "finished", "total",
                                        "superseded_by")},
        "unit": unit,
        "live": live,
        "sessions": spans,
        "wall_seconds": wall,
        "blocks": len(blocks),
        "items": items,
        "found": sum(b.get("found", 0) for b in blocks),
        "progress": items / run["total"] if run.get("total") else None,
        "throughput": rate,
        "hosts": rows,
        "sum_standalone": total_standalone,
        "politeness_bound": politeness,
        "efficiency": rate / ceiling if rate and ceiling else None,
        "efficiency_against": (None if not (rate and ceiling) else
                               "politeness bound" if ceiling == politeness else "sum of parts"),
        "startup": startup,
        "startup_seconds": sum(end - start for start, end in startup),
        "tail": tail,
        "eta_seconds": eta,
        "redone_blocks": redone,
        "notes": notes,
    }


def middle_of(run: dict) -> str:
    lo, hi = figures.run_range(run)
    return "?" if lo is None else f"{(lo + hi) / 2:.0e}".replace("e+0", "e").replace("e+", "e")


def _politeness(run: dict, events: list[dict]) -> Optional[float]:
    """A scrape run's politeness bound (pages/s) from its 'politeness' events (tasks/scrape.py
    writes one a session: each site's delay), the one naming the most sites; None without one."""
    found = []
    for event in events:
        if event["kind"] != "politeness":
            continue
        try:
            delays = [float(d) for d in json.loads(event["detail"])["delays"]]
        except (ValueError, KeyError, TypeError):
            continue
        found.append(delays)
    if not found:
        return None
    return figures.politeness_bound(max(found, key=len))


def _host_row(name: str, blocks: list[dict], events: list[dict], host: Optional[dict],
              calibration: Optional[dict], run_items: int, spans: list[list[float]],
              last_block: Optional[float], notes: list[str]) -> dict:
    mine = [b for b in blocks if b["host"] == name]
    happened = [e for e in events if e.get("host") == name]
    host_facts = (host or {}).get("facts") or {}
    slots = (host or {}).get("slots") or host_facts.get("slots") or host_facts.get("cores")
    items = sum(b["items"] for b in mine)
    if not slots and mine:
        notes.append(f"{name}: slots unknown (not recorded with the run): counted as 1")
    slots = int(slots or (1 if mine else 0))  # 0: never said hello in this run
    busy = sum(b["seconds"] for b in mine)
    joined = [e["time"] for e in happened if e["kind"] == "up"]
    wall = wall_seconds(spans)  # a host's wall time in the run is the run's (cluster/figures.py)
    seen = [b["finished"] for b in mine] + [e["time"] for e in happened] + joined
    engines = sorted({(b.get("meta") or {}).get("engine") for b in mine} - {None, ""})
    engine = ",".join(engines) or (host or {}).get("engine") or None
    startup = []  # per session it worked in: [session start, its first block's start]
    for start, end in spans:
        first = [b["started"] for b in mine if start <= b["finished"] <= end]
        if first:
            startup.append([start, max(start, min(first))])
    return {
        "host": name,
        "slots": slots,
        "engine": engine,
        "python": host_facts.get("python") if isinstance(host_facts.get("python"), str) else None,
        "blocks": len(mine),
        "items": items,
        "found": sum(b.get("found", 0) for b in mine),
        "busy_seconds": busy,
        "wall_seconds": wall,
        "throughput": figures.throughput(items, wall) if items else 0.0,
        "speed_busy": figures.speed_busy(items, busy, slots),
        "speed_busy_per_slot": figures.speed_busy(items, busy),
        "share": items / run_items if run_items else 0.0,
        "standalone_rate": calibration["rate"] if calibration else None,
        "calibration": ({k: calibration.get(k) for k in ("mode", "lo", "hi", "run_id", "variant", "measured")}
                        if calibration else None),
        "retries": sum(_blocks_back(e) for e in happened if e["kind"] in RETRY_KINDS),
        "failures": sum(1 for e in happened if e["kind"] in FAILURE_KINDS),
        "idle_seconds": max(0.0, wall - busy / slots) if slots else wall,
        "last_seen": max(seen) if seen else None,
        "idle_reason": None if items else _idle_reason(happened, joined, last_block),
        "startup": startup,
    }


def _idle_reason(happened: list[dict], joined: list[float], last_block: Optional[float]) -> str:
    """Why a host did nothing in the run, in a few words."""
    for kind in ("left-out", "starting", "quarantine", "lost"):
        found = [e for e in happened if e["kind"] == kind]
        if found:
            detail = figures.IDLE_REASONS[kind]
            return f"{detail}: {found[-1]['detail']}" if kind == "left-out" and found[-1]["detail"] else detail
    if joined and last_block is not None and min(joined) >= last_block:
        return "joined after the work was done"
    return "did no block"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _blocks_back(event: dict) -> int:
    """Blocks a lost or quarantined host gave back ("...; 3 blocks back"); 1 if not said."""
    found = _BLOCKS_BACK.search(event.get("detail") or "")
    return int(found.group(1)) if found else 1


def _startup(spans: list[list[float]], blocks: list[dict]) -> list[list[float]]:
    """Per session that did work: [session start, first block start] (connecting, agents starting)."""
    result = []
    for start, end in spans:
        first = [b["started"] for b in blocks if start <= b["finished"] <= end]
        if first:
            result.append([start, max(start, min(first))])
    return result


def _tail(spans, blocks, events, run, live, now, notes) -> Optional[dict]:
    """{'seconds', 'start', 'end', 'source', 'ongoing'} of the last session that did work, or None."""
    ongoing = live and run["state"] == "running"
    start, end = spans[-1]
    for span in reversed(spans if not ongoing else []):  # a resume that found nothing to do has no tail
        if any(span[0] <= b["finished"] <= span[1] for b in blocks):
            start, end = span
            break
    marks = [e["time"] for e in events if e["kind"] == "tail" and start <= e["time"] <= end + 1e-6]
    if marks:
        began, source = marks[-1], "event"
    elif ongoing:
        return None  # still handing out blocks
    else:
        starts = [b["started"] for b in blocks if b["started"] >= start]
        if not starts:
            return None
        began, source = max(starts), "latest block start"
        notes.append("no tail event in the store: the tail is measured from the latest block start")
    stop = now if ongoing else end
    return {"seconds": max(0.0, stop - began), "start": began, "end": stop, "source": source,
            "ongoing": ongoing}


def _eta(run, spans, blocks, items, live, now, notes) -> Optional[float]:
    """Seconds left for a running run at the current session's rate, or None: the estimate at
    its last commit counted down since (as the progress bar: between commits of big blocks
    the ETA does not rise), or, past it, the estimate at the rate until now."""
    if run["state"] != "running":
        return None
    if not live:
        notes.append("the run is marked running but no coordinator holds it (it was killed): "
                     "run the same command again to resume")
        return None
    start = spans[-1][0]
    done_now = sum(b["items"] for b in blocks if b["finished"] >= start)
    left = max(0, run["total"] - items)
    if left == 0:
        return 0.0
    if done_now <= 0 or now <= start:
        return None
    last = max(b["finished"] for b in blocks if b["finished"] >= start)
    if start < last <= now:
        countdown = left / (done_now / (last - start)) - (now - last)
        if countdown > 0:
            return countdown
    return left / (done_now / (now - start))


# ---------------------------------------------------------------- the end-of-run summary


def summary_table(report: dict, states: dict, hooks) -> tuple[list[str], list[list]]:
    """(headers, rows) of the table printed when a run ends: per host its state (``states``, from
    the coordinator), and the run's figures as ``fab stats`` shows them (same names, same values).
    ``hooks``: the job's class (its column headings, Job.slots_label and Job.found_label)."""
    unit = report["unit"]
    headers = ["host", "state", hooks.slots_label(), "engine", "blocks", unit["item"],
               hooks.found_label(), figures.label(figures.THROUGHPUT, unit),
               figures.label(figures.SPEED_BUSY, unit), "share", "retries", "failures", "did nothing"]
    rows = [[h["host"], states.get(h["host"], ""), h["slots"], h["engine"] or "", h["blocks"], f"{h['items']:,}",
             f"{h['found']:,}", human_rate(h["throughput"], unit), human_rate(h["speed_busy"], unit),
             f"{h['share']:.1%}", h["retries"], h["failures"], h["idle_reason"] or ""] for h in report["hosts"]]
    drop = [i for i, name in ((3, "engine"), (12, "did nothing"))
            if not any(row[i] for row in rows)]
    for i in sorted(drop, reverse=True):
        headers.pop(i)
        for row in rows:
            row.pop(i)
    return headers, rows


def summary_total(report: dict) -> str:
    """``1,000 numbers in 20.0 s wall time (throughput 50 numbers/s)``, the run's line under the table."""
    unit = report["unit"]
    sessions = len(report["sessions"])
    whole = f", {sessions} sessions" if sessions > 1 else ""
    return (f"{report['items']:,} {unit['item']} in {human_seconds(report['wall_seconds'])} wall time{whole}"
            f" ({figures.THROUGHPUT} {human_rate(report['throughput'], unit) or '?'} {unit['label']})")


# ---------------------------------------------------------------- formatting


def human_seconds(seconds: Optional[float]) -> str:
    """12.3 s, 4m05s, 2h03m, 3d04h; '' for None."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def human_rate(rate: Optional[float], unit: dict) -> str:
    """A rate (items/s) in the job's display unit: '1,234,567' numbers/s, '12.5' pages/min."""
    if rate is None:
        return ""
    value = rate * unit["scale"]
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


# The parameters shown first (what a reader looks for), then the others by name.
PARAMS_FIRST = ("start", "end", "mode", "count", "tor", "robots", "bodies", "max_bytes", "timeout", "insecure")


def _param_pairs(params: dict) -> list[str]:
    """``key=value`` for each parameter; a nested group (scrape's options) gives its own pairs."""
    flat: dict = {}
    for key, value in params.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                if inner not in params or params[inner] != item:
                    flat.setdefault(inner, item)
        else:
            flat[key] = value
    first = [k for k in PARAMS_FIRST if k in flat]
    pairs = []
    for key in first + sorted(k for k in flat if k not in first):
        value = flat[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, int):
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, (list, tuple)):
            joined = ",".join(str(v) for v in value)
            value = joined if len(joined) <= 24 else f"{value[0]},+{len(value) - 1}"
        elif value is None:
            value = "none"
        elif not isinstance(value, str):
            value = "{...}"
        elif len(value) > 24:  # a digest, a user agent: its start is enough here (fab stats --format json)
            value = value[:20] + "..."
        pairs.append(f"{key}={value}")
    return pairs


def human_params(params: dict, width: Optional[int] = 60) -> str:
    """``start=1 end=3,000,000,000 mode=count``: whole pairs, as many as fit in ``width``.

    The pairs left out are counted ("+5 more"); ``width=None`` gives them all.
    """
    pairs = _param_pairs(params)
    text = " ".join(pairs)
    if width is None or len(text) <= width:
        return text
    kept: list[str] = []
    for index, pair in enumerate(pairs):
        more = f" +{len(pairs) - index - 1} more" if index < len(pairs) - 1 else ""
        if len(" ".join(kept + [pair])) + len(more) > width:
            break
        kept.append(pair)
    return " ".join(kept + [f"+{len(pairs) - len(kept)} more"])


def params_lines(params: dict, width: int = 100) -> list[str]:
    """Every ``key=value`` pair, wrapped between pairs into lines of at most ``width`` characters."""
    lines: list[str] = []
    for pair in _param_pairs(params):
        if lines and len(lines[-1]) + 1 + len(pair) <= width:
            lines[-1] += " " + pair
        else:
            lines.append(pair)
    return lines


# ---------------------------------------------------------------- the end-of-run summary


def name_ranges(names: list[str]) -> str:
    """``h1-h3, db`` for h1, h2, h3 and db: three or more numbered names in a row as a range."""
    import re

    def key(name: str):
        match = re.fullmatch(r"(.*?)(\d+)", name)
        return (match.group(1), int(match.group(2)), name) if match else (name, -1, name)

    groups: list[list] = []
    for prefix, number, name in sorted(key(n) for n in set(names)):
        last = groups[-1][-1] if groups else None
        if last is not None and number >= 0 and last[0] == prefix and last[1] == number - 1:
            groups[-1].append((prefix, number, name))
        else:
            groups.append([(prefix, number, name)])
    parts = []
    for group in groups:
        if len(group) >= 3:
            parts.append(f"{group[0][2]}-{group[-1][2]}")
        else:
            parts.extend(item[2] for item in group)
    return ", ".join(parts)


def still_starting(hosts, warnings: list[str]) -> tuple[str, list[str]]:
    """One line for the hosts still starting when a short run ended, and the other warnings.

    ``hosts``: the run's HostStats; ``warnings``: the coordinator's, whose one warning per
    such host ("not used: h1 was still starting when the run ended") the line replaces.
    """
    idle = [h.name for h in hosts if h.state == "starting" and not h.blocks]
    if not idle:
        return "", list(warnings)
    replaced = {f"not used: {name} was still starting when the run ended" for name in idle}
    workers = [h.name for h in hosts if h.blocks]
    who = f"{name_ranges(workers)} did it alone" if len(workers) == 1 else \
        f"{name_ranges(workers)} did it" if workers else "no host did any"
    verb = "was" if len(idle) == 1 else "were"
    line = f"{name_ranges(idle)} {verb} still starting when the work was done ({who})"
    return line, [w for w in warnings if w not in replaced]
