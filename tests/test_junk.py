"""Junk in, one clean line out: hypothesis over the inventory, the URL file and every numeric flag.

Any text given to the inventory parser is a list of hosts or an InventoryError whose
message is one line naming the file and a line; any bytes in a URL file are URLs or a
one-line UsageError naming the file (and the line); any string given to a numeric flag
is a value within the flag's bounds or a one-line UsageError naming the flag. Never
another exception, never a traceback: a few tests run ``fab`` with nasty values.

Then what hosts send: any lines read from an agent end the reader cleanly (no traceback)
and pass on only events the coordinator can act on, and a page result is either refused
or safe to decide on and store. tests/test_hostile.py does the same with real processes.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cluster.agents as cluster_agents
from client import primes as client_primes
from cluster.agents import HostLink
from cluster.errors import InventoryError, UsageError
from cluster.inventory import KEYS, MAX_SLOTS, Host, parse_inventory
from cluster.jobs.base import COMMIT, RETRY
from cluster.jobs.primes import PrimesJob
from cluster.jobs.scrape import FetchOptions, InvalidPage, ScrapeJob
from cluster.urls import normalise, read_url_file
from harness.hostile import LinesStream
from tasks.common import parse_float, parse_int
from tasks.primes import MAX_END
from tasks.stats import MAX_START
from tasks.tor import MAX_RESTART_WAIT

JUNK = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
INVENTORY = Path("/nonexistent/beowulf-junk/hosts.ini")  # only named in messages and to resolve identity


def one_line(message: str) -> bool:
    """No line break of any kind (str.splitlines' set: \\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028...)."""
    return len(message.splitlines()) == 1 and message.strip() == message


# ---------------------------------------------------------------- the inventory

_names = st.one_of(st.sampled_from(["this computer", "pi", "a", "DEFAULT", "default", " ", "x y", "[a]", "a]b"]),
                   st.text(max_size=12))
_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(["Address", "PORT", "colour", " port", "", "%", "[x]"]),
                  st.text(string.ascii_lowercase + "_", max_size=10))
_values = st.one_of(
    st.sampled_from(["local", "u@h", "h", "u@[::1]", "u@[fe80::1%eth0]", "a@b@c", "u@h:22", "[::1]", "22", "0", "-1",
                     "1_0", "65536", "٣", "1e3", "x" * 5000, "9" * 5000, "~/k", "/dev/null", "\x00", "%(x)s",
                     "1024", "1025", "19", "20", "python3", "/tmp/my workdir", "a ; comment", "a #comment"]),
    st.text(max_size=30),
)
_line = st.one_of(
    st.builds(lambda name: f"[{name}]", _names),
    st.builds(lambda key, sep, value: f"{key}{sep}{value}", _keys, st.sampled_from([" = ", "=", ":", " : "]), _values),
    st.builds(lambda line: "  " + line, st.text(max_size=20)),  # continuation lines
    st.text(max_size=40),
    st.sampled_from(["", "; comment", "# comment", "[DEFAULT]", "\t", "\r", "\x0c", "\x85", "\u2028", "\ufeff[a]"]),
)
_inventory_text = st.lists(_line, max_size=14).map("\n".join)
_LOCATED = re.compile(r"^(?P<path>.+?):(?P<line>\d+): ")


def _line_of(message: str, path: Path) -> int:
    """The line number an inventory error names; fails the test if it names none."""
    assert message.startswith(f"{path}:"), message
    match = _LOCATED.match(message)
    assert match and match.group("path") == str(path), message
    return int(match.group("line"))


@JUNK
@given(_inventory_text)
@example("")
@example("[a]\naddress = u@h\nidentity = " + "x" * 5000)  # ENAMETOOLONG was a traceback
@example("[a]\x0c\naddress = u@h\n[b]\ncolour = 1")  # \x0c used to shift every later line number
@example("[a\rb]\naddress = u@h\n[a\rb]\n")  # a host name with a carriage return in the message
@example("[a]\naddress = u@h\nslots = 99999999999999999999")
def test_inventory_any_text_gives_hosts_or_one_located_line(text):
    try:
        hosts = parse_inventory(text, INVENTORY)
    except InventoryError as err:
        message = str(err)
        assert one_line(message), repr(message)
        if message == f"{INVENTORY}: no hosts (add a section such as [this computer] with address = local)":
            assert not re.search(r"^\s*\[.+\]", text, re.MULTILINE) or "DEFAULT" in text
            return
        number = _line_of(message, INVENTORY)
        lines = text.split("\n")
        assert 1 <= number <= len(lines), (number, len(lines))
        unknown = re.search(r"unknown key '(.+?)'", message)
        if unknown:  # the line named is the one with that key (configparser lowercases keys)
            assert unknown.group(1) in lines[number - 1].lower(), (message, lines[number - 1])
        if "duplicate host" in message:
            assert "[" in lines[number - 1]
        return
    assert hosts and all(isinstance(host, Host) for host in hosts)
    assert len({host.name for host in hosts}) == len(hosts)
    for host in hosts:
        assert host.address and (host.is_local or host.hostname)
        assert host.port is None or 1 <= host.port <= 65535
        assert host.slots is None or 1 <= host.slots <= MAX_SLOTS
        assert 0 <= host.nice <= 19


_hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5})?", fullmatch=True)
_good_host = st.fixed_dictionaries(
    {"address": st.one_of(st.just("local"), st.builds(lambda u, h: f"{u}@{h}", st.from_regex(r"[a-z_][a-z0-9_]{0,7}",
                                                                                               fullmatch=True),
                                                       _hostnames))},
    optional={"slots": st.integers(1, MAX_SLOTS), "nice": st.integers(0, 19),
              "workdir": st.from_regex(r"~?/[A-Za-z0-9 ._%/-]{1,20}", fullmatch=True).map(str.strip)
              .filter(lambda w: len(w) > 1),
              "python": st.sampled_from(["python3", "/usr/bin/python3.11", "python3.6"])},
)


@JUNK
@given(st.dictionaries(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,12}", fullmatch=True).map(str.strip),
                       _good_host, min_size=1, max_size=5),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_inventory_valid_text_round_trips(hosts, newline, comments):
    """Well-formed inventories give back exactly what they say, comments and Windows newlines included."""
    hosts = {name: keys for name, keys in hosts.items() if name and name.upper() != "DEFAULT"}
    if not hosts:
        return
    text = ""
    for name, keys in hosts.items():
        text += f"[{name}]{'  ; a host' if comments else ''}{newline}"
        for key, value in keys.items():
            port = "" if key != "address" or value == "local" else f"{newline}port = 2222"
            text += f"{key} = {value}{'   # note' if comments else ''}{port}{newline}"
    got = {host.name: host for host in parse_inventory(text.replace("\r\n", "\n"), INVENTORY)}
    assert list(got) == list(hosts)
    for name, keys in hosts.items():
        host = got[name]
        assert host.address == keys["address"]
        assert host.port == (None if keys["address"] == "local" else 2222)
        assert host.slots == keys.get("slots") and host.nice == keys.get("nice", 10)
        assert host.workdir == keys.get("workdir") and host.python == keys.get("python")


# ---------------------------------------------------------------- the URL file

