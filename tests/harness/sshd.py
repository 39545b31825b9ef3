"""Real OpenSSH ``sshd`` processes as test hosts, one per 127.0.0.x address.

Each host has its own host key, sshd_config, log file and workdir, so to a client
it is a separate machine. The cluster writes a ``known_hosts`` file for them, a
``hosts.ini`` inventory and a Fabric runtime config (``fab -f``); nothing outside
``base_dir`` is written, least of all ``~/.ssh/known_hosts``.

Every sshd is started through ``setpriv --pdeathsig KILL`` (when available) from a
long-lived spawner thread, so a test run that dies without cleaning up does not
leave listeners behind. Processes are only ever stopped by their own PID.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .relay import Relay

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
SETPRIV = "/usr/bin/setpriv"
START_TIMEOUT = 30.0  # seconds to wait for a host to answer with its SSH banner
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
FIRST_HOST_OCTET = 2  # host i (0-based) listens on 127.0.0.(2 + i)
RELAY_NET = "127.0.1"  # relays in front of host i listen on 127.0.1.(2 + i)


def _check_loopback(ip: str) -> str:
    """Return ``ip`` if it is in 127.0.0.0/8, else raise ValueError."""
    if ipaddress.ip_address(ip) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"test hosts may only use 127.0.0.0/8, not {ip}")
    return ip


def free_port(ip: str) -> int:
    """Return a TCP port that is free on ``ip`` right now (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_check_loopback(ip), 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "beowulf-test") -> Path:
    """Create an ed25519 key pair without passphrase at ``path`` (+ ``.pub``); return ``path``."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-N", "", "-t", "ed25519", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path


@functools.cache
def _sshd_version() -> tuple:
    """Return sshd's (major, minor) version, e.g. (9, 2); (0, 0) when unknown."""
    try:
        out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    except OSError:
        return (0, 0)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class _Spawner:
    """Starts processes from one daemon thread that lives as long as the interpreter.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so a
    host restarted from a short-lived test thread would die with that thread. All
    spawns go through this thread instead.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Run ``subprocess.Popen(argv, **kwargs)`` in the spawner thread and return it."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sshd-spawner", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._jobs.put((argv, kwargs, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            argv, kwargs, fut = self._jobs.get()
            try:
                fut.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as e:  # noqa: B036 - handed to the caller
                fut.set_exception(e)


_spawner = _Spawner()


def _children_map() -> Dict[int, List[int]]:
    """Map each PID to its child PIDs, read from /proc."""
    kids: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> List[int]:
    """Return the PIDs of all living descendants of ``pid`` (children first)."""
    kids = _children_map()
    out: List[int] = []
    todo = list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: Iterable[int], timeout: float) -> List[int]:
    """Wait until none of ``pids`` exists (zombies count as gone); return the ones left."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [p for p in pending if pid_alive(p)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return pending


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie.

    Orphans are reparented to PID 1, which on these machines reaps them only after
    a while: /proc/PID exists for a zombie long after it died.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


