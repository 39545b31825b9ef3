"""fab dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

During real runs over sshd hosts: progress rises, the per-host values on the page are fab stats'
(--format json) at the same moment, a killed host shows as lost, the finished run shows 100%, a
second run appears without restarting the dashboard. Hostile host names and page titles run
nothing and load nothing. Screenshots are written to $TEST_ARTIFACTS (or the test's tmp folder).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness import fab_argv, fab_env, in_ci
from harness.hostile import provision

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# What the page shows, read in one go: the progress figure, each host row's numbers and state.
READ_PAGE = """
const out = {updates: Number(document.body.getAttribute('data-updates') || 0), hosts: {},
             title: document.getElementById('run-title').textContent};
const p = document.getElementById('fig-progress');
out.progress = p && p.hasAttribute('data-value') ? Number(p.getAttribute('data-value')) : null;
out.progress_text = p ? p.textContent : '';
for (const tr of document.querySelectorAll('#hosts tbody tr')) {
  const row = {state: tr.className};
  for (const td of tr.cells) {
    const key = td.getAttribute('data-field');
    row[key] = td.hasAttribute('data-value') ? Number(td.getAttribute('data-value')) : td.textContent;
  }
  out.hosts[row.host] = row;
}
out.runs = Array.from(document.querySelectorAll('#runs tbody tr')).map(tr => Number(tr.getAttribute('data-run')));
return out;
"""
NUMBERS = ("blocks", "items", "throughput", "speed_busy", "speed_busy_per_slot", "share", "retries", "failures",
           "idle_seconds", "slots")


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ["TEST_ARTIFACTS"]) if os.environ.get("TEST_ARTIFACTS") else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    """A headless Chromium (as root: --no-sandbox), closed afterwards."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "needs chromium and chromium-driver (tests/system-deps.sh installs them)"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        message = "needs selenium (pip install -r requirements-dev.txt)"
        pytest.fail(message) if in_ci() else pytest.skip(message)

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1500", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def read(driver) -> dict:
    return driver.execute_script(READ_PAGE)


def wait_for(driver, check, timeout: float = 60, what: str = ""):
    """Poll the page until ``check(state)`` is truthy; that state."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = read(driver)
        if check(state):
            return state
        time.sleep(0.25)
    raise AssertionError(f"page never showed {what} within {timeout}s; last: {json.dumps(state)[:2000]}")


READ_ITEMS = """
const section = document.getElementById('pages-section');
return {shown: !section.hidden, title: document.getElementById('pages-title').textContent,
        rows: Array.from(document.querySelectorAll('#pages tbody tr')).map(
            tr => Array.from(tr.cells).map(td => td.textContent))};
"""


def wait_for_items(driver, count: int, timeout: float = 60) -> dict:
    """The page's latest-items table once it is shown with ``count`` rows."""
    deadline = time.monotonic() + timeout
    items = None
    while time.monotonic() < deadline:
        items = driver.execute_script(READ_ITEMS)
        if items["shown"] and len(items["rows"]) == count:
            return items
        time.sleep(0.25)
    raise AssertionError(f"the items table never showed {count} rows within {timeout}s; last: {items}")


def next_update(driver, state: dict, timeout: float = 15) -> dict:
    """The page's state after its next poll (the page polls once a second)."""
    return wait_for(driver, lambda s: s["updates"] > state["updates"], timeout, "a new update")


def no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    raise AssertionError(f"an alert ran: {text!r}")


