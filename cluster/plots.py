"""`fab stats --plot DIR`: the seed's three pictures, from a run's report (cluster/report.py).

- ``run<N>-rates.png``: rate per host (bars; the standalone rate beside the rate
  in the run when ``fab calibrate`` measured one; for scrape runs pages/min, with
  and without Tor side by side when both kinds of run exist);
- ``run<N>-sum.png``: the sum of the hosts' standalone rates against the
  cluster's actual rate, with the efficiency;
- ``run<N>-timeline.png``: every block as a bar on its host's slot lane over the
  run's time (sessions joined), the tail shaded, lost hosts and failures marked.

matplotlib is imported when a plot is drawn (Agg backend: no display needed), so
``fab --list`` and the tables never pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import figures
from .errors import BeowulfError
from .report import human_rate, human_seconds
from .shown import shown

DPI = 110
# PNG metadata: no matplotlib version, so that a run's plots are the same bytes every time
# (a past run's figures never change, README.md "Figures").
METADATA = {"Software": None}
WIDTH = 9.0  # inches
# Events marked on the timeline: kind -> (legend label, marker, colour).
MARK_KINDS = {"lost": ("host lost", "v", "black"), "quarantine": ("host quarantined", "s", "black"),
              "failure": ("task failed", "X", "crimson"), "invalid": ("invalid result", "X", "darkorange"),
              "mismatch": ("--verify mismatch", "D", "purple")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BeowulfError("--plot needs matplotlib: pip install -r requirements.txt") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, blocks: list[dict], events: list[dict], folder: Path,
                compare: Optional[dict] = None) -> tuple[list[Path], list[str]]:
    """Draw the three PNGs of a run into ``folder`` (created); (paths written, messages).

    ``compare``: the report of a scrape run with the other Tor setting, drawn beside.
    A run without finished blocks gets no plot, and the message says why.
    """
    run_id = report["run"]["id"]
    if not blocks or not report["items"]:
        state = report["run"].get("state")
        ended = {"failed": "failed", "interrupted": "was interrupted", "replaced": "was replaced"}.get(state)
        if ended:  # a run that stopped early: say so plainly, no "yet"
            return [], [f"run {run_id} {ended} before any block was finished: no plots written"]
        return [], [f"run {run_id} has no finished blocks yet: no plots written"]
    if not report["wall_seconds"] > 0:
        return [], [f"run {run_id} has no measurable wall time: no plots written"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BeowulfError(f"--plot: cannot create {folder} ({err.strerror})") from None
    plt = _pyplot()
    colors = _host_colors(report, compare)
    written = []
    for suffix, draw in (("rates", lambda: rates_figure(plt, report, colors, compare)),
                         ("sum", lambda: sum_figure(plt, report, colors, compare)),
                         ("timeline", lambda: timeline_figure(plt, report, blocks, events, colors))):
        figure = draw()
        path = folder / f"run{run_id}-{suffix}.png"
        try:
            figure.savefig(path, dpi=DPI, metadata=METADATA)
        except OSError as err:
            raise BeowulfError(f"--plot: cannot write {path} ({err.strerror})") from None
        finally:
            plt.close(figure)
        written.append(path)
    return written, []


# ---------------------------------------------------------------- shared bits


def _host_colors(report: dict, compare: Optional[dict]) -> dict:
    from matplotlib import colormaps

    names = sorted({h["host"] for r in (report, compare) if r for h in r["hosts"]})
    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _label(text) -> str:
    """Stored text (host and engine names, parameters) as a plot label: control characters
    escaped (SECURITY.md, "Terminal escapes") and ``$`` kept literal (no mathtext)."""
    return shown(text).replace("$", r"\$")


def _per(unit: dict) -> str:
    return f"{unit['item']} per {'second' if unit['per'] == 's' else 'minute'}"


def _title(report: dict, what: str) -> str:
    run = report["run"]
    return _label(f"Run {run['id']} ({run['job']}, {run['state']}): {what}")


def _subtitle(report: dict) -> str:
    from .report import human_params

    return _label(human_params(report["run"]["params"] or {}, width=90))


def _tor_label(report: dict) -> str:
    return "with Tor" if (report["run"]["params"] or {}).get("tor") else "without Tor"


def _eng(axis) -> None:
    from matplotlib.ticker import EngFormatter

    axis.set_major_formatter(EngFormatter(sep=""))


# ---------------------------------------------------------------- rate per host


def rates_figure(plt, report: dict, colors: dict, compare: Optional[dict] = None):
    """Horizontal bars, one group per host: its rate (and standalone or other-Tor rate)."""
    unit = report["unit"]
    scale = unit["scale"]
    if compare is not None:
        pair = sorted((report, compare), key=lambda r: bool((r["run"]["params"] or {}).get("tor")))
        series = [(f"{figures.SPEED_BUSY}, {_tor_label(r)} (run {r['run']['id']})",
                   {h["host"]: h["speed_busy"] or 0.0 for h in r["hosts"]}) for r in pair]
    else:
        series = []
        calibrated = {h["host"]: h["standalone_rate"] for h in report["hosts"] if h["standalone_rate"]}
        if calibrated:
            series.append(("alone (comparable fab calibrate)", calibrated))
        series.append((figures.THROUGHPUT, {h["host"]: h["throughput"] or 0.0 for h in report["hosts"]}))
        series.append((figures.SPEED_BUSY, {h["host"]: h["speed_busy"] or 0.0 for h in report["hosts"]}))
    hosts = {h["host"]: h for r in (report, compare) if r for h in r["hosts"]}
    names = sorted({n for _, values in series for n in values},
                   key=lambda n: (max(values.get(n, 0) for _, values in series), n))
    figure, ax = plt.subplots(figsize=(WIDTH, 1.6 + 0.55 * len(names) * max(1, len(series) * 0.75)),
                              layout="constrained")
    height = 0.8 / len(series)
    top = max((v for _, values in series for v in values.values()), default=0) * scale or 1.0
    hatches = ("//", "", "..")
    for k, (label, values) in enumerate(series):
        offsets = [i - 0.4 + height * (k + 0.5) for i in range(len(names))]
        widths = [values.get(n, 0) * scale for n in names]
        bars = ax.barh(offsets, widths, height=height * 0.92, label=label,
                       color=[colors[n] for n in names], alpha=1.0 if k == len(series) - 1 else 0.55,
                       hatch=hatches[k % len(hatches)] if len(series) > 1 else None, edgecolor="white")
        for bar, name in zip(bars, names):
            if name in values:
                reason = hosts[name].get("idle_reason") if not values[name] else None
                ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2,
                        human_rate(values[name], unit) + (f" ({_label(reason)})" if reason else ""),
                        va="center", fontsize=9)
    ax.set_yticks(range(len(names)), [_host_label(hosts[n]) for n in names])
    ax.set_xlim(0, top * 1.18)
    _eng(ax.xaxis)
    ax.set_xlabel(f"{_per(unit)} (all of the host's slots; README.md, Figures)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        from matplotlib.patches import Patch

        keys = [Patch(facecolor="0.4", edgecolor="white", alpha=1.0 if k == len(series) - 1 else 0.55,
                      hatch=hatches[k % len(hatches)], label=label) for k, (label, _) in enumerate(series)]
        figure.legend(handles=keys[::-1], loc="outside lower center",  # top bar first
                      ncol=len(series), fontsize=9, frameon=False)
    ax.set_title(_title(report, f"{_per(unit)} by host") + "\n" + _subtitle(report),
                 fontsize=11)
    return figure


def _host_label(host: dict) -> str:
    slots = host["slots"]
    label = f"{_label(host['host'])}\n{slots} slot{'s' if slots != 1 else ''}"
    if host.get("engine"):
        label += f", {_label(host['engine'])}"
    return label


# ---------------------------------------------------------------- sum of parts vs actual


def _stack(report: dict, scale: float) -> list:
    """(host, bar height) of each host in the sum-of-parts bar, largest standalone rate first."""
    parts = []
    for h in sorted(report["hosts"], key=lambda h: -(h["standalone_rate"] or 0)):
        rate = h["standalone_rate"] if report["sum_standalone"] else h["speed_busy"]
        value = (rate or 0) * scale if h["items"] else 0
        if value > 0:
            parts.append((h, value))
    return parts


def sum_figure(plt, report: dict, colors: dict, compare: Optional[dict] = None):
    """Per group: a stacked bar of the hosts' standalone rates beside the actual total."""
    unit = report["unit"]
    scale = unit["scale"]
    reports = [report]
    if compare is not None:
        reports = sorted((report, compare), key=lambda r: bool((r["run"]["params"] or {}).get("tor")))
    figure, ax = plt.subplots(figsize=(WIDTH if len(reports) > 1 else 7.0, 5.2), layout="constrained")
    ticks, labels = [], []
    # The stacked bar's height, not r["sum_standalone"]: with no comparable calibration the stack
    # is the hosts' speed while busy, which may stand far above the throughput.
    top = max(max(sum(value for _, value in _stack(r, scale)), (r["throughput"] or 0) * scale,
                  (r["politeness_bound"] or 0) * scale) for r in reports) or 1
    legend_done = set()
    for g, r in enumerate(reports):
        x_sum, x_actual = g * 2.6, g * 2.6 + 1.0
        bottom = 0.0
        for h, value in _stack(r, scale):
            ax.bar(x_sum, value, bottom=bottom, width=0.8, color=colors[h["host"]], edgecolor="white",
                   label=_label(h["host"]) if h["host"] not in legend_done else None)
            legend_done.add(h["host"])
            if value > 0.06 * top:
                ax.text(x_sum, bottom + value / 2, _label(h["host"]), ha="center", va="center", fontsize=9,
                        color="white", fontweight="bold")
            bottom += value
        actual = (r["throughput"] or 0) * scale
        ax.bar(x_actual, actual, width=0.8, color="#333333")
        ax.text(x_sum, bottom + top * 0.015, human_rate(bottom / scale, unit), ha="center", va="bottom",
                fontsize=9)
        against = "of the sum" if r["efficiency_against"] == "sum of parts" else "of the politeness bound"
        efficiency = f"\n= {r['efficiency']:.0%} {against}" if r["efficiency"] else \
            "\nno efficiency: no\ncomparable calibration"
        ax.text(x_actual, actual + top * 0.015, human_rate(r["throughput"], unit) + efficiency, ha="center",
                va="bottom", fontsize=9, fontweight="bold")
        if r["politeness_bound"]:
            bound = r["politeness_bound"] * scale
            ax.hlines(bound, x_sum - 0.5, x_actual + 0.5, colors="crimson", linestyles="dashed")
            ax.text(x_actual + 0.5, bound, f" politeness bound {human_rate(r['politeness_bound'], unit)}",
                    color="crimson", va="bottom", ha="right", fontsize=8)
        parts = ("sum of the hosts\nalone (fab calibrate)" if r["sum_standalone"] else
                 f"sum of the hosts'\n{figures.SPEED_BUSY}\n(no comparable calibration)")
        group = f"\n{_tor_label(r)}" if len(reports) > 1 else ""
        ticks += [x_sum, x_actual]
        labels += [parts + group, f"{figures.THROUGHPUT}\n(whole cluster){group}"]
    ax.set_xticks(ticks, labels, fontsize=9)
    ax.set_ylim(0, top * 1.22)
    _eng(ax.yaxis)
    ax.set_ylabel(_per(unit))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first, as drawn
    ax.legend(handles[::-1], labels[::-1], title="host", fontsize=8, title_fontsize=9, loc="upper right")
    ax.set_title(_title(report, "sum of the parts vs actual total") + "\n" + _subtitle(report), fontsize=11)
    return figure


