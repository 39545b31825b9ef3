"""client/mapper.py through a real agent: map tasks sent over its pipes, as the coordinator will.

The agent runs from a copy of client/ inside a temporary workdir (as ``fab setup`` lays
it out), so the run folders (WORKDIR/map/RUN) and shipped folders (WORKDIR/ship/HEX)
live there.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from test_agent import PYTHON36, Agent, gone, wait_gone

from client import mapper
from cluster import mapexport

CLIENT = Path(__file__).resolve().parent.parent / "client"
RUN = "ab" * 16


@pytest.fixture
def workdir(tmp_path):
    """A workdir holding a copy of client/, like a host's after fab setup."""
    work = tmp_path / "work"
    shutil.copytree(CLIENT, work / "client", ignore=shutil.ignore_patterns("__pycache__"))
    return work


@pytest.fixture(params=["current", "3.6"])
def agent(request, workdir, monkeypatch):
    """An agent with 2 slots started from the workdir's copy of client/, on this Python and on 3.6."""
    import test_agent
    python = sys.executable
    if request.param == "3.6":
        python = PYTHON36
        if python is None:
            if os.environ.get("CI") == "true":
                pytest.fail("no Python 3.6 interpreter (the oldest the client supports)")
            pytest.skip("no Python 3.6 interpreter on this machine")
    monkeypatch.setattr(test_agent, "AGENT", workdir / "client" / "agent.py")
    started = Agent(slots=2, python=python)
    yield started
    started.close()


def ship(workdir: Path, files: dict) -> str:
    """Put ``files`` (relative name -> text) in a content-addressed shipped folder; its name."""
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:32]
    folder = workdir / "ship" / digest
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return digest


def run_map(agent, task_id="t", wait=60.0, **args):
    args.setdefault("run", RUN)
    agent.task(task_id, "map", **args)
    message = agent.results(1, timeout=wait)[task_id]
    return message


def items(*values):
    return [{"seq": seq, "value": value} for seq, value in enumerate(values, 1)]


HOSTILE = ["; touch pwned", "a b", "it's", 'say "hi"', "$HOME", "`touch pwned`", "$(touch pwned)",
           "two\nlines", "-rf", "--help", "", "*", "caf\u00e9", "raw\udcffbyte"]


def test_command_values_are_arguments_never_code(agent, workdir):
    message = run_map(agent, mode="command", command="printf '[%s]' {} {#}", items=items(*HOSTILE))
    assert message["ok"], message
    results = message["result"]["items"]
    assert [r["seq"] for r in results] == list(range(1, len(HOSTILE) + 1))
    for value, result in zip(HOSTILE, results):
        assert result["ok"] and result["exit"] == 0 and result["signal"] is None, result
        expected = f"[{value}][{result['seq']}]".encode("utf-8", "surrogateescape")
        got = base64.b64decode(result["stdout"]) if result["stdout_b64"] else result["stdout"].encode()
        assert got == expected
    assert not list(workdir.rglob("pwned"))
    assert (workdir / "map" / RUN).is_dir()  # the commands' cwd
    expected = dict(enumerate(HOSTILE, 1))
    records = [mapexport.parse_item_result(result, expected, "testhost", "command")[0] for result in results]
    assert [record.stdout for record in records][1] == b"[a b][2]" and {r.status for r in records} == {"ok"}


def test_appended_item_exit_codes_stderr_and_env(agent):
    message = run_map(agent, mode="command", command="sh -c 'echo err >&2; echo $PARALLEL_SEQ; exit \"$0\"'",
                      items=items("0", "3"))
    first, second = message["result"]["items"]
    assert first["ok"] and first["stdout"] == "1\n" and first["stderr"] == "err\n"
    assert not second["ok"] and second["exit"] == 3 and second["stdout"] == "2\n"
    assert second["start"] > 1.6e9 and second["seconds"] >= 0


def test_timeout_kills_the_whole_process_group(agent, tmp_path):
    pids = tmp_path / "pids"
    command = "sleep 300 & echo $! > " + str(pids) + "; sleep 300; echo never {}"
    message = run_map(agent, mode="command", command=command, items=items("x"), timeout=1.5)
    result = message["result"]["items"][0]
    assert result["timed_out"] and not result["ok"] and result["signal"] == signal.SIGKILL
    assert "timed out" in result["error"] and result["seconds"] < 30
    assert wait_gone([int(pids.read_text())], 10) == []


