"""What every task shares: the decorator, flag validation, inventory lookup, logging.

A user mistake never prints a traceback (docs/ARCHITECTURE.md, "Errors and exit status"),
so numeric flags are strings validated here (invoke's typed flags crash on ``--start abc``); errors
become ``invoke.Exit(message, code)``; Ctrl-C is exit 130; ``fab -H`` is refused.
"""

from __future__ import annotations

import decimal
import functools
import logging
import logging.handlers
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from fabric import Connection
from invoke import Exit, task

from cluster.errors import BeowulfError, UsageError
from cluster.inventory import Host, load_inventory, select_hosts
from cluster.shown import EscapingFormatter, shown
from cluster.tally import RepeatFilter, repeats_not_shown, tallied

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_INTEGER = re.compile(r"^[+-]?\d[\d_]*$")
_FLOATISH = re.compile(r"^[+-]?(\d[\d_]*)?(\.\d*)?([eE][+-]?\d+)?$")
# Whole-number flags are refused at or beyond this magnitude (no flag needs more).
_INT_LIMIT = 2**63
# Longest flag value quoted as is in an error message.
MAX_SHOWN = 60

HOST_HELP = {
    "inventory": "hosts.ini to use (default: beowulf.inventory in fabric.yaml, else hosts.ini beside the fabfile)",
    "hosts": "only these hosts of the inventory, comma-separated names",
    "accept_new": "trust and record host keys seen for the first time (like ssh's StrictHostKeyChecking=accept-new)",
    "verbose": "log every step",
    "quiet": "print only the final table, warnings and errors",
}


def usage_errors_exit_2() -> None:
    """Make fab's own parse errors (an unknown flag such as a typo ``--strat``, a flag
    missing its value, an unknown task) exit with status 2 like every other usage error.

    invoke exits 1 for them, and parses the task flags only after it has imported this
    fabfile, so the one place to change that is its Program.parse_tasks."""
    from invoke.exceptions import ParseError
    from invoke.program import Program

    parse_tasks = Program.parse_tasks
    if getattr(parse_tasks, "beowulf", False):
        return

    @functools.wraps(parse_tasks)
    def parse_tasks_exit_2(self) -> None:
        try:
            parse_tasks(self)
        except ParseError as err:
            raise Exit(f"{err} (fab --list shows the tasks, fab --help TASK a task's flags)", code=2) from None

    parse_tasks_exit_2.beowulf = True
    Program.parse_tasks = parse_tasks_exit_2


def beowulf_task(*args, **kwargs):
    """``@task`` without automatic short flags, with our error, Ctrl-C and ``-H`` handling."""

    def decorate(body):
        @functools.wraps(body)
        def wrapper(c, *a, **kw):
            if isinstance(c, Connection):
                raise Exit("error: fab -H is not supported: beowulf drives all hosts itself; "
                           "put them in hosts.ini and use --inventory PATH / --hosts NAME,NAME",
                           code=EXIT_USAGE)
            try:
                return body(c, *a, **kw)
            except BeowulfError as err:
                raise Exit(f"error: {shown(str(err))}", code=err.exit_code) from None
            except KeyboardInterrupt:
                raise Exit("interrupted", code=EXIT_INTERRUPTED) from None
            except BrokenPipeError:
                # The reader went away (`fab stats | head`): stop quietly, like any Unix tool.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                raise Exit(code=0) from None

        kwargs.setdefault("auto_shortflags", False)
        return task(wrapper, **kwargs)

    if args and callable(args[0]):
        return decorate(args[0])
    return decorate


