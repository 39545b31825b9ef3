"""Scale: `fab setup`, `fab hosts` and one coordinator on 10, 30 and 100 loopback sshd hosts.

    python bench/bench_scale.py [--hosts 10,30,100] [--blocks 6000] [--idle 10] [--login-shell] [--profile]

For each host count N, N sshd hosts of the test harness (127.0.0.2 ...), one
slot each, are started and measured:

- ``fab setup --no-numpy`` wall time, first run (everything uploaded) and second
  run (nothing to upload: the cost of checking), whole command (Python start-up
  included);
- ``fab hosts`` wall time (only at the largest N: it costs what a second setup
  does);
- a trivial-block run: cluster.coordinator.Coordinator in this process running a
  TrivialJob of BLOCKS one-item ``noop`` blocks, held back (through the job's
  ``capacity``) until every agent has said hello, so that all N hosts work; the
  time until then ("agents up"); blocks/s and the coordinator's CPU per block
  (user + system time of this process from getrusage, less this script's
  connection sampler), both from that moment to the end of the coordinator's
  loop (the last result handed to the store writer), and that CPU by thread
  (main loop, HostLink readers, Paramiko transports, store writer); the threads
  of the process; the most SSH connections it held to any one host during the
  run (/proc/net/tcp, by socket), which must be 1;
- at the largest N, before that run: the coordinator's CPU (share of one core,
  by thread) while every host is connected and there is nothing to do for
  ``--idle`` seconds (heartbeats, pings and Paramiko's own wake-ups).

Every host runs on this machine, so N hosts share its cores with the
coordinator: the figures show what one coordinator process costs per host and
per block, not what N real machines would compute. By default the hosts'
sessions get a clean shell (sshd ``SetEnv SHLVL=1``: bash then skips root's
~/.bashrc, which runs ``pyenv init``, ~170 ms of CPU a session here) and the
inventory names the real interpreter (not pyenv's ``python3`` shim, another
~140 ms a command), so the remote side costs what a plain Debian host would;
``--login-shell`` measures with both as they are. ``--profile`` adds a run on the
largest N with the main thread under cProfile (CPU time; it inflates many small
calls, so that run is not in the table).

Needs root and /usr/sbin/sshd (tests/system-deps.sh). Takes ~3-4 minutes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from cluster.coordinator import Coordinator  # noqa: E402
from cluster.errors import JobError  # noqa: E402
from cluster.inventory import load_inventory  # noqa: E402
from cluster.jobs.trivial import TrivialJob  # noqa: E402
from harness import SshCluster, load_fabric_config, run_fab  # noqa: E402


def clean_shell(cluster: SshCluster) -> None:
    """Every session on the hosts gets SHLVL=1 from sshd itself (bash then skips ~/.bashrc)."""
    for host in cluster.hosts:
        original = host._config_text
        host._config_text = lambda original=original: original() + "AcceptEnv SHLVL\nSetEnv SHLVL=1\n"


def real_python() -> str:
    """This interpreter's real binary (no venv, no pyenv shim): what the hosts run."""
    return os.path.realpath(sys.executable)




SAMPLER = "bench-sampler"  # this script's connection counter: its CPU is not the coordinator's


class GatedJob(TrivialJob):
    """A TrivialJob whose blocks are held back until every host's agent is up (each host starts working as
    it says hello; here the rate is measured with all of them working), and then ``idle`` seconds more,
    measuring what the coordinator costs with every host connected and nothing to do. The moment the gate
    opens, it notes the wall time, this process's CPU (getrusage) and the CPU of each of its threads."""

    def __init__(self, count: int, hosts: int, idle: float = 0.0):
        super().__init__(count, "noop")
        self.hosts = hosts
        self.idle = idle
        self.coordinator: Optional[Coordinator] = None
        self.all_up = self.opened = 0.0
        self.idle_cpu: dict[str, float] = {}  # thread group -> share of one core while idle

    def capacity(self, slots: int) -> int:
        if not self.opened:
            if self.coordinator is None:
                return 0
            up, starting = self.coordinator.up, self.coordinator.reconnecting
            if len(up) < self.hosts and (starting or not up):  # some still starting (or none up yet)
                return 0
            now = time.perf_counter()
            if not self.all_up:
                self.all_up = now
                self.cpu_up, self.rusage_up = thread_cpu(), cpu_seconds()
            if now - self.all_up < self.idle:
                return 0
            if self.idle:
                used = group_cpu(self.cpu_up)
                used.pop(SAMPLER, None)
                self.idle_cpu = {group: seconds / (now - self.all_up) for group, seconds in used.items()}
            self.threads_up = threading.active_count()
            self.cpu_up, self.rusage_up = thread_cpu(), cpu_seconds()
            self.opened = time.perf_counter()
        return slots + 1  # the coordinator's default: slots + 1 in flight


