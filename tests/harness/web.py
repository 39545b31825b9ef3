"""A local HTTP(S) test site that records every request and misbehaves on demand.

    with WebServer() as web:                         # 127.0.0.1, a free port
        url = web.url("/page/3", host="a.test")      # http://a.test:PORT/page/3
        ...
        assert web.paths(host="a.test") == ["/robots.txt", "/page/3"]

Endpoints (the same on every virtual host; the Host header only names the site):

    /page/N[?delay=S]     HTML, <title>Page N</title>, after S seconds
    /private/X            HTML, <title>Private</title> (the default robots.txt disallows it)
    /redirect/N[?code=C][&to=URL]  N redirects (relative Location, status C, default 302)
                          to /page/1, or at the last step to URL
    /loop                 redirects forever (/loop?n=1, /loop?n=2, ...)
    /404, /500, /503      those statuses with a small HTML body
    /flaky                500 for the first ``flaky`` requests (per host and path), then 200
    /429[?after=S][&date=1][&status=503]
                          429 (or 503) with Retry-After: S seconds (default ``retry_after``)
                          or, with date=1, an HTTP-date S seconds ahead, for the first
                          ``throttle`` requests per host and path+query; then 200
    /big[?size=N][&chunked=1]   N bytes (default ``big_size``), with Content-Length or chunked
    /slowdrip[?seconds=S][&headers=1]  one body byte a second for S seconds (default 60);
                          headers=1 drips the header block itself
    /short                Content-Length: 1000, then 100 bytes and the connection closes
    /binary               BINARY_BODY as application/octet-stream
    /gzipbomb             Content-Encoding: gzip, a small body that inflates to ``bomb_size``
    /hugeheader[?size=N][&count=K]  one N-byte header (default 200000), or K small headers
    /robots.txt           per host from ``robots``: text (200) or a status code (int)
    /location?v=BYTES[&code=C]  status C (default 302) with ``Location: BYTES`` sent as they are
                          (percent-decoded from the query: any byte but CR and LF)

RawServer answers every connection with the same bytes, whatever they are (a
malformed status line, broken headers): for the client-side fuzz tests.

Every response closes the connection and waits ``latency`` seconds first (for the
throughput benchmark). Requests are recorded on arrival, before any waiting.
Nothing here resolves names: the server binds to an address and never looks one up.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote_to_bytes, urlencode, urlsplit

logger = logging.getLogger("harness.web")

DEFAULT_ROBOTS = "User-agent: *\nDisallow: /private\nCrawl-delay: 0.5\n"
# Served by /binary: every byte value, repeated (not HTML, not UTF-8).
BINARY_BODY = bytes(range(256)) * 64
# Seconds a handler waits for the client before giving up on it.
HANDLER_TIMEOUT = 30
# Connections waiting to be accepted (the benchmark opens ~100 at once).
LISTEN_BACKLOG = 512

RobotsSpec = Union[str, int, None]


@dataclass(frozen=True)
class Request:
    """One request as it arrived: ``time`` is time.time(); ``host`` the Host header as sent."""

    time: float
    peer: Tuple[str, int]
    method: str
    path: str
    host: Optional[str]
    user_agent: Optional[str]

    @property
    def vhost(self) -> Optional[str]:
        """The Host header's name, lowercased and without its port."""
        return _vhost(self.host)


