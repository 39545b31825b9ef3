"""Dispatch speed of client/agent.py: trivial "noop" tasks through agent + worker, locally.

    python bench/bench_agent.py [--tasks 20000] [--slots 2]

Prints the round trip per task with 1 task in flight, the throughput with slots+1
(the coordinator's pipelining) and 32 in flight, and ratios against two baselines
measured in the same run: the floor (a round trip through a bare Python echo
process, the cost of the pipes alone) and a new Python process per task (what a
process-per-block dispatcher pays before any SSH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "client" / "agent.py"
ECHO = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line)\n" \
       "    sys.stdout.buffer.flush()\n"


def start_agent(slots: int) -> subprocess.Popen:
    """Start an agent with ``slots`` workers and wait for its hello."""
    proc = subprocess.Popen(
        [sys.executable, str(AGENT), "--host", "bench", "--slots", str(slots), "--beat", "3600",
         "--nice", "0", "--log-level", "warning"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    hello = json.loads(proc.stdout.readline())
    assert hello["type"] == "hello", hello
    return proc


def task_line(number: int) -> bytes:
    """A noop task line with id ``number``."""
    return b'{"type":"task","id":%d,"job":"noop","args":{}}\n' % number


def read_result(proc: subprocess.Popen) -> dict:
    """The next result message (beats skipped)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("agent closed its stdout")
        if line.startswith(b'{"type":"result"'):
            message = json.loads(line)
            if not message["ok"]:
                raise RuntimeError(message["error"])
            return message


def run_window(proc: subprocess.Popen, tasks: int, window: int) -> float:
    """Seconds to run ``tasks`` noop tasks keeping ``window`` of them in flight."""
    sent = 0
    started = time.perf_counter()
    while sent < min(window, tasks):
        proc.stdin.write(task_line(sent))
        sent += 1
    proc.stdin.flush()
    for _ in range(tasks):
        read_result(proc)
        if sent < tasks:
            proc.stdin.write(task_line(sent))
            proc.stdin.flush()
            sent += 1
    return time.perf_counter() - started


def echo_round_trip(rounds: int) -> float:
    """Seconds per round trip of one line through a bare Python echo process."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    line = task_line(0)
    started = time.perf_counter()
    for _ in range(rounds):
        proc.stdin.write(line)
        proc.stdin.flush()
        proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.stdin.close()
    proc.wait()
    return elapsed / rounds


def spawn_per_task(rounds: int) -> float:
    """Seconds per task when each task is a new Python process."""
    started = time.perf_counter()
    for _ in range(rounds):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - started) / rounds


def main() -> None:
    """Run the measurements, interleaved over a few rounds, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slots", type=int, default=2)
    opts = parser.parse_args()
    window = opts.slots + 1
    samples: dict = {"one": [], "piped": [], "wide": [], "floor": [], "spawn": []}

    proc = start_agent(opts.slots)
    run_window(proc, 500, window)  # warm up: workers started, caches filled
    for _ in range(opts.rounds):  # interleaved: the machine's load drifts between runs
        samples["floor"].append(echo_round_trip(opts.tasks))
        samples["one"].append(run_window(proc, opts.tasks, 1) / opts.tasks)
        samples["piped"].append(run_window(proc, opts.tasks, window) / opts.tasks)
        samples["wide"].append(run_window(proc, opts.tasks, 32) / opts.tasks)
        samples["spawn"].append(spawn_per_task(10))
    proc.stdin.close()
    proc.wait(5)

    one, piped, wide, floor, spawn = (statistics.median(samples[key]) for key in
                                      ("one", "piped", "wide", "floor", "spawn"))
    print(f"noop tasks through agent + worker, {opts.slots} slots, median of {opts.rounds} "
          f"rounds of {opts.tasks}")
    print(f"  1 in flight:                {one * 1e6:8.1f} us per task ({1 / one:6.0f} tasks/s)")
    print(f"  {window} in flight (slots + 1):   {1 / piped:8.0f} tasks/s "
          f"({piped * 1e6:.1f} us per task)")
    print(f"  32 in flight:               {1 / wide:8.0f} tasks/s")
    print(f"baseline: bare pipe echo      {floor * 1e6:8.1f} us per round trip")
    print(f"baseline: process per task    {spawn * 1e3:8.1f} ms per task")
    print(f"ratio agent round trip / pipe echo round trip:          {one / floor:6.1f}x")
    print(f"ratio process per task / agent per task ({window} in flight): {spawn / piped:6.0f}x")


if __name__ == "__main__":
    main()
