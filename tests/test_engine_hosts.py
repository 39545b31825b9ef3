"""Issue 9, section 2 and 6, on real sshd hosts: a host that never answers its tasks, a URL
that fails on every host, and a site's --delay as the site itself sees it on a busy machine.

- Task deadline: one host's ``python`` is a wrapper around the real agent that says hello,
  heartbeats and pongs but drops every result. Its tasks go overdue, are cancelled there and
  handed to the honest host; the host is flagged (``overdue`` events) and quarantined; the run
  ends with everything done (scrape and primes).
- Multi-host retries: a URL answering 500 and one whose port refuses connections, over two
  hosts, end as recorded failures after their attempts (they used to hang the run for ever).
- Politeness at the server: 3 hosts x 3 sites, --delay 0.3, CPU burners beside it; the web
  servers' own logs (robots.txt included) show no two requests of a site closer than 0.3 s.

Traffic stays on 127.0.0.0/8. fab runs with a timeout: a hang is a failure, not a stuck suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import run_fab
from harness.hostile import executable, provisioned_cluster
from harness.web import WebServer, free_port

pytestmark = pytest.mark.slow

NO_ROBOTS_DELAY = "User-agent: *\nDisallow: /private\n"
FAB_TIMEOUT = 150

# The "python" of a host. MODE "late:N": an honest agent that starts N seconds late;
# "silent": the real agent behind a wrapper that passes on everything except results
# (hello, heartbeats and pongs still come: the host looks alive but never answers a task).
FAKE_PYTHON = r'''#!/usr/bin/env python3
import os, subprocess, sys, time
MODE = %(mode)r
if MODE.startswith("late:"):
    time.sleep(float(MODE.split(":")[1]))
    os.execvp("python3", ["python3"] + sys.argv[1:])
agent = subprocess.Popen(["python3"] + sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)
out = sys.stdout.buffer
try:
    for line in agent.stdout:
        if b'"type":"result"' in line.replace(b" ", b""):
            continue
        out.write(line)
        out.flush()
except OSError:
    pass
finally:
    agent.kill()
'''


@pytest.fixture(scope="module")
def hosts3(tmp_path_factory):
    """Three provisioned sshd hosts."""
    yield from provisioned_cluster(tmp_path_factory, "engine", 3)


def fake_python(folder: Path, mode: str) -> str:
    return str(executable(folder, f"python-{mode.replace(':', '-')}", FAKE_PYTHON % {"mode": mode}))


def fab(args, config, timeout=FAB_TIMEOUT):
    """fab ARGS; a run that does not end within ``timeout`` is a failure (it hung)."""
    try:
        return run_fab([str(a) for a in args], config=config, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out, errs = (err.stdout or "")[-2000:], (err.stderr or "")[-2000:]
        raise AssertionError(f"fab {args[0]} did not end within {timeout}s (hung):\n{out}\n{errs}") from None


def url_file(tmp_path: Path, urls) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    return path


def last_run(db: Path):
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        pages = {record["url"]: record for record, _ in iter_pages(store, run_id)}
        return pages, store.events(run_id), store.runs()[-1]


def events_text(events) -> str:
    return "\n".join(f"{e['time'] - events[0]['time']:.1f} {e['host']} {e['kind']} {e['detail']}" for e in events)


# ---------------------------------------------------------------- task deadline


def test_scrape_host_that_never_answers_is_overdue_quarantined_and_the_run_ends(hosts3, tmp_path):
    cluster, config = hosts3
    # h2 never answers; h1 is honest but starts 4 s late so that h2 surely holds URLs first.
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1", "h2"], extra={
        "h1": {"python": fake_python(tmp_path, "late:4"), "slots": 1},
        "h2": {"python": fake_python(tmp_path, "silent"), "slots": 2}})
    servers = [WebServer(robots=NO_ROBOTS_DELAY, latency=0.05).start() for _ in range(4)]
    try:
        urls = [server.url(f"/page/{n}") for server in servers for n in range(1, 5)]
        db = tmp_path / "r.db"
        done = fab(["scrape", "--inventory", inventory, "--urls", url_file(tmp_path, urls), "--db", db,
                    "--delay", "0", "--per-domain", "3", "--timeout", "2"], config)
    finally:
        for server in servers:
            server.stop()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    pages, events, run = last_run(db)
    assert run["state"] == "done"
    assert len(pages) == len(urls) and all(p["status"] == 200 and p["host"] == "h1" for p in pages.values()), pages
    text = events_text(events)
    assert "h2 overdue" in text and "cancelled there, handed to another host" in text, text
    assert "h2 quarantine" in text and "overdue in a row" in text, text


def test_primes_host_that_never_answers_is_overdue_and_quarantined(hosts3, tmp_path):
    cluster, config = hosts3
    # h1 comes up after h2's blocks are past their deadline (10 s): they are handed over.
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1", "h2"], extra={
        "h1": {"python": fake_python(tmp_path, "late:12"), "slots": 1},
        "h2": {"python": fake_python(tmp_path, "silent"), "slots": 2}})  # two tasks overdue: quarantined
    db = tmp_path / "r.db"
    done = fab(["primes", "--inventory", inventory, "--start", 1, "--end", "1e7", "--db", db], config)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    line = [x for x in done.stdout.splitlines() if " primes in [" in x][-1]
    assert int(line.split()[0].replace(",", "")) == 664579
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        events = store.events(run_id)
        assert all(b["host"] == "h1" for b in store.blocks(run_id))
    text = events_text(events)
    assert "h2 overdue" in text and "h2 quarantine" in text, text


# ---------------------------------------------------------------- a URL failing on every host


def test_urls_failing_on_every_host_end_as_recorded_failures(hosts3, tmp_path):
    cluster, config = hosts3
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1", "h2"],
                                        extra={"h1": {"slots": 1}, "h2": {"slots": 1}})
    refused = f"http://127.0.0.1:{free_port()}/nothing-listens"
    with WebServer(robots=NO_ROBOTS_DELAY) as web:
        urls = [web.url("/500"), web.url("/page/1"), refused]
        db = tmp_path / "r.db"
        # robots.txt off: the refused URL's own request is what fails (not its robots.txt).
        done = fab(["scrape", "--inventory", inventory, "--urls", url_file(tmp_path, urls), "--db", db,
                    "--delay", "0", "--timeout", "3", "--ignore-robots"], config)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        served = web.paths()
    pages, _, run = last_run(db)
    assert run["state"] == "done" and len(pages) == 3, output
    assert (pages[web.url("/500")]["status"], pages[web.url("/500")]["attempts"]) == (500, 4)
    assert served.count("/500") == 4
    assert (pages[refused]["error_kind"], pages[refused]["attempts"]) == ("connect", 4)
    assert pages[web.url("/page/1")]["status"] == 200
    assert {pages[web.url("/500")]["host"], pages[refused]["host"]} <= {"h1", "h2"}


# ---------------------------------------------------------------- politeness at the server

BURNER = "while True: pass"


def test_delay_holds_at_the_server_on_a_busy_machine(hosts3, tmp_path):
    cluster, config = hosts3
    delay = 0.3
    inventory = cluster.write_inventory(tmp_path / "hosts.ini",
                                        extra={name: {"slots": 1} for name in ("h1", "h2", "h3")})
    servers = [WebServer(robots=NO_ROBOTS_DELAY).start() for _ in range(3)]
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(3)]
    try:
        urls = [server.url(f"/page/{n}") for server in servers for n in range(1, 9)]
        db = tmp_path / "r.db"
        done = fab(["scrape", "--inventory", inventory, "--urls", url_file(tmp_path, urls), "--db", db,
                    "--delay", delay, "--concurrency", "2"], config, timeout=240)
    finally:
        for burner in burners:
            os.kill(burner.pid, signal.SIGKILL)
            burner.wait()
        for server in servers:
            server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    pages, _, _ = last_run(db)
    assert len(pages) == len(urls) and all(p["status"] == 200 for p in pages.values())
    too_close, gaps = [], []
    for server in servers:
        seen = sorted((r.time, r.path) for r in server.requests)
        assert [path for _, path in seen].count("/robots.txt") == 1
        assert len(seen) == 9
        gaps += [b[0] - a[0] for a, b in zip(seen, seen[1:])]
        too_close += [(round(b[0] - a[0], 3), a[1], b[1]) for a, b in zip(seen, seen[1:]) if b[0] - a[0] < delay]
    assert too_close == [], too_close
    print(f"gaps at the servers: min {min(gaps):.3f} s, mean {sum(gaps) / len(gaps):.3f} s (--delay {delay})")
