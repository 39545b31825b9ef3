"""fab map end to end: inputs, quoting, outputs, failures, resume, on this computer and real sshd hosts.

The quick tests run on the local default (``address = local``); the ones over sshd hosts
share one provisioned three-host cluster (the slow ones kill hosts and coordinators).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness import fab_argv, fab_env
from harness.hostile import executable, provisioned_cluster

HOSTILE = ["; touch pwned", "a b", "it's", 'say "hi"', "$HOME", "`touch pwned`", "$(touch pwned)",
           "-rf", "--help", "*", "caf\u00e9", "  lead and trail  ", "back\\slash"]


def local_inventory(folder: Path) -> Path:
    path = folder / "local.ini"
    path.write_text("[local]\naddress = local\n")
    return path


def fab_map(run_fab, folder: Path, *args, inventory=None, config=None, timeout=240, env=None, input=None):
    inventory = inventory or local_inventory(folder)
    return run_fab(["map", "--inventory", inventory, "--db", folder / "r.db", *args], cwd=folder, config=config,
                   timeout=timeout, env=env, input=input)


def rows(db: Path, sql: str, *args) -> list:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def joblog(path: Path) -> list:
    lines = path.read_bytes().split(b"\n")
    header = lines[0].decode().split("\t")
    return [dict(zip(header, line.decode("utf-8", "surrogateescape").split("\t"))) for line in lines[1:] if line]


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- inputs, quoting, outputs (local)


def test_args_quoting_export_in_input_order(run_fab, tmp_path):
    (tmp_path / "args.txt").write_text("".join(value + "\n" for value in HOSTILE))
    done = fab_map(run_fab, tmp_path, "--command", "printf '[%s]\\n' {} {#}", "--args", "args.txt",
                   "--export", "out.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    expected = "".join(f"[{value}]\n[{seq}]\n" for seq, value in enumerate(HOSTILE, 1))
    assert (tmp_path / "out.txt").read_text() == expected
    assert not list(tmp_path.rglob("pwned"))
    assert f"{len(HOSTILE)} items: {len(HOSTILE)} ok" in done.stdout
    again = fab_map(run_fab, tmp_path, "--command", "printf '[%s]\\n' {} {#}", "--args", "args.txt")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr


def test_appended_item_and_colsep_grid(run_fab, tmp_path):
    (tmp_path / "grid.tsv").write_text("1\t0.5\n2\t0.25\n3\tx y\n")
    done = fab_map(run_fab, tmp_path, "--command", "echo seed={1} alpha={2}", "--args", "grid.tsv",
                   "--colsep", "\t", "--export", "grid.out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "grid.out").read_text() == "seed=1 alpha=0.5\nseed=2 alpha=0.25\nseed=3 alpha=x y\n"
    done = fab_map(run_fab, tmp_path, "--command", "echo", "--range", "5:1:-2", "--export", "r.out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "r.out").read_text() == "5\n3\n1\n"


def test_slot_is_the_real_one_in_output_joblog_and_returned_names(run_fab, tmp_path):
    """{%} is the slot the item ran in (1 or 2 on the 2-slot local host): in the command, in the
    joblog's Command column and in a --return name fetched into --outdir (rendered alike on the host
    and here), stored with each item."""
    (tmp_path / "local.ini").write_text("[local]\naddress = local\nslots = 2\n")
    done = fab_map(run_fab, tmp_path, "--command", "echo {%} {} > o{%}-{}.txt; echo {%}", "--range", "1:40",
                   "--return", "o{%}-{}.txt", "--outdir", "out", "--joblog", "s.log", "--export", "s.out",
                   inventory=tmp_path / "local.ini")
    assert done.returncode == 0, done.stdout + done.stderr
    slots = {int(seq): int(slot) for seq, slot in rows(tmp_path / "r.db", "SELECT seq, slot FROM map_items")}
    assert sorted(slots) == list(range(1, 41)) and set(slots.values()) <= {1, 2}
    assert (tmp_path / "s.out").read_text() == "".join(f"{slots[seq]}\n" for seq in range(1, 41))
    for line in joblog(tmp_path / "s.log"):
        seq = int(line["Seq"])
        assert line["Command"] == f"echo {slots[seq]} {seq} > o{slots[seq]}-{seq}.txt; echo {slots[seq]}"
    for seq, slot in slots.items():
        assert (tmp_path / "out" / f"o{slot}-{seq}.txt").read_text() == f"{slot} {seq}\n"


def test_function_over_a_range_values_and_second_run_uploads_nothing(run_fab, tmp_path):
    (tmp_path / "score.py").write_text("import json\ndef score(x):\n    return {'x': x, 'sq': x * x}\n")
    done = fab_map(run_fab, tmp_path, "--function", "score.py:score", "--range", "1:500", "--export", "v.jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = jsonl(tmp_path / "v.jsonl")
    assert [line["value"] for line in lines] == [{"x": x, "sq": x * x} for x in range(1, 501)]
    assert {line["status"] for line in lines} == {"ok"}
    ship = tmp_path / ".beowulf" / "local" / "ship"
    assert len(list(ship.iterdir())) == 1
    stamp = next(ship.iterdir()).stat().st_mtime_ns
    assert not list((tmp_path / ".beowulf" / "local" / "map").iterdir())  # run folder removed at the end
    again = fab_map(run_fab, tmp_path, "--function", "score.py:score", "--range", "1:501")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "501 items: 501 ok" in again.stdout  # 1:501 is another run (the range is its identity)
    assert next(ship.iterdir()).stat().st_mtime_ns == stamp


def test_files_in_returned_files_out(run_fab, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    contents = {f"p{i}.tif": os.urandom(1000 + i) * 3 for i in range(6)}
    contents["odd name 'x'.tif"] = b"quoted\n" * 50
    for name, data in contents.items():
        (photos / name).write_bytes(data)
    done = fab_map(run_fab, tmp_path, "--command", "gzip -9 -c {} > {.}.gz", "--files", "photos/*.tif",
                   "--return", "{.}.gz", "--outdir", "out", "--joblog", "files.log")
    assert done.returncode == 0, done.stdout + done.stderr
    for name, data in contents.items():
        returned = tmp_path / "out" / "photos" / (name[:-4] + ".gz")
        assert gzip.decompress(returned.read_bytes()) == data
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary file left
    log = joblog(tmp_path / "files.log")
    assert sorted(int(line["Send"]) for line in log) == sorted(len(d) for d in contents.values())


def test_non_utf8_output_and_capped_stdout(run_fab, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"bin\nbig\n")
    done = fab_map(run_fab, tmp_path, "--command",
                   "if [ {} = bin ]; then printf '\\377\\376ok'; printf '\\377err' >&2; "
                   "else head -c 50000000 /dev/zero; fi", "--args", "a.txt", "--export", "o.jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = jsonl(tmp_path / "o.jsonl")
    assert first["stdout"] is None and first["stdout_base64"] == "//5vaw=="
    assert first["stderr_base64"] == "/2Vycg=="
    assert rows(tmp_path / "r.db", "SELECT length(stdout), truncated FROM map_items WHERE seq = 2") == [(1 << 20, 1)]


@pytest.mark.slow
def test_bad_input_is_exit_2_and_nothing_runs(run_fab, tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"a\0b\n")
    (tmp_path / "grid.txt").write_text("a b c\nd e\n")
    (tmp_path / "mod.py").write_text("import os\ndef f(x):\n    missing = x\n    return missing\n")
    cases = [
        (["--command", "echo {}", "--range", "5:1"], "empty"),
        (["--command", "echo {}", "--range", "a:b"], "integers"),
        (["--command", "echo {}", "--files", "nothing*"], "matches nothing"),
        (["--command", "echo {}", "--args", "missing.txt"], "no such file"),
        (["--command", "echo {}", "--args", "nul.txt"], "NUL"),
        (["--command", "echo {..}", "--range", "1:2"], "unknown replacement string"),
        (["--command", "echo '{}'", "--range", "1:2"], "quotes"),
        (["--function", "nope.py:f", "--range", "1:2"], "nope.py"),
        (["--command", "echo", "--function", "m.py:f", "--range", "1:2"], "one of --command or --function"),
        (["--command", "echo", "--range", "1:2", "--timeout", "soon"], "--timeout"),
        (["--command", "echo", "--range", "1:2", "--args", "nul.txt"], "one of --args"),
        (["--command", "echo {foo}", "--range", "1:2"], "unknown replacement string {foo}"),
        (["--command", "echo {1x}", "--range", "1:2"], "unknown replacement string {1x}"),
        (["--command", "echo { }", "--range", "1:2"], "unknown replacement string { }"),
        (["--command", "echo {}", "--return", "{name}.out", "--range", "1:2"], "--return: unknown"),
        (["--command", "echo {3}", "--args", "grid.txt", "--colsep", " "], "grid.txt line 2: 2 columns"),
        (["--command", "echo {2}", "--range", "1:2"], "without --colsep"),
        (["--function", "mod.py:missing", "--range", "1:2"], "mod.py defines no missing"),
    ]
    for args, words in cases:
        done = fab_map(run_fab, tmp_path, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r.db").exists()


def test_shell_braces_go_to_the_command(run_fab, tmp_path):
    """Braces that are the shell's (awk's program in quotes, ${VAR}, a brace group, an escaped or
    quoted brace) are left to it; only GNU parallel's forms are replaced."""
    (tmp_path / "cols.txt").write_text("a b\nc d\n")
    command = "echo {} | awk '{print $2}'; { echo ${HOME:+home}; }; echo '{x}' \\{y}"
    done = fab_map(run_fab, tmp_path, "--command", command, "--args", "cols.txt", "--export", "out.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out.txt").read_text() == "b\nhome\n{x} {y}\nd\nhome\n{x} {y}\n"


