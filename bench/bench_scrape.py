"""fab scrape throughput against the ideal, and politeness measured at the server.

    python bench/bench_scrape.py [--sites 24] [--pages 10] [--latency 0.1] [--workers 2x4]

1. Throughput: many distinct sites (one local web server per site, every page answered
   after --latency seconds), --delay 0, on this computer's local host with
   slots x concurrency workers. Ideal = workers / latency pages per second; the
   ratio is pages per second measured at the servers (first to last request) / ideal.
2. Politeness: one site, --delay 0.5, over three local hosts: the smallest gap
   between request starts at the server (target >= 0.5 s).
Everything runs on 127.0.0.1; no name is resolved.
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

from harness import run_fab  # noqa: E402
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
        times = sorted(r.time for server in servers for r in server.requests if r.path.startswith("/page/"))
        measured = (len(times) - 1) / (times[-1] - times[0])
        ideal = slots * concurrency / latency
        return ["throughput, many sites, --delay 0", f"{len(times)} pages, {sites} sites",
                f"{measured:.1f} pages/s", f"{ideal:.1f} pages/s (ideal)", f"{measured / ideal:.2f}x", ">= 0.9x"]
    finally:
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
    args = parser.parse_args()
    slots, concurrency = (int(part) for part in args.workers.split("x"))
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as temp:
        rows = [throughput(Path(temp), args.sites, args.pages, args.latency, slots, concurrency),
                politeness(Path(temp), 12)]
    print(tabulate(rows, headers=["measurement", "work", "measured", "baseline", "ratio", "target"]))
    print(f"({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
