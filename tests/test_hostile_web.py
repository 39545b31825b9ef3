"""A hostile web server or host against ``fab scrape``, with real components (issue 9, §2, §3, §5).

Client level (client/scrape.py against a real local server, no mocks):

- any Location header, status line and header block (hypothesis, bounded and
  derandomised) ends as a result: fetched, or a page error (``bad redirect``, shown
  escaped and cut) that the coordinator accepts; never an exception that would fail the
  block on every host;
- a redirect from a "public" address to a private one is refused, judged on the address
  connected to. All traffic stays on 127.0.0.0/8, so the test says which ranges count as
  private the way a user does (``private_networks``, fabric.yaml
  ``beowulf.private_networks``): ``127.0.0.1/32`` only, so a site on 127.0.0.2 is public.
  The code that decides is the production code; only its list of ranges differs.

Run level: ``fab scrape`` over sshd hosts, one of them with its agent replaced by a
wrapper that sends a zlib bomb or a cut-off zlib stream as a page body; bad redirects
end as page errors and the run exits 0; --export of a damaged store reports one line.

No name is ever looked up by the system resolver: direct fetches use IP literals (and
``localhost``, from /etc/hosts); other names go only through the test SOCKS server.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import sqlite3
import sys
import zlib
from pathlib import Path
from urllib.parse import quote_from_bytes, urljoin, urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cluster.jobs.scrape import FetchOptions, InvalidPage, ScrapeJob, inflate, iter_pages
from cluster.scheduler import Block
from cluster.store import Store
from harness import run_fab
from harness.hostile import executable, provisioned_cluster
from harness.socks5 import Socks5Server
from harness.web import RawServer, WebServer

CLIENT = Path(__file__).resolve().parent.parent / "client"
if str(CLIENT) not in sys.path:
    sys.path.insert(0, str(CLIENT))

import scrape  # noqa: E402 - client/ is put on sys.path just above, as the agent's workers do

UA = "beowulf-test/1.0"
NO_ROBOTS_DELAY = "User-agent: *\nDisallow: /private\n"
FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])
# Only 127.0.0.1 counts as private in these tests: 127.0.0.2 plays a public site.
ONLY_LOCALHOST = ["127.0.0.1/32"]


def printable(text: str) -> bool:
    return all(32 <= ord(ch) < 127 for ch in text)


def judged_by_coordinator(result: dict, max_bytes: int = 100_000) -> None:
    """The coordinator accepts what an honest client says, and can decide on it and record it."""
    job = ScrapeJob(["http://127.0.0.1/"], FetchOptions(max_bytes=max_bytes))
    job.check(0, 0, dict(result))
    block = Block(0, 0)
    block.attempts = 1
    job.rows(block, result, "h")


def check_result(result: dict) -> None:
    assert result["error_kind"] in (None,) + scrape.ERROR_KINDS
    assert (result["error"] is None) == (result["error_kind"] is None)
    if result["error"] is not None:
        assert printable(result["error"]) and len(result["error"]) < 600, result["error"]
        assert "internal error" not in result["error"], result["error"]
    assert result["status"] is not None or result["error"] is not None
    judged_by_coordinator(result)


# ---------------------------------------------------------------- bad Location values

# (Location bytes, what the error starts with); {port} is the server's port.
BAD_LOCATIONS = [
    (b"http://[foo/", "bad redirect: http://[foo/"),
    (b"http://a b.test/", "bad redirect: http://a b.test/"),
    (b"//[::1", "bad redirect: //[::1"),
    (b"http://a\x00b/", "bad redirect: http://a\\x00b/"),
    (b"http://\x1b[31mred/", "bad redirect: http://\\x1b[31mred/"),
    (b"http://\xff\xfe\x80/", "bad redirect: http://\\xff\\xfe\\x80/"),
    (b"http://127.0.0.1:99999/", "bad redirect: http://127.0.0.1:99999/"),
    (b"http://" + b"a" * 3000 + b"/", "bad redirect: http://aaaa"),
    (b"http://x/" + b"p" * 9000, "bad redirect: a Location of 9009 characters"),
    (b"javascript:alert(1)", "redirect to a URL that is not http(s): javascript:alert(1)"),
]


@pytest.fixture
def web():
    with WebServer(robots=NO_ROBOTS_DELAY) as server:
        yield server


@pytest.mark.parametrize("location,starts", BAD_LOCATIONS, ids=[str(i) for i in range(len(BAD_LOCATIONS))])
def test_bad_location_is_the_pages_error(web, location, starts):
    """Each Location urljoin/http.client cannot use is the page's recorded error, escaped and cut."""
    url = web.url("/location?v=" + quote_from_bytes(location, safe=""))
    result = scrape.run({"url": url, "user_agent": UA, "timeout": 10, "robots": {"fetch": True}})
    check_result(result)
    assert result["error_kind"] == "redirects" and result["status"] in (301, 302)
    assert result["error"].startswith(starts), result["error"]
    assert len(result["error"]) < 400


