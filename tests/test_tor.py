"""fab tor.status / tor.newnym / tor.restart against real tor processes (tests/harness/tor.py).

Every tor runs with DisableNetwork 1 (it contacts nothing), which also means it
opens no SOCKS port: where a row needs a SOCKS port that answers, ``socks``
points at a SocksGreeter stand-in, and the control port is the real tor's.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from client import torhost
from cluster import tor as tor_module
from cluster.inventory import Host
from cluster.transport import LocalTransport
from harness import SshCluster, free_port, keygen, require_sshd, run_fab
from harness.tor import (
    FakeControlPort,
    FakeTor,
    SocksGreeter,
    TorProcess,
    require_tor,
    root_only_secret,
    share_host_key,
)

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


def control(tor: TorProcess) -> dict:
    """hosts.ini keys for tor's control: its socket (cookie beside it) or its port plus ``tor_cookie``."""
    keys = {"tor_control": tor.control_address}
    if tor.control_kind == "port":
        keys["tor_cookie"] = tor.cookie_path
    return keys


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


@pytest.fixture
def twin_cluster(tmp_path, tor_bin):
    """Two sshd hosts with one host key: one machine reached by two inventory entries."""
    require_sshd()
    made = SshCluster(tmp_path / "twins", 2)
    made.hosts[0].dir.mkdir(parents=True)
    keygen(made.hosts[0].host_key, comment="twin-host")
    share_host_key(made, made.hosts[0].host_key, "h2")
    with made as started:
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
    inventory.write_text("[here]\naddress = local\ntor_cookie = control_auth_cookie\n")
    bad = run_fab(["tor.status", "--inventory", inventory])
    assert bad.returncode == 2 and "tor_cookie must be an absolute path on the host" in bad.stderr, bad.stderr
    assert f"{inventory}:3:" in bad.stderr
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
    pairs = torhost.keywords(r'METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/tmp/a \"b\"\\c\303\251"')
    assert pairs == {"METHODS": "COOKIE,SAFECOOKIE", "COOKIEFILE": '/tmp/a "b"\\cé'}
    assert torhost.keywords('Tor="0.4.9.11" EXTRA') == {"Tor": "0.4.9.11", "EXTRA": ""}
    assert torhost.endpoint("[::1]:9051")[1] == ("::1", 9051)
    assert torhost.endpoint("unix:/run/tor/control")[1] == "/run/tor/control"
    assert torhost.shown("a\x1b]0;x\x07b") == "a\\x1b]0;x\\x07b"


def test_cookie_and_host_script_keep_the_cookie(tmp_path, tor_bin):
    """SAFECOOKIE with a real tor answers 250 OK; the program's output and command line never hold the cookie."""
    with TorProcess(tmp_path, ip="127.0.0.1") as tor:
        host = Host(name="here", address="local", socks=closed_port("127.0.0.1"), tor_control=tor.control_address,
                    tor_cookie=str(tor.cookie_path))
        transport = LocalTransport(host)
        with CmdlineWatch(cookie_forms(tor), marker=b"python") as watch:
            answer = tor_module.run_on_host(transport, "newnym")
            assert answer["control"]["auth"] == "safecookie" and answer["control"]["reply"] == "250 OK"
            assert not any(form.decode("latin-1") in repr(answer) for form in cookie_forms(tor))
        assert watch.hits == [] and watch.sweeps > 0
        script = tor_module.host_script({"action": "newnym", "control": tor.control_address})
        assert not any(form in script for form in cookie_forms(tor))
        # Without tor_cookie, a port's cookie in tor's DataDirectory is not where beowulf looks: refused, unread.
        plain = Host(name="here", address="local", socks=host.socks, tor_control=tor.control_address)
        answer = tor_module.run_on_host(LocalTransport(plain), "status")
        assert answer["control"]["auth"] is None
        assert "not where beowulf looks for one; set tor_cookie" in answer["control"]["auth_error"]


