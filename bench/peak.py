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
