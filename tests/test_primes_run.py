"""fab primes end to end: answers, edges, flags, export, resume, and faults on real sshd hosts."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from cluster.jobs.primes import is_prime
from cluster.store import Store
from harness import agent_pids, descendant_pids, fab_argv, fab_env
from harness.hostile import assert_blocks_tile, count_of, executable, provision

PI = {10: 4, 100: 25, 1000: 168, 10**4: 1229, 10**5: 9592, 10**6: 78498, 10**7: 664579, 10**8: 5761455}


def local_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "local.ini"
    path.write_text("[this computer]\naddress = local\n")
    return path


def primes(run_fab, inventory, start, end, db, *extra, config=None, timeout=300, env=None):
    return run_fab(["primes", "--inventory", inventory, "--start", start, "--end", end, "--db", db, *extra],
                   config=config, timeout=timeout, env=env)


@pytest.fixture
def ssh_env(make_cluster, tmp_path):
    """Three provisioned sshd hosts plus the config to reach them."""
    cluster = make_cluster(3)
    inventory, config = provision(cluster, tmp_path)
    return cluster, inventory, config



def wait_for_blocks(db: Path, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    if conn.execute("select count(*) from blocks").fetchone()[0] >= at_least:
                        return
            except sqlite3.Error:
                pass
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} blocks committed within {timeout}s")


# ---------------------------------------------------------------- local host


@pytest.mark.parametrize("end", sorted(PI))
def test_pi_local(run_fab, tmp_path, end):
    done = primes(run_fab, local_inventory(tmp_path), 1, end, tmp_path / "r.db")
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == PI[end]


@pytest.mark.parametrize("start, end, expected", [
    (0, 0, 0), (0, 1, 0), (1, 1, 0), (0, 2, 1), (2, 2, 1), (3, 3, 1), (4, 4, 0), (49, 49, 0), (2, 3, 2),
    (24, 29, 1), (10**15 - 2000, 10**15, None), (999_999_000, 1_000_001_000, None),
])
def test_edges(run_fab, tmp_path, start, end, expected):
    if expected is None:
        expected = sum(1 for n in range(start, end + 1) if is_prime(n))
    db = tmp_path / "r.db"
    out = tmp_path / "p.txt"
    done = primes(run_fab, local_inventory(tmp_path), start, end, db, "--export", out)
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == expected
    exported = [int(line) for line in out.read_text().split()]
    assert exported == [n for n in range(start, end + 1) if is_prime(n)]


def test_number_spellings_are_one_run(run_fab, tmp_path):
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    first = primes(run_fab, inventory, "1", "1e6", db)
    assert first.returncode == 0 and count_of(first.stdout) == 78498
    again = primes(run_fab, inventory, "1", "1_000_000", db)
    assert "already complete" in again.stdout and count_of(again.stdout) == 78498


def test_a_finished_run_asked_again_writes_nothing(run_fab, tmp_path):
    """No session added, the same fab stats figures, the same store bytes, no 'still starting' line."""
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    assert primes(run_fab, inventory, 1, "1e5", db).returncode == 0
    stats = run_fab(["stats", "--db", db, "--run", "1", "--format", "json"]).stdout
    data = db.read_bytes()
    again = primes(run_fab, inventory, 1, "1e5", db)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"run 1 already complete in {db}: nothing to compute",
                                         f"9,592 primes in [1, 100,000] (run 1, {db})"]
    assert db.read_bytes() == data
    assert run_fab(["stats", "--db", db, "--run", "1", "--format", "json"]).stdout == stats


def test_one_prime_is_singular(run_fab, tmp_path):
    done = primes(run_fab, local_inventory(tmp_path), 2, 2, tmp_path / "r.db")
    assert done.returncode == 0 and f"1 prime in [2, 2] (run 1, {tmp_path / 'r.db'})" in done.stdout, done.stdout
    assert count_of(done.stdout) == 1


@pytest.mark.parametrize("args, words", [
    (["--start", "10", "--end", "1"], "must not be greater than --end"),
    (["--start", "-5", "--end", "10"], "--start: must be at least 0"),
    (["--start", "abc", "--end", "10"], "--start: expected a whole number"),
    (["--start", "1.5", "--end", "10"], "--start: expected a whole number"),
    (["--start", "1", "--end", "1e16"], "--end: must be at most"),
    (["--start", "1", "--end", "10", "--block-seconds", "0"], "--block-seconds: must be greater than 0"),
    (["--start", "1", "--end", "10", "--block-seconds", "x"], "--block-seconds: expected a number"),
    (["--start", "1", "--end", "10", "--verify", "2"], "--verify: must be at most 1"),
    (["--start", "1", "--end", "10", "--count-only", "--export", "x.txt"], "cannot be used with --count-only"),
    (["--end", "10"], "--start and --end are required"),
    (["--start", "1", "--end", "10", "--hosts", "nope"], "--hosts: nope not in"),
    # Caught by fab's own parser before the task runs: exit 2 all the same.
    (["--strat", "1", "--end", "10"], "No idea what '--strat' is!"),
    (["--start", "1", "--end"], "needed value and was not given one"),
])
def test_bad_flags(run_fab, tmp_path, args, words):
    db = tmp_path / "r.db"
    done = run_fab(["primes", "--inventory", local_inventory(tmp_path), "--db", db, *args])
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not db.exists()


def test_unknown_task_is_a_usage_error(run_fab):
    done = run_fab(["primez"])
    assert done.returncode == 2 and "No idea what 'primez' is!" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_export_streams_in_order_without_recomputing(run_fab, tmp_path):
    inventory, db, out = local_inventory(tmp_path), tmp_path / "r.db", tmp_path / "primes.txt"
    done = primes(run_fab, inventory, 1, 10**6, db, "--block-seconds", "0.05")
    assert done.returncode == 0
    blocks = assert_blocks_tile(db, 1, 10**6)
    assert len(blocks) > 3
    exported = primes(run_fab, inventory, 1, 10**6, db, "--export", out)
    assert "already complete" in exported.stdout
    numbers = [int(line) for line in out.read_text().splitlines()]
    assert len(numbers) == 78498 and numbers[0] == 2 and numbers[-1] == 999983
    assert all(a < b for a, b in zip(numbers, numbers[1:]))


def test_count_only_and_fresh(run_fab, tmp_path):
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    done = primes(run_fab, inventory, 1, 10**7, db, "--count-only")
    assert done.returncode == 0 and count_of(done.stdout) == 664579
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        assert all(payload is None for _, _, payload in store.iter_payloads(run_id))
    fresh = primes(run_fab, inventory, 1, 10**7, db, "--count-only", "--fresh")
    assert "already complete" not in fresh.stdout and count_of(fresh.stdout) == 664579


@pytest.mark.slow
def test_count_only_exact_at_1e10_and_against_primesieve(run_fab, tmp_path):
    """pi(10^10) = 455,052,511; a range off the powers of ten against the primesieve command."""
    inventory = local_inventory(tmp_path)
    done = primes(run_fab, inventory, 1, "1e10", tmp_path / "a.db", "--count-only")
    assert done.returncode == 0 and count_of(done.stdout) == 455_052_511, done.stdout + done.stderr
    start, end = 123_456_789_012, 123_456_789_012 + 3 * 10**9 + 17
    done = primes(run_fab, inventory, start, end, tmp_path / "b.db", "--count-only", "--block-seconds", "0.2")
    assert done.returncode == 0, done.stderr
    if shutil.which("primesieve"):
        cli = subprocess.run(["primesieve", str(start), str(end), "-c", "--no-status"], capture_output=True,
                             text=True, check=True).stdout
        assert count_of(done.stdout) == int(cli.split("Primes:")[1].split()[0])
    assert len(assert_blocks_tile(tmp_path / "b.db", start, end)) > 2


@pytest.mark.slow
def test_count_only_and_smaller_ranges_answered_from_a_finished_list_run(run_fab, tmp_path):
    inventory, db, out = local_inventory(tmp_path), tmp_path / "r.db", tmp_path / "sub.txt"
    done = primes(run_fab, inventory, 1, 10**6, db, "--block-seconds", "0.05")
    assert done.returncode == 0 and count_of(done.stdout) == 78498
    assert len(assert_blocks_tile(db, 1, 10**6)) > 3  # so that the ranges below cut blocks
    reference = [n for n in range(1000, 500_001) if is_prime(n)]
    for args, expected in ((("1000", "5e5", "--count-only"), len(reference)),
                           (("1", "1e6", "--count-only"), 78498),
                           (("2", "10", "--count-only"), 4),
                           (("1000", "500000", "--export", out), len(reference))):
        answered = primes(run_fab, inventory, args[0], args[1], db, *args[2:])
        assert answered.returncode == 0, answered.stderr
        assert count_of(answered.stdout) == expected, answered.stdout
        assert "nothing computed" in answered.stdout and "finished run 1" in answered.stdout
    assert out.read_text() == "".join(f"{p}\n" for p in reference)
    with Store(db) as store:
        assert [r["id"] for r in store.runs()] == [1]  # no run was opened, nothing computed
    # --fresh computes; a range the finished run does not cover is computed too
    for args in (("1000", "5e5", "--count-only", "--fresh"), ("1000", "2e6", "--count-only")):
        computed = primes(run_fab, inventory, args[0], args[1], db, *args[2:])
        assert computed.returncode == 0 and "nothing computed" not in computed.stdout
    assert count_of(computed.stdout) == 148933 - 168


@pytest.mark.slow
def test_resume_after_sigkill_of_coordinator(tmp_path, run_fab):
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "3e8", "--db", db,
                     "--block-seconds", "0.2", "--quiet"])
    child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        wait_for_blocks(db, 5)
        # This run's own agent and workers (other fab runs on the machine may use the same name).
        agents = [pid for pid in descendant_pids(child.pid) if pid in agent_pids("this computer")]
        assert agents
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    with Store(db) as store:
        assert store.integrity_ok()
        run_id = store.runs()[-1]["id"]
        partial_blocks = store.blocks(run_id)
    partial = len(partial_blocks)
    covered = sum(b["hi"] - b["lo"] + 1 for b in partial_blocks)
    assert partial >= 5
    # The local agent saw its stdin close when the coordinator died, and took its workers with it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(agents) & set(agent_pids("this computer")):
        time.sleep(0.2)
    assert set(agents) & set(agent_pids("this computer")) == set()
    resumed = primes(run_fab, inventory, 1, "3e8", db)
    assert resumed.returncode == 0, resumed.stderr
    assert count_of(resumed.stdout) == 16252325
    blocks = assert_blocks_tile(db, 1, 3 * 10**8)
    # On a loaded machine the kill can land after the last commit: then the resumed run has nothing to do.
    if covered < 3 * 10**8:
        assert len(blocks) > partial
    else:
        assert len(blocks) == partial


# ---------------------------------------------------------------- ssh hosts

# The "python" of a host: hands everything to the real python3, then edits what its agent
# says. "slow": an honest host that starts 5 s late; "count": every count-mode result
# claims one prime more in each part than there is (the total adds up).
LYING_PYTHON = r'''#!/usr/bin/env python3
import json, os, subprocess, sys, time
MODE = %(mode)r
if MODE == "slow":
    time.sleep(5)
    os.execvp("python3", ["python3"] + sys.argv[1:])
agent = subprocess.Popen(["python3"] + sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)
try:
    for line in agent.stdout:
        message = json.loads(line)
        result = message.get("result") if message.get("type") == "result" and message.get("ok") else None
        if isinstance(result, dict) and "data" not in result and result.get("count"):
            counts = result.get("counts") or [0]
            result["counts"] = [c + 1 for c in counts]
            result["count"] += len(counts)
            line = (json.dumps(message) + "\n").encode()
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
except OSError:
    pass
finally:
    agent.kill()
'''


def lying_python(folder: Path, mode: str) -> Path:
    return executable(folder, f"python-{mode}", LYING_PYTHON % {"mode": mode})


@pytest.mark.slow
def test_count_only_lying_host_is_caught_by_the_recount(ssh_env, run_fab, tmp_path):
    """h2's agent inflates every count (parts and total consistent); h1 is honest but starts
    5 s late, so h2 gets the first blocks. Its results are rejected, nothing it said is kept."""
    cluster, _, config = ssh_env
    inventory = cluster.write_inventory(tmp_path / "liar.ini", hosts=["h1", "h2"], extra={
        "h1": {"python": lying_python(tmp_path, "slow"), "slots": 1},
        "h2": {"python": lying_python(tmp_path, "count"), "slots": 1},
    })
    db = tmp_path / "r.db"
    done = primes(run_fab, inventory, 1, "1e9", db, "--count-only", config=config)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert count_of(done.stdout) == 50847534, output
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        events = [e for e in store.events(run_id) if e["host"] == "h2" and e["kind"] == "invalid"]
    blocks = assert_blocks_tile(db, 1, 10**9)
    assert events and all("primes; result says" in e["detail"] for e in events), events
    assert all(b["host"] != "h2" for b in blocks)

@pytest.mark.slow
def test_pi_over_ssh_and_local(ssh_env, run_fab, tmp_path):
    cluster, _, config = ssh_env
    inventory = cluster.write_inventory(tmp_path / "mixed.ini", local=True)
    db = tmp_path / "r.db"
    done = primes(run_fab, inventory, 1, 10**8, db, config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_of(done.stdout) == 5761455
    blocks = assert_blocks_tile(db, 1, 10**8)
    # Hosts start as each says hello, so a fast one may do it all before the others are up.
    assert {b["host"] for b in blocks} <= {"h1", "h2", "h3", "local"}
    over_ssh = primes(run_fab, cluster.write_inventory(tmp_path / "ssh.ini"), 1, 10**7, tmp_path / "o.db",
                      config=config)
    assert over_ssh.returncode == 0 and count_of(over_ssh.stdout) == 664579
    assert {b["host"] for b in assert_blocks_tile(tmp_path / "o.db", 1, 10**7)} <= {"h1", "h2", "h3"}
    small = primes(run_fab, inventory, 1, 10**4, tmp_path / "s.db", config=config)
    assert count_of(small.stdout) == 1229


@pytest.mark.slow
def test_kill_one_agent_mid_run(ssh_env, run_fab, tmp_path):
    cluster, inventory, config = ssh_env
    db = tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "4e8", "--db", db,
                     "--block-seconds", "0.3"], config=config)
    child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(db, 6)
    victims = agent_pids(str(cluster["h2"].workdir))
    assert victims, "no agent running on h2"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, out + err
    assert count_of(out) == 21336326
    assert_blocks_tile(db, 1, 4 * 10**8)


@pytest.mark.slow
def test_kill_one_sshd_mid_run(ssh_env, run_fab, tmp_path):
    cluster, inventory, config = ssh_env
    db = tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "4e8", "--db", db,
                     "--block-seconds", "0.3"], config=config)
    child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(db, 6)
    cluster["h3"].kill()  # the listener and every session: like the machine dropping off
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, out + err
    assert count_of(out) == 21336326
    assert_blocks_tile(db, 1, 4 * 10**8)
    assert "h3" in err  # the loss is reported
    assert agent_pids(str(cluster["h3"].workdir)) == []


@pytest.mark.slow
def test_every_host_lost_is_exit_1_and_resumable(make_cluster, tmp_path):
    cluster = make_cluster(1)
    inventory, config = provision(cluster, tmp_path, "one.ini")
    db = tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "1e9", "--db", db,
                     "--block-seconds", "0.3"], config=config)
    child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(db, 3)
    cluster["h1"].kill()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1, out + err
    assert "every host is lost" in err and "resume" in err
    cluster["h1"].start()
    with Store(db) as store:
        assert store.integrity_ok()
        assert store.runs()[-1]["state"] == "failed"


@pytest.mark.slow
def test_junk_python_and_stale_bundle_left_out(ssh_env, run_fab, tmp_path):
    cluster, _, config = ssh_env
    junk = tmp_path / "junkpython"
    junk.write_text("#!/bin/sh\necho 'this is not a python'\necho 'garbage {'\n")
    junk.chmod(0o755)
    (cluster["h3"].workdir / "client" / "agent.py").write_text(
        (cluster["h3"].workdir / "client" / "agent.py").read_text() + "\n# edited\n")
    # h1, the one good host, starts 5 s late: h2 and h3 are judged before the run can end.
    late = tmp_path / "latepython"
    late.write_text('#!/bin/sh\nsleep 5\nexec python3 "$@"\n')
    late.chmod(0o755)
    inventory = cluster.write_inventory(tmp_path / "junk.ini", extra={"h1": {"python": late}, "h2": {"python": junk}})
    done = primes(run_fab, inventory, 1, 10**6, tmp_path / "r.db", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_of(done.stdout) == 78498
    assert "left out: h2: the agent did not start" in done.stdout
    assert "left out: h3: client bundle is stale" in done.stdout and "run fab setup" in done.stdout


@pytest.mark.slow
def test_host_still_starting_at_the_end_is_named(ssh_env, run_fab, tmp_path):
    cluster, _, config = ssh_env
    slow = tmp_path / "slowpython"
    slow.write_text('#!/bin/sh\nsleep 8\nexec python3 "$@"\n')  # a machine slow to start Python
    slow.chmod(0o755)
    inventory = cluster.write_inventory(tmp_path / "slow.ini", hosts=["h1"], extra={"h1": {"python": slow}},
                                        local=True)
    done = primes(run_fab, inventory, 1, 10**6, tmp_path / "r.db", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_of(done.stdout) == 78498
    assert "h1 was still starting when the work was done (local did it alone)" in done.stdout
    # Its agent, once Python is up, finds the coordinator gone (stdin closed) and exits.
    deadline = time.monotonic() + 30
    while agent_pids(str(cluster["h1"].workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not agent_pids(str(cluster["h1"].workdir))


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_no_remote_process(ssh_env, run_fab, tmp_path):
    cluster, inventory, config = ssh_env
    db = tmp_path / "r.db"
    argv = fab_argv(["primes", "--inventory", inventory, "--start", 1, "--end", "1e9", "--db", db,
                     "--block-seconds", "0.3"], config=config)
    child = subprocess.Popen(argv, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(db, 4)
    assert all(agent_pids(str(h.workdir)) for h in cluster)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, out + err
    assert "run the same command again to resume" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(agent_pids(str(h.workdir)) for h in cluster):
        time.sleep(0.2)
    assert not any(agent_pids(str(h.workdir)) for h in cluster)
    with Store(db) as store:
        assert store.runs()[-1]["state"] == "interrupted" and store.integrity_ok()


@pytest.mark.slow
def test_slow_host_gets_endgame_duplicates_and_no_block_twice(ssh_env, run_fab, tmp_path):
    cluster, _, config = ssh_env
    cluster.add_relay("h1", delay=0.4)  # h1's answers arrive late: the endgame duplicates its blocks
    inventory = cluster.write_inventory(tmp_path / "slow.ini")
    db = tmp_path / "r.db"
    done = primes(run_fab, inventory, 1, 10**8, db, "--block-seconds", "0.2", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_of(done.stdout) == 5761455
    assert_blocks_tile(db, 1, 10**8)


@pytest.mark.slow
def test_verify_reruns_blocks_elsewhere(ssh_env, run_fab, tmp_path):
    cluster, inventory, config = ssh_env
    done = primes(run_fab, inventory, 1, 10**7, tmp_path / "r.db", "--verify", "0.5", "--block-seconds", "0.1",
                  config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    line = [x for x in done.stdout.splitlines() if x.startswith("--verify:")][0]
    assert int(line.split()[1]) > 0 and line.endswith(", 0 disagreed")


def test_list_that_cannot_fit_on_disk_is_refused(run_fab, tmp_path):
    db = tmp_path / "r.db"
    done = primes(run_fab, local_inventory(tmp_path), 1, "1e15", db)
    assert done.returncode == 1
    assert "need about" in done.stderr and "GB free" in done.stderr and "--count-only" in done.stderr
    assert not db.exists()


def test_summary_names_a_host_on_the_pure_python_sieve(run_fab, tmp_path):
    """A host that ran the pure-Python sieve is named under the summary with where to look (issue 11)."""
    inventory, db = local_inventory(tmp_path), tmp_path / "r.db"
    done = primes(run_fab, inventory, 1, "1e6", db, env={"BEOWULF_PRIMES_ENGINE": "python"})
    assert done.returncode == 0, done.stderr
    assert count_of(done.stdout) == 78498
    assert "note: this computer ran the pure-Python sieve" in done.stdout and "fab hosts" in done.stdout
    fast = primes(run_fab, inventory, 1, "1e6", tmp_path / "f.db")
    assert fast.returncode == 0 and "pure-Python" not in fast.stdout
