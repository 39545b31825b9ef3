"""`fab primes --count-only` end to end against `primesieve N -c` (all cores), side by side.

    python bench/bench_count.py [--end 1e11] [--rounds 3] [--no-kernel | --kernel-only]

1. The whole command ``fab primes --start 1 --end N --count-only --db TMP/c.db
   --fresh --quiet`` on the shipped default inventory (``address = local``: this
   machine, one slot per core), wall time from start to exit (start-up, agent,
   store, checks included), against ``primesieve N -c`` (all cores: its
   default). Target: at most 1.2x at N = 1e11. The two run interleaved, ``--rounds``
   pairs, alternating which goes first; the ratio is the median of the per-pair
   ratios (a pair shares the machine's load of the moment). The load average
   is printed beside each pair. The count is checked against pi(N).
2. The counting kernel, one thread (libprimesieve through client/primes.py, as
   a worker calls it), near N: nanoseconds per number of one call over a block
   of 10^10 against the same block cut into parts (what a count-mode block
   costs the host: one call per part, cluster/jobs/primes.py count_parts) and
   against calls of 10^7..10^9 (what smaller blocks cost); the coordinator's
   recount of one part; twin-prime counting (``primesieve_count_twins``) and
   generating the primes to sum them (the old count mode) over the same 10^9
   numbers, against counting them.

Takes about 2 minutes at 1e11 with 3 rounds on 2 cores. Absolute times on a
shared machine vary by 2x: quote the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import fab_argv, fab_env  # noqa: E402

PI = {10**9: 50_847_534, 10**10: 455_052_511, 10**11: 4_118_054_813, 2 * 10**10: 882_206_716,
      10**12: 37_607_912_018}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int, seen: dict) -> None:
    """Record in ``seen`` (pid -> CPU seconds) every process descended from ``root``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    for pid, (ppid, cpu) in parents.items():
        chain, up = pid, ppid
        while chain != root and up in parents:
            chain, up = up, parents[up][0]
        if chain == root:
            seen[pid] = max(seen.get(pid, 0.0), cpu)


def timed(argv: list, cwd: Path, env=None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and all its descendants, stdout). A tree's
    CPU is polled every 50 ms from /proc: a process's last <50 ms before it exits is missed
    (an under-estimate); a single process's is exact (its rusage)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        seen: dict = {}
        while proc.poll() is None:
            tree_cpu(proc.pid, seen)
            time.sleep(0.05)
        seconds = time.perf_counter() - began
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{stdout}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not seen or set(seen) == {proc.pid}:  # one process (primesieve): exact, from its rusage
        return seconds, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime), stdout
    return seconds, sum(seen.values()), stdout


def primesieve_count(end: int, cwd: Path) -> tuple[float, float]:
    seconds, cpu, out = timed(["primesieve", str(end), "-c", "--no-status"], cwd)
    found = re.search(r"Primes: (\d+)", out)
    if end in PI and (not found or int(found.group(1)) != PI[end]):
        raise SystemExit(f"primesieve says {out!r}")
    return seconds, cpu


BLOCK_SECONDS = ["--block-seconds", "2"]


def fab_count(end: int, db: Path, cwd: Path) -> tuple[float, float]:
    argv = fab_argv(["primes", "--start", "1", "--end", str(end), "--count-only", "--db", str(db), "--fresh",
                     "--quiet", *BLOCK_SECONDS])
    seconds, cpu, out = timed(argv, cwd, fab_env())
    found = re.search(r"([\d,]+) primes in", out)
    if not found or (end in PI and int(found.group(1).replace(",", "")) != PI[end]):
        raise SystemExit(f"wrong count for 1..{end}:\n{out}")
    return seconds, cpu


def blocks_of(db: Path) -> str:
    """How the last run was cut: blocks, median width, widest."""
    from cluster.store import Store

    with Store.open_readonly(db) as store:
        run_id = store.runs()[-1]["id"]
        widths = [b["hi"] - b["lo"] + 1 for b in store.blocks(run_id)]
    return f"{len(widths)} blocks, median {statistics.median(widths):.2e}, widest {max(widths):.2e} numbers"


