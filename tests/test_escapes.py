"""Terminal escapes from hosts and web servers (issue 9 §4, SECURITY.md "Terminal escapes").

A host whose ``python`` is replaced by a wrapper puts escape sequences (set the window
title, colours, a one-byte C1 CSI, bidi overrides, line separators) into everything it
says: its hello (``engines``, ``bundle``), its results (``engine``), a task error, its
stderr and its probe facts. A real local HTTP server does the same in its status
reason, headers, <title> and Location. Then fab primes, scrape, hosts and stats (table,
json, csv, --plot) run, and no raw control character may reach stdout, stderr,
beowulf.log, an export, or a plot label: each shows as its escape (``\\x1b``).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

from cluster.shown import EscapingFormatter, json_text, shown, shown_rows
from harness import fab_argv, fab_env
from harness.hostile import executable
from harness.web import WebServer, _Handler, _Server

# What a hostile host or server sends: title, colour, C1 CSI, RLO, line separator, DEL, NEL.
EVIL = "\x1b]0;pwned\x07\x1b[31mred\x9b2J\u202eevil\u2028\x7f\x85"
SEEN = "\\x1b]0;pwned\\x07\\x1b[31mred\\x9b2J\\u202eevil\\u2028\\x7f\\x85"
# Characters that must never be shown raw (newline and tab are checked where they are legitimate).
FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def raw_controls(data, where: str) -> list:
    """The control characters in ``data`` (bytes must be valid UTF-8), with some context."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            return [f"{where}: not UTF-8 at {err.start}: {data[max(0, err.start - 30):err.start + 10]!r}"]
    return [f"{where}: {data[max(0, m.start() - 30):m.end() + 10]!r}" for m in FORBIDDEN.finditer(data)]


# ---------------------------------------------------------------- the escaping itself


def test_shown_escapes_controls_c1_bidi_and_is_idempotent():
    assert shown(EVIL) == SEEN
    assert shown(SEEN) == SEEN  # a backslash stays: escaping twice changes nothing
    assert shown("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert shown("a\nb\tc\rd", keep_lines=True) == "a\nb\tc\\rd"
    assert shown("\ud800 lone") == "\\ud800 lone"
    assert shown("é 中 ü ok") == "é 中 ü ok" and shown(None) == "" and shown(12) == "12"
    assert shown_rows([["h1", 3, None, EVIL]]) == [["h1", 3, None, SEEN]]
    for text in (EVIL, "\ud800", "plain"):
        dumped = json_text({"k": text})
        assert json.loads(dumped) == {"k": text} and not raw_controls(dumped, "json")


def test_log_formatter_escapes_every_line_and_keeps_tracebacks():
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "h1: %s", (EVIL + "\nW forged line",), None)
    line = formatter.format(record)
    assert line == f"WARNING h1: {SEEN}\\nW forged line"
    try:
        raise ValueError(EVIL)
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert "Traceback" in text and "\n" in text and not raw_controls(text.replace("\n", ""), "traceback")


# ---------------------------------------------------------------- a hostile host

# The host's "python": runs the real one, and puts EVIL into whatever it says (MODE "engine":
# hello engines, result engine, one task error, probe facts; MODE "bundle": the hello's bundle
# hash, and a probe that fails with EVIL on stderr). Both write EVIL raw on stderr.
FAKE_PYTHON = r'''#!/usr/bin/env python3
import json, subprocess, sys
MODE = %(mode)r
EVIL = %(evil)r
out = sys.stdout.buffer
sys.stderr.buffer.write(b"raw \x1b]0;pwned-stderr\x07 \x9b \x1b[31m\n" + ("text " + EVIL + "\n").encode())
sys.stderr.flush()
probe = not any(arg.endswith("agent.py") for arg in sys.argv[1:])
if probe and MODE == "bundle":
    sys.exit(1)
child = subprocess.Popen(["python3"] + sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)
failed = False
try:
    for line in child.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            out.write(line)
            out.flush()
            continue
        if probe and isinstance(message, dict) and "python" in message:
            message["os"] = EVIL
            message["arch"] = EVIL
        elif message.get("type") == "hello":
            if MODE == "bundle":
                message["bundle"] = EVIL
            else:
                message["engines"] = dict(message.get("engines") or {}, primes=EVIL)
        elif message.get("type") == "result" and message.get("ok") and "engine" in (message.get("result") or {}):
            if not failed:
                failed = True
                message = {"type": "result", "id": message["id"], "ok": False, "error": EVIL, "elapsed": 0.1}
            else:
                message["result"]["engine"] = EVIL
        out.write((json.dumps(message) + "\n").encode())
        out.flush()
except OSError:
    pass
finally:
    child.kill()
'''


def fake_python(folder: Path, mode: str) -> Path:
    return executable(folder, f"python-{mode}", FAKE_PYTHON % {"mode": mode, "evil": EVIL})


# ---------------------------------------------------------------- a hostile web server


class _EvilHandler(_Handler):
    def _route_evil(self, arg, query, vhost) -> None:
        body = self._html(f"{EVIL} title")
        self.send_response(200, "OK \x1b]0;pwned\x07\x1b[31m\x9b\x85")  # a status line is latin-1
        self.send_header("Content-Type", "text/html; charset=utf-8; x=\x1b[31m\x9b")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Evil", "\x1b]0;pwned\x07")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _route_evilstatus(self, arg, query, vhost) -> None:
        self.send_response(404, "\x1b]0;pwned\x07\x1b[31m\x9b")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def _route_evilredirect(self, arg, query, vhost) -> None:
        self.send_response(302)
        self.send_header("Location", "/x\x1b]0;pwned\x07\x1b[31m\x9b")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()


