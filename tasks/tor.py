"""`fab tor.status`, `fab tor.newnym`, `fab tor.restart`: tor on every host, all hosts at once.

Each host's ``socks`` (host:port) and ``tor_control`` (socket path or host:port)
come from hosts.ini. The checks run on the host with its own Python; the control
cookie is read there and never leaves it (cluster/tor.py).
"""

from __future__ import annotations

import time

from invoke import Collection
from tabulate import tabulate

from cluster.constants import PROBE_DEADLINE_SECONDS
from cluster.fanout import fan_out
from cluster.machine import MachineOnce
from cluster.tor import DEFAULT_RESTART_WAIT, METHODS, check_addresses, new_identity, restart_tor, tor_status
from cluster.transport import connect

from .common import HOST_HELP, beowulf_task, exit_code_over_hosts, load_hosts, parse_float, setup_logging

MAX_RESTART_WAIT = 600.0


def _run(c, selected, accept_new: bool, deadline: float, action):
    """``action(transport)`` on every host at once, each under ``deadline``; the outcomes.

    Every host's ``socks`` and ``tor_control`` are checked first: a malformed one is a
    usage error (exit status 2) before any host is contacted.
    """
    for host in selected:
        check_addresses(host)
    transports = {}

    def work(host, outcome):
        transports[host.name] = transport = connect(host, c.config, accept_new=accept_new)
        try:
            return action(transport)
        finally:
            transport.close()

    def give_up(host):
        if host.name in transports:
            transports[host.name].close()

    return fan_out(selected, work, deadline, on_timeout=give_up)


def _finish(rows, headers, failed: list, total: int, summary: str) -> None:
    """Print the table and the summary; exit 3 when some hosts failed, 1 when all did."""
    from invoke import Exit

    from cluster.shown import shown_rows

    print(tabulate(shown_rows(rows), headers=headers))
    print(summary)
    if failed:
        raise Exit(f"{len(failed)} of {total} hosts failed: {', '.join(failed)}",
                   code=exit_code_over_hosts(len(failed), total))


@beowulf_task(help=dict(HOST_HELP))
def status(c, inventory=None, hosts=None, accept_new=False, verbose=False, quiet=False):
    """Show tor on every host: does its SOCKS port answer (a SOCKS5 greeting), its control port, tor's version.

    The control port counts as answering when tor answers PROTOCOLINFO; the version
    comes from GETINFO after cookie authentication (the cookie is read on the host),
    else from PROTOCOLINFO, else "?". So do tor's bootstrap progress (GETINFO
    status/bootstrap-phase: "100% done" when tor can build circuits) and whether it
    has built a circuit (status/circuit-established); "?" without authentication.
    Read-only. A host fails when its SOCKS port does not answer or its tor is not
    bootstrapped (`fab scrape --tor` leaves such a host out): exit status 3 when some
    hosts fail, 1 when all do.
    """
    setup_logging(verbose, quiet)
    path, selected = load_hosts(c, inventory, hosts)
    outcomes = _run(c, selected, accept_new, PROBE_DEADLINE_SECONDS, tor_status)
    rows, failed, controls, up, bootstrapped = [], [], 0, 0, 0
    for outcome in outcomes:
        host = outcome.host
        if not outcome.ok:
            failed.append(host.name)
            rows.append([host.name, host.socks, "?", host.tor_control, "?", "", "", "?", "?", outcome.error])
            continue
        row = outcome.value
        controls += row["control_ok"]
        up += row["socks_ok"]
        bootstrapped += row["bootstrap"].startswith("100%")
        if row["socks_ok"] and not row["not_bootstrapped"]:
            result = "; ".join(["ok"] + row["notes"])
        elif row["socks_ok"]:
            failed.append(host.name)
            result = "; ".join(["not bootstrapped"] + row["notes"])
        else:
            failed.append(host.name)
            result = "; ".join(["SOCKS does not answer"] + row["notes"])
        rows.append([host.name, host.socks, row["socks"], host.tor_control, row["control"], row["auth"],
                     row["version"], row["bootstrap"], row["circuit"], result])
    headers = ["host", "socks", "answers", "control", "answers", "auth", "version", "bootstrap", "circuit",
               "result"]
    _finish(rows, headers, failed, len(outcomes),
            f"{up} of {len(outcomes)} hosts answer SOCKS, {controls} control ports answer, "
            f"{bootstrapped} tors bootstrapped ({path})")


