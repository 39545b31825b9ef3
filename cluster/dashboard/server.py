"""The dashboard's HTTP server: GET only, read-only, loopback unless told otherwise (SECURITY.md, "Dashboard").

- Routes: ``/`` (the page), ``/static/app.js`` and ``/static/app.css`` (fixed names: a
  request never chooses a file to read), ``/api/state?run=N`` (the JSON snapshot,
  data.py; without ``run`` the current run's; a ``run`` that is not a run of the store
  is 404 with ``{"error": ...}``). Anything else is 404; any method but GET is 405. No
  route changes anything.
- The store is opened read-only (``Store.open_readonly``: SQLite ``mode=ro``). WAL
  readers never block the coordinator's writer (cluster/store.py); a snapshot is
  computed at most about once a second whoever asks, and a finished run's only when
  the store file changed.
- Bound to 127.0.0.1 by default. On any other address a token is required
  (``secrets.token_urlsafe``, printed once in the URL, compared with
  ``hmac.compare_digest``) for the page and the data. Without a token (loopback),
  the Host header must name the loopback address we serve: a web page that rebinds
  its own DNS name to 127.0.0.1 cannot read the data.
- Every answer carries a strict Content-Security-Policy (scripts and styles from this
  server only, no inline script, nothing else loaded), nosniff, no framing, no referrer.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from cluster.errors import BeowulfError, UsageError
from cluster.shown import shown

from . import data

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# The only files served: URL path -> (file in static/, content type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
# Paths that need the token when one is set (the page and the data; the script and the
# style are the same for everyone and hold no data).
GUARDED = ("/", "/api/state")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# A snapshot is recomputed at most this often while a run is live (the page polls once a second).
FRESH_SECONDS = 0.9
# Seconds a client has to send its request (a slow client holds one thread, not the server).
REQUEST_TIMEOUT = 10.0
DEFAULT_PORT = 8787


def is_loopback_default(address: str) -> bool:
    """Whether ``address`` is the default bind, served without a token: 127.0.0.1, ::1 or localhost.

    Any other address, 127.0.0.2 included, needs the token (README.md, "Dashboard")."""
    return address in ("127.0.0.1", "::1", "localhost")


def check_bind(address: str) -> str:
    """``--bind``: an IP address (v4 or v6) or localhost; UsageError otherwise."""
    text = (address or "").strip()
    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"--bind: expected an IP address such as 127.0.0.1 or 0.0.0.0, not {shown(text)!r}") \
            from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, dashboard: Dashboard):
        self.dashboard = dashboard
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        log.debug("dashboard: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "beowulf-dashboard"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("dashboard: %s %s", self.address_string(), shown(format % args))

    # -- methods: GET only
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        board = self.server.dashboard
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        query = urllib.parse.parse_qs(parts.query, max_num_fields=8)
        if not board.host_ok(self.headers.get("Host")):
            return self._send(421, b"wrong Host header\n", "text/plain; charset=utf-8")
        if path in GUARDED and not board.token_ok(query.get("token", [""])[0]):
            return self._send(403, b"token required: open the URL fab dashboard printed\n",
                              "text/plain; charset=utf-8")
        if path in FILES:
            name, kind = FILES[path]
            return self._send(200, (STATIC / name).read_bytes(), kind)
        if path == "/api/state":
            wanted = query.get("run", [""])[0]
            run_id = int(wanted) if wanted.isdigit() and len(wanted) < 12 else None
            if "run" in query and (run_id is None or not board.has_run(run_id)):
                # Not the latest run in place of the one asked for: the caller would take it for that one.
                return self._send(404, _json({"error": f"no run {shown(wanted[:20])} in {board.db_path}"}),
                                  "application/json")
            return self._send(200, board.state(run_id), "application/json")
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        return self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _refuse(self) -> None:
        self._send(405, b"only GET: the dashboard changes nothing\n", "text/plain; charset=utf-8",
                   {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _refuse  # noqa: N815

    def _send(self, status: int, body: bytes, kind: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class Dashboard:
    """The server for one store: ``start()`` in a thread or ``serve_forever()``; ``url``; ``stop()``."""

    def __init__(self, db_path, bind: str = "127.0.0.1", port: int = DEFAULT_PORT, token: Optional[str] = None):
        self.db_path = Path(db_path)
        self.bind = bind
        self.token = token if token is not None else (None if is_loopback_default(bind) else
                                                      secrets.token_urlsafe(24))
        self._lock = threading.Lock()
        self._cache: dict = {}  # wanted run -> (signature, time, live, body)
        self._rows: dict = {}   # finished runs' rows of the runs list (data.runs_list)
        self._runs_seen: set = set()  # run ids known to be in the store (has_run)
        self._thread: Optional[threading.Thread] = None
        try:
            self.httpd = _Server((bind, int(port)), _Handler, self)
        except OSError as err:
            raise BeowulfError(f"--port: cannot listen on {bind} port {port} ({err.strerror})") from None
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        """The page's address, with the token when one is needed."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # -- checks
    def token_ok(self, given: str) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())

    def host_ok(self, header: Optional[str]) -> bool:
        """With a token anything goes (the token is the secret); without, only our loopback names."""
        if self.token:
            return True
        allowed = {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}",
                   f"{self.bind}:{self.port}"}
        return (header or "").strip().lower() in allowed

    # -- data
    def _signature(self):
        found = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self.db_path}{suffix}")
                found.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                found.append(None)
        return tuple(found)

    def state(self, wanted: Optional[int]) -> bytes:
        """The snapshot as JSON bytes (cached: see the module doc)."""
        with self._lock:
            signature = self._signature()
            cached = self._cache.get(wanted)
            now = time.monotonic()
            if cached and cached[0] == signature and (not cached[2] or now - cached[1] < FRESH_SECONDS):
                return cached[3]
            body, live = self._compute(wanted)
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[wanted] = (signature, now, live, body)
            return body

    def has_run(self, run_id: int) -> bool:
        """Whether the store has run ``run_id`` (False when there is no store yet)."""
        from cluster.store import Store

        if run_id in self._runs_seen:  # a run is never deleted from a store
            return True
        if not self.db_path.exists():
            return False
        try:
            with Store.open_readonly(self.db_path) as store:
                found = store.run(run_id) is not None
        except BeowulfError:
            return False
        if found:
            self._runs_seen.add(run_id)
        return found

    def _compute(self, wanted: Optional[int]) -> tuple[bytes, bool]:
        from cluster.store import Store

        if not self.db_path.exists():
            return _json({"error": f"no store yet at {self.db_path}: a run (fab primes ...) creates it",
                          "runs": [], "run": None}), True
        try:
            with Store.open_readonly(self.db_path) as store:
                snap = data.snapshot(store, wanted, cache=self._rows)
        except BeowulfError as err:
            return _json({"error": shown(str(err)), "runs": [], "run": None}), True
        snap["db"] = str(self.db_path)
        live = any(r["state"] == "running" for r in snap["runs"])
        return _json(snap), live

    # -- life
    def start(self) -> Dashboard:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _json(value) -> bytes:
    # ensure_ascii: every non-ASCII character (controls, bidi) travels as \uXXXX; the page
    # escapes them again for display.
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, default=str, separators=(",", ":")).encode()
    except ValueError:  # a NaN or infinity (JSON has none): null, as the page shows no value
        return json.dumps(_finite(value), ensure_ascii=True, default=str, separators=(",", ":")).encode()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