def test_non_ascii_and_long_hosts_through_the_proxy(web):
    """A non-ASCII host (IDNA) and a host too long for IDNA: the proxy is asked for the name, or nothing."""
    with Socks5Server() as proxy:
        for location, kind in [("http://\u00e9x\u00e4.test/".encode(), "connect"),  # port 80 refused
                               (b"http://" + b"a" * 3000 + b".test/", "redirects")]:
            url = web.url("/location?v=" + quote_from_bytes(location, safe=""), host="site.test")
            result = scrape.run({"url": url, "user_agent": UA, "timeout": 10, "proxy": proxy.address})
            check_result(result)
            assert result["error_kind"] == kind, result
        assert [e.host for e in proxy.log] == ["site.test", "xn--x-dcan5uc.test", "site.test"]


# ---------------------------------------------------------------- fuzz: whatever a server answers

_IP_HOSTS = ["127.0.0.1:{port}", "127.0.0.1", "[::1]:{port}", "127.0.0.2:{free}", "127.0.0.1:0", "127.0.0.1:",
             "[::ffff:127.0.0.1]:{port}", "2130706433:{port}", "127.1:{port}", "0x7f.1:{port}"]
_BAD_HOSTS = ["[foo", "a b", "a\x00b", "\u00e9\x00", "[::1", "x" * 300, "a" * 64 + ".b", "%", "[]", "@", ":80",
              "user@", "a:b@[x", "\x1b]0;title\x07", "a\tb", "\x85"]
_SCHEMES = ["http://", "https://", "HTTP://", "ftp://", "", "//", "javascript:", "http:", "http:/", "data:,"]
_text = st.text(alphabet=st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=40)


