"""Old hosts: `fab primes 1..1e9` on a Python 3.6 sshd host and on a Python 3.11 sshd host, side by side.

    python bench/bench_old_hosts.py [--end 1e9] [--rounds 3] [--engines setup,numpy] [--count-only]

Two sshd hosts of the test harness (127.0.0.2, 127.0.0.3) whose inventory ``python``
is pyenv's real CPython 3.6 and 3.11. One ``fab setup`` (numpy allowed) gives each
the engine setup picks for it: the 3.6 host gets numpy 1.19.5 (cp36m, manylinux2010)
shipped from this coordinator, the 3.11 host the newest numpy; with libprimesieve on
the machine both then run the ``primesieve`` engine (ctypes), else ``numpy``.

Then, ``--rounds`` times, ``fab primes --start 1 --end END --hosts H --quiet`` on a new
store for each host in turn (the order alternates by round), one host at a time so
each has the whole machine (2 cores, 2 slots). The figure is the run's own wall time
(the summary's "numbers in X s", from the first agent up to the last block stored),
and the whole command's. The ratio is the median over rounds of (3.6 time / 3.11
time) of the same round: target at most 1.3x.

``--engines`` also runs the same with an engine forced on both hosts through the
inventory's ``python`` (a wrapper setting BEOWULF_PRIMES_ENGINE): ``numpy`` compares
the numpy engines (numpy 1.19.5 on 3.6 against numpy 2.x on 3.11), ``python`` the
pure-Python sieve (what both old hosts ran before issue 11; slow: ~1 min a run).

The machine is shared: the 1-minute load average is printed before every round.
Needs root, /usr/sbin/sshd, pyenv's 3.6 and 3.11, PyPI for the first setup.
Takes ~2-3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from harness import SshCluster, run_fab  # noqa: E402
from harness.sshd import pyenv_python  # noqa: E402

PI = {10**8: 5_761_455, 10**9: 50_847_534, 2 * 10**9: 98_222_287}
HOSTS = {"h1": "3.6", "h2": "3.11"}
SUMMARY = re.compile(r"([\d,]+) numbers in ([\d.]+)s wall time")


def engine_wrapper(folder: Path, name: str, python: str, engine: str) -> Path:
    """An interpreter for the inventory that forces the primes engine on that host."""
    path = folder / f"python-{name}-{engine}"
    path.write_text(f'#!/bin/sh\nBEOWULF_PRIMES_ENGINE={engine} exec {python} "$@"\n')
    path.chmod(0o755)
    return path


def table_engine(stdout: str, host: str) -> str:
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == host and len(parts) > 3:
            return parts[3]
    return "?"


def one_run(inventory: Path, config: Path, host: str, end: int, count_only: bool, folder: Path) -> dict:
    db = folder / f"r-{host}-{time.monotonic_ns()}.db"
    argv = ["primes", "--inventory", inventory, "--hosts", host, "--start", 1, "--end", end, "--db", db]
    if count_only:
        argv.append("--count-only")
    began = time.monotonic()
    done = run_fab(argv, config=config, timeout=1800)
    command = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"fab primes on {host} failed:\n{done.stdout}\n{done.stderr}")
    found = [line for line in done.stdout.splitlines() if " primes in [" in line]
    count = int(found[-1].split()[0].replace(",", ""))
    if end in PI and count != PI[end]:
        raise SystemExit(f"{host}: {count} primes, expected {PI[end]}")
    match = SUMMARY.search(done.stdout)
    for path in folder.glob(db.name + "*"):
        path.unlink()
    return {"run": float(match.group(2)) if match else command, "command": command,
            "engine": table_engine(done.stdout, host)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--end", type=float, default=1e9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="setup",
                        help="comma-separated: setup (what fab setup gives), numpy, python")
    parser.add_argument("--count-only", action="store_true")
    opts = parser.parse_args()
    end = int(opts.end)
    pythons = {name: pyenv_python(version) for name, version in HOSTS.items()}
    missing = [HOSTS[name] for name, python in pythons.items() if python is None]
    if missing:
        raise SystemExit(f"needs pyenv's CPython {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="bench-old-") as tmp:
        folder = Path(tmp)
        with SshCluster(folder / "cluster", 2, pythons=pythons) as cluster:
            config = cluster.write_fabric_config(folder / "fabric.yaml")
            inventory = cluster.write_inventory(folder / "hosts.ini")
            setup = run_fab(["setup", "--inventory", inventory], config=config, timeout=900)
            print(setup.stdout)
            if setup.returncode != 0:
                raise SystemExit(setup.stderr)
            rows = []
            for engine in opts.engines.split(","):
                if engine == "setup":
                    inv = inventory
                else:
                    cluster.pythons = {name: engine_wrapper(folder, name, str(python), engine)
                                       for name, python in pythons.items()}
                    inv = cluster.write_inventory(folder / f"hosts-{engine}.ini")
                    cluster.pythons = dict(pythons)
                results = {name: [] for name in HOSTS}
                loads = []
                for round_ in range(opts.rounds):
                    loads.append(os.getloadavg()[0])
                    order = list(HOSTS) if round_ % 2 == 0 else list(reversed(HOSTS))
                    for name in order:
                        results[name].append(one_run(inv, config, name, end, opts.count_only, folder))
                        print(f"{engine} round {round_ + 1} {name} (Python {HOSTS[name]}): "
                              f"{results[name][-1]['run']:.1f}s run, {results[name][-1]['command']:.1f}s command, "
                              f"engine {results[name][-1]['engine']}, load {loads[-1]:.2f}", flush=True)
                ratios = [old["run"] / new["run"] for old, new in zip(results["h1"], results["h2"])]
                command_ratios = [old["command"] / new["command"] for old, new in zip(results["h1"], results["h2"])]
                for name in HOSTS:
                    runs = results[name]
                    rows.append([engine, f"{HOSTS[name]}", ",".join(sorted({r['engine'] for r in runs})),
                                 f"{statistics.median(r['run'] for r in runs):.1f}",
                                 f"{statistics.median(r['command'] for r in runs):.1f}",
                                 f"{end / statistics.median(r['run'] for r in runs):,.0f}",
                                 f"{statistics.median(ratios):.2f}x" if name == "h1" else "",
                                 f"{statistics.median(command_ratios):.2f}x" if name == "h1" else "",
                                 " ".join(f"{x:.2f}" for x in loads) if name == "h1" else ""])
    mode = "count-only" if opts.count_only else "list"
    print(f"\nfab primes 1..{end:.0e} ({mode}), one host at a time, medians of {opts.rounds} rounds")
    print(tabulate(rows, headers=["engines", "python", "engine", "run s", "command s", "numbers/s",
                                  "3.6/3.11 run", "3.6/3.11 command", "load (1 min) per round"]))


if __name__ == "__main__":
    main()
