"""Faults injected into real processes (issue 6, "Faults"): partitions, slow links, a coordinator
killed at random moments, and what is left running on the hosts afterwards.

Every host is a real sshd on 127.0.0.x; network faults go through the harness's TCP relay
(``set_blackhole``: bytes stop without any connection closing, like a partition;
``drop_all``: every connection closed). Where a test needs short timeouts it runs the
Coordinator in this process with a short heartbeat timeout (and, for the agent's idle
timeout, a patched AGENT_IDLE_TIMEOUT); the rest run ``fab`` itself. Time bounds are
generous (this machine's 2 cores are shared and often loaded): they say "within a bounded
time", not how fast. The figures (utilisation, recovery time, efficiency) are measured by
bench/bench_faults.py.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from fabric import Config

import cluster.agents as agents_module
import cluster.coordinator as coordinator_module
from cluster.coordinator import Coordinator
from cluster.inventory import load_inventory
from cluster.jobs.trivial import TrivialJob
from cluster.store import Store
from harness import SshCluster, agent_pids, fab_argv, fab_env, pid_alive, require_sshd, run_fab
from harness.hostile import count_of, session_pids_running

PI_1E8 = 5_761_455
# The in-process coordinators' heartbeat: agents beat every BEAT s, silence for BEAT_TIMEOUT s is a loss.
BEAT, BEAT_TIMEOUT = 1.0, 6.0
# "Within a bounded time": generous, since the machine's load can stall anything for seconds.
BOUND = 45.0
# Root's login shell on the test machines finds `python3` through pyenv shims, which cost
# seconds per agent start when the machine is loaded; an absolute interpreter keeps
# reconnects quick. (Only the time to rejoin depends on it.)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None


# ---------------------------------------------------------------- helpers


@dataclass
class Provisioned:
    """Three sshd hosts, provisioned once for the module, and how to reach them."""

    cluster: SshCluster
    fabric_yaml: Path

    def inventory(self, path: Path, names: list, slots: dict | None = None, local: bool = False) -> Path:
        extra = {}
        for name in names:
            keys = {"python": PYTHON} if PYTHON else {}
            if slots and name in slots:
                keys["slots"] = slots[name]
            extra[name] = keys
        return self.cluster.write_inventory(path, hosts=names, extra=extra, local=local)

    def hosts(self, path: Path, names: list, slots: dict | None = None):
        return load_inventory(self.inventory(path, names, slots))

    def config(self) -> Config:
        """A Fabric config for in-process coordinators: the harness's known_hosts and key."""
        return Config(overrides={
            "beowulf": {"known_hosts": str(self.cluster.known_hosts_path)},
            "connect_kwargs": {"key_filename": str(self.cluster.client_key)},
            "timeouts": {"connect": 10},
        })

    def markers(self) -> dict:
        return {h.name: str(h.workdir) for h in self.cluster}


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    require_sshd()
    base = tmp_path_factory.mktemp("faults")
    with SshCluster(base / "cluster", 3) as cluster:
        setup = Provisioned(cluster, cluster.write_fabric_config(base / "fabric.yaml"))
        inventory = setup.inventory(base / "setup.ini", ["h1", "h2", "h3"])
        done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=setup.fabric_yaml, timeout=280)
        assert done.returncode == 0, done.stdout + done.stderr
        yield setup


@pytest.fixture
def faulty(provisioned, monkeypatch):
    """The provisioned hosts, all running, no relays, and no agent left from an earlier test."""
    # In-process coordinators wait longer for an agent's hello than fab does: on a loaded
    # machine starting Python through a throttled relay can take a minute.
    monkeypatch.setattr(agents_module, "HELLO_TIMEOUT", 180.0)
    provisioned.cluster.ensure_running()
    wait_for(lambda: not any_agents(provisioned), BOUND, "agents of an earlier test to exit")
    yield provisioned
    provisioned.cluster.ensure_running()



def any_agents(provisioned: Provisioned) -> dict:
    """{host: [pids]} for the hosts that still run something of ours."""
    found = {name: agent_pids(marker) for name, marker in provisioned.markers().items()}
    return {name: pids for name, pids in found.items() if pids}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll ``predicate`` until it returns something true; return that, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


def query(db: Path, sql: str, args: tuple = ()) -> list:
    """Rows of ``sql`` on the store while a coordinator writes it ([] if it is not there yet)."""
    if not Path(db).exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def blocks_of(db: Path, host: str, where: str = "1", args: tuple = ()) -> int:
    rows = query(db, f"SELECT count(*) FROM blocks WHERE host = ? AND {where}", (host, *args))
    return rows[0][0] if rows else 0


