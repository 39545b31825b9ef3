"""A run's speed with and without fab dashboard open (README.md, "Dashboard").

    python bench/bench_dashboard.py [--end 2e9] [--rounds 3]

``fab primes --start 1 --end END`` in list mode (every prime committed to the store:
the writer at its busiest) on this computer's local host, into a new store each time,
in three ways interleaved round by round:

- alone: no dashboard;
- page open: ``fab dashboard`` on the store and a headless Chromium showing its page
  (it polls once a second, as a user's browser does);
- hammered: ``fab dashboard`` and a client fetching ``/api/state`` back to back with no
  pause (far more than any page asks).

Printed: each way's median throughput (fab's own figure) and its ratio to "alone".
The dashboard reads with SQLite ``mode=ro``; WAL readers never block the writer.

Then the writer alone, which the throughput's noise can hide: ``Store.commit_blocks`` of
one 1 MB block at a time, ``--commits`` times, with no reader and then with a dashboard
process answering a client (another process) that asks back to back: the median and
99th-percentile time of one commit.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tabulate import tabulate  # noqa: E402

from harness import fab_argv, fab_env, run_fab  # noqa: E402

THROUGHPUT = re.compile(r"throughput ([\d,]+) numbers/s")


def start_dashboard(db: Path):
    proc = subprocess.Popen(fab_argv(["dashboard", "--db", db, "--port", "0", "--wait"]), env=fab_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    url = re.search(r"http://\S+", proc.stdout.readline()).group()
    return proc, url


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1500"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))


def hammer(port: int, stop: threading.Event, count: list) -> None:
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/state")
        conn.getresponse().read()
        conn.close()
        count[0] += 1


def one_run(folder: Path, inventory: Path, end: str, way: str, driver) -> tuple[float, int]:
    db = folder / f"{way}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    board = None
    stop, count = threading.Event(), [0]
    thread = None
    try:
        if way != "alone":
            board, url = start_dashboard(db)
            if way == "page open":
                driver.get(url)
            else:
                port = int(re.search(r":(\d+)/", url).group(1))
                thread = threading.Thread(target=hammer, args=(port, stop, count), daemon=True)
                thread.start()
        done = run_fab(["primes", "--inventory", inventory, "--start", "1", "--end", end, "--db", db, "--quiet"],
                       timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        rate = float(THROUGHPUT.search(done.stdout).group(1).replace(",", ""))
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        if board is not None:
            os.killpg(board.pid, signal.SIGTERM)
            board.communicate(timeout=20)
        if way == "page open":
            driver.get("about:blank")
    return rate, count[0]


HAMMER = """
import http.client, sys
port = int(sys.argv[1])
while True:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/state")
    conn.getresponse().read()
    conn.close()
"""


def commit_times(folder: Path, commits: int, with_reader: bool) -> list[float]:
    """Seconds per commit of one 1 MB block (a new store), optionally while a dashboard is hammered."""
    import time

    from cluster.store import BlockRow, Store

    db = folder / f"commits-{with_reader}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    board = client = None
    payload = os.urandom(1 << 20)
    times = []
    try:
        with Store(db) as store:
            run_id = store.open_run("bench", {"reader": with_reader}, commits * 10)
            store.commit_blocks([BlockRow(run_id, 0, 9, "h1", time.time() - 1, time.time(), 10, 0, payload=payload)])
            if with_reader:
                board, url = start_dashboard(db)
                port = re.search(r":(\d+)/", url).group(1)
                client = subprocess.Popen([sys.executable, "-c", HAMMER, port], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
                time.sleep(1.0)
            for i in range(1, commits):
                row = BlockRow(run_id, i * 10, i * 10 + 9, f"h{i % 3}", time.time() - 1, time.time(), 10, 0,
                               payload=payload)
                t0 = time.perf_counter()
                store.commit_blocks([row])
                times.append(time.perf_counter() - t0)
    finally:
        for proc in (client, board):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--end", default="2e9", help="primes 1..END in list mode (default 2e9)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three ways (default 3)")
    parser.add_argument("--commits", type=int, default=300, help="1 MB commits timed (default 300)")
    args = parser.parse_args()
    ways = ["alone", "page open", "hammered"]
    rates: dict[str, list[float]] = {w: [] for w in ways}
    polls: list[int] = []
    driver = browser()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
            folder = Path(tmp)
            inventory = folder / "local.ini"
            inventory.write_text("[this computer]\naddress = local\n")
            for round_ in range(args.rounds):
                order = ways if round_ % 2 == 0 else list(reversed(ways))
                for way in order:
                    rate, count = one_run(folder, inventory, args.end, way, driver)
                    rates[way].append(rate)
                    if way == "hammered":
                        polls.append(count)
                    print(f"round {round_ + 1}: {way}: {rate:,.0f} numbers/s", file=sys.stderr)
    finally:
        driver.quit()
    base = statistics.median(rates["alone"])
    rows = [[way, f"{statistics.median(rates[way]):,.0f}", " ".join(f"{r / 1e6:,.0f}M" for r in rates[way]),
             f"{statistics.median(rates[way]) / base:.3f}x"] for way in ways]
    print(f"fab primes --start 1 --end {args.end} (list mode), local host, {args.rounds} rounds interleaved;"
          f" hammered: {statistics.median(polls) if polls else 0:.0f} /api/state answers per run (median)")
    print(tabulate(rows, headers=["dashboard", "median numbers/s", "each run", "vs alone"], disable_numparse=True))
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        rows = []
        for with_reader in (False, True, False, True):
            times = sorted(commit_times(Path(tmp), args.commits, with_reader))
            rows.append(["dashboard hammered" if with_reader else "no reader", len(times),
                         f"{statistics.median(times) * 1e3:.2f} ms", f"{times[int(len(times) * 0.99)] * 1e3:.2f} ms",
                         f"{times[-1] * 1e3:.1f} ms"])
    print(f"\nStore.commit_blocks of one 1 MB block, {args.commits} commits each, alternated")
    print(tabulate(rows, headers=["reader", "commits", "median", "p99", "max"], disable_numparse=True))


if __name__ == "__main__":
    main()
