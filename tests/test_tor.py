"""fab tor.status / tor.newnym / tor.restart against real tor processes (tests/harness/tor.py).

Every tor runs with DisableNetwork 1 (it contacts nothing), which also means it
opens no SOCKS port: where a row needs a SOCKS port that answers, ``socks``
points at a SocksGreeter stand-in, and the control port is the real tor's.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from cluster import tor as tor_module
from cluster.inventory import Host
from cluster.transport import LocalTransport
from harness import SshCluster, free_port, require_sshd, run_fab
from harness.tor import SocksGreeter, TorProcess, require_tor

TOR_VERSION_PREFIX = "0."


def python36():
    """A Python 3.6 interpreter (the oldest a host may have), or None."""
    # The real interpreter before PATH's: a pyenv shim does not work in an SSH session's environment.
    candidates = [os.environ.get("BEOWULF_PYTHON36")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    candidates.append(shutil.which("python3.6"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


PYTHON36 = python36()


def rows(stdout: str) -> dict:
    """Table rows of tabulate's plain output, keyed by the first column."""
    table = {}
    for line in stdout.splitlines()[2:-1]:  # header, rule, rows, summary line
        parts = line.split()
        if parts:
            table[parts[0]] = line
    return table


def closed_port(ip: str) -> str:
    """host:port where nothing listens (bound once, released)."""
    return f"{ip}:{free_port(ip)}"


class CmdlineWatch:
    """Poll every /proc/*/cmdline in a thread while something runs; remember what matched.

    ``needles`` are byte strings that must never appear; ``seen`` counts sweeps in
    which a cmdline contained ``marker`` (proof that the watch overlapped the run).
    """

    def __init__(self, needles, marker: bytes = b"fabric"):
        self.needles = [n for n in needles if n]
        self.marker = marker
        self.hits: list = []
        self.sweeps = 0
        self.marked = 0
        self.python_scripts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            marked = script = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or entry == me:
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as handle:
                        cmdline = handle.read()
                except OSError:
                    continue
                marked |= self.marker in cmdline
                argv = cmdline.split(b"\0")
                script |= len(argv) >= 2 and b"python" in argv[0] and argv[1] == b"-"
                for needle in self.needles:
                    if needle in cmdline:
                        self.hits.append((entry, cmdline[:200]))
            self.sweeps += 1
            self.marked += marked
            self.python_scripts += script

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def cookie_forms(tor: TorProcess) -> list:
    cookie = tor.cookie_path.read_bytes()
    return [cookie, cookie.hex().encode(), cookie.hex().upper().encode()]


@pytest.fixture
def tor_bin():
    return require_tor()


@pytest.fixture
def cluster(tmp_path, tor_bin):
    require_sshd()
    with SshCluster(tmp_path / "cluster", 2) as started:
        yield started


# ---------------------------------------------------------------- fast: no tor, or local only


