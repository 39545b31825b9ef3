"""bench/bench_map.py --quick runs to the end and its output parses (a smoke test: no timing asserted).

The figures themselves belong in BENCHMARKS.md, measured on an idle machine; here only
their presence, their sign and the shape of the report are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from harness import REPO_ROOT, in_ci, require_sshd

BENCH = REPO_ROOT / "bench" / "bench_map.py"


def _dask_importable() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_bench_map_quick_runs_and_its_report_parses(tmp_path):
    require_sshd()
    for tool in ("parallel", "xargs", "ssh"):
        if shutil.which(tool) is None:
            message = f"needs {tool} (sh tests/system-deps.sh)"
            pytest.fail(message) if in_ci() else pytest.skip(message)
    if in_ci():  # the Dask baseline is part of the benchmark: in CI its absence is a failure
        assert _dask_importable(), "dask[distributed] is not installed (dev requirements)"
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=str(REPO_ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    figures = json.loads(out.read_text())
    summary = figures["summary"]
    lines = done.stdout.splitlines()
    printed = json.loads(next(line for line in lines if line.startswith("summary "))[len("summary "):])
    assert printed == json.loads(json.dumps(summary))
    for key in ("parallel_ms_per_item", "xargs_items_per_s", "pool_default_us", "pool_chunk_us",
                "host_function_us", "host_command_ms"):
        assert summary[key] > 0, key
    if _dask_importable():
        assert summary["dask_ms_per_item"] > 0
    header = next(i for i, line in enumerate(lines) if line.startswith("measured"))
    assert set(lines[header + 1]) <= {"-", " "}
    rows = lines[header + 2:lines.index("", header)]
    for label in ("1. GNU parallel -S", "2. xargs -P 2 -n 1 echo", "3. Pool(2).map, default chunksize"):
        assert any(row.startswith(label) for row in rows), label

    # Once this checkout has `fab map`, its rows must be measured, not n/a.
    if (REPO_ROOT / "tasks" / "map.py").exists():
        assert figures["fab_map_available"], done.stdout[-3000:]
        for key in ("ssh_ms_per_item", "ssh_ratio", "local_echo_ratio", "fn_us", "pool_ratio", "rss_mb",
                    "coordinator_cpu_us"):
            assert summary[key] > 0, key
        for key in ("ssh_met", "local_echo_met", "pool_met"):
            assert isinstance(summary[key], bool), key
        assert any(line.startswith("4. coordinator (fab process) peak RSS") for line in lines)
        assert any("fab map --function" in line and "--range 1:20000" in line for line in lines)