class ScaleCoordinator(Coordinator):
    """A Coordinator noting, at the end of its loop, the wall time and the CPU since the job's gate opened."""

    def _loop(self) -> None:
        super()._loop()
        job = self.job
        self.loop_done = time.perf_counter()
        rusage = cpu_seconds()
        self.cpu = group_cpu(job.cpu_up)
        self.coordinator_cpu = rusage - job.rusage_up - self.cpu.pop(SAMPLER, 0.0)


def group_cpu(since: dict[int, float]) -> dict[str, float]:
    """CPU seconds of this process's threads since the snapshot ``since``, by kind of thread."""
    used = thread_cpu()
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    groups: dict[str, float] = {}
    for tid, seconds in used.items():
        name = names.get(tid, "")
        group = ("main loop" if name == "MainThread" else "readers (agent-*)" if name.startswith("agent-")
                 else "store writer" if name == "store-writer" else SAMPLER if name == SAMPLER
                 else "paramiko transports, other")
        groups[group] = groups.get(group, 0.0) + seconds - since.get(tid, 0.0)
    return groups


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process, by native thread id.

    From the scheduler's ``se.sum_exec_runtime`` (nanoseconds) where the kernel shows it:
    /proc's utime + stime count whole clock ticks (10 ms) per thread, and with 100 hosts
    most threads use less than a tick per run.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/sched") as handle:
                for line in handle:
                    if line.startswith("se.sum_exec_runtime"):
                        used[int(tid)] = float(line.split(":")[1]) / 1e3  # milliseconds
                        break
            if int(tid) in used:
                continue
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return used