def test_background_child_holding_stdout_does_not_hang_the_item(agent):
    message = run_map(agent, mode="command", command="(sleep 300; echo late) & echo now {}", items=items("x"),
                      timeout=60)
    result = message["result"]["items"][0]
    assert result["ok"] and result["stdout"] == "now x\n" and result["seconds"] < 20


@pytest.mark.slow
def test_50mb_stdout_is_capped_not_buffered(agent):
    message = run_map(agent, mode="command", command="head -c 52428800 /dev/zero | tr '\\0' a; echo {}",
                      items=items("x"), stdout_cap=1000, timeout=120)
    result = message["result"]["items"][0]
    assert result["ok"] and result["truncated"] and result["stdout"] == "a" * 1000


def test_non_utf8_output_is_base64_and_stderr_tail(agent):
    message = run_map(agent, mode="command", command="printf 'caf\\351'; seq 1 5000 >&2; true {}",
                      items=items("x"), stderr_tail=20)
    result = message["result"]["items"][0]
    assert result["stdout_b64"] and base64.b64decode(result["stdout"]) == b"caf\xe9"
    assert result["stderr"] == "4997\n4998\n4999\n5000\n"[-20:]


def test_unknown_replacement_string_fails_the_task(agent):
    message = run_map(agent, mode="command", command="echo {..}", items=items("x"))
    assert not message["ok"] and "unknown replacement string" in message["error"]


def test_files_in_and_returned_files_out(agent, workdir):
    data = b"hello \xff world\n" * 100
    digest = hashlib.sha256(data).hexdigest()
    item = {"seq": 1, "value": "photos/-a b;c.txt",
            "file": {"name": "-a b;c.txt", "sha256": digest, "data": base64.b64encode(data).decode()}}
    message = run_map(agent, mode="command", command="gzip -9 -c {} > {.}.gz && echo {/}",
                      items=[item], **{"return": ["{.}.gz", "{.}.missing"]})
    result = message["result"]["items"][0]
    assert result["stdout"] == "-a b;c.txt\n"
    gz, missing = result["returned"]
    assert gz["path"] == result["path"][:-4] + ".gz" and missing["error"] == "no such file"
    raw = base64.b64decode(gz["data"])
    assert hashlib.sha256(raw).hexdigest() == gz["sha256"] and gz["size"] == len(raw)
    import gzip
    assert gzip.decompress(raw) == data
    assert not result["ok"] and "missing" in result["error"]  # a --return file that is not there
    record, files = mapexport.parse_item_result(result, {1: item["value"]}, "testhost", "command", returns=2)
    assert record.status == "failed" and files[0].data == raw and files[1].error == "no such file"
    assert list((workdir / "map" / RUN / "in").iterdir()) == []  # the input folder is removed
    bad = dict(item, file=dict(item["file"], sha256="0" * 64))
    message = run_map(agent, "t2", mode="command", command="cat {}", items=[bad])
    assert not message["ok"] and "does not match its sha256" in message["error"]