def lost_event(db: Path, host: str, after: float = 0.0):
    """(time, detail) of the first "lost" event of ``host`` after ``after``, or None."""
    rows = query(db, "SELECT time, detail FROM events WHERE host = ? AND kind = 'lost' AND time > ? ORDER BY time",
                 (host, after))
    return rows[0] if rows else None


class Background:
    """Coordinator.run() in a thread; result() joins it and returns the outcome (or raises its error)."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.outcome = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.outcome = self.coordinator.run()
        except BaseException as err:  # handed to the test
            self.error = err

    def result(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout:.0f}s"
        if self.error is not None:
            raise self.error
        return self.outcome


def run_blocks(db: Path) -> list:
    """The last run's committed blocks, by lo."""
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        assert store.integrity_ok()
        return sorted(store.blocks(run_id), key=lambda b: b["lo"])


def assert_trivial_exact(outcome, db: Path, n: int) -> list:
    """Every item of a TrivialJob(n) done once: one row per block (block = 1 item), no gap."""
    assert outcome.items_total == n and outcome.found_total == n
    blocks = run_blocks(db)
    assert [b["lo"] for b in blocks] == list(range(n))
    return blocks


def assert_tiles(db: Path, start: int, end: int, complete: bool = True) -> list:
    """The last run's blocks lie in [start, end] without overlap (and, if ``complete``, cover it)."""
    blocks = run_blocks(db)
    for before, after in zip(blocks, blocks[1:]):
        if complete:
            assert after["lo"] == before["hi"] + 1, (before, after)
        else:
            assert after["lo"] > before["hi"], (before, after)
    if blocks:
        assert start <= blocks[0]["lo"] and blocks[-1]["hi"] <= end
    if complete:
        assert blocks and blocks[0]["lo"] == start and blocks[-1]["hi"] == end
    return blocks


def sshd_sessions(host) -> list:
    """The per-connection sshd processes under a host's listener."""
    return session_pids_running(host, b"sshd")


# ---------------------------------------------------------------- partition


@pytest.mark.slow
def test_partition_blocks_redone_elsewhere_late_results_ignored_host_rejoins(faulty, tmp_path, caplog):
    cluster = faulty.cluster
    relay = cluster.add_relay("h1")
    hosts = faulty.hosts(tmp_path / "hosts.ini", ["h1", "h2"], slots={"h1": 3, "h2": 1})
    db, n = tmp_path / "r.db", 200
    job = TrivialJob(n, "sleep", args={"seconds": 0.5})
    run = Background(Coordinator(job, hosts, faulty.config(), str(db), beat_seconds=BEAT, beat_timeout=BEAT_TIMEOUT))
    try:
        wait_for(lambda: blocks_of(db, "h1") >= 3, 120, "h1's first blocks")
        old_agents = agent_pids(str(cluster["h1"].workdir))
        assert old_agents
        black = time.time()
        relay.set_blackhole(True)  # packets vanish; no connection is closed

        when, detail = wait_for(lambda: lost_event(db, "h1", after=black), BEAT_TIMEOUT + BOUND, "h1 declared lost")
        assert BEAT_TIMEOUT - BEAT - 0.5 <= when - black <= BEAT_TIMEOUT + BOUND
        given_back = int(re.search(r"(\d+) blocks back", detail).group(1))
        assert given_back >= 1  # h1 had blocks in flight: they go back to be redone
        # ... and h2 redoes them (a block handed out twice is a redo: the endgame is far away).
        wait_for(lambda: blocks_of(db, "h2", "attempts >= 2") >= given_back, BOUND, "h1's blocks redone on h2")
        lift = time.time()
        # Nothing crossed the partition (a result already past the relay may still land just after it).
        assert blocks_of(db, "h1", "finished BETWEEN ? AND ?", (black + 2, lift)) == 0
        relay.set_blackhole(False)
        # The held bytes now reach sshd, among them the coordinator's close: the old agent exits.
        wait_for(lambda: not set(old_agents) & set(agent_pids(str(cluster["h1"].workdir))), BOUND,
                 "h1's old agent to exit once the partition healed")
        # The coordinator reconnects (with back-off) and h1 works again.
        wait_for(lambda: blocks_of(db, "h1", "started > ?", (lift,)) >= 1, 2 * BOUND, "h1 to rejoin")
        assert query(db, "SELECT count(*) FROM events WHERE host = 'h1' AND kind = 'up' AND time > ?", (lift,))[0][0]
        outcome = run.result(240)
    finally:
        relay.set_blackhole(False)
        run.thread.join(240)

    blocks = assert_trivial_exact(outcome, db, n)
    h1 = next(h for h in outcome.hosts if h.name == "h1")
    assert h1.state == "up" and h1.retries >= given_back
    # Late results are ignored: the blocks given back were committed once, by h2, even though
    # h1's old agent finished them during the partition; no result was committed twice.
    redone = [b for b in blocks if b["attempts"] >= 2 and b["finished"] < lift]
    assert len(redone) >= given_back and {b["host"] for b in redone} == {"h2"}
    assert "second result ignored" not in caplog.text


