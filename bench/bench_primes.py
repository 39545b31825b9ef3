"""`fab primes` end to end on the shipped default inventory (this computer), against primesieve.

    python bench/bench_primes.py [--end 1e9] [--rounds 3]

In one run, the baselines interleaved with the measured commands:

a. ``fab primes --start 1 --end 1000000000 --db TMP/x.db --fresh --quiet`` (the
   shipped hosts.ini: ``address = local``, 2 slots = this machine's 2 cores),
   wall time of the whole command, against ``primesieve 1e9 -t1 -p > /dev/null``
   (one thread). Target: at most 1.5x (stretch 1.0x).
b. ``fab primes ... --export FILE --quiet`` on the run (a) completed: the
   command finds the run complete and only exports (wall time of the whole
   command, start-up included), against ``primesieve 1e9 -t1 -p > FILE``.
   Target: at most 3x. The exported file must have 50,847,534 lines, first 2,
   last 999,999,937, and be byte-identical to primesieve's.
c. Peak RSS of the coordinator (the fab process itself: VmHWM from
   /proc/PID/status, polled every 20 ms) for 1..10^8, 1..10^9 and 1..2*10^9,
   and of the largest process in its tree (ru_maxrss of the reaped child).
   Target: flat as E grows, at most 200 MB for 1..10^9.
d. What results cost the coordinator's memory: peak RSS of a process that
   validates (json.loads + PrimesJob.check, as a HostLink reader thread does)
   the largest list-mode block of 1..10^9 (max_block(): ~4M primes), in 1 and
   in 3 threads at once, as the reader threads of 3 SSH hosts can. The local
   default has one reader, so (c) sees only the first case.

Each of (a) and (b) runs ``--rounds`` times (default 3), each time right after
its baseline; the ratio is the median of the per-round ratios (a pair shares the
machine's load of the moment), the seconds are medians too. Also printed: the
fixed cost of a ``fab primes`` (start-up, agent, store) on 1..1000. Takes about a minute (needs ~1.5 GB in the temp
folder). Absolute times on shared machines vary by 2x: quote the ratios.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peak import run_with_peak  # noqa: E402
from tabulate import tabulate  # noqa: E402

from harness import fab_argv, fab_env  # noqa: E402

# pi(E) and the largest prime <= E for the ranges the checks know.
PI = {10**7: 664_579, 10**8: 5_761_455, 10**9: 50_847_534, 2 * 10**9: 98_222_287}
LAST_PRIME = {10**7: 9_999_991, 10**8: 99_999_989, 10**9: 999_999_937}


def run_fab(args: list[str], cwd: Path) -> tuple[float, int, int, str]:
    """Run fab on this repo: (wall seconds, fab's own peak RSS kB, largest in its tree kB, stdout)."""
    seconds, own, largest, code, stdout, stderr = run_with_peak(fab_argv(args), cwd, fab_env())
    if code != 0:
        raise SystemExit(f"fab {' '.join(args)} failed ({code}):\n{stdout}\n{stderr}")
    return seconds, own, largest, stdout


def primesieve(end: int, target: str) -> float:
    """Wall seconds of ``primesieve END -t1 -p > target``."""
    with open(target, "wb") as handle:
        began = time.perf_counter()
        subprocess.run(["primesieve", str(end), "-t1", "-p"], stdout=handle, check=True)
        return time.perf_counter() - began


def check_export(path: Path, end: int) -> str:
    """Line count, first and last line of the exported file; raise if they are wrong."""
    lines = int(subprocess.run(["wc", "-l", str(path)], capture_output=True, text=True,
                               check=True).stdout.split()[0])
    with open(path, "rb") as handle:
        first = handle.readline().strip().decode()
        handle.seek(max(0, path.stat().st_size - 64))
        last = handle.read().splitlines()[-1].decode()
    summary = f"{lines:,} lines, first {first}, last {last}"
    if end in LAST_PRIME and (lines, first, last) != (PI[end], "2", str(LAST_PRIME[end])):
        raise SystemExit(f"export is wrong: {summary}")
    return summary


def fab_primes(end: int, db: Path, cwd: Path, *extra: str) -> tuple[float, int, int, str]:
    """``fab primes --start 1 --end END --db DB --quiet EXTRA``; check the count it prints."""
    result = run_fab(["primes", "--start", "1", "--end", str(end), "--db", str(db), "--quiet", *extra], cwd)
    found = re.search(r"([\d,]+) primes in", result[3])
    if end in PI and (not found or int(found.group(1).replace(",", "")) != PI[end]):
        raise SystemExit(f"wrong count for 1..{end}:\n{result[3]}")
    return result


def validate_peak(threads: int) -> None:
    """Part d, in its own process: print RSS kB before and at the peak of ``threads`` concurrent validations."""
    import json
    import resource
    import threading

    from client import primes as client_primes
    from cluster.jobs.primes import PrimesJob

    job = PrimesJob(1, 10**9)
    width = job.max_block()
    line = json.dumps({"type": "result", "id": 1, "ok": True, "elapsed": 1.0,
                       "result": client_primes.run({"lo": 1, "hi": width, "mode": "list"})})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    barrier = threading.Barrier(threads)

    def reader() -> None:
        for _ in range(3):
            barrier.wait()
            job.check(1, width, json.loads(line)["result"])

    pool = [threading.Thread(target=reader) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--end", default="1e9", help="E of the main range 1..E (default 1e9)")
    parser.add_argument("--small-end", default="1e8", help="E of a smaller RSS range (default 1e8; 0: skip)")
    parser.add_argument("--big-end", default="2e9", help="E of a larger RSS range (default 2e9; 0: skip)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--validate-peak", type=int, help=argparse.SUPPRESS)  # internal: part d in a child
    args = parser.parse_args()
    if args.validate_peak:
        return validate_peak(args.validate_peak)
    end, small_end, big_end = (int(float(x)) for x in (args.end, args.small_end, args.big_end))
    if not shutil.which("primesieve"):
        raise SystemExit("needs the primesieve command (apt install primesieve)")

    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        db = base / "x.db"
        export_file, baseline_file = base / "primes.txt", base / "primesieve.txt"

        # Warm-up: imports, page cache, the local workdir.
        fab_primes(10**7, base / "warm.db", base, "--fresh")
        primesieve(10**8, os.devnull)

        computes, sieves, rss = [], [], {}
        for _ in range(args.rounds):
            sieves.append(primesieve(end, os.devnull))
            seconds, own, tree, _out = fab_primes(end, db, base, "--fresh")
            computes.append(seconds)
            rss[end] = max(rss.get(end, (0, 0)), (own, tree))

        exports, sieve_files = [], []
        for _ in range(args.rounds):
            sieve_files.append(primesieve(end, str(baseline_file)))
            seconds, _own, _tree, out = fab_primes(end, db, base, "--export", str(export_file))
            if "already complete" not in out:
                raise SystemExit(f"the export run computed something:\n{out}")
            exports.append(seconds)
        summary = check_export(export_file, end)
        if not filecmp.cmp(export_file, baseline_file, shallow=False):
            raise SystemExit(f"{export_file} differs from primesieve's output")
        db_mb = db.stat().st_size / 1e6
        export_file.unlink()
        baseline_file.unlink()

        fixed = statistics.median(fab_primes(1000, base / "fixed.db", base, "--fresh")[0] for _ in range(3))
        for other in (small_end, big_end):
            if other:
                own, tree = fab_primes(other, base / f"rss{other}.db", base, "--fresh")[1:3]
                rss[other] = (own, tree)

    peaks = {}
    for threads in (1, 3):
        done = subprocess.run([sys.executable, __file__, "--validate-peak", str(threads)], capture_output=True,
                              text=True, check=True)
        peaks[threads] = [int(x) for x in done.stdout.split()]

    med = statistics.median

    def row(label: str, runs: list, baseline: str, bases: list, target: float, note: str = "") -> list:
        ratio = med(r / b for r, b in zip(runs, bases))
        return [label, f"{med(runs):.2f}", baseline, f"{med(bases):.2f}",
                f"{ratio:.2f}x", f"<= {target:g}x{note}", "met" if ratio <= target else "MISSED"]

    rows = [
        row(f"a. fab primes 1..{end:.0e}, local default (2 slots)", computes,
            f"primesieve {end:.0e} -t1 -p > /dev/null", sieves, 1.5, " (stretch 1.0x)"),
        row("b. fab primes ... --export FILE (run complete)", exports, f"primesieve {end:.0e} -t1 -p > FILE",
            sieve_files, 3),
    ]
    print(tabulate(rows, headers=["measured", "wall s", "baseline", "wall s", "ratio", "target", ""]))
    print(f"ratio per round: compute {', '.join(f'{c / s:.2f}x' for c, s in zip(computes, sieves))}; "
          f"export {', '.join(f'{e / s:.2f}x' for e, s in zip(exports, sieve_files))} (median above)")
    print(f"export: {summary}, identical to primesieve's output; store {db_mb:.0f} MB")
    print(f"fixed cost of fab primes (1..1000: start-up, agent, store): {fixed:.2f} s = "
          f"{fixed / med(sieves):.2f}x of the baseline of (a)")
    print()
    rss_rows = [[f"1..{e:.0e}", f"{own / 1024:.0f}", f"{tree / 1024:.0f}"] for e, (own, tree) in sorted(rss.items())]
    print(tabulate(rss_rows, headers=["c. range", "coordinator (fab) peak RSS MB", "largest in tree MB"]))
    own_end = rss[end][0]
    line = (f"coordinator peak RSS for 1..{end:.0e}: {own_end / 1024:.0f} MB: target <= 200 MB "
            f"{'met' if own_end <= 200 * 1024 else 'MISSED'}")
    if big_end:
        line += (f"; 1..{big_end:.0e} / 1..{end:.0e} = {rss[big_end][0] / own_end:.2f}x (smaller ranges never reach "
                 "the largest blocks)")
    print(line)
    print()
    width = peaks[1][2]
    print(tabulate([[threads, f"{before / 1024:.0f}", f"{after / 1024:.0f}", f"{(after - before) / 1024:.0f}"]
                    for threads, (before, after, _) in peaks.items()],
                   headers=[f"d. blocks [1, {width:,}] validated at once", "RSS before MB", "peak RSS MB",
                            "added MB"]))


if __name__ == "__main__":
    main()
