"""Fault figures on loopback sshd hosts (issue 6): slow link, partition, uneven machines.

    python bench/bench_faults.py [--seconds 40] [--only slow,partition,uneven] [--rounds 3]
                                 [--uneven-seconds 60] [--renice N] [--keep]

Two sshd hosts from the test harness (h1, h2), provisioned with ``fab setup --no-numpy``;
every run is ``fab primes --count-only --block-seconds 2`` from 10^11 up (the region
``fab calibrate`` measures), sized from h1's calibrated rate to last about ``--seconds``.

a. **Slow link**: h1 alone (2 slots) behind the harness's TCP relay adding 100 ms each way
   and capping 1 MB/s, against the same run with h1 reached directly. Utilisation = the
   host's compute time (sum of its blocks' ``seconds``) / (wall x slots), over the run's
   wall time (``fab stats``: start-up included) and over the host's working window (first
   block start to last block end). Target: >= 0.9 with 2-second blocks. A list-mode row
   shows what a link too thin for the results does (those runs are link-bound).
b. **Partition**: h1 (behind a relay) and h2, 1 slot each, production timeouts (heartbeat
   every 2 s, a host silent for 20 s is lost). Mid-run the relay blackholes h1 (bytes stop,
   nothing closes); measured: detection (blackhole to the "lost" event), recovery
   (blackhole to the last of h1's given-back blocks committed by h2), and after the
   blackhole lifts, rejoin (lift to h1's next block start). Baseline: the 20 s timeout.
c. **Uneven machines**: h1's sshd pinned to CPU 0, h2's to CPU 1 and capped to a quarter
   of it (cgroup v1 ``cpu.cfs_quota_us``, else Debian's ``cpulimit``); their sessions
   inherit both. ``--rounds`` rounds (default 3), each measuring the standalone rates right
   before its joint run, two ways: ``fab calibrate`` (what ``fab stats`` uses; start-up
   excluded) and each host alone on a range sized for ~10 s (items / wall, start-up
   included, like the joint run). Then both hosts on a range sized for ``--uneven-seconds``
   (default 60): efficiency = actual rate / sum of standalone rates (target >= 0.95) and
   the tail, from the last block handed out (the "tail" event) to the end (target: within
   one block-time, 2 s, of the fastest host). Medians over the rounds.

Hosts run with ``nice = 0`` (at the default 10 their workers yield to every other process
on this shared machine). Other engineers' work still shares these 2 cores, and the pinned
hosts share them with it: quote ratios, and expect the uneven figures to move with the
load (``--renice -10`` runs the hosts and fab at a higher priority, for less noise). Takes
about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from harness import SshCluster, fab_argv, fab_env, require_sshd, run_fab  # noqa: E402

START = 10**11
BLOCK_SECONDS = 2.0
BEAT_TIMEOUT = 20.0  # cluster.coordinator.BEAT_TIMEOUT, the production value fab uses
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
ALONE_SECONDS = 10.0  # each host alone on a range sized for about this long


# ---------------------------------------------------------------- plumbing


class Bench:
    def __init__(self, base: Path):
        self.base = base
        self.cluster = SshCluster(base / "cluster", 2).start()
        self.fabric_yaml = self.cluster.write_fabric_config(base / "fabric.yaml")
        self.counter = 0

    def inventory(self, names: list, slots: dict | None = None, direct: bool = False) -> Path:
        self.counter += 1
        extra = {}
        for name in names:
            # nice 0: at the default 10, the hosts' workers would yield to every other process
            # on this shared machine, and the figures would measure its load.
            keys = {"python": PYTHON, "nice": 0} if PYTHON else {"nice": 0}
            if slots and name in slots:
                keys["slots"] = slots[name]
            extra[name] = keys
        return self.cluster.write_inventory(self.base / f"hosts{self.counter}.ini", hosts=names, extra=extra,
                                            direct=direct)

    def fab(self, args: list, timeout: float = 900) -> str:
        done = run_fab(args, config=self.fabric_yaml, cwd=self.base, timeout=timeout)
        if done.returncode != 0:
            command = " ".join(map(str, args))
            raise SystemExit(f"fab {command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start_fab(self, args: list) -> subprocess.Popen:
        return subprocess.Popen(fab_argv(args, config=self.fabric_yaml), cwd=self.base, env=fab_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def db(self, name: str) -> Path:
        return self.base / f"{name}.db"

    def calibrate(self, host: str, db: Path, seconds: float = 8) -> float:
        self.fab(["calibrate", "--inventory", self.inventory([host]), "--db", db, "--start", START,
                  "--seconds", seconds, "--quiet"])
        rows = query(db, "SELECT rate FROM calibration WHERE host = ? AND job = 'primes'", (host,))
        return float(rows[0][0])

    def primes(self, names: list, db: Path, width: int, slots: dict | None = None, extra: tuple = ()) -> dict:
        """A count-only run of [START, START + width] on ``names``; fab stats' report of it."""
        self.fab(["primes", "--inventory", self.inventory(names, slots), "--start", START, "--end", START + width,
                  "--count-only", "--db", db, "--block-seconds", BLOCK_SECONDS, "--quiet", *extra])
        return self.stats(db)

    def stats(self, db: Path) -> dict:
        return json.loads(self.fab(["stats", "--db", db, "--last", "--format", "json"]))