def _vhost(host: Optional[str]) -> Optional[str]:
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=4)
def gzip_bomb(size: int) -> bytes:
    """At least ``size`` zero bytes as gzip (about 1000:1): one 8 MiB member, repeated.

    A gzip stream may hold several members; decoders inflate them all.
    """
    member_size = min(size, 8 << 20)
    member = gzip.compress(bytes(member_size), compresslevel=9, mtime=0)
    return member * -(-size // member_size)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def server_bind(self) -> None:
        # http.server looks up the FQDN of the address (a reverse DNS query): not here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address) -> None:
        logger.debug("web: error serving %s", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = HANDLER_TIMEOUT
    server_version = "beowulf-test-web/1"
    web: WebServer  # set on the subclass each WebServer makes

    def setup(self) -> None:
        context = self.web.tls_context
        if context is not None:
            self.request.settimeout(HANDLER_TIMEOUT)
            self.request = context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format, *args) -> None:
        logger.debug("web %s: " + format, self.address_string(), *args)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            pass  # the client went away (that is what scrapers under test do)

    def do_GET(self) -> None:
        self.close_connection = True
        web = self.web
        web._record(Request(time.time(), self.client_address[:2], self.command, self.path,
                            self.headers.get("Host"), self.headers.get("User-Agent")))
        if web.latency > 0:
            web._stopping.wait(web.latency)
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        path = parts.path
        vhost = _vhost(self.headers.get("Host")) or web.ip
        segments = path.strip("/").split("/")
        head = segments[0] if segments else ""
        arg = segments[1] if len(segments) > 1 else None
        route = getattr(self, "_route_" + head.replace(".", "_"), None) if head else None
        if route is None:
            return self._send(404, self._html("Not found", path))
        return route(arg, query, vhost)

    do_HEAD = do_GET

    # ------------------------------------------------------------------ helpers

    def _html(self, title: str, text: str = "") -> bytes:
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>"
                f"<body><h1>{title}</h1><p>{text}</p></body></html>\n").encode()

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/html; charset=utf-8",
              headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _count(self, vhost: str, key: str) -> int:
        """How many times (host, key) was asked before this request."""
        with self.web._lock:
            seen = self.web._counters.get((vhost, key), 0)
            self.web._counters[(vhost, key)] = seen + 1
        return seen

    def _sleep(self, seconds: float) -> bool:
        """Wait; False if the server is stopping."""
        return not self.web._stopping.wait(seconds)

    # ------------------------------------------------------------------ endpoints

    def _route_page(self, arg, query, vhost) -> None:
        delay = float(query.get("delay", 0) or 0)
        if delay > 0:
            self._sleep(delay)
        number = arg if arg is not None else "0"
        self._send(200, self._html(f"Page {number}", f"on {vhost}: <a href=\"/page/{number}1\">next</a>"))

    def _route_private(self, arg, query, vhost) -> None:
        self._send(200, self._html("Private", f"/private/{arg or ''} on {vhost}"))

    def _route_redirect(self, arg, query, vhost) -> None:
        left = int(arg or 0)
        if left <= 0:
            return self._route_page("1", {}, vhost)
        target = f"/redirect/{left - 1}" if left > 1 else query.get("to", "/page/1")
        if left > 1 and query:
            target += "?" + urlencode(query)
        self._send(int(query.get("code", 302)), b"", headers={"Location": target})

    def _route_loop(self, arg, query, vhost) -> None:
        step = int(query.get("n", 0)) + 1
        self._send(302, b"", headers={"Location": f"/loop?n={step}"})

    def _route_404(self, arg, query, vhost) -> None:
        self._send(404, self._html("Not found"))

    def _route_500(self, arg, query, vhost) -> None:
        self._send(500, self._html("Server error"))

    def _route_503(self, arg, query, vhost) -> None:
        self._send(503, self._html("Unavailable"))

    def _route_flaky(self, arg, query, vhost) -> None:
        if self._count(vhost, self.path) < self.web.flaky:
            return self._send(500, self._html("Flaky failure"))
        self._send(200, self._html("Flaky page"))

    def _route_429(self, arg, query, vhost) -> None:
        if self._count(vhost, self.path) >= self.web.throttle:
            return self._send(200, self._html("Throttled page"))
        after = query.get("after", str(self.web.retry_after))
        value = formatdate(time.time() + float(after), usegmt=True) if query.get("date") else after
        self._send(int(query.get("status", 429)), self._html("Too many requests"), headers={"Retry-After": value})

    def _route_big(self, arg, query, vhost) -> None:
        size = int(query.get("size", self.web.big_size))
        block = (b"0123456789abcdef" * 4096)[:65536]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        chunked = bool(query.get("chunked"))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
            left -= len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _route_short(self, arg, query, vhost) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", "1000")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"s" * 100)

    def _route_slowdrip(self, arg, query, vhost) -> None:
        seconds = int(float(query.get("seconds", 60)))
        if query.get("headers"):
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" + b"X-Drip: " + b"d" * seconds
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if not self._sleep(1.0):
                    return
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(seconds))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        for _ in range(seconds):
            self.wfile.write(b"x")
            self.wfile.flush()
            if not self._sleep(1.0):
                return

    def _route_binary(self, arg, query, vhost) -> None:
        self._send(200, BINARY_BODY, content_type="application/octet-stream")

    def _route_gzipbomb(self, arg, query, vhost) -> None:
        self._send(200, gzip_bomb(self.web.bomb_size), headers={"Content-Encoding": "gzip"})

    def _route_hugeheader(self, arg, query, vhost) -> None:
        count = int(query.get("count", 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        if count:
            for index in range(count):
                self.send_header(f"X-Many-{index}", "v" * 64)
        else:
            self.send_header("X-Huge", "h" * int(query.get("size", 200000)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_location(self, arg, query, vhost) -> None:
        raw = urlsplit(self.path).query.split("v=", 1)[-1].split("&", 1)[0]
        value = unquote_to_bytes(raw).replace(b"\r", b"").replace(b"\n", b"")
        code = int(query.get("code", 302))
        head = (b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (code, value))
        self.wfile.write(head)

    def _route_robots_txt(self, arg, query, vhost) -> None:
        spec = self.web.robots_for(vhost)
        if spec is None or isinstance(spec, int):
            status = 404 if spec is None else spec
            return self._send(status, self._html(f"robots {status}"))
        self._send(200, spec.encode("utf-8"), content_type="text/plain; charset=utf-8")


class WebServer:
    """A threaded HTTP(S) server on ``ip`` and a free port; see the module docstring.

    ``robots``: text served with 200, a status code (404, 500, ...), None (404), or a
    dict of those keyed by virtual host name (``"*"`` for the rest). ``flaky``: the
    failures /flaky gives first; ``retry_after``/``throttle``: the Retry-After value
    and the number of 429s /429 gives first; ``big_size``/``bomb_size``: sizes of
    /big and of the inflated /gzipbomb; ``tls``: (certfile, keyfile) to serve HTTPS.
    """

    def __init__(self, ip: str = "127.0.0.1", robots: Union[RobotsSpec, Dict[str, RobotsSpec]] = DEFAULT_ROBOTS,
                 latency: float = 0.0, port: int = 0, flaky: int = 2, retry_after: float = 2,
                 throttle: int = 1, big_size: int = 1_000_000, bomb_size: int = 256 << 20,
                 tls: Optional[Tuple[str, str]] = None):
        self.ip = ip
        self.robots = robots
        self.latency = latency
        self.flaky = flaky
        self.retry_after = retry_after
        self.throttle = throttle
        self.big_size = big_size
        self.bomb_size = bomb_size
        self.tls_context: Optional[ssl.SSLContext] = None
        if tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(*tls)
        self.scheme = "https" if tls is not None else "http"
        self._want_port = port
        self._lock = threading.Lock()
        self._requests: List[Request] = []
        self._counters: Dict[Tuple[str, str], int] = {}
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> WebServer:
        """Bind and serve in a background thread; returns self."""
        handler = type("Handler", (_Handler,), {"web": self})
        self._server = _Server((self.ip, self._want_port), handler)
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"web-{self.ip}:{self.port}", daemon=True)
        self._thread.start()
        logger.debug("web: serving %s://%s:%d", self.scheme, self.ip, self.port)
        return self

    def stop(self) -> None:
        """Stop serving; handlers still running (slow drips) give up within a second."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses and log

    @property
    def address(self) -> str:
        """``ip:port``."""
        return f"{self.ip}:{self.port}"

    def url(self, path: str = "/", host: Optional[str] = None) -> str:
        """``scheme://HOST:PORT/path``; HOST defaults to the server's address."""
        if not path.startswith("/"):
            path = "/" + path
        return f"{self.scheme}://{host or self.ip}:{self.port}{path}"

    def robots_for(self, vhost: Optional[str]) -> RobotsSpec:
        """The robots.txt spec for a virtual host."""
        robots = self.robots
        if isinstance(robots, dict):
            return robots.get(vhost or "", robots.get("*"))
        return robots

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> List[Request]:
        """A copy of the requests recorded so far, in order of arrival."""
        with self._lock:
            return list(self._requests)

    def paths(self, host: Optional[str] = None) -> List[str]:
        """The paths (with query) requested so far, optionally only those for virtual host ``host``."""
        return [r.path for r in self.requests if host is None or r.vhost == host.lower()]

    def clear(self) -> None:
        """Forget the recorded requests and the /flaky and /429 counters."""
        with self._lock:
            self._requests.clear()
            self._counters.clear()


class RawServer:
    """A TCP server on ``ip`` that reads each request's head, records its first line, and
    answers with ``response`` (bytes, exactly as set) before closing the connection.

        with RawServer(b"HTTP/1.1 302 X\r\nLocation: http://[foo/\r\n\r\n") as raw:
            raw.response = b"..."            # change it between requests
    """

    def __init__(self, response: bytes = b"", ip: str = "127.0.0.1"):
        self.response = response
        self.ip = ip
        self.port = 0
        self._lock = threading.Lock()
        self._lines: List[bytes] = []
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    def start(self) -> RawServer:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.ip, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"raw-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(HANDLER_TIMEOUT)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                with self._lock:
                    self._lines.append(head.split(b"\r\n", 1)[0])
                conn.sendall(self.response)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> RawServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, path: str = "/", host: Optional[str] = None) -> str:
        return f"http://{host or self.ip}:{self.port}{path}"

    @property
    def lines(self) -> List[bytes]:
        """The request lines received so far."""
        with self._lock:
            return list(self._lines)

    def clear(self) -> None:
        with self._lock:
            self._lines.clear()


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port on ``ip`` that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]
