"""`fab setup` wall time on 3 and 20 loopback sshd hosts, first run and second (idempotent) run.

    python bench/bench_setup.py [--hosts 3,20]

Needs root and /usr/sbin/sshd (tests/system-deps.sh). Prints one table; the
second run should upload nothing, so its time is the cost of checking.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from harness import SshCluster, run_fab  # noqa: E402


def measure(n: int, base: Path) -> list:
    with SshCluster(base / f"c{n}", n) as cluster:
        inventory = cluster.write_inventory(base / f"hosts{n}.ini")
        config = cluster.write_fabric_config(base / f"fabric{n}.yaml")
        row = [n]
        for _ in range(2):
            began = time.perf_counter()
            done = run_fab(["setup", "--inventory", inventory], config=config, timeout=900)
            row.append(round(time.perf_counter() - began, 2))
            if done.returncode != 0:
                raise SystemExit(f"setup failed on {n} hosts:\n{done.stdout}\n{done.stderr}")
            row.append(done.stdout.strip().splitlines()[-1].split("; ", 1)[-1])
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="3,20")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        rows = [measure(int(n), Path(temp)) for n in args.hosts.split(",")]
    print(tabulate(rows, headers=["hosts", "first run s", "first run", "second run s", "second run"]))


if __name__ == "__main__":
    main()
