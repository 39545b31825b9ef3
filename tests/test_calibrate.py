"""fab calibrate: each host alone, its standalone rate stored for fab stats' sum of parts."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from cluster.calibrate import calibrate_host
from cluster.inventory import Host
from cluster.jobs.primes import PrimesBench
from cluster.store import Store
from harness import run_fab


def local_inventory(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "hosts.ini"
    path.write_text("[this computer]\naddress = local\nslots = 1\n" + extra)
    return path


@pytest.mark.slow
def test_calibrate_primes_on_a_local_host(tmp_path):
    db = tmp_path / "r.db"
    done = run_fab(["calibrate", "--inventory", local_inventory(tmp_path), "--seconds", "1", "--db", db])
    assert done.returncode == 0, done.stderr
    assert "this computer" in done.stdout and "stored" in done.stdout and "numbers/s" in done.stdout
    with Store(db) as store:
        (row,) = store.calibrations("primes")
        assert row["host"] == "this computer" and row["variant"] == ""
        assert row["rate"] > 0
        facts = {h["name"]: h["facts"] for h in store.hosts()}
        assert facts["this computer"]["slots"] == 1


@pytest.mark.slow
def test_calibrate_host_directly():
    bench = PrimesBench(start=10**9)
    outcome = calibrate_host(Host(name="here", address="local", slots=1), None, bench, 1.0)
    assert not outcome.error, outcome.error
    assert bench.next_lo > 10**9 and bench.width >= 100_000
    assert outcome.slots == 1 and outcome.tasks >= 1
    # First task to last result: up to --seconds 1 (a task still running then is not counted).
    assert 0 < outcome.seconds < 60
    assert outcome.rate == pytest.approx(outcome.items / outcome.seconds)
    assert outcome.rate > 1e5  # even the pure-Python sieve does far more than this


@pytest.mark.parametrize("args, message", [
    (["--job", "scrape"], "--job scrape needs --urls FILE"),
    (["--job", "video"], "--job: expected primes or scrape"),
    (["--seconds", "0"], "--seconds: must be greater than 0"),
    (["--seconds", "abc"], "--seconds: expected a number"),
    (["--urls", "x.txt"], "--urls and --tor are for --job scrape"),
    (["--job", "scrape", "--urls", "missing.txt"], "--urls: missing.txt: no such file"),
    (["--job", "scrape", "--urls", "x.txt", "--start", "1e9"], "--start is for --job primes"),
    (["--start", "-5"], "--start: must be at least 0"),
    (["--mode", "both"], "--mode: expected count or list"),
    (["--run", "1", "--mode", "list"], "--run takes the job, mode, range and Tor setting from the run"),
])
def test_usage_errors(tmp_path, args, message):
    done = run_fab(["calibrate", "--inventory", local_inventory(tmp_path), "--db", tmp_path / "r.db", *args],
                   cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.db").exists()  # nothing done


def test_an_unreachable_host_fails_alone(tmp_path):
    """Exit 3: the reachable host is measured and stored, the other is reported."""
    inventory = local_inventory(tmp_path, "[gone]\naddress = root@127.0.0.99\nport = 1\n")
    db = tmp_path / "r.db"
    done = run_fab(["calibrate", "--inventory", inventory, "--seconds", "0.5", "--db", db])
    assert done.returncode == 3, done.stderr
    assert "1 of 2 hosts could not be measured" in done.stderr
    assert "gone" in done.stdout and "failed" in done.stdout
    with Store(db) as store:
        assert [row["host"] for row in store.calibrations("primes")] == ["this computer"]


class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"<html><title>page</title>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_calibrate_scrape_in_pages_per_minute(tmp_path, web):
    urls = tmp_path / "urls.txt"
    urls.write_text("# test pages\n" + "".join(f"{web}/page/{i}\n" for i in range(40)))
    db = tmp_path / "r.db"
    done = run_fab(["calibrate", "--inventory", local_inventory(tmp_path), "--job", "scrape", "--urls", urls,
                    "--seconds", "1", "--db", db])
    assert done.returncode == 0, done.stderr
    assert "pages/min" in done.stdout
    with Store(db) as store:
        (row,) = store.calibrations("scrape")
        assert row["rate"] > 0  # pages per second in the store; shown per minute
    shown = run_fab(["stats", "--db", db, "--format", "json"])
    assert shown.returncode != 0  # calibration alone is not a run
    assert "no runs yet" in shown.stderr


@pytest.mark.slow
def test_stats_uses_only_a_comparable_calibration(tmp_path):
    """A count-mode calibration far away (1e11) gives a near list-mode run no efficiency;
    fab calibrate --run N measures the run's own mode and range, and then it has one."""
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    done = run_fab(["calibrate", "--inventory", inventory, "--seconds", "1", "--db", db])
    assert done.returncode == 0, done.stderr
    run = run_fab(["primes", "--inventory", inventory, "--start", "1", "--end", "2e7", "--db", db], timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(run_fab(["stats", "--db", db, "--last", "--format", "json"]).stdout)
    assert data["sum_standalone"] is None and data["efficiency"] is None
    assert any("no comparable calibration" in note for note in data["notes"])
    done = run_fab(["calibrate", "--inventory", inventory, "--seconds", "1", "--db", db, "--run", "1"])
    assert done.returncode == 0, done.stderr
    shown = run_fab(["stats", "--db", db, "--last", "--format", "json"])
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    with Store(db) as store:
        calibrated = store.calibrations("primes")[-1]
    assert (calibrated["mode"], calibrated["run_id"]) == ("list", 1)
    assert 1 <= calibrated["lo"] <= calibrated["hi"] <= 2 * 10**7
    assert data["sum_standalone"] == pytest.approx(calibrated["rate"])
    assert data["efficiency"] == pytest.approx(data["throughput"] / calibrated["rate"])
    assert data["efficiency_against"] == "sum of parts"
    assert 0 < data["efficiency"] < 2
    assert data["tail"] is not None and data["tail"]["source"] == "event"


@pytest.mark.slow
def test_calibrate_run_and_plot_on_sshd_hosts(make_cluster, tmp_path):
    """Two real sshd hosts plus this computer: calibrate each alone, run, and fab stats --plot."""
    cluster = make_cluster(2)
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={"local": {"slots": 1}})
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    db = tmp_path / "r.db"
    done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_fab(["calibrate", "--inventory", inventory, "--seconds", "1", "--start", "1e9", "--db", db],
                   config=config)
    assert done.returncode == 0, done.stderr
    with Store(db) as store:
        assert sorted(row["host"] for row in store.calibrations("primes")) == ["h1", "h2", "local"]
    done = run_fab(["primes", "--inventory", inventory, "--start", "1", "--end", "1e9", "--count-only",
                    "--db", db], config=config, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = run_fab(["stats", "--db", db, "--last", "--format", "json", "--plot", tmp_path / "img"])
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["sum_standalone"] is not None and data["items"] == 10**9, (data["notes"], data["hosts"])
    # Hosts start working as each says hello: a fast one may finish before a slow one is up.
    assert {h["host"] for h in data["hosts"]} <= {"h1", "h2", "local"} and data["hosts"]
    assert sum(h["share"] for h in data["hosts"]) == pytest.approx(1.0)
    assert len(list((tmp_path / "img").glob("run1-*.png"))) == 3