@pytest.mark.slow
def test_restart_refuses_a_config_that_does_not_verify(tmp_path, tor_bin):
    """The running tor is left alone when its torrc no longer verifies; process without control fails cleanly."""
    with TorProcess(tmp_path, ip="127.0.0.1") as tor:
        inventory = tmp_path / "hosts.ini"
        inventory.write_text(f"[here]\naddress = local\nsocks = {tor.socks_address}\n"
                             f"tor_control = {tor.control_address}\ntor_cookie = {tor.cookie_path}\n")
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
    """h1: tor's control port + a SOCKS port that answers, but tor (DisableNetwork 1) is not
    bootstrapped; local: a bootstrapped FakeTor; h2: socks on a closed port -> exit 3."""
    h1, h2 = cluster["h1"], cluster["h2"]
    with TorProcess(tmp_path, ip=h1.ip, name="tor1") as tor1, \
            TorProcess(tmp_path, ip=h2.ip, control="socket", name="tor2") as tor2, \
            SocksGreeter(h1.ip) as greeter, FakeTor() as ready:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": greeter.address, **control(tor1)},
            "h2": {"socks": closed_port(h2.ip), **control(tor2)},
            "local": ready.inventory_keys(),
        })
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        done = run_fab(["tor.status", "--inventory", inventory], config=config)
        assert done.returncode == 3, done.stdout + done.stderr
        table = rows(done.stdout)
        version = tor1.getinfo("version")
        assert version.startswith(TOR_VERSION_PREFIX)
        assert " yes " in table["h1"] and " safecookie " in table["h1"] and version in table["h1"]
        # A real tor without network: the bootstrap phase it reports, and why.
        assert " 0% starting " in table["h1"] and " no " in table["h1"]
        assert table["h1"].rstrip().endswith("not bootstrapped; tor has DisableNetwork 1"), table["h1"]
        assert table["local"].rstrip().endswith(" ok") and "100% done" in table["local"]
        assert "no: connection refused" in table["h2"]
        assert tor2.control_address in table["h2"] and " yes " in table["h2"] and version in table["h2"]
        assert "SOCKS does not answer; tor has DisableNetwork 1" in table["h2"]
        assert "2 of 3 hosts answer SOCKS, 3 control ports answer, 1 tors bootstrapped" in done.stdout
        assert "2 of 3 hosts failed: h1, h2" in done.stderr
        assert greeter.greetings >= 1

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
            "h1": {"socks": tor1.socks_address, **control(tor1)},
            "h2": {"socks": tor2.socks_address, **control(tor2)},
            "local": {"socks": tor3.socks_address, **control(tor3)},
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
def test_restart_user_run_tor(twin_cluster, tmp_path):
    """A tor run by hand is stopped by pid and started again with the same command line (SSH and local)."""
    cluster = twin_cluster
    h1 = cluster["h1"]
    with TorProcess(tmp_path, ip=h1.ip, name="tor1") as tor1, \
            TorProcess(tmp_path, ip="127.0.0.1", control="socket", name="tor3") as tor3:
        # h2 reaches the same tor as h1 (one machine: same machine id and host key): it is restarted once.
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            "h1": {"socks": tor1.socks_address, **control(tor1)},
            "h2": {"socks": tor1.socks_address, **control(tor1)},
            "local": {"socks": tor3.socks_address, **control(tor3)},
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
            "h2": {"socks": tor2.socks_address, **control(tor2), "python": PYTHON36},
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


# ---------------------------------------------------------------- a hostile control port (run as nobody)


def _needs_setpriv():
    if not (os.path.exists("/usr/bin/setpriv") and os.path.exists("/usr/bin/python3")):
        if os.environ.get("CI") == "true":
            pytest.fail("needs /usr/bin/setpriv and /usr/bin/python3")
        pytest.skip("needs /usr/bin/setpriv and /usr/bin/python3")


@pytest.mark.slow
@pytest.mark.parametrize("share", [True, False], ids=["its-tor-holds-the-socket", "socket-not-held"])
def test_fake_control_port_cannot_make_us_run_a_program_as_root(ssh_cluster, tmp_path, share):
    """A control port run by nobody names its own program `tor`: tor.restart (login root) must not run it.

    With ``share`` the program even holds the listening socket, so only the owner rule stops it;
    without, the /proc check finds that the named pid does not hold the socket.
    """
    _needs_setpriv()
    h1 = ssh_cluster["h1"]
    with FakeControlPort(ip=h1.ip, methods="NULL", share=share) as fake:
        inventory = ssh_cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1"], extra={
            "h1": {"socks": closed_port(h1.ip), "tor_control": fake.address}})
        config = ssh_cluster.write_fabric_config(tmp_path / "fabric.yaml")
        for extra in ([], ["--method", "process"]):
            done = run_fab(["tor.restart", "--inventory", inventory, "--wait", "5", *extra], config=config)
            # Its program was started once, by itself, as nobody; nobody else started it, least of all root.
            assert fake.runs() == [str(fake.uid)], (fake.runs(), done.stdout)
            assert done.returncode == 1, done.stdout + done.stderr
            if share:
                assert "runs as uid 65534, not as the login user (uid 0)" in done.stdout, done.stdout
            else:
                assert f"does not hold the socket listening at {fake.address}" in done.stdout, done.stdout
        assert fake.program_pids() == [fake.tor_pid]