class EvilWeb(WebServer):
    """The harness's web server plus /evil, /evilstatus and /evilredirect."""

    def start(self) -> EvilWeb:
        import threading

        self._server = _Server((self.ip, self._want_port), type("Handler", (_EvilHandler,), {"web": self}))
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        return self


# ---------------------------------------------------------------- the attack, end to end


def fab(args, cwd: Path, config: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``fab ARGS`` with stdout and stderr as bytes (text mode would turn a raw CR into a newline)."""
    return subprocess.run(fab_argv(args, config), cwd=cwd, env=fab_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_hostile_host_and_web_server_never_reach_the_terminal_raw(make_cluster, tmp_path):
    cluster = make_cluster(2)
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    done = fab(["setup", "--inventory", cluster.write_inventory(tmp_path / "setup.ini"), "--no-numpy"],
               tmp_path, config)
    assert done.returncode == 0, done.stdout + done.stderr
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={
        "h1": {"python": fake_python(tmp_path, "engine"), "slots": 1},
        "h2": {"python": fake_python(tmp_path, "bundle"), "slots": 1}})
    db = tmp_path / "r.db"
    outputs: dict = {}

    def run(name, args, codes=(0,)):
        done = fab(args, tmp_path, config)
        assert done.returncode in codes, (name, done.stdout.decode(errors="replace"),
                                          done.stderr.decode(errors="replace"))
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = done.stdout, done.stderr
        # CSV rows end in CRLF (RFC 4180, Python's csv): the only CR allowed.
        problems = raw_controls(done.stdout.replace(b"\r\n", b"\n") if "csv" in name else done.stdout,
                                f"{name} stdout") + raw_controls(done.stderr, f"{name} stderr")
        assert not problems, "\n".join(problems[:20])
        return done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")

    said = run("primes", ["primes", "--inventory", inventory, "--start", "1", "--end", "1e6", "--db", db])
    assert "78,498 primes" in said
    assert SEEN[:20] in said  # the engine column and the left-out host's bundle, escaped
    said = run("hosts", ["hosts", "--inventory", inventory], codes=(3,))
    assert "\\x1b]0;pwned" in said

    with EvilWeb(robots="User-agent: *\nDisallow:\n") as web:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(web.url(p) + "\n" for p in ("/evil", "/evilstatus", "/evilredirect", "/page/1")))
        run("scrape", ["scrape", "--urls", urls, "--inventory", inventory, "--hosts", "h1", "--db", db,
                       "--delay", "0", "--export", tmp_path / "pages", "--verbose"])
    for what in (["--run", "1"], ["--last"], []):
        for style in ("table", "json", "csv", "github"):
            said = run(f"stats {what} {style}", ["stats", "--db", db, "--format", style, *what])
    run("stats plot", ["stats", "--db", db, "--run", "1", "--plot", tmp_path / "plots"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "run1-rates.png", "run1-sum.png", "run1-timeline.png"]

    outputs["beowulf.log"] = (tmp_path / "beowulf.log").read_bytes()
    index = (tmp_path / "pages" / "index.jsonl").read_bytes()
    problems = raw_controls(outputs["beowulf.log"], "beowulf.log") + raw_controls(index, "export index")
    assert not problems, "\n".join(problems[:20])
    # What was received is stored as received, and the export decodes to it.
    log = outputs["beowulf.log"].decode()
    # h1's first result is always its forged task error; its stderr lines and h2's "left out" line
    # reach the log only if they arrive before the run ends (raw_controls above checked them if so).
    assert "failure: \\x1b]0;pwned\\x07\\x1b[31mred" in log
    records = {json.loads(line)["url"].rsplit("/", 1)[1]: json.loads(line) for line in index.decode().splitlines()}
    assert "\x1b]0;pwned\x07" in records["evil"]["title"] and "\u202e" in records["evil"]["title"]
    assert "\x1b[31m" in records["evil"]["content_type"]
    assert "\\u001b]0;pwned" in index.decode()
    from cluster.store import Store

    with Store(db) as store:
        engines = {(b.get("meta") or {}).get("engine") for b in store.blocks(1)}
    assert EVIL in engines
    assert "\\x1b]0;pwned" in outputs["stats ['--run', '1'] table stdout"].decode()
    assert "\\x1b]0;pwned" in outputs["stats ['--run', '1'] csv stdout"].decode()
    check_plot_labels(db)


def check_plot_labels(db: Path) -> None:
    """Every text matplotlib would draw for run 1 (its engine is EVIL) holds no control character."""
    import time

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from cluster import plots
    from cluster.report import run_report
    from cluster.store import Store

    with Store(db) as store:
        run = store.run(1)
        blocks, events = store.blocks(1), store.events(1)
        report = run_report(run, blocks, events, store.hosts(), store.calibrations("primes"), time.time(), False)
    colors = plots._host_colors(report, None)
    texts = []
    for figure in (plots.rates_figure(plt, report, colors), plots.sum_figure(plt, report, colors),
                   plots.timeline_figure(plt, report, blocks, events, colors)):
        texts += [t.get_text() for t in figure.findobj(Text)]
        plt.close(figure)
    assert any("\\x1b]0;pwned" in t for t in texts), texts
    problems = [p for t in texts for p in raw_controls(t.replace("\n", " "), "plot label")]
    assert not problems, problems
