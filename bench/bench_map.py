"""`fab map` (issue 12) against GNU parallel -S, xargs, multiprocessing.Pool and Dask, side by side.

    python bench/bench_map.py [--items 20000] [--range-end 1000000] [--dask-items 20000]
                              [--parallel-jobs 1000] [--rounds 2] [--profile] [--json FILE]
    python bench/bench_map.py --quick        # every part, small sizes, one round (~40 s)

Everything below runs in one invocation, each beowulf figure next to its baseline,
the pairs interleaved over ``--rounds`` rounds (the ratio is the median of the
per-round ratios: a pair shares the machine's load of its moment). The 1-minute
load average is printed next to every figure (the machine is shared).

1. SSH: 3 loopback sshd hosts from tests/harness, 2 slots each, provisioned with
   ``fab setup --no-numpy``. ``fab map --command 'echo {}' --args FILE`` over ITEMS
   lines (the numbers 1..ITEMS), whole command, against GNU ``parallel -S`` over a
   ControlMaster per host started beforehand with a clean shell (``SetEnv=SHLVL=1``,
   as bench_dispatch.py: bash then skips ~/.bashrc), ``3/sshlogin`` (as many in flight
   per host as beowulf pipelines), ``echo {}`` over the same lines. Per item, both
   are *marginal*: (T(N) - T(N/10)) / (N - N/10), so neither start-up (Python,
   Fabric, agents; perl) is charged; the whole-command time per item of fab map is
   printed too. Target: parallel's per item >= 10x fab map's.
2. Local default (``address = local``, the shipped hosts.ini, 2 slots): the same
   ``fab map`` over ITEMS lines against ``xargs -P 2 -n 1 echo < FILE``. Both whole
   command, throughput = items / wall. Target: fab map >= 0.5x xargs.
3. ``fab map --function TMP/benchfn.py:square --range 1:RANGE_END`` (``square(x)``
   returns ``x * x``) on the local default, whole command, against
   ``multiprocessing.Pool(2).map(square, range(1, RANGE_END + 1), chunksize=C)`` timed
   inside its process from Pool creation to the list returned (Python start-up not
   charged), once with Pool.map's default chunking (len / (4 * 2) rounded up:
   125,000 items a chunk for 1e6, 8 chunks) and once with 10,000 a chunk (100 chunks,
   enough to balance two workers, what a scheduler that sizes blocks would pick);
   the target is judged against the faster. Target: >= 0.2x. Also shown: Pool timed as
   its whole Python process (start-up included, like fab map's figure), and fab map's
   fixed cost (``--range 1:10``, whole command, median of 3). And against Dask:
   ``Client(LocalCluster(n_workers=2, threads_per_worker=1))``, ``client.map(square,
   ...)`` over DASK_ITEMS items and ``gather``, timed from the map call to the
   results (cluster start-up and a warm-up map not charged): per item, against fab
   map's whole-command per item of (3). Target: Dask's per item >= 100x fab map's.
4. The coordinator's peak RSS (VmHWM of the fab process, polled by bench/peak.py) in
   the runs of (3), for RANGE_END and RANGE_END / 10 items: target <= 300 MB for 1e6
   (and flat: the 1e6 figure close to the 1e5 one). Also printed: the CPU the fab
   process itself used (user + system, agents not included) per item.
H. The host side alone, no coordinator: map tasks of client/mapper.py through a
   real client/agent.py (2 slots, 3 tasks in flight, its own temporary workdir),
   function blocks of 10,000 range items (a ``range`` task answered in columns compressed on
   the host, ``"pack": "zlib"``, as fab map --function --range asks)
   and ``echo {}`` blocks of 100 items: the
   floor of (1)-(3) on this machine, to tell the coordinator's cost from the hosts'.

``--breakdown`` prints only (B): a ``--function`` item's cost by stage, one stage at a
time in this process, for the packed answer (what fab map asks for a function: host:
client/mapper.py's run, which makes the columns, their JSON and zlib, then the result
line's JSON; coordinator: the line's parse, the chunk's base64, inflate, JSON and check,
the commit of the host's bytes) and item by item (a block with a failure).

``--profile`` runs (3) and the SSH run of (1) once more under cProfile
(bench/profile_fab.py: every thread of the coordinator, CPU time) and prints the
top functions by own time. ``--json FILE`` also writes every figure as JSON.

Needs root, /usr/sbin/sshd, ssh and GNU parallel (tests/system-deps.sh) for (1),
and dask[distributed] for the Dask row (it is not a dependency of beowulf). If
``fab map`` does not exist in this checkout, the beowulf rows say so and the
baselines are still measured. Absolute times on a shared machine vary by 2x:
quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tabulate as tabulate_module  # noqa: E402
from peak import run_with_usage  # noqa: E402
from tabulate import tabulate  # noqa: E402

from harness import fab_argv, fab_env  # noqa: E402

HOSTS = 3
SLOTS = 2  # per sshd host: the machine has 2 cores, like the local default
FUNCTION_SOURCE = '"""bench_map.py\'s trivial function."""\n\n\ndef square(x):\n    return x * x\n'
POOL_CHUNK = 10_000
NL = b"\n"

