"""Tor and network errors say what happened (README.md, "Tor" and "Scrape").

- A tor that answers SOCKS but is not bootstrapped (a FakeTor stuck at 14%, no
  circuit) is shown as such by ``fab tor.status`` and left out by ``fab scrape --tor``
  before any request reaches the site.
- A site that refuses connections (a real closed port on 127.0.0.x) or has no DNS
  (a ``.invalid`` name: RFC 6761 reserves it, the resolver fails it) is reported with
  that network error for each of its URLs, not as a robots.txt refusal.
- Repeated identical errors are summarised once with a count.
"""

from __future__ import annotations

import pytest

from client import torhost
from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import free_port
from harness.tor import FakeTor
from harness.web import WebServer

STUCK = 'PROGRESS=14 TAG=handshake_dir SUMMARY="Handshaking with a relay"'


def section(name: str, **keys) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())


def url_file(tmp_path, urls, name="urls.txt"):
    path = tmp_path / name
    path.write_text("\n".join(urls) + "\n")
    return path


def pages(db) -> dict:
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        return {record["url"]: record for record, _ in iter_pages(store, run_id)}


# ---------------------------------------------------------------- 1. tor not bootstrapped


def test_bootstrap_phase_parsing():
    from cluster.tor import bootstrap_text, not_bootstrapped

    phase = torhost.bootstrap_of('NOTICE BOOTSTRAP PROGRESS=14 TAG=handshake_dir SUMMARY="Handshaking with a relay"')
    assert phase == {"progress": 14, "tag": "handshake_dir", "summary": "Handshaking with a relay"}
    warned = torhost.bootstrap_of('WARN BOOTSTRAP PROGRESS=14 TAG=handshake SUMMARY="Handshaking with a relay" '
                                  'WARNING="DONE" REASON=NOROUTE COUNT=3 RECOMMENDATION=ignore')
    assert warned["progress"] == 14 and warned["warning"] == "NOROUTE"
    for junk in (None, "", "NOTICE", "NOTICE BOOTSTRAP PROGRESS=999", "NOTICE OTHER PROGRESS=100",
                 'NOTICE BOOTSTRAP PROGRESS=1 SUMMARY="\x1b[2Jx'):
        assert torhost.bootstrap_of(junk)["progress"] in (None, 1)
    hostile = torhost.bootstrap_of('NOTICE BOOTSTRAP PROGRESS=3 TAG=a SUMMARY="\x1b[31mred"')
    assert "\x1b" not in hostile["summary"]
    control = {"auth": "safecookie", "circuit": "0", **phase}
    assert bootstrap_text(control) == "14% handshake_dir: Handshaking with a relay"
    assert "not bootstrapped (14% handshake_dir" in not_bootstrapped(control)
    assert not_bootstrapped({**control, "progress": 100}) is None
    assert not_bootstrapped({**control, "auth": None}) is None  # unknown: only SOCKS decides