@st.composite
def locations(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # relative
        return ("/" + draw(_text)).encode("latin-1")
    if kind == 1:  # anything
        return draw(_text).encode("latin-1")
    host = draw(st.sampled_from(_IP_HOSTS + _BAD_HOSTS))
    return (draw(st.sampled_from(_SCHEMES)) + host + draw(st.sampled_from(["", "/", "/page/1", "?q", "#f", "/%zz"]))
            + draw(_text)).encode("latin-1")


_statuses = st.one_of(
    st.sampled_from([b"HTTP/1.1 302 Found", b"HTTP/1.0 301 Moved", b"HTTP/1.1 307", b"HTTP/1.1 308 x",
                     b"HTTP/1.1 303 See", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 No", b"HTTP/1.1 999 X",
                     b"HTTP/1.1 1000 X", b"HTTP/1.1 -1 X", b"HTTP/2 302 X", b"ICY 200 OK", b"", b"HTTP/1.1",
                     b"HTTP/1.1 302 \x1b[31mred\x1b[0m", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 302 X",
                     b"HTTP/9.9 302 X", b"http/1.1 302 x"]),
    st.builds(lambda n: b"HTTP/1.1 302 " + b"r" * n, st.just(70000)),
    st.builds(lambda code, reason: b"HTTP/1.1 %d %s" % (code, reason), st.integers(0, 1100),
              st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
_header_names = st.sampled_from([b"Location", b"location", b"LOCATION", b"Location ", b" Location", b"Content-Length",
                                 b"Transfer-Encoding", b"Content-Type", b"Content-Encoding", b"Retry-After",
                                 b"X-Junk", b"", b"\x1b", b"Set-Cookie"])
_header_values = st.one_of(
    locations(),
    st.sampled_from([b"0", b"5", b"-1", b"99999999999999999999", b"chunked", b"gzip", b"text/html; charset=idna",
                     b"text/html; charset=rot13", b"text/html; charset=utf-32", b"nan", b"1e400", b"Tue, 99 Foo",
                     b"0 0 0 0 0", b"\x00\x01\x7f\xff"]),
    st.builds(lambda n: b"x" * n, st.just(70000)),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
_headers = st.lists(st.tuples(_header_names, st.sampled_from([b": ", b":", b" : ", b""]), _header_values), max_size=6)
_bodies = st.one_of(st.just(b""), st.sampled_from([b"<title>\x1b[2Jhi</title>", b"0\r\n\r\n", b"5\r\nab"]),
                    st.binary(max_size=100))


def _response(status: bytes, headers, body: bytes, newline: bytes) -> bytes:
    lines = [status] + [name + sep + value for name, sep, value in headers]
    return newline.join(lines) + newline + newline + body


def _touches_dns(base: str, response: bytes) -> bool:
    """Whether a Location in ``response`` names a host the system resolver could be asked about.

    Conservative (any header line is tried as a Location), so direct fetches never leave 127.0.0.0/8.
    """
    for line in response.split(b"\n")[1:]:
        value = line.split(b":", 1)[-1].decode("latin-1").strip()
        try:
            host = urlsplit(urljoin(base, value)).hostname
        except Exception:
            continue
        if not host:
            continue
        try:
            ipaddress.ip_address(host.split("%")[0])
            continue
        except ValueError:
            pass
        if host == "localhost":
            continue
        return True
    return False


@pytest.fixture(scope="module")
def raw():
    with RawServer() as server:
        yield server


@pytest.fixture(scope="module")
def socks():
    with Socks5Server() as server:
        yield server


@settings(FUZZ, max_examples=200)
@given(status=_statuses, headers=_headers, body=_bodies, newline=st.sampled_from([b"\r\n", b"\n"]))
@example(status=b"HTTP/1.1 302 Found", headers=[(b"Location", b": ", b"http://[foo/")], body=b"", newline=b"\r\n")
@example(status=b"HTTP/1.1 301 X", headers=[(b"Location", b": ", b"http://a b.test/")], body=b"", newline=b"\r\n")
@example(status=b"HTTP/1.1 200 OK", headers=[(b"Content-Type", b": ", b"text/html; charset=idna")],
         body=b"<title>x</title>", newline=b"\r\n")
@example(status=b"HTTP/1.1 429 X", headers=[(b"Retry-After", b": ", b"0 0 0 0 0")], body=b"", newline=b"\r\n")
def test_fuzz_any_answer_is_a_result(raw, status, headers, body, newline):
    """Whatever comes back (status line, headers, Location, body), directly: a result the coordinator takes."""
    response = _response(status, headers, body, newline)
    base = raw.url("/start")
    response = response.replace(b"{port}", str(raw.port).encode()).replace(b"{free}", b"9")
    assume(not _touches_dns(base, response))
    raw.response = response
    result = scrape.run({"url": base, "user_agent": UA, "timeout": 5, "max_redirects": 3, "max_bytes": 100_000})
    check_result(result)


@FUZZ
@given(location=_text.map(lambda t: t.encode("latin-1")), code=st.sampled_from([301, 302, 303, 307, 308]))
@example(location="http://\u00e9x\u00e4.test/".encode(), code=302)
@example(location=b"http://[foo/", code=301)
@example(location=b"http://a b.test/", code=307)
def test_fuzz_any_location_through_the_proxy(raw, socks, location, code):
    """Any Location value (names included: only the test SOCKS server resolves them)."""
    raw.response = b"HTTP/1.1 %d X\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (code, location)
    result = scrape.run({"url": raw.url("/start", host="raw.test"), "user_agent": UA, "timeout": 5,
                         "max_redirects": 2, "proxy": socks.address})
    check_result(result)


# ---------------------------------------------------------------- redirects to private addresses


@pytest.fixture
def sites():
    """A "public" site on 127.0.0.2 and an internal one on 127.0.0.1 (ONLY_LOCALHOST is private)."""
    with WebServer(ip="127.0.0.2", robots=NO_ROBOTS_DELAY) as public, \
            WebServer(ip="127.0.0.1", robots=NO_ROBOTS_DELAY) as internal:
        yield public, internal


def to(site: WebServer, target: str) -> str:
    return site.url("/location?v=" + quote_from_bytes(target.encode(), safe=""))


@pytest.mark.parametrize("robots", [None, {"fetch": True}])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_redirect_from_public_to_private_is_refused(sites, robots, host):
    """Not a byte of a request reaches the internal site (nor its robots.txt); the error names the redirect.
    ``localhost`` is a name: what is judged is the address connected to."""
    public, internal = sites
    secret = internal.url("/private/secret", host=host)
    result = scrape.run({"url": to(public, secret), "user_agent": UA, "timeout": 10, "robots": robots,
                         "private_networks": ONLY_LOCALHOST})
    check_result(result)
    assert result["error_kind"] == "redirects"
    assert result["error"].startswith(f"redirect to a private address refused: {secret} (connected to 127.0.0.1")
    assert internal.requests == []
    assert "body" not in result


def test_private_redirect_allowed_when_asked_or_when_the_url_is_private(sites):
    public, internal = sites
    secret = internal.url("/page/9")
    allowed = scrape.run({"url": to(public, secret), "user_agent": UA, "timeout": 10,
                          "private_networks": ONLY_LOCALHOST, "allow_private_redirects": True})
    assert allowed["status"] == 200 and allowed["final_url"] == secret
    # The URL's own address is private (both sites count as private): its redirects may go anywhere private.
    inside = scrape.run({"url": to(public, secret), "user_agent": UA, "timeout": 10,
                         "private_networks": ["127.0.0.0/8"]})
    assert inside["status"] == 200 and inside["final_url"] == secret
    # The default ranges: loopback is private, so a loopback URL may redirect within loopback.
    assert scrape.run({"url": to(public, secret), "user_agent": UA, "timeout": 10})["status"] == 200
    # A public-to-public redirect is followed.
    hop = scrape.run({"url": to(public, public.url("/page/2")), "user_agent": UA, "timeout": 10,
                      "private_networks": ONLY_LOCALHOST})
    assert hop["status"] == 200 and hop["title"] == "Page 2"


def test_private_redirect_through_the_proxy_names_are_left_to_it(web):
    """Through a proxy the socket is the proxy's: a literal private address or localhost in a
    redirect is refused before the proxy is asked; a name is the proxy's (Tor's) to refuse."""
    with Socks5Server() as proxy:
        for target in (web.url("/page/1"), web.url("/page/1", host="localhost")):
            result = scrape.run({"url": to_named(web, target), "user_agent": UA, "timeout": 10,
                                 "proxy": proxy.address})
            check_result(result)
            assert result["error_kind"] == "redirects", result
            assert "private address refused" in result["error"] and "through the proxy" in result["error"]
        assert {e.host for e in proxy.log} == {"site.test"}


def to_named(site: WebServer, target: str) -> str:
    return site.url("/location?v=" + quote_from_bytes(target.encode(), safe=""), host="site.test")


def test_networks_judge_mapped_and_nat64_addresses():
    nets = scrape.Networks(scrape.PRIVATE_NETWORKS)
    for address in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe",
                    "fe80::1%eth0", "ff02::1", "224.0.0.1", "0.0.0.0", "100.64.0.1", "not an address"):
        assert nets.contains(address), address
    for address in ("93.184.216.34", "2606:4700::1111", "8.8.8.8"):
        assert not nets.contains(address), address
    assert nets.literal("LOCALHOST.") and nets.literal("a.localhost") and not nets.literal("example.org")


# ---------------------------------------------------------------- bodies checked at the coordinator


def _result_with(body_bytes: bytes, size: int, sha: str) -> dict:
    return {"url": "http://127.0.0.1/", "final_url": "http://127.0.0.1/", "status": 200, "size": size,
            "sha256": sha, "body": base64.b64encode(body_bytes).decode()}


def test_coordinator_refuses_bombs_and_cut_streams_and_drops_unasked_bodies():
    bomb = zlib.compress(bytes(20_000_000), 9)
    job = ScrapeJob(["http://127.0.0.1/"], FetchOptions(max_bytes=1000))
    head = bytes(1001)
    with pytest.raises(InvalidPage, match="over --max-bytes"):
        job.check(0, 0, _result_with(bomb, 1001, hashlib.sha256(head).hexdigest()))
    with pytest.raises(InvalidPage, match="longer than 1064 bytes compressed"):  # 20 kB of zlib: no inflating
        job.check(0, 0, _result_with(bomb, 1000, hashlib.sha256(bytes(1000)).hexdigest()))
    small_bomb = zlib.compress(bytes(200_000), 9)  # within the compressed bound, inflates 200 times over
    with pytest.raises(InvalidPage, match="more than 1000 bytes"):
        job.check(0, 0, _result_with(small_bomb, 1000, hashlib.sha256(bytes(1000)).hexdigest()))
    page = b"<title>x</title>" * 50
    cut = zlib.compress(page)[:-10]
    partial = zlib.decompressobj().decompress(cut)
    with pytest.raises(InvalidPage, match="cut off"):
        job.check(0, 0, _result_with(cut, len(partial), hashlib.sha256(partial).hexdigest()))
    with pytest.raises(InvalidPage, match="after the end"):
        job.check(0, 0, _result_with(zlib.compress(page) + b"x", len(page), hashlib.sha256(page).hexdigest()))
    good = _result_with(zlib.compress(page), len(page), hashlib.sha256(page).hexdigest())
    assert job.check(0, 0, dict(good))[1] == zlib.compress(page)
    no_bodies = ScrapeJob(["http://127.0.0.1/"], FetchOptions(max_bytes=1000, bodies=False))
    assert no_bodies.check(0, 0, _result_with(bomb, 1000, "0" * 64)) == (1, None)
    huge = ScrapeJob(["http://127.0.0.1/"], FetchOptions(max_bytes=100))
    with pytest.raises(InvalidPage, match="compressed"):
        huge.check(0, 0, _result_with(b"\x00" * 10_000, 10, "0" * 64))
    with pytest.raises(ValueError):
        inflate(b"junk", 10)


def test_robots_text_is_capped_at_the_client_and_checked_at_the_coordinator(web):
    web.robots = "User-agent: *\nDisallow: /private\n# " + "\ufffd" * 400_000 + "\n"  # 1.2 MB
    result = scrape.run({"url": web.url("/page/1"), "user_agent": UA, "timeout": 10, "robots": {"fetch": True}})
    text = result["robots"]["text"]
    assert len(text.encode("utf-8")) <= scrape.ROBOTS_MAX_BYTES
    judged_by_coordinator(result)
    job = ScrapeJob(["http://127.0.0.1/"], FetchOptions())
    result["robots"]["text"] = "a" * (scrape.ROBOTS_MAX_BYTES + 1)
    with pytest.raises(InvalidPage, match="robots text is over"):
        job.check(0, 0, result)


def test_isolation_tag_has_no_task_id():
    """The coordinator's tag names the run and the host; the client adds the worker's slot."""

    class Link:
        name, slots = "h1", 2

        class host:
            socks = "127.0.0.1:9050"

    job = ScrapeJob(["http://127.0.0.1/"], FetchOptions(tor=True, robots=False))
    job.bind(5, None)
    tags = {job.task_args_for(Block(0, 0), Link, task_id)["isolation"] for task_id in range(6)}
    assert tags == {"beowulf-5-h1"}


# ---------------------------------------------------------------- end to end over sshd hosts

# The "python" of a host: runs the real agent and rewrites each scrape result's body per MODE.
FAKE_PYTHON = r'''#!/usr/bin/env python3
import base64, hashlib, json, os, subprocess, sys, zlib
MODE = %(mode)r
MAX = %(max_bytes)d
if "--worker" in sys.argv or "agent.py" not in " ".join(sys.argv):
    os.execvp("python3", ["python3"] + sys.argv[1:])
out = sys.stdout.buffer
agent = subprocess.Popen(["python3"] + sys.argv[1:], stdin=sys.stdin, stdout=subprocess.PIPE)
BOMB = zlib.compress(bytes(50 * 1000 * 1000), 9)
try:
    for line in agent.stdout:
        message = json.loads(line)
        result = message.get("result") if message.get("type") == "result" and message.get("ok") else None
        if isinstance(result, dict) and result.get("status") == 200:
            if MODE == "bomb":  # inflates to 50 MB; says it is MAX + 1 bytes: what the check used to read
                head = bytes(MAX + 1)
                result.update(body=base64.b64encode(BOMB).decode(), size=len(head),
                              sha256=hashlib.sha256(head).hexdigest())
            elif MODE == "cutoff":  # the real body's stream cut short; size and sha256 of what it inflates to
                page = b"<title>cut</title>" + os.urandom(600)
                cut = zlib.compress(page)[:-40]
                partial = zlib.decompressobj().decompress(cut)
                result.update(body=base64.b64encode(cut).decode(), size=len(partial),
                              sha256=hashlib.sha256(partial).hexdigest())
            line = (json.dumps(message) + "\n").encode()
        out.write(line)
        out.flush()
except OSError:
    pass
finally:
    agent.kill()
'''
SLOW_PYTHON = "#!/bin/sh\nsleep 4\nexec python3 \"$@\"\n"


@pytest.fixture(scope="module")
def web_cluster(tmp_path_factory):
    """Two provisioned sshd hosts: h1 (honest, starts 4 s late) and h2 (its python replaced per test)."""
    yield from provisioned_cluster(tmp_path_factory, "hostile-web", 2)


def _pages(db: Path) -> tuple[dict, dict]:
    """{url: record}, {url: payload} of the last run."""
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        records, payloads = {}, {}
        for record, payload in iter_pages(store, run_id):
            records[record["url"]] = record
            payloads[record["url"]] = payload
        return records, payloads


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bomb", "cutoff"])
def test_host_sending_a_zlib_bomb_or_cut_stream_stores_nothing_of_it(web_cluster, tmp_path, mode):
    cluster, config = web_cluster
    max_bytes = 1000
    inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={
        "h1": {"python": executable(tmp_path, "python-slow", SLOW_PYTHON), "slots": 1},
        "h2": {"python": executable(tmp_path, "python-evil", FAKE_PYTHON % {"mode": mode, "max_bytes": max_bytes}),
               "slots": 1},
    })
    with WebServer(robots=NO_ROBOTS_DELAY) as site:
        urls = [site.url(f"/page/{i}") for i in range(6)]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        for bodies in (["--no-bodies"], []):
            db = tmp_path / f"r{len(bodies)}.db"
            export = tmp_path / f"export{len(bodies)}"
            done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db, "--delay", "0",
                            "--max-bytes", str(max_bytes), "--export", export, *bodies], config=config, timeout=180)
            output = done.stdout + done.stderr
            assert done.returncode == 0, output
            assert "Traceback" not in output
            records, payloads = _pages(db)
            assert len(records) == 6
            for url, record in records.items():
                assert record["status"] == 200 and record["size"] <= max_bytes, record
                payload = payloads[url]
                if bodies:  # --no-bodies: nothing stored at all
                    assert payload is None
                else:
                    assert payload is not None and len(inflate(payload, max_bytes)) == record["size"]
            exported = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
            assert exported < 100_000, exported
            with Store(db) as store:
                events = store.events(store.runs()[-1]["id"])
            if mode == "bomb" or not bodies:  # (a cut stream with --no-bodies is dropped unread, not refused)
                assert any(e["host"] == "h2" and e["kind"] == "invalid" for e in events), events