POOL_CHILD = r"""
import json, sys, time, multiprocessing
from benchfn import square
n, chunk = int(sys.argv[1]), sys.argv[2]
began = time.perf_counter()
with multiprocessing.Pool(2) as pool:
    ready = time.perf_counter()
    out = pool.map(square, range(1, n + 1), chunksize=None if chunk == "default" else int(chunk))
done = time.perf_counter()
assert len(out) == n and out[-1] == n * n and out[0] == 1
default = -(-n // (2 * 4))  # Pool.map: divmod(len, 4 * processes), rounded up
print(json.dumps({"seconds": done - began, "map": done - ready,
                  "chunksize": default if chunk == "default" else int(chunk)}))
"""

DASK_CHILD = r"""
import json, sys, time, logging
from benchfn import square
from dask.distributed import Client, LocalCluster
logging.getLogger("distributed").setLevel(logging.ERROR)
n = int(sys.argv[1])
began = time.perf_counter()
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                  dashboard_address=None) as cluster, Client(cluster) as client:
    up = time.perf_counter()
    client.gather(client.map(square, range(-200, 0)))  # warm-up: workers import benchfn
    start = time.perf_counter()
    out = client.gather(client.map(square, range(1, n + 1)))
    done = time.perf_counter()
assert len(out) == n and out[-1] == n * n
print(json.dumps({"seconds": done - start, "startup": up - began, "per_item": (done - start) / n}))
"""


def load() -> float:
    """The 1-minute load average now."""
    return os.getloadavg()[0]


def fab_help_map() -> str:
    """``fab map --help`` of this checkout, or "" when there is no map task."""
    done = subprocess.run(fab_argv(["map", "--help"]), capture_output=True, text=True, env=fab_env(),
                          cwd=str(ROOT), timeout=120)
    return done.stdout if done.returncode == 0 and "--command" in done.stdout else ""


class Fab:
    """Runs ``fab map`` with the flags this checkout has (probed from its --help)."""

    def __init__(self, help_text: str, cwd: Path) -> None:
        self.help = help_text
        self.cwd = cwd

    def available(self) -> bool:
        return bool(self.help)

    def _has(self, flag: str) -> bool:
        return f"--{flag}" in self.help

    def run(self, args: list, db: Path, config: Path | None = None, export: Path | None = None,
            fresh: bool = True) -> dict:
        """One whole ``fab map`` command: wall, own peak RSS kB, own CPU s, stdout; raise on failure."""
        argv = ["map", *args, "--db", str(db)]
        if fresh and self._has("fresh"):
            argv.append("--fresh")
        if self._has("quiet"):
            argv.append("--quiet")
        if export is not None:
            argv += ["--export", str(export)]
        figures = {"load": load()}
        usage = run_with_usage(fab_argv(argv, config), self.cwd, fab_env())
        if usage["code"] != 0:
            raise SystemExit(f"fab {shlex.join(argv)} failed ({usage['code']}):\n{usage['stdout'][-3000:]}\n"
                             f"{usage['stderr'][-3000:]}")
        figures.update(usage)
        figures["argv"] = "fab " + shlex.join(argv)
        return figures


def check_lines(path: Path, count: int) -> None:
    """``path`` must hold the lines 1..count in order (the export of ``echo {}`` over them)."""
    got = path.read_text().split("\n")
    if got[-1] == "":
        got.pop()
    if got != [str(i) for i in range(1, count + 1)]:
        raise SystemExit(f"{path}: {len(got)} lines, expected 1..{count} in order (first {got[:3]})")


def write_items(folder: Path, count: int) -> Path:
    path = folder / f"items{count}.txt"
    path.write_text("".join(f"{i}\n" for i in range(1, count + 1)))
    return path


# ------------------------------------------------------------------ baselines


def xargs_echo(items: Path, count: int) -> dict:
    """``xargs -P 2 -n 1 echo < items``: wall seconds; its output is counted."""
    figures = {"load": load()}
    with open(items, "rb") as source:
        began = time.perf_counter()
        done = subprocess.run(["xargs", "-P", "2", "-n", "1", "echo"], stdin=source, capture_output=True,
                              check=True)
        figures["seconds"] = time.perf_counter() - began
    if done.stdout.count(b"\n") != count:
        raise SystemExit(f"xargs printed {done.stdout.count(NL)} lines, expected {count}")
    return figures


