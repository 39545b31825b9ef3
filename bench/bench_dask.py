"""The Dask engine against beowulf's own: per-block overhead, and fab primes 1..1e9 end to end.

    python bench/bench_dask.py [--blocks 2000] [--repeats 3] [--end 1e9] [--items 20000]
                               [--skip-overhead] [--skip-primes] [--skip-map]

a. Per-block overhead (trivial blocks): a TrivialJob of BLOCKS one-item ``noop`` blocks run by
   cluster.coordinator.Coordinator in this process (bench_dispatch.py's TimedCoordinator: timed
   from every host up to the last block committed, divided by BLOCKS), on
   - the SSH engine: one loopback sshd host of tests/harness with 2 slots (the reference);
   - the Dask engine: a real ``dask scheduler`` and one ``dask worker --nthreads 2``
     (tests/harness/dask.py), the same 2 slots;
   - for scale, a ``local`` host (beowulf's agent over pipes, no SSH) with 2 slots.
   Best of REPEATS each, interleaved. The figure is the ratio Dask / SSH.
b. ``fab primes --start 1 --end 1e9`` as a whole command (wall time, store in a fresh temporary
   folder each time): ``--engine dask`` with the embedded LocalCluster against the shipped
   default inventory (this computer, one agent worker per core). Interleaved, REPEATS each,
   medians. Target (issue 13): dask <= 1.2x local.
c. ``fab map --function benchfn.py:square --range 1:ITEMS --engine dask --scheduler ADDRESS``
   against plain ``client.gather(client.map(square, range(1, ITEMS + 1)))`` on the same, already
   running cluster (a ``dask scheduler`` and two ``dask worker --nthreads 1``, tests/harness/dask.py;
   the client connected and warmed up beforehand, not charged). fab map per item both marginal,
   (T(ITEMS) - T(ITEMS/10)) / (0.9 ITEMS) as bench_map.py's (1), and whole command, T(ITEMS) / ITEMS
   (Python, Fabric, the connection to the scheduler, shipping, the child workers' start included);
   client.map per item over ITEMS. Interleaved, REPEATS each, medians. Target (issue 13): >= 50x.

Needs root, /usr/sbin/sshd (tests/system-deps.sh) for (a). Absolute times on a shared machine
vary by 2x: quote the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_dispatch import TimedCoordinator  # noqa: E402
from tabulate import tabulate  # noqa: E402

from cluster.inventory import Host, load_inventory  # noqa: E402
from cluster.jobs.trivial import TrivialJob  # noqa: E402
from harness import SshCluster, fab_argv, fab_env, load_fabric_config, run_fab  # noqa: E402
from harness.dask import DaskCluster  # noqa: E402

SLOTS = 2


def per_block(blocks: int, hosts, config, db: Path, engine=None) -> float:
    """Seconds per trivial block with every host up (TimedCoordinator); ``engine``: a DaskEngine."""
    kwargs = {"link_factory": engine.link_factory} if engine is not None else {}
    coordinator = TimedCoordinator(TrivialJob(blocks, "noop"), hosts, config, str(db), fresh=True, **kwargs)
    if engine is not None:
        engine.watch(coordinator)
    outcome = coordinator.run()
    finished = time.perf_counter()
    if outcome.items_total != blocks:
        raise SystemExit(f"ran {outcome.items_total} of {blocks} blocks")
    return (finished - coordinator.agents_up) / blocks


def overhead(blocks: int, repeats: int, base: Path) -> list:
    from cluster.engines.dask import DaskEngine

    cluster = SshCluster(base / "ssh", 1)
    with cluster, DaskCluster(base / "dask") as dask_cluster:
        inventory = cluster.write_inventory(base / "hosts.ini", extra={h.name: {"slots": SLOTS} for h in cluster.hosts})
        config_path = cluster.write_fabric_config(base / "fabric.yaml")
        done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config_path, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"fab setup failed:\n{done.stdout}\n{done.stderr}")
        ssh_hosts = load_inventory(inventory)
        config = load_fabric_config(config_path)
        local = [Host(name="local", address="local", slots=SLOTS)]
        dask_cluster.add_worker("w1", threads=SLOTS)
        engine = DaskEngine(dask_cluster.address).start()
        try:
            per_block(100, engine.hosts(), config, base / "warm.db", engine)
            runs: dict[str, list] = {"ssh": [], "dask": [], "local": []}
            for attempt in range(repeats):
                runs["ssh"].append(per_block(blocks, ssh_hosts, config, base / f"s{attempt}.db"))
                engine.refresh()
                runs["dask"].append(per_block(blocks, engine.hosts(), config, base / f"d{attempt}.db", engine))
                runs["local"].append(per_block(blocks, local, config, base / f"l{attempt}.db"))
        finally:
            engine.close()
    best = {name: min(values) for name, values in runs.items()}
    rows = [[name, f"{best[name] * 1e3:.2f} ms", ", ".join(f"{v * 1e3:.2f}" for v in runs[name]),
             f"{best[name] / best['ssh']:.2f}x"] for name in ("ssh", "dask", "local")]
    print(tabulate(rows, headers=["engine (2 slots)", "per block, best", "all runs (ms)", "vs ssh"]))
    return rows


def fab_seconds(args: list, cwd: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run(fab_argv(args), cwd=str(cwd), env=fab_env(), capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"fab {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def primes(end: str, repeats: int, base: Path) -> list:
    times: dict[str, list] = {"local default": [], "dask LocalCluster": []}
    for attempt in range(repeats):
        for name, extra in (("local default", []), ("dask LocalCluster", ["--engine", "dask"])):
            folder = base / f"p{attempt}-{len(extra)}"
            folder.mkdir()
            times[name].append(fab_seconds(["primes", "--start", "1", "--end", end, "--db", folder / "r.db",
                                             "--quiet", *extra], folder))
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [[name, f"{median[name]:.2f} s", ", ".join(f"{v:.2f}" for v in times[name]),
             f"{median[name] / median['local default']:.2f}x"] for name in times]
    print(tabulate(rows, headers=[f"fab primes 1..{end}", "median", "all runs (s)", "vs local"]))
    return rows


def square(x):
    return x * x


BENCHFN = "def square(x):\n    return x * x\n"


def map_vs_client_map(items: int, repeats: int, base: Path) -> list:
    from distributed import Client

    folder = base / "map"
    folder.mkdir()
    (folder / "benchfn.py").write_text(BENCHFN)
    small = max(1, items // 10)
    times: dict[str, list] = {"fab map": [], "fab map small": [], "client.map": []}
    with DaskCluster(base / "dask-map") as cluster:
        cluster.add_worker("w1", threads=1, wait=False)
        cluster.add_worker("w2", threads=1, wait=False)
        for name in ("w1", "w2"):
            cluster.wait_for(name)

        def fab_map(count: int, attempt: int) -> float:
            return fab_seconds(["map", "--function", "benchfn.py:square", "--range", f"1:{count}", "--engine", "dask",
                                "--scheduler", cluster.address, "--db", folder / f"m{count}-{attempt}.db", "--fresh",
                                "--quiet"], folder)

        fab_map(small, -1)  # warm: the shipped function and the bundle on the workers, byte code
        with Client(cluster.address, set_as_default=False) as client:
            client.gather(client.map(square, range(1, 101)))  # warm: the function and the connections
            for attempt in range(repeats):
                times["fab map"].append(fab_map(items, attempt))
                times["fab map small"].append(fab_map(small, attempt))
                began = time.perf_counter()
                values = client.gather(client.map(square, range(1, items + 1)))
                times["client.map"].append(time.perf_counter() - began)
                if values[-1] != items * items or len(values) != items:
                    raise SystemExit("client.map returned the wrong values")
    median = {name: statistics.median(values) for name, values in times.items()}
    marginal = (median["fab map"] - median["fab map small"]) / (items - small)
    whole = median["fab map"] / items
    plain = median["client.map"] / items
    rows = [
        [f"client.map + gather, {items:,} items", f"{plain * 1e6:.1f} us",
         ", ".join(f"{v:.2f}" for v in times["client.map"]), ""],
        [f"fab map --engine dask, {items:,} items, whole command", f"{whole * 1e6:.1f} us",
         ", ".join(f"{v:.2f}" for v in times["fab map"]), f"{plain / whole:.0f}x"],
        [f"fab map --engine dask, {small:,} items, whole command", f"{median['fab map small'] / small * 1e6:.1f} us",
         ", ".join(f"{v:.2f}" for v in times["fab map small"]), ""],
        ["fab map --engine dask, marginal (T(N) - T(N/10)) / 0.9N", f"{marginal * 1e6:.1f} us", "",
         f"{plain / marginal:.0f}x" if marginal > 0 else "inf"],
    ]
    print(tabulate(rows, headers=["same cluster (2 workers x 1 thread)", "per item", "all runs (s)",
                                  "client.map / fab map"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end", default="1e9")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-primes", action="store_true")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--skip-map", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        if not args.skip_overhead:
            overhead(args.blocks, args.repeats, base)
            print()
        if not args.skip_primes:
            primes(args.end, args.repeats, base)
            print()
        if not args.skip_map:
            map_vs_client_map(args.items, args.repeats, base)


if __name__ == "__main__":
    main()