@pytest.mark.slow
def test_fake_control_port_gets_no_cookie_it_names(ssh_cluster, tmp_path):
    """A control port run by nobody offers only plain COOKIE and names a root-only file as the cookie.

    h1: beowulf does not read a path the server names; h2: even the hosts.ini tor_cookie is not sent
    to a listener that does not own it. tor.status, tor.newnym and tor.restart as root send no byte of it.
    """
    _needs_setpriv()
    h1, h2 = ssh_cluster["h1"], ssh_cluster["h2"]
    secret = root_only_secret(tmp_path)
    data = secret.read_bytes()
    with FakeControlPort(ip=h1.ip, methods="COOKIE", cookiefile=str(secret)) as fake:
        inventory = ssh_cluster.write_inventory(tmp_path / "hosts.ini", hosts=["h1", "h2"], extra={
            "h1": {"socks": closed_port(h1.ip), "tor_control": fake.address},
            "h2": {"socks": closed_port(h2.ip), "tor_control": fake.address, "tor_cookie": secret}})
        config = ssh_cluster.write_fabric_config(tmp_path / "fabric.yaml")
        status = run_fab(["tor.status", "--inventory", inventory], config=config)
        newnym = run_fab(["tor.newnym", "--inventory", inventory], config=config)
        restart = run_fab(["tor.restart", "--inventory", inventory, "--wait", "5"], config=config)
        received = fake.received()
        assert b"PROTOCOLINFO" in received  # it was asked
        for form in (data, data.hex().encode(), data.hex().upper().encode()):
            assert form not in received
        assert b"AUTHENTICATE" not in received
        table = rows(status.stdout)
        assert "not where beowulf looks for one; set tor_cookie" in table["h1"], status.stdout
        assert "is not served by the owner of" in table["h2"], status.stdout
        assert newnym.returncode == 1 and restart.returncode == 1
        assert fake.runs() == [str(fake.uid)]


# ---------------------------------------------------------------- client/torhost.py's rules, one by one


def test_safecookie_server_hash_is_checked():
    """The server's SAFECOOKIE hash is HMAC-SHA256(server key, cookie | client nonce | server nonce)."""
    import hashlib
    import hmac

    cookie, ours, theirs = b"c" * 32, b"n" * 32, b"s" * 32
    right = hmac.new(torhost.SERVER_KEY, cookie + ours + theirs, hashlib.sha256).digest()
    assert torhost.check_server_hash(cookie, ours, theirs, right)
    assert not torhost.check_server_hash(cookie, ours, theirs, b"\0" * 32)
    assert not torhost.check_server_hash(b"d" * 32, ours, theirs, right)
    server, client = torhost.safecookie_hashes(cookie, ours, theirs)
    assert server == right and client == hmac.new(torhost.CLIENT_KEY, cookie + ours + theirs,
                                                  hashlib.sha256).digest()


def test_cookie_paths_beowulf_reads(tmp_path):
    """Only tor_cookie, Debian's file, or a file in a control socket's own (private) folder."""
    expected = torhost.expected_cookie
    assert expected("127.0.0.1:9051", "/etc/tor/cookie", "/etc/shadow") == ("/etc/tor/cookie", None)
    path, why = expected("127.0.0.1:9051", "", "/etc/shadow")
    assert path is None and "/etc/shadow, which is not where beowulf looks" in why
    assert expected("127.0.0.1:9051", "", torhost.DEBIAN_COOKIE) == (torhost.DEBIAN_COOKIE, None)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    sock = str(private / "control")
    assert expected(sock, "", str(private / "control_auth_cookie"))[0] == str(private / "control_auth_cookie")
    assert expected(f"unix:{sock}", "", str(private / "other"))[0] == str(private / "other")
    assert expected(sock, "", str(private / ".." / "secret"))[0] is None
    assert expected(sock, "", str(tmp_path / "elsewhere"))[0] is None
    assert expected(sock, "", "relative/cookie")[0] is None
    (private / "control.authcookie").write_bytes(b"x" * 32)
    assert expected(sock, "", None) == (str(private / "control.authcookie"), None)
    shared = tmp_path / "shared"  # like /tmp: anyone may put a socket there, so its files are not tor's
    shared.mkdir()
    shared.chmod(0o1777)
    assert expected(str(shared / "control"), "", str(shared / "secret"))[0] is None
    escape = "\x1b]0;owned\x07"
    assert "\x1b" not in expected("127.0.0.1:9051", "", "/tmp/" + escape)[1]


