"""Security pass (issue 6): host keys, injection, file permissions, secrets. See SECURITY.md.

Every host here is a real sshd on 127.0.0.x (tests/harness) or ``address = local``;
web requests go to the harness's web server on 127.0.0.1 only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from cluster.jobs.scrape import iter_pages
from cluster.store import Store
from harness import REPO_ROOT, SshCluster, fab_argv, fab_env, free_port, in_ci, require_sshd
from harness.tor import SocksGreeter
from harness.web import WebServer

SLOW = pytest.mark.slow


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def accepted_logins(host) -> int:
    """How many logins this test host's sshd has accepted so far (LogLevel VERBOSE)."""
    return host.read_log().count("Accepted publickey")


def markers(folder: Path) -> list:
    """Files a successful injection would have created (the folder starts empty)."""
    return sorted(p.name for p in folder.iterdir())


def ini_value(text: str) -> str:
    """``text`` as a hosts.ini value: a newline becomes an indented continuation line."""
    return text.replace("\n", "\n    ")


def ssh_section(name: str, host, cluster: SshCluster, **keys) -> str:
    lines = [f"[{name}]", f"address = {host.address}", f"port = {host.port}", f"identity = {cluster.client_key}"]
    lines += [f"{key} = {ini_value(str(value))}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- host keys
# tests/test_setup.py covers: unknown refused then --accept-new, changed refused with and
# without --accept-new, hashed entries accepted, a ProxyJump hop's unknown key, `fab -H hosts`.


@pytest.fixture
def two_hosts(make_cluster, tmp_path):
    cluster = make_cluster(2)
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    return cluster, inventory, cluster.write_fabric_config(tmp_path / "fabric.yaml")


@SLOW
def test_unknown_key_writes_nothing_and_never_authenticates(two_hosts, run_fab):
    cluster, inventory, config = two_hosts
    known = cluster.known_hosts_path
    before = {h.name: accepted_logins(h) for h in cluster}
    known.unlink()  # no known_hosts at all: it must not be created
    done = run_fab(["hosts", "--inventory", inventory], config=config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count("unknown host key") == 2 and "Traceback" not in done.stderr
    assert not known.exists()
    unrelated = b"[127.0.0.9]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVucmVsYXRlZCBrZXkgZm9yIHRoZSB0ZXN0cw==\n"
    known.write_bytes(unrelated)
    for task in (["hosts"], ["setup", "--no-numpy"], ["teardown", "--yes"]):
        done = run_fab([*task, "--inventory", inventory], config=config)
        assert done.returncode == 1 and "unknown host key" in done.stdout, (task, done.stdout + done.stderr)
    assert known.read_bytes() == unrelated
    # The key is refused before authentication: no login, no command ran on either host.
    assert {h.name: accepted_logins(h) for h in cluster} == before
    assert not (cluster["h1"].workdir / "client").exists()


def proxyjump_config(cluster: SshCluster, path: Path) -> Path:
    jump, inner = cluster["h2"], cluster["h1"]
    path.write_text(
        f"Host jumpbox\n  HostName {jump.ip}\n  Port {jump.port}\n  User root\n  IdentityFile {cluster.client_key}\n"
        f"Host inner\n  HostName {inner.ip}\n  Port {inner.port}\n  User root\n  IdentityFile {cluster.client_key}\n"
        f"  ProxyJump jumpbox\n")
    return path


@SLOW
def test_proxyjump_hop_changed_key_refused_and_accept_new_records_each_hop(two_hosts, run_fab, tmp_path):
    cluster, _, config = two_hosts
    inner, jump = cluster["h1"], cluster["h2"]
    ssh_config = proxyjump_config(cluster, tmp_path / "ssh_config")
    inventory = tmp_path / "inner.ini"
    inventory.write_text(f"[inner]\naddress = inner\nworkdir = {tmp_path / 'w'}\n")
    known = cluster.known_hosts_path
    # The hop presents a key other than the recorded one (h1's key recorded for h2's address).
    known.write_text(f"{inner.known_hosts_line()}\n[{jump.ip}]:{jump.port} {inner.public_key()}\n")
    forged = known.read_bytes()
    before = accepted_logins(inner), accepted_logins(jump)
    for extra in ([], ["--accept-new"]):
        done = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, *extra], config=config)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"host key for {jump.ip} has CHANGED" in done.stdout, done.stdout
    assert known.read_bytes() == forged
    assert (accepted_logins(inner), accepted_logins(jump)) == before
    # Nothing known: --accept-new records the hop and the target, each under its own [ip]:port.
    known.unlink()
    done = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, "--accept-new"], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert mode(known) == 0o600
    assert sorted(known.read_text().splitlines()) == sorted([inner.known_hosts_line(), jump.known_hosts_line()])


