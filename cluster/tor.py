"""Tor on a host: is it answering, a new identity, a restart; install and start it for `fab setup --tor`.

Everything that touches tor runs on the host itself, with the host's own Python:
client/torhost.py (Python 3.6, standard library only) sent on stdin with one
line of parameters appended, so the command line is just ``python3 -``. It speaks
SOCKS5 (greeting, no-auth) and tor's control protocol (PROTOCOLINFO, cookie
authentication, GETINFO, SIGNAL) to the addresses in hosts.ini (``socks``,
``tor_control``, ``tor_cookie``) and prints one JSON line.

Secrets: the control cookie is read on the host by that program and never
leaves it: not on a command line, not in its output, not in a log. It is read
only at an expected path, never at one the control port names; with SAFECOOKIE
(offered by every tor since 0.2.3) the control port must prove it knows the
cookie before beowulf answers, with an HMAC, never the cookie (SECURITY.md, "Tor control port and restarts").
A sudo password (system restarts) is Fabric's business (``transport.sudo``): it
is typed into sudo's prompt, never placed on a command line or written anywhere.

Restart methods, chosen from what the host has (``auto``):

- ``systemd``: the tor answering on the control port is in a systemd unit, or tor
  is down and PID 1 is systemd with a tor.service: ``systemctl restart tor`` as root.
- ``service``: the tor answering is the one /etc/init.d/tor started (its pid file),
  or tor is down and there is /etc/init.d/tor: ``service tor restart`` as root.
- ``process``: a tor the login user started by hand: only when it runs as the
  login user and /proc shows that this pid holds the socket listening on
  ``tor_control``; its program must be a regular file owned by root or the login
  user. Its configuration is checked (``--verify-config``), it is stopped
  (SIGTERM, by pid) and started again with the same arguments, environment and
  working folder, detached, as the same user. Never sudo, never another user.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import Optional

from .errors import RemoteError, SetupError, UsageError
from .machine import MachineOnce, host_python, machine_of
from .transport import Transport

log = logging.getLogger(__name__)
HOST_PROGRAM = Path(__file__).resolve().parent.parent / "client" / "torhost.py"

_SOCKS_CHECK = (
    "import socket,sys\n"
    "h,p=sys.argv[1].rsplit(':',1)\n"
    "s=socket.create_connection((h.strip('[]'),int(p)),5)\n"
    "s.sendall(b'\\x05\\x01\\x00')\n"
    "r=s.recv(2)\n"
    "sys.exit(0 if r==b'\\x05\\x00' else 3)\n"
)
RESTART = "systemctl restart tor 2>/dev/null || service tor restart"
METHODS = ("auto", "systemd", "service", "process")
SYSTEM_COMMANDS = {"systemd": "systemctl restart tor", "service": "service tor restart"}
DEFAULT_RESTART_WAIT = 60.0
_SOCKS_FORMAT = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\]/]+):(\d{1,5})$")


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


_MARK = "BEOWULF-TOR "


def check_addresses(host) -> None:
    """UsageError when ``socks`` is not host:port or ``tor_control`` is neither a path nor host:port."""
    match = _SOCKS_FORMAT.match(host.socks)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise UsageError(f"{host.name}: socks = {host.socks!r} is not host:port")
    control = host.tor_control[5:] if host.tor_control.startswith("unix:") else host.tor_control
    match = _SOCKS_FORMAT.match(control)
    if not (control.startswith(("/", "~")) or (match and 0 < int(match.group(2)) < 65536)):
        raise UsageError(f"{host.name}: tor_control = {host.tor_control!r} is neither a socket path nor host:port")


def host_script(params: dict) -> bytes:
    """client/torhost.py plus the call of one action, parameters included (nothing goes on the command line)."""
    return HOST_PROGRAM.read_bytes() + f"\nmain({json.dumps(params)!r})\n".encode()


def run_on_host(transport: Transport, action: str, timeout: float = 60, **params) -> dict:
    """Run one action of client/torhost.py with the host's Python; its JSON answer."""
    host = transport.host
    check_addresses(host)
    params = {"action": action, "socks": host.socks, "control": host.tor_control,
              "cookie": host.tor_cookie or "", **params}
    result = transport.run(f"{host_python(host)} -", stdin=host_script(params), timeout=timeout)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                answer = json.loads(line[len(_MARK):])
            except ValueError:
                break
            if isinstance(answer, dict):
                if answer.get("error") and len(answer) == 1:
                    raise RemoteError(f"{host.name}: {answer['error']}")
                return answer
    raise RemoteError(f"{host.name}: the tor check did not run with {host.python or 'python3'}: "
                      f"{result.error_line()}")