# ---------------------------------------------------------------- timeline


def _clock(spans: list[list[float]]):
    """Wall time -> seconds of run time, the sessions joined end to end."""
    starts, offset = [], 0.0
    for start, end in spans:
        starts.append((start, end, offset))
        offset += end - start

    def at(t: float) -> float:
        chosen = starts[0]
        for item in starts:
            if t >= item[0]:
                chosen = item
        start, end, base = chosen
        return base + min(max(t - start, 0.0), end - start)

    return at


def _lanes(blocks: list[dict], at, slots: int) -> list[list[tuple[float, float]]]:
    """Blocks of one host packed into at most ``slots`` lanes, as (x, width) bars.

    A block goes to a lane that is free when it starts, else to a new lane while
    there are fewer than ``slots``, else to the lane that frees first: the recorded
    start (finish minus compute time) can overlap the previous block by the few
    milliseconds the result took to arrive, which must not look like another slot.
    """
    lanes: list[list[tuple[float, float]]] = []
    ends: list[float] = []
    for block in sorted(blocks, key=lambda b: b["started"]):
        x0, x1 = at(block["started"]), at(block["finished"])
        free = [i for i, end in enumerate(ends) if x0 >= end - 1e-3]
        if free:
            lane = free[0]
        elif len(lanes) < max(1, slots):
            lanes.append([])
            ends.append(x1)
            lane = len(lanes) - 1
        else:
            lane = min(range(len(ends)), key=ends.__getitem__)
        lanes[lane].append((x0, x1 - x0))
        ends[lane] = max(ends[lane], x1)
    return lanes


