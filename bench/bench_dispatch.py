"""Dispatch overhead per trivial block on 3 loopback sshd hosts: beowulf vs GNU parallel vs ssh per block.

    python bench/bench_dispatch.py [--blocks 5000] [--parallel-jobs 240] [--ssh-blocks 24] [--profile]

All three are measured in the same run against the same 3 sshd hosts (started by
tests/harness, provisioned with ``fab setup``):

a. beowulf: cluster.coordinator.Coordinator in this process running a TrivialJob
   of BLOCKS one-item blocks of the agent's built-in ``noop`` job, with the
   coordinator's normal pipelining (slots + 1 blocks in flight per host). Timed
   from the moment every agent has said hello to the moment the last block is
   committed to the store, divided by BLOCKS.
b. GNU parallel ``-S`` over a ControlMaster started beforehand for each host
   (``ssh -fN -o ControlMaster=yes``), ``true`` per job, as many jobs in flight
   per host as beowulf has (slots + 1). Per block = the difference between a run
   of JOBS jobs and one of JOBS_SMALL jobs, over the difference in jobs (so
   parallel's own start-up is not charged to it).
c. A new ``ssh`` process and connection per block running ``true`` (the 2015 seed
   did this, ``python client_primes.py ...`` instead of ``true``): once as a
   plain sequential loop and once like the seed, one thread per slot of every
   host. The ratio uses the concurrent (faster) figure.

Targets (issue 3): beowulf at least 50x faster per block than (b) and 500x than (c).
Needs root, /usr/sbin/sshd, ssh and GNU parallel (tests/system-deps.sh). Takes
about a minute. Absolute times on shared machines vary by 2x: quote the ratios.
``--profile`` runs (a) once more under cProfile (all threads) and prints the top
functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fabric import Config  # noqa: E402
from harness import SshCluster, run_fab  # noqa: E402
from tabulate import tabulate  # noqa: E402

from cluster.coordinator import Coordinator  # noqa: E402
from cluster.errors import JobError  # noqa: E402
from cluster.inventory import load_inventory  # noqa: E402
from cluster.jobs.trivial import TrivialJob  # noqa: E402

HOSTS = 3
SLOTS = 2  # per host, as in the inventory written below (the machine has 2 cores)


class TimedCoordinator(Coordinator):
    """A Coordinator that notes when every agent is up (hello received)."""

    agents_up = 0.0

    def _start_links(self, store) -> None:
        super()._start_links(store)
        self.agents_up = time.perf_counter()


def fabric_config(path: Path) -> Config:
    """The Fabric config ``fab -f PATH`` would use (known_hosts and key of the harness cluster)."""
    config = Config(runtime_path=str(path))
    config.load_runtime()
    return config


def run_beowulf(blocks: int, hosts, config: Config, db: Path, profile: bool = False) -> tuple[float, str]:
    """Seconds per block with every agent up; with ``profile``, also the cProfile report."""
    coordinator = TimedCoordinator(TrivialJob(blocks, "noop"), hosts, config, str(db), fresh=True)
    profilers: list[cProfile.Profile] = []
    original_run = threading.Thread.run
    if profile:
        def profiled_run(thread):  # every thread started during the run gets its own profiler
            profiler = cProfile.Profile()
            profilers.append(profiler)
            profiler.runcall(original_run, thread)

        threading.Thread.run = profiled_run  # type: ignore[method-assign]
        profilers.append(cProfile.Profile())
        profilers[0].enable()
    try:
        outcome = coordinator.run()
    finally:
        if profile:
            profilers[0].disable()
            threading.Thread.run = original_run  # type: ignore[method-assign]
    finished = time.perf_counter()
    if outcome.items_total != blocks or sum(h.blocks for h in outcome.hosts) != blocks:
        raise SystemExit(f"beowulf ran {sum(h.blocks for h in outcome.hosts)} of {blocks} blocks")
    report = ""
    if profile:
        time.sleep(1.0)  # let the links' close threads finish
        text = io.StringIO()
        stats = pstats.Stats(profilers[0], stream=text)
        for profiler in profilers[1:]:
            try:
                stats.add(profiler)
            except TypeError:  # a thread still running has no stats yet
                pass
        stats.sort_stats("tottime").print_stats(30)
        report = text.getvalue()
    return (finished - coordinator.agents_up) / blocks, report


def ssh_base(cluster: SshCluster) -> list[str]:
    """ssh options shared by every baseline: the harness key and known_hosts, no user config."""
    return ["ssh", "-F", "/dev/null", "-i", str(cluster.client_key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={cluster.known_hosts_path}",
            "-o", "IdentitiesOnly=yes"]


def start_masters(cluster: SshCluster, folder: Path) -> list[Path]:
    """One background ControlMaster per host; return the control socket paths."""
    sockets = []
    for host in cluster.hosts:
        path = folder / f"cm-{host.name}"
        subprocess.run(ssh_base(cluster) + ["-o", "ControlMaster=yes", "-o", f"ControlPath={path}", "-fN",
                                            "-p", str(host.port), f"{cluster.user}@{host.ip}"],
                       check=True, timeout=30)
        sockets.append(path)
    return sockets


def stop_masters(cluster: SshCluster, sockets: list[Path]) -> None:
    for host, path in zip(cluster.hosts, sockets):
        subprocess.run(ssh_base(cluster) + ["-o", f"ControlPath={path}", "-O", "exit", "-p", str(host.port),
                                            f"{cluster.user}@{host.ip}"],
                       capture_output=True, timeout=30)


def run_parallel(cluster: SshCluster, sockets: list[Path], jobs: int) -> float:
    """Wall seconds for ``jobs`` runs of ``true`` spread by GNU parallel -S over the ControlMasters."""
    logins = []
    for host, path in zip(cluster.hosts, sockets):
        ssh = " ".join(shlex.quote(part) for part in ssh_base(cluster))
        logins.append(f"{SLOTS + 1}/{ssh} -o ControlMaster=no -o ControlPath={shlex.quote(str(path))} "
                      f"-p {host.port} {cluster.user}@{host.ip}")
    argv = ["parallel", "--will-cite", "-N0"]
    for login in logins:
        argv += ["-S", login]
    argv += ["true", ":::"] + [str(i) for i in range(jobs)]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"parallel failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def ssh_true(cluster: SshCluster, index: int) -> None:
    host = cluster.hosts[index % len(cluster.hosts)]
    subprocess.run(ssh_base(cluster) + ["-p", str(host.port), f"{cluster.user}@{host.ip}", "true"],
                   check=True, timeout=60)


def run_ssh_loop(cluster: SshCluster, blocks: int, threads: int) -> float:
    """Wall seconds for ``blocks`` ssh-per-block runs of ``true``, ``threads`` at a time (round robin)."""
    counter = iter(range(blocks))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker(offset: int) -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            try:
                ssh_true(cluster, index + offset)
            except BaseException as err:  # report after the run
                failures.append(err)
                return

    began = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if failures:
        raise SystemExit(f"ssh per block failed: {failures[0]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5000, help="beowulf: trivial blocks (default 5000)")
    parser.add_argument("--parallel-jobs", type=int, default=240, help="GNU parallel: jobs (default 240)")
    parser.add_argument("--ssh-blocks", type=int, default=24, help="ssh per block: blocks per mode (default 24)")
    parser.add_argument("--profile", action="store_true", help="also profile a beowulf run (cProfile)")
    args = parser.parse_args()
    small = max(12, args.parallel_jobs // 10)

    with tempfile.TemporaryDirectory() as temp, SshCluster(Path(temp) / "cluster", HOSTS) as cluster:
        base = Path(temp)
        inventory = cluster.write_inventory(base / "hosts.ini", extra={h.name: {"slots": SLOTS}
                                                                       for h in cluster.hosts})
        config_path = cluster.write_fabric_config(base / "fabric.yaml")

        def setup() -> None:
            done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config_path, timeout=600)
            if done.returncode != 0:
                raise SystemExit(f"fab setup failed:\n{done.stdout}\n{done.stderr}")

        setup()
        hosts = load_inventory(inventory)
        config = fabric_config(config_path)

        def measure_beowulf(blocks: int, db: str, profile: bool = False) -> tuple[float, str]:
            try:
                return run_beowulf(blocks, hosts, config, base / db, profile)
            except JobError as err:  # client/ edited since setup (others work in this tree): again
                if "stale" not in str(err):
                    raise
                setup()
                return run_beowulf(blocks, hosts, config, base / db, profile)

        # Warm-up (first connections, page cache), then the measured runs, interleaved.
        measure_beowulf(200, "warm.db")
        sockets = start_masters(cluster, base)
        try:
            run_parallel(cluster, sockets, small)
            beowulf_runs, parallel_runs = [], []
            for attempt in range(2):
                beowulf_runs.append(measure_beowulf(args.blocks, f"d{attempt}.db")[0])
                t_small = run_parallel(cluster, sockets, small)
                t_big = run_parallel(cluster, sockets, args.parallel_jobs)
                parallel_runs.append((t_big, max(t_big - t_small, 1e-9) / (args.parallel_jobs - small)))
        finally:
            stop_masters(cluster, sockets)
        seq = run_ssh_loop(cluster, args.ssh_blocks, 1)
        conc = run_ssh_loop(cluster, args.ssh_blocks, HOSTS * SLOTS)
        report = ""
        if args.profile:
            report = measure_beowulf(args.blocks, "profile.db", profile=True)[1]

    beowulf = min(beowulf_runs)
    parallel_wall, parallel = min(parallel_runs, key=lambda run: run[1])
    rows = [
        ["a. beowulf coordinator (in-process, noop, slots+1 in flight)", args.blocks,
         round(beowulf * args.blocks, 3), round(beowulf * 1e3, 3), "1.0"],
        [f"b. GNU parallel -S, ControlMaster, true ({SLOTS + 1}/host)", args.parallel_jobs,
         round(parallel_wall, 3), round(parallel * 1e3, 2), f"{parallel / beowulf:.0f}x"],
        ["c. ssh per block, true, sequential", args.ssh_blocks, round(seq, 3),
         round(seq / args.ssh_blocks * 1e3, 1), f"{seq / args.ssh_blocks / beowulf:.0f}x"],
        [f"c. ssh per block, true, {HOSTS * SLOTS} threads (seed)", args.ssh_blocks, round(conc, 3),
         round(conc / args.ssh_blocks * 1e3, 1), f"{conc / args.ssh_blocks / beowulf:.0f}x"],
    ]
    print(tabulate(rows, headers=["method", "blocks", "seconds", "ms/block", "vs beowulf"]))
    print(f"(beowulf: best of {len(beowulf_runs)} runs {', '.join(f'{r * 1e3:.3f}' for r in beowulf_runs)} "
          f"ms/block; parallel: (T({args.parallel_jobs}) - T({small})) / {args.parallel_jobs - small}, best of "
          f"{len(parallel_runs)}: {', '.join(f'{r[1] * 1e3:.2f}' for r in parallel_runs)} ms/block)")
    b_ratio, c_ratio = parallel / beowulf, conc / args.ssh_blocks / beowulf
    print(f"(b)/(a) = {b_ratio:.0f}x (target >= 50x: {'met' if b_ratio >= 50 else 'MISSED'}); "
          f"(c)/(a) = {c_ratio:.0f}x (target >= 500x: {'met' if c_ratio >= 500 else 'MISSED'})")
    if report:
        print("\ncProfile of one beowulf run (all threads, by own time):")
        print(report)


if __name__ == "__main__":
    main()
