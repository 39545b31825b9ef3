"""Tor on a host: is its SOCKS port answering, install it, start it.

The check speaks the first SOCKS5 exchange (greeting, no-auth) with the host's
own Python, so "answering" means a SOCKS5 server, not just an open port.
"""

from __future__ import annotations

import shlex

from .errors import SetupError
from .provision import host_python
from .transport import Transport

_SOCKS_CHECK = (
    "import socket,sys\n"
    "h,p=sys.argv[1].rsplit(':',1)\n"
    "s=socket.create_connection((h.strip('[]'),int(p)),5)\n"
    "s.sendall(b'\\x05\\x01\\x00')\n"
    "r=s.recv(2)\n"
    "sys.exit(0 if r==b'\\x05\\x00' else 3)\n"
)
RESTART = "systemctl restart tor 2>/dev/null || service tor restart"


def socks_answers(transport: Transport) -> bool:
    """True when the host's configured SOCKS endpoint answers a SOCKS5 greeting."""
    python = host_python(transport.host)
    command = f"{python} -c {shlex.quote(_SOCKS_CHECK)} {shlex.quote(transport.host.socks)}"
    return transport.run(command, timeout=30).ok


def ensure_tor(transport: Transport) -> str:
    """Install tor when missing (apt via sudo) and (re)start it until SOCKS answers; say what was done."""
    host = transport.host
    steps = []
    if not transport.run("command -v tor", timeout=30).ok:
        done = transport.sudo("DEBIAN_FRONTEND=noninteractive apt-get install -y -q tor", timeout=900)
        if not done.ok:
            raise SetupError(f"{host.name}: cannot install tor: {done.error_line()}")
        steps.append("installed")
    if socks_answers(transport):
        return ", ".join(steps + ["running"])
    done = transport.sudo(RESTART, timeout=120)
    if not done.ok:
        raise SetupError(f"{host.name}: tor does not answer on {host.socks} and cannot be restarted: "
                         f"{done.error_line()}")
    if not socks_answers(transport):
        raise SetupError(f"{host.name}: tor restarted but {host.socks} does not answer SOCKS5")
    return ", ".join(steps + ["restarted"])
