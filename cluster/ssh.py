"""The one Connection factory: strict host keys, keepalive, TCP_NODELAY, throttled connects.

Fabric sets Paramiko's AutoAddPolicy on every connection (gateways included),
which would trust any key. We replace it on every hop with a policy that refuses
unknown keys (printing the fingerprint and the fix) or, with ``--accept-new``,
appends them to known_hosts under a lock, like OpenSSH's ``accept-new``.
A changed key is always refused (Paramiko raises BadHostKeyException).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shlex
import socket
import threading
from pathlib import Path
from typing import Optional

import paramiko
from fabric import Config, Connection

from .constants import DEFAULT_CONNECT_TIMEOUT, KEEPALIVE_SECONDS, MAX_CONCURRENT_CONNECTS
from .errors import ConnectError, HostKeyError
from .inventory import Host

log = logging.getLogger(__name__)
_connect_slots = threading.BoundedSemaphore(MAX_CONCURRENT_CONNECTS)
_known_hosts_lock = threading.Lock()
# invoke's Config is not thread-safe: Connection() reads and clones it; hosts connect in threads.
_config_lock = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_entry_name(hostname: str, port: int) -> str:
    """How OpenSSH (and Paramiko) name a host in known_hosts: ``host`` or ``[host]:port``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def default_known_hosts(config: Config) -> Path:
    """``beowulf.known_hosts`` from fabric.yaml, else ``~/.ssh/known_hosts``."""
    configured = (config.get("beowulf") or {}).get("known_hosts")
    return Path(os.path.expanduser(configured or "~/.ssh/known_hosts"))


class RefuseUnknownKey(paramiko.MissingHostKeyPolicy):
    """Refuse a host whose key is not in known_hosts, saying how to trust it."""

    def __init__(self, known_hosts: Path, label: str):
        self.known_hosts = known_hosts
        self.label = label

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"{self.label}: unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}); "
            f"check it, then run again with --accept-new (or ssh to it once) to record it in {self.known_hosts}"
        )


class AcceptNewKey(paramiko.MissingHostKeyPolicy):
    """Trust a key on first use: append it to known_hosts (never rewrite the file).

    "First use" is decided under the lock, on the file as it is then: a host name that
    has any key recorded by now (another route to the same ``[host]:port``, a racing
    connection or process, a key of another type) is a changed key and is refused.
    """

    def __init__(self, known_hosts: Path, label: str):
        self.known_hosts = known_hosts
        self.label = label

    def missing_host_key(self, client, hostname, key):
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _known_hosts_lock:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.known_hosts, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                recorded = self._recorded(hostname)
                if not recorded:
                    os.write(fd, line.encode("ascii"))
            finally:
                os.close(fd)
        if recorded and not any(known.asbytes() == key.asbytes() for known in recorded):
            raise HostKeyError(
                f"{self.label}: host key for {hostname} has CHANGED (got {key.get_name()} {fingerprint(key)}, "
                f"expected {fingerprint(recorded[0])}, recorded in {self.known_hosts} while connecting, "
                "by another route or connection to the same name); refusing to connect. If the host was "
                f"reinstalled, remove its old entry: ssh-keygen -R {shlex.quote(hostname)} -f {self.known_hosts}")
        client.get_host_keys().add(hostname, key.get_name(), key)
        if not recorded:  # else: the same key, recorded meanwhile (several inventory entries are one host)
            log.warning("%s: recorded new host key %s %s in %s",
                        self.label, key.get_name(), fingerprint(key), self.known_hosts)

    def _recorded(self, hostname: str) -> list:
        """Every key known_hosts holds for ``hostname`` now (hashed entries too); the caller holds the lock."""
        try:
            found = paramiko.HostKeys(str(self.known_hosts)).lookup(hostname)
        except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as err:
            raise HostKeyError(f"{self.label}: cannot read {self.known_hosts} to record a new key: {err}; "
                               "refusing to connect") from None
        return list(found.values()) if found else []


