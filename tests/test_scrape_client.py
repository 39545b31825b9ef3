"""client/scrape.py against real local servers: HTTP(S), robots.txt, SOCKS5, hostile answers.

No mocks: a threaded HTTP server (harness.web) and a SOCKS5 server (harness.socks5)
run on 127.0.0.1. ``*.test`` names resolve only inside the SOCKS server, so a
``*.test`` URL can only be fetched through the proxy; nothing here ever contacts an
address outside 127.0.0.0/8 (the one test that lets the system resolver try a
``*.test`` name runs in a network namespace of its own, with only loopback).
"""

from __future__ import annotations

import ast
import base64
import glob
import hashlib
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.socks5 import Socks5Server
from harness.web import BINARY_BODY, WebServer, free_port, gzip_bomb

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "client"
if str(CLIENT) not in sys.path:
    sys.path.insert(0, str(CLIENT))

import scrape  # noqa: E402 - client/ is put on sys.path just above, as the agent's workers do

UA = "beowulf-test/1.0 (+tests)"
RESULT_KEYS = {"url", "final_url", "status", "content_type", "size", "truncated", "sha256", "title",
               "elapsed", "redirects", "via_proxy", "retry_after", "error", "error_kind"}


def fetch(url: str, **args) -> dict:
    """scrape.run with our user agent and a short timeout unless given."""
    args.setdefault("user_agent", UA)
    args.setdefault("timeout", 10)
    result = scrape.run(dict(args, url=url))
    assert RESULT_KEYS <= set(result), set(result) ^ RESULT_KEYS
    assert result["error_kind"] in (None,) + scrape.ERROR_KINDS
    assert (result["error"] is None) == (result["error_kind"] is None)
    if result["error"] is not None:
        assert "\n" not in result["error"]
    return result


def body_of(result: dict) -> bytes:
    """The body a result carries, checked against its sha256 and size."""
    body = zlib.decompress(base64.b64decode(result["body"]))
    assert hashlib.sha256(body).hexdigest() == result["sha256"]
    assert len(body) == result["size"]
    return body


@pytest.fixture
def web():
    with WebServer() as server:
        yield server


@pytest.fixture
def proxy():
    with Socks5Server() as server:
        yield server


# ---------------------------------------------------------------------------- plain HTTP


def test_page_with_title(web):
    """A page: status, type, title, body and its sha256; the request carries our headers."""
    result = fetch(web.url("/page/3"))
    assert result["status"] == 200 and result["error"] is None
    assert result["title"] == "Page 3"
    assert result["content_type"].startswith("text/html")
    assert result["final_url"] == web.url("/page/3") and result["redirects"] == 0
    assert result["via_proxy"] is False and result["truncated"] is False
    assert b"<title>Page 3</title>" in body_of(result)
    assert 0 < result["elapsed"] < 5
    [request] = web.requests
    assert (request.method, request.path, request.user_agent) == ("GET", "/page/3", UA)
    assert request.host == web.address
    assert "robots" not in result


def test_no_bodies(web):
    """bodies=False: everything but the body itself."""
    result = fetch(web.url("/page/1"), bodies=False)
    assert "body" not in result and result["size"] > 0 and result["sha256"]


def test_title_is_collapsed_unescaped_and_cut(web):
    """Titles come unescaped, whitespace collapsed, at most 300 characters."""
    assert scrape.title_of(b"<html><TITLE lang=en>\n  A &amp;\tB  </title>", "text/html") == "A & B"
    assert len(scrape.title_of(b"<title>" + b"x" * 1000 + b"</title>", None)) == 300
    assert scrape.title_of(b"<title></title>", None) is None
    late = b" " * (300 * 1024) + b"<title>late</title>"
    assert scrape.title_of(late, "text/html") is None


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_followed_and_counted(web, code):
    """Each redirect status is followed (relative Location) and counted."""
    result = fetch(web.url(f"/redirect/3?code={code}"))
    assert result["status"] == 200 and result["title"] == "Page 1"
    assert result["redirects"] == 3
    assert result["final_url"] == web.url("/page/1")
    assert len(web.requests) == 4