# ---------------------------------------------------------------- what the tasks call


def _hint(text: Optional[str]) -> str:
    """``text``, with what usually fixes a permission error on Debian's control socket or cookie."""
    text = text or "?"
    if "permission denied" in text.lower():
        return f"{text} (is the user in tor's group? debian-tor on Debian)"
    return text


def _control_line(control: dict) -> str:
    if not control.get("ok"):
        return f"no: {_hint(control.get('error'))}"
    return "yes"


def bootstrap_text(control: dict) -> str:
    """Tor's bootstrap phase as shown: "100% done", "14% handshake_dir: Handshaking with a relay", or "?"."""
    progress = control.get("progress")
    if not isinstance(progress, int) or isinstance(progress, bool):
        return "?"
    tag, summary = control.get("tag") or "", control.get("summary") or ""
    text = f"{progress}% {tag}".rstrip()
    if summary and summary.lower() != tag.lower():
        text += f": {summary}"
    if control.get("warning"):
        text += f" (warning: {control['warning']})"
    return text


def circuit_text(control: dict) -> str:
    return {"1": "yes", "0": "no"}.get(control.get("circuit"), "?")


def serves_socks(control: dict, socks: Optional[str]) -> bool:
    """False when the tor behind the control port lists its SOCKS listeners and ``socks`` is not one
    of them (the control port then speaks for another tor); True otherwise."""
    listeners = control.get("socks_listeners")
    if not socks or not isinstance(listeners, str) or not listeners.strip():
        return True
    host, _, port = socks.rpartition(":")
    for item in re.findall(r'"([^"]*)"|(\S+)', listeners):
        where = item[0] or item[1]
        l_host, _, l_port = where.rpartition(":")
        if l_port == port and (l_host.strip("[]") in (host.strip("[]"), "0.0.0.0", "::")):
            return True
    return False


def not_bootstrapped(control: dict, socks: Optional[str] = None) -> Optional[str]:
    """Why tor cannot carry requests yet (bootstrap under 100%), or None when it can or nobody can tell.

    Only a control port that authenticated counts (README.md, "Tor on the hosts"), and only
    for a tor that lists ``socks`` among its SOCKS listeners: otherwise the bootstrap state
    of the tor behind ``socks`` is unknown and only the SOCKS check decides.
    """
    progress = control.get("progress")
    if not control.get("auth") or not isinstance(progress, int) or progress >= 100:
        return None
    if not serves_socks(control, socks):
        return None
    why = f"tor is not bootstrapped ({bootstrap_text(control)}; circuit established: {circuit_text(control)})"
    if control.get("disable_network") == "1":
        why += "; tor has DisableNetwork 1"
    return why


def tor_ready(transport: Transport) -> None:
    """ConnectError unless the host's tor can carry requests: SOCKS answers and tor is bootstrapped."""
    from .errors import ConnectError

    host = transport.host
    answer = run_on_host(transport, "status", timeout=45)
    socks, control = answer.get("socks") or {}, answer.get("control") or {}
    if not socks.get("ok"):
        raise ConnectError(f"{host.name}: --tor: Tor's SOCKS port {host.socks} does not answer "
                           f"({socks.get('error')}); left out (fab tor.status, fab setup --tor)")
    why = not_bootstrapped(control, host.socks)
    if why:
        raise ConnectError(f"{host.name}: --tor: {why}; left out (fab tor.status)")
    if control.get("progress") is None or not serves_socks(control, host.socks):
        why = control.get("error") or control.get("auth_error") or "no answer to status/bootstrap-phase"
        if control.get("progress") is not None:
            why = f"its tor does not list {host.socks} among its SOCKS listeners"
        log.info("%s: --tor: tor's bootstrap state is unknown (control %s: %s); only its SOCKS port was checked",
                 host.name, host.tor_control, why)