@pytest.mark.slow
def test_partition_longer_than_idle_timeout_agent_exits_by_itself(faulty, tmp_path, monkeypatch):
    idle = 8.0
    monkeypatch.setattr(agents_module, "AGENT_IDLE_TIMEOUT", idle)
    monkeypatch.setattr(coordinator_module, "PING_SECONDS", 1.0)
    cluster = faulty.cluster
    marker = str(cluster["h1"].workdir)
    relay = cluster.add_relay("h1")
    hosts = faulty.hosts(tmp_path / "hosts.ini", ["h1", "h2"], slots={"h1": 2, "h2": 2})
    db, n = tmp_path / "r.db", 60
    job = TrivialJob(n, "sleep", args={"seconds": 0.5})
    run = Background(Coordinator(job, hosts, faulty.config(), str(db), beat_seconds=BEAT, beat_timeout=BEAT_TIMEOUT))
    try:
        wait_for(lambda: blocks_of(db, "h1") >= 2, 120, "h1's first blocks")
        sessions = sshd_sessions(cluster["h1"])
        assert agent_pids(marker) and sessions
        black = time.monotonic()
        relay.set_blackhole(True)
        # Nothing reaches the agent any more, not even an EOF: it leaves on its own idle timeout.
        wait_for(lambda: not agent_pids(marker), idle + BOUND, "h1's agent and workers to exit")
        assert time.monotonic() - black >= idle - 1
        assert relay.blackholed and any(pid_alive(p) for p in sessions)  # sshd never closed its stdin
        outcome = run.result(240)
        assert_trivial_exact(outcome, db, n)
    finally:
        relay.set_blackhole(False)
        run.thread.join(240)
    # A reconnect attempt held by the partition completes now that it healed; the run is
    # over, so it must give up instead of starting an agent nobody would stop.
    wait_for(lambda: relay.connections == 0, BOUND, "the relayed connections to close")
    assert agent_pids(marker) == []


# ---------------------------------------------------------------- slow link


@pytest.mark.slow
def test_result_lines_slower_than_the_heartbeat_timeout_are_not_a_lost_host(faulty, tmp_path):
    """At 25 kB/s a 200 kB result line takes ~8 s to arrive, longer than the 6 s heartbeat
    timeout: bytes still arriving must count as a sign of life."""
    cluster = faulty.cluster
    cluster.add_relay("h1", delay=0.1, bandwidth=25_000)
    hosts = faulty.hosts(tmp_path / "hosts.ini", ["h1"], slots={"h1": 1})
    db, n = tmp_path / "r.db", 2
    job = TrivialJob(n, "blob", args={"bytes": 150_000})
    outcome = Coordinator(job, hosts, faulty.config(), str(db), beat_seconds=BEAT,
                          beat_timeout=BEAT_TIMEOUT).run()
    assert_trivial_exact(outcome, db, n)
    with Store(db) as store:
        assert [e for e in store.events() if e["kind"] == "lost"] == []
    assert outcome.hosts[0].retries == 0


@pytest.mark.slow
def test_slow_link_keeps_slots_busy(faulty, tmp_path):
    """100 ms each way and 1 MB/s: with 2-second blocks the host's slots stay busy (loose bound;
    bench/bench_faults.py measures the figure on real primes blocks)."""
    cluster = faulty.cluster
    cluster.add_relay("h1", delay=0.1, bandwidth=1_000_000)
    slots = 3
    hosts = faulty.hosts(tmp_path / "hosts.ini", ["h1"], slots={"h1": slots})
    db, n = tmp_path / "r.db", 6 * slots
    outcome = Coordinator(TrivialJob(n, "sleep", args={"seconds": 2.0}), hosts, faulty.config(), str(db)).run()
    blocks = assert_trivial_exact(outcome, db, n)
    busy = sum(b["seconds"] for b in blocks)
    window = max(b["finished"] for b in blocks) - min(b["started"] for b in blocks)
    utilisation = busy / (window * slots)
    assert utilisation >= 0.6, f"utilisation {utilisation:.2f} over {window:.1f}s"