@pytest.mark.slow
def test_bad_redirects_over_sshd_hosts_are_page_errors_and_the_run_ends(web_cluster, tmp_path):
    """A handful of bad Location values: each its page's error, the other pages fetched, exit 0; again on resume."""
    cluster, config = web_cluster
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    with WebServer(robots=NO_ROBOTS_DELAY) as site:
        bad = [location for location, _ in BAD_LOCATIONS[:8]]
        urls = [site.url("/location?v=" + quote_from_bytes(value, safe="")) for value in bad]
        urls += [site.url(f"/page/{i}") for i in range(3)]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        db = tmp_path / "r.db"
        for _ in range(2):  # the second run resumes: nothing left, still exit 0
            done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db, "--delay", "0"],
                           config=config, timeout=180)
            output = done.stdout + done.stderr
            assert done.returncode == 0, output
            assert "Traceback" not in output
        records, _ = _pages(db)
    assert len(records) == len(urls)
    errors = [r for r in records.values() if r["error_kind"]]
    assert len(errors) == len(bad)
    assert all(r["error_kind"] == "redirects" and r["error"].startswith("bad redirect") and printable(r["error"])
               for r in errors), errors
    assert f"{len(urls)} of {len(urls)} URLs fetched" in done.stdout
    assert f"redirects {len(bad)}" in done.stdout


