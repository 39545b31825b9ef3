"""Helpers shared by the tests that make a host hostile on a real sshd cluster.

- :func:`executable`: write a script (a host's replacement ``python``, say) and make it runnable;
- :func:`provisioned_cluster`: N sshd hosts after ``fab setup --no-numpy`` (for module fixtures);
- :func:`provision`: ``fab setup --no-numpy`` on a started cluster: (inventory, fabric.yaml);
- :func:`fab_measured`: run fab under a timeout and measure the peak RSS of its process tree;
- :func:`count_of`, :func:`assert_blocks_tile`: what a primes run printed and stored;
- :func:`session_pids_running`: a host's session processes whose command line holds some bytes;
- :class:`LinesStream`: a transport stream whose stdout is given bytes (for HostLink unit tests).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.store import Store
from cluster.transport import Stream

from . import SshCluster, fab_argv, fab_env, require_sshd, run_fab

# Runs fab, then writes the largest peak RSS (kB) among fab and every descendant it reaped.
_RSS_SHIM = ("import resource, subprocess, sys\n"
             "code = subprocess.call(sys.argv[2:])\n"
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
             "sys.exit(code)\n")


def executable(folder: Path, name: str, text: str) -> Path:
    """Write ``text`` to ``folder/name``, mode 0755; return the path."""
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def provision(cluster: SshCluster, folder: Path, inventory: str = "hosts.ini", timeout: float = 120) -> tuple:
    """``fab setup --no-numpy`` on every host of ``cluster``; (inventory, fabric.yaml), written in ``folder``."""
    path = cluster.write_inventory(folder / inventory)
    config = cluster.write_fabric_config(folder / "fabric.yaml")
    done = run_fab(["setup", "--inventory", path, "--no-numpy"], config=config, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return path, config


def provisioned_cluster(tmp_path_factory, name: str, hosts: int):
    """Generator for a module fixture: yields (SshCluster of ``hosts`` sshd hosts, fabric.yaml) after setup."""
    require_sshd()
    base = tmp_path_factory.mktemp(name)
    with SshCluster(base / "cluster", hosts) as cluster:
        yield cluster, provision(cluster, base, "setup.ini", timeout=300)[1]


def fab_measured(args, tmp_path: Path, config=None, timeout: float = 240, tail: int = 0):
    """Run ``fab ARGS``: (CompletedProcess, peak RSS of the fab process tree in MB, seconds).

    A run past ``timeout`` is killed and fails the test, with its output (the last ``tail``
    characters of each stream if ``tail``).
    """
    rss_file = tmp_path / f"rss-{time.monotonic_ns()}"
    argv = [sys.executable, "-c", _RSS_SHIM, str(rss_file), *fab_argv(args, config)]
    began = time.monotonic()
    proc = subprocess.Popen(argv, cwd=tmp_path, env=fab_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if tail:
            out, err = out[-tail:], err[-tail:]
        raise AssertionError(f"fab did not finish within {timeout}s:\n{out}\n{err}") from None
    seconds = time.monotonic() - began
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    return done, int(rss_file.read_text()) / 1024, seconds


def total_line(stdout: str) -> str:
    """The last ``N primes in [..]`` line of a primes run's output."""
    return [line for line in stdout.splitlines() if " primes in [" in line or " prime in [" in line][-1]


def count_of(stdout: str) -> int:
    """The prime count a primes run printed last."""
    return int(total_line(stdout).split()[0].replace(",", ""))


def assert_blocks_tile(db: Path, start: int, end: int) -> list:
    """One committed row per block, the blocks tiling [start, end] with no gap and no overlap."""
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        blocks = sorted(store.blocks(run_id), key=lambda b: b["lo"])
        assert store.integrity_ok()
    assert blocks[0]["lo"] == start and blocks[-1]["hi"] == end
    for before, after in zip(blocks, blocks[1:]):
        assert after["lo"] == before["hi"] + 1, (before, after)
    return blocks


def session_pids_running(host, needle: bytes) -> list:
    """PIDs under ``host``'s sshd whose command line contains ``needle``."""
    found = []
    for pid in host.session_pids():
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


class LinesStream(Stream):
    """A stream whose stdout is the given bytes."""

    def __init__(self, data: bytes):
        self._stderr_lines = []
        self._data = io.BytesIO(data)

    def readline(self, limit: int = -1) -> bytes:
        return self._data.readline(limit)

    def kill(self) -> None:
        pass