def test_cookie_file_must_be_a_32_byte_regular_file(tmp_path):
    good = tmp_path / "cookie"
    good.write_bytes(b"k" * 32)
    assert torhost.read_cookie(str(good)) == (b"k" * 32, os.geteuid())
    link = tmp_path / "link"
    link.symlink_to(good)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    short = tmp_path / "short"
    short.write_bytes(b"k" * 31)
    for path, text in ((link, "cannot read the cookie"), (fifo, "not a regular file"), (short, "not 32 bytes"),
                       (tmp_path / "missing", "cannot read the cookie")):
        with pytest.raises(torhost.ControlError, match=text):
            torhost.read_cookie(str(path))


def test_proc_socket_ownership_of_real_listeners(tmp_path):
    """/proc/net/tcp, tcp6 and unix against sockets this test process really listens on."""
    import socket
    import subprocess

    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    address = f"127.0.0.1:{tcp.getsockname()[1]}"
    mine = os.stat(f"/proc/self/fd/{tcp.fileno()}").st_ino
    inodes, uids = torhost.listening_inodes(address)
    assert mine in inodes and uids == {os.geteuid()}
    assert torhost.pid_holds(os.getpid(), address) == (True, None)
    other = subprocess.Popen(["sleep", "30"])
    try:
        holds, why = torhost.pid_holds(other.pid, address)
        assert holds is False and "does not hold the socket" in why
    finally:
        other.kill()
        other.wait()
    tcp.close()
    assert torhost.pid_holds(os.getpid(), address)[0] is False  # nothing listens any more

    wildcard = socket.socket()
    wildcard.bind(("0.0.0.0", 0))
    wildcard.listen(1)
    with wildcard:
        assert torhost.pid_holds(os.getpid(), f"127.0.0.5:{wildcard.getsockname()[1]}") == (True, None)
    if socket.has_ipv6:
        try:
            six = socket.socket(socket.AF_INET6)
            six.bind(("::1", 0))
        except OSError:
            six = None
        if six is not None:
            with six:
                six.listen(1)
                assert torhost.pid_holds(os.getpid(), f"[::1]:{six.getsockname()[1]}") == (True, None)

    path = str(tmp_path / "control")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(1)
    with unix:
        assert torhost.pid_holds(os.getpid(), path) == (True, None)
        assert torhost.pid_holds(os.getpid(), f"unix:{path}") == (True, None)
    sample = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
              "   0: 0100007F:2352 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 4242\n"
              "   1: 0100007F:2352 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   107        0 4243\n")
    assert torhost.tcp_listeners(sample, socket.AF_INET) == [("127.0.0.1", 9042, 107, 4242)]


def test_process_restart_rules(tmp_path):
    """restartable(): a program called tor that holds the socket, runs as us, from a file only its owner writes."""
    import socket
    import subprocess

    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / "tor"
    shutil.copyfile(shutil.which("sleep"), program)
    program.chmod(0o755)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    holder = subprocess.Popen([str(program), "30"], pass_fds=(server.fileno(),))
    stranger = subprocess.Popen([str(program), "30"])
    try:
        found, why = torhost.restartable(holder.pid, address)
        assert why is None and found["exe"] == str(program) and found["argv"] == [str(program), "30"]
        assert "does not hold the socket" in torhost.restartable(stranger.pid, address)[1]
        assert "runs as uid" in torhost.restartable(holder.pid, address, me=12345)[1]
        program.chmod(0o775)
        assert "may be written by others" in torhost.restartable(holder.pid, address)[1]
        assert "not tor" in torhost.restartable(os.getpid(), address)[1]
    finally:
        for child in (holder, stranger):
            child.kill()
            child.wait()
        server.close()