@pytest.mark.slow
def test_tor_not_bootstrapped_is_shown_and_refused_before_any_request(run_fab, tmp_path):
    """A tor whose SOCKS port answers but which is stuck at 14%: tor.status says so; scrape --tor
    leaves it out before any request (the site's log stays empty), and with no host left exits 1."""
    with WebServer() as web, FakeTor(bootstrap=STUCK, circuit="0") as stuck, FakeTor() as ready:
        inventory = tmp_path / "hosts.ini"
        inventory.write_text(section("stuck", address="local", slots=1, **stuck.inventory_keys())
                             + section("ready", address="local", slots=1, **ready.inventory_keys()))
        done = run_fab(["tor.status", "--inventory", inventory])
        assert done.returncode == 3, done.stdout + done.stderr
        lines = {line.split()[0]: line for line in done.stdout.splitlines()[2:-1]}
        assert "14% handshake_dir: Handshaking with a relay" in lines["stuck"]
        assert lines["stuck"].rstrip().endswith("not bootstrapped")
        assert "100% done" in lines["ready"] and lines["ready"].rstrip().endswith(" ok")
        assert "1 tors bootstrapped" in done.stdout and "1 of 2 hosts failed: stuck" in done.stderr

        urls = url_file(tmp_path, [web.url(f"/page/{i}", host=f"s{i % 2}.test") for i in range(4)])
        only_stuck = tmp_path / "stuck.ini"
        only_stuck.write_text(section("stuck", address="local", slots=1, **stuck.inventory_keys()))
        db = tmp_path / "r.db"
        done = run_fab(["scrape", "--inventory", only_stuck, "--urls", urls, "--db", db, "--tor", "--delay", "0"])
        assert done.returncode == 1, done.stdout + done.stderr
        last = done.stderr.strip().splitlines()[-1]  # the error (after the live "left out" warning)
        assert "Traceback" not in done.stderr and last.startswith("error: no host could start")
        assert "stuck: --tor: tor is not bootstrapped (14% handshake_dir: Handshaking with a relay; " \
               "circuit established: no)" in last
        assert web.requests == [] and stuck.socks.log == []  # nothing sent, directly or through tor

        done = run_fab(["scrape", "--inventory", inventory, "--urls", urls, "--db", db, "--tor", "--delay", "0"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "warning: left out: stuck: --tor: tor is not bootstrapped (14% handshake_dir" in done.stdout
        got = pages(db)
        assert len(got) == 4 and all(r["host"] == "ready" and r["tor"] == 1 for r in got.values())
        assert stuck.socks.log == [] and len(ready.socks.log) == len(web.requests) == 4 + 2


# ---------------------------------------------------------------- 2, 3. unreachable sites, counted errors


def test_tallied_and_repeat_filter():
    import logging

    from cluster.tally import RepeatFilter, tallied

    refused = "connection refused (127.0.0.9:1)"
    assert tallied([refused] * 12 + ["DNS failure (x.invalid: name or service not known)"]) == [
        f"12 x {refused}", "DNS failure (x.invalid: name or service not known)"]
    assert tallied(["a", "b", "b", "c", "d"], limit=3) == ["2 x b", "a", "... and 2 other messages"]
    assert tallied([]) == []
    repeat = RepeatFilter(shown=2)

    def record(message, *args, level=logging.INFO, name="cluster.coordinator"):
        return logging.LogRecord(name, level, __file__, 1, message, args, None)

    shown = [repeat.filter(record("%s: item %d again in %.1fs (%s)", "h1", item, 2.0, refused)) for item in range(5)]
    assert shown == [True, True, False, False, False]
    assert repeat.filter(record("h1: something else"))
    assert all(repeat.filter(record("left out: h%d: cannot connect", n)) for n in range(5))  # names differ
    assert repeat.filter(record("lost", level=logging.ERROR)) and repeat.filter(record("lost", level=logging.ERROR))
    assert all(repeat.filter(record("%d%% done", n, name="cluster.progress")) for n in range(5))
    assert repeat.summary() == [f"3 more like: h1: item 4 again in 2.0s ({refused})"]


def repeated_lines(text: str) -> dict:
    """Lines of a run's stderr that came more than twice but for their numbers (progress lines aside)."""
    import re
    from collections import Counter

    counts = Counter(re.sub(r"\d+(?:\.\d+)?", "#", line) for line in text.splitlines() if "%" not in line)
    return {line: n for line, n in counts.items() if n > 2}


def summary_errors(stdout: str) -> list:
    return [line.strip()[len("error: "):] for line in stdout.splitlines() if line.startswith("  error: ")]


@pytest.mark.slow
def test_unreachable_sites_report_their_network_error_over_an_ssh_host(ssh_cluster, run_fab, tmp_path):
    """Over a real sshd host: a closed port on 127.0.0.9 (directly, then through tor) and a name
    that does not resolve (``.invalid``, through tor: the test proxy never resolves it, so no
    query leaves this computer) are recorded as connection refused / DNS failure for each URL,
    and the summary says each distinct error once with its count."""
    config = ssh_cluster.write_fabric_config(tmp_path / "fabric.yaml")
    plain = ssh_cluster.write_inventory(tmp_path / "plain.ini", hosts=["h1"], extra={"h1": {"slots": 1}})
    assert run_fab(["setup", "--inventory", plain, "--no-numpy"], config=config, timeout=300).returncode == 0
    closed = free_port("127.0.0.9")
    dead = [f"http://127.0.0.9:{closed}/page/{i}" for i in range(2)]
    with WebServer() as web:
        good = [web.url(f"/page/{i}") for i in range(2)]
        db = tmp_path / "direct.db"
        done = run_fab(["scrape", "--inventory", plain, "--urls", url_file(tmp_path, dead + good), "--db", db,
                        "--delay", "0"], config=config, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        got = pages(db)
        for url in dead:
            assert got[url]["error_kind"] == "connect"
            assert got[url]["error"] == f"connection refused (127.0.0.9:{closed})"
            assert got[url]["host"] == "h1"
        assert all(got[url]["status"] == 200 for url in good)
        assert "robots" not in done.stdout and "(2xx 2, connect 2)" in done.stdout
        assert summary_errors(done.stdout) == [f"2 x connection refused (127.0.0.9:{closed})"]
        # Each retry of a refused URL was one console line: now two are shown, the rest counted.
        assert repeated_lines(done.stderr) == {}, done.stderr
        assert "more like: h1: item" in done.stdout and f"(127.0.0.9:{closed}))" in done.stdout

    with WebServer() as web, FakeTor(ip=ssh_cluster["h1"].ip) as tor:
        inventory = ssh_cluster.write_inventory(tmp_path / "tor.ini", hosts=["h1"],
                                                extra={"h1": {"slots": 1, **tor.inventory_keys()}})
        nowhere = [web.url(f"/page/{i}", host="nonexistent.invalid") for i in range(3)]
        refused = [f"http://127.0.0.9:{closed}/tor"]
        good = [web.url(f"/page/{i}", host="site.test") for i in range(2)]
        db = tmp_path / "tor.db"
        done = run_fab(["scrape", "--inventory", inventory, "--urls", url_file(tmp_path, nowhere + refused + good),
                        "--db", db, "--tor", "--delay", "0"], config=config, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        got = pages(db)
        port = web.port
        for url in nowhere:
            assert got[url]["error_kind"] == "dns"
            assert got[url]["error"] == f"DNS failure or host unreachable (nonexistent.invalid:{port}, via proxy)"
        assert got[refused[0]]["error"] == f"connection refused (127.0.0.9:{closed}, via proxy)"
        assert all(got[url]["status"] == 200 and got[url]["tor"] == 1 for url in good)
        assert "robots" not in done.stdout and "(2xx 2, connect 1, dns 3)" in done.stdout
        assert summary_errors(done.stdout) == [
            f"3 x DNS failure or host unreachable (nonexistent.invalid:{port}, via proxy)",
            f"connection refused (127.0.0.9:{closed}, via proxy)"]
        # The name was never resolved: the proxy answered 0x04 for it, and only site.test reached the server.
        assert {entry.reply for entry in tor.socks.log if entry.host == "nonexistent.invalid"} == {4}
        assert {request.vhost for request in web.requests} == {"site.test"}