def _secure(connection: Connection, known_hosts: Path, accept_new: bool, label: str) -> None:
    """Replace Fabric's AutoAddPolicy on this hop and every gateway hop before it."""
    policy = AcceptNewKey if accept_new else RefuseUnknownKey
    connection.client.set_missing_host_key_policy(policy(known_hosts, label))
    if known_hosts.exists():
        try:
            connection.client.load_system_host_keys(str(known_hosts))
        except paramiko.hostkeys.InvalidHostKey as err:
            # e.g. OpenSSH's @revoked / @cert-authority marker lines, which Paramiko cannot use:
            # refuse (safe) rather than guess which keys the file meant to trust or revoke.
            raise HostKeyError(f"{label}: cannot use {known_hosts}: a line Paramiko does not understand "
                               f"({str(err.line).strip()[:60]!r}; @revoked/@cert-authority lines are not "
                               "supported); refusing to connect") from None
        except (OSError, paramiko.SSHException) as err:
            raise HostKeyError(f"{label}: cannot read {known_hosts}: {err}") from None
    if isinstance(connection.gateway, Connection):
        _secure(connection.gateway, known_hosts, accept_new, label)


def make_connection(host: Host, config: Config) -> Connection:
    """A not-yet-opened Fabric Connection for ``host``; hosts.ini values win over ~/.ssh/config."""
    with _config_lock:
        connect_kwargs = dict(config.connect_kwargs or {})
    if host.identity:
        keys = connect_kwargs.get("key_filename") or []
        keys = [keys] if isinstance(keys, str) else list(keys)
        connect_kwargs["key_filename"] = [host.identity, *keys]
    connect_kwargs.setdefault("banner_timeout", 30)
    connect_kwargs.setdefault("auth_timeout", 30)
    with _config_lock:
        connection = Connection(
            host.hostname, user=host.user, port=host.port, config=config.clone(), connect_kwargs=connect_kwargs
        )
    # `fab -t` wins over ConnectTimeout in ~/.ssh/config; neither given: our default.
    if connection.config.timeouts.connect:
        connection.connect_timeout = int(connection.config.timeouts.connect)
    elif connection.connect_timeout is None:
        connection.connect_timeout = DEFAULT_CONNECT_TIMEOUT
    return connection


def open_connection(host: Host, config: Config, accept_new: bool = False,
                    known_hosts: Optional[Path] = None) -> Connection:
    """Open a checked, tuned SSH connection to ``host``; raise HostKeyError / ConnectError."""
    connection = make_connection(host, config)
    known_hosts = known_hosts or default_known_hosts(connection.config)
    _secure(connection, known_hosts, accept_new, host.name)
    target = f"{connection.user}@{connection.host}:{connection.port}"
    try:
        with _connect_slots:
            connection.open()
    except HostKeyError:
        raise
    except paramiko.BadHostKeyException as err:
        entry = shlex.quote(_changed_entry(connection, err.hostname))
        raise HostKeyError(
            f"{host.name}: host key for {err.hostname} has CHANGED (got {fingerprint(err.key)}, "
            f"expected {fingerprint(err.expected_key)}); refusing to connect. If the host was "
            f"reinstalled, remove its old entry: ssh-keygen -R {entry} -f {known_hosts}"
        ) from None
    except paramiko.AuthenticationException as err:
        raise ConnectError(f"{host.name}: authentication failed for {target}: {err}") from None
    except (socket.timeout, TimeoutError):
        raise ConnectError(f"{host.name}: timed out connecting to {target}") from None
    except (OSError, paramiko.SSHException, EOFError) as err:
        reason = (getattr(err, "strerror", None) if isinstance(err, OSError) else None) or str(err)
        reason = reason.replace("[Errno None] ", "") or type(err).__name__
        raise ConnectError(f"{host.name}: cannot connect to {target}: {reason}") from None
    transport = connection.client.get_transport()
    transport.set_keepalive(KEEPALIVE_SECONDS)
    sock = transport.sock
    if isinstance(sock, socket.socket):
        # Paramiko without TCP_NODELAY adds ~40 ms (Nagle + delayed ACK) to every exchange.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _changed_entry(connection: Connection, hostname: str) -> str:
    """The known_hosts entry of the hop whose key changed: the target or a ProxyJump gateway."""
    hop = connection
    while isinstance(hop, Connection):
        if hop.host == hostname or hostname in (f"[{hop.host}]:{hop.port}",):
            return known_hosts_entry_name(hop.host, hop.port)
        hop = hop.gateway
    return known_hosts_entry_name(connection.host, connection.port)


def remote_path(path: str) -> str:
    """Quote a path for a remote shell while keeping a leading ``~`` expandable."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