def test_plain_cookie_only_to_a_server_naming_the_expected_file(tmp_path):
    """A server offering only COOKIE gets the cookie when it names the expected file, else nothing."""
    import socket
    import threading

    cookie = tmp_path / "cookie"
    cookie.write_bytes(b"\x01" * 32)

    def serve(server, named, got):
        conn, _ = server.accept()
        with conn:
            data = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
                if chunk.startswith(b"PROTOCOLINFO"):
                    line = 'METHODS=COOKIE' + (f' COOKIEFILE="{named}"' if named else "")
                    conn.sendall(f"250-PROTOCOLINFO 1\r\n250-AUTH {line}\r\n250 OK\r\n".encode())
                else:
                    conn.sendall(b"250 OK\r\n")
            got.append(data)

    for named, sent in ((str(cookie), True), (None, False), (str(tmp_path / "other"), False)):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        got: list = []
        thread = threading.Thread(target=serve, args=(server, named, got))
        thread.start()
        ctl, status = torhost.open_control(f"127.0.0.1:{server.getsockname()[1]}", str(cookie))
        if ctl is not None:
            ctl.close()
        thread.join(10)
        server.close()
        assert (status["auth"] == "cookie") is sent, status
        assert ((b"01" * 32) in got[0]) is sent


def test_machine_identity(tmp_path):
    """One machine: same reported machine id and a host key in common (cluster/machine.py)."""
    import paramiko

    from cluster.machine import Machine, MachineOnce, local_host_keys
    from cluster.ssh import fingerprint

    a = Machine("a", "m1", frozenset({"SHA256:k1"}))
    assert a.same(Machine("b", "m1", frozenset({"SHA256:k1", "SHA256:k2"})))
    assert not a.same(Machine("liar", "m1", frozenset({"SHA256:k9"})))  # the id alone is only a claim
    assert not a.same(Machine("b", "m2", frozenset({"SHA256:k1"})))
    assert not Machine("x", None, frozenset({"k"})).same(Machine("y", None, frozenset({"k"})))
    once, calls = MachineOnce(), []
    for machine in (a, Machine("liar", "m1", frozenset({"SHA256:k9"})), Machine("b", "m1", frozenset({"SHA256:k1"}))):
        once.run(machine, ("tor",), lambda m=machine: calls.append(m.name))
    assert calls == ["a", "liar"]
    key = keygen(tmp_path / "ssh_host_ed25519_key")
    public = paramiko.Ed25519Key.from_private_key_file(str(key))
    assert local_host_keys(str(tmp_path / "ssh_host_*_key.pub")) == {fingerprint(public)}


SYSTEM_HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key")


@pytest.mark.slow
def test_restart_once_per_machine_local_and_ssh(tmp_path, tor_bin):
    """A local entry and SSH entries to this computer's own sshd (its host key) reach one tor: restarted once.

    The local entry is done in a moment while SSH entries are still connecting; they must not
    restart the tor again when they find the pid that restart produced.
    """
    require_sshd()
    if not SYSTEM_HOST_KEY.exists() or not Path(f"{SYSTEM_HOST_KEY}.pub").exists():
        message = f"needs this computer's sshd host key {SYSTEM_HOST_KEY}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cluster = SshCluster(tmp_path / "cluster", 2)
    share_host_key(cluster, SYSTEM_HOST_KEY, "h1", "h2")  # a link to the key: sshd reads it, nothing copies it
    with cluster, TorProcess(tmp_path, ip="127.0.0.1", name="tor1") as tor1:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True, extra={
            name: {"socks": tor1.socks_address, **control(tor1)} for name in ("h1", "h2", "local")})
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        before = tor1.pid
        done = run_fab(["tor.restart", "--inventory", inventory, "--wait", "30"], config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        tor1.wait_ready(old_pid=before)
        assert tor1.log_text().count("Catching signal TERM, exiting cleanly") == 1, done.stdout
        table = rows(done.stdout)
        assert sum("(same tor as" in line for line in table.values()) == 2, done.stdout
        assert all(f" {before} " in line and f" {tor1.pid} " in line for line in table.values()), done.stdout


def test_no_import_circle_between_provision_and_tor(repo_root):
    """cluster/tor.py needs nothing from cluster/provision.py (which imports tor for setup --tor)."""
    import ast
    import subprocess
    import sys

    tree = ast.parse((repo_root / "cluster" / "tor.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "provision" not in imported and "cluster.provision" not in imported
    for first in ("cluster.tor", "cluster.provision"):
        done = subprocess.run([sys.executable, "-c", f"import {first}"], cwd=repo_root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
