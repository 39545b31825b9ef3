"""Junk in, one clean line out: hypothesis over the inventory, the URL file and every numeric flag.

Any text given to the inventory parser is a list of hosts or an InventoryError whose
message is one line naming the file and a line; any bytes in a URL file are URLs or a
one-line UsageError naming the file (and the line); any string given to a numeric flag
is a value within the flag's bounds or a one-line UsageError naming the flag. Never
another exception, never a traceback: the last tests run ``fab`` with nasty values.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster.errors import InventoryError, UsageError
from cluster.inventory import KEYS, MAX_SLOTS, Host, parse_inventory
from cluster.urls import normalise, read_url_file
from tasks.common import parse_float, parse_int
from tasks.primes import MAX_END
from tasks.stats import MAX_START
from tasks.tor import MAX_RESTART_WAIT

JUNK = settings(max_examples=150, deadline=None,
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
    ("max-bytes", dict(minimum=1, maximum=2**31)),  # scrape
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
    st.one_of(st.from_regex(r"[0-9][0-9_]{0,25}", fullmatch=True), st.sampled_from(["", "٣", "１２", "0x1f", "9" * 5000])),
    st.sampled_from(["", ".", ","]), st.from_regex(r"[0-9]{0,6}", fullmatch=True),
    st.one_of(st.just(""), st.builds(lambda e, n: f"{e}{n}", st.sampled_from(["e", "E", "e-", "e+"]),
                                     st.sampled_from(["0", "3", "7", "15", "16", "19", "308", "400", "999999999",
                                                      "99999999999999"]))),
    st.sampled_from(["", " ", "\t"]),
)
_flag_values = st.one_of(_numberish, st.text(max_size=20),
                         st.sampled_from(["inf", "-inf", "nan", "NaN", "Infinity", "1e", "e5", ".", "_1", "1__0", "None",
                                          "0e999999999999", "1e-999999999", "1" * 400 + "e-399", "\n5", "5\n"]))


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