_url_lines = st.one_of(
    st.builds(lambda scheme, host, port, rest: f"{scheme}://{host}{port}{rest}",
              st.sampled_from(["http", "HTTPS", "hTtP", "ftp", ""]),
              st.one_of(st.sampled_from(["a.test", "127.0.0.1", "[::1]", "[v1.x]", "[fe80::1%25eth0]", "u:p@h", "@h",
                                         "Ä.test", "[::1", "xn--", ""]), st.text(max_size=12)),
              st.sampled_from(["", ":", ":80", ":443", ":0", ":65536", ":-1", ":1_0", ":٣"]),
              st.text(max_size=20)),
    st.sampled_from(["", "# comment", "   ", "http://a.test/" + "x" * 9000, "\ufeffhttp://a.test/"]),
    st.text(max_size=40),
)
_url_file = st.one_of(
    st.lists(_url_lines, max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)


@JUNK
@given(_url_file, st.booleans())
@example(b"http://a.test/\n\xff\xfe\n", False)
@example(b"\xef\xbb\xbfhttp://a.test/\r\nhttp://b.test/\r\n", False)  # BOM and Windows newlines
@example(b"http://a.test/\x0cx\n", True)  # a form feed is no line break for the numbering
def test_url_file_any_bytes_gives_urls_or_one_line(tmp_path, data, skip_bad):
    path = tmp_path / "urls.txt"
    path.write_bytes(data)
    try:
        urls, bad, duplicates = read_url_file(str(path), skip_bad=skip_bad)
    except UsageError as err:
        message = str(err)
        assert one_line(message) and message.startswith(f"--urls: {path}"), repr(message)
        rest = message[len(f"--urls: {path}"):]
        whole_file = rest in (": no such file", ": no URLs in it") or rest.startswith(": cannot read:")
        located = re.match(r"^:(\d+): ", rest)
        assert whole_file or located, message
        if located:
            assert 1 <= int(located.group(1)) <= data.count(b"\n") + data.count(b"\r") + 1
        return
    lines = [line.strip() for line in data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    content = [line for line in lines if line and not line.startswith("#")]
    assert urls and len(set(urls)) == len(urls)
    assert len(urls) + len(bad) + duplicates == len(content)
    assert all(normalise(url) == url for url in urls)
    assert not bad or skip_bad
    assert [b.number for b in bad] == sorted(b.number for b in bad)
    for line in bad:
        assert 1 <= line.number <= len(lines) and one_line(line.reason)


@JUNK
@given(_url_lines)
@example("HTTP://Example.COM:80/a?b#c")
@example("http://[::1]:8080")
def test_normalise_is_idempotent_on_what_it_accepts(raw):
    try:
        url = normalise(raw)
    except ValueError as err:
        assert one_line(str(err)), repr(str(err))
        return
    assert normalise(url) == url
    assert url.startswith(("http://", "https://")) and "#" not in url
    assert not any(ch.isspace() or ord(ch) < 32 for ch in url)


# ---------------------------------------------------------------- numeric flags

# Every numeric flag of every task, with the bounds that task gives it.
INT_FLAGS = [
    ("start", dict(minimum=0, maximum=MAX_END)),  # primes
    ("end", dict(minimum=0, maximum=MAX_END)),  # primes
    ("max-bytes", dict(minimum=1, maximum=32_000_000)),  # scrape
    ("per-domain", dict(minimum=1, maximum=1000)),  # scrape
    ("concurrency", dict(minimum=1, maximum=64)),  # scrape
    ("run", dict(minimum=1)),  # stats
    ("start", dict(minimum=0, maximum=MAX_START)),  # calibrate
]
FLOAT_FLAGS = [
    ("block-seconds", dict(above=0, maximum=3600)),  # primes
    ("verify", dict(minimum=0, maximum=1)),  # primes
    ("timeout", dict(above=0, maximum=3600)),  # scrape
    ("delay", dict(minimum=0, maximum=86400)),  # scrape
    ("seconds", dict(above=0, maximum=3600)),  # calibrate
    ("wait", dict(above=0, maximum=MAX_RESTART_WAIT)),  # tor.restart
]
_numberish = st.builds(
    lambda sign, whole, dot, fraction, exponent, pad: f"{pad}{sign}{whole}{dot}{fraction}{exponent}{pad}",
    st.sampled_from(["", "+", "-", "--"]),
    st.one_of(st.from_regex(r"[0-9][0-9_]{0,25}", fullmatch=True),
              st.sampled_from(["", "٣", "１２", "0x1f", "9" * 5000])),
    st.sampled_from(["", ".", ","]), st.from_regex(r"[0-9]{0,6}", fullmatch=True),
    st.one_of(st.just(""), st.builds(lambda e, n: f"{e}{n}", st.sampled_from(["e", "E", "e-", "e+"]),
                                     st.sampled_from(["0", "3", "7", "15", "16", "19", "308", "400", "999999999",
                                                      "99999999999999"]))),
    st.sampled_from(["", " ", "\t"]),
)
_flag_values = st.one_of(_numberish, st.text(max_size=20),
                         st.sampled_from(["inf", "-inf", "nan", "NaN", "Infinity", "1e", "e5", ".", "_1", "1__0",
                                          "None", "0e999999999999", "1e-999999999", "1" * 400 + "e-399", "\n5",
                                          "5\n"]))


def _flag_error(err: UsageError, flag: str) -> None:
    message = str(err)
    assert one_line(message) and message.startswith(f"--{flag}: "), repr(message)
    assert len(message) < 200, message


@JUNK
@given(st.sampled_from(INT_FLAGS), _flag_values)
@example(INT_FLAGS[0], "9" * 5000)  # was a ValueError traceback (int() digit limit)
@example(INT_FLAGS[1], "0e999999999999")  # used to compute 10**999999999999: hung
@example(INT_FLAGS[1], "1e-999999999")  # likewise 10**999999999
def test_int_flags_any_string_gives_a_value_in_bounds_or_one_line(spec, text):
    flag, bounds = spec
    try:
        value = parse_int(flag, text, **bounds)
    except UsageError as err:
        _flag_error(err, flag)
        return
    assert isinstance(value, int) and not isinstance(value, bool)
    assert bounds["minimum"] <= value <= bounds.get("maximum", 2**63)
    plain = text.strip().replace("_", "")
    if re.fullmatch(r"[+-]?[0-9]+", plain):
        assert value == int(plain)


@JUNK
@given(st.sampled_from(FLOAT_FLAGS), _flag_values)
@example(FLOAT_FLAGS[0], "1" * 5000)
def test_float_flags_any_string_gives_a_value_in_bounds_or_one_line(spec, text):
    flag, bounds = spec
    try:
        value = parse_float(flag, text, **bounds)
    except UsageError as err:
        _flag_error(err, flag)
        return
    assert isinstance(value, float) and value == value
    assert value <= bounds["maximum"]
    assert value > bounds["above"] if "above" in bounds else value >= bounds["minimum"]


# ---------------------------------------------------------------- fab itself


@pytest.fixture(scope="module")
def local_ini(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("junk") / "local.ini"
    path.write_text("[this computer]\naddress = local\nslots = 1\n")
    return path


def _refused(done, db: Path) -> None:
    """Exit 2, one line on stderr, no traceback, nothing created."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not db.exists() and not db.with_name(db.name + "-wal").exists()
    assert not (db.parent / "beowulf.log").exists()


@pytest.mark.parametrize("flag, value", [
    ("--start", "9" * 5000),
    ("--start", "1e999999999"),
    ("--start", "1e-999999999"),
    ("--end", "0e999999999999"),  # 0 < --start 5: refused quickly instead of hanging
    ("--start", "nan"),
    ("--start", "\u0663\u0660\u0660x"),
    ("--block-seconds", "inf"),
    ("--verify", "1e400"),
])
def test_fab_primes_nasty_flags(run_fab, tmp_path, local_ini, flag, value):
    db = tmp_path / "x.db"
    args = {"--start": "5", "--end": "10", flag: value}
    argv = ["primes", "--db", db, "--inventory", local_ini]
    for name, given_value in args.items():
        argv += [f"{name}={given_value}"]
    done = run_fab(argv, cwd=tmp_path, timeout=60)
    _refused(done, db)
    assert done.stderr.startswith(f"error: {flag}:") or "--start (5)" in done.stderr, done.stderr


def test_fab_junk_inventory_and_url_file(run_fab, tmp_path, local_ini):
    db = tmp_path / "x.db"
    junk = tmp_path / "junk.ini"
    junk.write_bytes(b"[pi]\r\naddress = u@h\r\nslots = 1e9\r\n")
    done = run_fab(["primes", "--start", "1", "--end", "10", "--db", db, "--inventory", junk], cwd=tmp_path,
                   timeout=60)
    _refused(done, db)
    assert f"{junk}:3: [pi] slots must be a positive integer" in done.stderr
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"http://127.0.0.1:9/a\nhttp://127.0.0.1:9/\xff\n")
    done = run_fab(["scrape", "--urls", urls, "--db", db, "--inventory", local_ini], cwd=tmp_path, timeout=60)
    _refused(done, db)
    assert f"{urls}:2: not UTF-8" in done.stderr
    done = run_fab(["scrape", "--urls", urls, "--db", db, "--inventory", local_ini, "--max-bytes", "9" * 5000],
                   cwd=tmp_path, timeout=60)
    _refused(done, db)
    assert done.stderr.startswith("error: --max-bytes: must be at most")


# ---------------------------------------------------------------- what agents say

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_PRIMES = PrimesJob(1, 10**6)
_SENT = {7: (1, 1000), 8: (1001, 3000)}  # task id -> block, as the coordinator sent them
# A genuine answer for task 7, for the reader to accept among the junk.
_GOOD = {"type": "result", "id": 7, "ok": True, "elapsed": 0.01,
         "result": client_primes.run({"lo": 1, "hi": 1000, "mode": "list"})}
_message = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "result", "beat", "pong", "bye", 5])},
    optional={"id": st.one_of(st.sampled_from([7, 8, 9, True, 7.0, "7", [7], 10**30]), _json), "ok": _json,
              "result": _json, "elapsed": _json, "error": _json, "bundle": _json, "slots": _json, "cores": _json,
              "engines": _json},
)
_agent_line = st.one_of(
    _message.map(lambda m: json.dumps(m).encode() + b"\n"),
    st.binary(max_size=80).map(lambda b: b + b"\n"),
    st.sampled_from([b"\xff\xfe\n", b"[" * 5000 + b"]" * 5000 + b"\n", b"null\n", b'{"type": "beat", "x": "\\ud800"}\n',
                     b'{"type": "result", "id": 8, "ok": false, "error": "a\\nb\\u2028c"}\n', b"no newline at the end",
                     json.dumps(_GOOD).encode() + b"\n"]),
)


@JUNK
@given(st.lists(_agent_line, max_size=25))
@example([b"\xff\n"] * 20)
@example([json.dumps({"type": "hello", "bundle": "b", "slots": 10**9}).encode() + b"\n"])
@example([json.dumps({"type": "hello", "bundle": "b"}).encode() + b"\n", json.dumps(_GOOD).encode() + b"\n",
          json.dumps(_GOOD).encode() + b"\n", json.dumps(dict(_GOOD, id=9)).encode() + b"\n"])
def test_agent_reader_survives_any_lines(caplog, lines):
    """Whatever an agent sends, the reader ends with a hello (or none) and a lost event, never a
    traceback; every event it passes on is one the coordinator can act on without surprises."""
    events: queue.Queue = queue.Queue()
    link = HostLink(Host("h", "u@h", user="u", hostname="h"), None, False, events, _PRIMES.check, "b")
    link._sent = dict(_SENT)
    link.stream = stream = LinesStream(b"".join(lines))
    hello_box: queue.Queue = queue.Queue()
    with caplog.at_level(logging.WARNING, logger="cluster.agents"):
        link._read(stream, link.generation, hello_box)
    assert not [r for r in caplog.records if r.exc_info], "the reader logged a traceback"
    assert all(one_line(r.getMessage()) for r in caplog.records)
    hello = hello_box.get_nowait()
    got = []
    while not events.empty():
        got.append(events.get_nowait())
    if hello is not None:  # then the reader ends with a lost event (else start() gives up on the host)
        assert got and got[-1].kind == "lost" and one_line(got[-1].reason)
        got.pop()
        if not cluster_agents._hello_problem(hello):  # what start() and the coordinator then rely on
            assert 1 <= int(hello.get("slots") or hello.get("cores") or 1) <= MAX_SLOTS
            (hello.get("engines") or {}).get("primes")
    for event in got:
        assert event.kind in ("result", "beat")
        if event.kind != "result":
            continue
        message = event.message
        assert type(message["id"]) is int and message["id"] in _SENT
        if not message.get("ok"):
            assert isinstance(message["error"], str) and one_line(message["error"])
        elif event.checked is not None:
            assert event.invalid is None and event.checked[0] == 168
            assert math.isfinite(float(message.get("elapsed") or 0.0))
            assert isinstance(message.get("result") or {}, dict)
        json.dumps(message, ensure_ascii=False).encode("utf-8")  # storable: no lone surrogates


_page = st.fixed_dictionaries(
    {},
    optional={key: st.one_of(_json, st.sampled_from([200, 404, 429, 503, "x", 1e308, -1, float("nan")]))
              for key in ("status", "size", "error_kind", "retry_after", "elapsed", "title", "error", "final_url",
                          "content_type", "sha256", "truncated", "via_proxy")}
    | {"robots": st.one_of(_json, st.fixed_dictionaries({}, optional={
        "status": _json, "text": _json, "crawl_delay": st.one_of(_json, st.sampled_from([0.5, float("inf")]))}))},
)


@JUNK
@given(_page)
@example({"status": {"a": 1}})
@example({"status": 429, "retry_after": float("nan")})
@example({"robots": {"status": 200, "text": ["not", "text"]}})
@example({"robots": {"status": 200, "crawl_delay": "soon"}})
def test_scrape_check_lets_through_only_what_decide_and_store_can_use(page):
    """A page result from a host is InvalidPage, or safe to decide on and to store."""
    job = ScrapeJob(["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], FetchOptions())
    job.make_schedule([])
    _, block = job.schedule.next_block("h")
    try:
        job.check(block.lo, block.hi, page)
    except InvalidPage as err:
        assert one_line(str(err))
        return
    decision = job.decide(block, page, "h")
    assert decision.action in (COMMIT, RETRY)
    if decision.action == RETRY:
        assert math.isfinite(decision.delay) and decision.delay >= 0
    [(table, record)] = job.rows(block, page, "h")
    assert table == "pages"
    assert all(value is None or type(value) in (int, float, str) for value in record.values()), record