def test_return_outside_the_run_folder_is_refused(agent, workdir, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    message = run_map(agent, mode="command", command="true", items=items("v"),
                      **{"return": [str(secret), "../../client/agent.py"]})
    returned = message["result"]["items"][0]["returned"]
    assert [entry["error"] for entry in returned] == ["outside the run's work folder"] * 2
    assert secret.exists() and (workdir / "client" / "agent.py").exists()


def test_function_called_with_items_imported_once(agent, workdir):
    digest = ship(workdir, {"score.py": "import os\nLOADS = []\nLOADS.append(1)\n"
                                        "def score(x):\n    return {'x': x, 'sq': x * x, 'loads': len(LOADS),"
                                        " 'pid': os.getpid()}\n"})
    answers = []
    for number in range(3):
        message = run_map(agent, f"f{number}", mode="function", function="score.py:score", ship=digest,
                          items=[{"seq": 1, "value": 7}, {"seq": 2, "value": 8}])
        answers += message["result"]["items"]
    assert [a["value"]["sq"] for a in answers] == [49, 64] * 3
    assert {a["value"]["loads"] for a in answers} == {1}  # imported once per worker


def test_function_over_a_range_answers_in_columns(agent, workdir):
    """fab map's hot path: items made on the host from [seq, count, start, step], ok ones in
    columns (integer microseconds), failures as item results, timeouts too."""
    digest = ship(workdir, {"c.py": "import time\n"
                                    "def f(x):\n    if x == 13:\n        raise KeyError(x)\n"
                                    "    if x == 15:\n        time.sleep(30)\n"
                                    "    return float('nan') if x == 17 else [x, str(x)]\n"})
    message = run_map(agent, mode="function", function="c:f", ship=digest, range=[5, 8, 10, 1], columns=True,
                      timeout=0.5)
    result = message["result"]
    columns = result["columns"]
    assert columns["seq"] == [5, 6, 7, 9, 11]
    assert columns["value"] == [[x, str(x)] for x in (10, 11, 12, 14, 16)]
    assert all(type(us) is int and us >= 0 for us in columns["us"] + columns["start_us"])
    assert abs(columns["t0"] - time.time()) < 120
    failed = {item["seq"]: item for item in result["failed"]}
    assert sorted(failed) == [8, 10, 12]
    assert "KeyError: 13" in failed[8]["error"] and failed[10]["timed_out"]
    assert "not JSON-serialisable" in failed[12]["error"]
    assert result["left"] == []
    bad = run_map(agent, "bad", mode="function", function="c:f", ship=digest, range=[0, 2, 1, 1], columns=True)
    assert not bad["ok"] and "range" in bad["error"]


def test_function_failures(agent, workdir):
    digest = ship(workdir, {"f.py": "import time\n"
                                    "def boom(x):\n    raise ValueError('bad item %s' % x)\n"
                                    "def weird(x):\n    return {1, 2}\n"
                                    "def slow(x):\n    try:\n        time.sleep(300)\n"
                                    "    except Exception:\n        return 'swallowed'\n"
                                    "def fine(x):\n    return x\n"})
    boom = run_map(agent, "a", mode="function", function="f:boom", ship=digest, items=items("q"))
    error = boom["result"]["items"][0]["error"]
    assert "ValueError: bad item q" in error and "in boom" in error and len(error) <= mapper.MAX_TRACEBACK_CHARS
    weird = run_map(agent, "b", mode="function", function="f:weird", ship=digest, items=items("q"))
    assert "not JSON-serialisable" in weird["result"]["items"][0]["error"]
    slow = run_map(agent, "c", mode="function", function="f:slow", ship=digest, items=items("q", "r"),
                   timeout=0.5)
    assert [r["timed_out"] for r in slow["result"]["items"]] == [True, True]
    fine = run_map(agent, "d", mode="function", function="f:fine", ship=digest, items=items("ok"))
    assert fine["result"]["items"][0]["value"] == "ok"  # the worker survived the timeouts


@pytest.mark.parametrize("function,ship_name,error", [
    ("os:system", None, "not one of the shipped files"),
    ("json:dumps", None, "not one of the shipped files"),
    ("antigravity:geohash", None, "no module antigravity in the shipped files"),
    ("../evil:f", None, "MODULE:FUNC"),
    ("/tmp/evil:f", None, "MODULE:FUNC"),
    ("mod:f", "../../etc", "hex digest"),
    ("mod:f", "/tmp", "hex digest"),
    ("mod:f", "cd" * 16, "no shipped folder"),
])
def test_functions_only_from_the_shipped_folder(agent, workdir, function, ship_name, error):
    digest = ship(workdir, {"mod.py": "def f(x):\n    return x\n"})
    message = run_map(agent, mode="function", function=function, ship=ship_name or digest, items=items("x"))
    assert not message["ok"] and error in message["error"], message


def test_symlinked_ship_folder_out_of_ship_is_refused(agent, workdir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mod.py").write_text("def f(x):\n    return 'pwned'\n")
    (workdir / "ship").mkdir(exist_ok=True)
    (workdir / "ship" / ("ef" * 16)).symlink_to(outside)
    message = run_map(agent, mode="function", function="mod:f", ship="ef" * 16, items=items("x"))
    assert not message["ok"] and "no shipped folder" in message["error"]


def test_function_killing_its_worker_ends_the_task(agent, workdir):
    digest = ship(workdir, {"k.py": "import os\ndef k(x):\n    os._exit(3) if x == 'die' else None\n"
                                    "    return x\n"})
    message = run_map(agent, mode="function", function="k:k", ship=digest, items=items("a", "die"))
    assert not message["ok"] and "worker died" in message["error"]
    again = run_map(agent, "t2", mode="function", function="k:k", ship=digest, items=items("b"))
    assert again["ok"] and again["result"]["items"][0]["value"] == "b"


def test_cancel_kills_the_running_command(agent, tmp_path):
    """The agent SIGKILLs a cancelled task's worker; the reaper kills the command's group too."""
    pids = tmp_path / "pids"
    agent.task("long", "map", run=RUN, mode="command", items=items("x"),
               command="sleep 300 & echo $! > " + str(pids) + "; sleep 300 {}")
    deadline = time.monotonic() + 20
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pids.read_text())
    assert not gone(child)
    agent.send({"type": "cancel", "id": "long"})
    assert wait_gone([child], 10) == []
    assert agent.quiet(0.5) == []


def test_result_budget_leaves_items_for_later(agent, monkeypatch):
    message = run_map(agent, mode="command", command="head -c 900000 /dev/zero | tr '\\0' a; true {}",
                      items=items(*["v"] * 60), timeout=120)
    result = message["result"]
    done = len(result["items"])
    assert result["left"] == list(range(done + 1, 61)) and 30 < done < 60
    assert all(os.path.basename(mapper.__file__) for _ in [0])


def test_packed_result_budget_leaves_items_for_later(agent, workdir):
    """A packed answer stops growing at the result budget too: the items after it are ``left``."""
    import json
    import zlib

    digest = ship(workdir, {"big.py": "def f(x):\n    return 'a' * 900000 if x % 2 else x\n"})
    result = run_map(agent, mode="function", function="big:f", ship=digest, range=[1, 120, 1, 1], pack="zlib",
                     stdout_cap=1 << 20, timeout=120)["result"]
    chunk = json.loads(zlib.decompress(base64.b64decode(result["chunk"])))
    done = result["count"]
    assert chunk["seq0"] == 1 and 60 < done < 120 and result["left"] == list(range(done + 1, 121))
    assert chunk["value"][:2] == ["a" * 900000, 2]


class SshAgent(Agent):
    """An agent started over real ssh on a harness sshd host (its session is the agent's stdio)."""

    def __init__(self, cluster, host, workdir: Path):
        import queue
        import subprocess
        import threading
        cluster.write_known_hosts()
        command = f"python3 {workdir}/client/agent.py --host {host.name} --slots 2 --beat 60 --nice 0"
        self.proc = subprocess.Popen(
            ["ssh", "-i", str(cluster.client_key), "-p", str(host.port), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={cluster.known_hosts_path}", "-o", "StrictHostKeyChecking=yes",
             host.address, command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.inbox = queue.Queue()
        self.stderr, self.bad_lines, self.beats = [], [], []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.hello = self.next_message(timeout=60)
        assert self.hello["type"] == "hello", self.hello


@pytest.mark.slow
def test_over_real_ssh_quoting_and_link_loss(ssh_cluster, tmp_path):
    """On an sshd host: hostile values stay arguments; when the link drops mid-item the agent
    and its workers exit and the reaper kills the running command's process group."""
    h1 = ssh_cluster["h1"]
    work = h1.workdir / f"map-{os.getpid()}"
    shutil.copytree(CLIENT, work / "client", ignore=shutil.ignore_patterns("__pycache__"))
    agent = SshAgent(ssh_cluster, h1, work)
    try:
        message = run_map(agent, mode="command", command="printf '[%s]' {}", items=items(*HOSTILE[:-1]))
        outs = [result["stdout"] for result in message["result"]["items"]]
        assert outs == [f"[{value}]" for value in HOSTILE[:-1]]
        assert not list(work.rglob("pwned"))
        pids = tmp_path / "pids"
        agent.task("long", "map", run=RUN, mode="command", items=items("x"),
                   command="sleep 300 & echo $! > " + str(pids) + "; sleep 300 {}")
        deadline = time.monotonic() + 30
        while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pids.read_text())
        assert not gone(child)
        agent.proc.kill()  # the coordinator's end of the link is gone
        assert wait_gone([child], 15) == []
    finally:
        agent.close()
        shutil.rmtree(work, ignore_errors=True)


def test_shipped_package_and_sibling_files_and_a_new_run_in_the_same_worker(workdir):
    """A package with a relative import and a --ship'd sibling; a second run's same-named module wins."""
    import test_agent
    sub = "from .helper import twice\nimport lib\ndef f(x):\n    return lib.TAG + twice(x)\n"
    first = ship(workdir, {"pkg/__init__.py": "", "pkg/sub.py": sub,
                           "pkg/helper.py": "def twice(x):\n    return x * 2\n", "lib.py": "TAG = 'one:'\n"})
    second = ship(workdir, {"pkg/__init__.py": "", "pkg/sub.py": "import lib\ndef f(x):\n    return lib.TAG + x\n",
                            "lib.py": "TAG = 'two:'\n"})
    old = test_agent.AGENT
    test_agent.AGENT = workdir / "client" / "agent.py"
    try:
        agent = Agent(slots=1)
    finally:
        test_agent.AGENT = old
    try:
        one = run_map(agent, "a", mode="function", function="pkg.sub:f", ship=first, items=items("ab"))
        two = run_map(agent, "b", mode="function", function="pkg.sub:f", ship=second, items=items("ab"))
        back = run_map(agent, "c", mode="function", function="pkg.sub:f", ship=first, items=items("x"))
        assert [m["result"]["items"][0]["value"] for m in (one, two, back)] == ["one:abab", "two:ab", "one:xx"]
    finally:
        agent.close()


def test_hostile_file_names_reach_the_command_as_one_argument(agent, workdir):
    names = ["x\ny'$(touch pwned)\udcff.txt", "--rm -rf .txt", "`touch pwned`.txt", "sp ace.tar.gz"]
    sent = []
    for seq, name in enumerate(names, 1):
        data = name.encode("utf-8", "surrogateescape")
        sent.append({"seq": seq, "value": "local/" + name,
                     "file": {"name": name, "sha256": hashlib.sha256(data).hexdigest(),
                              "data": base64.b64encode(data).decode()}})
    message = run_map(agent, mode="command", command="cat {}; printf '|%s' {/} {/.}", items=sent)
    for name, result in zip(names, message["result"]["items"]):
        raw = name.encode("utf-8", "surrogateescape")
        stem = mapper.modify(name, ".").encode("utf-8", "surrogateescape")
        out = base64.b64decode(result["stdout"]) if result["stdout_b64"] else result["stdout"].encode()
        assert result["ok"] and out == raw + b"|" + raw + b"|" + stem, result
    assert not list(workdir.rglob("pwned"))


def test_slot_and_seq_strings_and_parallel_variables(agent):
    message = run_map(agent, mode="command", command="echo {%} $PARALLEL_JOBSLOT {#} $PARALLEL_SEQ",
                      items=items("a", "b"))
    lines = [result["stdout"].split() for result in message["result"]["items"]]
    assert [line[2:] for line in lines] == [["1", "1"], ["2", "2"]]
    assert all(line[0] == line[1] and line[0] in ("1", "2") for line in lines)


def test_function_over_a_range_answers_packed(agent, workdir):
    """The packed answer (``"pack": "zlib"``): the ok items' columns compressed on the host;
    back to back items carry ``seq0`` and no ``start_us``; the worker's slot comes with it."""
    import json
    import zlib

    from cluster import mapstore

    digest = ship(workdir, {"p.py": "def f(x):\n    if x == 13:\n        raise KeyError(x)\n    return [x, str(x)]\n"})
    result = run_map(agent, mode="function", function="p:f", ship=digest, range=[5, 8, 10, 1], columns=True,
                     pack="zlib")["result"]
    assert result["pack"] == "zlib" and result["count"] == 7 and result["slot"] in (1, 2)
    chunk = json.loads(zlib.decompress(base64.b64decode(result["chunk"])))
    assert chunk["seq"] == [5, 6, 7, 9, 10, 11, 12] and "seq0" not in chunk
    assert chunk["value"] == [[x, str(x)] for x in (10, 11, 12, 14, 15, 16, 17)]
    assert len(chunk["start_us"]) == 7 and all(type(us) is int and us >= 0 for us in chunk["us"] + chunk["start_us"])
    assert [item["seq"] for item in result["failed"]] == [8] and "KeyError: 13" in result["failed"][0]["error"]
    result = run_map(agent, "all", mode="function", function="p:f", ship=digest, range=[1, 5, 20, 2],
                     pack="zlib")["result"]
    data = base64.b64decode(result["chunk"])
    chunk = json.loads(zlib.decompress(data))
    assert chunk["seq0"] == 1 and "start_us" not in chunk and result["failed"] == [] and result["count"] == 5
    stored = mapstore.decode_chunk(data, 5)
    assert stored["value"] == [[x, str(x)] for x in (20, 22, 24, 26, 28)]
    assert stored["start_us"] == [sum(chunk["us"][:i]) for i in range(5)]