def end_to_end(end: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        shutil.copy(ROOT / "hosts.ini", base / "hosts.ini")  # the shipped default: this computer
        db = base / "c.db"
        fab_count(10**9, base / "warm.db", base)  # warm-up: imports, page cache, the local workdir
        primesieve_count(10**9, base)
        pairs = []
        for r in range(rounds):
            before = load()
            if r % 2 == 0:
                sieve = primesieve_count(end, base)
                ours = fab_count(end, db, base)
            else:
                ours = fab_count(end, db, base)
                sieve = primesieve_count(end, base)
            pairs.append((ours, sieve, before, load()))
        cut = blocks_of(db)
        fixed = statistics.median(fab_count(1000, base / "fixed.db", base)[0] for _ in range(3))
    print(f"1. fab primes --start 1 --end {end:.0e} --count-only --block-seconds {BLOCK_SECONDS[1]} (local "
          f"default, {os.cpu_count()} cores) against primesieve {end:.0e} -c (all cores)")
    print(f"{'round':>5}  {'fab s':>7}  {'primesieve s':>12}  {'ratio':>6}  {'fab cpu':>8}  {'ps cpu':>7}  "
          f"{'ratio':>6}  load before -> after (1/5/15 min)")
    for i, ((ours, ours_cpu), (sieve, sieve_cpu), before, after) in enumerate(pairs, 1):
        print(f"{i:>5}  {ours:7.2f}  {sieve:12.2f}  {ours / sieve:5.2f}x  {ours_cpu:8.2f}  {sieve_cpu:7.2f}  "
              f"{ours_cpu / sieve_cpu:5.2f}x  {before} -> {after}")
    ratio = statistics.median(o[0] / s[0] for o, s, _, _ in pairs)
    cpu_ratio = statistics.median(o[1] / s[1] for o, s, _, _ in pairs)
    print(f"median wall ratio {ratio:.2f}x (target <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'}); median CPU "
          f"ratio {cpu_ratio:.2f}x (CPU seconds of fab and everything it started, against primesieve's: steadier "
          f"under load, blind to idle cores)")
    print(f"the last run: {cut}; fixed cost of a count-only fab primes on 1..1000: {fixed:.2f} s")


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def kernel(end: int) -> None:
    from client import primes as client_primes
    from cluster.jobs.primes import count_parts, part_bounds, recount

    lib = client_primes._PRIMESIEVE
    if lib is None:
        print("2. no libprimesieve here: kernel figures skipped")
        return
    lo = max(1, end - 10**10)
    width = 10**10
    parts = count_parts(lo, lo + width - 1)
    one = cut = float("inf")
    for _ in range(3):  # interleaved: a pair shares the load of the moment
        one = min(one, best(lambda: lib.count(lo, lo + width - 1), 1))
        cut = min(cut, best(lambda: client_primes.run(
            {"lo": lo, "hi": lo + width - 1, "mode": "count", "parts": parts}, "primesieve"), 1))
    a, b = part_bounds(lo, lo + width - 1, parts)[0]
    again = best(lambda: recount(a, b))
    print(f"2. counting kernel, 1 thread, near {end:.0e}, ns per number (lower is faster)")
    print(f"   one call over 1e10 numbers:               {one / width * 1e9:.3f}")
    print(f"   the same as a count-mode block ({parts} parts): {cut / width * 1e9:.3f}  "
          f"({cut / one:.3f}x; first/last included)")
    for w in (10**7, 10**8, 10**9):
        calls = min(100, 10**10 // w)
        t = best(lambda w=w, calls=calls: [lib.count(lo + i * w, lo + (i + 1) * w - 1) for i in range(calls)], 2)
        print(f"   calls of {w:.0e} numbers:                   {t / (calls * w) * 1e9:.3f}")
    print(f"   coordinator's recount of one part ({b - a + 1:.2e} numbers): {again * 1e3:.1f} ms = "
          f"{again / cut:.3f} of the block's time")
    span = 10**9
    count = best(lambda: lib.count(lo, lo + span - 1))
    extra = []
    try:
        clib = ctypes.CDLL(ctypes.util.find_library("primesieve"))
        twins_fn = clib.primesieve_count_twins
        twins_fn.restype = ctypes.c_uint64
        twins_fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        twins = best(lambda: twins_fn(lo, lo + span - 1))
        extra.append(f"twin primes {twins / count:.2f}x (both figures: {(count + twins) / count:.2f}x)")
    except (OSError, AttributeError, TypeError):
        extra.append("twin primes: no primesieve_count_twins here")
    if client_primes._numpy() is not None:
        gen = best(lambda: sum(int(lib.primes_np(x, min(lo + span, x + client_primes.PS_CHUNK) - 1).sum())
                               for x in range(lo, lo + span, client_primes.PS_CHUNK)))
        extra.append(f"generate and sum (the old count mode) {gen / count:.2f}x")
    print(f"   over 1e9 numbers, against counting them ({count * 1e3:.0f} ms): " + "; ".join(extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--end", default="1e11", help="N of the range 1..N (default 1e11)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--no-kernel", action="store_true", help="skip part 2")
    parser.add_argument("--kernel-only", action="store_true", help="skip part 1")
    parser.add_argument("--block-seconds", default="2", help="fab primes --block-seconds (default 2, fab's own)")
    args = parser.parse_args()
    BLOCK_SECONDS[1] = args.block_seconds
    end = int(float(args.end))
    if not shutil.which("primesieve"):
        raise SystemExit("needs the primesieve command (apt install primesieve)")
    if not args.kernel_only:
        end_to_end(end, args.rounds)
    if not args.no_kernel:
        kernel(end)


if __name__ == "__main__":
    import ctypes.util  # noqa: F401  (used by kernel())

    main()
