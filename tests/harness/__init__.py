"""Test harness: real sshd hosts on 127.0.0.x, a fault-injecting TCP relay, and ``fab`` runs.

Import from tests as ``from harness import SshCluster, Relay, run_fab``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .relay import Relay
from .sshd import (
    SshCluster,
    SshHost,
    descendants,
    free_port,
    keygen,
    pid_alive,
    sshd_available,
    start_cluster,
)

__all__ = [
    "agent_pids",
    "REPO_ROOT",
    "Relay",
    "SshCluster",
    "SshHost",
    "descendants",
    "fab_argv",
    "fab_env",
    "free_port",
    "keygen",
    "load_fabric_config",
    "pid_alive",
    "require_sshd",
    "run_fab",
    "sshd_available",
    "start_cluster",
]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FAB_TIMEOUT = 120.0  # seconds a `fab` run in a test may take by default

PathLike = Union[str, "os.PathLike[str]"]


def in_ci() -> bool:
    """True when running under CI (``CI=true``)."""
    return os.environ.get("CI") == "true"


def require_sshd() -> None:
    """Skip the calling test (fail it under CI) unless sshd is installed and we are root."""
    if not sshd_available():
        _skip_or_fail("needs /usr/sbin/sshd and ssh-keygen (run tests/system-deps.sh as root)")
    if os.geteuid() != 0:
        _skip_or_fail("sshd test hosts need root (sshd's privilege separation)")


def _skip_or_fail(msg: str) -> None:
    import pytest

    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def fab_argv(args: Sequence[str], config: Optional[PathLike] = None) -> list:
    """The command line for ``fab`` on this repo: ``python -m fabric -r REPO [-f CONFIG] ARGS``."""
    argv = [sys.executable, "-m", "fabric", "-r", str(REPO_ROOT)]
    if config is not None:
        argv += ["-f", str(config)]
    return argv + [str(a) for a in args]


def fab_env(extra: Optional[Mapping[str, str]] = None) -> dict:
    """The environment for a ``fab`` child: ours, unbuffered, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_fab(
    args: Sequence[str],
    cwd: Optional[PathLike] = None,
    config: Optional[PathLike] = None,
    input: Optional[str] = None,
    timeout: float = FAB_TIMEOUT,
    env: Optional[Mapping[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run ``fab ARGS`` on this repo and return the CompletedProcess (text stdout/stderr).

    Never raises on a non-zero exit. On timeout the whole process group (fab and any
    workers it started) is killed and ``subprocess.TimeoutExpired`` is raised with
    the output so far.
    """
    argv = fab_argv(args, config)
    proc = subprocess.Popen(
        argv,
        cwd=str(cwd) if cwd is not None else None,
        env=fab_env(env),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill_group(proc)
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    except BaseException:  # Ctrl-C in the test run: leave nothing running
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> tuple:
    """SIGKILL ``proc``'s process group (it leads its own session); return its output so far."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes
        return "", ""


def descendant_pids(root: int) -> list:
    """PIDs of every live process below ``root`` (children, grandchildren, ...), from /proc."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def agent_pids(marker: str) -> list:
    """PIDs of live agent/worker processes whose command line mentions ``marker`` (a host's workdir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if "agent.py" in cmdline and marker in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def load_fabric_config(path: PathLike):
    """The Fabric Config ``fab -f PATH`` would use (e.g. SshCluster.write_fabric_config's file)."""
    from fabric import Config

    config = Config(runtime_path=str(path))
    config.load_runtime()
    return config