def test_usage_errors_before_any_host(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[here]\naddress = local\nsocks = 127.0.0.1:99999\n")
    bad = run_fab(["tor.status", "--inventory", inventory])
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "socks = '127.0.0.1:99999' is not host:port" in bad.stdout + bad.stderr
    inventory.write_text("[here]\naddress = local\ntor_control = control\n")
    bad = run_fab(["tor.newnym", "--inventory", inventory])
    assert bad.returncode == 2 and "neither a socket path nor host:port" in bad.stdout + bad.stderr
    inventory.write_text("[here]\naddress = local\n")
    for args, text in ((["--method", "reboot"], "--method: expected one of auto, systemd, service, process"),
                       (["--wait", "0"], "--wait: must be greater than 0"),
                       (["--wait", "abc"], "--wait: expected a number"),
                       (["--command", "true", "--method", "service"], "exclude each other")):
        done = run_fab(["tor.restart", "--inventory", inventory, *args])
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert text in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_control_reply_parsing():
    """PROTOCOLINFO's QuotedString (escapes, octal) and keyword lines, as tor writes them."""
    ast.parse(tor_module._HOST_SCRIPT, feature_version=(3, 6))
    space = {}
    exec(tor_module._HOST_SCRIPT, space)
    pairs = space["keywords"](r'METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/tmp/a \"b\"\\c\303\251"')
    assert pairs == {"METHODS": "COOKIE,SAFECOOKIE", "COOKIEFILE": '/tmp/a "b"\\cé'}
    assert space["keywords"]('Tor="0.4.9.11" EXTRA') == {"Tor": "0.4.9.11", "EXTRA": ""}
    assert space["endpoint"]("[::1]:9051")[1] == ("::1", 9051)
    assert space["endpoint"]("unix:/run/tor/control")[1] == "/run/tor/control"


def test_cookie_method_and_host_script_keep_the_cookie(tmp_path, tor_bin):
    """Both cookie methods answer 250 OK; the script's output and command line never hold the cookie."""
    with TorProcess(tmp_path, ip="127.0.0.1") as tor:
        host = Host(name="here", address="local", socks=closed_port("127.0.0.1"), tor_control=tor.control_address)
        transport = LocalTransport(host)
        with CmdlineWatch(cookie_forms(tor), marker=b"python") as watch:
            for prefer in ("cookie", "safecookie"):
                answer = tor_module.run_on_host(transport, "newnym", prefer=prefer)
                assert answer["control"]["auth"] == prefer and answer["control"]["reply"] == "250 OK"
                assert not any(form.decode("latin-1") in repr(answer) for form in cookie_forms(tor))
        assert watch.hits == [] and watch.sweeps > 0
        script = tor_module.host_script({"action": "newnym", "control": tor.control_address})
        assert not any(form in script for form in cookie_forms(tor))


@pytest.mark.slow
def test_restart_refuses_a_config_that_does_not_verify(tmp_path, tor_bin):
    """The running tor is left alone when its torrc no longer verifies; process without control fails cleanly."""
    with TorProcess(tmp_path, ip="127.0.0.1") as tor:
        inventory = tmp_path / "hosts.ini"
        inventory.write_text(f"[here]\naddress = local\nsocks = {tor.socks_address}\n"
                             f"tor_control = {tor.control_address}\n")
        before = tor.pid
        good = tor.torrc.read_text()
        tor.torrc.write_text(good + "SocksPort not-an-address:xyz\n")
        done = run_fab(["tor.restart", "--inventory", inventory, "--wait", "20"])
        assert done.returncode == 1, done.stdout + done.stderr
        assert "does not verify, tor left running" in done.stdout
        assert tor.pid == before and tor.getinfo("process/pid") == str(before)
        tor.torrc.write_text(good)

        inventory.write_text(f"[here]\naddress = local\nsocks = {closed_port('127.0.0.1')}\n"
                             f"tor_control = {closed_port('127.0.0.1')}\n")
        done = run_fab(["tor.restart", "--inventory", inventory, "--method", "process", "--wait", "5"])
        assert done.returncode == 1 and "no tor answers on" in done.stdout and "connection refused" in done.stdout
        assert tor.pid == before


# ---------------------------------------------------------------- real sshd hosts and real tor


@pytest.mark.slow
def test_status_table(cluster, tmp_path):
    """h1: tor's control port + a SOCKS port that answers; h2: socks on a closed port -> exit 3."""
    h1, h2 = cluster["h1"], cluster["h2"]
    with TorProcess(tmp_path, ip=h1.ip, name="tor1") as tor1, \
            TorProcess(tmp_path, ip=h2.ip, control="socket", name="tor2") as tor2, \
            SocksGreeter(h1.ip) as greeter:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": greeter.address, "tor_control": tor1.control_address},
            "h2": {"socks": closed_port(h2.ip), "tor_control": tor2.control_address},
            "local": {"socks": greeter.address, "tor_control": tor2.control_address},
        })
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        done = run_fab(["tor.status", "--inventory", inventory], config=config)
        assert done.returncode == 3, done.stdout + done.stderr
        table = rows(done.stdout)
        version = tor1.getinfo("version")
        assert version.startswith(TOR_VERSION_PREFIX)
        for name in ("h1", "local"):
            assert table[name].rstrip().endswith(" ok"), table[name]
            assert " yes " in table[name] and " safecookie " in table[name] and version in table[name]
        assert "no: connection refused" in table["h2"]
        assert tor2.control_address in table["h2"] and " yes " in table["h2"] and version in table["h2"]
        assert "SOCKS does not answer; tor has DisableNetwork 1" in table["h2"]
        assert "2 of 3 hosts answer SOCKS, 3 control ports answer" in done.stdout
        assert "1 of 3 hosts failed: h2" in done.stderr
        assert greeter.greetings >= 2

        # Control down too on h1; on h2 the "control port" is not tor at all.
        inventory = cluster.write_inventory(tmp_path / "hosts2.ini", extra={
            "h1": {"socks": closed_port(h1.ip), "tor_control": closed_port(h1.ip)},
            "h2": {"socks": tor1.socks_address, "tor_control": greeter.address},
        })
        done = run_fab(["tor.status", "--inventory", inventory], config=config)
        assert done.returncode == 1, done.stdout + done.stderr
        table = rows(done.stdout)
        assert table["h1"].count("no: connection refused") == 2
        control_column = table["h2"].split(greeter.address, 1)[1]
        assert control_column.split()[0] == "no:" and "SOCKS does not answer" in table["h2"]
        assert "0 of 2 hosts answer SOCKS, 0 control ports answer" in done.stdout


