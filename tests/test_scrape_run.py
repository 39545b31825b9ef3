"""fab scrape end to end against a real local web server and a real SOCKS5 proxy.

URLs without a proxy name hosts by loopback address only (no name is ever looked up);
``*.test`` names appear only with --tor, where the test SOCKS server resolves them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import fab_argv, fab_env
from harness.socks5 import Socks5Server
from harness.web import WebServer

NO_ROBOTS_DELAY = "User-agent: *\nDisallow: /private\n"


def inventory(tmp_path, names=("this computer",), socks=None, slots=1):
    path = tmp_path / "hosts.ini"
    text = ""
    for name in names:
        text += f"[{name}]\naddress = local\nslots = {slots}\n"
        if socks:
            text += f"socks = {socks}\n"
    path.write_text(text)
    return path


def url_file(tmp_path, urls, name="urls.txt"):
    path = tmp_path / name
    path.write_text("\n".join(urls) + "\n")
    return path


def scrape(run_fab, inv, urls, db, *extra, config=None, timeout=180):
    return run_fab(["scrape", "--inventory", inv, "--urls", urls, "--db", db, *extra], config=config,
                   timeout=timeout)


def pages(db) -> dict:
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        return {record["url"]: record for record, _ in iter_pages(store, run_id)}


@pytest.mark.slow
def test_pages_statuses_robots_and_retries(run_fab, tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY, flaky=1, retry_after=1) as web:
        urls = [web.url(p) for p in ("/page/1", "/page/2", "/redirect/2", "/404", "/flaky", "/429",
                                     "/private/secret", "/big?size=3000000")]
        db = tmp_path / "r.db"
        done = scrape(run_fab, inventory(tmp_path, slots=2), url_file(tmp_path, urls), db, "--delay", "0",
                      "--max-bytes", "1000000")
        assert done.returncode == 0, done.stdout + done.stderr
        got = pages(db)
        assert len(got) == len(urls)
        page1 = got[web.url("/page/1")]
        assert (page1["status"], page1["title"], page1["tor"]) == (200, "Page 1", 0)
        assert got[web.url("/redirect/2")]["final_url"] == web.url("/page/1")
        assert got[web.url("/404")]["status"] == 404
        assert got[web.url("/flaky")]["status"] == 200 and got[web.url("/flaky")]["attempts"] == 2
        assert got[web.url("/429")]["status"] == 200
        big = got[web.url("/big?size=3000000")]
        assert big["truncated"] == 1 and big["size"] == 1_000_000
        assert got[web.url("/private/secret")]["error_kind"] == "robots"
        paths = [r.path for r in web.requests]
        assert "/private/secret" not in paths
        assert paths.count("/robots.txt") == 1  # fetched once per site per run
        throttled = [r.time for r in web.requests if r.path == "/429"]
        assert len(throttled) == 2 and throttled[1] - throttled[0] >= 0.95  # Retry-After: 1
        assert all(r.user_agent.startswith("beowulf/") for r in web.requests)
        assert "8 of 8 URLs fetched" in done.stdout


@pytest.mark.slow
def test_delay_holds_across_hosts_from_the_server_log(run_fab, tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY) as web:
        urls = [web.url(f"/page/{i}") for i in range(8)]
        inv = inventory(tmp_path, names=("one", "two"), slots=2)
        done = scrape(run_fab, inv, url_file(tmp_path, urls), tmp_path / "r.db", "--delay", "0.5")
        assert done.returncode == 0, done.stdout + done.stderr
        starts = sorted(r.time for r in web.requests if r.path.startswith("/page/"))
        assert len(starts) == 8
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= 0.5, gaps


@pytest.mark.slow
def test_crawl_delay_from_robots_is_honoured(run_fab, tmp_path):
    with WebServer(robots="User-agent: *\nCrawl-delay: 0.7\n") as web:
        urls = [web.url(f"/page/{i}") for i in range(4)]
        done = scrape(run_fab, inventory(tmp_path, slots=2), url_file(tmp_path, urls), tmp_path / "r.db",
                      "--delay", "0")
        assert done.returncode == 0, done.stdout + done.stderr
        starts = sorted(r.time for r in web.requests if r.path.startswith("/page/"))
        assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.7


@pytest.mark.slow
def test_crawl_delay_holds_while_busy_hosts_queue_other_sites(run_fab, tmp_path):
    # Two workers, many quick sites: the host is always busy, so it holds a queue of the
    # quick sites' URLs; the Crawl-delay site's requests must still start 0.6 s apart.
    polite = WebServer(robots="User-agent: *\nCrawl-delay: 0.6\n").start()
    quick = [WebServer(robots=NO_ROBOTS_DELAY, latency=0.15).start() for _ in range(5)]
    try:
        urls = [polite.url(f"/page/{i}") for i in range(4)]
        urls += [server.url(f"/page/{i}") for server in quick for i in range(6)]
        done = scrape(run_fab, inventory(tmp_path, slots=1), url_file(tmp_path, urls), tmp_path / "r.db",
                      "--delay", "0", "--concurrency", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(pages(tmp_path / "r.db")) == 34
        starts = sorted(r.time for r in polite.requests if r.path.startswith("/page/"))
        assert len(starts) == 4 and min(b - a for a, b in zip(starts, starts[1:])) >= 0.6
    finally:
        for server in [polite, *quick]:
            server.stop()


@pytest.mark.slow
def test_many_sites_in_parallel(run_fab, tmp_path):
    servers = [WebServer(robots=NO_ROBOTS_DELAY, latency=0.3).start() for _ in range(6)]
    try:
        urls = [server.url(f"/page/{i}") for server in servers for i in range(3)]
        done = scrape(run_fab, inventory(tmp_path, slots=2), url_file(tmp_path, urls), tmp_path / "r.db",
                      "--delay", "0", "--concurrency", "3")
        assert done.returncode == 0, done.stdout + done.stderr
        assert sum(len(s.requests) for s in servers) == 18 + 6
        # Sites are fetched side by side: several page requests arrive while one takes its 0.3 s.
        arrivals = sorted(r.time for s in servers for r in s.requests if r.path.startswith("/page/"))
        together = max(sum(1 for t in arrivals if start <= t < start + 0.3) for start in arrivals)
        assert together >= 3, arrivals
    finally:
        for server in servers:
            server.stop()


def test_a_finished_run_asked_again_fetches_and_writes_nothing(run_fab, tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY) as web:
        listing = url_file(tmp_path, [web.url(f"/page/{i}") for i in range(3)])
        db = tmp_path / "r.db"
        assert scrape(run_fab, inventory(tmp_path), listing, db, "--delay", "0").returncode == 0
        data, stats = db.read_bytes(), run_fab(["stats", "--db", db, "--run", "1", "--format", "json"]).stdout
        web.clear()
        again = scrape(run_fab, inventory(tmp_path), listing, db, "--delay", "0")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.splitlines()[0] == f"run 1 already complete in {db}: nothing to fetch"
        assert "still starting" not in again.stdout and not web.requests
        assert db.read_bytes() == data
        assert run_fab(["stats", "--db", db, "--run", "1", "--format", "json"]).stdout == stats


def test_tor_every_request_through_the_proxy_with_names(run_fab, tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY) as web, Socks5Server() as proxy:
        urls = [web.url(f"/page/{i}", host=f"site{i % 2}.test") for i in range(4)]
        db = tmp_path / "r.db"
        done = scrape(run_fab, inventory(tmp_path, socks=proxy.address, slots=2), url_file(tmp_path, urls), db,
                      "--tor", "--delay", "0")
        assert done.returncode == 0, done.stdout + done.stderr
        assert all(record["tor"] == 1 and record["status"] == 200 for record in pages(db).values())
        asked = [entry.host for entry in proxy.log]
        assert set(asked) == {"site0.test", "site1.test"}  # names, never addresses
        assert len(proxy.log) == len(web.requests) == 4 + 2  # robots.txt went through it too
        assert all(entry.username and entry.username.startswith("beowulf-") for entry in proxy.log)


def test_tor_fails_closed_when_the_proxy_is_down(run_fab, tmp_path):
    with WebServer() as web, Socks5Server() as proxy:
        dead = proxy.address
    with WebServer() as web:
        urls = [web.url(f"/page/{i}") for i in range(3)]
        db = tmp_path / "r.db"
        done = scrape(run_fab, inventory(tmp_path, socks=dead), url_file(tmp_path, urls), db, "--tor")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "SOCKS port" in done.stderr and "does not answer" in done.stderr
        assert web.requests == []


@pytest.mark.slow
def test_bad_url_file_lines_and_skip_bad(run_fab, tmp_path):
    with WebServer(robots=404) as web:
        urls = url_file(tmp_path, ["# list", web.url("/page/1"), "not-a-url", "ftp://x/y", web.url("/page/1")])
        db = tmp_path / "r.db"
        refused = scrape(run_fab, inventory(tmp_path), urls, db)
        assert refused.returncode == 2
        assert f"{urls}:3: no scheme" in refused.stderr and "--skip-bad" in refused.stderr
        assert not db.exists() and web.requests == []
        done = scrape(run_fab, inventory(tmp_path), urls, db, "--skip-bad")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"skipped: {urls}:3:" in done.stdout and f"skipped: {urls}:4:" in done.stdout
        assert "1 duplicate URL fetched once" in done.stdout
        assert [r.path for r in web.requests] == ["/robots.txt", "/page/1"]


@pytest.mark.parametrize("args, words", [
    (["--delay", "-1"], "--delay: must be at least 0"),
    (["--per-domain", "0"], "--per-domain: must be at least 1"),
    (["--concurrency", "x"], "--concurrency: expected a whole number"),
    (["--timeout", "0"], "--timeout: must be greater than 0"),
])
def test_bad_flags(run_fab, tmp_path, args, words):
    urls = url_file(tmp_path, ["http://127.0.0.1:9/"])
    done = scrape(run_fab, inventory(tmp_path), urls, tmp_path / "r.db", *args)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_resume_fetches_only_the_rest_and_export(run_fab, tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY) as web:
        urls = [web.url(f"/page/{i}") for i in range(12)]
        listing = url_file(tmp_path, urls)
        db = tmp_path / "r.db"
        argv = fab_argv(["scrape", "--inventory", inventory(tmp_path), "--urls", listing, "--db", db,
                         "--delay", "0.3", "--quiet"])
        child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    if conn.execute("select count(*) from pages").fetchone()[0] >= 4:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        before = {r.path for r in web.requests if r.path.startswith("/page/")}
        web.clear()
        done = scrape(run_fab, inventory(tmp_path), listing, db, "--delay", "0")
        assert done.returncode == 0, done.stdout + done.stderr
        after = [r.path for r in web.requests if r.path.startswith("/page/")]
        assert len(after) <= 12 - 4 + 1  # at most the one in flight is fetched again
        assert before | set(after) == {f"/page/{i}" for i in range(12)}
        assert len(pages(db)) == 12
        out = tmp_path / "pages.jsonl"
        again = scrape(run_fab, inventory(tmp_path), listing, db, "--export", out)
        assert "already complete" in again.stdout
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 12 and all(r["status"] == 200 for r in records)
        folder = tmp_path / "export"
        scrape(run_fab, inventory(tmp_path), listing, db, "--export", folder)
        first = json.loads((folder / "index.jsonl").read_text().splitlines()[0])
        assert b"<title>Page" in (folder / first["body"]).read_bytes()


@pytest.mark.slow
def test_scrape_over_ssh_hosts_through_tor(make_cluster, run_fab, tmp_path):
    cluster = make_cluster(2)
    with WebServer(robots=NO_ROBOTS_DELAY) as web, Socks5Server() as proxy:
        inv = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": proxy.address, "slots": 1}, "h2": {"socks": proxy.address, "slots": 1},
            "local": {"socks": proxy.address, "slots": 1}})
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        assert run_fab(["setup", "--inventory", inv, "--no-numpy"], config=config).returncode == 0
        urls = [web.url(f"/page/{i}", host=f"s{i % 6}.test") for i in range(18)]
        db = tmp_path / "r.db"
        done = scrape(run_fab, inv, url_file(tmp_path, urls), db, "--tor", "--delay", "0", config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        got = pages(db)
        assert len(got) == 18 and all(r["status"] == 200 and r["tor"] == 1 for r in got.values())
        assert len(proxy.log) == len(web.requests)
        assert {r["host"] for r in got.values()} <= {"h1", "h2", "local"}


def run_in_background(argv):
    return subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    assert condition()


@pytest.mark.slow
def test_proxy_dying_mid_run_sends_its_urls_elsewhere(tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY, latency=0.2) as web, Socks5Server() as doomed, \
            Socks5Server() as steady:
        inv = tmp_path / "two.ini"
        inv.write_text(f"[a]\naddress = local\nslots = 1\nsocks = {doomed.address}\n"
                       f"[b]\naddress = local\nslots = 1\nsocks = {steady.address}\n")
        urls = [web.url(f"/page/{i}", host=f"s{i % 4}.test") for i in range(24)]
        db = tmp_path / "r.db"
        child = run_in_background(fab_argv(["scrape", "--inventory", inv, "--urls", url_file(tmp_path, urls),
                                            "--db", db, "--tor", "--delay", "0", "--concurrency", "2"]))
        wait_for(lambda: len(doomed.log) >= 3)
        doomed.stop()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, out + err
        got = pages(db)
        bad = {u: (r["status"], r["tor"], r.get("error"), r.get("error_kind")) for u, r in got.items()
               if r["status"] != 200 or r["tor"] != 1}
        assert len(got) == 24 and not bad, bad
        # (Whether host a saw its proxy fail before b fetched the rest depends on timing.)
        # Every request the site saw came through one of the two proxies (the dying one
        # may have logged a CONNECT it never got to forward).
        assert len(steady.log) <= len(web.requests) <= len(doomed.log) + len(steady.log)


@pytest.mark.slow
def test_last_proxy_dying_stops_the_run_with_nothing_sent_directly(tmp_path):
    with WebServer(robots=NO_ROBOTS_DELAY, latency=0.2) as web, Socks5Server() as proxy:
        inv = tmp_path / "one.ini"
        inv.write_text(f"[only]\naddress = local\nslots = 1\nsocks = {proxy.address}\n")
        urls = [web.url(f"/page/{i}", host=f"s{i % 3}.test") for i in range(30)]
        db = tmp_path / "r.db"
        child = run_in_background(fab_argv(["scrape", "--inventory", inv, "--urls", url_file(tmp_path, urls),
                                            "--db", db, "--tor", "--delay", "0", "--concurrency", "2"]))
        wait_for(lambda: len(proxy.log) >= 3)
        proxy.stop()
        seen = len(proxy.log)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 1, out + err
        assert "every host is lost" in err and "does not answer" in err
        assert len(web.requests) == seen  # nothing reached the site after the proxy died
        with Store(db) as store:
            assert store.runs()[-1]["state"] == "failed" and store.integrity_ok()


@pytest.mark.slow
def test_dashboard_beside_a_scrape_run(tmp_path):
    """fab scrape --dashboard serves the live page of its store while it runs (the same helper as
    fab primes --dashboard, tasks/common.py run_job), and stops with it."""
    import re
    import urllib.error
    import urllib.request

    with WebServer(robots=NO_ROBOTS_DELAY) as web:
        urls = [web.url(f"/page/{i}") for i in range(5)]  # one site, 0.5 s apart: about 2 s
        db = tmp_path / "r.db"
        child = run_in_background(fab_argv(["scrape", "--inventory", inventory(tmp_path), "--urls",
                                            url_file(tmp_path, urls), "--db", db, "--delay", "0.5",
                                            "--dashboard", "--quiet"]))
        line = child.stderr.readline()
        found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/) ", line)
        assert found, line
        with urllib.request.urlopen(found.group(1) + "api/state", timeout=30) as answer:
            state = json.loads(answer.read())
        assert answer.status == 200 and "runs" in state
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, out + err
        assert len(pages(db)) == 5
        with pytest.raises((urllib.error.URLError, OSError)):  # it ended with the run
            urllib.request.urlopen(found.group(1) + "api/state", timeout=5)
