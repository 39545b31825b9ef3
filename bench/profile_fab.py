"""Run one ``fab`` command of this checkout in this process under cProfile, every thread, CPU time.

    python bench/profile_fab.py [--top 30] [--sort tottime] [--out FILE.prof] -- FAB ARGS...

The coordinator works in several threads (main loop, one reader per host link, the
store's writer, Paramiko's transports): each thread started during the run gets its
own profiler timed with ``time.thread_time`` (as bench_dispatch.py --profile does),
and the report merges them, sorted by own time. Agents and their workers are other
processes: they are not in the profile. Prints the fab command's exit code, its CPU
time and wall time, then the top functions. Many small calls look bigger under
cProfile than they are: compare the wall time with an unprofiled run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=30, help="functions shown (default 30)")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    parser.add_argument("--out", help="also dump the merged stats to this file (pstats format)")
    parser.add_argument("fab_args", nargs=argparse.REMAINDER, help="-- then fab's arguments")
    args = parser.parse_args()
    fab_args = args.fab_args[1:] if args.fab_args[:1] == ["--"] else args.fab_args
    if not fab_args:
        parser.error("give fab's arguments after --")

    from fabric.main import program

    profilers: list[cProfile.Profile] = []
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def profiled_bootstrap(thread):
        profiler = cProfile.Profile(timer=time.thread_time)
        profilers.append(profiler)
        profiler.runcall(bootstrap, thread)

    threading.Thread._bootstrap_inner = profiled_bootstrap  # type: ignore[attr-defined]
    main_profiler = cProfile.Profile(timer=time.thread_time)
    code = 0
    began, cpu = time.perf_counter(), time.process_time()
    main_profiler.enable()
    try:
        program.run(["fab", "-r", str(ROOT), *fab_args], exit=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        main_profiler.disable()
        threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    time.sleep(1.0)  # let the links' closing threads finish
    text = io.StringIO()
    stats = pstats.Stats(main_profiler, stream=text)
    for profiler in profilers:
        try:
            stats.add(profiler)
        except TypeError:  # a thread still running has no stats yet
            pass
    if args.out:
        stats.dump_stats(args.out)
    stats.sort_stats(args.sort).print_stats(args.top)
    sys.stdout.flush()
    print(f"fab exit {code}, wall {wall:.2f} s, CPU of this process {cpu:.2f} s (profiled: both inflated)")
    print(text.getvalue())


if __name__ == "__main__":
    main()