@pytest.mark.slow
def test_newnym_cookie_auth_and_no_secret_on_any_command_line(cluster, tmp_path):
    """250 OK through cookie auth on a control port (h1), a control socket (h2) and locally; rate limit shown."""
    h1, h2 = cluster["h1"], cluster["h2"]
    with TorProcess(tmp_path, ip=h1.ip, name="tor1") as tor1, \
            TorProcess(tmp_path, ip=h2.ip, control="socket", name="tor2") as tor2, \
            TorProcess(tmp_path, ip="127.0.0.1", name="tor3") as tor3:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": tor1.socks_address, "tor_control": tor1.control_address},
            "h2": {"socks": tor2.socks_address, "tor_control": tor2.control_address},
            "local": {"socks": tor3.socks_address, "tor_control": tor3.control_address},
        })
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        secrets = [form for tor in (tor1, tor2, tor3) for form in cookie_forms(tor)]
        with CmdlineWatch(secrets, marker=b"tor.newnym") as watch:
            first = run_fab(["tor.newnym", "--inventory", inventory], config=config)
            second = run_fab(["tor.newnym", "--inventory", inventory], config=config)
        assert first.returncode == 0, first.stdout + first.stderr
        for name in ("h1", "h2", "local"):
            assert " 250 OK " in rows(first.stdout)[name] and "new identity now" in rows(first.stdout)[name]
            # Tor allows one NEWNYM per 10 s: a second one soon after is rate limited (on a
            # very loaded machine the second run may start after those 10 s: then it is new).
            assert ("rate limited: tor applies it in" in rows(second.stdout)[name]
                    or "new identity now" in rows(second.stdout)[name])
        assert "3 of 3 hosts took NEWNYM" in first.stdout
        assert "Rate limiting NEWNYM request" in tor1.log_text()
        # The secret appears nowhere: no command line (polled while both runs went on), no output, no log.
        assert watch.hits == []
        assert watch.marked > 0, "the /proc watch never saw fab running"
        outputs = first.stdout + first.stderr + second.stdout + second.stderr
        texts = [outputs] + [h.read_log() for h in cluster] + [t.log_text() for t in (tor1, tor2, tor3)]
        for form in secrets:
            assert not any(form.decode("latin-1") in text for text in texts)
        print(f"/proc sweeps {watch.sweeps}, with fab running {watch.marked}, "
              f"with a host script running {watch.python_scripts}")