@pytest.mark.slow
def test_private_redirect_end_to_end_and_allowed_with_the_flag(run_fab, tmp_path):
    """fab scrape: beowulf.private_networks says only 127.0.0.1 is private; a public page's redirect
    to it is refused (the internal site sees nothing), and followed with --allow-private-redirects."""
    config = tmp_path / "fabric.yaml"
    config.write_text("beowulf:\n  private_networks: [127.0.0.1/32]\n  contact: https://example.org/bot\n")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[this computer]\naddress = local\nslots = 1\n")
    with WebServer(ip="127.0.0.2", robots=NO_ROBOTS_DELAY) as public, \
            WebServer(ip="127.0.0.1", robots=NO_ROBOTS_DELAY) as internal:
        secret = internal.url("/page/7")
        urls = [to(public, secret), public.url("/page/1")]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", tmp_path / "a.db",
                        "--delay", "0", "--export", tmp_path / "a"], config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert internal.requests == []
        records, payloads = _pages(tmp_path / "a.db")
        refused = records[urls[0]]
        assert refused["error_kind"] == "redirects" and secret in refused["error"], refused
        assert payloads[urls[0]] is None
        assert {r.user_agent for r in public.requests} == {"beowulf/0.1.0 (+https://example.org/bot)"}
        done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", tmp_path / "b.db",
                        "--delay", "0", "--allow-private-redirects", "--user-agent", "mybot/2"], config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        records, _ = _pages(tmp_path / "b.db")
        assert records[urls[0]]["status"] == 200 and records[urls[0]]["final_url"] == secret
        assert [r.path for r in internal.requests] == ["/robots.txt", "/page/7"]
        assert {r.user_agent for r in internal.requests} == {"mybot/2"}


