"""Sieve benchmarks, each a ratio against a named baseline measured in the same run.

1. stdlib engine (client/primes.py, engine "python") listing the primes of
   1..10^8, against the seed's trial-division client (bench/seed_client.py)
   timed on SEED_WINDOWS windows of 10,000 numbers spread evenly over 1..10^8
   and extrapolated per number (the whole range would take it many minutes).
2. numpy engine on 1..10^9 in blocks of 10^7, list mode with encoding, against
   ``primesieve 1e9 -t1 -p > /dev/null``: one process, and two worker
   processes (this machine's cores, as the local host's slots) while the parent
   checks every result with cluster.jobs.primes.validate, as the coordinator does.
3. write_text of the stored payloads of all primes < 10^9 to a file, against
   ``primesieve 1e9 -t1 -p > FILE``; the two files must be identical.

Run: ``python bench/bench_sieve.py`` (about a minute; best of ``--repeat 3``
for the baselines and our runs; ``--quick`` scales part 1 to 1..10^7 and
parts 2-3 to 1..10^8). Prints a table and exits 0. Absolute times on shared
machines vary by 2x between runs: quote the ratios.
"""

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import seed_client  # noqa: E402

from client import primes as client_primes  # noqa: E402
from cluster.jobs import primes as job_primes  # noqa: E402

# Windows of the seed's block size timed for the extrapolation in part 1.
SEED_WINDOWS = 20
# Block width in parts 2 and 3.
BLOCK = 10**7
# Known prime counts, to check each part's answer.
PI = {10**7: 664579, 10**8: 5761455, 10**9: 50847534}


def best_of(repeat, fn):
    """(best wall seconds, last return value) of ``repeat`` calls of fn."""
    best = float("inf")
    value = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def primesieve_print(stop, path):
    """Wall seconds of ``primesieve STOP -t1 -p > path``."""
    with open(path, "wb") as out:
        t0 = time.perf_counter()
        subprocess.run(["primesieve", str(stop), "-t1", "-p"], stdout=out, check=True)
        return time.perf_counter() - t0