def _resumes(xs: list[float], wall: float) -> list[tuple[float, int]]:
    """Resume marks as (x, how many): marks closer than 12% of the run's time share one label,
    so that their labels never overlap."""
    groups: list[list[float]] = []
    for x in sorted(xs):
        if groups and x - groups[-1][0] < 0.12 * wall:
            groups[-1].append(x)
        else:
            groups.append([x])
    return [(group[0], len(group)) for group in groups]


def timeline_figure(plt, report: dict, blocks: list[dict], events: list[dict], colors: dict):
    """Gantt chart: a band per host, a lane per slot, a bar per block; tail and faults marked."""
    spans = report["sessions"]
    at = _clock(spans)
    names = [h["host"] for h in report["hosts"]]
    by_host = {n: [b for b in blocks if b["host"] == n] for n in names}
    figure, ax = plt.subplots(figsize=(WIDTH, 1.9 + 0.75 * len(names)), layout="constrained")
    edge = 0.4 if len(blocks) < 400 else 0.0
    slots = {h["host"]: h["slots"] for h in report["hosts"]}
    for row, name in enumerate(reversed(names)):
        lanes = _lanes(by_host[name], at, slots[name]) or [[]]
        lane_height = 0.8 / len(lanes)
        for k, lane in enumerate(lanes):
            if lane:
                ax.broken_barh(lane, (row - 0.4 + k * lane_height, lane_height * 0.9),
                               facecolors=colors[name], edgecolor="white", linewidth=edge)
    rows = {name: row for row, name in enumerate(reversed(names))}
    tail = report.get("tail")
    if tail:
        ax.axvspan(at(tail["start"]), at(tail["end"]), color="0.5", alpha=0.18, zorder=0,
                   label=f"tail: {human_seconds(tail['seconds'])}"
                         + (" (approx.)" if tail["source"] != "event" else ""))
    shaded = False
    for h in report["hosts"]:  # each host's own start-up: session start to its first block
        for begin, end in h.get("startup") or []:
            if end > begin:
                ax.broken_barh([(at(begin), at(end) - at(begin))], (rows[h["host"]] - 0.45, 0.9),
                               facecolors="gold", alpha=0.35, zorder=0,
                               label="start-up (each host's own)" if not shaded else None)
                shaded = True
    for x, count in _resumes([at(start) for start, _end in spans[1:]], report["wall_seconds"]):
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
        ax.text(x, len(names) - 0.45, " resumed" + (f" x{count}" if count > 1 else ""), fontsize=8,
                va="bottom")
    marked = set()
    for event in events:
        if event["kind"] in MARK_KINDS and event.get("host") in rows:
            label, marker, color = MARK_KINDS[event["kind"]]
            ax.plot(at(event["time"]), rows[event["host"]], marker=marker, color=color, markersize=9,
                    linestyle="none", label=label if label not in marked else None, zorder=3)
            marked.add(label)
    wall = report["wall_seconds"]
    ax.set_xlim(0, wall * 1.01)
    ax.set_ylim(-0.6, len(names) - 0.4 + (0.3 if len(spans) > 1 else 0))
    ax.set_yticks(range(len(names)), [_host_label(h) for h in reversed(report["hosts"])])
    joined = " (sessions joined)" if len(spans) > 1 else ""
    ax.set_xlabel(f"seconds since the run started{joined}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if tail or marked or shaded:
        figure.legend(loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    ax.set_title(_title(report, f"{len(blocks):,} blocks over {human_seconds(wall)}")
                 + "\none bar per block, one lane per slot; white space is an idle slot", fontsize=11)
    return figure