@SLOW
def test_hashed_known_hosts_changed_key_refused_and_nothing_appended(two_hosts, run_fab):
    cluster, inventory, config = two_hosts
    h1, h2 = cluster["h1"], cluster["h2"]
    known = cluster.known_hosts_path
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    hashed = known.read_bytes()
    assert b"|1|" in hashed and b"127.0.0" not in hashed
    done = run_fab(["hosts", "--inventory", inventory, "--accept-new"], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert known.read_bytes() == hashed  # a hashed entry counts as known: no plaintext duplicate
    # A hashed entry with the wrong key is a changed key, --accept-new or not.
    known.write_text(f"[{h1.ip}]:{h1.port} {h2.public_key()}\n{h2.known_hosts_line()}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    forged = known.read_bytes()
    done = run_fab(["hosts", "--inventory", inventory, "--accept-new"], config=config)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "has CHANGED" in done.stdout and known.read_bytes() == forged


@SLOW
def test_changed_hop_key_hint_names_the_hop(two_hosts, run_fab, tmp_path):
    cluster, _, config = two_hosts
    inner, jump = cluster["h1"], cluster["h2"]
    inventory = tmp_path / "inner.ini"
    inventory.write_text(f"[inner]\naddress = inner\nworkdir = {tmp_path / 'w'}\n")
    cluster.known_hosts_path.write_text(f"{inner.known_hosts_line()}\n[{jump.ip}]:{jump.port} {inner.public_key()}\n")
    done = run_fab(["--ssh-config", proxyjump_config(cluster, tmp_path / "ssh_config"), "hosts",
                    "--inventory", inventory], config=config)
    assert done.returncode == 1
    assert f"ssh-keygen -R '[{jump.ip}]:{jump.port}'" in done.stdout, done.stdout


@SLOW
def test_known_hosts_marker_lines_fail_cleanly_and_revoked_is_never_accepted(two_hosts, run_fab):
    cluster, inventory, config = two_hosts
    h1, h2 = cluster["h1"], cluster["h2"]
    revoked = f"@revoked [{h1.ip}]:{h1.port} {h1.public_key()}\n"
    cluster.known_hosts_path.write_text(revoked + h2.known_hosts_line() + "\n")
    done = run_fab(["hosts", "--inventory", inventory, "--accept-new"], config=config)
    assert "h1" in done.stdout and done.returncode in (1, 3)
    assert cluster.known_hosts_path.read_text() == revoked + h2.known_hosts_line() + "\n"  # h1 not recorded
    assert "Traceback" not in done.stderr, done.stderr


@SLOW
def test_dash_H_refused_by_every_task_without_connecting(make_cluster, run_fab):
    cluster = make_cluster(1)
    h1 = cluster["h1"]
    connections = h1.read_log().count("Connection from")
    target = f"root@{h1.ip}:{h1.port}"
    for task in (["setup"], ["hosts"], ["teardown", "--yes"], ["primes", "--start", "1", "--end", "100"],
                 ["tor.restart"], ["tor.status"]):
        done = run_fab(["-H", target, *task])
        assert done.returncode == 2, (task, done.stdout + done.stderr)
        assert "fab -H is not supported" in done.stderr and "Traceback" not in done.stderr
    assert h1.read_log().count("Connection from") == connections  # not even a TCP connection


# ---------------------------------------------------------------- injection


@SLOW
def test_hostile_workdir_and_host_name_stay_literal_over_ssh(make_cluster, run_fab, tmp_path):
    cluster = make_cluster(1)
    h1 = cluster["h1"]
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    trap = tmp_path / "markers"
    trap.mkdir()

    def touch(i):
        return f"touch {trap}/pwned-{i}"

    workdir = (f"{tmp_path}/w/it's \"q\";x $({touch(1)}) `{touch(2)}` x'; {touch(3)}; echo '"
               f" & {touch(4)} | {touch(5)} > {trap}/pwned-6 back\\slash $HOME ~ * %s %(x)s"
               f"\n$({touch(7)})")
    name = f"it's \"a;b\" $({touch(8)}) `{touch(9)}` x'; {touch(10)}; '"
    inventory = tmp_path / "evil.ini"
    inventory.write_text(ssh_section(name, h1, cluster, workdir=workdir, slots=1))
    both = tmp_path / "both.ini"
    both.write_text(inventory.read_text() + ssh_section(
        "badpython", h1, cluster, workdir=tmp_path / "w2", python=f"python3'; {touch(11)}; '$({touch(12)})"))

    setup = run_fab(["setup", "--inventory", both, "--no-numpy"], config=config)
    assert setup.returncode == 3, setup.stdout + setup.stderr  # badpython fails, the other works
    assert name in setup.stdout and "Traceback" not in setup.stderr
    assert "badpython" in setup.stderr
    literal = Path(workdir)
    assert (literal / "client" / "agent.py").is_file() and mode(literal) == 0o700
    assert markers(trap) == []

    health = run_fab(["hosts", "--inventory", inventory], config=config)
    assert health.returncode == 0, health.stdout + health.stderr
    assert name in health.stdout and " fresh " in health.stdout

    db = tmp_path / "r.db"
    primes = run_fab(["primes", "--start", "1", "--end", "100000", "--inventory", inventory, "--db", db],
                     config=config)
    assert primes.returncode == 0, primes.stdout + primes.stderr
    assert "9,592 primes in [1, 100,000]" in primes.stdout and name in primes.stdout
    with sqlite3.connect(db) as conn:
        assert {row[0] for row in conn.execute("SELECT DISTINCT host FROM blocks")} == {name}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert markers(trap) == []

    teardown = run_fab(["teardown", "--yes", "--inventory", inventory], config=config)
    assert teardown.returncode == 0, teardown.stdout + teardown.stderr
    assert not literal.exists() and (tmp_path / "w").is_dir()
    assert markers(trap) == []


def local_inventory(path: Path, name: str, **keys) -> Path:
    body = "".join(f"{key} = {ini_value(str(value))}\n" for key, value in keys.items())
    path.write_text(f"[{name}]\naddress = local\nslots = 1\n{body}")
    return path


def test_hostile_local_host_name_and_tor_control_path(run_fab, tmp_path):
    """A local host runs the same quoted commands through ``sh -c``: the name is data there too."""
    trap = tmp_path / "markers"
    trap.mkdir()
    name = f"l'\"; $(touch {trap}/p1) `touch {trap}/p2`;'"
    inventory = local_inventory(tmp_path / "hosts.ini", name)
    db = tmp_path / "r.db"
    done = run_fab(["primes", "--start", "1", "--end", "10000", "--inventory", inventory, "--db", db])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1,229 primes" in done.stdout and name in done.stdout
    with sqlite3.connect(db) as conn:
        assert {row[0] for row in conn.execute("SELECT DISTINCT host FROM blocks")} == {name}
    # tor_control and socks reach the host inside a script on stdin, never on a command line.
    control = f"/nonexistent/x'\"$(touch {trap}/p3)`touch {trap}/p4`;\n$(touch {trap}/p5)"
    tor = local_inventory(tmp_path / "tor.ini", "t", tor_control=control, socks=f"127.0.0.1:{free_port('127.0.0.1')}")
    done = run_fab(["tor.status", "--inventory", tor])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert markers(trap) == []


def test_urls_with_sql_and_shell_syntax_are_stored_verbatim(run_fab, tmp_path):
    trap = tmp_path / "markers"
    trap.mkdir()
    with WebServer(robots="User-agent: *\nDisallow:\n") as web:
        queries = [
            "q=');DROP/**/TABLE/**/pages;--",
            "q=%27)%3B%20DROP%20TABLE%20pages%3B--&x=\"'",
            f"a=$(touch%20{trap}/u1)&b=`touch%20{trap}/u2`&c=;touch%20{trap}/u3",
            "nl=%0A%0Dinjected:%20header&nul=%00&pct=%25&quote=\"\\'",
            "x=1'%20OR%20'1'='1&y=\\\";--",
        ]
        urls = [web.url(f"/page/{i}?{query}") for i, query in enumerate(queries)]
        urls.append(web.url("/page/9'\";$(x)`y`--"))
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        db = tmp_path / "r.db"
        inventory = local_inventory(tmp_path / "hosts.ini", "here")
        done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db, "--delay", "0"],
                       timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        requested = {unquote(path) for path in web.paths()}
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        stored = {record["url"]: record for record, _ in iter_pages(store, run_id)}
    assert set(stored) == set(urls)
    assert all(stored[url]["status"] == 200 for url in urls[:-1])
    for url in urls:  # the server was asked for each path and query (the client may %-encode " \\ `)
        assert unquote(url.split(str(web.port), 1)[1]) in requested
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM pages").fetchone()[0] == len(urls)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    export = tmp_path / "pages.jsonl"
    again = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db, "--export", export])
    assert again.returncode == 0, again.stdout + again.stderr
    assert {json.loads(line)["url"] for line in export.read_text().splitlines()} == set(urls)
    assert markers(trap) == []