def test_asking_a_finished_run_again_writes_nothing(run_fab, tmp_path):
    """The same command again after a finished run: one line, exit 0, the store not written to
    (no session, the same fab stats figures, the same bytes), no 'still starting' note."""
    args = ["--command", "echo {}", "--range", "1:5"]
    assert fab_map(run_fab, tmp_path, *args).returncode == 0
    db = tmp_path / "r.db"
    stats = run_fab(["stats", "--db", db, "--run", "1", "--format", "json"])
    dump = "\n".join(sqlite3.connect(f"file:{db}?mode=ro", uri=True).iterdump())
    data = db.read_bytes()
    again = fab_map(run_fab, tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == [f"run 1 already complete in {db}: nothing to run (5 items: 5 ok)"]
    assert "still starting" not in again.stdout + again.stderr
    assert db.read_bytes() == data
    assert "\n".join(sqlite3.connect(f"file:{db}?mode=ro", uri=True).iterdump()) == dump
    after = run_fab(["stats", "--db", db, "--run", "1", "--format", "json"])
    assert json.loads(after.stdout) == json.loads(stats.stdout)
    assert len(json.loads(after.stdout)["sessions"]) == 1


# ---------------------------------------------------------------- failures, retries, resume (local)


def test_function_raising_retries_joblog_and_retry_failed(run_fab, tmp_path):
    flag = tmp_path / "fixed"
    (tmp_path / "mod.py").write_text(
        "import os\n"
        f"FLAG = {str(flag)!r}\n"
        "def f(x):\n"
        "    if x in (3, 7) and not os.path.exists(FLAG):\n"
        "        raise ValueError('bad item %d' % x)\n"
        "    return x * 10\n")
    args = ["--function", "mod.py:f", "--range", "1:10", "--joblog", "j.log"]
    done = fab_map(run_fab, tmp_path, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "8 ok, 2 failed" in done.stdout
    assert "ValueError: bad item 3" in done.stdout and "--retry-failed" in done.stdout
    log = joblog(tmp_path / "j.log")
    assert list(log[0]) == ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
                            "Command"]
    per_seq = {}
    for line in log:
        per_seq.setdefault(int(line["Seq"]), []).append(line)
    assert len(per_seq[3]) == len(per_seq[7]) == 3  # the first try and --retries 2
    assert all(len(per_seq[seq]) == 1 for seq in per_seq if seq not in (3, 7))
    assert all(line["Exitval"] == "1" for line in per_seq[3])
    # the hosts' table counts the items' failed attempts (2 items x 3) and those tried again (2 x 2)
    host = json.loads(run_fab(["stats", "--db", tmp_path / "r.db", "--run", "1", "--format", "json"]).stdout)
    assert (host["hosts"][0]["failures"], host["hosts"][0]["retries"]) == (6, 4)
    assert "10 items in " in done.stdout
    flag.write_text("")
    again = fab_map(run_fab, tmp_path, *args, "--retry-failed", "--export", "v.jsonl")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "10 items in " in again.stdout and "10 items: 10 ok" in again.stdout  # each item counted once
    stats = json.loads(run_fab(["stats", "--db", tmp_path / "r.db", "--run", "1", "--format", "json"]).stdout)
    assert stats["items"] == 10 and sum(h["items"] for h in stats["hosts"]) == 10 and stats["progress"] == 1.0
    assert [line["value"] for line in jsonl(tmp_path / "v.jsonl")] == [x * 10 for x in range(1, 11)]
    attempts = rows(tmp_path / "r.db", "SELECT attempt, status FROM map_items WHERE seq = 3")
    assert attempts == [(4, "ok")]  # numbering goes on after --retry-failed
    assert len([line for line in joblog(tmp_path / "j.log") if line["Seq"] == "3"]) == 4


def test_adding_lines_then_resuming_runs_only_the_new_ones(run_fab, tmp_path):
    ran = tmp_path / "ran.txt"
    args = tmp_path / "args.txt"
    args.write_text("one\ntwo\nthree\n")
    command = f"echo {{}} >> {ran}; echo {{}}"
    assert fab_map(run_fab, tmp_path, "--command", command, "--args", "args.txt").returncode == 0
    with args.open("a") as handle:
        handle.write("four\ntwo\n")  # a second "two" is an item of its own
    done = fab_map(run_fab, tmp_path, "--command", command, "--args", "args.txt", "--export", "all.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(ran.read_text().split()) == sorted(["one", "two", "three", "four", "two"])
    assert (tmp_path / "all.txt").read_text() == "one\ntwo\nthree\nfour\ntwo\n"


@pytest.mark.slow
def test_hanging_item_times_out(run_fab, tmp_path):
    done = fab_map(run_fab, tmp_path, "--command", "sleep {}", "--args", "-", "--timeout", "1",
                   "--retries", "1", "--export", "t.jsonl", input="0\n300\n0.1\n")
    assert done.returncode == 1, done.stdout + done.stderr
    statuses = [line["status"] for line in jsonl(tmp_path / "t.jsonl")]
    assert statuses == ["ok", "timeout", "ok"]
    assert rows(tmp_path / "r.db", "SELECT attempt FROM map_items WHERE seq = 2") == [(2,)]


def test_item_killing_its_worker_is_crashed_after_3(run_fab, tmp_path):
    (tmp_path / "k.py").write_text("import os\ndef k(x):\n    if x == 4:\n        os._exit(9)\n    return x\n")
    done = fab_map(run_fab, tmp_path, "--function", "k.py:k", "--range", "1:12", "--joblog", "k.log",
                   "--export", "k.jsonl", timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    # no console line per worker death during the run (they named block numbers): the summary says it
    assert "again in" not in done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("12 items: 11 ok, 1 crashed"):]
    assert "#4 '4': crashed on" in summary and "killed its worker 3 times" in summary
    lines = jsonl(tmp_path / "k.jsonl")
    assert [line["status"] for line in lines] == ["ok"] * 3 + ["crashed"] + ["ok"] * 8
    crashes = [line for line in joblog(tmp_path / "k.log") if line["Seq"] == "4"]
    assert len(crashes) == 3
    assert {line["Exitval"] for line in crashes} == {"-1"}  # no exit status of its own (README.md)
    assert {line["Exitval"] for line in joblog(tmp_path / "k.log") if line["Seq"] != "4"} == {"0"}
    assert all(list(line) == list(lines[0]) for line in lines) and lines[3]["error"].startswith("killed its worker")
    assert lines[0]["error"] is None and lines[0]["value"] == 1 and lines[3]["value"] is None
    assert rows(tmp_path / "r.db", "SELECT attempt, status FROM map_items WHERE seq = 4") == [(3, "crashed")]


def test_ctrl_c_exits_130_kills_the_commands_and_resumes(tmp_path):
    """Ctrl-C: exit 130, the running commands' process groups killed; the same command again
    runs only what was not finished."""
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "args.txt").write_text("".join(f"{i}\n" for i in range(1, 9)))
    command = f"if [ {{}} -le 2 ]; then echo quick; else echo $$ > {pids}/{{}}; sleep 300; fi"
    args = ["--inventory", local_inventory(tmp_path), "--db", tmp_path / "r.db", "--command", command,
            "--args", "args.txt"]
    child = _start_map(args, tmp_path)
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    _wait_items(tmp_path / "r.db", 2)
    os.killpg(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, out + err
    assert "run the same command again to resume" in err
    shells = [int(p.read_text()) for p in pids.iterdir()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in shells):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in shells)
    assert rows(tmp_path / "r.db", "SELECT seq, status FROM map_items ORDER BY seq") == [(1, "ok"), (2, "ok")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status not in ("Z", "X")


# ---------------------------------------------------------------- real sshd hosts


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    yield from provisioned_cluster(tmp_path_factory, "maprun", 3)


@pytest.mark.slow
def test_over_sshd_module_failing_to_import_on_one_host(cluster3, run_fab, tmp_path):
    """h2's Python cannot import the function's module: h2 is left out with the reason, h1 and h3
    do every item."""
    cluster, config = cluster3
    wrapper = executable(tmp_path, "python-broken", "#!/bin/sh\nBEOWULF_TEST_BREAK=1 exec python3 \"$@\"\n")
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={"h2": {"python": wrapper}})
    (tmp_path / "m.py").write_text("import os\nif os.environ.get('BEOWULF_TEST_BREAK'):\n"
                                   "    raise ImportError('no such library here')\n"
                                   "import time\ndef f(x):\n    time.sleep(0.05)\n    return [x, os.uname()[1]]\n")
    done = fab_map(run_fab, tmp_path, "--function", "m.py:f", "--range", "1:300", "--export", "v.jsonl",
                   "--block-seconds", "0.5", inventory=inventory, config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "h2" in done.stdout + done.stderr and "no such library here" in done.stdout + done.stderr
    assert [line["value"][0] for line in jsonl(tmp_path / "v.jsonl")] == list(range(1, 301))
    hosts = {host for (host,) in rows(tmp_path / "r.db", "SELECT DISTINCT host FROM map_items")}
    assert "h2" not in hosts and hosts <= {"h1", "h3"}


@pytest.mark.slow
def test_over_sshd_quoting_and_files(cluster3, run_fab, tmp_path):
    cluster, config = cluster3
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    names = [value for value in HOSTILE if "/" not in value and value.strip() == value and value]
    folder = tmp_path / "in"
    folder.mkdir()
    for index, name in enumerate(names):
        (folder / name).write_text(f"content {index}\n")
    done = fab_map(run_fab, tmp_path, "--command", "cat -- {} && printf '%s\\n' {/}", "--files", "in/*",
                   "--export", "f.jsonl", inventory=inventory, config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in jsonl(tmp_path / "f.jsonl"):
        name = os.path.basename(line["item"])
        assert line["stdout"] == f"content {names.index(name)}\n{name}\n"
    assert not list(tmp_path.rglob("pwned"))
    for host in cluster:
        assert not list(Path(host.workdir).rglob("pwned"))
        assert not list((Path(host.workdir) / "map").glob("*/*"))  # run folders removed


def _start_map(args, folder: Path, config=None):
    return subprocess.Popen(fab_argv(["map", *args], config=config), cwd=folder, env=fab_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_items(db: Path, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if db.exists() and rows(db, "SELECT count(*) FROM map_items")[0][0] >= at_least:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} items committed within {timeout}s")


def _file_items(tmp_path: Path, count: int) -> dict:
    folder = tmp_path / "in"
    folder.mkdir()
    contents = {}
    for index in range(count):
        data = (f"item {index}\n" * (50 + index)).encode()
        (folder / f"f{index:03d}.txt").write_bytes(data)
        contents[f"f{index:03d}.txt"] = data
    return contents


@pytest.mark.slow
def test_host_killed_mid_run_every_item_once_files_complete(cluster3, run_fab, tmp_path):
    cluster, config = cluster3
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    contents = _file_items(tmp_path, 60)
    db = tmp_path / "r.db"
    args = ["--inventory", inventory, "--db", db, "--command", "sleep 0.2; gzip -c {} > {}.gz", "--files",
            "in/*.txt", "--return", "{}.gz", "--outdir", "out", "--block-seconds", "0.3"]
    child = _start_map(args, tmp_path, config)
    try:
        _wait_items(db, 10)
        cluster["h3"].kill()
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        cluster.ensure_running()
    assert child.returncode == 0, out + err
    assert rows(db, "SELECT count(*), count(DISTINCT key) FROM map_items") == [(60, 60)]
    for name, data in contents.items():
        assert gzip.decompress((tmp_path / "out" / "in" / (name + ".gz")).read_bytes()) == data


@pytest.mark.slow
@pytest.mark.parametrize("kills", [10])
def test_coordinator_sigkilled_repeatedly_then_resumed(cluster3, tmp_path, kills):
    """The coordinator SIGKILLed at random moments: every item exactly once in the end, every
    returned file complete, no partial file in --outdir."""
    cluster, config = cluster3
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", local=True)
    contents = _file_items(tmp_path, 80)
    db = tmp_path / "r.db"
    args = ["--inventory", inventory, "--db", db, "--command", "sleep 0.05; gzip -c {} > {}.gz", "--files",
            "in/*.txt", "--return", "{}.gz", "--outdir", "out", "--block-seconds", "0.2"]
    rng = random.Random(12)
    for _ in range(kills):
        child = _start_map(args, tmp_path, config)
        time.sleep(rng.uniform(1.0, 4.0))
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
    child = _start_map(args, tmp_path, config)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, out + err
    assert rows(db, "SELECT count(*), count(DISTINCT key) FROM map_items") == [(80, 80)]
    for name, data in contents.items():
        assert gzip.decompress((tmp_path / "out" / "in" / (name + ".gz")).read_bytes()) == data
    assert sorted(p.name for p in (tmp_path / "out" / "in").iterdir()) == sorted(n + ".gz" for n in contents)