def query(db: Path, sql: str, args: tuple = ()) -> list:
    if not Path(db).exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


def utilisation(db: Path, report: dict, host: str) -> tuple[float, float, int]:
    """(over the run's wall, over the host's working window, blocks) for ``host`` in the last run."""
    rows = query(db, "SELECT started, finished, seconds FROM blocks WHERE host = ? AND run_id = ?",
                 (host, report["run"]["id"]))
    row = next(h for h in report["hosts"] if h["host"] == host)
    busy = sum(r[2] for r in rows)
    window = max(r[1] for r in rows) - min(r[0] for r in rows)
    return busy / (report["wall_seconds"] * row["slots"]), busy / (window * row["slots"]), len(rows)


def fmt(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------- a. slow link


def slow_link(bench: Bench, seconds: float) -> list:
    rate = bench.calibrate("h1", bench.db("calibrate-h1"))
    width = int(rate * seconds)
    rows = []
    for attempt in range(3):  # the machine's load moves rates a lot: resize until the baseline lasts
        db = bench.db(f"direct{attempt}")
        direct = bench.primes(["h1"], db, width, slots={"h1": 2})
        working = direct["wall_seconds"] - direct["startup_seconds"]
        if working >= 0.7 * seconds:
            break
        width = int(width * seconds / max(working, 1.0))
    u_run, u_window, blocks = utilisation(db, direct, "h1")
    rows.append(["direct (baseline)", "count", blocks, fmt(direct["wall_seconds"], 1), fmt(u_run), fmt(u_window), ""])
    relay = bench.cluster.add_relay("h1", delay=0.1, bandwidth=1_000_000)
    slow = bench.primes(["h1"], bench.db("slow"), width, slots={"h1": 2})
    s_run, s_window, blocks = utilisation(bench.db("slow"), slow, "h1")
    rows.append(["100 ms each way, 1 MB/s", "count", blocks, fmt(slow["wall_seconds"], 1), f"**{s_run:.2f}**",
                 f"**{s_window:.2f}**", f"{s_run / u_run:.2f}x / {s_window / u_window:.2f}x"])
    # List mode: ~0.9 bytes per prime on the wire; 1..3e8 is 16M primes, ~15 MB through 1 MB/s.
    before = relay.bytes_down
    bench.fab(["primes", "--inventory", bench.inventory(["h1"], {"h1": 2}), "--start", 1, "--end", "3e8",
               "--db", bench.db("slow-list"), "--block-seconds", BLOCK_SECONDS, "--quiet"])
    listed = bench.stats(bench.db("slow-list"))
    l_run, l_window, blocks = utilisation(bench.db("slow-list"), listed, "h1")
    megabytes = (relay.bytes_down - before) / 1e6
    rows.append([f"same, list mode 1..3e8 ({megabytes:.0f} MB of results)", "list", blocks,
                 fmt(listed["wall_seconds"], 1), fmt(l_run), fmt(l_window), "link-bound"])
    bench.cluster.remove_relay("h1")
    print(f"\n## a. Slow link: h1 alone, 2 slots, --block-seconds {BLOCK_SECONDS:g}, "
          f"[{START:.0e}, +{width:.2e}] count-only (h1 calibrated at {rate:.3g} numbers/s)\n")
    print(tabulate(rows, headers=["link", "mode", "h1 blocks", "wall s", "utilisation (run wall)",
                                  "utilisation (h1 window)", "vs direct"], tablefmt="github"))
    return [("slow-link utilisation, run wall (target >= 0.9)", s_run),
            ("slow-link utilisation, host window", s_window)]


# ---------------------------------------------------------------- b. partition


def partition(bench: Bench) -> list:
    relay = bench.cluster.add_relay("h1")
    db = bench.db("partition")
    width = 10**13  # far more than it will do: the run is stopped once h1 has rejoined
    inventory = bench.inventory(["h1", "h2"], {"h1": 1, "h2": 1})
    child = bench.start_fab(["primes", "--inventory", inventory, "--start", START, "--end", START + width,
                             "--count-only", "--db", db, "--block-seconds", BLOCK_SECONDS])
    try:
        wait_for(lambda: count(db, "host = 'h1'") >= 3, 180, "h1's first blocks")
        black = time.time()
        relay.set_blackhole(True)
        lost_at, detail = wait_for(lambda: first(query(
            db, "SELECT time, detail FROM events WHERE host = 'h1' AND kind = 'lost' AND time > ?", (black,))),
            BEAT_TIMEOUT + 120, "h1 declared lost")
        given_back = int(re.search(r"(\d+) blocks? back", detail).group(1))
        redone = wait_for(lambda: _redone(db, lost_at, given_back), 180, "h1's blocks redone on h2")
        lift = time.time()
        relay.set_blackhole(False)
        rejoined = wait_for(lambda: first(query(
            db, "SELECT min(started) FROM blocks WHERE host = 'h1' AND started > ? HAVING count(*) > 0", (lift,))),
            240, "h1 to rejoin")[0]
    finally:
        relay.set_blackhole(False)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGINT)
        try:
            child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
        bench.cluster.remove_relay("h1")
    detection = lost_at - black
    recovery = max(r[1] for r in redone) - black
    rows = [
        ["detection: blackhole -> h1 lost", fmt(detection, 1), f"{detection / BEAT_TIMEOUT:.2f}x"],
        [f"redo starts: blackhole -> first of h1's {given_back} blocks started on h2",
         fmt(min(r[0] for r in redone) - black, 1), ""],
        ["**recovery**: blackhole -> h1's blocks all redone on h2", f"**{recovery:.1f}**",
         f"{recovery / BEAT_TIMEOUT:.2f}x"],
        ["rejoin: blackhole lifted -> h1's next block starts", fmt(rejoined - lift, 1), ""],
    ]
    print("\n## b. Partition: h1 (relay) + h2, 1 slot each, heartbeat 2 s, timeout "
          f"{BEAT_TIMEOUT:g} s, --block-seconds {BLOCK_SECONDS:g}\n")
    print(tabulate(rows, headers=["step", "seconds", f"vs the {BEAT_TIMEOUT:g} s timeout"], tablefmt="github"))
    return [("partition recovery s (blackhole -> blocks redone)", recovery)]