@beowulf_task(help=dict(HOST_HELP))
def newnym(c, inventory=None, hosts=None, accept_new=False, verbose=False, quiet=False):
    """Ask tor on every host for a new identity (SIGNAL NEWNYM through its control socket or port).

    Cookie authentication on the host itself (SAFECOOKIE when tor offers it, else
    COOKIE): no sudo, and the cookie never leaves the host. Tor rate-limits NEWNYM
    (one per 10 s): it still answers 250 OK and applies it later; the result column
    says which. Exit status 3 when some hosts fail, 1 when all do.
    """
    setup_logging(verbose, quiet)
    path, selected = load_hosts(c, inventory, hosts)
    outcomes = _run(c, selected, accept_new, PROBE_DEADLINE_SECONDS, new_identity)
    rows, failed = [], []
    for outcome in outcomes:
        host = outcome.host
        if outcome.ok:
            value = outcome.value
            rows.append([host.name, host.tor_control, value["auth"], value["version"], value["reply"],
                         value["note"]])
        else:
            failed.append(host.name)
            rows.append([host.name, host.tor_control, "", "", "", outcome.error])
    headers = ["host", "control", "auth", "version", "tor said", "result"]
    _finish(rows, headers, failed, len(outcomes),
            f"{len(outcomes) - len(failed)} of {len(outcomes)} hosts took NEWNYM ({path})")


@beowulf_task(help={
    **HOST_HELP,
    "method": "how to restart: auto (default: what the host has), systemd (systemctl restart tor), "
              "service (service tor restart), or process (a tor the login user runs by hand, checked in /proc to "
              "hold tor_control's socket: stop it by pid, start it again with the same arguments, as the login "
              "user, no sudo)",
    "command": "restart with this shell command instead, run as root (through sudo unless we are root), "
               "e.g. 'rc-service tor restart'",
    "wait": f"seconds to wait for tor to answer again (default {DEFAULT_RESTART_WAIT:g})",
})
def restart(c, inventory=None, hosts=None, accept_new=False, method="auto", command=None,
            wait=str(DEFAULT_RESTART_WAIT), verbose=False, quiet=False):
    """Restart tor on every host and wait until its SOCKS port answers again.

    auto picks what the host has: the tor answering on tor_control is restarted the
    way it was started (its systemd unit, /etc/init.d/tor, or, for a tor the login
    user runs by hand, stopped by pid and started again with the same command line,
    detached, as the login user: its configuration is checked first with
    --verify-config). A tor run by hand is restarted only when it runs as the login
    user and holds tor_control's listening socket; another user's tor only through
    systemctl or service. When tor is down: systemctl when PID 1 is systemd and
    tor.service exists, else service. Each machine's tor is restarted once, however
    many entries reach it (one machine: same machine id and same SSH host key).
    systemctl and service need root: sudo answers from `fab --prompt-for-sudo-password`
    or a NOPASSWD rule; the password is never written anywhere or put on a command line.
    A tor with DisableNetwork 1 opens no SOCKS port: then its control port answering
    again counts, and the result says so. Exit status 3 when some hosts fail, 1 when all do.
    """
    from cluster.errors import UsageError

    setup_logging(verbose, quiet)
    if method not in METHODS:
        raise UsageError(f"--method: expected one of {', '.join(METHODS)}, not {method!r}")
    if command is not None and not str(command).strip():
        raise UsageError("--command: empty command")
    if command and method != "auto":
        raise UsageError("--command and --method exclude each other")
    seconds = parse_float("wait", wait, above=0, maximum=MAX_RESTART_WAIT)
    path, selected = load_hosts(c, inventory, hosts)
    began = time.monotonic()
    once = MachineOnce()  # several inventory entries may reach one machine's tor: restart it once
    outcomes = _run(c, selected, accept_new, seconds + 300,
                    lambda transport: restart_tor(transport, method=method, command=command, wait=seconds,
                                                  once=once))
    rows, failed = [], []
    for outcome in outcomes:
        host = outcome.host
        if outcome.ok:
            value = outcome.value
            rows.append([host.name, value["method"], value["before"] or "?", value["after"] or "?", value["socks"],
                         value["note"]])
        else:
            failed.append(host.name)
            rows.append([host.name, "", "", "", "", outcome.error])
    headers = ["host", "method", "pid before", "pid after", "socks", "result"]
    _finish(rows, headers, failed, len(outcomes),
            f"{len(outcomes) - len(failed)} of {len(outcomes)} hosts restarted tor in "
            f"{time.monotonic() - began:.1f}s ({path})")


ns = Collection("tor")
ns.add_task(status)
ns.add_task(newnym)
ns.add_task(restart)
