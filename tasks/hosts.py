"""`fab setup`, `fab hosts`, `fab teardown`: provisioning and looking at the machines."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional

from tabulate import tabulate

from cluster.constants import PROBE_DEADLINE_SECONDS, SETUP_DEADLINE_SECONDS
from cluster.engines import ENGINE_HELP
from cluster.errors import UsageError
from cluster.fanout import fan_out
from cluster.health import check_host
from cluster.provision import Provisioner
from cluster.provision import teardown as remove_workdir
from cluster.shown import shown, shown_rows
from cluster.transport import connect
from cluster.wheels import WheelCache

from .common import (
    HOST_HELP,
    beowulf_task,
    confirm,
    exit_code_over_hosts,
    load_hosts,
    setup_logging,
)
from .engine import engine_choice, engine_hosts


def _exit_for(outcomes) -> int:
    return exit_code_over_hosts(sum(not outcome.ok for outcome in outcomes), len(outcomes))


def _hosts(count: int) -> str:
    return f"{count} host" if count == 1 else f"{count} hosts"


def _error_cell(outcome) -> str:
    """The error without the host name in front (the row already names the host)."""
    prefix = f"{outcome.host.name}: "
    return outcome.error[len(prefix):] if outcome.error.startswith(prefix) else outcome.error


def _memory(facts: dict) -> str:
    memory = facts.get("memory")
    return f"{memory / 2**30:.1f} GiB" if memory else "?"


def _slots(host, facts: dict):
    return host.slots or facts.get("cores") or "?"


def _last_column_width(rows, headers) -> Optional[int]:
    """Room for the last column (result, error) in the terminal, at least 30; None when not a terminal."""
    if not sys.stdout.isatty():
        return None  # a file or a pipe gets each row on one line (whole errors for grep)
    others = sum(max(len(str(cell if cell is not None else "")) for cell in column) + 2
                 for column in zip(headers[:-1], *[row[:-1] for row in rows]))
    return max(30, shutil.get_terminal_size((100, 24)).columns - others)


ENGINES = ("primesieve", "numpy", "python")
APT_SYSTEMS = ("Debian", "Ubuntu", "Raspbian")  # as cluster/provision.py's --system-packages


def _engine(facts: dict) -> str:
    """The primes engine the probe says the host would pick ("?" from an older client or a bad answer)."""
    engine = facts.get("engine")
    return engine if engine in ENGINES else "?"


def _engine_hint(slow) -> Optional[str]:
    """What to run for the hosts on the pure-Python sieve, ``slow``: (name, facts) pairs (README, "Adding machines")."""
    if not slow:
        return None
    apt = [name for name, facts in slow if any(word in str(facts.get("os") or "") for word in APT_SYSTEMS)]
    other = [name for name, _ in slow if name not in apt]
    hints = []
    if apt:
        hints.append(f"{', '.join(apt)}: pure-Python sieve (5-50x slower); if its python is the system python3, "
                     "run `fab setup --system-packages` (README: Adding machines)")
    if other:
        hints.append(f"{', '.join(other)}: pure-Python sieve (5-50x slower); install numpy or libprimesieve "
                     "for its python, then `fab setup` (README: Adding machines)")
    return "\n".join(hints)


def _finish(outcomes, rows, headers, summary: str, hint: Optional[str] = None) -> None:
    from invoke import Exit

    rows = shown_rows([row[:-1] + ["" if row[-1] is None else row[-1]] for row in rows])
    # On a terminal the last column (an error can be long) wraps, instead of making a 250-column table.
    width = _last_column_width(rows, headers)
    widths = None if width is None else [None] * (len(headers) - 1) + [width]
    print(tabulate(rows, headers=headers, maxcolwidths=widths))
    print(shown(summary))
    for line in (hint or "").splitlines():
        print(shown(line))
    code = _exit_for(outcomes)
    if code:
        failed = [o.host.name for o in outcomes if not o.ok]
        raise Exit(shown(f"{len(failed)} of {len(outcomes)} hosts failed: {', '.join(failed)}"), code=code)


@beowulf_task(help={**HOST_HELP, "tor": "also install tor where missing (apt via sudo) and make sure it runs",
                    "no_numpy": "do not install numpy on hosts (they use the pure-Python sieve)",
                    "system_packages": "on Debian/Ubuntu/Raspbian hosts whose python is the system python3, "
                                       "install python3-numpy and libprimesieve (apt via sudo, once per machine)"})
def setup(c, inventory=None, hosts=None, accept_new=False, tor=False, no_numpy=False, system_packages=False,
          verbose=False, quiet=False):
    """Provision every host: probe, upload the client, unpack packages (all hosts at once).

    Idempotent: a second run with nothing changed uploads nothing and says so.
    Exit status 3 when some hosts failed (the others are still provisioned), 1 when all did.
    """
    setup_logging(verbose, quiet)
    path, selected = load_hosts(c, inventory, hosts)
    provisioner = Provisioner(WheelCache(), tor=tor, numpy=not no_numpy, system_packages=system_packages)
    transports = {}

    def work(host, outcome):
        transports[host.name] = transport = connect(host, c.config, accept_new=accept_new)
        try:
            return provisioner.setup(transport)
        finally:
            transport.close()

    def give_up(host):
        if host.name in transports:
            transports[host.name].close()

    began = time.monotonic()
    outcomes = fan_out(selected, work, SETUP_DEADLINE_SECONDS, on_timeout=give_up)
    rows, uploaded = [], 0
    for outcome in outcomes:
        host, report = outcome.host, outcome.value
        if outcome.ok:
            facts = report.facts
            uploaded += report.uploaded_bytes
            rows.append([host.name, host.address, facts.get("python"), facts.get("cores"), _slots(host, facts),
                         facts.get("arch"), report.bundle, report.packages, report.engine, report.tor, "ok"])
        else:
            rows.append([host.name, host.address, "", "", "", "", "", "", "", "", _error_cell(outcome)])
    headers = ["host", "address", "python", "cores", "slots", "arch", "bundle", "packages", "engine", "tor",
               "result"]
    ok = sum(o.ok for o in outcomes)
    if uploaded:
        what = f"uploaded {uploaded / 1e6:.2f} MB"
    elif ok == len(outcomes):
        what = "nothing uploaded: every host was up to date"
    else:
        what = "nothing uploaded"
    _finish(outcomes, rows, headers,
            f"{ok} of {_hosts(len(selected))} from {path} provisioned in {time.monotonic() - began:.1f}s; {what}",
            _engine_hint([(o.host.name, o.value.facts) for o in outcomes
                          if o.ok and o.value.engine.startswith("python")]))


@beowulf_task(name="hosts", help={**HOST_HELP, **ENGINE_HELP})
def hosts_(c, inventory=None, hosts=None, accept_new=False, verbose=False, quiet=False, engine=None,
           scheduler=None):
    """Show each host's health: reachable, latency, bundle fresh or stale, Python, slots, load.

    Read-only: changes nothing on any host. With --engine dask: the scheduler's workers (name,
    address, threads, memory, Python, packages) and whether each can run the client.
    """
    setup_logging(verbose, quiet)
    choice = engine_choice(c, engine, scheduler, inventory, hosts)
    if choice.is_dask:
        return _dask_workers(c, choice)
    path, selected = load_hosts(c, inventory, hosts)

    def work(host, outcome):
        with connect(host, c.config, accept_new=accept_new) as transport:
            return check_host(transport)

    outcomes = fan_out(selected, work, PROBE_DEADLINE_SECONDS)
    rows = []
    for outcome in outcomes:
        host = outcome.host
        if outcome.ok:
            value = outcome.value
            facts = value["facts"]
            load = facts.get("load")
            temp = facts.get("temp")
            rows.append([host.name, host.address, "yes", f"{value['latency_ms']:.1f} ms", value["bundle"],
                         facts.get("python"), facts.get("cores"), _slots(host, facts), _memory(facts),
                         _engine(facts), f"{load[0]:.2f}" if load else "?",
                         f"{temp:.0f}°C" if temp is not None else "?", facts.get("os")])
        else:
            rows.append([host.name, host.address, "no", "", "", "", "", "", "", "", "", "", _error_cell(outcome)])
    headers = ["host", "address", "reachable", "latency", "bundle", "python", "cores", "slots", "memory",
               "engine", "load", "temp", "os / error"]
    up = sum(o.ok for o in outcomes)
    if not up:  # no engine to show: the room goes to the errors
        at = headers.index("engine")
        headers.pop(at)
        rows = [row[:at] + row[at + 1:] for row in rows]
    _finish(outcomes, rows, headers, f"{up} of {_hosts(len(outcomes))} reachable ({path})", _engine_hint(
        [(o.host.name, o.value["facts"]) for o in outcomes if o.ok and _engine(o.value["facts"]) == "python"]))


def _dask_workers(c, choice) -> None:
    """fab hosts --engine dask: one row per worker; exit 3 when some cannot run the client, 1 when none can."""
    from invoke import Exit

    from cluster.engines.dask import worker_rows

    with engine_hosts(c, choice) as chosen:
        headers, rows, able = worker_rows(chosen.dask)
        where = chosen.dask.scheduler_address
    print(tabulate(shown_rows(rows), headers=headers, disable_numparse=True))
    print(shown(f"{able} of {len(rows)} workers of {where} can run the client"))
    if able < len(rows):
        raise Exit(code=exit_code_over_hosts(len(rows) - able, len(rows)))


@beowulf_task(help={**HOST_HELP, "yes": "do not ask for confirmation"})
def teardown(c, inventory=None, hosts=None, accept_new=False, yes=False, verbose=False, quiet=False):
    """Remove beowulf's workdir (client, packages) from hosts; asks first unless --yes."""
    setup_logging(verbose, quiet)
    path, selected = load_hosts(c, inventory, hosts)
    names = ", ".join(host.name for host in selected)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("teardown: no terminal to ask for confirmation; pass --yes")
        if not confirm(f"Remove the beowulf workdir from {names}?"):
            print("nothing removed")
            return

    def work(host, outcome):
        with connect(host, c.config, accept_new=accept_new) as transport:
            return remove_workdir(transport)

    outcomes = fan_out(selected, work, PROBE_DEADLINE_SECONDS)
    rows = [[o.host.name, o.host.address, o.value if o.ok else _error_cell(o)] for o in outcomes]
    _finish(outcomes, rows, ["host", "address", "result"], f"{_hosts(len(selected))} from {path}")
