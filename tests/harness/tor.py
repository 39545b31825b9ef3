"""Real ``tor`` processes for tests, one per test host, with no network at all.

Each TorProcess runs Debian's ``tor`` as an ordinary foreground process with its
own torrc, DataDirectory and log under ``base_dir``: a SocksPort and a
ControlPort on ``ip`` (or a ControlSocket), ``CookieAuthentication 1`` and
``DisableNetwork 1``, so it never contacts anything.

``DisableNetwork 1`` has one consequence the tests must know: tor then opens
*no* listener except its control listeners ("we don't listen for or accept any
connections other than controller connections", tor(1)), so its SocksPort stays
closed: the control port answers, cookie authentication and NEWNYM work, SOCKS
does not. Where a test needs a SOCKS5 server that answers, ``SocksGreeter`` is a
stand-in that answers the SOCKS5 greeting (and nothing else).

Processes are stopped by PID only: the PID tor writes to its PidFile, checked
against ``/proc/PID/cmdline`` (it must name this torrc), so a tor restarted by
``fab tor.restart`` is found and stopped too. ``__OwningControllerProcess`` names
the test process, so a tor left behind by a crashed test run exits by itself.
Root is fine: tor runs as root with a warning, no ``User`` option needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from .sshd import _check_loopback, free_port, pid_alive

TOR_CANDIDATES = ("/usr/bin/tor", "/usr/sbin/tor")
START_TIMEOUT = 30.0  # seconds for tor to answer on its control port
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


def tor_binary() -> Optional[str]:
    """Path of the ``tor`` program, or None."""
    found = shutil.which("tor")
    if found:
        return found
    return next((path for path in TOR_CANDIDATES if os.access(path, os.X_OK)), None)


def require_tor() -> str:
    """The tor program's path; skip the calling test without it (fail it under CI=true)."""
    import pytest

    path = tor_binary()
    if path is None:
        msg = "needs Debian's tor (/usr/bin/tor; run tests/system-deps.sh as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class TorProcess:
    """One tor on ``ip`` (127.0.0.0/8 only); a context manager.

    ``control="port"`` (default) listens for controllers on ``ip:PORT``;
    ``control="socket"`` on a Unix socket (in a short private folder under /tmp,
    since socket paths are limited to 107 bytes). Attributes after start():
    ``socks_address`` ("ip:port", closed while DisableNetwork is set),
    ``control_address`` ("ip:port" or a path), ``cookie_path`` (beside the socket, or in the
    DataDirectory for a port: inventories name that one as ``tor_cookie``), ``pid``
    (the running tor, following restarts), ``torrc``, ``log_path``.
    """

    def __init__(self, base_dir, ip: str = "127.0.0.1", control: str = "port", name: str = "tor",
                 extra_config: Optional[List[str]] = None):
        if control not in ("port", "socket"):
            raise ValueError(f"control must be 'port' or 'socket', not {control!r}")
        self.ip = _check_loopback(ip)
        self.name = name
        self.control_kind = control
        self.dir = Path(base_dir).resolve() / name
        self.data_dir = self.dir / "data"
        self.torrc = self.dir / "torrc"
        self.log_path = self.dir / "tor.log"
        self.pid_file = self.dir / "tor.pid"
        self.stdout_path = self.dir / "stdout.log"
        self.extra_config = list(extra_config or [])
        self.socks_port = 0
        self.control_port = 0
        self._socket_dir: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None

    def __repr__(self) -> str:
        return f"<TorProcess {self.name} socks {self.socks_address} control {self.control_address} pid {self.pid}>"

    # -- addresses ---------------------------------------------------------------------------

    @property
    def socks_address(self) -> str:
        return f"{self.ip}:{self.socks_port}"

    @property
    def cookie_path(self) -> Path:
        """The control cookie: in the control socket's own folder (where beowulf looks for it, like
        Debian's /run/tor), else tor's default in its DataDirectory (hosts.ini then names it: tor_cookie)."""
        if self.control_kind == "socket":
            return Path(self._socket_dir or "/nonexistent") / "control_auth_cookie"
        return self.data_dir / "control_auth_cookie"

    @property
    def control_address(self) -> str:
        if self.control_kind == "socket":
            return str(Path(self._socket_dir or "/nonexistent") / "control")
        return f"{self.ip}:{self.control_port}"

    # -- life cycle --------------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            f"DataDirectory {self.data_dir}",
            f"SocksPort {self.socks_address}",
            "CookieAuthentication 1",
            "DisableNetwork 1",
            f"Log notice file {self.log_path}",
            "RunAsDaemon 0",
            f"PidFile {self.pid_file}",
            f"__OwningControllerProcess {os.getpid()}",
            # No GeoIP parsing: tor starts in ~0.1 s instead of ~3 s (it only matters for relays).
            f"GeoIPFile {self.dir / 'no-geoip'}",
            f"GeoIPv6File {self.dir / 'no-geoip6'}",
        ]
        if self.control_kind == "socket":
            lines.append(f"ControlSocket {self.control_address}")
            lines.append(f"CookieAuthFile {self.cookie_path}")
        else:
            lines.append(f"ControlPort {self.control_address}")
        return "\n".join(lines + self.extra_config) + "\n"

    def start(self) -> TorProcess:
        """Write the torrc, start tor, and wait until its control port answers (RuntimeError with its log)."""
        binary = require_tor()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if not self.socks_port:
            self.socks_port = free_port(self.ip)
        if self.control_kind == "socket":
            if self._socket_dir is None:
                self._socket_dir = tempfile.mkdtemp(prefix="tor-ctl-", dir="/tmp")
        elif not self.control_port:
            self.control_port = free_port(self.ip)
        text = self.config_text()
        assert "DisableNetwork 1" in text  # the network rule: tor never contacts anything
        self.torrc.write_text(text)
        argv = [binary, "-f", str(self.torrc), "--defaults-torrc", os.devnull]
        setpriv = "/usr/bin/setpriv"
        if os.path.exists(setpriv):
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        out = open(self.stdout_path, "ab")
        try:
            from .sshd import _spawner  # the long-lived thread, so pdeathsig outlives the calling thread

            self._proc = _spawner.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        close_fds=True)
        finally:
            out.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT, old_pid: Optional[int] = None) -> None:
        """Block until the control port answers PROTOCOLINFO and the cookie exists; RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None and old_pid is None:
                raise RuntimeError(f"{self.name}: tor exited with {self._proc.returncode}:\n{self.log_text()}"
                                   f"\n{self._stdout_text()}")
            pid = self.pid
            if pid and pid != old_pid and self._protocolinfo() and self._cookie_ok():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: tor's control port {self.control_address} did not answer "
                                   f"within {timeout:.0f}s; log {self.log_path}:\n{self.log_text()}"
                                   f"\n{self._stdout_text()}")
            time.sleep(0.05)

    def _cookie_ok(self) -> bool:
        try:
            return self.cookie_path.stat().st_size == 32
        except OSError:
            return False

    def _connect(self) -> socket.socket:
        if self.control_kind == "socket":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(self.control_address)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.ip, self.control_port), timeout=5)

    def _protocolinfo(self) -> bool:
        try:
            with self._connect() as sock:
                sock.sendall(b"PROTOCOLINFO 1\r\n")
                data = b""
                while b"250 OK\r\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
                return True
        except OSError:
            return False

    def control(self, *commands: str) -> List[List[str]]:
        """Authenticate with the cookie and send ``commands``; each reply's lines (for assertions)."""
        with self._connect() as sock:
            buffer = b""

            def reply() -> List[str]:
                nonlocal buffer
                lines: List[str] = []
                while True:
                    while b"\r\n" not in buffer:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("tor closed the control connection")
                        buffer += chunk
                    line, buffer = buffer.split(b"\r\n", 1)
                    text = line.decode()
                    lines.append(text)
                    if len(text) >= 4 and text[3] == " ":
                        return lines

            sock.sendall(b"AUTHENTICATE " + self.cookie_path.read_bytes().hex().encode() + b"\r\n")
            auth = reply()
            if auth != ["250 OK"]:
                raise RuntimeError(f"{self.name}: AUTHENTICATE refused: {auth}")
            answers = []
            for command in commands:
                sock.sendall(command.encode() + b"\r\n")
                answers.append(reply())
            return answers

    def getinfo(self, key: str) -> str:
        """One GETINFO value through the control port."""
        (lines,) = self.control(f"GETINFO {key}")
        for line in lines:
            if line[4:].startswith(f"{key}="):
                return line[4 + len(key) + 1 :]
        raise RuntimeError(f"{self.name}: GETINFO {key}: {lines}")

    @property
    def pid(self) -> Optional[int]:
        """PID of the running tor of this torrc (from its PidFile, checked in /proc), or None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.torrc).encode() in argv and pid_alive(pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the running tor (by PID, whichever process runs this torrc), SIGKILL after ``timeout``."""
        pids = {pid for pid in (self.pid, self._proc.pid if self._proc and self._proc.poll() is None else None)
                if pid}
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.poll()
            time.sleep(0.05)
        for pid in pids:
            if pid_alive(pid):
                _signal(pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> TorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        """tor's notice log so far ("" when there is none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _Listener:
    """A TCP listener on ``ip`` (port chosen by the system) served by a daemon thread, which hands
    each connection to ``_accepted``; ``_stop_listening`` closes it and waits for the thread."""

    def _listen(self, ip: str, name: str) -> int:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((ip, 0))
        self._server.listen(16)
        port = self._server.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=f"{name}-{port}", daemon=True)
        return port

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _stop_listening(self) -> None:
        self._stopped = True
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        self._thread.join(5)

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SocksGreeter(_Listener):
    """A stand-in SOCKS5 server on ``ip``: answers the greeting (version 5, no authentication), then closes.

    Tor with ``DisableNetwork 1`` opens no SOCKS port, so tests that need a SOCKS
    port that answers (``fab tor.status``'s happy row) point ``socks`` here.
    ``greetings`` counts the greetings answered.
    """

    def __init__(self, ip: str = "127.0.0.1"):
        self.ip = _check_loopback(ip)
        self.greetings = 0
        self.port = self._listen(self.ip, "socks-greeter")

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> SocksGreeter:
        self._thread.start()
        return self

    def _accepted(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                hello = conn.recv(3)
                if hello[:1] == b"\x05":
                    conn.sendall(b"\x05\x00")
                    self.greetings += 1
            except OSError:
                pass

    def stop(self) -> None:
        self._stop_listening()


# ---------------------------------------------------------------- a hostile control port

_FAKE_CONTROL = r'''
import json, os, socket, subprocess, sys, threading
cfg = json.loads(sys.argv[1])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((cfg["ip"], 0))
server.listen(16)
# The "tor" it names: its own program, started by itself (as itself); with "share" it also holds the
# listening socket, so that socket's owner in /proc includes that pid.
child = subprocess.Popen(cfg["tor_argv"], executable=cfg["tor_exe"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         pass_fds=(server.fileno(),) if cfg["share"] else (), close_fds=True)
sys.stdout.write("%d %d\n" % (server.getsockname()[1], child.pid))
sys.stdout.flush()
lock = threading.Lock()


def note(data):
    with lock, open(cfg["log"], "ab") as handle:
        handle.write(data)


def answer(line):
    words = line.split(" ")
    verb = words[0].upper()
    if verb == "PROTOCOLINFO":
        auth = "METHODS=" + cfg["methods"]
        if cfg.get("cookiefile"):
            auth += ' COOKIEFILE="%s"' % cfg["cookiefile"]
        return ["250-PROTOCOLINFO 1", "250-AUTH " + auth, '250-VERSION Tor="0.4.8.10"', "250 OK"]
    if verb == "AUTHCHALLENGE":
        return ["250 AUTHCHALLENGE SERVERHASH=" + "00" * 32 + " SERVERNONCE=" + "11" * 32]
    if verb == "GETINFO" and len(words) > 1:
        values = {"process/pid": str(child.pid), "version": "0.4.8.10", "net/listeners/socks": "",
                  "config-file": "/etc/tor/torrc"}
        return ["250-%s=%s" % (words[1], values.get(words[1], "")), "250 OK"]
    if verb == "GETCONF" and len(words) > 1:
        values = {"user": "debian-tor", "disablenetwork": "1"}
        return ["250 %s=%s" % (words[1], values.get(words[1].lower(), ""))]
    return ["250 OK"]


def serve(conn):
    buffer = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            note(chunk)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply = answer(line.rstrip(b"\r").decode("utf-8", "replace"))
                conn.sendall("".join(r + "\r\n" for r in reply).encode())
    except OSError:
        pass
    finally:
        conn.close()


while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''

NOBODY = "nobody"
NOGROUP = "nogroup"
SYSTEM_PYTHON = "/usr/bin/python3"


class FakeControlPort:
    """A hostile "tor control port" on ``ip``, run as user nobody (a real process of another user).

    It answers PROTOCOLINFO with ``methods`` (e.g. "NULL" or "COOKIE") and, when
    given, ``COOKIEFILE="cookiefile"``; every AUTHENTICATE is welcome; ``GETINFO
    process/pid`` names the pid of a program it started itself, called ``tor``
    (a copy of /bin/sh owned by nobody that appends ``id -u`` to ``ran_path`` each
    time it is started, then idles). With ``share`` that program also holds the
    listening socket. Everything a client sends is appended to ``received_path``.
    Stopped by PID (its own, its program's, and any program started from that copy).
    Its files live in a folder of its own under /tmp, removed at stop.
    """

    def __init__(self, ip: str = "127.0.0.1", methods: str = "NULL", cookiefile: Optional[str] = None,
                 share: bool = True):
        import pwd

        self.ip = _check_loopback(ip)
        # Under /tmp, not a test's tmp_path: nobody must be able to reach its own files.
        self.dir = Path(tempfile.mkdtemp(prefix="fake-tor-", dir="/tmp"))
        self.uid = pwd.getpwnam(NOBODY).pw_uid
        import grp

        self.gid = grp.getgrnam(NOGROUP).gr_gid
        os.chmod(self.dir, 0o755)
        self.tor_exe = self.dir / "tor"
        shutil.copyfile("/bin/sh", self.tor_exe)
        os.chmod(self.tor_exe, 0o755)
        self.ran_path = self.dir / "ran"
        self.received_path = self.dir / "received"
        for path in (self.ran_path, self.received_path):
            path.write_bytes(b"")
        for path in (self.dir, self.tor_exe, self.ran_path, self.received_path):
            os.chown(path, self.uid, self.gid)
        self.config = {
            "ip": ip, "methods": methods, "cookiefile": cookiefile, "share": share, "log": str(self.received_path),
            "tor_exe": str(self.tor_exe),
            # sh -c SCRIPT --verify-config: $0 is the extra argument; a check ends at once.
            "tor_argv": ["tor", "-c", f'id -u >> {self.ran_path}; [ "$0" = --verify-config ] && exit 0; '
                                      "while :; do sleep 1; done"],
        }
        self.port = 0
        self.tor_pid: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> FakeControlPort:
        import json

        if not os.path.exists(SETPRIV) or not os.path.exists(SYSTEM_PYTHON):
            raise RuntimeError(f"needs {SETPRIV} and {SYSTEM_PYTHON}")
        argv = [SETPRIV, "--reuid", NOBODY, "--regid", NOGROUP, "--clear-groups",
                SYSTEM_PYTHON, "-I", "-c", _FAKE_CONTROL, json.dumps(self.config)]
        from .sshd import _spawner

        self._proc = _spawner.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, close_fds=True, cwd="/")
        line = self._proc.stdout.readline().split()
        if len(line) != 2:
            self.stop()
            raise RuntimeError("the fake control port did not start")
        self.port, self.tor_pid = int(line[0]), int(line[1])
        return self

    def received(self) -> bytes:
        return self.received_path.read_bytes()

    def runs(self) -> List[str]:
        """The uids its ``tor`` program was started as, one per start (``id -u``)."""
        return self.ran_path.read_text().split()

    def program_pids(self) -> List[int]:
        """Live processes running this fake's ``tor`` program (whoever started them)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
            if exe in (str(self.tor_exe), f"{self.tor_exe} (deleted)") and pid_alive(int(entry)):
                found.append(int(entry))
        return found

    def stop(self) -> None:
        pids = self.program_pids()
        if self._proc is not None and self._proc.poll() is None:
            pids.append(self._proc.pid)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            self._proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeControlPort:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


SETPRIV = "/usr/bin/setpriv"


def root_only_secret(base_dir) -> Path:
    """A 32-byte file only root may read (in a folder only root may enter), like a cookie of another user."""
    folder = Path(tempfile.mkdtemp(prefix="root-only-", dir=str(base_dir)))
    os.chmod(folder, 0o700)
    secret = folder / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(32))
    return secret


def share_host_key(cluster, source, *names: str) -> None:
    """Before an SshCluster starts: hosts ``names`` present the key ``source`` (a link, never a copy).

    Two sshd entries with one host key (and the one /etc/machine-id of this computer) are
    one machine to beowulf, as two addresses of one real host would be (cluster/machine.py).
    """
    for name in names:
        host = cluster[name]
        host.dir.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".pub"):
            Path(f"{host.host_key}{suffix}").symlink_to(f"{source}{suffix}")


# ---------------------------------------------------------------- a tor that bootstraps as told

DONE_BOOTSTRAP = 'PROGRESS=100 TAG=done SUMMARY="Done"'
_SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
_CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"


class FakeTor(_Listener):
    """A stand-in tor on ``ip``: a real SOCKS5 proxy (``Socks5Server``) and a control port
    speaking tor's control protocol with cookie authentication (SAFECOOKIE, the server's
    hash computed from the real cookie file), threads in the test process.

    ``bootstrap`` is what ``GETINFO status/bootstrap-phase`` reports after ``NOTICE
    BOOTSTRAP`` (``'PROGRESS=14 TAG=handshake_dir SUMMARY="Handshaking with a relay"'``
    plays a tor stuck without network; the default is done), ``circuit`` what
    ``status/circuit-established`` says ("1" or "0"). Both may be changed while it runs.
    It never names a pid (``process/pid`` is an unrecognised key): nothing may restart it.
    ``socks`` is the proxy (its ``log`` lists every CONNECT); ``commands`` every control
    line received (AUTHENTICATE's argument blanked). Inventories name ``socks_address``,
    ``control_address`` and ``cookie_path`` (tor_cookie).
    """

    def __init__(self, ip: str = "127.0.0.1", bootstrap: str = DONE_BOOTSTRAP, circuit: str = "1"):
        from .socks5 import Socks5Server

        self.ip = _check_loopback(ip)
        self.bootstrap = bootstrap
        self.circuit = circuit
        self.socks = Socks5Server(ip)
        self.dir = Path(tempfile.mkdtemp(prefix="fake-tor-"))
        self.cookie_path = self.dir / "control_auth_cookie"
        self.cookie_path.write_bytes(os.urandom(32))
        os.chmod(self.cookie_path, 0o600)
        self.commands: List[str] = []
        self.control_port = self._listen(self.ip, "fake-tor")

    @property
    def socks_address(self) -> str:
        return self.socks.address

    @property
    def control_address(self) -> str:
        return f"{self.ip}:{self.control_port}"

    def inventory_keys(self) -> dict:
        """hosts.ini keys naming this tor."""
        return {"socks": self.socks_address, "tor_control": self.control_address, "tor_cookie": self.cookie_path}

    def start(self) -> FakeTor:
        self.socks.start()
        self._thread.start()
        return self

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _answer(self, line: str, state: dict) -> List[str]:
        import binascii
        import hashlib
        import hmac

        words = line.split(" ")
        verb = words[0].upper()
        self.commands.append("AUTHENTICATE ..." if verb == "AUTHENTICATE" and len(words) > 1 else line)
        if verb == "PROTOCOLINFO":
            return ["250-PROTOCOLINFO 1", f'250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="{self.cookie_path}"',
                    '250-VERSION Tor="0.4.8.10"', "250 OK"]
        cookie = self.cookie_path.read_bytes()
        if verb == "AUTHCHALLENGE" and len(words) == 3 and words[1] == "SAFECOOKIE":
            client_nonce = binascii.unhexlify(words[2])
            server_nonce = os.urandom(32)
            message = cookie + client_nonce + server_nonce
            state["expect"] = hmac.new(_CLIENT_KEY, message, hashlib.sha256).hexdigest()
            server_hash = hmac.new(_SERVER_KEY, message, hashlib.sha256).hexdigest()
            return [f"250 AUTHCHALLENGE SERVERHASH={server_hash} SERVERNONCE={server_nonce.hex()}"]
        if verb == "AUTHENTICATE":
            given = words[1].lower() if len(words) > 1 else ""
            if given and given in (state.get("expect"), cookie.hex()):
                state["auth"] = True
                return ["250 OK"]
            return ["515 Authentication failed"]
        if not state.get("auth"):
            return ["514 Authentication required."]
        if verb == "GETINFO" and len(words) == 2:
            values = {"version": "0.4.8.10", "status/bootstrap-phase": f"NOTICE BOOTSTRAP {self.bootstrap}",
                      "status/circuit-established": self.circuit,
                      "net/listeners/socks": f'"{self.socks_address}"'}
            if words[1] not in values:
                return [f'552 Unrecognized key "{words[1]}"']
            return [f"250-{words[1]}={values[words[1]]}", "250 OK"]
        if verb == "GETCONF" and len(words) == 2:
            return [f"250 {words[1]}=0" if words[1].lower() == "disablenetwork" else f"250 {words[1]}"]
        if verb in ("SETEVENTS", "SIGNAL"):
            return ["250 OK"]
        return [f'510 Unrecognized command "{words[0]}"']

    def _session(self, conn: socket.socket) -> None:
        state: dict = {}
        buffer = b""
        with conn:
            conn.settimeout(10)
            try:
                while not self._stopped:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        reply = self._answer(line.rstrip(b"\r").decode("utf-8", "replace"), state)
                        conn.sendall("".join(r + "\r\n" for r in reply).encode())
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        self._stop_listening()
        self.socks.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