@pytest.mark.slow
def test_restart_user_run_tor(cluster, tmp_path):
    """A tor run by hand is stopped by pid and started again with the same command line (SSH and local)."""
    h1 = cluster["h1"]
    with TorProcess(tmp_path, ip=h1.ip, name="tor1") as tor1, \
            TorProcess(tmp_path, ip="127.0.0.1", control="socket", name="tor3") as tor3:
        # h2 reaches the same tor as h1 (one machine, two inventory entries): it is restarted once.
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": tor1.socks_address, "tor_control": tor1.control_address},
            "h2": {"socks": tor1.socks_address, "tor_control": tor1.control_address},
            "local": {"socks": tor3.socks_address, "tor_control": tor3.control_address},
        })
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        before = {tor: tor.pid for tor in (tor1, tor3)}
        cmdlines = {tor: Path(f"/proc/{tor.pid}/cmdline").read_bytes() for tor in (tor1, tor3)}
        secrets = [form for tor in (tor1, tor3) for form in cookie_forms(tor)]
        began = time.monotonic()
        with CmdlineWatch(secrets, marker=b"tor.restart") as watch:
            done = run_fab(["tor.restart", "--inventory", inventory, "--wait", "30"], config=config)
        seconds = time.monotonic() - began
        assert done.returncode == 0, done.stdout + done.stderr
        assert watch.hits == [] and watch.marked > 0
        table = rows(done.stdout)
        for name, tor in (("h1", tor1), ("local", tor3)):
            tor.wait_ready(old_pid=before[tor])
            after = tor.pid
            assert after and after != before[tor]
            assert tor.getinfo("process/pid") == str(after)
            assert Path(f"/proc/{after}/cmdline").read_bytes() == cmdlines[tor]
            assert f" {before[tor]} " in table[name] and f" {after} " in table[name] and " process " in table[name]
            assert "no SOCKS port: tor has DisableNetwork 1" in table[name]
        assert f" {before[tor1]} " in table["h2"] and f" {tor1.pid} " in table["h2"]
        assert sum("(same tor as" in table[name] for name in ("h1", "h2")) == 1
        assert tor1.log_text().count("Catching signal TERM, exiting cleanly") == 1
        assert "3 of 3 hosts restarted tor" in done.stdout
        assert seconds < 300

        # The restarted tors still take NEWNYM and show in tor.status with their new pids.
        again = run_fab(["tor.newnym", "--inventory", inventory], config=config)
        assert again.returncode == 0, again.stdout + again.stderr
        assert all(" 250 OK " in line for line in rows(again.stdout).values())


@pytest.mark.slow
@pytest.mark.skipif(PYTHON36 is None, reason="no Python 3.6 interpreter on this machine")
def test_host_script_on_python36(cluster, tmp_path):
    """status, newnym and a restart with a host whose Python is 3.6 (python = ... in hosts.ini)."""
    h2 = cluster["h2"]
    with TorProcess(tmp_path, ip=h2.ip, control="socket", name="tor2") as tor2:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h2"], extra={
            "h2": {"socks": tor2.socks_address, "tor_control": tor2.control_address, "python": PYTHON36},
        })
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        status = run_fab(["tor.status", "--inventory", inventory], config=config)
        assert status.returncode == 1 and "tor has DisableNetwork 1" in status.stdout, status.stdout + status.stderr
        assert " safecookie " in status.stdout
        newnym = run_fab(["tor.newnym", "--inventory", inventory], config=config)
        assert newnym.returncode == 0 and " 250 OK " in newnym.stdout, newnym.stdout + newnym.stderr
        before = tor2.pid
        restart = run_fab(["tor.restart", "--inventory", inventory, "--wait", "30"], config=config)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        tor2.wait_ready(old_pid=before)
        assert tor2.pid != before
