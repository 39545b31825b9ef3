"""The live display through a real terminal (a pty with its window size set), and the end of a run."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from cluster.errors import JobError
from cluster.progress import Progress, first_line, host_lines
from harness import fab_argv, fab_env
from harness.hostile import provision

# rich's own sequences: colours and styles, cursor shown/hidden.
SGR = re.compile(r"\x1b\[[0-9;]*m|\x1b\[\?25[lh]")
# Between two frames rich goes back to the frame's first line: CR, erase, (up, erase)*.
REDRAW = re.compile(r"\r\x1b\[2K(?:\x1b\[1A\x1b\[2K)*")
FIGURES = r"(\d{1,3}(?:\.\d)?)% +(\S+)/(\S+) numbers"


def run_in_pty(args, columns: int, rows: int = 24, timeout: float = 120, interrupt_when=None, config=None,
               then=None):
    """Run ``fab ARGS`` with a pty as its terminal, ``columns`` wide; (exit code, output).

    ``interrupt_when(output)``: once true, ``then()`` is called, or else SIGINT goes to
    fab's process group (Ctrl-C).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = fab_env({"TERM": "xterm-256color"})
    for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    proc = subprocess.Popen(fab_argv(args, config), stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    interrupted = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the pty
                    break
                if not data:
                    break
                out += data
            if interrupt_when and not interrupted and interrupt_when(out.decode("utf-8", "replace")):
                interrupted = True
                if then is not None:
                    then()
                else:
                    os.killpg(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"fab did not finish in {timeout}s: {out[-2000:]!r}")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace")


def frames(output: str, label: str = "primes") -> list[list[str]]:
    """Each frame the display drew, as its lines (rich's style sequences stripped)."""
    found = []
    for piece in REDRAW.split(SGR.sub("", output)):
        lines = piece.split("\r\n")
        starts = [i for i, line in enumerate(lines) if line.startswith(label + " ") or re.match(FIGURES, line)]
        if not starts:
            continue
        first = starts[0]
        frame = [lines[first]]
        frame += [line for line in lines[first + 1:] if line.startswith("  ")][:10]
        found.append(frame)
    return found


@pytest.fixture
def local_inventory(tmp_path):
    path = tmp_path / "local.ini"
    path.write_text("[this computer]\naddress = local\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("columns", [60, 80, 100])
def test_first_line_holds_percent_figures_and_eta(local_inventory, tmp_path, columns):
    code, output = run_in_pty(["primes", "--inventory", local_inventory, "--start", "1", "--end", "3e9",
                               "--count-only", "--block-seconds", "0.5", "--db", tmp_path / "r.db"], columns)
    assert code == 0, output[-3000:]
    drawn = frames(output)
    assert len(drawn) >= 2, output[-3000:]
    for frame in drawn:
        for line in frame:
            assert len(line) <= columns, (columns, line)
    for frame in drawn:  # while running: ETA; once the run returned: how long it took
        assert re.search(FIGURES + r" (ETA (--|\d\S*)|took \d)", frame[0]), (columns, frame[0])
    last = drawn[-1]
    # The last frame: the whole range, not the figure of the last refresh during the run.
    assert re.search(r"100% 3\.00G/3\.00G numbers took \d", last[0]), (columns, last[0])
    assert "3,000,000,000 numbers in" in output


@pytest.mark.slow
def test_interrupted_run_ends_on_the_figure_reached_and_why(local_inventory, tmp_path):
    def started(text: str) -> bool:
        return bool(re.search(r"ETA \d", SGR.sub("", text)))

    code, output = run_in_pty(["primes", "--inventory", local_inventory, "--start", "1", "--end", "1e12",
                               "--count-only", "--db", tmp_path / "r.db"], 60, interrupt_when=started)
    assert code == 130, output[-3000:]
    last = frames(output)[-1]
    figures = re.search(FIGURES + " stopped: interrupted", last[0])
    assert figures, last
    assert float(figures.group(1)) < 100
    assert "interrupted: finished blocks are kept" in output


@pytest.mark.slow
def test_run_with_every_host_lost_ends_on_the_figure_reached_and_why(make_cluster, tmp_path):
    cluster = make_cluster(1)
    inventory, config = provision(cluster, tmp_path, "one.ini")

    def started(text: str) -> bool:
        return bool(re.search(r"ETA \d", SGR.sub("", text)))

    try:
        code, output = run_in_pty(["primes", "--inventory", inventory, "--start", "1", "--end", "1e10",
                                   "--count-only", "--block-seconds", "0.3", "--db", tmp_path / "r.db"], 80,
                                  config=config, interrupt_when=started, then=cluster["h1"].kill)
    finally:
        cluster["h1"].start()
    assert code == 1, output[-3000:]
    last = frames(output)[-1]
    figures = re.search(FIGURES + " stopped: every host is lost", last[0])
    assert figures and float(figures.group(1)) < 100, last


@pytest.mark.slow
def test_finished_run_is_not_announced_as_resumed(local_inventory, tmp_path, run_fab):
    args = ["primes", "--inventory", local_inventory, "--start", "1", "--end", "1e6", "--db", tmp_path / "r.db"]
    assert run_fab(args).returncode == 0
    again = run_fab(args)
    assert again.returncode == 0, again.stderr
    assert "run 1 already complete" in again.stdout
    assert "resuming" not in again.stderr + again.stdout


# ------------------------------------------------------------------ layout (pure functions)


@pytest.mark.parametrize("width", range(40, 201, 7))
def test_layout_fits_any_width(width):
    for total in (40, 123_456, 2 * 10**10, 10**15):
        text, at, bar = first_line(width, "primes", total // 3, total, "numbers", "ETA 1h02m", "597.3M numbers/s")
        assert len(text) <= width
        assert re.search(r"\d+(\.\d)?% +\S+/\S+ numbers ETA 1h02m", text), text
        assert bar == 0 or bar >= 8 and text[at:at + bar].strip() == ""
    parts = [f"host-{i} 445.3M/s" for i in range(40)] + ["this computer 1.2G/s"]
    lines = host_lines(width, parts)
    assert 1 <= len(lines) <= 3
    assert all(len(line) <= width for line in lines)
    assert re.search(r"\+\d+ hosts$", lines[-1])


def test_percent_is_100_only_when_done():
    text, _, _ = first_line(80, "primes", 999_999, 1_000_000, "numbers", "ETA 0s", "")
    assert "99.9% " in text


def test_eta_counts_down_between_commits(monkeypatch):
    """Between two commits of big blocks the ETA counts down from the last estimate instead of
    rising with the falling average; slower than that estimate, it is the average's again."""
    import cluster.progress as module

    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    progress = Progress(enabled=False)
    progress(0, 1000, [])
    clock[0] = 110.0
    progress(100, 1000, [])  # 10 items/s: 90 s left
    assert progress.eta_seconds() == pytest.approx(90.0)
    shown = []
    for now in (111.0, 115.0, 130.0):
        clock[0] = now
        progress(100, 1000, [])  # nothing committed: the average falls
        shown.append(progress.eta_seconds())
    assert shown == pytest.approx([89.0, 85.0, 70.0])
    clock[0] = 300.0
    progress(100, 1000, [])  # far slower than estimated: 900 left at 100 / 200 s
    assert progress.eta_seconds() == pytest.approx(1800.0)
    clock[0] = 310.0
    progress(1000, 1000, [])
    assert progress.eta_text() == "ETA 0s"


def test_stopped_reason_is_the_first_clause_of_the_error():
    progress = Progress(enabled=False)
    progress(10, 100, [])
    try:
        with progress:
            raise JobError("every host is lost (h1: refused; h2: refused); finished blocks are kept")
    except JobError:
        pass
    assert progress.eta_text() == "stopped: every host is lost"


# ------------------------------------------------------------------ wording at the end of a run


@pytest.mark.slow
def test_hosts_error_column_wraps_on_a_terminal(make_cluster, tmp_path, run_fab):
    cluster = make_cluster(1)
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    cluster.known_hosts_path.unlink()  # the long "unknown host key ... --accept-new ..." error
    code, output = run_in_pty(["hosts", "--inventory", inventory], 100, config=config)
    assert code == 1, output
    lines = output.replace("\r\n", "\n").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("host "))
    table = lines[header:header + 2] + [line for line in lines[header + 2:] if line.startswith(("h1 ", " "))]
    assert len(table) > 3, output  # the error took several lines
    assert max(len(line) for line in table) <= 150, output
    at = lines[header].index("os / error")
    error = " ".join(line[at:].strip() for line in table[2:])
    assert "unknown host key" in error and "--accept-new" in error and "known_hosts" in error, error
    piped = run_fab(["hosts", "--inventory", inventory], config=config)  # not a terminal: one line a host
    assert re.search(r"^h1 .*unknown host key .*--accept-new.*known_hosts$", piped.stdout, re.M), piped.stdout


def test_parameters_are_whole_pairs():
    from cluster.jobs.scrape import FetchOptions, ScrapeJob
    from cluster.report import human_params, params_lines

    params = json.loads(json.dumps(ScrapeJob(["http://127.0.0.1/a"], FetchOptions()).params()))
    short = human_params(params)
    assert len(short) <= 60 and "{" not in short and re.search(r" \+\d+ more$", short), short
    assert short.startswith("count=1 tor=no robots=yes bodies=yes")
    lines = params_lines(params, width=90)
    assert all(len(line) <= 90 for line in lines)
    pairs = " ".join(lines).split()
    assert all(re.fullmatch(r"[a-z_]+=\S+", pair) for pair in pairs), pairs
    assert {pair.split("=")[0] for pair in pairs} >= {"bodies", "max_bytes", "robots", "timeout", "user_agent"}


def test_plot_of_a_failed_run_without_blocks_says_so(tmp_path, run_fab):
    from cluster.store import Store

    db = tmp_path / "r.db"
    with Store(db) as store:
        run_id = store.open_run("primes", {"start": 1, "end": 1000, "mode": "list"}, 1000)
        store.finish_run(run_id, "failed")
    done = run_fab(["stats", "--db", db, "--run", run_id, "--plot", tmp_path / "img"])
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} failed before any block was finished: no plots written" in done.stderr
    assert "yet" not in done.stderr


@pytest.mark.slow
def test_short_run_names_hosts_still_starting_in_one_line(make_cluster, tmp_path, run_fab):
    cluster = make_cluster(3)
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    setup = run_fab(["setup", "--inventory", cluster.write_inventory(tmp_path / "ssh.ini"), "--no-numpy"],
                    config=config)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    inventory = cluster.write_inventory(tmp_path / "mixed.ini", local=True)
    done = run_fab(["primes", "--inventory", inventory, "--start", "1", "--end", "1000", "--db", tmp_path / "r.db"],
                   config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "168 primes in [1, 1,000]" in done.stdout
    # SSH hosts take seconds to start; this computer did 1,000 numbers before any said hello.
    assert "h1-h3 were still starting when the work was done (local did it alone)" in done.stdout
    assert "not used" not in done.stdout and "warning" not in done.stdout
