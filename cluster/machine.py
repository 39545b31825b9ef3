"""Which computer an inventory entry reaches, and steps done once per computer.

Several inventory entries can reach one computer (a local entry and an SSH entry
to the same box, two addresses of one host). Steps such as a wheel upload, a tor
install or a tor restart are then done once. A host's ``machine_id`` is whatever
the host says, so it never decides that alone: two entries are one machine only
when they report the same machine id **and** present the same SSH host key, the
key that the connection itself checked against known_hosts (SECURITY.md, "Tor control port and restarts").
A local entry is this computer: its keys are this computer's own sshd host keys,
so an SSH entry to this computer's own sshd matches it.
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import shlex
import threading
from dataclasses import dataclass, field
from typing import Optional

from .inventory import Host

LOCAL_HOST_KEYS = "/etc/ssh/ssh_host_*_key.pub"
THIS_COMPUTER = "local"  # a key only local entries have (SSH keys are "SHA256:..."): local entries are one machine


def host_python(host: Host) -> str:
    """The interpreter command for a host (quoted for the shell)."""
    if host.is_local:
        import sys

        return shlex.quote(sys.executable)
    return shlex.quote(host.remote_python)


def _fingerprint(blob: bytes) -> str:
    """OpenSSH-style ``SHA256:...`` of a public key blob (as cluster/ssh.py's fingerprint)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def local_host_keys(pattern: str = LOCAL_HOST_KEYS) -> frozenset:
    """Fingerprints of this computer's own sshd host keys (read here, not reported by anyone)."""
    found = set()
    for path in glob.glob(pattern):
        try:
            with open(path) as handle:
                fields = handle.read(16384).split()
            found.add(_fingerprint(base64.b64decode(fields[1], validate=True)))
        except (OSError, IndexError, ValueError, binascii.Error):
            continue
    return frozenset(found)


def server_key(transport) -> Optional[str]:
    """Fingerprint of the host key the SSH connection of ``transport`` verified, or None."""
    connection = getattr(transport, "connection", None)
    client = getattr(connection, "client", None)
    ssh = client.get_transport() if client is not None else None
    if ssh is None:
        return None
    try:
        return _fingerprint(ssh.get_remote_server_key().asbytes())
    except Exception:  # not connected (any more): no key, no sharing
        return None


@dataclass(frozen=True)
class Machine:
    """One computer as far as the coordinator can tell: the host's machine id and checked host keys."""

    name: str
    machine_id: Optional[str] = None
    keys: frozenset = field(default_factory=frozenset)

    def same(self, other: Machine) -> bool:
        """Same computer: same reported machine id and at least one host key in common."""
        return bool(self.machine_id and self.machine_id == other.machine_id and self.keys & other.keys)


def machine_of(transport, machine_id: Optional[str]) -> Machine:
    """The Machine of one inventory entry, from its reported ``machine_id`` and its verified host key."""
    host = transport.host
    if host.is_local:
        keys = local_host_keys() | {THIS_COMPUTER}
    else:
        key = server_key(transport)
        keys = frozenset([key]) if key else frozenset()
    return Machine(host.name, machine_id or None, keys)


class _Group:
    def __init__(self, machine: Machine):
        self.machine = machine
        self.lock = threading.RLock()
        self.locks: dict[tuple, threading.Lock] = {}
        self.results: dict[tuple, object] = {}
        self.state: dict = {}


class MachineOnce:
    """Steps done once per machine, shared by the host threads of one run (see the module docstring)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._groups: list[_Group] = []

    def group(self, machine: Machine) -> _Group:
        """The group of ``machine``: the first known one that is the same computer, else a new one."""
        with self._guard:
            for group in self._groups:
                if group.machine.same(machine):
                    return group
            group = _Group(machine)
            self._groups.append(group)
            return group

    def run(self, machine: Machine, what: tuple, step):
        """``step()`` once per (machine, what); entries of the same machine get the first one's result."""
        group = self.group(machine)
        with group.lock:
            lock = group.locks.setdefault(what, threading.Lock())
        with lock:
            if what not in group.results:
                group.results[what] = step()
            return group.results[what]