@pytest.mark.slow
def test_export_reports_a_damaged_body_in_one_line(run_fab, tmp_path):
    """A store damaged some other way (an older version, a disk): export writes its index and says which body."""
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[this computer]\naddress = local\nslots = 1\n")
    with WebServer(robots=NO_ROBOTS_DELAY) as site:
        urls = [site.url(f"/page/{i}") for i in range(3)]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        db = tmp_path / "r.db"
        assert run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db,
                        "--delay", "0"]).returncode == 0
        with sqlite3.connect(db) as conn:
            [(lo, data)] = conn.execute("SELECT lo, data FROM payloads ORDER BY lo LIMIT 1").fetchall()
            conn.execute("UPDATE payloads SET data = ? WHERE lo = ?", (data[: len(data) // 2], lo))
            [(lo2,)] = conn.execute("SELECT lo FROM payloads ORDER BY lo LIMIT 1 OFFSET 1").fetchall()
            conn.execute("UPDATE payloads SET data = ? WHERE lo = ?", (zlib.compress(bytes(10_000_000)), lo2))
        done = run_fab(["scrape", "--inventory", inventory, "--urls", listing, "--db", db,
                        "--export", tmp_path / "out"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        warnings = [line for line in done.stderr.splitlines() if "body not exported" in line]
        assert len(warnings) == 2, done.stderr
        assert "cut off" in warnings[0] and "more than" in warnings[1]
        index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
        assert len(index) == 3 and sum("body_error" in r for r in index) == 2
        assert sum(p.stat().st_size for p in (tmp_path / "out" / "bodies").iterdir()) < 10_000


@pytest.mark.parametrize("args, config, words", [
    (["--user-agent", "bot\x1b[31m"], "", "--user-agent: must be printable ASCII"),
    (["--user-agent", "b\u00f6t/1"], "", "--user-agent: must be printable ASCII"),
    ([], "beowulf:\n  user_agent: \"a\\nb\"\n", "beowulf.user_agent in fabric.yaml: must be printable ASCII"),
    ([], "beowulf:\n  contact: \"https://x y\"\n", "beowulf.contact in fabric.yaml: must be printable ASCII"),
    ([], "beowulf:\n  private_networks: [10.0.0.0/8, nonsense]\n",
     "beowulf.private_networks in fabric.yaml: not an address range: 'nonsense'"),
])
def test_bad_user_agent_and_config_are_usage_errors(run_fab, tmp_path, args, config, words):
    path = tmp_path / "fabric.yaml"
    path.write_text(config or "beowulf: {}\n")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[this computer]\naddress = local\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/\n")
    done = run_fab(["scrape", "--inventory", inventory, "--urls", urls, "--db", tmp_path / "r.db", *args],
                   config=path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