def cpu_seconds() -> float:
    """User + system CPU seconds of this whole process (every thread, live or ended)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def trivial_run(cluster: SshCluster, hosts, config, db: Path, blocks: int, profile: bool, idle: float = 0.0) -> dict:
    """One coordinator run of ``blocks`` noop blocks; rates from all agents up to the last block."""
    job = GatedJob(blocks, len(hosts), idle)
    coordinator = job.coordinator = ScaleCoordinator(job, hosts, config, str(db), fresh=True)
    most: Counter = Counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for name, count in cluster.connections_from_this_process().items():
                if count > 1 and count > most[name]:
                    print(f"  {name}: {count} connections at {time.perf_counter() - began:.1f} s", flush=True)
                most[name] = max(most[name], count)

    sampler = threading.Thread(target=sample, name=SAMPLER, daemon=True)
    began = time.perf_counter()
    sampler.start()
    profiler = None
    if profile:
        profiler = cProfile.Profile(timer=time.thread_time)  # main thread only: the loop
        profiler.enable()
    try:
        outcome = coordinator.run()
    finally:
        if profiler:
            profiler.disable()
        stop.set()
        sampler.join()
    ran = sum(h.blocks for h in outcome.hosts)
    if outcome.items_total != blocks or ran != blocks:
        raise SystemExit(f"{len(hosts)} hosts: ran {ran} of {blocks} blocks")
    seconds = coordinator.loop_done - job.opened
    report = ""
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        report = text.getvalue()
    return {
        "up": sum(1 for h in outcome.hosts if h.state == "up"),
        "start": job.all_up - began,
        "blocks/s": blocks / seconds,
        "cpu/block": coordinator.coordinator_cpu / blocks,
        "wall/block": seconds / blocks,
        "by thread": {group: s / blocks for group, s in coordinator.cpu.items()},
        "threads": job.threads_up,
        "most connections": max(most.values(), default=0),
        "hosts seen": len(most),
        "warnings": outcome.warnings,
        "profile": report,
        "idle": job.idle_cpu,
    }


def timed_fab(args: list, config: Path, expect: str) -> float:
    began = time.perf_counter()
    done = run_fab(args, config=config, timeout=900)
    seconds = time.perf_counter() - began
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or expect not in done.stdout:
        raise SystemExit(f"fab {' '.join(map(str, args))}: exit {done.returncode}, expected {expect!r}:\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  fab {args[0]}: {seconds:.1f} s ({last})", flush=True)
    return seconds


def measure(n: int, base: Path, args) -> dict:
    cluster = SshCluster(base / f"c{n}", n)
    if not args.login_shell:
        clean_shell(cluster)
    with cluster:
        keys = {"slots": 1} if args.login_shell else {"slots": 1, "python": real_python()}
        inventory = cluster.write_inventory(base / f"hosts{n}.ini", extra={h.name: dict(keys) for h in cluster})
        config_path = cluster.write_fabric_config(base / f"fabric{n}.yaml")
        setup = ["setup", "--inventory", inventory, "--no-numpy"]
        row = {"hosts": n}
        row["setup 1"] = timed_fab(setup, config_path, f"{n} of {n} hosts")
        row["setup 2"] = timed_fab(setup, config_path, "nothing uploaded: every host was up to date")
        if n == max(args.hosts):
            row["hosts s"] = timed_fab(["hosts", "--inventory", inventory], config_path,
                                       f"{n} of {n} hosts reachable")
        hosts = load_inventory(inventory)
        config = load_fabric_config(config_path)
        blocks = args.blocks
        idle = args.idle if n == max(args.hosts) else 0.0
        try:
            run = trivial_run(cluster, hosts, config, base / f"r{n}.db", blocks, False, idle)
        except JobError as err:  # client/ was edited since setup (others work in this tree)
            if "stale" not in str(err):
                raise
            run_fab(setup, config=config_path, timeout=900)
            run = trivial_run(cluster, hosts, config, base / f"r{n}.db", blocks, False, idle)
        print(f"  run: {run['up']} of {n} agents up in {run['start']:.1f} s; {blocks} blocks at "
              f"{run['blocks/s']:,.0f}/s; {run['cpu/block'] * 1e3:.3f} ms CPU per block; {run['threads']} threads; "
              f"at most {run['most connections']} connection(s) to a host ({run['hosts seen']} hosts seen)",
              flush=True)
        row.update(run, blocks=blocks)
        if args.profile and n == max(args.hosts):  # a separate run: cProfile inflates small calls
            row["profile"] = trivial_run(cluster, hosts, config, base / f"p{n}.db", blocks, True)["profile"]
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,30,100", type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--blocks", type=int, default=6000, help="trivial blocks per run (default 6000)")
    parser.add_argument("--login-shell", action="store_true",
                        help="leave root's ~/.bashrc and the python3 shim in every session")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds every host stays connected with nothing to do before the run on the "
                             "largest N, to measure the idle cost (default 10)")
    parser.add_argument("--profile", action="store_true",
                        help="one more run on the largest N with the main thread under cProfile")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for n in args.hosts:
            print(f"{n} hosts:", flush=True)
            rows.append(measure(n, Path(temp), args))
    table = [[r["hosts"], f"{r['setup 1']:.1f}", f"{r['setup 2']:.1f}",
              f"{r['hosts s']:.1f}" if "hosts s" in r else "", f"{r['up']} in {r['start']:.1f}", r["blocks"],
              f"{r['blocks/s']:,.0f}", f"{r['wall/block'] * 1e3:.3f}", f"{r['cpu/block'] * 1e3:.3f}",
              r["threads"], r["most connections"]] for r in rows]
    print()
    print(tabulate(table, headers=["hosts", "setup 1st s", "setup 2nd s", "fab hosts s", "agents up, s", "blocks",
                                   "blocks/s", "wall ms/block", "CPU ms/block", "threads", "conns/host"],
                   colalign=("right",) * 11))
    print()
    for r in rows:
        parts = ", ".join(f"{group} {seconds * 1e3:.3f}"
                          for group, seconds in sorted(r["by thread"].items(), key=lambda g: -g[1]))
        print(f"{r['hosts']} hosts, coordinator CPU ms per block by thread: {parts}")
    for r in rows:
        if r["idle"]:
            parts = ", ".join(f"{group} {share * 100:.1f}%"
                              for group, share in sorted(r["idle"].items(), key=lambda g: -g[1]))
            print(f"{r['hosts']} hosts connected and idle: {sum(r['idle'].values()) * 100:.1f}% of one core ({parts})")
    for r in rows:
        if r.get("profile"):
            print(f"\ncProfile of the main thread, {r['hosts']} hosts (CPU time, by own time):")
            print(r["profile"])
    print(f"shell: {'login shell as it is' if args.login_shell else 'clean (SetEnv SHLVL=1), real interpreter'}; "
          f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