def test_too_many_redirects(web):
    """More redirects than max_redirects: error_kind redirects, nothing past the limit."""
    result = fetch(web.url("/redirect/3"), max_redirects=2)
    assert result["error_kind"] == "redirects" and result["status"] == 302
    assert result["redirects"] == 2 and len(web.requests) == 3


def test_endless_redirect_loop(web):
    """An endless loop stops after max_redirects (default 10) with a redirects error."""
    result = fetch(web.url("/loop"))
    assert result["error_kind"] == "redirects"
    assert result["redirects"] == 10
    assert len(web.requests) == 11


@pytest.mark.parametrize("status", [404, 500, 503])
def test_error_statuses_are_recorded(web, status):
    """4xx/5xx answers are results (status recorded), not errors."""
    result = fetch(web.url(f"/{status}"))
    assert result["status"] == status
    assert result["error"] is None and result["error_kind"] is None
    assert result["size"] > 0


def test_flaky_then_ok(web):
    """/flaky fails the first k times, then answers 200."""
    statuses = [fetch(web.url("/flaky"))["status"] for _ in range(3)]
    assert statuses == [500, 500, 200]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds(web, status):
    """Retry-After in seconds is reported for 429 and 503; the next request gets 200."""
    result = fetch(web.url(f"/429?after=7&status={status}"))
    assert result["status"] == status and result["retry_after"] == 7.0
    again = fetch(web.url(f"/429?after=7&status={status}"))
    assert again["status"] == 200 and again["retry_after"] is None


def test_retry_after_http_date(web):
    """Retry-After as an HTTP-date becomes the seconds until then."""
    result = fetch(web.url("/429?after=30&date=1"))
    assert result["status"] == 429
    assert 27 <= result["retry_after"] <= 31


def test_retry_after_parser():
    """Delta-seconds, HTTP-dates (past ones are 0) and junk."""
    assert scrape.retry_after("120") == 120.0
    assert scrape.retry_after(" 0 ") == 0.0
    assert scrape.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    now = 1_700_000_000
    assert scrape.retry_after("Tue, 14 Nov 2023 22:13:20 GMT", now=now) == 0.0
    assert scrape.retry_after("Tue, 14 Nov 2023 22:14:20 GMT", now=now) == 60.0
    assert scrape.retry_after("Tue, 14 Nov 2023 22:12:20 GMT", now=now) == 0.0
    assert scrape.retry_after("soon") is None and scrape.retry_after("-5") is None
    assert scrape.retry_after(None) is None


@pytest.mark.parametrize("chunked", [False, True])
def test_max_bytes_truncates(web, chunked):
    """A body over max_bytes is cut there and marked; one that fits exactly is not."""
    flag = "&chunked=1" if chunked else ""
    result = fetch(web.url(f"/big?size=300000{flag}"), max_bytes=50_000)
    assert result["size"] == 50_000 and result["truncated"] is True
    assert len(body_of(result)) == 50_000
    exact = fetch(web.url(f"/big?size=50000{flag}"), max_bytes=50_000)
    assert exact["size"] == 50_000 and exact["truncated"] is False
    assert exact["sha256"] == result["sha256"]


def test_slowdrip_body_bounded_by_timeout(web):
    """One byte a second: the call ends at the timeout, with what arrived so far."""
    started = time.monotonic()
    result = fetch(web.url("/slowdrip"), timeout=1.5)
    assert time.monotonic() - started < 3
    assert result["error_kind"] == "timeout" and result["status"] == 200
    assert 1 <= result["size"] <= 2


def test_slowdrip_headers_bounded_by_timeout(web):
    """Headers dripped one byte a second: still over at the timeout."""
    started = time.monotonic()
    result = fetch(web.url("/slowdrip?headers=1"), timeout=1.5)
    assert time.monotonic() - started < 3
    assert result["error_kind"] == "timeout" and result["status"] is None