def tor_status(transport: Transport) -> dict:
    """SOCKS and control port of one host: what answers, tor's version, and why not."""
    answer = run_on_host(transport, "status", timeout=45)
    socks, control = answer["socks"], answer["control"]
    row = {
        "socks_ok": bool(socks.get("ok")),
        "socks": "yes" if socks.get("ok") else f"no: {socks.get('error')}",
        "control_ok": bool(control.get("ok")),
        "control": _control_line(control),
        "auth": control.get("auth") or (f"no: {_hint(control['auth_error'])}" if control.get("auth_error") else "-"),
        "version": control.get("version") or "?",
        "pid": control.get("pid"),
        "disable_network": control.get("disable_network"),
        "bootstrap": bootstrap_text(control),
        "circuit": circuit_text(control),
        "not_bootstrapped": not_bootstrapped(control, transport.host.socks),
    }
    notes = []
    if not row["socks_ok"] and control.get("disable_network") == "1":
        notes.append("tor has DisableNetwork 1, so it opens no SOCKS port")
    elif row["not_bootstrapped"] and control.get("disable_network") == "1":
        notes.append("tor has DisableNetwork 1")
    elif row["socks_ok"] and control.get("progress") is not None and not serves_socks(control, transport.host.socks):
        notes.append(f"the control port's tor does not list {transport.host.socks} as a SOCKS listener")
    elif not row["socks_ok"] and control.get("auth") and control.get("socks_listeners") is not None:
        listeners = control.get("socks_listeners") or "none"
        notes.append(f"tor's SOCKS listeners: {listeners}")
    row["notes"] = notes
    return row


def new_identity(transport: Transport) -> dict:
    """SIGNAL NEWNYM through the host's control port (cookie authentication on the host); what tor said."""
    host = transport.host
    answer = run_on_host(transport, "newnym", timeout=45)
    control = answer["control"]
    if not control.get("ok"):
        raise RemoteError(f"{host.name}: control {host.tor_control} does not answer: {_hint(control.get('error'))}")
    if not control.get("auth"):
        raise RemoteError(f"{host.name}: cannot authenticate to tor: {_hint(control.get('auth_error'))}")
    if not control.get("newnym"):
        raise RemoteError(f"{host.name}: tor refused NEWNYM: {control.get('reply')}")
    event = control.get("event") or ""
    delay = re.search(r"delaying by (\d+) second", event)
    if delay:
        note = f"rate limited: tor applies it in {delay.group(1)} s"
    elif "SIGNAL NEWNYM" in event:
        note = "new identity now"
    else:
        note = "accepted"
    return {"reply": control.get("reply"), "note": note, "auth": control.get("auth"),
            "version": control.get("version") or "?"}


def _choose(facts: dict, method: str, host) -> str:
    """The restart method for one host; RemoteError when what the control port says cannot be trusted."""
    control = facts.get("control") or {}
    pid = control.get("pid")
    if method == "process":
        if not pid:
            why = control.get("error") or control.get("auth_error") or "no pid"
            raise RemoteError(f"{host.name}: no tor answers on {host.tor_control} to restart ({why})")
        if facts.get("process_refused"):
            raise RemoteError(f"{host.name}: not restarting by process: {facts['process_refused']}")
        return method
    if method != "auto":
        return method  # systemctl/service: a fixed command the user chose, whatever the control port says
    if pid:
        if facts.get("holds") is False:
            raise RemoteError(f"{host.name}: {host.tor_control} is not tor's control port: {facts.get('holds_why')}")
        managed = facts.get("managed")
        if managed:
            # The pid decides a command run as root: only a pid checked in /proc, or told by a
            # control port that proved it knows tor's cookie (not one that needs no authentication).
            if facts.get("holds") is not True and control.get("auth") not in ("safecookie", "cookie"):
                raise RemoteError(f"{host.name}: {host.tor_control} says tor is pid {pid} ({managed}), but that "
                                  f"cannot be checked ({facts.get('holds_why')}) and it did not authenticate with "
                                  f"tor's cookie; pass --method {managed} to restart the system's tor anyway")
            return managed
        if facts.get("process_refused"):
            raise RemoteError(f"{host.name}: not restarting by process: {facts['process_refused']}")
        return "process"
    if facts.get("systemd") and facts.get("tor_unit"):
        return "systemd"
    if facts.get("initd"):
        return "service"
    why = control.get("error") or control.get("auth_error") or "no pid"
    raise RemoteError(f"{host.name}: nothing to restart: tor's control {host.tor_control} does not tell its pid "
                      f"({why}) and the host has neither systemd with tor.service nor /etc/init.d/tor")


