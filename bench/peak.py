"""Shared by the bench scripts: run a command and follow the peak resident set of its process.

Imported by the scripts of this folder (``python bench/bench_x.py`` puts bench/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path


def vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid`` so far, in kB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_with_peak(argv: list, cwd: Path, env: dict) -> tuple[float, int, int, int, str, str]:
    """Run ``argv`` to its end, polling its VmHWM every 20 ms: (wall seconds, its own peak RSS kB,
    ru_maxrss of the reaped process kB, exit code, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        own = 0
        while True:  # poll the peak RSS until it exits; reap it with its resource usage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            own = max(own, vm_hwm(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    return seconds, own, usage.ru_maxrss, proc.returncode, stdout, stderr


def own_cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` itself used so far, its children not included (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_with_usage(argv: list, cwd: Path, env: dict) -> dict:
    """Like run_with_peak, also following the process's own CPU time (polled every 20 ms, so the
    last 20 ms may be missed): {seconds, own_kb, tree_kb, own_cpu, code, stdout, stderr}."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        own, cpu = 0, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            own = max(own, vm_hwm(proc.pid))
            cpu = max(cpu, own_cpu(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "own_kb": own, "tree_kb": usage.ru_maxrss, "own_cpu": cpu,
                "code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace")}