def start_dashboard(db: Path, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(fab_argv(["dashboard", "--db", db, "--port", "0", *extra]), env=fab_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    found = re.search(r"http://\S+", line)
    assert found, line + proc.stderr.read() if proc.poll() is not None else line
    return proc, found.group()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def fab_stats(db: Path, run_id: int, config=None) -> dict:
    done = subprocess.run(fab_argv(["stats", "--db", db, "--run", run_id, "--format", "json"], config),
                          env=fab_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def blocks_of(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from blocks").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_live_run_over_sshd_hosts(make_cluster, tmp_path, browser):
    """One dashboard, opened before the store exists, follows a run over three sshd hosts to its end
    (h3 killed on the way), then a second run of another coordinator, without being restarted."""
    shots = artifacts(tmp_path)
    cluster = make_cluster(3)
    inventory, config = provision(cluster, tmp_path)
    db = tmp_path / "r.db"
    board, url = start_dashboard(db, "--wait")
    run = None
    try:
        browser.get(url)
        wait_for(browser, lambda s: s["updates"] >= 1, 30, "a first update")
        assert "no store yet" in browser.find_element("id", "error").text
        run = subprocess.Popen(fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "2e11",
                                         "--count-only", "--db", db, "--block-seconds", "0.5", "--dashboard"],
                                        config),
                               env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        # fab primes --dashboard prints its own dashboard's URL: it serves the same page.
        beside = run.stderr.readline()
        found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/) ", beside)
        assert found, beside
        with urllib.request.urlopen(found.group(1) + "api/state", timeout=30) as answer:
            assert answer.status == 200 and "runs" in json.loads(answer.read())
        first = wait_for(browser, lambda s: s["progress"] is not None and 0 < s["progress"] < 0.5, 120,
                         "the run started")
        browser.save_screenshot(str(shots / "dashboard-running.png"))
        rising = wait_for(browser, lambda s: s["progress"] is not None and s["progress"] > first["progress"], 60,
                          "progress rising")
        assert rising["progress"] <= 1.0

        # The page against fab stats at the same moment: items between two page reads around it.
        before = next_update(browser, rising)
        stats = fab_stats(db, 1, config)
        after = next_update(browser, read(browser))
        assert stats["run"]["state"] == "running" and stats["live"]
        for host in stats["hosts"]:
            name = host["host"]
            assert before["hosts"][name]["items"] <= host["items"] <= after["hosts"][name]["items"], name
            assert before["hosts"][name]["slots"] == host["slots"]
            if host["throughput"]:
                assert after["hosts"][name]["throughput"] == pytest.approx(host["throughput"], rel=0.5), name
        assert before["progress"] <= stats["progress"] <= after["progress"]

        cluster["h3"].kill()  # the listener and every session: the machine dropped off
        lost = wait_for(browser, lambda s: s["hosts"].get("h3", {}).get("state") == "lost", 120, "h3 lost")
        browser.save_screenshot(str(shots / "dashboard-h3-lost.png"))
        assert lost["hosts"]["h1"]["state"] in ("up", "")
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, out + err

        done = wait_for(browser, lambda s: s["progress_text"] == "100.0%" and "done" in s["title"], 60,
                        "the finished run at 100%")
        browser.save_screenshot(str(shots / "dashboard-done.png"))
        stats = fab_stats(db, 1, config)
        assert done["progress"] == stats["progress"] == 1.0
        assert done["hosts"]["h3"]["state"] == "lost"
        for host in stats["hosts"]:  # a finished run's figures never change: equal
            shown = done["hosts"][host["host"]]
            for key in NUMBERS:
                assert shown[key] == pytest.approx(host[key], rel=1e-12, abs=1e-12), (host["host"], key)

        # Another coordinator's run, into the same store: the page follows it, no restart.
        cluster["h3"].start()
        again = subprocess.run(fab_argv(["primes", "--inventory", inventory, "--start", "1e9", "--end", "1.1e9",
                                         "--db", db, "--block-seconds", "0.4", "--quiet"], config),
                               env=fab_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        second = wait_for(browser, lambda s: s["runs"][:1] == [2] and s["title"].startswith("run 2:")
                          and s["progress_text"] == "100.0%", 60, "run 2")
        assert set(second["runs"]) == {1, 2}
        browser.save_screenshot(str(shots / "dashboard-second-run.png"))
        no_alert(browser)

        # A fab map run with one failing item: its latest items, the failure among them, are listed.
        mapped = subprocess.run(fab_argv(["map", "--command", "test {} -ne 7", "--range", "1:12", "--retries", "0",
                                          "--inventory", inventory, "--db", db, "--quiet"], config),
                                env=fab_env(), capture_output=True, text=True, timeout=300)
        assert mapped.returncode == 1, mapped.stdout + mapped.stderr
        wait_for(browser, lambda s: s["runs"][:1] == [3] and s["progress_text"] == "100.0%", 60, "run 3")
        items = wait_for_items(browser, 12)
        assert items["title"] == "latest items"
        by_seq = {row[0]: row for row in items["rows"]}
        assert set(by_seq) == {str(n) for n in range(1, 13)}
        assert by_seq["7"][1] == "failed" and by_seq["1"][1] == "ok", by_seq
        assert all(row[2] in ("h1", "h2", "h3") for row in items["rows"]), items["rows"]
        heads = browser.execute_script("return Array.from(document.querySelectorAll('#hosts thead th'))"
                                       ".map(th => th.textContent)")
        assert "items" in heads and "numbers" not in heads, heads  # the map run's unit, not primes'
        browser.save_screenshot(str(shots / "dashboard-map-run.png"))
        no_alert(browser)
        assert board.poll() is None  # the same dashboard process all along
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        stop(board)


class _Evil(http.server.BaseHTTPRequestHandler):
    """A web server whose page title is hostile; it records every request (the injected URLs point here)."""

    seen: list = []
    title = ""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append(self.path)
        if self.path.startswith("/page"):
            body = f"<!DOCTYPE html><html><head><title>{self.title}</title></head><body>hi</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
        else:
            body = b"no"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow
def test_hostile_host_name_and_page_title_run_nothing(tmp_path, browser):
    """A host named, and a page titled, with <script> and "><img onerror=...>: shown as text, nothing runs,
    nothing is fetched from the injected URLs (a real web server records every request)."""
    shots = artifacts(tmp_path)
    handler = type("Evil", (_Evil,), {"seen": []})
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = evil.server_address[1]
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    pwned = f"http://127.0.0.1:{port}/pwned"
    handler.title = (f"<script>alert('title')</script>\"><img src={pwned}-title onerror=alert(1)>"
                     f"<svg onload=alert(2)><iframe src={pwned}-frame>")
    host_name = f"h<script>alert('host')</script>\"><img src={pwned}-host onerror=alert(3)>"
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"[{host_name}]\naddress = local\nslots = 1\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:{port}/page{i}\n" for i in range(3)) +
                    f"http://127.0.0.1:{port}/missing\"><img src={pwned}-url>\n")
    db = tmp_path / "r.db"
    try:
        done = subprocess.run(fab_argv(["scrape", "--inventory", inventory, "--urls", urls, "--db", db,
                                        "--delay", "0", "--skip-bad"]),
                              env=fab_env(), capture_output=True, text=True, timeout=180)
        assert done.returncode in (0, 3), done.stdout + done.stderr
        fetched = [p for p in handler.seen if p.startswith("/page")]
        assert fetched, handler.seen
        board, url = start_dashboard(db)
        try:
            browser.get(url)
            state = wait_for(browser, lambda s: s["progress_text"] == "100.0%" and len(s["hosts"]) == 1, 60,
                             "the scrape run")
            next_update(browser, next_update(browser, state))  # a few more polls, redrawing everything
            browser.save_screenshot(str(shots / "dashboard-hostile.png"))
            no_alert(browser)
            injected = browser.execute_script(
                "return Array.from(document.querySelectorAll('img, iframe, object, embed')).length"
                " + document.querySelectorAll('script').length - 1"
                " + document.querySelectorAll('svg script, svg foreignObject, svg image').length")
            assert injected == 0
            assert not [p for p in handler.seen if "pwned" in p], handler.seen
            # Shown as text, exactly.
            assert list(read(browser)["hosts"]) == [host_name]
            titles = [td.text for td in browser.find_elements("css selector", "#pages tbody td")]
            assert any("<script>alert('title')</script>" in t and "onerror=alert(1)" in t for t in titles), titles
        finally:
            stop(board)
        assert not [p for p in handler.seen if "pwned" in p], handler.seen
    finally:
        evil.shutdown()
        evil.server_close()


@pytest.mark.slow
def test_page_keeps_updating_with_100_hosts_and_a_million_items(tmp_path, browser):
    """100 hosts, 20,000 blocks of a 1e6-item run: every host is listed, the page keeps polling and drawing."""
    from test_dashboard import big_store

    db = tmp_path / "big.db"
    big_store(db)
    board, url = start_dashboard(db)
    try:
        browser.get(url)
        state = wait_for(browser, lambda s: len(s["hosts"]) == 100, 60, "100 hosts")
        assert state["progress_text"] == "100.0%"
        later = next_update(browser, next_update(browser, next_update(browser, state)))
        assert len(later["hosts"]) == 100
        bars = browser.execute_script("return document.querySelectorAll('#timeline-chart rect').length")
        assert 4000 <= bars <= 4100  # the latest 4,000 blocks, plus the tail's shade
        render_ms = browser.execute_script("return Number(document.body.getAttribute('data-render-ms'))")
        print(f"render of one update with 100 hosts: {render_ms} ms")
        browser.save_screenshot(str(artifacts(tmp_path) / "dashboard-100-hosts.png"))
        no_alert(browser)
    finally:
        stop(board)
