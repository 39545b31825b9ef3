"""fab scrape throughput against the ideal, and politeness measured at the server.

    python bench/bench_scrape.py [--sites 24] [--pages 10] [--latency 0.1] [--workers 2x4]

1. Throughput: many distinct sites (one local web server per site, every page answered
   after --latency seconds), --delay 0, on this computer's local host with
   slots x concurrency workers. Ideal = workers / latency requests per second; the
   ratio is requests per second measured at the servers (first to last request
   start) / ideal. Every site's robots.txt is one of those requests (it is answered
   after --latency too), so pages alone can reach at most pages / (pages + sites)
   of the ideal: that figure is printed as well.
2. Politeness: one site, --delay 0.5, over three local hosts: the smallest gap
   between request starts at the server (target >= 0.5 s).
3. Far host: the same many-site run on one loopback sshd host (2 slots x 4
   workers), first directly, then through a TCP relay adding --rtt to every round
   trip. Without a queue on the host, every page would wait one round trip to the
   coordinator: at most latency / (latency + rtt) of the direct rate.
Everything runs on 127.0.0.0/8; no name is resolved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from harness import SshCluster, run_fab  # noqa: E402
from harness.web import WebServer  # noqa: E402

NO_ROBOTS = "User-agent: *\nDisallow:\n"


def throughput(base: Path, sites: int, pages: int, latency: float, slots: int, concurrency: int) -> list:
    servers = [WebServer(robots=NO_ROBOTS, latency=latency).start() for _ in range(sites)]
    try:
        urls = [server.url(f"/page/{i}") for server in servers for i in range(pages)]
        (base / "urls.txt").write_text("\n".join(urls) + "\n")
        (base / "local.ini").write_text(f"[this computer]\naddress = local\nslots = {slots}\n")
        done = run_fab(["scrape", "--urls", base / "urls.txt", "--inventory", base / "local.ini",
                        "--db", base / "t.db", "--delay", "0", "--concurrency", concurrency, "--quiet",
                        "--no-bodies"], timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        ideal = slots * concurrency / latency
        every = sorted(r.time for server in servers for r in server.requests)
        pages_only = sorted(r.time for server in servers for r in server.requests if r.path.startswith("/page/"))
        rows = []
        for label, times in (("requests (pages + robots.txt)", every), ("pages only", pages_only)):
            measured = (len(times) - 1) / (times[-1] - times[0])
            rows.append([f"throughput, many sites, --delay 0: {label}", f"{len(times)} requests, {sites} sites",
                         f"{measured:.1f} /s", f"{ideal:.1f} /s (ideal)", f"{measured / ideal:.2f}x",
                         ">= 0.9x" if label.startswith("requests") else
                         f"({len(every) - len(pages_only)} of the requests are robots.txt)"])
        return rows
    finally:
        for server in servers:
            server.stop()


def far_host(base: Path, sites: int, pages: int, latency: float, rtt: float) -> list:
    """One SSH host (2 slots x 4 workers), reached directly and then through a relay
    adding ``rtt`` to each round trip: the host's short queue of URLs (sites with no
    gap between starts) should hide the round trip to the coordinator."""
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        return [["far host", "skipped: no sshd", "", "", "", ""]]
    servers = [WebServer(robots=NO_ROBOTS, latency=latency).start() for _ in range(sites)]
    cluster = SshCluster(base / "cluster", 1).start()
    try:
        config = cluster.write_fabric_config(base / "fabric.yaml")
        keys = {"h1": {"slots": 2, "nice": 0}}
        near = cluster.write_inventory(base / "near.ini", extra=keys)
        done = run_fab(["setup", "--inventory", near, "--no-numpy"], config=config, timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        cluster.add_relay("h1", delay=rtt / 2)
        far = cluster.write_inventory(base / "far.ini", extra=keys)
        rates = {}
        for label, inventory in (("near", near), ("far", far)):
            began = time.time()
            urls = [server.url(f"/{label}/{i}") for server in servers for i in range(pages)]
            (base / f"{label}.txt").write_text("\n".join(urls) + "\n")
            done = run_fab(["scrape", "--urls", base / f"{label}.txt", "--inventory", inventory, "--db",
                            base / f"{label}.db", "--delay", "0", "--concurrency", 4, "--quiet", "--no-bodies"],
                           config=config, timeout=900)
            if done.returncode != 0:
                raise SystemExit(done.stdout + done.stderr)
            times = sorted(r.time for server in servers for r in server.requests if r.time >= began)
            rates[label] = (len(times) - 1) / (times[-1] - times[0])
        ideal = 8 / latency
        return [[f"throughput, one SSH host 2x4, +{rtt * 1000:.0f} ms round trip", f"{len(times)} requests",
                 f"{rates['far']:.1f} /s ({rates['far'] / ideal:.2f}x ideal)",
                 f"{rates['near']:.1f} /s direct ({rates['near'] / ideal:.2f}x ideal)",
                 f"{rates['far'] / rates['near']:.2f}x",
                 f"> {latency / (latency + rtt):.2f}x (no queue: a round trip per page)"]]
    finally:
        cluster.stop()
        for server in servers:
            server.stop()


def politeness(base: Path, pages: int) -> list:
    with WebServer(robots=NO_ROBOTS) as server:
        urls = [server.url(f"/page/{i}") for i in range(pages)]
        (base / "one.txt").write_text("\n".join(urls) + "\n")
        (base / "three.ini").write_text("".join(f"[host{i}]\naddress = local\nslots = 2\n" for i in range(3)))
        done = run_fab(["scrape", "--urls", base / "one.txt", "--inventory", base / "three.ini",
                        "--db", base / "p.db", "--delay", "0.5", "--quiet", "--no-bodies"], timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        starts = sorted(r.time for r in server.requests if r.path.startswith("/page/"))
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        return ["politeness, one site, --delay 0.5, 3 hosts", f"{len(starts)} pages",
                f"min gap {min(gaps):.3f} s", f"mean gap {sum(gaps) / len(gaps):.3f} s",
                f"{min(gaps) / 0.5:.2f}x", ">= 1.0x of 0.5 s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=24)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--workers", default="2x4", help="SLOTSxCONCURRENCY of the local host")
    parser.add_argument("--rtt", type=float, default=0.05,
                        help="round trip added in front of the SSH host of part 3 (0: skip part 3)")
    args = parser.parse_args()
    slots, concurrency = (int(part) for part in args.workers.split("x"))
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as temp:
        rows = throughput(Path(temp), args.sites, args.pages, args.latency, slots, concurrency)
        rows.append(politeness(Path(temp), 12))
        if args.rtt > 0:
            rows += far_host(Path(temp), args.sites, args.pages, args.latency, args.rtt)
    print(tabulate(rows, headers=["measurement", "work", "measured", "baseline", "ratio", "target"]))
    print(f"({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