# ---------------------------------------------------------------- file permissions


@pytest.fixture
def umask_zero():
    """Run with umask 0, so a private mode can only come from the code, not the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_new_store_and_log_are_owner_only(run_fab, tmp_path, umask_zero):
    folder = tmp_path / "sub"
    folder.mkdir(mode=0o755)
    db = folder / "r.db"
    done = run_fab(["primes", "--start", "1", "--end", "1000", "--inventory",
                    local_inventory(tmp_path / "hosts.ini", "here"), "--db", db])
    assert done.returncode == 0, done.stdout + done.stderr
    assert mode(db) == 0o600
    assert mode(folder / "beowulf.log") == 0o600
    for sibling in (folder / "r.db-wal", folder / "r.db-shm"):
        if sibling.exists():
            assert mode(sibling) == 0o600
    # While a store is open its -wal and -shm exist: they are private too.
    path = tmp_path / "direct.db"
    with Store(path) as store:
        store.open_run("primes", {"start": 1, "end": 2}, 2)
        assert {p.name: mode(p) for p in tmp_path.glob("direct.db*")} == {
            "direct.db": 0o600, "direct.db-wal": 0o600, "direct.db-shm": 0o600}
    # An existing store keeps its mode (not loosened, not changed behind the owner's back).
    old = tmp_path / "old.db"
    Store(old).close()
    os.chmod(old, 0o640)
    Store(old).close()
    assert mode(old) == 0o640


@SLOW
def test_remote_workdir_is_0700_new_or_existing(make_cluster, run_fab, tmp_path):
    cluster = make_cluster(1)
    h1 = cluster["h1"]
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    fresh = tmp_path / "new" / "deeper" / "beowulf"
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(ssh_section("old", h1, cluster, workdir=existing)
                         + ssh_section("new", h1, cluster, workdir=fresh))
    done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert mode(existing) == 0o700 and mode(fresh) == 0o700
    assert mode(fresh.parent) == 0o700 and mode(fresh.parent.parent) == 0o700  # created by setup too
    # The unpacked bundle is private to the login user as well (umask 077).
    assert not mode(fresh / "lib" / ".installed") & 0o077
    assert not mode(fresh / "bundle.sha256") & 0o077


def not_private(folder: Path) -> dict:
    """Everything under ``folder`` (not following links) that its group or others may use: path -> mode."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            bits = stat.S_IMODE(os.lstat(path).st_mode)
            if bits & 0o077 and not stat.S_ISLNK(os.lstat(path).st_mode):
                found[str(path.relative_to(folder))] = oct(bits)
    return found