def parse_int(flag: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``10000000``, ``10_000_000`` or ``1e7`` -> int; UsageError naming the flag otherwise."""
    text = str(value).strip()
    exact: Optional[decimal.Decimal] = None
    if (_INTEGER.match(text) or _FLOATISH.match(text)) and any(ch.isdigit() for ch in text):
        try:  # exact, whatever the exponent ("0e999999999" or "1e-999999999" cost nothing)
            exact = decimal.Decimal(text.replace("_", ""))
        except decimal.InvalidOperation:
            exact = None
    huge = exact is not None and exact.copy_abs() >= _INT_LIMIT
    if exact is None or (not huge and exact != exact.to_integral_value()):
        raise UsageError(f"--{flag}: expected a whole number such as 10000000, 10_000_000 or 1e7, "
                         f"not {_shown(text)}")
    shown = _shown(text) if huge else f"{int(exact):,}"
    if minimum is not None and exact < minimum:
        raise UsageError(f"--{flag}: must be at least {minimum:,}, not {shown}")
    if maximum is not None and exact > maximum:
        raise UsageError(f"--{flag}: must be at most {maximum:,}, not {shown}")
    if huge:
        raise UsageError(f"--{flag}: {shown} is too large")
    return int(exact)


def _shown(text: str) -> str:
    """A flag's value quoted for an error message, cut short when it is long."""
    return repr(text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "...")


def parse_float(flag: str, value, minimum: Optional[float] = None, above: Optional[float] = None,
                maximum: Optional[float] = None) -> float:
    """A finite number for ``--flag``; UsageError naming the flag otherwise."""
    try:
        number = float(str(value).strip().replace("_", ""))
    except ValueError:
        raise UsageError(f"--{flag}: expected a number, not {_shown(str(value))}") from None
    if not math.isfinite(number):
        raise UsageError(f"--{flag}: expected a finite number, not {_shown(str(value))}")
    if above is not None and number <= above:
        raise UsageError(f"--{flag}: must be greater than {above:g}, not {number:g}")
    if minimum is not None and number < minimum:
        raise UsageError(f"--{flag}: must be at least {minimum:g}, not {number:g}")
    if maximum is not None and number > maximum:
        raise UsageError(f"--{flag}: must be at most {maximum:g}, not {number:g}")
    return number


def beowulf_config(c) -> dict:
    """The ``beowulf:`` section of fabric.yaml (or of ``fab -f FILE``), as a plain dict."""
    section = c.config.get("beowulf") or {}
    return dict(section)


def print_warnings(outcome) -> None:
    """A run's warnings (each distinct one once), the console lines counted instead of repeated, and
    the hosts still starting when the run was done (one line, not a warning per host; none for a
    run that was already complete: no host was asked)."""
    from cluster.report import still_starting

    note, warnings = still_starting(outcome.hosts, outcome.warnings)
    if getattr(outcome, "already_done", False):
        note = ""
    for warning in tallied(warnings):
        print(f"warning: {shown(warning)}")
    for line in repeats_not_shown():  # console lines counted instead of repeated (cluster/tally.py)
        print(f"({shown(line)})")
    if note:
        print(shown(note))


def store_path(c, db) -> Path:
    """--db, else beowulf.db in fabric.yaml, else results.db in the current folder; its folder must exist."""
    path = Path(os.path.expanduser(db or beowulf_config(c).get("db") or "results.db"))
    if not path.parent.is_dir():
        raise UsageError(f"--db: folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"--db: {path} is a folder, not a store file")
    return path


def exit_code_over_hosts(failed: int, total: int) -> int:
    """A task over several hosts: 0 if none failed, 3 if some did, 1 if all did."""
    if failed <= 0:
        return EXIT_OK
    return EXIT_FAILED if failed >= total else EXIT_PARTIAL


def run_job(c, job, selected, db_path: Path, *, fresh: bool = False, accept_new: bool = False,
            quiet: bool = False, dashboard: bool = False, kept: str = "finished blocks",
            on_coordinator: Optional[Callable] = None, **options):
    """Run ``job`` over the ``selected`` hosts into the store at ``db_path``: the one way every
    job task runs (progress bar, ``--dashboard`` beside the run, Ctrl-C). ``options`` go to the
    Coordinator (block_seconds, verify, ...); ``on_coordinator(coordinator)`` is called before
    it runs (e.g. to attach something to it). Returns its RunOutcome; Ctrl-C exits 130 saying
    that the ``kept`` results are kept."""
    from cluster.coordinator import Coordinator
    from cluster.progress import Progress

    from .dashboard import beside  # --dashboard (tasks/dashboard.py)

    coordinator = Coordinator(job, selected, c.config, str(db_path), fresh=fresh, accept_new=accept_new, **options)
    if on_coordinator is not None:
        on_coordinator(coordinator)
    try:
        with beside(db_path, dashboard), \
                Progress(job.unit[1], enabled=None if not quiet else False, label=job.name,
                         per_minute=job.progress_per_minute) as progress:
            coordinator.progress = progress
            outcome = coordinator.run()
            progress.finish(outcome.items_total, job.total)
            return outcome
    except KeyboardInterrupt:
        raise Exit(f"interrupted: {kept} are kept; run the same command again to resume",
                   code=EXIT_INTERRUPTED) from None


def print_run_summary(outcome, db_path: Path, job_name: Optional[str] = None, workers: Optional[bool] = None) -> None:
    """The hosts' table and the run's line, from the store: the figures and names of fab stats,
    with the job's column headings and notes (Job.slots_label, found_label, summary_notes).
    ``job_name`` defaults to the run's job; ``workers`` is ignored (the job's hooks say)."""
    from tabulate import tabulate

    from cluster.jobs import hooks_of
    from cluster.report import summary_table, summary_total
    from cluster.shown import shown_rows
    from cluster.store import Store

    from .stats import run_report_of

    with Store(str(db_path)) as store:
        report = run_report_of(store, outcome.run_id)
    hooks = hooks_of(job_name or report["run"]["job"])
    headers, rows = summary_table(report, {h.name: h.state for h in outcome.hosts}, hooks)
    print(tabulate(shown_rows(rows), headers=headers, disable_numparse=True))
    print(shown(summary_total(report)))
    for note in hooks.summary_notes(report):
        print(shown(note))


def inventory_path(c, inventory: Optional[str]) -> Path:
    """--inventory, else beowulf.inventory from the config, else hosts.ini beside the fabfile."""
    if inventory:
        return Path(os.path.expanduser(inventory))
    configured = beowulf_config(c).get("inventory")
    if configured:
        return Path(os.path.expanduser(configured))
    return REPO_ROOT / "hosts.ini"


def load_hosts(c, inventory: Optional[str], hosts: Optional[str]) -> tuple[Path, list[Host]]:
    """The inventory path and the hosts to work on (``--hosts`` subset), validated."""
    path = inventory_path(c, inventory)
    return path, select_hosts(load_inventory(path), hosts, path)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotated log whose new files are readable by their owner only (0600)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(verbose: bool = False, quiet: bool = False, log_file: Optional[Path] = None) -> None:
    """Warnings (or everything with --verbose) to stderr; everything to a rotated log file."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_beowulf", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # Every line escaped, whatever module logged it: hosts and web servers send text (SECURITY.md).
    console.setFormatter(EscapingFormatter("%(levelname).1s %(message)s" if verbose else "%(message)s"))
    console._beowulf = True  # type: ignore[attr-defined]
    if not verbose:  # lines repeating one shown but for their numbers are counted (cluster/tally.py)
        console.addFilter(RepeatFilter())
    root.addHandler(console)
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    # invoke's debug lines dump whole configs, prompted secrets included (sudo.password,
    # connect_kwargs' passphrase and password): keep them out of the console and the log file.
    logging.getLogger("invoke").setLevel(logging.INFO)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            rotating = _PrivateRotatingFileHandler(log_file, maxBytes=5_000_000, backupCount=3)
        except OSError:
            return
        rotating.setLevel(logging.DEBUG)
        rotating.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        rotating._beowulf = True  # type: ignore[attr-defined]
        root.addHandler(rotating)


def confirm(question: str) -> bool:
    """Ask yes/no on the terminal; no terminal means no."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
