"""Hostile hosts and hostile web servers, with real processes: the run goes on and stays exact.

Agents: an sshd host whose ``python`` is a wrapper that speaks a corrupted protocol
(random bytes, invalid UTF-8, a 100 MB line, a result for a task never sent, wrong
checksums, a wrong bundle hash) beside an honest host. ``fab primes`` still exits 0
with pi(10^7), the hostile host is flagged (left out, lost, invalid, quarantined) and
the coordinator's memory stays bounded (peak RSS of the fab process tree).

Web: ``fab scrape`` against a gzip bomb, an endless redirect loop, a one-byte-a-second
drip (body and headers), huge headers, a binary body and a 50 MB body: every URL gets
a record (an error where the fetch failed), the honest pages are fetched, time and
memory stay bounded.

Traffic stays on 127.0.0.0/8 and no name is ever resolved.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.agents import MAX_JUNK_LINES, MAX_LINE_BYTES
from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import hostile
from harness.hostile import count_of, executable, provisioned_cluster
from harness.web import BINARY_BODY, WebServer, gzip_bomb

pytestmark = pytest.mark.slow

PI_1E7 = 664579
# Peak resident memory allowed to the fab process tree (coordinator, local agent, workers).
RSS_LIMIT_MB = 400
FAB_TIMEOUT = 240


def fab_measured(args, tmp_path: Path, config=None, timeout: float = FAB_TIMEOUT):
    """run ``fab ARGS``; (CompletedProcess, peak RSS of the fab process tree in MB, seconds)."""
    return hostile.fab_measured(args, tmp_path, config=config, timeout=timeout)


# ---------------------------------------------------------------- hostile agents

# The "python" of a host: ignores what it is asked to run except to hand it to the real
# interpreter (python3 on the host), and corrupts what the agent says, per MODE.
FAKE_PYTHON = r'''#!/usr/bin/env python3
import json, os, subprocess, sys, time
MODE = %(mode)r
out = sys.stdout.buffer


def write(data):
    out.write(data)
    out.flush()


def dump(message):
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


if MODE == "slow":  # an honest machine that takes a while to start
    time.sleep(5)
    os.execvp("python3", ["python3"] + sys.argv[1:])
if MODE == "random":  # no hello, only noise
    write(os.urandom(1 << 20))
    sys.stdin.buffer.read()  # until the coordinator hangs up
    sys.exit(0)
JUNK = [b"\xff\xfe\xfd not utf-8\n", b'{"type": "beat", "load": "\xc3\x28"}\n', b"[" * 100000 + b"]" * 100000 + b"\n",
        b"\x00" * 100 + b"\n", b'{"type": "result", \n', b"null\n",
        b'{"type": "beat", "load": "\\ud800 a lone surrogate is not junk"}\n']
agent = subprocess.Popen(["python3"] + sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)
results = 0
try:
    for line in agent.stdout:
        message = json.loads(line)
        kind = message.get("type")
        if kind == "hello" and MODE == "bundle":
            message["bundle"] = "0" * 64
            line = dump(message)
        if kind == "result" and message.get("ok"):
            results += 1
            if MODE == "checksum":
                message["result"]["checksum"] ^= 2
                line = dump(message)
            elif MODE == "stray":
                write(dump(dict(message, id=987654321)))
        write(line)
        if kind == "hello" and MODE == "junkonly":  # a fine hello, then only junk, every time
            write(b"junk\n" * 100)
        if kind == "result" and MODE == "utf8":
            for junk in JUNK:
                write(junk)
        if kind == "result" and MODE == "huge" and results == 1:
            chunk = b"x" * (1 << 20)
            for _ in range(100):
                write(chunk)
            write(b"\n")
except OSError:  # the coordinator hung up
    pass
finally:
    agent.kill()
'''

# mode -> what the coordinator must say about the hostile host (in its output or the store's events)
MODES = {
    "random": rf"left out: h2: the agent did not start \(protocol error: more than {MAX_JUNK_LINES} lines",
    "utf8": rf"h2.*protocol error: more than {MAX_JUNK_LINES} lines that are not protocol",
    "huge": rf"h2.*protocol error: a line of over {MAX_LINE_BYTES // 2**20} MB",
    "stray": r"h2.*protocol error: a result for task 987654321, which was never sent to it",
    "checksum": r"h2.*(invalid|quarantine).*checksum",
    "bundle": r"left out: h2: client bundle is stale \(0{64} != ",
}


@pytest.fixture(scope="module")
def hostile_cluster(tmp_path_factory):
    """Two provisioned sshd hosts: h1 (honest, made slow to start) and h2 (made hostile per test)."""
    yield from provisioned_cluster(tmp_path_factory, "hostile", 2)


def fake_python(folder: Path, mode: str) -> Path:
    return executable(folder, f"python-{mode}", FAKE_PYTHON % {"mode": mode})


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hostile_agent_cannot_break_the_run(hostile_cluster, tmp_path, mode):
    cluster, config = hostile_cluster
    # h1 is honest but starts 5 s late, so the hostile h2 gets the first blocks (or says its junk first):
    # with primesieve, h1 alone needs well under a second for the whole range.
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={
        "h1": {"python": fake_python(tmp_path, "slow"), "slots": 1},
        "h2": {"python": fake_python(tmp_path, mode), "slots": 1},
    })
    db = tmp_path / "r.db"
    done, rss_mb, seconds = fab_measured(["primes", "--inventory", inventory, "--start", "1", "--end", "1e7",
                                          "--db", db], tmp_path, config=config)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert count_of(done.stdout) == PI_1E7
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        events = store.events(run_id)
        assert store.integrity_ok()
        blocks = sorted(store.blocks(run_id), key=lambda b: b["lo"])
    assert blocks[0]["lo"] == 1 and blocks[-1]["hi"] == 10**7
    assert all(b["lo"] == a["hi"] + 1 for a, b in zip(blocks, blocks[1:]))  # one row per block
    flagged = output + "\n" + "\n".join(f"{e['host']} {e['kind']} {e['detail']}" for e in events)
    assert re.search(MODES[mode], flagged), flagged
    if mode == "checksum":  # nothing it computed was kept
        assert all(b["host"] != "h2" for b in blocks)
    assert rss_mb < RSS_LIMIT_MB, f"fab process tree peaked at {rss_mb:.0f} MB"
    print(f"{mode}: {seconds:.1f}s, peak RSS {rss_mb:.0f} MB, "
          f"h2 committed {sum(1 for b in blocks if b['host'] == 'h2')} of {len(blocks)} blocks")


def test_hosts_that_only_send_junk_after_hello_back_off_and_end_the_run(hostile_cluster, tmp_path):
    # Each host starts fine and then talks junk: it is lost, reconnected with a growing
    # back-off (not every second), and when no host ever gives a valid result the run
    # stops with "every host is lost" instead of looping for ever.
    cluster, config = hostile_cluster
    junk = fake_python(tmp_path, "junkonly")
    inventory = cluster.write_inventory(tmp_path / "hosts.ini",
                                        extra={"h1": {"python": junk}, "h2": {"python": junk}})
    db = tmp_path / "r.db"
    done, _, seconds = fab_measured(["primes", "--inventory", inventory, "--start", "1", "--end", "1e7",
                                     "--db", db], tmp_path, config=config, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "every host is lost" in output and "Traceback" not in output
    with Store(db) as store:
        events = store.events(store.runs()[-1]["id"])
    for host in ("h1", "h2"):
        losses = [e["time"] for e in events if e["host"] == host and e["kind"] == "lost"]
        assert len(losses) == 4, "\n".join(f"{e['time']:.1f} {e['host']} {e['kind']} {e['detail']}" for e in events)
        waits = [b - a for a, b in zip(losses, losses[1:])]
        # Each wait is the back-off (1, 2, 4 s) plus a start: never shorter than the back-off.
        assert all(wait >= backoff - 0.05 for wait, backoff in zip(waits, (1, 2, 4))), waits


# ---------------------------------------------------------------- hostile web servers

NO_ROBOTS_DELAY = "User-agent: *\nDisallow: /private\n"
HOSTILE_PATHS = ["/gzipbomb", "/loop", "/slowdrip", "/slowdrip?headers=1", "/hugeheader", "/hugeheader?count=200",
                 "/binary", "/big?size=50000000"]


def test_hostile_web_servers_bounded_and_recorded(tmp_path):
    """Each hostile endpoint on a site of its own (sites are fetched side by side), plus honest pages."""
    servers = [WebServer(robots=NO_ROBOTS_DELAY).start() for _ in HOSTILE_PATHS + ["honest"]]
    try:
        honest = servers[-1]
        hostile = {path: server.url(path) for path, server in zip(HOSTILE_PATHS, servers)}
        pages = [honest.url(f"/page/{n}") for n in range(1, 6)]
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(list(hostile.values()) + pages) + "\n")
        inventory = tmp_path / "local.ini"
        inventory.write_text("[this computer]\naddress = local\nslots = 1\n")
        db = tmp_path / "r.db"
        done, rss_mb, seconds = fab_measured(["scrape", "--urls", urls, "--db", db, "--inventory", inventory,
                                              "--delay", "0", "--timeout", "5", "--concurrency", "8"], tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "Traceback" not in output
        with Store(db) as store:
            run_id = store.runs()[-1]["id"]
            got = {record["url"]: record for record, _ in iter_pages(store, run_id)}
    finally:
        for server in servers:
            server.stop()
    assert len(got) == len(hostile) + len(pages)
    for n, url in enumerate(pages, start=1):  # the honest pages of the same run
        assert (got[url]["status"], got[url]["title"], got[url]["error_kind"]) == (200, f"Page {n}", None)
    kinds = {path: got[url]["error_kind"] for path, url in hostile.items()}
    assert kinds == {"/gzipbomb": None, "/loop": "redirects", "/slowdrip": "timeout", "/slowdrip?headers=1": "timeout",
                     "/hugeheader": "too_big", "/hugeheader?count=200": "too_big", "/binary": None,
                     "/big?size=50000000": None}, kinds
    bomb = got[hostile["/gzipbomb"]]  # kept as sent (a few hundred kB), never inflated to 256 MB
    assert bomb["status"] == 200 and bomb["size"] == len(gzip_bomb(256 << 20)) < 1 << 20 and bomb["title"] is None
    assert bomb["content_encoding"] == "gzip"  # so whoever reads the body knows to inflate it
    assert {r["content_encoding"] for url, r in got.items() if url != hostile["/gzipbomb"]} == {None}
    binary = got[hostile["/binary"]]
    assert (binary["status"], binary["size"], binary["title"]) == (200, len(BINARY_BODY), None)
    assert binary["content_type"] == "application/octet-stream"
    big = got[hostile["/big?size=50000000"]]
    assert (big["status"], big["size"], big["truncated"]) == (200, 5_000_000, 1)  # cut at --max-bytes' default
    assert got[hostile["/slowdrip"]]["status"] == 200 and got[hostile["/slowdrip"]]["size"] <= 10
    assert got[hostile["/loop"]]["status"] == 302
    # The timeouts are retried (4 attempts, 2+4+8 s of back-off): about 34 s for the drips, all sites in parallel.
    assert seconds < 120, seconds
    assert rss_mb < RSS_LIMIT_MB, f"fab process tree peaked at {rss_mb:.0f} MB"
    print(f"scrape: {seconds:.1f}s, peak RSS {rss_mb:.0f} MB")