@pytest.mark.slow
def test_slow_link_run_is_exact(faulty, tmp_path):
    """fab primes in list mode through 100 ms each way and 1 MB/s: megabytes of results, exact."""
    cluster = faulty.cluster
    cluster.add_relay("h1", delay=0.1, bandwidth=1_000_000)
    inventory = faulty.inventory(tmp_path / "hosts.ini", ["h1"])
    db = tmp_path / "r.db"
    done = run_fab(["primes", "--inventory", inventory, "--start", 1, "--end", "1e8", "--db", db,
                    "--block-seconds", 2], config=faulty.fabric_yaml, cwd=tmp_path, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_of(done.stdout) == PI_1E8
    assert_tiles(db, 1, 10**8)
    assert cluster.relays["h1"].bytes_down > 3_000_000  # the primes really came through the slow link


# ---------------------------------------------------------------- coordinator killed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_coordinator_sigkilled_at_random_moments_then_resumed(faulty, tmp_path):
    """20 SIGKILLs of fab (its whole process group) at random moments on a small range, local
    host plus one SSH host. Each run resumes what the killed one left; after every kill the
    store passes integrity_check and holds non-overlapping blocks; every run that ends has the
    exact answer, and so does the final resume."""
    seed = int(os.environ.get("FAULTS_SEED") or time.time())
    rng = random.Random(seed)
    inventory = faulty.inventory(tmp_path / "hosts.ini", ["h1"], local=True)
    db = tmp_path / "r.db"
    base = ["primes", "--inventory", inventory, "--start", 1, "--end", "1e8", "--db", db, "--quiet",
            "--block-seconds", "0.5"]

    def start(fresh: bool):
        argv = fab_argv(base + (["--fresh"] if fresh else []), config=faulty.fabric_yaml)
        return subprocess.Popen(argv, cwd=tmp_path, env=fab_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def check_finished(child, out, err):
        assert child.returncode == 0, f"seed {seed}: {out}{err}"
        assert count_of(out) == PI_1E8, f"seed {seed}"
        assert_tiles(db, 1, 10**8)

    began = time.monotonic()
    child = start(fresh=False)  # the baseline: how long an uninterrupted run takes here, now
    check_finished(child, *child.communicate(timeout=280))
    typical = time.monotonic() - began

    kills, ended = 0, 0
    fresh = True
    while kills < 20:
        child = start(fresh)
        moment = rng.uniform(0.2, 1.2 * typical)
        try:
            out, err = child.communicate(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            kills += 1
            assert_tiles(db, 1, 10**8, complete=False)  # integrity_check ok, no block twice
            fresh = False
        else:
            ended += 1
            check_finished(child, out, err)
            fresh = True  # start over, so that the next kill has work to interrupt
    done = run_fab(base, config=faulty.fabric_yaml, cwd=tmp_path, timeout=280)
    assert done.returncode == 0, f"seed {seed}: {done.stdout}{done.stderr}"
    assert count_of(done.stdout) == PI_1E8
    assert_tiles(db, 1, 10**8)
    with Store(db) as store:
        assert store.runs()[-1]["state"] == "done"
    print(f"seed {seed}: {kills} kills, {ended} runs ended on their own, baseline {typical:.1f}s")


# ---------------------------------------------------------------- remote leftovers


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["ctrl-c", "sigkill", "dropped link"])
def test_no_agent_or_worker_left_on_any_host(faulty, tmp_path, fault):
    cluster = faulty.cluster
    relay = cluster.add_relay("h1")
    names = ["h1", "h2", "h3"]
    inventory = faulty.inventory(tmp_path / "hosts.ini", names, slots={name: 1 for name in names})
    db = tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "1e12", "--count-only",
                     "--db", db, "--block-seconds", "0.5"], config=faulty.fabric_yaml)
    child = subprocess.Popen(argv, cwd=tmp_path, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        wait_for(lambda: all(blocks_of(db, name) for name in names), 120, "blocks from every host")
        running = any_agents(faulty)
        assert set(running) == set(names)
        if fault == "dropped link":
            relay.drop_all()  # h1's connection closes under the coordinator
            wait_for(lambda: not set(running["h1"]) & set(agent_pids(str(cluster["h1"].workdir))), BOUND,
                     "h1's agent and workers to exit after the link dropped")
            wait_for(lambda: lost_event(db, "h1"), BOUND, "the coordinator to notice")
            os.killpg(child.pid, signal.SIGINT)  # then stop the run to check the other hosts too
            child.communicate(timeout=60)
        elif fault == "ctrl-c":
            os.killpg(child.pid, signal.SIGINT)
            out, err = child.communicate(timeout=60)
            assert child.returncode == 130, out + err
        else:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate(timeout=60)
        wait_for(lambda: not any_agents(faulty), BOUND, f"every agent and worker to exit after {fault}")
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    with Store(db) as store:
        assert store.integrity_ok()