@SLOW
def test_files_in_the_remote_workdir_are_private_even_under_umask_0(make_cluster, run_fab, tmp_path):
    # sshd (and so every command of a session) runs with umask 0: only the code can make files private.
    old = os.umask(0)
    try:
        cluster = make_cluster(1)
    finally:
        os.umask(old)
    h1 = cluster["h1"]
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (h1.workdir / "client" / "agent.py").is_file() and (h1.workdir / "lib").is_dir()
    assert not_private(h1.workdir) == {}
    # A run: the agent and its workers import the client modules (__pycache__ is written then).
    done = run_fab(["primes", "--inventory", inventory, "--start", "1", "--end", "1e5", "--db", tmp_path / "r.db"],
                   config=config, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(h1.workdir.glob("client/__pycache__/*.pyc"))
    assert mode(h1.workdir) == 0o700 and not_private(h1.workdir) == {}


# ---------------------------------------------------------------- secrets


@dataclass
class SudoUser:
    name: str
    password: str
    script: Path
    marker: Path
    home: Path
    folder: Path


def _skip_or_fail(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def sudo_user():
    """A throwaway user with a random password, allowed to run one harmless script as root with sudo."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root to create a test user")
    missing = [tool for tool in ("sudo", "useradd", "userdel", "chpasswd", "visudo", "runuser")
               if shutil.which(tool) is None]
    if missing:
        _skip_or_fail(f"needs {', '.join(missing)} (run tests/system-deps.sh as root)")
    name = "bwsec" + secrets.token_hex(4)
    password = "Bw-" + secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="beowulf-sudo-"))
    os.chmod(folder, 0o755)
    script, marker = folder / "restart-tor", folder / "restarted"
    # Harmless: it only touches a marker (after a second, so its command line can be seen).
    script.write_text(f"#!/bin/sh\nsleep 1\nexec touch {marker}\n")
    os.chmod(script, 0o755)
    sudoers = Path(f"/etc/sudoers.d/beowulf-test-{name}")
    try:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment", "beowulf security test",
                        name], check=True, capture_output=True)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)
        rule = folder / "sudoers"
        rule.write_text(f"Defaults:{name} !lecture\n"
                        f"{name} ALL=(root) /bin/sh -c {script}, /usr/bin/sh -c {script}\n")
        subprocess.run(["visudo", "-c", "-q", "-f", str(rule)], check=True, capture_output=True)
        os.chmod(rule, 0o440)
        shutil.copy2(rule, sudoers)
        rule.unlink()
        home = Path(os.path.expanduser(f"~{name}"))
        yield SudoUser(name, password, script, marker, home, folder)
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        for leftover in (Path("/run/sudo/ts") / name, Path("/var/lib/sudo/lectured") / name):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


class ProcWatch:
    """Reads every process's command line and environment until stopped; records what matched."""

    def __init__(self, secret: bytes, seen: bytes):
        self.secret, self.seen = secret, seen
        self.leaks: list = []
        self.sightings: list = []
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self):
        while not self._stop.is_set():
            for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{what}", "rb") as handle:
                            data = handle.read()
                    except OSError:
                        continue
                    if self.secret in data:
                        self.leaks.append((pid, what, data.replace(b"\0", b" ")[:300]))
                    if what == "cmdline" and self.seen in data:
                        self.sightings.append(data.replace(b"\0", b" ")[:200])
            self.passes += 1
            time.sleep(0.01)


def fab_on_a_terminal(args, config, answers: dict, timeout: float = 240):
    """Run fab with a pseudo-terminal as its controlling terminal and stdin; answer its getpass prompts.

    ``answers`` maps a piece of each prompt to what to type. Returns (exit status,
    stdout, stderr, everything fab wrote to the terminal).
    """
    master, slave = os.openpty()

    def take_terminal():  # runs in the child after setsid(): the pty becomes its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(fab_argv(args, config), env=fab_env(), stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=take_terminal)
    os.close(slave)
    terminal = bytearray()
    waiting = dict(answers)

    def pump():
        seen = 0
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal is gone
                return
            if not chunk:
                return
            terminal.extend(chunk)
            for prompt in list(waiting):
                where = terminal.find(prompt.encode(), seen)
                if where >= 0:
                    os.write(master, waiting.pop(prompt).encode() + b"\n")
                    seen = where + len(prompt)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"fab timed out:\n{out.decode()}\n{err.decode()}\n{bytes(terminal).decode()}") from None
    finally:
        reader.join(5)
        os.close(master)
    assert not waiting, f"fab never asked for {list(waiting)}: {bytes(terminal)!r}"
    return proc.returncode, out.decode(), err.decode(), bytes(terminal)