def restart_tor(transport: Transport, method: str = "auto", command: Optional[str] = None,
                wait: float = DEFAULT_RESTART_WAIT, once: Optional[MachineOnce] = None) -> dict:
    """Restart tor on one host (see the module docstring) and wait until it answers again.

    ``once`` (shared by the host threads of one run) restarts each machine's tor
    once when several inventory entries reach the same machine: same reported
    machine id and same verified SSH host key (cluster/machine.py). Entries of one
    machine take turns; an entry that finds its tor already restarted in this run
    (its pid is one a restart produced, or the same system service) only checks
    that it answers.
    """
    host = transport.host
    if method not in METHODS:
        raise UsageError(f"--method: expected one of {', '.join(METHODS)}, not {method!r}")
    facts = run_on_host(transport, "inspect", timeout=45)
    group = (once or MachineOnce()).group(machine_of(transport, facts.get("machine_id")))
    with group.lock:
        if group.state.get("restarted"):
            facts = run_on_host(transport, "inspect", timeout=45)  # tor as it is after that restart
        control = facts.get("control") or {}
        old_pid = control.get("pid")
        done_by = group.state.get(("pid", old_pid)) if old_pid else None
        chosen = "process" if done_by else ("command" if command else _choose(facts, method, host))
        key = ("pid", old_pid) if chosen == "process" else (chosen, command)
        done_by = group.state.get(key)
        if done_by is None:
            log.debug("%s: restarting tor by %s (pid %s)", host.name, chosen, old_pid)
            _restart_step(transport, chosen, command, old_pid)
            answer = run_on_host(transport, "wait", timeout=wait + 45, old_pid=old_pid, seconds=wait)
            group.state["restarted"] = True
            if answer.get("ok"):
                group.state[key] = (host.name, old_pid)
                after = (answer.get("control") or {}).get("pid")
                if after:
                    group.state[("pid", after)] = (host.name, old_pid)
            by, before = host.name, old_pid
        else:
            by, before = done_by
            answer = run_on_host(transport, "wait", timeout=wait + 45, old_pid=None, seconds=wait)
    after = answer.get("control") or {}
    socks = answer.get("socks") or {}
    report = {"method": chosen if chosen != "command" else f"command: {command}", "before": before,
              "after": after.get("pid"), "socks": "yes" if socks.get("ok") else f"no: {socks.get('error')}"}
    if not answer.get("ok"):
        if not answer.get("restarted"):
            raise RemoteError(f"{host.name}: tor did not come back within {wait:g}s "
                              f"(control: {after.get('error') or after.get('auth_error') or 'same pid'})")
        raise RemoteError(f"{host.name}: tor restarted but SOCKS {host.socks} did not answer within {wait:g}s: "
                          f"{socks.get('error')}")
    if socks.get("ok"):
        report["note"] = "SOCKS answers"
    else:
        report["note"] = "control answers; no SOCKS port: tor has DisableNetwork 1"
    if by != host.name:
        report["note"] += f" (same tor as {by}, restarted once)"
    return report


def _restart_step(transport: Transport, chosen: str, command: Optional[str], old_pid: Optional[int]) -> None:
    """Restart by ``chosen``: client/torhost.py's respawn (as the login user), or a root command."""
    host = transport.host
    if chosen == "process":
        done = run_on_host(transport, "respawn", timeout=120, pid=old_pid)
        if done.get("error"):
            raise RemoteError(f"{host.name}: {done['error']}")
        return
    what = command or SYSTEM_COMMANDS[chosen]
    done = transport.sudo(what, timeout=180)
    if not done.ok:
        raise RemoteError(f"{host.name}: {what}: {done.error_line()}")