def part1(stop):
    """stdlib engine on 1..stop vs the seed client extrapolated from windows."""
    t_py, res = best_of(1, lambda: client_primes.run({"lo": 1, "hi": stop, "mode": "list"}, engine="python"))
    assert res["count"] == PI[stop], res["count"]
    width = seed_client.SEED_BLOCK
    t0 = time.perf_counter()
    for k in range(SEED_WINDOWS):
        centre = (2 * k + 1) * stop // (2 * SEED_WINDOWS)
        seed_client.run_block(centre - width // 2, centre + width // 2 - 1)
    per_number = (time.perf_counter() - t0) / (SEED_WINDOWS * width)
    t_seed = per_number * stop
    return [
        (f"stdlib engine, 1..{stop:.0e}, list", t_py, "", ""),
        (
            f"seed trial division, {SEED_WINDOWS} x {width} numbers, per number x {stop:.0e}",
            t_seed,
            "seed / stdlib",
            f"{t_seed / t_py:.0f}x",
        ),
    ]


def _work(job):
    engine, lo, hi = job
    return lo, hi, client_primes.run({"lo": lo, "hi": hi, "mode": "list"}, engine=engine)


def blocks_of(stop):
    """(lo, hi) blocks of BLOCK numbers covering 1..stop."""
    return [(lo, min(stop, lo + BLOCK - 1)) for lo in range(1, stop + 1, BLOCK)]


def sieve_one_process(engine, stop, repeat):
    """Seconds (best of ``repeat``) for one process to sieve and encode 1..stop."""

    def go():
        total = 0
        for lo, hi in blocks_of(stop):
            total += _work((engine, lo, hi))[2]["count"]
        assert total == PI[stop], total

    return best_of(repeat, go)[0]


def sieve_pool(engine, stop, procs):
    """Seconds for ``procs`` worker processes to sieve 1..stop while this process
    validates each result; returns (seconds, [(lo, payload)] in order)."""
    jobs = [(engine, lo, hi) for lo, hi in blocks_of(stop)]
    with Pool(procs) as pool:
        pool.map(_work, [(engine, 1, 1000)] * procs)  # workers up and warm
        t0 = time.perf_counter()
        stored = []
        total = 0
        for lo, hi, result in pool.imap_unordered(_work, jobs):
            count, payload = job_primes.validate(lo, hi, result, "list")
            total += count
            stored.append((lo, payload))
        seconds = time.perf_counter() - t0
    assert total == PI[stop], total
    stored.sort()
    return seconds, stored


def part2(stop, folder, repeat):
    """numpy (and primesieve) engine on 1..stop vs primesieve -p > /dev/null."""
    t_base = min(primesieve_print(stop, os.devnull) for _ in range(repeat))
    rows = [(f"primesieve {stop:.0e} -t1 -p > /dev/null", t_base, "", "")]
    lo = 5 * 10**8
    for engine in [e for e in ("numpy", "primesieve") if e in client_primes.AVAILABLE]:
        t_block, _ = best_of(
            5 * repeat,
            lambda e=engine: client_primes.run({"lo": lo, "hi": lo + BLOCK - 1, "mode": "list"}, e),
        )
        rows.append((f"{engine} engine, one 1e7 block at 5e8, list+encode", t_block, "blocks/s", f"{1 / t_block:.0f}"))
    t1 = sieve_one_process("numpy", stop, repeat)
    rows.append(("numpy engine, 1 process, blocks of 1e7, list+encode", t1, "/ primesieve", f"{t1 / t_base:.2f}x"))
    procs = max(1, min(2, os.cpu_count() or 1))
    stored = None
    engines = ["numpy"] + (["primesieve"] if "primesieve" in client_primes.AVAILABLE else [])
    for engine in engines:
        t2 = float("inf")
        for _ in range(repeat):
            seconds, got = sieve_pool(engine, stop, procs)
            t2 = min(t2, seconds)
            stored = stored or got
        rows.append(
            (f"{engine} engine, {procs} processes + validate in parent", t2, "/ primesieve", f"{t2 / t_base:.2f}x")
        )
    return rows, stored


def part3(stop, stored, folder, repeat):
    """write_text of the stored payloads vs primesieve -p > FILE (same bytes)."""
    ours = os.path.join(folder, "ours.txt")
    theirs = os.path.join(folder, "primesieve.txt")

    def export():
        with open(ours, "wb") as out:
            return job_primes.write_text(iter(stored), out)

    t_base = min(primesieve_print(stop, theirs) for _ in range(repeat))
    t_ours, written = best_of(repeat, export)
    assert written == PI[stop], written
    same = filecmp.cmp(ours, theirs, shallow=False)
    size = os.path.getsize(ours)
    os.remove(ours)
    os.remove(theirs)
    return [
        (f"primesieve {stop:.0e} -t1 -p > FILE", t_base, "", ""),
        (
            f"write_text, {written} primes, {size // 10**6} MB, " + ("identical" if same else "DIFFERENT"),
            t_ours,
            "/ primesieve",
            f"{t_ours / t_base:.2f}x",
        ),
    ]


def print_table(rows):
    """rows: (what, seconds, ratio name, ratio) as a plain text table."""
    head = ("measurement", "seconds", "ratio", "")
    width = max(len(r[0]) for r in rows + [head])
    print(f"{head[0]:<{width}}  {head[1]:>8}  {head[2]:<14} {head[3]}")
    print("-" * (width + 34))
    for what, seconds, name, ratio in rows:
        print(f"{what:<{width}}  {seconds:8.3f}  {name:<14} {ratio}")


def main(argv=None):
    """Run the three benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller ranges (seconds, not a minute)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the fast runs")
    args = parser.parse_args(argv)
    if not shutil.which("primesieve"):
        print("primesieve (Debian package primesieve) is not installed: no baseline", file=sys.stderr)
        return 0
    stop1, stop2 = (10**7, 10**8) if args.quick else (10**8, 10**9)
    print(
        f"client engines available: {', '.join(client_primes.AVAILABLE)} "
        f"(default {client_primes.ENGINE}); {os.cpu_count() or 1} CPUs"
    )
    folder = tempfile.mkdtemp(prefix="beowulf-bench-")
    try:
        rows = part1(stop1)
        more, stored = part2(stop2, folder, args.repeat)
        rows += more
        rows += part3(stop2, stored, folder, args.repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