# Never searched: virtualenvs, git, pyenv, and shell-tool job folders in /tmp (bash_jobs*, bash_tool*).
NOT_SEARCHED = (".venv", ".git", ".pyenv")


def files_containing(secret: bytes, roots, since: float, recent_only: bool) -> list:
    """Regular files under ``roots`` (only those changed since ``since`` when ``recent_only``) holding ``secret``."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in NOT_SEARCHED and not d.startswith(("bash_jobs", "bash_tool"))]
            for name in files:
                path = os.path.join(folder, name)
                try:
                    info = os.lstat(path)
                    if not stat.S_ISREG(info.st_mode) or info.st_size > 50_000_000:
                        continue
                    if recent_only and max(info.st_mtime, info.st_ctime) < since:
                        continue
                    with open(path, "rb") as handle:
                        if secret in handle.read():
                            found.append(path)
                except OSError:
                    continue
    return found


@SLOW
def test_sudo_password_never_written_logged_or_on_a_command_line(sudo_user, run_fab, tmp_path):
    require_sshd()
    user = sudo_user
    secret = user.password.encode()
    # sudo really asks: no NOPASSWD rule, no cached credential.
    check = subprocess.run(["runuser", "-u", user.name, "--", "sudo", "-n", "sh", "-c", str(user.script)],
                           capture_output=True, text=True)
    assert check.returncode != 0 and "password is required" in check.stderr, check.stderr
    began = time.time() - 1
    base = Path(tempfile.mkdtemp(prefix="beowulf-sec-"))
    os.chmod(base, 0o711)  # sshd reads the one AuthorizedKeysFile as the logging-in user
    try:
        with SshCluster(base, 1, user=user.name) as cluster, SocksGreeter() as greeter:
            inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={"h1": {
                "workdir": "~/beowulf", "socks": greeter.address, "tor_control": f"{base}/no-tor-here.sock"}})
            config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
            with ProcWatch(secret, str(user.script).encode()) as watch:
                code, out, err, terminal = fab_on_a_terminal(
                    ["--prompt-for-sudo-password", "tor.restart", "--inventory", inventory,
                     "--command", user.script, "--wait", "20", "--verbose"], config, {"sudo.password": user.password})
            assert code == 0, out + err
            assert f"command: {user.script}" in out and "1 of 1 hosts restarted tor" in out
            assert user.marker.exists() and user.marker.stat().st_uid == 0  # ran as root, after the password
            sshd_log = cluster["h1"].read_log()
            assert f"Accepted publickey for {user.name}" in sshd_log
    finally:
        roots = [base, tmp_path, user.home, user.folder, "/var/log", "/var/lib/sudo", "/run/sudo"]
        leaked_files = files_containing(secret, roots, began, recent_only=False)
        # Anything written meanwhile where fab or the host could write: temp folders, our caches and configs, the repo.
        scratch = ["/tmp", "/var/tmp", "/dev/shm", "/run", REPO_ROOT]
        scratch += [Path.home() / name for name in (".cache", ".config", ".ssh")]
        leaked_files += files_containing(secret, scratch, began, recent_only=True)
        shutil.rmtree(base, ignore_errors=True)
    assert watch.sightings, f"the /proc watcher never saw the sudo command ({watch.passes} passes)"
    assert any(b"sudo" in line for line in watch.sightings), watch.sightings
    assert watch.leaks == []
    for text in (out, err, sshd_log, terminal.decode("utf-8", "replace")):
        assert user.password not in text
    assert leaked_files == []
    assert not re.search(r"Traceback", err)


@SLOW
def test_prompted_secrets_stay_out_of_output_and_beowulf_log(make_cluster, run_fab, tmp_path):
    """Fabric's prompts put secrets in its config; invoke's debug log would print that config."""
    cluster = make_cluster(1)
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={"h1": {"slots": 1}})
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    assert run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config).returncode == 0
    sudo_password, passphrase = "Sudo-" + secrets.token_hex(12), "Phrase-" + secrets.token_hex(12)
    prompts = {"sudo.password": sudo_password, "passphrase for use unlocking": passphrase}
    db = tmp_path / "store" / "r.db"
    db.parent.mkdir()
    # hosts --verbose: everything logged goes to stderr; primes: everything logged goes to beowulf.log.
    for task in (["hosts", "--verbose"], ["primes", "--start", "1", "--end", "10000", "--db", db]):
        code, out, err, terminal = fab_on_a_terminal(
            ["--prompt-for-sudo-password", "--prompt-for-passphrase", *task, "--inventory", inventory],
            config, prompts)
        assert code == 0, out + err
        for secret in (sudo_password, passphrase):
            assert secret not in out + err + terminal.decode("utf-8", "replace"), task
    assert "1,229 primes" in out
    assert (db.parent / "beowulf.log").stat().st_size > 0
    for secret in (sudo_password, passphrase):
        assert files_containing(secret.encode(), [tmp_path, cluster.base_dir], 0, recent_only=False) == []


# ---------------------------------------------------------------- --accept-new: two routes, one name

# A ProxyCommand: stdin/stdout to and from one TCP address (the route to "the" host).
PIPE = r'''import socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while True:
        data = sys.stdin.buffer.raw.read(65536)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
'''


def two_routes(cluster: SshCluster, tmp_path: Path) -> tuple:
    """ssh_config and inventory for ``ra`` and ``rb``: one name, ``[127.0.0.99]:2299``, two machines.

    ``ra`` reaches h1 directly, ``rb`` reaches h2 through the harness's relay.
    """
    pipe = tmp_path / "pipe.py"
    pipe.write_text(PIPE)
    relay = cluster.add_relay("h2")
    h1 = cluster["h1"]
    routes = {"ra": (h1.ip, h1.port), "rb": (relay.listen_ip, relay.port)}
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("".join(
        f"Host {alias}\n  HostName 127.0.0.99\n  Port 2299\n  User root\n  IdentityFile {cluster.client_key}\n"
        f"  ProxyCommand {shutil.which('python3')} {pipe} {ip} {port}\n" for alias, (ip, port) in routes.items()))
    inventory = tmp_path / "routes.ini"
    inventory.write_text("".join(f"[{alias}]\naddress = {alias}\nworkdir = {tmp_path / alias}\n" for alias in routes))
    return ssh_config, inventory


@SLOW
def test_accept_new_records_one_key_for_a_name_reached_by_two_routes(make_cluster, run_fab, tmp_path):
    cluster = make_cluster(2)
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    ssh_config, inventory = two_routes(cluster, tmp_path)
    known = cluster.known_hosts_path
    keys = {cluster["h1"].public_key(), cluster["h2"].public_key()}
    for attempt in range(3):
        # Both routes connect at once (one fab, a thread per host), neither key known yet.
        known.write_text("")
        done = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, "--accept-new"],
                       config=config)
        lines = known.read_text().splitlines()
        assert len(lines) == 1, (attempt, lines, done.stdout + done.stderr)
        name, key = lines[0].split(" ", 1)
        assert name == "[127.0.0.99]:2299" and key in keys
        assert done.returncode == 3 and "[127.0.0.99]:2299 has CHANGED" in done.stdout, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    # Two processes racing, one route each: still one key, and the loser is refused.
    known.write_text("")
    argv = {alias: fab_argv(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, "--hosts", alias,
                             "--accept-new"], config) for alias in ("ra", "rb")}
    procs = {alias: subprocess.Popen(args, env=fab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True) for alias, args in argv.items()}
    outs = {alias: proc.communicate(timeout=120) for alias, proc in procs.items()}
    codes = sorted(proc.returncode for proc in procs.values())
    assert len(known.read_text().splitlines()) == 1, (known.read_text(), outs)
    assert codes == [0, 1], outs
    # Later runs: the recorded route works, the other is a changed key, --accept-new or not.
    for extra in ([], ["--accept-new"]):
        done = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, *extra], config=config)
        assert done.returncode == 3 and "has CHANGED" in done.stdout, done.stdout + done.stderr
    assert len(known.read_text().splitlines()) == 1


def test_accept_new_refuses_a_name_with_a_key_of_another_type(tmp_path):
    """A name known under one key type offering another type is a changed key (Paramiko asks the policy)."""
    import paramiko

    from cluster.errors import HostKeyError
    from cluster.ssh import AcceptNewKey

    known = tmp_path / "known_hosts"
    recorded = paramiko.Ed25519Key.from_private_key_file(str(keygen_ed25519(tmp_path / "k1")))
    known.write_text(f"[127.0.0.99]:2299 {recorded.get_name()} {recorded.get_base64()}\n")
    before = known.read_bytes()
    other = paramiko.RSAKey.generate(1024)
    client = paramiko.SSHClient()
    with pytest.raises(HostKeyError, match="has CHANGED"):
        AcceptNewKey(known, "x").missing_host_key(client, "[127.0.0.99]:2299", other)
    assert known.read_bytes() == before and not client.get_host_keys().lookup("[127.0.0.99]:2299")
    # The same key (recorded meanwhile by another entry for the same host) is fine and not written twice.
    AcceptNewKey(known, "x").missing_host_key(client, "[127.0.0.99]:2299", recorded)
    assert known.read_bytes() == before
    # A name with nothing recorded is appended.
    AcceptNewKey(known, "x").missing_host_key(client, "[127.0.0.98]:2299", other)
    assert known.read_text().splitlines()[1] == f"[127.0.0.98]:2299 ssh-rsa {other.get_base64()}"


def keygen_ed25519(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(path)], check=True, capture_output=True)
    return path