class SshHost:
    """One sshd process: a test "machine" reachable at ``ip:port``.

    Attributes: ``name`` ("h1"), ``ip``, ``port``, ``dir`` (its folder), ``config``
    (sshd_config path), ``host_key`` / ``host_key_pub`` (paths), ``log_path``,
    ``workdir`` (a folder the inventory names as the host's workdir).
    """

    def __init__(self, cluster: SshCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"h{index + 1}"
        self.ip = _check_loopback(f"127.0.0.{FIRST_HOST_OCTET + index}")
        self.dir = cluster.base_dir / self.name
        self.workdir = self.dir / "work"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.host_key_pub = self.dir / "ssh_host_ed25519_key.pub"
        self.config = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.log_path = self.dir / "sshd.log"
        self.port = 0
        self._proc: Optional[subprocess.Popen] = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<SshHost {self.name} {self.ip}:{self.port} {state}>"

    # -- setup ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the folder, host key and sshd_config (once)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.host_key.exists():
            keygen(self.host_key, comment=f"{self.name}-host")
        if not self.port:
            self.port = free_port(self.ip)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        c = self.cluster
        lines = [
            f"ListenAddress {self.ip}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {c.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin yes",
            "Subsystem sftp internal-sftp",
            "MaxStartups 100",
            "MaxSessions 50",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "X11Forwarding no",
            f"LogLevel {c.log_level}",
        ]
        if c.sshd_version >= (9, 8):
            # Newer sshd penalises a source address after failed logins; here every
            # client is 127.0.0.1 and fault tests fail logins on purpose.
            lines.append("PerSourcePenalties no")
        return "\n".join(lines) + "\n"

    # -- life cycle ----------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """PID of the listening sshd, or None when stopped."""
        return self._proc.pid if self.is_running else None

    @property
    def is_running(self) -> bool:
        """True while the listening sshd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, wait: bool = True) -> SshHost:
        """Start (or restart) sshd with the same key, address and port.

        With ``wait`` (the default) return once the port answers with an SSH banner;
        raise RuntimeError with the log's contents when it does not within ~10 s.
        """
        if self.is_running:
            return self
        if not self.config.exists():
            self._prepare()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        if Path(SETPRIV).exists():
            argv = [SETPRIV, "--pdeathsig", "KILL", *argv]
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._proc = _spawner.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                close_fds=True,
            )
        finally:
            os.close(log_fd)
        log.debug("%s: sshd pid %d on %s:%d", self.name, self._proc.pid, self.ip, self.port)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the host answers with an SSH banner; raise RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(
                    f"{self.name}: sshd exited with {code}; log {self.log_path}:\n{self.read_log()}"
                )
            if self._banner_ok():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: no SSH banner on {self.ip}:{self.port} after {timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.read_log()}"
                )
            time.sleep(0.02)

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.ip, self.port), timeout=1.0) as s:
                s.settimeout(2.0)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self, sessions: bool = True, timeout: float = STOP_TIMEOUT) -> None:
        """Stop this host: SIGTERM, then SIGKILL after ``timeout`` s.

        With ``sessions`` (the default) the per-connection sshd processes and whatever
        runs in them (agents, shells) are killed too, as if the machine went away;
        with ``sessions=False`` only the listener stops and open sessions go on.
        """
        proc = self._proc
        if proc is None:
            return
        pids = descendants(proc.pid) if sessions else []
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s: sshd %d ignored SIGTERM, killing", self.name, proc.pid)
                proc.kill()
                proc.wait(timeout)
        if pids:
            _signal_pids(pids, signal.SIGTERM)
            left = _wait_gone(pids, timeout)
            _signal_pids(left, signal.SIGKILL)
            _wait_gone(left, timeout)
        log.debug("%s: stopped", self.name)

    def kill(self) -> None:
        """SIGKILL the listener and every session at once: a host that crashes."""
        proc = self._proc
        if proc is None:
            return
        pids = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
        _signal_pids(pids, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        _wait_gone(pids, STOP_TIMEOUT)

    def session_pids(self) -> List[int]:
        """PIDs of everything running under this host's sshd (sessions and their commands)."""
        return descendants(self._proc.pid) if self.is_running else []

    def read_log(self) -> str:
        """Return the sshd log file's text (empty if there is none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- client-side facts ---------------------------------------------------------------

    @property
    def address(self) -> str:
        """``user@ip`` as an inventory ``address`` value."""
        return f"{self.cluster.user}@{self.ip}"

    def public_key(self) -> str:
        """The host key as ``ssh-ed25519 AAAA...`` (no comment)."""
        return " ".join(self.host_key_pub.read_text().split()[:2])

    def known_hosts_line(self, ip: Optional[str] = None, port: Optional[int] = None) -> str:
        """A known_hosts line for this host's key at ``[ip]:port`` (default: its own)."""
        return f"[{ip or self.ip}]:{port or self.port} {self.public_key()}"


class SshCluster:
    """``n`` sshd hosts under ``base_dir``; use as a context manager or call start()/stop().

    ``client_key`` is the private key that every host accepts, ``known_hosts_path``
    lists every host's key as ``[ip]:port``. Hosts are ``cluster.hosts`` (a list)
    or ``cluster["h1"]``.
    """

    def __init__(
        self,
        base_dir: Path,
        n: int,
        user: str = "root",
        log_level: str = "VERBOSE",
        pythons: Optional[Mapping[str, object]] = None,
    ) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"n must be between 1 and 250, not {n}")
        self.base_dir = Path(base_dir).resolve()
        self.user = user
        self.log_level = log_level
        self.client_key = self.base_dir / "client_ed25519"
        self.client_key_pub = self.base_dir / "client_ed25519.pub"
        self.authorized_keys = self.base_dir / "authorized_keys"
        self.known_hosts_path = self.base_dir / "known_hosts"
        self.sshd_version = _sshd_version()
        # Host name -> the interpreter the inventory names as its ``python`` (e.g. a real 3.6).
        self.pythons: Dict[str, object] = dict(pythons or {})
        self.hosts: List[SshHost] = [SshHost(self, i) for i in range(n)]
        self.relays: Dict[str, Relay] = {}

    def __getitem__(self, name: str) -> SshHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> SshCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SshCluster:
        """Create keys and configs, start every host concurrently, wait until all answer."""
        if all(h.is_running for h in self.hosts):
            return self
        t0 = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=min(8, len(self.hosts) + 1)) as pool:
            client = pool.submit(self._prepare_client)
            list(pool.map(SshHost._prepare, self.hosts))
            client.result()
        self.write_known_hosts()
        try:
            for h in self.hosts:
                h.start(wait=False)
            with ThreadPoolExecutor(max_workers=min(16, len(self.hosts))) as pool:
                list(pool.map(SshHost.wait_ready, self.hosts))
        except BaseException:
            self.stop()
            raise
        log.info("%d sshd hosts up in %.2fs under %s", len(self.hosts),
                 time.monotonic() - t0, self.base_dir)
        return self

    def _prepare_client(self) -> None:
        if not self.client_key.exists():
            keygen(self.client_key, comment="beowulf-test-client")
        self.authorized_keys.write_text(self.client_key_pub.read_text())
        os.chmod(self.client_key, 0o600)

    def stop(self) -> None:
        """Stop every relay and host (with their sessions); safe to call twice."""
        for r in self.relays.values():
            r.stop()
        self.relays.clear()
        for h in self.hosts:
            try:
                h.stop()
            except Exception:  # keep stopping the others
                log.exception("%s: stop failed", h.name)

    # -- files for clients ---------------------------------------------------------------

    def write_known_hosts(self, path: Optional[Path] = None) -> Path:
        """Write one ``[ip]:port ssh-ed25519 ...`` line per host (and relay); return the path."""
        path = Path(path) if path else self.known_hosts_path
        lines = [h.known_hosts_line() for h in self.hosts]
        for name, r in self.relays.items():
            lines.append(self[name].known_hosts_line(r.listen_ip, r.port))
        path.write_text("\n".join(lines) + "\n")
        return path

    def add_relay(self, name: str, delay: float = 0.0, bandwidth: Optional[float] = None) -> Relay:
        """Start a TCP relay in front of host ``name`` and trust its address in known_hosts.

        The relay listens on 127.0.1.(2 + i); inventories written afterwards send that
        host's traffic through it (see write_inventory). Stopped with the cluster.
        """
        if name in self.relays:
            raise ValueError(f"{name} already has a relay")
        h = self[name]
        relay = Relay(f"{RELAY_NET}.{FIRST_HOST_OCTET + h.index}", h.ip, h.port,
                      delay=delay, bandwidth=bandwidth)
        relay.start()
        self.relays[name] = relay
        self.write_known_hosts()
        return relay

    def remove_relay(self, name: str) -> None:
        """Stop host ``name``'s relay (if any) and drop its known_hosts line."""
        relay = self.relays.pop(name, None)
        if relay is not None:
            relay.stop()
            self.write_known_hosts()

    def ensure_running(self) -> None:
        """Restart stopped hosts and remove relays: the state right after start()."""
        for name in list(self.relays):
            self.remove_relay(name)
        stopped = [h for h in self.hosts if not h.is_running]
        for h in stopped:
            h.start(wait=False)
        for h in stopped:
            h.wait_ready()

    def write_inventory(
        self,
        path: Path,
        hosts: Optional[Sequence[str]] = None,
        extra: Optional[Mapping[str, Mapping[str, object]]] = None,
        local: bool = False,
        direct: bool = False,
    ) -> Path:
        """Write a hosts.ini with one section per host; return its path.

        ``hosts``: names to include (default all, in order). ``extra``: section name ->
        extra keys (``{"h2": {"python": "/bin/false"}}``; may also override ``address``
        or ``port``, and may name ``local``). ``local``: add ``[local]`` with
        ``address = local``. Hosts with a relay (add_relay) are reached through it
        unless ``direct``.
        """
        extra = dict(extra or {})
        names = list(hosts) if hosts is not None else [h.name for h in self.hosts]
        out: List[str] = []
        for name in names:
            h = self[name]
            keys: Dict[str, object] = {"address": h.address, "port": h.port}
            relay = None if direct else self.relays.get(name)
            if relay is not None:
                keys = {"address": f"{self.user}@{relay.listen_ip}", "port": relay.port}
            keys["identity"] = self.client_key
            keys["workdir"] = h.workdir
            if name in self.pythons:
                keys["python"] = self.pythons[name]
            keys.update(extra.pop(name, {}))
            out.append(_ini_section(name, keys))
        if local:
            keys = {"address": "local"}
            keys.update(extra.pop("local", {}))
            out.append(_ini_section("local", keys))
        if extra:
            raise KeyError(f"extra names unknown sections: {sorted(extra)}")
        path = Path(path)
        path.write_text("\n".join(out))
        return path

    def connections_from_this_process(self) -> Counter[str]:
        """Established TCP connections from this process to each host's sshd, by host name.

        Counted by socket inode: /proc/net/tcp is read in chunks while sockets come and go,
        so one connection can appear on two lines of one read.
        """
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
        wanted = {(host.ip, host.port): host.name for host in self.hosts}
        seen: Dict[str, set] = {}
        with open("/proc/net/tcp") as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                inode = int(fields[9])
                if fields[3] != "01" or inode not in inodes:  # 01: ESTABLISHED
                    continue
                address, port = fields[2].split(":")
                ip = socket.inet_ntoa(struct.pack("<I", int(address, 16)))
                name = wanted.get((ip, int(port, 16)))
                if name:
                    seen.setdefault(name, set()).add(inode)
        return Counter({name: len(sockets) for name, sockets in seen.items()})

    def write_fabric_config(self, path: Path) -> Path:
        """Write a Fabric runtime config (for ``fab -f PATH``) trusting only this cluster.

        Sets ``beowulf.known_hosts``, ``connect_kwargs.key_filename`` and a 10 s
        connect timeout. Returns the path.
        """
        path = Path(path)
        path.write_text(
            "beowulf:\n"
            f"  known_hosts: {_yaml_str(self.known_hosts_path)}\n"
            "connect_kwargs:\n"
            f"  key_filename: {_yaml_str(self.client_key)}\n"
            "timeouts:\n"
            "  connect: 10\n"
        )
        return path


def _ini_section(name: str, keys: Mapping[str, object]) -> str:
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f"[{name}]\n{body}"


def _yaml_str(value: object) -> str:
    """Quote a value as a YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(str(value))


def start_cluster(base_dir: Path, n: int, user: str = "root", **kwargs) -> SshCluster:
    """Create and start an SshCluster of ``n`` hosts; the caller stops it (or uses ``with``)."""
    return SshCluster(base_dir, n, user=user, **kwargs).start()


def pyenv_python(version: str) -> Optional[Path]:
    """The newest pyenv CPython ``version`` ("3.6") on this machine, e.g. ~/.pyenv/versions/3.6.15/bin/python3.6.

    None when there is none; the caller fails (CI) or skips. Hosts log in as root, so they can run it.
    """
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = []
    for folder in Path(root, "versions").glob(f"{version}.*"):
        patch = folder.name[len(version) + 1:]
        binary = folder / "bin" / f"python{version}"
        if patch.isdigit() and os.access(binary, os.X_OK):
            found.append((int(patch), binary))
    return max(found)[1] if found else None


def sshd_available() -> bool:
    """True when /usr/sbin/sshd and ssh-keygen exist."""
    return os.path.exists(SSHD) and shutil.which(SSH_KEYGEN) is not None
