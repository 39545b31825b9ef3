"""Coordinator memory: peak RSS of `fab primes` over 3, 10 and 30 loopback sshd hosts.

    python bench/bench_memory.py [--hosts 3,10,30] [--end 2e9] [--compare DIR] [--slots N]

For each host count N, N sshd hosts of the test harness (127.0.0.2 ...) are
started and provisioned (``fab setup --no-numpy``), then

    fab primes --start 1 --end END --inventory HOSTS --db TMP/rN.db --fresh --quiet

runs (list mode: every prime of 1..END comes back to the coordinator, checked and
stored). Measured: the coordinator's peak RSS (VmHWM of the fab process, read
from /proc/PID/status every 20 ms, and its ru_maxrss when reaped; the agents run
under sshd, not under fab, so this is the coordinator alone) and the wall time.
The printed count is checked against pi(END).

``--compare DIR`` runs the same command from another checkout of this repository
(e.g. ``git worktree add /tmp/before COMMIT``) right after each run of this one,
on the same hosts: the two figures are side by side in one table. The client
bundle (client/) must be the same in both, since setup ran from this one.

As in bench_scale.py, the hosts' sessions get a clean shell (sshd ``SetEnv
SHLVL=1``) and the inventory names the real interpreter. Every host runs on
this machine, so N hosts share its cores with the coordinator: the wall times
say little, the memory is the point. Needs root and /usr/sbin/sshd
(tests/system-deps.sh). Takes ~2-4 minutes per code tree for the defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peak import run_with_peak  # noqa: E402
from tabulate import tabulate  # noqa: E402

from harness import SshCluster, fab_env, run_fab  # noqa: E402

PI = {10**8: 5_761_455, 10**9: 50_847_534, 2 * 10**9: 98_222_287}


def clean_shell(cluster: SshCluster) -> None:
    """Every session on the hosts gets SHLVL=1 from sshd itself (bash then skips ~/.bashrc)."""
    for host in cluster.hosts:
        original = host._config_text
        host._config_text = lambda original=original: original() + "AcceptEnv SHLVL\nSetEnv SHLVL=1\n"


def fab_peak(repo: Path, args: list, config: Path, cwd: Path) -> tuple[float, int, str]:
    """Run ``fab ARGS`` from checkout ``repo``: (wall seconds, peak RSS of the fab process in kB, stdout)."""
    argv = [sys.executable, "-m", "fabric", "-r", str(repo), "-f", str(config), *map(str, args)]
    seconds, own, reaped, code, stdout, stderr = run_with_peak(argv, cwd, fab_env())
    if code != 0:
        raise SystemExit(f"fab {' '.join(map(str, args))} from {repo} failed ({code}):\n{stdout}\n{stderr}")
    return seconds, max(own, reaped), stdout


def measure(n: int, base: Path, args, trees: list[Path]) -> list[dict]:
    cluster = SshCluster(base / f"c{n}", n)
    clean_shell(cluster)
    rows = []
    with cluster:
        keys = {"python": os.path.realpath(sys.executable)}
        if args.slots:
            keys["slots"] = args.slots
        inventory = cluster.write_inventory(base / f"hosts{n}.ini", extra={h.name: dict(keys) for h in cluster})
        config = cluster.write_fabric_config(base / f"fabric{n}.yaml")
        done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config, timeout=900)
        if done.returncode != 0 or f"{n} of {n} hosts" not in done.stdout:
            raise SystemExit(f"fab setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        for tree in trees:
            command = ["primes", "--start", "1", "--end", str(args.end), "--inventory", inventory,
                       "--db", base / f"r{n}.db", "--fresh", "--quiet"] + (["--count-only"] if args.count_only else [])
            seconds, peak, stdout = fab_peak(tree, command, config, base)
            found = re.search(r"([\d,]+) primes in", stdout)
            if args.end in PI and (not found or int(found.group(1).replace(",", "")) != PI[args.end]):
                raise SystemExit(f"wrong count for 1..{args.end} from {tree}:\n{stdout}")
            label = "this tree" if tree == ROOT else str(tree)
            print(f"  {n} hosts, {label}: peak RSS {peak / 1024:.0f} MB, {seconds:.1f} s", flush=True)
            rows.append({"hosts": n, "tree": label, "peak": peak / 1024, "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="3,10,30", type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--end", default="2e9", type=lambda text: int(float(text)),
                        help="END of the range 1..END (default 2e9)")
    parser.add_argument("--compare", type=Path, help="another checkout to run the same command from, side by side")
    parser.add_argument("--slots", type=int, help="slots per host (default: the host's cores)")
    parser.add_argument("--count-only", action="store_true",
                        help="fab primes --count-only: results of a few bytes, what N hosts cost by themselves")
    args = parser.parse_args()
    trees = [ROOT] + ([args.compare.resolve()] if args.compare else [])
    for tree in trees:
        if not (tree / "fabfile.py").exists():
            raise SystemExit(f"--compare: {tree} has no fabfile.py")
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for n in args.hosts:
            print(f"{n} hosts:", flush=True)
            rows += measure(n, Path(temp), args, trees)
    print()
    print(tabulate([[r["hosts"], r["tree"], f"{r['peak']:.0f}", f"{r['seconds']:.1f}"] for r in rows],
                   headers=["hosts", "code", "peak RSS MB", "wall s"], colalign=("right", "left", "right", "right")))
    print(f"\nfab primes --start 1 --end {args.end:g}{' --count-only' if args.count_only else ''}; "
          f"{os.cpu_count()} CPUs; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