def count(db: Path, where: str) -> int:
    rows = query(db, f"SELECT count(*) FROM blocks WHERE {where}")
    return rows[0][0] if rows else 0


def first(rows: list):
    return rows[0] if rows else None


def _redone(db: Path, lost_at: float, given_back: int):
    """(started, finished) of the given-back blocks once h2 committed them all: the first
    ``given_back`` blocks handed out twice that h2 started after the loss."""
    rows = query(db, "SELECT started, finished FROM blocks WHERE host = 'h2' AND attempts >= 2 AND finished > ?"
                 " ORDER BY started", (lost_at,))
    return rows[:given_back] if len(rows) >= given_back else None


# ---------------------------------------------------------------- c. uneven machines


class Throttle:
    """Pin each host's sshd to one CPU and cap one of them; undone by close()."""

    def __init__(self, bench: Bench, cap_host: str, quota: float):
        self.cgroup = None
        self.cpulimit = None
        self.how = ""
        for cpu, host in enumerate(bench.cluster):
            subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(host.pid)], check=True,
                           capture_output=True)
        pid = bench.cluster[cap_host].pid
        if (CGROUP_CPU / "cpu.cfs_quota_us").exists():
            self.cgroup = CGROUP_CPU / f"beowulf-bench-{os.getpid()}"
            self.cgroup.mkdir()
            (self.cgroup / "cpu.cfs_period_us").write_text("100000")
            (self.cgroup / "cpu.cfs_quota_us").write_text(str(int(100000 * quota)))
            (self.cgroup / "cgroup.procs").write_text(str(pid))
            self.how = f"cgroup v1 cpu.cfs_quota_us = {quota:g} x cfs_period_us"
        elif shutil.which("cpulimit"):
            self.cpulimit = subprocess.Popen(["cpulimit", "--include-children", "-p", str(pid),
                                              "-l", str(int(100 * quota))], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
            self.how = f"cpulimit -l {int(100 * quota)} --include-children"
        else:
            raise SystemExit("no way to cap a host: neither /sys/fs/cgroup/cpu nor cpulimit "
                             "(apt install cpulimit)")

    def close(self) -> None:
        if self.cpulimit is not None:
            self.cpulimit.terminate()
            self.cpulimit.wait()
        if self.cgroup is not None:
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                try:
                    (CGROUP_CPU / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # gone meanwhile
            self.cgroup.rmdir()


def uneven(bench: Bench, seconds: float, rounds: int) -> list:
    throttle = Throttle(bench, "h2", 0.25)
    results = []
    try:
        for index in range(rounds):
            db = bench.db(f"uneven{index}")
            calibrated = {h: bench.calibrate(h, db, seconds=6) for h in ("h1", "h2")}
            alone = {h: bench.primes([h], bench.db(f"alone{index}-{h}"), int(calibrated[h] * ALONE_SECONDS))["rate"]
                     for h in ("h1", "h2")}
            width = int(sum(calibrated.values()) * seconds)
            results.append((calibrated, alone, bench.primes(["h1", "h2"], db, width)))
    finally:
        throttle.close()
    rows, figures = [], []
    for index, (calibrated, alone, report) in enumerate(results):
        rate = report["rate"]
        tail = (report["tail"] or {}).get("seconds")
        by_host = {h["host"]: h for h in report["hosts"]}
        eff_cal, eff_alone = rate / sum(calibrated.values()), rate / sum(alone.values())
        # Against the hosts' own rates while computing in this run: what the schedule lost
        # (start-up, idle slots, tail), with the machine's speed changes cancelled out.
        eff_inrun = rate / sum(by_host[h]["rate"] for h in ("h1", "h2"))
        figures.append((eff_cal, eff_alone, eff_inrun, tail))
        # Diagnostics (not the efficiency): how busy each host was in the joint run, and how fast
        # it ran there against its calibration (the machine's load moves the latter a lot).
        busy = " / ".join(f"{by_host[h]['busy_seconds'] / (report['wall_seconds'] * by_host[h]['slots']):.2f}"
                          for h in ("h1", "h2"))
        speed = " / ".join(f"{by_host[h]['rate'] / calibrated[h]:.2f}" for h in ("h1", "h2"))
        rows.append([index + 1, f"{calibrated['h1']:.3g} / {calibrated['h2']:.3g}",
                     f"{alone['h1']:.3g} / {alone['h2']:.3g}",
                     f"{by_host['h1']['share'] * 100:.0f}% / {by_host['h2']['share'] * 100:.0f}%",
                     f"{rate:.3g}", fmt(report["wall_seconds"], 1), fmt(report["startup_seconds"], 1), busy, speed,
                     fmt(eff_cal, 3), fmt(eff_alone, 3), fmt(eff_inrun, 3), fmt(tail)])
    median = [statistics.median(f[i] for f in figures if f[i] is not None) for i in range(4)]
    rows.append(["median", "", "", "", "", "", "", "", "", f"**{median[0]:.3f}**", f"{median[1]:.3f}",
                 f"**{median[2]:.3f}**", f"**{median[3]:.2f}**"])
    print(f"\n## c. Uneven machines: h1 pinned to CPU 0; h2 pinned to CPU 1 and capped ({throttle.how}); "
          f"1 slot each, --block-seconds {BLOCK_SECONDS:g}, count-only from {START:.0e}, joint runs sized for "
          f"{seconds:g} s; {rounds} rounds, each measuring its standalone rates right before its joint run\n")
    print(tabulate(rows, headers=["round", "fab calibrate /s h1 / h2", f"alone ~{ALONE_SECONDS:g} s run /s h1 / h2",
                                  "share h1 / h2", "joint /s", "wall s", "start-up s", "busy / wall h1 / h2",
                                  "in-run speed / calibrate h1 / h2", "efficiency (calibrate)",
                                  "efficiency (alone runs)", "efficiency (in-run rates)", "tail s"],
                   tablefmt="github", disable_numparse=True))
    print(f"\nefficiency (calibrate) = joint items / wall (fab stats: start-up included) / sum of fab calibrate "
          f"rates (start-up excluded); (alone runs) = the same over each host's own run's items / wall; "
          f"(in-run rates) = the same over each host's rate while computing in this joint run (what the "
          f"schedule lost: start-up, idle, tail; the machine's speed changes cancel out). "
          f"Tail: last block handed out -> end; target <= one block-time ({BLOCK_SECONDS:g} s). "
          f"busy / wall: a host's compute time over the joint run's wall time (how well the schedule kept it "
          f"fed); in-run speed / calibrate: its numbers/s while computing in the joint run over its calibrated "
          f"rate (1.00 if the machine's load stood still between the two).")
    return [("uneven: efficiency vs fab calibrate, median (target >= 0.95)", median[0]),
            ("uneven: efficiency vs standalone runs, median", median[1]),
            ("uneven: efficiency vs in-run rates, median", median[2]),
            (f"uneven: tail s, median (target <= {BLOCK_SECONDS:g} s)", median[3])]


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40, help="aim for runs of about this long (default 40)")
    parser.add_argument("--only", default="slow,partition,uneven", help="comma-separated parts to run")
    parser.add_argument("--uneven-seconds", type=float, default=60,
                        help="aim for joint runs of about this long in part c (default 60)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of part c (default 3)")
    parser.add_argument("--renice", type=int, default=0, metavar="N",
                        help="run the hosts and fab at niceness N (e.g. -10: less noise from other work; default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (stores, logs)")
    args = parser.parse_args()
    require_sshd()
    if args.renice:
        os.setpriority(os.PRIO_PROCESS, 0, args.renice)  # before any thread or process: all inherit it
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    base = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    bench = Bench(base)
    summary = []
    try:
        bench.fab(["setup", "--inventory", bench.inventory(["h1", "h2"]), "--no-numpy"])
        print(f"# bench_faults: 2 loopback sshd hosts, niceness {os.getpriority(os.PRIO_PROCESS, 0)}, "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        if "slow" in parts:
            summary += slow_link(bench, args.seconds)
        if "partition" in parts:
            summary += partition(bench)
        if "uneven" in parts:
            summary += uneven(bench, args.uneven_seconds, args.rounds)
    finally:
        bench.cluster.stop()
        if args.keep:
            print(f"\n(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n## Summary (load average {os.getloadavg()[0]:.1f} at the end)\n")
    print(tabulate([[name, fmt(value, 3)] for name, value in summary], headers=["figure", "value"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