def child(script: str, fn_folder: Path, *args: str) -> dict:
    """Run a baseline script in its own Python with benchfn importable; its JSON line."""
    env = dict(os.environ, PYTHONPATH=str(fn_folder))
    figures = {"load": load()}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=str(fn_folder))
    figures["process_seconds"] = time.perf_counter() - began  # the whole child, Python start-up included
    if done.returncode != 0:
        raise SystemExit(f"baseline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return figures


def dask_available() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ the host side alone


def host_side(base: Path, fn_folder: Path, function_items: int, command_items: int) -> dict:
    """Map tasks straight into a real agent (no coordinator): seconds per item, function and command."""
    import hashlib

    work = base / "agentwork"
    shutil.copytree(ROOT / "client", work / "client", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256(FUNCTION_SOURCE.encode()).hexdigest()[:32]
    (work / "ship" / digest).mkdir(parents=True)
    shutil.copy(fn_folder / "benchfn.py", work / "ship" / digest / "benchfn.py")
    proc = subprocess.Popen([sys.executable, str(work / "client" / "agent.py"), "--host", "bench", "--slots",
                             str(SLOTS), "--beat", "3600", "--nice", "0", "--log-level", "warning"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        hello = json.loads(proc.stdout.readline())
        if hello.get("type") != "hello":
            raise SystemExit(f"agent: {hello}")
        run = "cd" * 16

        def blocks(total: int, size: int, args: dict):
            seq = 1
            while seq <= total:
                hi = min(total, seq + size - 1)
                if args["mode"] == "function":  # as fab map --range sends them: [SEQ, COUNT, START, STEP]
                    yield dict(args, run=run, range=[seq, hi - seq + 1, seq, 1], columns=True, pack="zlib")
                else:
                    yield dict(args, run=run, items=[{"seq": s, "value": str(s)} for s in range(seq, hi + 1)])
                seq = hi + 1

        def measure(tasks) -> tuple:
            tasks = list(tasks)
            window, sent, done_items = SLOTS + 1, 0, 0
            began = time.perf_counter()
            for task in tasks[:window]:
                proc.stdin.write(json.dumps({"type": "task", "id": sent, "job": "map", "args": task}).encode()
                                 + b"\n")
                sent += 1
            proc.stdin.flush()
            received = 0
            while received < len(tasks):
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit("agent closed its stdout")
                if not line.startswith(b'{"type":"result"'):
                    continue
                message = json.loads(line)
                if not message["ok"]:
                    raise SystemExit(f"map task failed: {message.get('error')}")
                answer = message["result"]
                done_items += answer["count"] if answer.get("pack") else \
                    sum(1 for item in answer["items"] if item["ok"])
                received += 1
                if sent < len(tasks):
                    proc.stdin.write(json.dumps({"type": "task", "id": sent, "job": "map",
                                                 "args": tasks[sent]}).encode() + b"\n")
                    proc.stdin.flush()
                    sent += 1
            return time.perf_counter() - began, done_items

        function = {"mode": "function", "function": "benchfn:square", "ship": digest}
        command = {"mode": "command", "command": "echo {}"}
        measure(blocks(2000, 1000, function))  # warm-up: workers import the module
        figures = {"load": load()}
        seconds, ok = measure(blocks(function_items, 10_000, function))
        if ok != function_items:
            raise SystemExit(f"host side: {ok} of {function_items} function items ok")
        figures["function_per_item"] = seconds / function_items
        figures["command_load"] = load()
        seconds, ok = measure(blocks(command_items, 100, command))
        if ok != command_items:
            raise SystemExit(f"host side: {ok} of {command_items} command items ok")
        figures["command_per_item"] = seconds / command_items
        return figures
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ where an item's time goes


def breakdown(base: Path, fn_folder: Path, count: int = 20_000, repeat: int = 5) -> dict:
    """Per item, in this process, one stage at a time, of a ``--function`` block of ``count`` range
    items (best of ``repeat``): the host's part (the bare calls, client/mapper.py's run, the result
    line's JSON) and the coordinator's (parse, MapJob's check, the rows, the store's executemany)."""
    import hashlib
    import sqlite3
    import types

    work = base / "breakdown"
    digest = hashlib.sha256(FUNCTION_SOURCE.encode()).hexdigest()[:32]
    (work / "ship" / digest).mkdir(parents=True)
    shutil.copy(fn_folder / "benchfn.py", work / "ship" / digest / "benchfn.py")
    os.environ["BEOWULF_MAP_WORKDIR"] = str(work)  # read by client/mapper.py when imported
    from client import mapper
    from cluster.jobs.map import MapJob, _unpack
    from cluster.mapstore import ITEM_COLUMNS, MIGRATIONS

    mapper.WORKDIR = str(work)
    args = {"run": "ef" * 16, "mode": "function", "function": "benchfn:square", "ship": digest,
            "range": [1, count, 1, 1]}
    square = mapper.load_function(digest, "benchfn:square")
    stub = types.SimpleNamespace(spec=types.SimpleNamespace(stdout_cap=mapper.DEFAULT_STDOUT_CAP))
    conn = sqlite3.connect(str(work / "s.db"))
    for version in MIGRATIONS:
        for statement in version:
            conn.execute(statement)
    conn.execute("CREATE TABLE payloads (lo INTEGER PRIMARY KEY, payload BLOB)")
    state: dict = {}

    columnar = dict(args, columns=True, pack="zlib")

    def run_columns():
        state["cresult"] = mapper.run(columnar)

    def encode_columns():
        state["cline"] = json.dumps({"type": "result", "id": 7, "ok": True, "elapsed": 1.0,
                                     "result": state["cresult"]}).encode() + b"\n"

    def parse_columns():
        state["cmessage"] = json.loads(state["cline"].decode("utf-8"))

    def check_columns():  # base64, bounded inflate, json.loads, every column checked
        state["ccolumns"] = _unpack(state["cmessage"]["result"], range(1, count + 1), mapper.DEFAULT_STDOUT_CAP)
        state["chunk"] = state["ccolumns"][-1]  # the host's bytes, stored as they came

    def insert_chunk():  # the block's commit: one map_chunks row and the block's payload
        with conn:
            conn.execute("DELETE FROM map_chunks")
            conn.execute("DELETE FROM payloads")
        with conn:
            conn.execute("INSERT INTO map_chunks (run_id, lo, seq, count, host, slot) VALUES (1, 1, 1, ?, 'h', 1)",
                         (count,))
            conn.execute("INSERT INTO payloads VALUES (1, ?)", (state["chunk"],))

    def bare():
        return [square(v) for v in range(1, count + 1)]

    def run():
        state["result"] = mapper.run(args)

    def encode():
        state["line"] = json.dumps({"type": "result", "id": 7, "ok": True, "elapsed": 1.0,
                                    "result": state["result"]}).encode() + b"\n"

    def parse():
        state["message"] = json.loads(state["line"].decode("utf-8"))

    def check():
        state["checked"] = MapJob._check_function(stub, state["message"]["result"]["items"], range(1, count + 1))

    def rows():  # MapJob.decide -> _row for an item ok at its first try (mapstore.ITEM_COLUMNS)
        state["rows"] = [(e[0], e[0], None, "ok", 0, None, b"", 0, b"", "h", e[7], e[8], 1, e[9], None, 0, e[11], 1)
                         for e in state["checked"]]

    def insert():  # Store.commit_blocks -> store._insert_many, one transaction a block
        with conn:
            conn.execute("DELETE FROM map_items")
        with conn:
            conn.executemany(f"INSERT INTO map_items (run_id, lo{''.join(', ' + c for c in ITEM_COLUMNS)}) "
                             f"VALUES (1, 1{', ?' * len(ITEM_COLUMNS)})", state["rows"])

    stages = [("host: the bare calls, square(v) for v in the range", bare),
              ("packed: host: client/mapper.py run() of a range task, packed (columns, JSON, zlib)", run_columns),
              ("packed: host: the result message's JSON", encode_columns),
              ("packed: coordinator: json.loads of the result line", parse_columns),
              ("packed: coordinator: cluster/jobs/map.py _unpack (base64, inflate, JSON, checks)", check_columns),
              ("packed: coordinator: commit one chunk row + the host's bytes (+ DELETE)", insert_chunk),
              ("items: host: client/mapper.py run() of a range task, item by item", run),
              ("items: host: the result message's JSON", encode),
              ("items: coordinator: json.loads of the result line", parse),
              ("items: coordinator: MapJob._check_function", check),
              ("items: coordinator: decide's rows", rows),
              ("items: coordinator: executemany into map_items (+ DELETE)", insert)]
    out = {"load": load(), "items": count, "bytes_per_item": 0.0, "stages": []}
    for label, stage in stages:
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            stage()
            best = min(best, time.perf_counter() - began)
        out["stages"].append([label, best / count])
    out["bytes_per_item"] = len(state["line"]) / count
    out["columns_bytes_per_item"] = len(state["cline"]) / count
    conn.close()
    return out


# ------------------------------------------------------------------ the SSH part


def ssh_part(base: Path, fab: Fab, items: Path, small: Path, n: int, n_small: int, jobs: int, rounds: int,
             profile: bool) -> dict:
    """Part 1: fab map vs GNU parallel -S on 3 loopback sshd hosts."""
    import bench_dispatch as dispatch

    from harness import SshCluster, run_fab

    out: dict = {"fab": [], "fab_small": [], "parallel": [], "parallel_small": []}
    cluster = SshCluster(base / "cluster", HOSTS)
    dispatch.accept_shlvl(cluster)
    with cluster:
        inventory = cluster.write_inventory(base / "ssh-hosts.ini", extra={h.name: {"slots": SLOTS}
                                                                          for h in cluster.hosts})
        config = cluster.write_fabric_config(base / "fabric.yaml")
        done = run_fab(["setup", "--inventory", inventory, "--no-numpy"], config=config, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"fab setup failed:\n{done.stdout}\n{done.stderr}")
        jobs_lines = write_items(base, jobs)
        jobs_small = max(6, jobs // 10)
        jobs_small_lines = write_items(base, jobs_small)
        masters = dispatch.start_masters(cluster, base, clean=True)
        try:
            dispatch.check_shell(cluster, ["-o", f"ControlPath={masters[0]}"], clean=True)
            parallel_echo(cluster, masters, jobs_small_lines, jobs_small)  # warm-up
            if fab.available():
                fab.run(["--command", "echo {}", "--args", str(small), "--inventory", str(inventory)],
                        base / "ssh-warm.db", config)
            for attempt in range(rounds):
                out["parallel_small"].append(parallel_echo(cluster, masters, jobs_small_lines, jobs_small))
                out["parallel"].append(parallel_echo(cluster, masters, jobs_lines, jobs))
                if fab.available():
                    common = ["--command", "echo {}", "--inventory", str(inventory)]
                    out["fab_small"].append(fab.run([*common, "--args", str(small)], base / f"ssh-s{attempt}.db",
                                                    config))
                    out["fab"].append(fab.run([*common, "--args", str(items)], base / f"ssh-{attempt}.db", config))
        finally:
            dispatch.stop_masters(cluster, masters)
        if fab.available():
            export = base / "ssh-export.txt"
            fab.run(["--command", "echo {}", "--args", str(items), "--inventory", str(inventory)],
                    base / "ssh-0.db", config, export=export, fresh=False)
            check_lines(export, n)
            if profile:
                out["profile"] = profile_fab(["map", "--command", "echo {}", "--args", str(items), "--inventory",
                                              str(inventory), "--db", str(base / "ssh-prof.db")], fab, config)
    return out


def parallel_echo(cluster, masters: list, items: Path, count: int) -> dict:
    """GNU parallel -S (3 per host, over the ControlMasters) running ``echo {}`` per line of ``items``."""
    import bench_dispatch as dispatch

    ssh = " ".join(shlex.quote(part) for part in dispatch.ssh_base(cluster))
    argv = ["parallel", "--will-cite"]
    for host, path in zip(cluster.hosts, masters):
        argv += ["-S", f"{SLOTS + 1}/{ssh} -o ControlMaster=no -o ControlPath={shlex.quote(str(path))} "
                       f"-p {host.port} {cluster.user}@{host.ip}"]
    argv += ["echo", "{}", "::::", str(items)]
    figures = {"load": load()}
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=3600)
    figures["seconds"] = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"parallel failed ({done.returncode}): {done.stderr[-2000:]!r}")
    if sorted(done.stdout.split()) != sorted(str(i).encode() for i in range(1, count + 1)):
        raise SystemExit(f"parallel printed {done.stdout.count(NL)} lines, expected 1..{count}")
    return figures


# ------------------------------------------------------------------ profiling


def profile_fab(argv: list, fab: Fab, config: Path | None = None) -> str:
    """Run ``fab ARGV`` once under bench/profile_fab.py (cProfile, every thread, CPU time): its report."""
    command = [sys.executable, str(ROOT / "bench" / "profile_fab.py"), "--top", "30", "--"]
    if config is not None:
        command += ["-f", str(config)]
    if "--fresh" in fab.help:
        argv = [*argv, "--fresh"]
    if "--quiet" in fab.help:
        argv = [*argv, "--quiet"]
    done = subprocess.run(command + argv, capture_output=True, text=True, cwd=str(fab.cwd), env=fab_env(),
                          timeout=3600)
    if done.returncode != 0:
        return f"(profile run failed, exit {done.returncode}: {done.stderr[-2000:]})"
    return done.stdout


# ------------------------------------------------------------------ report


def med(values):
    return statistics.median(values) if values else None


def judged(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "MISSED"


def marginal(big: list, small: list, n: int, n_small: int) -> list:
    """Per item with the start-up subtracted, per round: (T(N) - T(N_small)) / (N - N_small)."""
    return [max(b["seconds"] - s["seconds"], 1e-9) / (n - n_small) for b, s in zip(big, small)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000, help="items of the echo runs (default 20000)")
    parser.add_argument("--range-end", type=int, default=1_000_000, help="--range 1:END of (3) (default 1e6)")
    parser.add_argument("--dask-items", type=int, default=20_000, help="items mapped by Dask (default 20000)")
    parser.add_argument("--parallel-jobs", type=int, default=1000,
                        help="GNU parallel -S: lines (default 1000; per item is marginal, so fewer suffice)")
    parser.add_argument("--host-items", type=int, default=200_000, help="(H) function items (default 2e5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each pair (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run (~40 s)")
    parser.add_argument("--skip-ssh", action="store_true", help="leave out part 1 (no sshd hosts)")
    parser.add_argument("--profile", action="store_true", help="also profile fab map's coordinator (cProfile)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--breakdown", action="store_true",
                        help="only the per-stage cost of a --function item, in this process (B)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.range_end, args.dask_items, args.parallel_jobs = 1000, 20_000, 500, 60
        args.host_items, args.rounds = 20_000, 1
    n, n_small = args.items, max(10, args.items // 10)
    r_end, r_small = args.range_end, max(10, args.range_end // 10)
    needs = ["xargs"] + ([] if args.skip_ssh else ["parallel", "ssh"])
    missing = [tool for tool in needs if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (sh tests/system-deps.sh)")

    figures: dict = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
                     "sizes": {"items": n, "items_small": n_small, "range_end": r_end, "range_small": r_small,
                               "dask_items": args.dask_items, "parallel_jobs": args.parallel_jobs,
                               "rounds": args.rounds}}
    with tempfile.TemporaryDirectory(prefix="bench_map.") as temp:
        base = Path(temp)
        fn_folder = base / "fn"
        fn_folder.mkdir()
        (fn_folder / "benchfn.py").write_text(FUNCTION_SOURCE)
        items, small = write_items(base, n), write_items(base, n_small)
        if args.breakdown:
            out = breakdown(base, fn_folder)
            print(f"B. a --function item's cost by stage, {out['items']:,} range items a block, best of 5, "
                  f"one process (load {out['load']:.1f}); result line "
                  f"{out['columns_bytes_per_item']:.1f} bytes/item packed (what fab map asks for), "
                  f"{out['bytes_per_item']:.0f} item by item")
            print(tabulate([[label, f"{seconds * 1e6:.2f}"] for label, seconds in out["stages"]],
                           headers=["stage", "us/item"], colalign=("left", "right")))
            if args.json:
                Path(args.json).write_text(json.dumps({"breakdown": out}, indent=1) + "\n")
            return
        fab = Fab(fab_help_map(), base)
        figures["fab_map_available"] = fab.available()
        if not fab.available():
            print("fab map: not in this checkout (no `fab map` task): beowulf rows are n/a, baselines only\n")

        # H. the host side alone
        figures["host"] = host_side(base, fn_folder, args.host_items, max(200, n // 10))

        # 1. SSH
        if not args.skip_ssh:
            figures["ssh"] = ssh_part(base, fab, items, small, n, n_small, args.parallel_jobs, args.rounds,
                                      args.profile)

        # 2. local echo, 3. local function (+ 4. RSS), interleaved with their baselines
        local = {"fab_echo": [], "xargs": [], "fab_fn": [], "fab_fn_small": [], "pool_default": [],
                 "pool_chunk": [], "dask": []}
        fn = f"{fn_folder / 'benchfn.py'}:square"
        if fab.available():  # warm-up: the local agent, page cache
            fab.run(["--command", "echo {}", "--args", str(small)], base / "warm.db")
        xargs_echo(small, n_small)
        for attempt in range(args.rounds):
            local["xargs"].append(xargs_echo(items, n))
            if fab.available():
                local["fab_echo"].append(fab.run(["--command", "echo {}", "--args", str(items)],
                                                 base / f"echo{attempt}.db"))
            local["pool_default"].append(child(POOL_CHILD, fn_folder, str(r_end), "default"))
            local["pool_chunk"].append(child(POOL_CHILD, fn_folder, str(r_end), str(min(POOL_CHUNK, r_end))))
            if fab.available():
                local["fab_fn"].append(fab.run(["--function", fn, "--range", f"1:{r_end}"], base / f"fn{attempt}.db"))
                local["fab_fn_small"].append(fab.run(["--function", fn, "--range", f"1:{r_small}"],
                                                     base / f"fns{attempt}.db"))
        if fab.available():  # fab map's fixed cost: a run of 10 items, whole command, median of 3
            local["fab_fixed"] = [fab.run(["--function", fn, "--range", "1:10"], base / f"fixed{i}.db")
                                  for i in range(3)]
        if dask_available():
            local["dask"].append(child(DASK_CHILD, fn_folder, str(args.dask_items)))
        if fab.available():
            export = base / "echo-export.txt"
            fab.run(["--command", "echo {}", "--args", str(items)], base / "echo0.db", export=export, fresh=False)
            check_lines(export, n)
            if args.profile:
                local["profile_fn"] = profile_fab(["map", "--function", fn, "--range", f"1:{r_end}", "--db",
                                                   str(base / "prof.db")], fab)
        figures["local"] = local

    report(figures, n, n_small, r_end, r_small, args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str) + "\n")


def report(figures: dict, n: int, n_small: int, r_end: int, r_small: int, args) -> None:
    """Print the tables and the verdicts; record the summary in ``figures["summary"]``."""
    tabulate_module.PRESERVE_WHITESPACE = True  # the rows "   the same, ..." stay indented

    def verdict(ok):  # --quick sizes are start-up bound: their ratios say nothing of the targets
        return "quick run, not judged" if args.quick and ok is not None else judged(ok)
    summary = {}
    rows = []
    ssh = figures.get("ssh")
    if ssh:
        par = marginal(ssh["parallel"], ssh["parallel_small"], args.parallel_jobs, max(6, args.parallel_jobs // 10))
        par_med = med(par)
        loads = ", ".join(f"{f['load']:.1f}" for f in ssh["parallel"])
        rows.append(["1. GNU parallel -S + ControlMaster (clean shell), echo {}, marginal",
                     args.parallel_jobs, f"{par_med * 1e3:.3f} ms", "", loads])
        summary["parallel_ms_per_item"] = par_med * 1e3
        if ssh["fab"]:
            fab_m = marginal(ssh["fab"], ssh["fab_small"], n, n_small)
            ratios = [p / f for p, f in zip(par, fab_m)]
            whole = med([f["seconds"] / n for f in ssh["fab"]])
            rows.append(["1. fab map --command 'echo {}', 3 sshd hosts, marginal", n,
                         f"{med(fab_m) * 1e3:.3f} ms", f"{med(ratios):.1f}x lower (>= 10x: "
                         f"{verdict(med(ratios) >= 10)})", ", ".join(f"{f['load']:.1f}" for f in ssh["fab"])])
            rows.append(["  - the same, whole command / items", n, f"{whole * 1e3:.3f} ms",
                         f"{par_med / whole:.1f}x lower", ""])
            summary.update(ssh_ms_per_item=med(fab_m) * 1e3, ssh_whole_ms_per_item=whole * 1e3,
                           ssh_ratio=med(ratios), ssh_ratios=ratios, ssh_met=med(ratios) >= 10)
        else:
            rows.append(["1. fab map, 3 sshd hosts", n, "n/a", "fab map not available", ""])
    local = figures["local"]
    xargs = [n / f["seconds"] for f in local["xargs"]]
    rows.append(["2. xargs -P 2 -n 1 echo", n, f"{med(xargs):,.0f} items/s ({1e3 / med(xargs):.3f} ms)", "",
                 ", ".join(f"{f['load']:.1f}" for f in local["xargs"])])
    summary["xargs_items_per_s"] = med(xargs)
    if local["fab_echo"]:
        fab_rates = [n / f["seconds"] for f in local["fab_echo"]]
        ratios = [f / x for f, x in zip(fab_rates, xargs)]
        rows.append(["2. fab map --command 'echo {}', local default", n,
                     f"{med(fab_rates):,.0f} items/s ({1e3 / med(fab_rates):.3f} ms)",
                     f"{med(ratios):.2f}x xargs (>= 0.5x: {verdict(med(ratios) >= 0.5)})",
                     ", ".join(f"{f['load']:.1f}" for f in local["fab_echo"])])
        summary.update(local_echo_items_per_s=med(fab_rates), local_echo_ratio=med(ratios),
                       local_echo_ratios=ratios, local_echo_met=med(ratios) >= 0.5)
    else:
        rows.append(["2. fab map, local default", n, "n/a", "fab map not available", ""])
    pool_default = [f["seconds"] / r_end for f in local["pool_default"]]
    pool_chunk = [f["seconds"] / r_end for f in local["pool_chunk"]]
    pool_best = [min(a, b) for a, b in zip(pool_default, pool_chunk)]
    chunk_default = local["pool_default"][0]["chunksize"]
    rows.append([f"3. Pool(2).map, default chunksize ({chunk_default:,})", r_end,
                 f"{med(pool_default) * 1e6:.2f} us", "", ", ".join(f"{f['load']:.1f}" for f in local["pool_default"])])
    rows.append([f"3. Pool(2).map, chunksize {local['pool_chunk'][0]['chunksize']:,}", r_end,
                 f"{med(pool_chunk) * 1e6:.2f} us", "", ", ".join(f"{f['load']:.1f}" for f in local["pool_chunk"])])
    pool_process = [min(a["process_seconds"], b["process_seconds"]) / r_end
                    for a, b in zip(local["pool_default"], local["pool_chunk"])]
    rows.append(["  - Pool's best, whole Python process (start-up included)", r_end,
                 f"{med(pool_process) * 1e6:.2f} us", "", ""])
    summary.update(pool_default_us=med(pool_default) * 1e6, pool_chunk_us=med(pool_chunk) * 1e6,
                   pool_process_us=med(pool_process) * 1e6)
    if local["dask"]:
        dask = local["dask"][0]
        rows.append(["3. Dask LocalCluster(2 workers) client.map, per item", args.dask_items,
                     f"{dask['per_item'] * 1e3:.3f} ms", f"(cluster start-up {dask['startup']:.1f} s, not charged)",
                     f"{dask['load']:.1f}"])
        summary["dask_ms_per_item"] = dask["per_item"] * 1e3
    if local["fab_fn"]:
        fab_fn = [f["seconds"] / r_end for f in local["fab_fn"]]
        ratios = [p / f for p, f in zip(pool_best, fab_fn)]
        fn_marginal = marginal(local["fab_fn"], local["fab_fn_small"], r_end, r_small)
        rows.append([f"3. fab map --function square --range 1:{r_end}, local default, whole", r_end,
                     f"{med(fab_fn) * 1e6:.2f} us", f"{med(ratios):.2f}x Pool's best (>= 0.2x: "
                     f"{verdict(med(ratios) >= 0.2)})", ", ".join(f"{f['load']:.1f}" for f in local["fab_fn"])])
        rows.append(["  - the same, marginal (start-up subtracted)", r_end, f"{med(fn_marginal) * 1e6:.2f} us",
                     f"{med(pool_best) / med(fn_marginal):.2f}x Pool's best", ""])
        rows.append(["  - the same against Pool's whole process", r_end, "",
                     f"{med(pool_process) / med(fab_fn):.2f}x", ""])
        fixed = med([f["seconds"] for f in local.get("fab_fixed", [])]) if local.get("fab_fixed") else None
        if fixed is not None:
            rows.append(["  - fab map's fixed cost: --range 1:10, whole command, median of 3", 10, f"{fixed:.2f} s",
                         f"{fixed / med([f['seconds'] for f in local['fab_fn']]):.0%} of the run above",
                         f"{local['fab_fixed'][0]['load']:.1f}"])
        summary.update(fn_us=med(fab_fn) * 1e6, fn_marginal_us=med(fn_marginal) * 1e6, pool_ratio=med(ratios),
                       pool_ratios=ratios, pool_met=med(ratios) >= 0.2, fixed_seconds=fixed,
                       pool_process_ratio=med(pool_process) / med(fab_fn))
        if local["dask"]:
            ratio = local["dask"][0]["per_item"] / med(fab_fn)
            rows.append(["3. Dask per item / fab map per item", "", "", f"{ratio:,.0f}x (>= 100x: "
                         f"{verdict(ratio >= 100)})", ""])
            summary.update(dask_ratio=ratio, dask_met=ratio >= 100)
    else:
        rows.append(["3. fab map --function, local default", r_end, "n/a", "fab map not available", ""])
    print(tabulate(rows, headers=["measured", "items", "per item", "ratio (target)", "load"],
                   colalign=("left", "right", "right", "left", "left")))
    print()

    host = figures["host"]
    print(f"H. host side alone (client/agent.py + mapper, no coordinator, {SLOTS} slots, 3 tasks in flight): "
          f"function {host['function_per_item'] * 1e6:.2f} us/item in blocks of 10,000 (load {host['load']:.1f}); "
          f"echo {{}} {host['command_per_item'] * 1e3:.3f} ms/item in blocks of 100 (load {host['command_load']:.1f})")
    summary.update(host_function_us=host["function_per_item"] * 1e6, host_command_ms=host["command_per_item"] * 1e3)
    if local["fab_fn"]:
        big, little = local["fab_fn"], local["fab_fn_small"]
        peak = max(f["own_kb"] for f in big) / 1024
        peak_small = max(f["own_kb"] for f in little) / 1024
        cpu = med([f["own_cpu"] / r_end for f in big])
        print(f"4. coordinator (fab process) peak RSS: {peak:.0f} MB for {r_end:,} items, {peak_small:.0f} MB for "
              f"{r_small:,}: <= 300 MB {verdict(peak <= 300) if r_end >= 1_000_000 else '(judged at 1e6 only)'}; "
              f"its own CPU {cpu * 1e6:.2f} us/item of {med([f['seconds'] / r_end for f in big]) * 1e6:.2f} us wall")
        summary.update(rss_mb=peak, rss_small_mb=peak_small, coordinator_cpu_us=cpu * 1e6,
                       rss_met=peak <= 300 if r_end >= 1_000_000 else None)
        if local["fab_echo"]:
            cpu = med([f["own_cpu"] / n for f in local["fab_echo"]])
            print(f"   local echo: coordinator CPU {cpu * 1e3:.3f} ms/item, peak RSS "
                  f"{max(f['own_kb'] for f in local['fab_echo']) / 1024:.0f} MB")
        if ssh and ssh["fab"]:
            cpu = med([f["own_cpu"] / n for f in ssh["fab"]])
            print(f"   ssh echo: coordinator CPU {cpu * 1e3:.3f} ms/item, peak RSS "
                  f"{max(f['own_kb'] for f in ssh['fab']) / 1024:.0f} MB")
    print("\ncommands (TMP = a temporary folder):")
    examples = []
    if ssh and ssh["fab"]:
        examples.append(ssh["fab"][0]["argv"])
    for key in ("fab_echo", "fab_fn"):
        if local[key]:
            examples.append(local[key][0]["argv"])
    for line in examples:
        print("  " + line)
    figures["summary"] = summary
    print("\nsummary " + json.dumps(summary, default=str))
    for key, label in (("profile", "SSH echo run"), ):
        if ssh and ssh.get(key):
            print(f"\ncProfile of fab map's coordinator, {label} (CPU time of every thread, by own time):")
            print(ssh[key])
    if local.get("profile_fn"):
        print("\ncProfile of fab map's coordinator, --function over the range (CPU time of every thread):")
        print(local["profile_fn"])


if __name__ == "__main__":
    main()
