"""client/agent.py with real processes: protocol, workers, cancel, crashes, no orphans.

Each test starts ``python client/agent.py`` with pipes and talks JSON lines to it, as
the coordinator does. Worker pids come from the built-in "echo" job (it returns
``os.getpid()``); "gone" means no such process, or a zombie nobody reaped yet.
"""

from __future__ import annotations

import ast
import base64
import glob
import hashlib
import importlib.util
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "client"
AGENT = CLIENT / "agent.py"
# Generous: the test machine is shared and often loaded.
TIMEOUT = 20.0


def find_python36():
    """A Python 3.6 interpreter (the oldest the client supports), or None."""
    candidates = [os.environ.get("BEOWULF_PYTHON36"), shutil.which("python3.6")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == b"(3, 6)":
            return candidate
    return None


def load_client_module(name: str):
    """Import client/<name>.py as a private module (client/ is not on sys.path here)."""
    spec = importlib.util.spec_from_file_location("_agent_test_" + name, CLIENT / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gone(pid: int) -> bool:
    """True when process ``pid`` no longer runs (absent, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids, seconds: float) -> list:
    """Wait up to ``seconds`` for every pid to be gone; return those still running."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if not gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


class Agent:
    """A running agent: send messages, receive them with timeouts; stderr is collected."""

    def __init__(self, *extra: str, slots: int = 2, beat: float = 60.0,
                 python: str = sys.executable):
        self.proc = subprocess.Popen(
            [python, str(AGENT), "--host", "testhost", "--slots", str(slots),
             "--beat", str(beat), "--nice", "0", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.inbox: queue.Queue = queue.Queue()
        self.stderr: list = []
        self.bad_lines: list = []
        self.beats: list = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.hello = self.next_message(timeout=60)
        assert self.hello["type"] == "hello", self.hello

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self.bad_lines.append(line)
                continue
            if message.get("type") == "beat":
                self.beats.append(message)
            else:
                self.inbox.put(message)
        self.inbox.put(None)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def send(self, message) -> None:
        """Send a dict as one JSON line, or a str/bytes line as is."""
        if isinstance(message, dict):
            message = json.dumps(message)
        if isinstance(message, str):
            message = message.encode("utf-8")
        self.proc.stdin.write(message + b"\n")
        self.proc.stdin.flush()

    def task(self, task_id, job: str, **args) -> None:
        """Send one task."""
        self.send({"type": "task", "id": task_id, "job": job, "args": args})

    def next_message(self, timeout: float = TIMEOUT) -> dict:
        """The next non-beat message; fails the test after ``timeout`` seconds."""
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no message from the agent in {timeout}s; stderr: {self.stderr}")
        assert message is not None, f"agent closed stdout; stderr: {self.stderr}"
        return message

    def results(self, count: int, timeout: float = TIMEOUT) -> dict:
        """The next ``count`` results by id, asserting that no id is answered twice."""
        found: dict = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            message = self.next_message(max(0.01, deadline - time.monotonic()))
            assert message["type"] == "result", message
            key = json.dumps(message["id"])
            assert key not in found, f"id {key} answered twice"
            found[key] = message
        return {json.loads(key): message for key, message in found.items()}

    def quiet(self, seconds: float) -> list:
        """Messages (beats aside) that arrive within ``seconds``."""
        seen = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if message is None:
                break
            seen.append(message)
        return seen

    def worker_pids(self) -> dict:
        """Slot -> worker pid, from one slow echo task per slot run side by side."""
        slots = self.hello["slots"]
        for index in range(slots):
            self.task(f"pid-{index}", "echo", sleep=0.5)
        answers = self.results(slots)
        pids = {message["slot"]: message["result"]["pid"] for message in answers.values()}
        assert len(pids) == slots, answers
        return pids

    def close(self) -> None:
        """Kill the agent if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def start_agent():
    """``start_agent(*flags, slots=2, beat=60.0, python=...)`` -> Agent; killed at teardown."""
    started: list = []

    def start(*extra: str, **kwargs) -> Agent:
        agent = Agent(*extra, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()
        assert not agent.bad_lines, f"non-JSON lines on stdout: {agent.bad_lines}"


def test_hello_fields_and_bundle_hash(start_agent):
    """The hello names the bundle (same hash as client/bundle.py computes), python, cores."""
    agent = start_agent()
    hello = agent.hello
    bundle = load_client_module("bundle")
    assert hello["bundle"] == bundle.bundle_hash(str(CLIENT))
    assert hello["python"] == platform.python_version()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hello["cores"] == cores
    assert hello["slots"] == 2
    assert hello["host"] == "testhost"
    assert hello["pid"] == agent.proc.pid
    assert hello["protocol"] == 1
    assert "primes" in hello["engines"]
    assert {"noop", "sleep", "fail", "crash", "echo", "primes"} <= set(hello["jobs"])


def test_engine_probe_honours_preload(start_agent):
    """An agent started for one job (--preload) asks only that job's module for its engine:
    the other jobs' modules (numpy's, for primes) are not imported to start a map run."""
    assert start_agent("--preload", "map").hello["engines"] == {}
    assert "primes" in start_agent("--preload", "primes").hello["engines"]
    agent = load_client_module("agent")
    named = {job for job, (module, _) in agent.JOBS.items() if hasattr(load_client_module(module), "ENGINE")}
    assert named == set(agent.ENGINE_JOBS)  # the jobs an agent asks the probe about


def test_many_noops_each_answered_once(start_agent):
    """3000 tasks sent at once over 2 slots: every id answered exactly once, all ok."""
    agent = start_agent()
    count = 3000
    agent.send(b"\n".join(b'{"type":"task","id":%d,"job":"noop","args":{}}' % n
                          for n in range(count)))
    answers = agent.results(count, timeout=120)
    assert set(answers) == set(range(count))
    assert all(message["ok"] and message["result"] == {} for message in answers.values())
    assert {message["slot"] for message in answers.values()} <= {0, 1}
    assert all(message["elapsed"] >= 0 for message in answers.values())
    assert agent.quiet(0.3) == []


def test_results_come_as_they_finish(start_agent):
    """Ids of any JSON type; a slow task does not hold back the quick ones behind it."""
    agent = start_agent()
    agent.task("slow", "echo", sleep=1.5, tag="slow")
    agent.task(7, "echo", tag=7)
    agent.task("x-3", "echo", tag="x-3")
    agent.task(8, "echo", sleep=0.2, tag=8)
    order = [agent.next_message()["id"] for _ in range(4)]
    assert order[-1] == "slow"
    assert set(order) == {"slow", 7, "x-3", 8}


def test_result_matches_its_task(start_agent):
    """Each result carries its own task's answer."""
    agent = start_agent()
    for n in range(50):
        agent.task(f"t{n}", "echo", n=n, sleep=0.01 * (n % 3))
    answers = agent.results(50)
    for n in range(50):
        assert answers[f"t{n}"]["result"]["args"]["n"] == n


def test_failing_and_unknown_jobs(start_agent):
    """Exceptions, unknown jobs, bad args, missing modules and bad return values fail cleanly."""
    agent = start_agent("--job", "ghost=no_such_module_for_beowulf",
                        "--job", "text=json:dumps")
    agent.task(1, "fail", message="boom")
    agent.task(2, "nope")
    agent.send({"type": "task", "id": 3, "job": "noop", "args": [1, 2]})
    agent.task(4, "ghost")
    agent.task(5, "text")
    agent.task(6, "noop")
    answers = agent.results(6)
    assert answers[1]["ok"] is False
    assert answers[1]["error"] == "RuntimeError: boom"
    assert answers[1]["kind"] == "error"
    assert answers[1]["elapsed"] >= 0
    assert answers[2] == {"type": "result", "id": 2, "ok": False,
                          "error": "unknown job 'nope'", "kind": "error", "elapsed": 0.0}
    assert answers[3]["ok"] is False and "args" in answers[3]["error"]
    assert answers[4]["ok"] is False
    assert answers[4]["error"].startswith(("ModuleNotFoundError", "ImportError"))
    assert answers[5]["ok"] is False and answers[5]["error"].startswith("TypeError")
    assert answers[6]["ok"] is True


def test_crashing_worker_fails_its_task_and_is_replaced(start_agent):
    """A worker killed by a signal or exiting fails its task; later tasks use both slots."""
    agent = start_agent()
    before = agent.worker_pids()
    agent.task("k", "crash", signal=9)
    answer = agent.results(1)["k"]
    assert answer["ok"] is False
    assert answer["error"] == "worker died (signal 9)"
    assert answer["kind"] == "died"
    agent.task("x", "crash", code=3)
    answer = agent.results(1)["x"]
    assert answer["error"] == "worker died (exit code 3)"
    after = agent.worker_pids()
    assert len(set(after.values())) == 2
    assert set(after.values()) != set(before.values())
    dead = set(before.values()) - set(after.values())
    assert dead and wait_gone(dead, 3) == []


def test_idle_worker_killed_from_outside_is_replaced(start_agent):
    """A worker that dies while idle is respawned; no result is invented for it."""
    agent = start_agent()
    pids = agent.worker_pids()
    os.kill(pids[1], signal.SIGKILL)
    assert wait_gone([pids[1]], 3) == []
    time.sleep(0.5)  # the agent notices at once, respawns after a short back-off
    after = agent.worker_pids()
    assert pids[1] not in after.values()
    assert agent.quiet(0.2) == []


@pytest.mark.slow
def test_cancel_running_task(start_agent):
    """Cancel kills the worker running the task: no result for it, the slot works again."""
    agent = start_agent()
    pids = agent.worker_pids()
    agent.task("long", "sleep", seconds=30)
    time.sleep(0.5)
    agent.send({"type": "cancel", "id": "long"})
    started = time.monotonic()
    after = agent.worker_pids()  # both slots answer: the cancelled one has a new worker
    assert time.monotonic() - started < 10
    killed = set(pids.values()) - set(after.values())
    assert len(killed) == 1
    assert wait_gone(killed, 3) == []
    assert all(message.get("id") != "long" for message in agent.quiet(1.0))


def test_cancel_queued_task(start_agent):
    """A cancelled task that was still queued never runs and is never answered."""
    agent = start_agent(slots=1)
    agent.task("a", "sleep", seconds=0.5)
    agent.task("b", "echo")
    agent.task("c", "echo")
    agent.send({"type": "cancel", "id": "b"})
    agent.send({"type": "cancel", "id": "never-sent"})
    answers = agent.results(2)
    assert set(answers) == {"a", "c"}
    assert agent.quiet(0.5) == []


def test_duplicate_id_rejected(start_agent):
    """A task whose id is already in flight is refused; the first one still answers."""
    agent = start_agent()
    agent.task("d", "sleep", seconds=0.5)
    agent.task("d", "noop")
    first = agent.next_message()
    assert first["ok"] is False and "duplicate" in first["error"]
    second = agent.next_message()
    assert second["id"] == "d" and second["ok"] is True


def test_large_results_do_not_deadlock(start_agent):
    """Results of several MB from both slots at once arrive whole."""
    agent = start_agent()
    for n in range(4):
        agent.task(n, "blob", bytes=3 * 1024 * 1024)
    for n in range(4, 40):
        agent.task(n, "noop")
    answers = agent.results(40, timeout=60)
    for n in range(4):
        result = answers[n]["result"]
        data = base64.b64decode(result["data"])
        assert len(data) == 3 * 1024 * 1024
        assert hashlib.sha256(data).hexdigest() == result["sha256"]


def test_stdout_carries_only_protocol(start_agent):
    """A job that prints to stdout cannot corrupt the stream: its output goes to stderr."""
    agent = start_agent("--job", "printer=builtins:print")
    agent.task(1, "printer", text="hello from a job")
    agent.task(2, "noop")
    answers = agent.results(2)
    assert answers[1]["ok"] is False  # print returns None, not a dict
    assert answers[2]["ok"] is True
    assert agent.bad_lines == []


def test_ping_pong(start_agent):
    """A ping is answered at once with a pong carrying its id."""
    agent = start_agent()
    agent.send({"type": "ping", "id": "p1"})
    pong = agent.next_message()
    assert pong["type"] == "pong" and pong["id"] == "p1"


def test_invalid_lines_are_tolerated(start_agent):
    """Bad JSON, non-objects, unknown types and id-less tasks are logged and skipped."""
    agent = start_agent()
    for line in ("this is not json", "[1, 2, 3]", '{"type": "weird"}',
                 '{"type": "task", "job": "noop"}', "", b"\xff\xfe"):
        agent.send(line)
    agent.send({"type": "ping", "id": 1})
    assert agent.next_message() == {"type": "pong", "id": 1, "t": pytest.approx(time.time(), abs=60)}
    agent.task("ok", "noop")
    assert agent.next_message()["ok"] is True
    text = "".join(agent.stderr)
    assert "invalid JSON" in text and "unknown type" in text


def test_beats_arrive(start_agent):
    """Heartbeats come every --beat seconds with load, temp, busy and queued."""
    agent = start_agent(beat=0.2)
    agent.task("s", "sleep", seconds=2)
    deadline = time.monotonic() + 10
    while len(agent.beats) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    beats = list(agent.beats)
    assert len(beats) >= 4
    for beat in beats:
        assert set(beat) >= {"type", "t", "load", "temp", "busy", "queued"}
        assert beat["load"] is None or len(beat["load"]) == 3
        assert isinstance(beat["busy"], int) and isinstance(beat["queued"], int)
    assert [beat["t"] for beat in beats] == sorted(beat["t"] for beat in beats)
    assert any(beat["busy"] == 1 for beat in beats)


def test_workers_are_niced(start_agent):
    """--nice N raises the workers' niceness by N; the agent keeps its own."""
    agent = start_agent("--nice", "3")
    agent.task(1, "echo")
    result = agent.results(1)[1]["result"]
    assert result["nice"] == min(os.nice(0) + 3, 19)
    assert result["ppid"] == agent.proc.pid
    assert os.getpriority(os.PRIO_PROCESS, agent.proc.pid) == os.nice(0)


@pytest.mark.parametrize("how", ["eof", "bye"])
def test_stdin_eof_or_bye_kills_workers(start_agent, how):
    """On stdin EOF (or bye) the agent exits 0 within a second and no worker survives."""
    agent = start_agent()
    pids = list(agent.worker_pids().values())
    agent.task("busy", "sleep", seconds=30)
    time.sleep(0.3)
    started = time.monotonic()
    if how == "bye":
        agent.send({"type": "bye"})
    else:
        agent.proc.stdin.close()
    assert agent.proc.wait(5) == 0
    assert time.monotonic() - started < 1.5
    assert wait_gone(pids, 0.5) == []


def test_sigterm_kills_workers(start_agent):
    """SIGTERM: the agent kills its workers and exits 128+15."""
    agent = start_agent()
    pids = list(agent.worker_pids().values())
    agent.task("busy", "spin", seconds=30)
    time.sleep(0.3)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 128 + signal.SIGTERM
    assert wait_gone(pids, 1) == []


def test_sigkill_of_agent_leaves_no_workers(start_agent):
    """If the agent is SIGKILLed, its idle, sleeping and CPU-bound workers all exit."""
    agent = start_agent(slots=3)
    pids = list(agent.worker_pids().values())
    agent.task("sleeper", "sleep", seconds=60)
    agent.task("spinner", "spin", seconds=60)
    time.sleep(0.5)
    agent.proc.kill()
    agent.proc.wait()
    assert wait_gone(pids, 3) == []


def test_probe_flag():
    """``agent.py --probe`` prints the host facts with the bundle hash."""
    done = subprocess.run([sys.executable, str(AGENT), "--probe"], capture_output=True,
                          timeout=60, check=True)
    facts = json.loads(done.stdout)
    assert facts["bundle_hash"] == load_client_module("bundle").bundle_hash(str(CLIENT))
    assert facts["python"] == platform.python_version()
    assert "primes" in facts["engines"]


def test_builtin_job_names_match():
    """The agent's whitelist names exactly the jobs client/jobs_builtin.py defines."""
    agent = load_client_module("agent")
    builtin = load_client_module("jobs_builtin")
    assert set(agent.BUILTIN_JOBS) == set(builtin.JOBS)
    for name in agent.BUILTIN_JOBS:
        assert callable(getattr(builtin, name))


# Standard modules that did not exist yet in Python 3.6.
NEWER_THAN_36 = {"dataclasses", "contextvars", "graphlib", "zoneinfo", "tomllib",
                 "importlib.metadata", "importlib.resources", "_contextvars"}
# Modules of the client bundle itself.
BUNDLE_MODULES = {"bundle", "probe", "jobs_builtin", "primes", "scrape"}


def _guarded_by_import_error(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = handler.type
                caught = names.elts if isinstance(names, ast.Tuple) else [names]
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "Exception")
                       for n in caught):
                    return True
    return False


@pytest.mark.parametrize("name", ["agent.py", "jobs_builtin.py"])
def test_python36_syntax_and_stdlib_only(name):
    """The shipped files parse as Python 3.6 and import only 3.6's standard library."""
    source = (CLIENT / name).read_text()
    tree = ast.parse(source, feature_version=(3, 6))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            assert node.module != "__future__", f"{name}: __future__ import"
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            ok = (top in stdlib or top in BUNDLE_MODULES) and module not in NEWER_THAN_36 \
                and top not in NEWER_THAN_36
            assert ok or _guarded_by_import_error(node, parents), \
                f"{name}:{node.lineno}: import {module} is not in Python 3.6's standard library"


PYTHON36 = find_python36()


@pytest.mark.slow
@pytest.mark.skipif(PYTHON36 is None, reason="no Python 3.6 interpreter on this machine")
def test_runs_on_python36(start_agent):
    """The whole agent on a real Python 3.6: tasks, failures, crash, cancel, no orphans."""
    agent = start_agent(python=PYTHON36)
    assert agent.hello["python"].startswith("3.6.")
    pids = agent.worker_pids()
    agent.task("f", "fail", message="old")
    agent.task("c", "crash", signal=9)
    agent.task("n", "noop")
    answers = agent.results(3)
    assert answers["f"]["error"] == "RuntimeError: old"
    assert answers["c"]["error"] == "worker died (signal 9)"
    assert answers["n"]["ok"] is True
    agent.task("long", "sleep", seconds=30)
    time.sleep(0.5)
    agent.send({"type": "cancel", "id": "long"})
    agent.send({"type": "ping", "id": "after-cancel"})
    assert agent.next_message()["type"] == "pong"
    pids = set(pids.values()) | set(agent.worker_pids().values())
    agent.task("sleeper", "sleep", seconds=60)
    agent.task("spinner", "spin", seconds=60)
    time.sleep(0.5)
    agent.proc.kill()
    agent.proc.wait()
    assert wait_gone(pids, 3) == []