def test_gzip_bomb_not_inflated(web):
    """Content-Encoding gzip is kept as sent: small, never inflated."""
    tracemalloc.start()
    try:
        result = fetch(web.url("/gzipbomb"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bomb = gzip_bomb(web.bomb_size)
    assert result["status"] == 200 and result["error"] is None
    assert result["size"] == len(bomb) < 1 << 20
    assert result["sha256"] == hashlib.sha256(bomb).hexdigest()
    assert result["title"] is None
    assert peak < 16 << 20, f"peak {peak} bytes"


@pytest.mark.parametrize("query", ["", "?count=200"])
def test_huge_header_is_a_clean_error(web, query):
    """A 200 KB header line, or 200 headers: error_kind too_big, no exception."""
    result = fetch(web.url("/hugeheader" + query))
    assert result["error_kind"] == "too_big"
    assert result["status"] is None and result["size"] == 0


def test_body_shorter_than_announced(web):
    """The connection closes before Content-Length bytes came: an http error, what came is kept."""
    result = fetch(web.url("/short"))
    assert result["status"] == 200 and result["error_kind"] == "http"
    assert result["size"] == 100 and body_of(result) == b"s" * 100


def test_binary_body(web):
    """A non-HTML body: sha256 of the exact bytes, no title."""
    result = fetch(web.url("/binary"))
    assert result["sha256"] == hashlib.sha256(BINARY_BODY).hexdigest()
    assert result["size"] == len(BINARY_BODY) and result["title"] is None
    assert result["content_type"] == "application/octet-stream"
    assert body_of(result) == BINARY_BODY


def test_bad_urls_are_page_errors(web):
    """Not http(s), or no host: error_kind other, nothing sent."""
    for url in ("ftp://127.0.0.1/x", "http:///nohost", "mailto:a@b", "http://127.0.0.1:99999/"):
        result = fetch(url, robots={"fetch": True})
        assert result["error_kind"] == "other", (url, result)
    assert web.requests == []


def test_connection_refused(web):
    """A closed port: error_kind connect."""
    result = fetch(f"http://127.0.0.1:{free_port()}/page/1")
    assert result["error_kind"] == "connect" and result["status"] is None


def test_server_sustains_concurrency():
    """The harness answers 80 concurrent requests, each after its latency, in parallel."""
    with WebServer(latency=0.3) as server:
        started = time.monotonic()
        with ThreadPoolExecutor(80) as pool:
            results = list(pool.map(lambda n: fetch(server.url(f"/page/{n}")), range(80)))
        elapsed = time.monotonic() - started
    assert [r["title"] for r in results] == [f"Page {n}" for n in range(80)]
    assert elapsed < 80 * 0.3 / 2, elapsed  # one at a time would take 24 s: they overlap
    assert len(server.requests) == 80


# ---------------------------------------------------------------------------- robots.txt


def test_robots_disallowed_path_not_fetched(web):
    """A disallowed URL: only /robots.txt is requested; the crawl delay comes back."""
    result = fetch(web.url("/private/page"), robots={"fetch": True})
    assert result["error_kind"] == "robots"
    assert result["error"] == "disallowed by robots.txt"
    assert result["status"] is None
    assert web.paths() == ["/robots.txt"]
    robots = result["robots"]
    assert robots["status"] == 200 and robots["crawl_delay"] == 0.5 and robots["error"] is None
    assert "Disallow: /private" in robots["text"]


def test_robots_allowed_fetched_with_same_user_agent(web):
    """An allowed URL: robots.txt first, then the page, both with our user agent."""
    result = fetch(web.url("/page/2"), robots={"fetch": True})
    assert result["status"] == 200 and result["title"] == "Page 2"
    assert web.paths() == ["/robots.txt", "/page/2"]
    assert {r.user_agent for r in web.requests} == {UA}
    assert result["robots"]["crawl_delay"] == 0.5


@pytest.mark.slow
def test_robots_group_for_our_agent():
    """The group naming our agent wins over '*', crawl delay included."""
    text = "User-agent: *\nDisallow:\nCrawl-delay: 0.3\n\nUser-agent: beowulf-test\nDisallow: /page\nCrawl-delay: 2.5\n"
    with WebServer(robots=text) as server:
        ours = fetch(server.url("/page/1"), robots={"fetch": True})
        theirs = fetch(server.url("/page/1"), robots={"fetch": True}, user_agent="other/1")
    assert ours["error_kind"] == "robots" and ours["robots"]["crawl_delay"] == 2.5
    assert theirs["status"] == 200 and theirs["robots"]["crawl_delay"] == 0.3


def test_robots_404_allows_all():
    """robots.txt 404: everything allowed, no crawl delay."""
    with WebServer(robots=404) as server:
        result = fetch(server.url("/private/x"), robots={"fetch": True})
        assert server.paths() == ["/robots.txt", "/private/x"]
    assert result["status"] == 200
    assert result["robots"]["status"] == 404 and result["robots"]["crawl_delay"] is None


def test_robots_500_disallows_all():
    """robots.txt 500: everything disallowed, the page is never requested."""
    with WebServer(robots=500) as server:
        result = fetch(server.url("/page/1"), robots={"fetch": True})
        assert server.paths() == ["/robots.txt"]
    assert result["error_kind"] == "robots"
    assert result["error"] == "disallowed by robots.txt (unreachable)"
    assert result["robots"]["status"] == 500 and result["robots"]["error"]


def test_robots_unreachable_site_reports_the_network_error():
    """robots.txt cannot be fetched because the site refuses connections: the page's error is
    that network error (issue 10 §5), not a robots.txt refusal; the page is not requested."""
    port = free_port()
    result = fetch(f"http://127.0.0.1:{port}/page/1", robots={"fetch": True})
    assert (result["error_kind"], result["error"]) == ("connect", f"connection refused (127.0.0.1:{port})")
    assert result["robots"]["status"] is None and result["robots"]["error"].startswith("connect")
    assert result["robots"]["error_kind"] == "connect"


def test_robots_given_rules_are_not_fetched(web):
    """Rules handed over by the coordinator decide without fetching robots.txt."""
    rules = {"status": 200, "text": "User-agent: *\nDisallow: /page/2\n"}
    denied = fetch(web.url("/page/2"), robots=rules)
    allowed = fetch(web.url("/page/3"), robots=rules)
    assert denied["error"] == "disallowed by robots.txt" and "robots" not in denied
    assert allowed["status"] == 200
    assert fetch(web.url("/page/4"), robots={"status": 404, "text": None})["status"] == 200
    assert fetch(web.url("/page/5"), robots={"status": None, "text": None})["error_kind"] == "robots"
    assert fetch(web.url("/page/6"), robots={"status": 503, "text": None})["error_kind"] == "robots"
    assert web.paths() == ["/page/3", "/page/4"]


def test_robots_rules_round_trip(web):
    """Rules returned by a fetch, handed back as given rules, decide the same way."""
    first = fetch(web.url("/page/1"), robots={"fetch": True})
    given = {"status": first["robots"]["status"], "text": first["robots"]["text"]}
    web.clear()
    assert fetch(web.url("/private/a"), robots=given)["error_kind"] == "robots"
    assert fetch(web.url("/page/9"), robots=given)["status"] == 200
    assert web.paths() == ["/page/9"]


def test_redirect_within_origin_is_checked(web):
    """A redirect to a disallowed path of the same site is not followed."""
    result = fetch(web.url("/redirect/1?to=/private/x"), robots={"fetch": True})
    assert result["error"] == "disallowed by robots.txt"
    assert result["redirects"] == 1 and result["final_url"] == web.url("/private/x")
    assert web.paths() == ["/robots.txt", "/redirect/1?to=/private/x"]


def test_robots_ignored_when_null(web):
    """robots None: no robots.txt request, disallowed paths fetched."""
    assert fetch(web.url("/private/x"), robots=None)["status"] == 200
    assert web.paths() == ["/private/x"]


# ---------------------------------------------------------------------------- SOCKS5


def test_proxy_fetch_sends_the_name(web, proxy):
    """A *.test URL through the proxy: the proxy gets the NAME and the isolation tag."""
    result = fetch(web.url("/page/7", host="a.test"), proxy=proxy.address, isolation="run1-h1-3")
    assert result["status"] == 200 and result["title"] == "Page 7"
    assert result["via_proxy"] is True
    [entry] = proxy.log
    assert (entry.atyp, entry.host, entry.port) == ("domain", "a.test", web.port)
    assert entry.username == "run1-h1-3" and entry.reply == 0
    [request] = web.requests
    assert request.host == f"a.test:{web.port}" and request.path == "/page/7"
    assert request.peer[0] == "127.0.0.1"


def test_proxy_without_isolation_uses_no_auth(web, proxy):
    """No isolation tag: no username is sent."""
    assert fetch(web.url("/page/1", host="b.test"), proxy=proxy.address)["status"] == 200
    assert proxy.log[0].username is None


def test_robots_also_through_proxy(web, proxy):
    """robots.txt goes through the proxy too, with the same user agent."""
    result = fetch(web.url("/page/1", host="a.test"), proxy=proxy.address, isolation="s1",
                   robots={"fetch": True})
    assert result["status"] == 200 and result["robots"]["crawl_delay"] == 0.5
    assert [(e.host, e.username) for e in proxy.log] == [("a.test", "s1"), ("a.test", "s1")]
    assert web.paths(host="a.test") == ["/robots.txt", "/page/1"]
    assert {r.user_agent for r in web.requests} == {UA}


def test_cross_origin_redirect_checks_that_sites_robots(proxy):
    """A redirect to another site is checked against that site's robots.txt (fetched via proxy)."""
    robots = {"b.test": "User-agent: *\nDisallow: /\n", "*": "User-agent: *\nDisallow:\n"}
    with WebServer(robots=robots) as server:
        target = server.url("/page/1", host="b.test")
        result = fetch(server.url(f"/redirect/1?to={target}", host="a.test"), proxy=proxy.address,
                       robots={"fetch": True})
        assert result["error"] == "disallowed by robots.txt"
        assert result["final_url"] == target
        assert server.paths(host="b.test") == ["/robots.txt"]
        assert server.paths(host="a.test")[0] == "/robots.txt"


def test_unknown_name_through_proxy_is_a_dns_error(web, proxy):
    """The proxy cannot resolve the name (reply 0x04): a page error of kind dns."""
    result = fetch(web.url("/page/1", host="nothing.invalid"), proxy=proxy.address)
    assert result["error_kind"] == "dns" and result["status"] is None
    assert [(e.atyp, e.host, e.reply) for e in proxy.log] == [("domain", "nothing.invalid", 4)]
    assert web.requests == []


def test_closed_target_port_through_proxy(proxy):
    """The proxy is fine but the target refuses (reply 0x05): a page error of kind connect."""
    result = fetch(f"http://a.test:{free_port()}/", proxy=proxy.address)
    assert result["error_kind"] == "connect"
    assert proxy.log[0].reply == 5


@pytest.mark.parametrize("code,kind", [(2, "connect"), (3, "connect"), (4, "dns"), (5, "connect"),
                                       (6, "timeout")])
def test_target_level_socks_replies_are_page_errors(web, code, kind):
    """SOCKS replies about the target come back as page errors."""
    with Socks5Server(reply=code) as failing:
        result = fetch(web.url("/page/1", host="a.test"), proxy=failing.address)
    assert result["error_kind"] == kind and result["via_proxy"] is True
    assert web.requests == []


@pytest.mark.parametrize("code", [1, 7, 8])
def test_proxy_level_socks_replies_raise(web, code):
    """General SOCKS server failure (and protocol errors): ProxyError."""
    with Socks5Server(reply=code) as failing:
        with pytest.raises(scrape.ProxyError):
            fetch(web.url("/page/1", host="a.test"), proxy=failing.address)
    assert web.requests == []


@pytest.mark.parametrize("robots", [None, {"fetch": True}])
def test_proxy_down_raises_and_sends_nothing(web, robots):
    """Proxy port closed: ProxyError, and not one request reaches the web server."""
    with pytest.raises(scrape.ProxyError):
        fetch(web.url("/page/1"), proxy=f"127.0.0.1:{free_port()}", robots=robots)
    with pytest.raises(scrape.ProxyError):
        fetch(web.url("/page/1", host="a.test"), proxy=f"127.0.0.1:{free_port()}", robots=robots)
    assert web.requests == []


@pytest.mark.parametrize("robots", [None, {"fetch": True}])
def test_proxy_dying_mid_response_raises_not_a_page_error(robots):
    """The proxy dies while the site is answering (robots.txt or the page): the cut exchange is
    the proxy's failure (ProxyError: the URL goes to another host), never a page or robots.txt
    error of the site (which used to disallow the whole site as 'robots.txt unreachable')."""
    with WebServer(robots=None, latency=1.0) as slow, Socks5Server() as doomed:
        killer = threading.Thread(target=lambda: (wait_until(lambda: len(doomed.log) >= 1), doomed.stop()))
        killer.start()
        try:
            with pytest.raises(scrape.ProxyError, match="does not answer"):
                fetch(slow.url("/page/1", host="a.test"), proxy=doomed.address, robots=robots, timeout=10)
        finally:
            killer.join(10)


def wait_until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_hung_proxy_raises_within_the_timeout(web):
    """A proxy that accepts and never answers: ProxyError at the timeout."""
    with Socks5Server(stall=True) as hung:
        started = time.monotonic()
        with pytest.raises(scrape.ProxyError):
            fetch(web.url("/page/1", host="a.test"), proxy=hung.address, timeout=1.5)
        assert time.monotonic() - started < 3
    assert web.requests == []


def test_bad_proxy_address_raises(web):
    """A malformed proxy address is a ProxyError, never a direct fetch."""
    for bad in ("nowhere", "127.0.0.1:", "127.0.0.1:0", ":80"):
        with pytest.raises(scrape.ProxyError):
            fetch(web.url("/page/1"), proxy=bad)
    assert web.requests == []


def test_without_pysocks_a_proxy_is_refused(web, monkeypatch):
    """PySocks not importable: with a proxy, ProxyError and nothing sent; without, fine."""
    monkeypatch.setitem(sys.modules, "socks", None)  # makes `import socks` raise ImportError
    spec = importlib.util.spec_from_file_location("_scrape_without_socks", CLIENT / "scrape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.socks is None
    with pytest.raises(module.ProxyError, match="PySocks"):
        module.run({"url": web.url("/page/1"), "proxy": "127.0.0.1:9050", "robots": {"fetch": True}})
    assert web.requests == []
    assert module.run({"url": web.url("/page/1")})["status"] == 200


def _netns_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        done = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


NO_PROXY_SCRIPT = r"""
import json, sys
import scrape
from harness.web import WebServer
with WebServer() as web:
    result = scrape.run({"url": web.url("/page/1", host="a.test"), "timeout": 5})
    print(json.dumps({"kind": result["error_kind"], "error": result["error"], "requests": len(web.requests)}))
"""


@pytest.mark.skipif(not _netns_available(), reason="needs unshare -n (root) to keep the DNS lookup local")
def test_test_names_do_not_resolve_without_proxy():
    """Without the proxy a *.test name does not resolve: dns error, nothing reaches the server.

    The system resolver would ask a name server off this machine, so this runs in a
    fresh network namespace whose only interface is loopback: the query cannot leave.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CLIENT), str(REPO / "tests")]))
    done = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"',
                           sys.executable, NO_PROXY_SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["requests"] == 0
    assert outcome["kind"] == "dns", outcome


# ---------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for a.test and 127.0.0.1 (skips without the openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    done = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "2", "-subj", "/CN=a.test",
                           "-addext", "subjectAltName=DNS:a.test,IP:127.0.0.1"],
                          capture_output=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {done.stderr.decode(errors='replace')[-200:]}")
    return str(cert), str(key)


def test_https_verified_fails_on_self_signed(certificate):
    """TLS is verified by default: a self-signed certificate is a tls error; insecure works."""
    with WebServer(tls=certificate) as server:
        refused = fetch(server.url("/page/1"))
        accepted = fetch(server.url("/page/1"), insecure=True)
    assert refused["error_kind"] == "tls" and refused["status"] is None
    assert accepted["status"] == 200 and accepted["title"] == "Page 1"
    assert accepted["final_url"].startswith("https://")


def test_https_through_proxy(certificate, proxy):
    """HTTPS to a *.test name through the proxy: TLS over the SOCKS socket, SNI is the name."""
    with WebServer(tls=certificate) as server:
        refused = fetch(server.url("/page/2", host="a.test"), proxy=proxy.address)
        accepted = fetch(server.url("/page/2", host="a.test"), proxy=proxy.address, insecure=True,
                         robots={"fetch": True})
        assert server.paths(host="a.test") == ["/robots.txt", "/page/2"]
    assert refused["error_kind"] == "tls"
    assert accepted["status"] == 200 and accepted["title"] == "Page 2"
    assert {e.host for e in proxy.log} == {"a.test"}


# ---------------------------------------------------------------------------- through the agent


class AgentProcess:
    """``client/agent.py --host t --slots N`` (default 1) with JSON lines over pipes."""

    def __init__(self, slots: int = 1):
        self.proc = subprocess.Popen([sys.executable, str(CLIENT / "agent.py"), "--host", "t", "--slots", str(slots),
                                      "--beat", "60", "--nice", "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("type") != "beat":
                self.inbox.put(message)

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 30) -> dict:
        return self.inbox.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def test_scrape_through_a_real_agent(web, proxy):
    """The agent runs scrape tasks: a page, a page through the proxy, and a dead proxy (ok false)."""
    agent = AgentProcess()
    try:
        assert agent.next(60)["type"] == "hello"
        agent.send({"type": "task", "id": 1, "job": "scrape",
                    "args": {"url": web.url("/page/5"), "user_agent": UA, "robots": {"fetch": True}}})
        first = agent.next()
        agent.send({"type": "task", "id": 2, "job": "scrape",
                    "args": {"url": web.url("/page/6", host="a.test"), "proxy": proxy.address,
                             "isolation": "slot-0", "user_agent": UA}})
        second = agent.next()
        paths_before = web.paths()
        agent.send({"type": "task", "id": 3, "job": "scrape",
                    "args": {"url": web.url("/page/7", host="a.test"), "proxy": f"127.0.0.1:{free_port()}"}})
        third = agent.next()
    finally:
        agent.close()
    assert first["id"] == 1 and first["ok"] is True
    assert first["result"]["title"] == "Page 5" and first["result"]["robots"]["crawl_delay"] == 0.5
    assert body_of(first["result"]).startswith(b"<!DOCTYPE html>")
    assert second["ok"] is True and second["result"]["via_proxy"] is True
    assert proxy.log[0].host == "a.test" and proxy.log[0].username == "slot-0-0"  # the worker's slot appended
    assert third["id"] == 3 and third["ok"] is False and third["error"].startswith("ProxyError")
    assert web.paths() == paths_before == ["/robots.txt", "/page/5", "/page/6"]


def test_one_tor_circuit_per_worker_slot(web, proxy):
    """The SOCKS username (Tor's circuit) is the coordinator's tag plus the slot of the worker
    that runs the task: whatever the task ids, each worker has one name and no two workers share one."""
    agent = AgentProcess(slots=2)
    try:
        assert agent.next(60)["type"] == "hello"
        for task_id in range(8):
            delay = 0.6 if task_id % 3 == 0 else 0.05  # uneven, so the workers take tasks out of turn
            agent.send({"type": "task", "id": 100 + task_id, "job": "scrape",
                        "args": {"url": web.url(f"/page/{task_id}?delay={delay}", host=f"s{task_id}.test"),
                                 "proxy": proxy.address, "isolation": "beowulf-7-h1", "user_agent": UA}})
        results = [agent.next() for _ in range(8)]
    finally:
        agent.close()
    names = {entry.host: entry.username for entry in proxy.log}
    assert all(r["ok"] for r in results), results
    slots = {r["result"]["url"].split("//")[1].split(":")[0]: r["slot"] for r in results}
    assert set(slots.values()) == {0, 1}
    for host, slot in slots.items():
        assert names[host] == f"beowulf-7-h1-{slot}", (host, slot, names)


# ---------------------------------------------------------------------------- old hosts


def find_python36():
    """A Python 3.6 interpreter (the oldest the client supports), or None."""
    candidates = [os.environ.get("BEOWULF_PYTHON36"), shutil.which("python3.6")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == b"(3, 6)":
            return candidate
    return None


PY36_SCRIPT = r"""
import json, sys, scrape
for line in sys.stdin:
    args = json.loads(line)
    try:
        result = scrape.run(args)
        result.pop("body", None)
        print(json.dumps(result))
    except Exception as exc:
        print(json.dumps({"exception": type(exc).__name__}))
"""


@pytest.mark.slow
@pytest.mark.skipif(find_python36() is None, reason="no Python 3.6 interpreter on this machine")
def test_runs_on_python36(web, proxy, tmp_path):
    """scrape.py on a real Python 3.6 (PySocks copied in): pages, limits, robots, proxy, ProxyError."""
    import socks

    shutil.copy(socks.__file__, tmp_path / "socks.py")  # PySocks is one pure-Python file
    cases = [
        {"url": web.url("/redirect/2")},
        {"url": web.url("/big?size=100000&chunked=1"), "max_bytes": 5000},
        {"url": web.url("/slowdrip"), "timeout": 1.2},
        {"url": web.url("/hugeheader")},
        {"url": web.url("/private/x"), "robots": {"fetch": True}},
        {"url": web.url("/page/4", host="a.test"), "proxy": proxy.address, "isolation": "old",
         "robots": {"fetch": True}},
        {"url": web.url("/page/4", host="x.invalid"), "proxy": proxy.address},
        {"url": web.url("/page/4"), "proxy": f"127.0.0.1:{free_port()}"},
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CLIENT), str(tmp_path)]))
    done = subprocess.run([find_python36(), "-c", PY36_SCRIPT], input="\n".join(map(json.dumps, cases)),
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    redirect, big, drip, huge, private, via_proxy, unknown, down = map(json.loads, done.stdout.splitlines())
    assert (redirect["status"], redirect["redirects"], redirect["title"]) == (200, 2, "Page 1")
    assert (big["size"], big["truncated"]) == (5000, True)
    assert drip["error_kind"] == "timeout" and drip["elapsed"] < 2.5
    assert huge["error_kind"] == "too_big"
    assert private["error_kind"] == "robots" and private["robots"]["crawl_delay"] == 0.5
    assert via_proxy["title"] == "Page 4" and via_proxy["via_proxy"] is True
    assert [(e.host, e.username) for e in proxy.log[:2]] == [("a.test", "old")] * 2
    assert unknown["error_kind"] == "dns"
    assert down == {"exception": "ProxyError"}


def test_scrape_py_is_python36_and_stdlib_only():
    """client/scrape.py parses as 3.6; only stdlib imports, socks/certifi guarded; no global patching."""
    source = (CLIENT / "scrape.py").read_text()
    tree = ast.parse(source, feature_version=(3, 6))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers):
            for child in node.body:
                for sub in ast.walk(child):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        guarded.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module != "__future__"
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ("socks", "certifi"):
                assert id(node) in guarded, f"line {node.lineno}: import {name} not guarded"
            else:
                assert top in sys.stdlib_module_names, f"line {node.lineno}: import {name}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                text = ast.unparse(target)
                assert not text.startswith(("socket.", "socks.", "ssl.")), f"line {node.lineno}: patches {text}"
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            assert called not in ("socks.set_default_proxy", "socks.setdefaultproxy", "socks.wrap_module"), called
