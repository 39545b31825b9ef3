"""The figures beowulf shows about a run, defined once (README.md, "Figures").

The end-of-run summary (tasks/primes.py, tasks/scrape.py), ``fab stats`` (table,
JSON, CSV, cluster/report.py) and the plots (cluster/plots.py) all take their
names, labels and values from here, so one figure never has two values or two names.

- **throughput** (per host): items the host did / its wall time in the run, which is
  the run's wall time (its sessions summed: start-up and waiting count against
  every host). What the host added to the run per second; the hosts' throughputs
  add up to the run's: items / the run's wall time (the *actual* rate).
- **speed while busy** (per host): items / busy seconds x slots, the host's speed
  with all its slots while it had work; **per slot**: items / busy seconds. Busy
  seconds are the sum of its blocks' compute times.
- **sum of parts**: the sum of the hosts' standalone rates from a *comparable*
  calibration (below); **efficiency**: the run's throughput / sum of parts (for a
  scrape: / the lower of the sum of parts and the politeness bound).
- **comparable calibration**: same job and variant (Tor or not); for primes the same
  mode (list or count) and a range that reaches within a factor RANGE_FACTOR of the
  run's; measured for this run (``fab calibrate --run N``) or before the run
  ended, so a later ``fab calibrate`` never changes a past run's figures.
- **politeness bound** (scrape): sum over the sites of 1 / delay (sites x 1/delay when
  all delays are equal), the delay being the larger of --delay and the site's robots.txt
  Crawl-delay: --delay is between request starts at one site, whatever --per-domain allows.
"""

from __future__ import annotations

from typing import Optional

from .jobs import hooks_of

# Names and labels: the same everywhere a figure is shown.
THROUGHPUT = "throughput"
SPEED_BUSY = "speed while busy"
SPEED_BUSY_SLOT = "speed while busy per slot"
# A primes calibration is comparable when its range reaches within this factor of the run's.
RANGE_FACTOR = 10.0
# Why a host did nothing in a run, by the event that says so (or what its hello says).
IDLE_REASONS = {
    "starting": "still starting when the run ended",
    "left-out": "left out",
    "lost": "lost",
    "quarantine": "quarantined",
}


def label(figure: str, unit: dict) -> str:
    """``throughput numbers/s``: a figure's column or axis label in a job's unit."""
    return f"{figure} {unit['label']}"


def throughput(items: int, wall: float) -> Optional[float]:
    """Items per second of wall time; None without wall time."""
    return items / wall if wall > 0 else None


def speed_busy(items: int, busy: float, slots: int = 1) -> Optional[float]:
    """Items per busy second, times ``slots`` (1: per slot); None for a host never busy."""
    return items / busy * slots if busy > 0 else None


def run_mode(run: dict) -> str:
    """The run's mode (Job.mode_of: primes 'list' or 'count'), '' for a job without modes."""
    return hooks_of(str(run.get("job") or "")).mode_of(run)


def run_range(run: dict) -> tuple[Optional[int], Optional[int]]:
    params = run.get("params") or {}
    lo, hi = params.get("start"), params.get("end")
    if isinstance(lo, int) and isinstance(hi, int) and hi >= lo:
        return lo, hi
    return None, None


def comparable(run: dict, calibration: dict, ended: float) -> bool:
    """Whether ``calibration`` measured what ``run`` did (see the module doc)."""
    variant = "tor" if (run.get("params") or {}).get("tor") else ""
    if calibration["job"] != run["job"] or (calibration.get("variant") or "") != variant:
        return False
    if calibration.get("run_id") != run["id"] and calibration["measured"] > ended:
        return False
    return hooks_of(run["job"]).comparable_calibration(run, calibration)  # primes: mode and range


def comparable_rates(run: dict, calibrations: list[dict], ended: float) -> dict[str, dict]:
    """Per host the calibration a run's efficiency uses: one measured for this run first,
    else the latest comparable one measured before the run ended."""
    chosen: dict[str, dict] = {}
    for row in sorted(calibrations, key=lambda c: (c.get("run_id") == run["id"], c["measured"])):
        if comparable(run, row, ended):
            chosen[row["host"]] = row
    return chosen


def describe_calibration(row: dict) -> str:
    """What a calibration measured, in words (Job.describe_calibration: 'count mode over [1e11, ...]')."""
    return hooks_of(str(row.get("job") or "")).describe_calibration(row)


def politeness_bound(delays: list[float]) -> Optional[float]:
    """Pages per second politeness allows: one request start per site per delay, summed over
    the sites (``delays``: each site's delay in seconds, --delay or its robots Crawl-delay,
    whichever is larger). None without sites, or when a site has no delay (no bound)."""
    if not delays or any(d <= 0 for d in delays):
        return None
    return sum(1.0 / d for d in delays)
