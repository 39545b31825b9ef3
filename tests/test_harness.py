"""The test harness itself: real sshd hosts reached with a strict client, and the relay."""

from __future__ import annotations

import configparser
import socket
import threading
import time
from pathlib import Path

import paramiko
import pytest

from harness import Relay, SshCluster, fab_argv, free_port, pid_alive, run_fab


def connect(cluster: SshCluster, ip: str, port: int, timeout: float = 5) -> paramiko.SSHClient:
    """An SSH client that only trusts the cluster's known_hosts."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(cluster.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(ip, port=port, username=cluster.user, key_filename=str(cluster.client_key),
                   timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                   look_for_keys=False, allow_agent=False)
    return client


def run(client: paramiko.SSHClient, command: str) -> str:
    _, out, _ = client.exec_command(command, timeout=10)
    return out.read().decode()


class EchoServer:
    """A loopback TCP echo server on a thread."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((ip, 0))
        self.addr = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> float:
    t0 = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload
    return time.monotonic() - t0


# -- sshd hosts --------------------------------------------------------------------------


def test_hosts_answer_with_their_own_keys(ssh_cluster):
    keys = set()
    for h in ssh_cluster:
        assert h.is_running and h.pid
        client = connect(ssh_cluster, h.ip, h.port)
        try:
            assert run(client, "echo hi") == "hi\n"
            key = client.get_transport().get_remote_server_key()
            assert f"{key.get_name()} {key.get_base64()}" == h.public_key()
            keys.add(key.get_base64())
        finally:
            client.close()
    assert len(keys) == len(ssh_cluster) == 3
    assert [h.ip for h in ssh_cluster] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_wrong_host_key_is_refused(ssh_cluster):
    h1, h2 = ssh_cluster["h1"], ssh_cluster["h2"]
    client = paramiko.SSHClient()
    # known_hosts claims h2's key for h1's address: a strict client must refuse.
    client.get_host_keys().add(f"[{h1.ip}]:{h1.port}", "ssh-ed25519",
                               paramiko.Ed25519Key(filename=str(h2.host_key)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(h1.ip, port=h1.port, username="root",
                       key_filename=str(ssh_cluster.client_key),
                       look_for_keys=False, allow_agent=False, timeout=5)
    client.close()


def test_sftp_works(ssh_cluster):
    h = ssh_cluster["h3"]
    client = connect(ssh_cluster, h.ip, h.port)
    try:
        with client.open_sftp() as sftp:
            target = f"{h.workdir}/sftp.txt"
            with sftp.open(target, "w") as f:
                f.write("via sftp")
        assert Path(target).read_text() == "via sftp"
    finally:
        client.close()


def test_stop_and_restart_host(ssh_cluster):
    h = ssh_cluster["h2"]
    port, key = h.port, h.public_key()
    session = connect(ssh_cluster, h.ip, h.port)
    run(session, "true")
    h.stop()
    assert not h.is_running and h.pid is None
    with pytest.raises((OSError, paramiko.SSHException)):
        connect(ssh_cluster, h.ip, h.port, timeout=2)
    # stop() also ends open sessions, as if the machine went away.
    with pytest.raises((OSError, paramiko.SSHException, EOFError)):
        run(session, "echo still here")
    session.close()
    h.start()
    assert h.is_running and h.port == port and h.public_key() == key
    client = connect(ssh_cluster, h.ip, h.port)
    assert run(client, "echo back") == "back\n"
    client.close()


def test_stop_kills_remote_commands(ssh_cluster):
    h = ssh_cluster["h1"]
    client = connect(ssh_cluster, h.ip, h.port)
    try:
        client.exec_command("sleep 300")
        deadline = time.monotonic() + 5
        while not any(_comm(p) == "sleep" for p in h.session_pids()):
            assert time.monotonic() < deadline, "sleep never started"
            time.sleep(0.05)
        pids = h.session_pids()
        h.stop()
        assert not [p for p in pids if pid_alive(p)]
    finally:
        client.close()
        h.start()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_inventory_and_fabric_config(ssh_cluster, tmp_path):
    inv = ssh_cluster.write_inventory(tmp_path / "hosts.ini",
                                      extra={"h2": {"python": "/bin/false"}}, local=True)
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(inv)
    assert cp.sections() == ["h1", "h2", "h3", "local"]
    assert cp["h1"]["address"] == "root@127.0.0.2"
    assert int(cp["h3"]["port"]) == ssh_cluster["h3"].port
    assert cp["h2"]["python"] == "/bin/false"
    assert Path(cp["h1"]["identity"]) == ssh_cluster.client_key
    assert Path(cp["h1"]["workdir"]).is_dir()
    assert cp["local"]["address"] == "local"
    sub = ssh_cluster.write_inventory(tmp_path / "two.ini", hosts=["h3", "h1"])
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(sub)
    assert cp.sections() == ["h3", "h1"]
    with pytest.raises(KeyError):
        ssh_cluster.write_inventory(tmp_path / "bad.ini", extra={"nope": {}})

    lines = ssh_cluster.known_hosts_path.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == [f"[{h.ip}]:{h.port}" for h in ssh_cluster]

    from invoke.vendor import yaml

    cfg = yaml.safe_load(ssh_cluster.write_fabric_config(tmp_path / "fabric.yaml").read_text())
    assert cfg == {
        "beowulf": {"known_hosts": str(ssh_cluster.known_hosts_path)},
        "connect_kwargs": {"key_filename": str(ssh_cluster.client_key)},
        "timeouts": {"connect": 10},
    }


def test_fabric_connection_with_harness_files(ssh_cluster):
    """Plain Fabric, strict host keys, the harness's key and known_hosts."""
    from fabric import Connection

    h = ssh_cluster["h1"]
    c = Connection(h.ip, user="root", port=h.port,
                   connect_kwargs={"key_filename": str(ssh_cluster.client_key),
                                   "look_for_keys": False, "allow_agent": False})
    c.client.load_host_keys(str(ssh_cluster.known_hosts_path))
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        assert c.run("echo ok", hide=True, in_stream=False).stdout == "ok\n"
    finally:
        c.close()


def test_user_known_hosts_untouched(ssh_cluster, tmp_path):
    user_file = Path.home() / ".ssh" / "known_hosts"
    before = user_file.read_bytes() if user_file.exists() else None
    ssh_cluster.write_inventory(tmp_path / "hosts.ini")
    ssh_cluster.write_fabric_config(tmp_path / "fabric.yaml")
    client = connect(ssh_cluster, ssh_cluster["h1"].ip, ssh_cluster["h1"].port)
    client.close()
    assert (user_file.read_bytes() if user_file.exists() else None) == before


@pytest.mark.slow
def test_twenty_hosts_start_quickly(make_cluster):
    t0 = time.monotonic()
    cluster = make_cluster(20)
    elapsed = time.monotonic() - t0
    assert len({h.ip for h in cluster}) == 20
    assert all(h.is_running for h in cluster)
    assert elapsed < 120, f"20 hosts took {elapsed:.1f}s"
    last = cluster["h20"]
    assert last.ip == "127.0.0.21"
    client = connect(cluster, last.ip, last.port)
    assert run(client, "echo hi") == "hi\n"
    client.close()
    pids = [h.pid for h in cluster]
    cluster.stop()
    assert not [p for p in pids if pid_alive(p)]


def test_run_fab_builds_command(repo_root, tmp_path):
    argv = fab_argv(["--list"], config=tmp_path / "f.yaml")
    assert argv[1:5] == ["-m", "fabric", "-r", str(repo_root)]
    assert argv[5:] == ["-f", str(tmp_path / "f.yaml"), "--list"]
    result = run_fab(["--version"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fabric" in result.stdout


# -- relay -------------------------------------------------------------------------------


def test_relay_forwards(echo):
    with Relay("127.0.0.1", *echo.addr) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            roundtrip(s, b"hello")
            roundtrip(s, b"x" * 200_000)
        assert relay.accepted == 1
        deadline = time.monotonic() + 10  # the relay counts in its own threads, maybe a moment later
        while relay.bytes_down != 200_005 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.bytes_up == relay.bytes_down == 200_005


def test_relay_delay(echo):
    with Relay("127.0.0.1", *echo.addr, delay=0.1) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            assert roundtrip(s) >= 0.19  # one delay each way
            relay.set_delay(0)
            assert roundtrip(s) < 0.1


def test_relay_bandwidth(echo):
    with Relay("127.0.0.1", *echo.addr, bandwidth=200_000) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            # 100 kB up then down, each capped at 200 kB/s (pipelined): >= ~0.5 s
            assert roundtrip(s, b"y" * 100_000) >= 0.4


def test_relay_blackhole_holds_data_without_closing(echo):
    with Relay("127.0.0.1", *echo.addr) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            roundtrip(s)
            relay.set_blackhole(True)
            s.sendall(b"lost?")
            s.settimeout(0.5)
            with pytest.raises(socket.timeout):  # no data, but no EOF either
                s.recv(10)
            assert relay.connections == 1
            relay.set_blackhole(False)
            s.settimeout(5)
            assert s.recv(10) == b"lost?"


def test_relay_blackhole_holds_new_connections(echo):
    with Relay("127.0.0.1", *echo.addr) as relay:
        relay.set_blackhole(True)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(b"a")
            s.settimeout(0.3)
            with pytest.raises(socket.timeout):
                s.recv(1)
            relay.set_blackhole(False)
            s.settimeout(5)
            assert s.recv(1) == b"a"


def test_relay_drop_all_closes(echo):
    with Relay("127.0.0.1", *echo.addr) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            roundtrip(s)
            relay.drop_all()
            s.settimeout(5)
            assert s.recv(10) == b""
        deadline = time.monotonic() + 5
        while relay.connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_relay_refuses_non_loopback():
    with pytest.raises(ValueError):
        Relay("0.0.0.0", "127.0.0.1", 22)
    with pytest.raises(ValueError):
        Relay("127.0.0.1", "10.0.0.1", 22)
    with pytest.raises(ValueError):
        free_port("192.168.0.1")


def test_ssh_through_relay(make_cluster):
    cluster = make_cluster(1)
    relay = cluster.add_relay("h1", delay=0.05)
    assert relay.listen_ip == "127.0.1.2"
    client = connect(cluster, relay.listen_ip, relay.port)
    try:
        t0 = time.monotonic()
        assert run(client, "echo via relay") == "via relay\n"
        assert time.monotonic() - t0 >= 0.1
        relay.set_blackhole(True)
        transport = client.get_transport()
        assert transport.is_active()
        relay.set_blackhole(False)
        assert run(client, "echo healed") == "healed\n"
    finally:
        client.close()
    inv = cluster.write_inventory(cluster.base_dir / "hosts.ini")
    text = inv.read_text()
    assert f"address = root@{relay.listen_ip}" in text and f"port = {relay.port}" in text
    direct = cluster.write_inventory(cluster.base_dir / "direct.ini", direct=True).read_text()
    assert f"port = {cluster['h1'].port}" in direct
    known = cluster.known_hosts_path.read_text()
    assert f"[{relay.listen_ip}]:{relay.port} {cluster['h1'].public_key()}" in known


def test_require_sshd_skips_locally_and_fails_in_ci(monkeypatch):
    import harness

    monkeypatch.setattr(harness, "sshd_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        harness.require_sshd()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        harness.require_sshd()
    monkeypatch.setattr(harness, "sshd_available", lambda: True)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception):
        harness.require_sshd()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        harness.require_sshd()


def test_shared_cluster_is_restored_part1(ssh_cluster):
    ssh_cluster["h3"].kill()
    ssh_cluster.add_relay("h1")
    assert not ssh_cluster["h3"].is_running


def test_shared_cluster_is_restored_part2(ssh_cluster):
    assert all(h.is_running for h in ssh_cluster)
    assert not ssh_cluster.relays
    assert len(ssh_cluster.known_hosts_path.read_text().splitlines()) == 3
    client = connect(ssh_cluster, ssh_cluster["h3"].ip, ssh_cluster["h3"].port)
    client.close()
