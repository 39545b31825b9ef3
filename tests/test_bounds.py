"""Unbounded input from hosts (issue 9, section 3), with real components.

- A host whose ``python`` prints without end: `fab hosts` and `fab setup` stop the command,
  report ``output too large`` for that host, and the coordinator's memory stays bounded.
- An agent (on a real sshd host, and a local one) that writes a 200 MB stderr line with no
  newline: the line is cut, memory stays bounded, the run completes.
- Results in flight are bounded in bytes over all hosts (agents.ByteBudget): a reader waits
  before reading more while the budget is spent, and a host held back that way (or waiting for
  its turn to check a result) is not taken for silent.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fabric import Config

import cluster.agents as agents
from client import primes as client_primes
from cluster.agents import ByteBudget, HostLink
from cluster.coordinator import Coordinator
from cluster.inventory import Host, load_inventory
from cluster.jobs.primes import PrimesJob
from cluster.jobs.trivial import TrivialJob
from cluster.store import Store
from cluster.transport import MAX_OUTPUT_BYTES, MAX_STDERR_LINE, LocalTransport, SshTransport
from harness import SshCluster, hostile, load_fabric_config, require_sshd
from harness.hostile import LinesStream, executable, provisioned_cluster, session_pids_running

# Peak RSS allowed to the fab process (with sshd hosts that is the coordinator alone).
RSS_LIMIT_MB = 400
FAB_TIMEOUT = 150


def fab_measured(args, tmp_path: Path, config=None, timeout: float = FAB_TIMEOUT):
    """Run ``fab ARGS``: (CompletedProcess, peak RSS of the fab process in MB)."""
    done, rss_mb, _ = hostile.fab_measured(args, tmp_path, config=config, timeout=timeout, tail=3000)
    return done, rss_mb


@pytest.fixture(scope="module")
def bounds_cluster(tmp_path_factory):
    """Two provisioned sshd hosts, h1 and h2 (h2 made hostile per test)."""
    yield from provisioned_cluster(tmp_path_factory, "bounds", 2)


# ---------------------------------------------------------------- command output


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hosts", "setup"])
def test_endless_output_of_a_probe_is_stopped_and_reported(bounds_cluster, tmp_path, task):
    # h2's "python" prints zeros for ever (whatever it is asked to run): the probe's output.
    cluster, config = bounds_cluster
    endless = executable(tmp_path, "python-endless", "#!/bin/sh\nexec cat /dev/zero\n")
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={"h2": {"python": endless}})
    args = [task, "--inventory", inventory] + (["--no-numpy"] if task == "setup" else [])
    done, rss_mb = fab_measured(args, tmp_path, config=config)
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert "output too large" in output, output[-3000:]
    h2 = [line for line in output.splitlines() if "h2" in line and "output too large" in line]
    assert h2, output[-3000:]
    assert rss_mb < RSS_LIMIT_MB, f"fab peaked at {rss_mb:.0f} MB"
    assert not endless_left(cluster["h2"]), "the command was not stopped on the host"


def endless_left(host) -> list:
    """The host's processes still running ``endless`` (after a few seconds' grace)."""
    deadline = time.monotonic() + 10
    while True:
        left = session_pids_running(host, b"/dev/zero")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.slow
def test_ssh_command_output_is_capped_and_the_deadline_holds_while_data_flows(bounds_cluster, tmp_path):
    cluster, config = bounds_cluster
    host = load_inventory(cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1"]))[0]
    with SshTransport.connect(host, load_fabric_config(config)) as remote:
        for command in ("cat /dev/zero", "cat /dev/zero >&2", "sudo -n true 2>/dev/null; cat /dev/zero"):
            with pytest.raises(agents.BeowulfError, match="output too large"):
                remote.run(command, timeout=60)
        began = time.monotonic()
        with pytest.raises(agents.BeowulfError, match="timed out"):  # under the cap, never ending
            remote.run("while :; do echo x; sleep 0.01; done", timeout=1)
        assert time.monotonic() - began < 20
        done = remote.run("head -c 1000000 /dev/zero; echo oops >&2; exit 3", timeout=30)
        assert (done.returncode, len(done.stdout), done.stderr) == (3, 1_000_000, "oops\n")
        assert remote.run("echo still usable", timeout=30).stdout == "still usable\n"
    assert not endless_left(cluster["h1"])


def test_local_command_output_is_capped_and_the_deadline_holds_while_data_flows():
    local = LocalTransport(Host("here", "local"))
    with pytest.raises(agents.BeowulfError, match="output too large"):
        local.run("cat /dev/zero", timeout=30)
    with pytest.raises(agents.BeowulfError, match="output too large"):
        local.run("cat /dev/zero >&2", timeout=30)
    began = time.monotonic()
    with pytest.raises(agents.BeowulfError, match="timed out"):  # a trickle under the cap, for ever
        local.run("while :; do echo x; sleep 0.01; done", timeout=1)
    assert time.monotonic() - began < 20
    done = local.run("head -c 1000000 /dev/zero; echo oops >&2; exit 3", timeout=30)
    assert (done.returncode, len(done.stdout), done.stderr) == (3, 1_000_000, "oops\n")
    assert MAX_OUTPUT_BYTES <= 16 * 2**20


# ---------------------------------------------------------------- agent stderr

STDERR_BOMB = 200 * 1000 * 1000


@pytest.mark.slow
def test_agent_with_a_200_mb_stderr_line_is_bounded_and_the_run_completes(bounds_cluster, tmp_path):
    # h2's agent first writes 200 MB to stderr with no newline, then works honestly.
    cluster, config = bounds_cluster
    bomb = executable(tmp_path, "python-stderr", "#!/bin/sh\n"
                  f"head -c {STDERR_BOMB} /dev/zero >&2\n"
                  'exec python3 "$@"\n')
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h2"], extra={"h2": {"python": bomb}})
    db = tmp_path / "r.db"
    done, rss_mb = fab_measured(["primes", "--inventory", inventory, "--start", "1", "--end", "1e6", "--db", db],
                                tmp_path, config=config)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "78,498 primes in [1, 1,000,000]" in done.stdout, done.stdout
    assert rss_mb < RSS_LIMIT_MB, f"fab peaked at {rss_mb:.0f} MB"


def test_local_agent_stderr_line_is_cut_not_buffered():
    # In a child process, so its peak RSS is this stream's alone. The line is 1 GB so that
    # buffering it could not hide under allocator noise (thread arenas backed by transparent
    # huge pages have added ~120 MB on some machines): the peak may grow by far less than that.
    bomb = 1000 * 1000 * 1000
    code = ("import resource, time\n"
            "from cluster.transport import LocalStream\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
            f"s = LocalStream('head -c {bomb} /dev/zero >&2; printf \"\\\\nlast\\\\n\" >&2', 'here')\n"
            "s.process.wait(); deadline = time.monotonic() + 60\n"
            "while 'last' not in s.stderr_tail() and time.monotonic() < deadline: time.sleep(0.05)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - before)\n"
            "print(repr(s.stderr_tail()[-300:]))\n"
            "print(max(len(line) for line in s._stderr_lines))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    grown_mb, tail, longest = done.stdout.splitlines()
    assert "more bytes of this line dropped" in tail and tail.endswith("\\nlast'"), tail
    assert int(longest) < MAX_STDERR_LINE + 100
    assert int(grown_mb) < 300, f"peak RSS grew by {grown_mb} MB reading a {bomb // 10**6} MB line"


# ---------------------------------------------------------------- byte budget


def test_byte_budget_blocks_while_spent_and_releases():
    budget = ByteBudget(100)
    budget.take(60)
    budget.settle(60)  # a finished line, waiting for the coordinator
    budget.take(50)  # a line being read by another reader
    started, done = threading.Event(), threading.Event()

    def reader(holding):
        budget.wait(holding, lambda: False, lambda waiting: waiting and started.set())
        done.set()

    # A reader starting a new line waits while the budget is spent...
    thread = threading.Thread(target=reader, args=(0,), daemon=True)
    thread.start()
    assert started.wait(5)
    assert not done.is_set()
    # ... and so does one in the middle of a line, while a finished line will be released.
    started2, done2 = threading.Event(), threading.Event()
    middle = threading.Thread(target=lambda: (budget.wait(50, lambda: False,
                                                         lambda waiting: waiting and started2.set()), done2.set()),
                              daemon=True)
    middle.start()
    assert started2.wait(5) and not done2.is_set()
    budget.release(60)  # the coordinator handled the finished line
    assert done.wait(5) and done2.wait(5)
    assert (budget.used, budget.settled) == (50, 0)
    # Spent by unfinished lines only: one in the middle of its line goes on (no deadlock) ...
    budget.take(60)
    finished = threading.Event()
    budget.wait(60, lambda: False, lambda waiting: None)
    # ... a new line waits, until stop() says the link is gone.
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.wait(0, stop.is_set, lambda w: None), finished.set()),
                              daemon=True)
    waiter.start()
    assert not finished.wait(0.3)
    stop.set()
    assert finished.wait(5)
    budget.release(110, settled=False)
    assert (budget.used, budget.settled) == (0, 0)


_PRIMES = PrimesJob(1, 10**6)
_GOOD = {"type": "result", "id": 7, "ok": True, "elapsed": 0.01,
         "result": client_primes.run({"lo": 1, "hi": 1000, "mode": "list"})}
_LINES = [
    json.dumps({"type": "hello", "bundle": "b"}).encode() + b"\n",
    json.dumps(_GOOD).encode() + b"\n",  # a payload: held until released
    json.dumps(dict(_GOOD, id=7)).encode() + b"\n",  # a repeat: no claim
    b"junk\n",
    json.dumps({"type": "beat"}).encode() + b"\n",
    json.dumps(dict(_GOOD, id=8, result=dict(_GOOD["result"], checksum=1))).encode() + b"\n",  # invalid
]


@pytest.mark.parametrize("ending", [b"", b'{"type": "beat", "cut short', b"x" * (3 << 20)])
def test_reader_gives_back_every_byte_it_took(ending, monkeypatch):
    monkeypatch.setattr(agents, "MAX_LINE_BYTES", 1 << 20)
    budget = ByteBudget(1 << 30)
    events: queue.Queue = queue.Queue()
    link = HostLink(Host("h", "u@h", user="u", hostname="h"), None, False, events, _PRIMES.check, "b",
                    budget=budget, encoded_fields=_PRIMES.encoded_fields)
    link._sent = {7: (1, 1000), 8: (1, 1000)}
    link.stream = stream = LinesStream(b"".join(_LINES) + ending)
    link._read(stream, link.generation, queue.Queue())
    held = []
    while not events.empty():
        event = events.get_nowait()
        if event.claim:
            held.append(event)
        if event.kind == "result" and event.message.get("ok"):
            assert event.message["result"].get("data") is None, "the encoded copy is dropped"
    assert len(held) == 1 and budget.used == budget.settled == len(_LINES[1])
    held[0].release()
    held[0].release()  # once only
    assert (budget.used, budget.settled) == (0, 0)


@pytest.mark.slow
def test_held_back_hosts_are_not_lost_and_the_run_completes(tmp_path, monkeypatch):
    # One byte of budget, checks that take longer than the heartbeat timeout: every reader is
    # held back most of the time (by the budget, or waiting for its turn to check), with its
    # host's heartbeats unread in the pipe. No host may be taken for silent, and nothing may hang.
    monkeypatch.setattr(agents, "RESULT_BUDGET_BYTES", 1, raising=False)

    class SlowCheck(TrivialJob):
        def check(self, lo, hi, result):
            time.sleep(1.2)
            return hi - lo + 1, b"p" * 1000

    hosts = [Host(name=name, address="local", slots=2) for name in ("a", "b", "c")]
    db = tmp_path / "r.db"
    coordinator = Coordinator(SlowCheck(5, "noop"), hosts, Config(), str(db), beat_seconds=0.2, beat_timeout=1.0)
    outcome = coordinator.run()
    assert outcome.items_total == 5
    with Store(db) as store:
        lost = [e for e in store.events() if e["kind"] in ("lost", "quarantine")]
    assert not lost, lost


# ---------------------------------------------------------------- sudo


@pytest.fixture
def endless_sudo(tmp_path_factory):
    """A throwaway login user allowed (NOPASSWD) to run one script as root: it prints zeros for
    ever. Yields (user name, script, base folder for its sshd host)."""
    import os
    import secrets
    import shutil
    import tempfile

    require_sshd()
    missing = [tool for tool in ("sudo", "useradd", "userdel", "chpasswd", "visudo") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"needs {', '.join(missing)} (run tests/system-deps.sh as root)")
    name = "bwbnd" + secrets.token_hex(4)
    folder = Path(tempfile.mkdtemp(prefix="beowulf-bounds-"))
    os.chmod(folder, 0o711)  # sshd reads the cluster's AuthorizedKeysFile as that user
    endless = executable(folder, "endless", "#!/bin/sh\nexec cat /dev/zero\n")
    sudoers = Path(f"/etc/sudoers.d/beowulf-bounds-{name}")
    try:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
        # A locked account (no password) may not log in over SSH: give it one nobody knows.
        subprocess.run(["chpasswd"], input=f"{name}:Bw-{secrets.token_hex(16)}\n", text=True, check=True,
                       capture_output=True)
        rule = folder / "sudoers"
        rule.write_text(f"{name} ALL=(root) NOPASSWD: /bin/sh -c {endless}, /usr/bin/sh -c {endless}\n")
        subprocess.run(["visudo", "-c", "-q", "-f", str(rule)], check=True, capture_output=True)
        os.chmod(rule, 0o440)
        shutil.copy2(rule, sudoers)
        yield name, endless, folder
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_sudo_output_is_capped_too(endless_sudo, tmp_path):
    # Through sudo (a login user that is not root), as `fab setup --tor` installs tor.
    name, endless, folder = endless_sudo
    with SshCluster(folder, 1, user=name) as cluster:
        config = load_fabric_config(cluster.write_fabric_config(tmp_path / "fabric.yaml"))
        host = load_inventory(cluster.write_inventory(tmp_path / "hosts.ini", extra={"h1": {"workdir": "~/bw"}}))[0]
        with SshTransport.connect(host, config) as remote:
            assert remote.run("id -u", timeout=30).stdout.strip() != "0"
            with pytest.raises(agents.BeowulfError, match="output too large"):
                remote.sudo(str(endless), timeout=60)
            assert "a password" in remote.sudo("id -u", timeout=30).stderr  # no rule, no password: refused
        assert not endless_left(cluster["h1"])
