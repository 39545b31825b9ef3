"""Fetch one URL politely: robots.txt, bounded time and size, optionally through SOCKS5.

Shipped to every host: standard library only, Python 3.6 syntax. PySocks (``socks``)
and ``certifi`` are used when they import; PySocks is required only with a proxy.

``run(args) -> dict`` is what the agent calls, one URL a call::

    {"url": "https://a.example/x", "timeout": 30, "max_bytes": 5000000,
     "user_agent": "...", "insecure": false, "bodies": true,
     "proxy": "127.0.0.1:9050" or null, "isolation": "slot-3" or null,
     "robots": null | {"fetch": true} | {"status": 200, "text": "..."},
     "gap": seconds between request starts at one site (waited after robots.txt),
     "max_redirects": 10,
     "private_networks": ["127.0.0.0/8", ...] or null (PRIVATE_NETWORKS),
     "allow_private_redirects": false}

A redirect may not move from a public address to one in ``private_networks``
(loopback, private, link-local, multicast...), unless the URL's own address was
already one or ``allow_private_redirects``: the address judged is the one the
socket is connected to, so no DNS answer can dodge it. Through a proxy the socket
is connected to the proxy: then only a literal address (or ``localhost``) in a
redirect is judged here and the proxy must refuse the rest (SECURITY.md, "Scrape").

The SOCKS username (``isolation``) gets the worker's slot appended when the agent
runs us (BEOWULF_WORKER_SLOT): one Tor circuit per worker slot.

Failures of the page (DNS, refused, timeout, TLS, HTTP status, robots.txt, a target
the proxy cannot reach) come back in the result (``error``, ``error_kind``). A proxy
that is down or misbehaves raises ``ProxyError``: nothing was fetched, and nothing
ever leaves the host except through the proxy (no fallback, no local DNS).

Bounds: ``timeout`` covers the whole call (robots.txt, redirects, headers and body;
every read is given only the time left), the body is cut at ``max_bytes``, headers
are limited by http.client (65536 bytes a line, 100 lines), and ``Accept-Encoding:
identity`` is sent and nothing is ever decompressed (a server that encodes the body
anyway: its ``Content-Encoding`` comes back in ``content_encoding``).
"""
import base64
import email.utils
import hashlib
import html
import http.client
import io
import ipaddress
import logging
import math
import os
import re
import select
import socket
import ssl
import time
import zlib
from urllib.parse import quote, urljoin, urlsplit
from urllib.robotparser import RobotFileParser

try:
    import socks
except ImportError:  # only needed with a proxy: then it is an error (fail closed)
    socks = None

try:
    import certifi
except ImportError:  # the system's CA bundle is used instead
    certifi = None

logger = logging.getLogger("scrape")

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 5000000
DEFAULT_MAX_REDIRECTS = 10
# The coordinator always sends its own (``--user-agent``, README.md "Scrape").
DEFAULT_USER_AGENT = "beowulf"
# Longest wait for a site's gap ("after") before a request (Crawl-delay is capped at 120 s).
MAX_AFTER_WAIT = 130.0
# Statuses whose Location is followed.
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Statuses whose Retry-After is reported.
RETRY_AFTER_STATUSES = (429, 503)
# The part of the body searched for <title>, and the longest title kept.
TITLE_SCAN_BYTES = 256 * 1024
MAX_TITLE_CHARS = 300
MAX_ENCODING_CHARS = 100
# robots.txt: bytes read and kept, and the longest text (UTF-8 bytes) reported (RFC 9309
# asks parsers for at least 500 KiB; the coordinator refuses more), and redirects followed
# while fetching it (RFC 9309: at least five).
ROBOTS_MAX_BYTES = 512 * 1024
ROBOTS_MAX_REDIRECTS = 5
# Bytes asked of each read of the body.
READ_CHUNK = 64 * 1024
# The longest redirect target followed, and the most characters of a bad one shown in an error.
MAX_URL_CHARS = 8192
MAX_SHOWN_CHARS = 200
# Addresses a redirect may not move to from a public one (loopback, private, shared,
# link-local, multicast, unspecified, reserved); the coordinator sends its own list.
PRIVATE_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)
# IPv6 prefix of NAT64 (RFC 6052): the IPv4 address it embeds is the one judged.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# Set by the agent in each worker process: the worker's slot number.
WORKER_SLOT_ENV = "BEOWULF_WORKER_SLOT"
# SOCKS password sent with the isolation username (Tor only looks at the pair).
ISOLATION_PASSWORD = "beowulf"
# Longest SOCKS username sent as is (PySocks encodes the length as one UTF-8 char).
MAX_ISOLATION_BYTES = 120
# SOCKS5 reply codes that are about the target, not the proxy: (error_kind, text).
SOCKS_TARGET_ERRORS = {
    0x02: ("connect", "connection not allowed by the proxy's rules"),
    0x03: ("connect", "network unreachable"),
    0x04: ("dns", "DNS failure or host unreachable"),
    0x05: ("connect", "connection refused"),
    0x06: ("timeout", "timeout (TTL expired at the proxy)"),
}
# Error kinds that are about reaching the site at all: a robots.txt fetch that failed so is
# reported as that error for each of the site's URLs, not as a robots.txt refusal.
NETWORK_KINDS = ("connect", "dns", "timeout")
# Seconds to wait for the proxy's greeting when checking whether it is still there.
PROXY_CHECK_SECONDS = 10
ERROR_KINDS = ("timeout", "connect", "dns", "tls", "http", "redirects", "robots", "too_big", "other")
DISALLOWED = "disallowed by robots.txt"
DISALLOWED_UNREACHABLE = "disallowed by robots.txt (unreachable)"
_TITLE_RE = re.compile(br"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
# A host name (after IDNA) or an IP address, as http.client will put it in a request.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+)$")
_META_CHARSET_RE = re.compile(br"<meta[^>]+charset=[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_SSL_CONTEXTS = {}


class ProxyError(Exception):
    """The SOCKS proxy is missing, down or misbehaving: a host problem, nothing was fetched."""

    failure_kind = "proxy"  # the failed result's "kind" (client/agent.py failure_kind)


class PageError(Exception):
    """A page-level failure: ``kind`` is one of ERROR_KINDS, the message is one line."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def one_line(text):
    """``text`` with all whitespace runs collapsed to one space."""
    return " ".join(str(text).split())


def describe(exc):
    """A one-line description of an exception: its message, or its type name."""
    text = one_line(exc)
    return text or type(exc).__name__


def reason(exc):
    """The system's words for a socket error, lower case ("connection refused"), else describe()."""
    text = one_line(getattr(exc, "strerror", None) or "")
    if not text:
        return describe(exc)
    return text[0].lower() + text[1:]


def shown(text, limit=MAX_SHOWN_CHARS):
    """``text`` (from a server) safe to show: only printable ASCII, other characters as
    ``\\xNN``/``\\uNNNN`` escapes, backslashes doubled; cut at ``limit`` characters."""
    text = str(text)
    cut = len(text) > limit
    out = []
    for char in text[:limit]:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 32 <= code < 127:
            out.append(char)
        elif code < 256:
            out.append("\\x%02x" % code)
        elif code < 65536:
            out.append("\\u%04x" % code)
        else:
            out.append("\\U%08x" % code)
    if cut:
        out.append("... (%d characters)" % len(text))
    return "".join(out)


class Networks(object):
    """A set of address ranges; ``contains(address)`` for a textual IPv4/IPv6 address."""

    def __init__(self, specs):
        self.networks = [ipaddress.ip_network(str(spec), strict=False) for spec in specs]

    def contains(self, address):
        """True when ``address`` is in one of the ranges, or is not an address at all (fail closed)."""
        try:
            ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        except ValueError:
            return True
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip in NAT64_PREFIX:
                ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return any(ip in network for network in self.networks if network.version == ip.version)

    def literal(self, host):
        """True when ``host`` (from a URL) is an address in the ranges, or a ``localhost`` name."""
        name = host.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
        except ValueError:
            return False
        return self.contains(name)


# ---------------------------------------------------------------------------- sockets


class Deadline(object):
    """The moment the whole call must end (time.monotonic based)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self):
        """Seconds left; raises socket.timeout once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out after %gs" % self.seconds)
        return left


class _DeadlineRaw(io.RawIOBase):
    """Raw reader over a socket: each read waits at most for the time left."""

    def __init__(self, sock, deadline):
        io.RawIOBase.__init__(self)
        self._sock = sock
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        self._sock.settimeout(self._deadline.left())
        return self._sock.recv_into(buffer)


class _DeadlineSocket(object):
    """What http.client sees as its socket: sends and reads bounded by the deadline.

    Closing it does nothing: the fetch closes the real socket itself when it is done.
    """

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data):
        self._sock.settimeout(self._deadline.left())
        return self._sock.sendall(data)

    def makefile(self, mode="rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineRaw(self._sock, self._deadline), READ_CHUNK)

    def settimeout(self, timeout):
        pass

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self._sock, name)


if socks is not None:
    class _SocksSocket(socks.socksocket):
        """A PySocks socket that remembers whether the CONNECT request was sent.

        A timeout before that point means the proxy does not answer (host problem);
        after it, that the proxy could not reach the target in time (page problem).
        """

        connect_sent = False

        def _write_SOCKS5_address(self, addr, file):
            self.connect_sent = True
            return socks.socksocket._write_SOCKS5_address(self, addr, file)
else:
    _SocksSocket = None


def parse_proxy(proxy):
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); raises ProxyError when malformed."""
    text = str(proxy).strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProxyError("bad proxy address %r (want host:port)" % (proxy,))
    return host, int(port)


def ssl_context(insecure):
    """The TLS context: verified (certifi's bundle when importable) or, if ``insecure``, not."""
    context = _SSL_CONTEXTS.get(bool(insecure))
    if context is None:
        if insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif certifi is not None:
            context = ssl.create_default_context(cafile=certifi.where())
        else:
            context = ssl.create_default_context()
        _SSL_CONTEXTS[bool(insecure)] = context
    return context


class Route(object):
    """How sockets to targets are opened: directly, or only through a SOCKS5 proxy."""

    def __init__(self, proxy, isolation, deadline):
        self.deadline = deadline
        self.proxy = None
        self.username = None
        if proxy:
            if socks is None:
                raise ProxyError("a proxy was asked for but PySocks is not installed on this host")
            self.proxy = parse_proxy(proxy)
            if isolation:
                name = str(isolation)
                slot = os.environ.get(WORKER_SLOT_ENV, "")
                if slot.isdigit():  # one circuit per worker slot, whichever task it runs
                    name = "%s-%s" % (name, slot)
                if len(name.encode("utf-8")) > MAX_ISOLATION_BYTES:
                    name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
                self.username = name

    def open(self, host, port):
        """A connected socket to (host, port); raises PageError or ProxyError."""
        if self.proxy is None:
            return self._open_direct(host, port)
        return self._open_socks(host, port)

    def _open_direct(self, host, port):
        try:
            sock = socket.create_connection((host, port), timeout=self.deadline.left())
        except socket.gaierror as exc:
            raise PageError("dns", "DNS failure (%s: %s)" % (host, reason(exc))) from None
        except socket.timeout:
            raise PageError("timeout", "timeout connecting (%s:%d)" % (host, port)) from None
        except OSError as exc:
            raise PageError("connect", "%s (%s:%d)" % (reason(exc), host, port)) from None
        _nodelay(sock)
        return sock

    def _open_socks(self, host, port):
        proxy_host, proxy_port = self.proxy
        where = "SOCKS proxy %s:%d" % (proxy_host, proxy_port)
        try:
            left = self.deadline.left()
        except socket.timeout:
            raise PageError("timeout", "timed out before connecting to %s:%d" % (host, port)) from None
        try:
            family = socket.getaddrinfo(proxy_host, proxy_port, 0, socket.SOCK_STREAM)[0][0]
        except (OSError, IndexError) as exc:
            raise ProxyError("%s: bad address: %s" % (where, describe(exc))) from exc
        sock = _SocksSocket(family, socket.SOCK_STREAM)
        password = ISOLATION_PASSWORD if self.username else None
        sock.set_proxy(socks.SOCKS5, proxy_host, proxy_port, rdns=True,
                       username=self.username, password=password)
        try:
            sock.settimeout(left)
            sock.connect((host, port))
        except socks.ProxyConnectionError as exc:
            sock.close()
            raise ProxyError("%s does not answer: %s" % (where, describe(exc))) from exc
        except (socks.ProxyError, OSError) as exc:
            sock.close()
            raise self._classify(exc, sock.connect_sent or left < 1.0, where, host, port) from None
        _nodelay(sock)
        return sock

    def proxy_gone(self):
        """Why the proxy is certainly gone (refused or reset the connection, or no SOCKS5 greeting
        back), else None. Asked after an exchange through it failed: a proxy
        dying mid-response looks like a cut from the site, and must not be recorded as the site's.
        A slow answer is not "gone" (tor can be slow): later requests time out on their own."""
        proxy_host, proxy_port = self.proxy
        where = "SOCKS proxy %s:%d" % (proxy_host, proxy_port)
        try:
            sock = socket.create_connection((proxy_host, proxy_port), timeout=PROXY_CHECK_SECONDS)
        except socket.timeout:
            return None
        except OSError as exc:
            return "%s does not answer: %s" % (where, reason(exc))
        try:
            sock.settimeout(PROXY_CHECK_SECONDS)
            sock.sendall(b"\x05\x02\x00\x02")  # SOCKS5, offering no auth and user/password
            reply = sock.recv(2)
        except socket.timeout:
            return None
        except OSError as exc:
            return "%s failed: %s" % (where, reason(exc))
        finally:
            sock.close()
        if len(reply) < 2 or reply[0:1] != b"\x05":
            return "%s failed: no SOCKS5 greeting back" % where
        return None

    @staticmethod
    def _classify(exc, connect_sent, where, host, port):
        """PageError for failures about the target, ProxyError for failures of the proxy.

        ``connect_sent``: the CONNECT request had been sent (or the time given was too
        short to blame the proxy), so a timeout is the target's.

        PySocks wraps its own errors (SOCKS5Error, ...) and socket errors that happen
        while negotiating in GeneralProxyError("Socket error", cause): unwrap first.
        """
        while isinstance(exc, socks.GeneralProxyError) and isinstance(exc.socket_err, OSError):
            exc = exc.socket_err
        if isinstance(exc, socks.SOCKS5Error):
            code = _socks_code(exc)
            if code in SOCKS_TARGET_ERRORS:
                kind, text = SOCKS_TARGET_ERRORS[code]
                return PageError(kind, "%s (%s:%d, via proxy)" % (text, host, port))
            return ProxyError("%s failed: %s" % (where, describe(exc)))
        if isinstance(exc, socket.timeout):
            if connect_sent:  # the proxy took our request but could not reach the target in time
                return PageError("timeout", "timeout connecting (%s:%d, via proxy)" % (host, port))
            return ProxyError("%s does not answer (timed out)" % where)
        return ProxyError("%s failed: %s" % (where, describe(exc)))


def _socks_code(exc):
    """The reply code of a PySocks SOCKS5Error (its message starts ``0x04: ...``), or None."""
    match = re.match(r"\s*0x([0-9a-fA-F]{2})", str(exc))
    return int(match.group(1), 16) if match else None


def _nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def tls_handshake(sock, host, context, deadline):
    """Wrap ``sock`` in TLS for ``host``, the handshake bounded by the deadline."""
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.setblocking(False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                ready = _wait(tls, False, deadline)
            except ssl.SSLWantWriteError:
                ready = _wait(tls, True, deadline)
            if not ready:
                raise socket.timeout("TLS handshake timed out")
        tls.settimeout(deadline.left())
    except BaseException:
        tls.close()
        raise
    return tls


def _wait(sock, write, deadline):
    left = deadline.left()
    if write:
        return select.select([], [sock], [], left)[1]
    return select.select([sock], [], [], left)[0]


class Connection(http.client.HTTPConnection):
    """http.client over a Route (direct or SOCKS5), TLS when ``tls``, reads bounded by a deadline.

    One class serves both schemes: ``connect()`` is where sockets are made, so the
    proxy and TLS are handled there (the socket through the route, then
    ``context.wrap_socket(sock, server_hostname=host)``).
    """

    def __init__(self, host, port, route, tls_context=None, on_connect=None):
        http.client.HTTPConnection.__init__(self, host, port, timeout=route.deadline.seconds)
        self.route = route
        self.on_connect = on_connect
        self.tls_context = tls_context
        if tls_context is not None:
            self.default_port = 443  # the Host header omits the port only for 443
        self.raw_socket = None

    def connect(self):
        """Open the socket (route, then TLS) and hand http.client a deadline-bounded view."""
        sock = self.route.open(self.host, self.port)
        if self.on_connect is not None:
            try:
                self.on_connect(sock)  # before a byte is sent
            except BaseException:
                sock.close()
                raise
        if self.tls_context is not None:
            try:
                sock = tls_handshake(sock, self.host, self.tls_context, self.route.deadline)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise PageError("tls", "TLS with %s failed: %s" % (self.host, describe(exc))) from None
            except socket.timeout:
                raise PageError("timeout", "timed out in the TLS handshake with %s" % self.host) from None
            except OSError as exc:
                raise PageError("tls", "TLS with %s failed: %s" % (self.host, describe(exc))) from None
        self.raw_socket = sock
        self.sock = _DeadlineSocket(sock, self.route.deadline)

    def shut(self):
        """Close everything this connection opened."""
        try:
            self.close()
        finally:
            if self.raw_socket is not None:
                try:
                    self.raw_socket.close()
                except OSError:
                    pass
                self.raw_socket = None


# ---------------------------------------------------------------------------- one exchange


class Answer(object):
    """One HTTP exchange: status, headers, the kept body; ``error``/``kind`` if it broke off."""

    def __init__(self, url):
        self.url = url
        self.status = None
        self.headers = None
        self.body = b""
        self.truncated = False
        self.got_body = False
        self.error = None
        self.kind = None

    def header(self, name):
        """A response header's value, or None."""
        return self.headers.get(name) if self.headers is not None else None


def split_url(url):
    """(scheme, host, port, request target) of an http(s) URL; raises PageError if it is not one."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise PageError("other", "bad URL: %s" % describe(exc)) from None
    if scheme not in ("http", "https") or not host:
        raise PageError("other", "not an http(s) URL: %s" % shown(url))
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise PageError("other", "bad host name in URL: %s" % shown(url)) from None
    if not _HOST_RE.match(host):
        raise PageError("other", "bad host name in URL: %s" % shown(url))
    if port is None:
        port = 443 if scheme == "https" else 80
    path = quote(parts.path or "/", safe="/%!$&'()*+,;=:@-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/?%!$&'()*+,;=:@-._~")
    return scheme, host, port, path


def origin_of(url):
    """``scheme://host:port`` (robots.txt scope), or None for a URL that is not http(s)."""
    try:
        scheme, host, port, _ = split_url(url)
    except PageError:
        return None
    return "%s://%s:%d" % (scheme, host, port)


class PrivateRedirect(PageError):
    """A redirect led from a public address to a private one (see the module docstring)."""

    def __init__(self, url, address):
        self.url = url
        self.address = address
        where = "connected to %s" % address if address else "through the proxy"
        PageError.__init__(self, "redirects", "redirect to a private address refused: %s (%s; "
                           "--allow-private-redirects allows it)" % (shown(url), where))


class Fetcher(object):
    """Makes HTTP GETs for one call of ``run``: one route, one user agent, one deadline.

    ``redirected`` is set (by ``follow``) while the requests made are due to a redirect;
    ``private`` (Networks, or None: no check) judges the addresses connected to.
    ``start_private``: a request not due to a redirect (the URL's own, or its robots.txt)
    connected to a private address. ``refused``: the last PrivateRedirect raised.
    """

    def __init__(self, route, user_agent, insecure, private=None):
        self.route = route
        self.user_agent = user_agent
        self.insecure = insecure
        self.private = private
        self.redirected = False
        self.start_private = False
        self.refused = None

    def _admit(self, url, host):
        """The connection check for ``url``: None, or a function of the connected socket."""
        if self.private is None:
            return None
        if self.route.proxy is not None:  # connected to the proxy: only literal addresses can be judged
            if not self.private.literal(host):
                return None
            if not self.redirected:
                self.start_private = True
            elif not self.start_private:
                raise PrivateRedirect(url, None)
            return None

        def admit(sock):
            try:
                address = sock.getpeername()[0]
            except (OSError, IndexError, TypeError):
                address = "?"
            if not self.private.contains(address):
                return
            if not self.redirected:
                self.start_private = True
            elif not self.start_private:
                raise PrivateRedirect(url, address)
        return admit

    def get(self, url, max_bytes):
        """One GET of ``url`` (no redirects followed), the body cut at ``max_bytes``.

        Raises ProxyError; every page-level failure is in the Answer.
        """
        answer = Answer(url)
        try:
            scheme, host, port, target = split_url(url)
        except PageError as exc:
            answer.error, answer.kind = exc.message, exc.kind
            return answer
        conn = None
        try:
            context = ssl_context(self.insecure) if scheme == "https" else None
            conn = Connection(host, port, self.route, context, self._admit(url, host))
            conn.connect()
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("User-Agent", self.user_agent)
            conn.putheader("Accept", "*/*")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            answer.status = response.status
            answer.headers = response.msg
            if response.status not in REDIRECT_STATUSES or not response.getheader("Location"):
                self._read_body(response, answer, max_bytes)
        except ProxyError:
            raise
        except PageError as exc:
            answer.error, answer.kind = exc.message, exc.kind
            if isinstance(exc, PrivateRedirect):
                self.refused = exc
        except Exception as exc:  # anything else the exchange raises is a page error
            answer.kind, answer.error = classify(exc, answer)
        finally:
            if conn is not None:
                conn.shut()
        if answer.error and self.route.proxy is not None:
            gone = self.route.proxy_gone()
            if gone:
                raise ProxyError(gone)
        return answer

    def _read_body(self, response, answer, max_bytes):
        """Read at most ``max_bytes`` of the body into ``answer`` (never the rest)."""
        answer.got_body = True
        chunks = []
        kept = 0
        try:
            # read1 hands over what has arrived (a drip's bytes are kept at a timeout)
            read = getattr(response, "read1", response.read)
            while kept < max_bytes:
                chunk = read(min(READ_CHUNK, max_bytes - kept))
                if not chunk:
                    break
                chunks.append(chunk)
                kept += len(chunk)
            if kept < max_bytes and response.length:  # read1 returns b"" at an early EOF
                answer.error = "connection closed %d bytes before the end of the body" % response.length
                answer.kind = "http"
            elif kept >= max_bytes and not response.isclosed():
                if response.length is not None:
                    answer.truncated = response.length > 0
                else:  # chunked or read-until-close: look for one more byte
                    try:
                        answer.truncated = bool(response.read(1))
                    except (OSError, http.client.HTTPException):  # timeout, broken chunk: unknown
                        answer.truncated = True
        except http.client.IncompleteRead as exc:
            chunks.append(exc.partial)
            answer.error, answer.kind = "connection closed before the end of the body", "http"
        finally:
            answer.body = b"".join(chunks)[:max_bytes]


def classify(exc, answer):
    """(error_kind, one-line error) for an exception raised during an exchange."""
    where = "reading the body" if answer.got_body else "waiting for the response"
    if isinstance(exc, socket.timeout):
        return "timeout", "%s while %s" % (describe(exc), where)
    if isinstance(exc, http.client.LineTooLong):
        return "too_big", "response header line too long"
    if isinstance(exc, http.client.HTTPException):
        text = describe(exc)
        if "more than" in text and "headers" in text:
            return "too_big", "too many response headers (%s)" % shown(text)
        if isinstance(exc, http.client.RemoteDisconnected):
            return "http", "server closed the connection without a response"
        return "http", "bad HTTP response: %s: %s" % (type(exc).__name__, shown(text))
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return "tls", "TLS error while %s: %s" % (where, shown(describe(exc)))
    if isinstance(exc, OSError):
        return "connect", "connection lost while %s: %s" % (where, describe(exc))
    return "other", "%s: %s" % (type(exc).__name__, shown(describe(exc)))


def redirect_target(url, location):
    """The URL a Location header value sends ``url`` to; PageError("redirects") when the value
    is not a usable http(s) URL (whatever its bytes: it is shown escaped and cut)."""
    text = location.strip()
    if len(text) > MAX_URL_CHARS:
        raise PageError("redirects", "bad redirect: a Location of %d characters: %s" % (len(text), shown(text)))
    try:
        target = urljoin(url, text).split("#", 1)[0]
        scheme = urlsplit(target).scheme.lower()
    except Exception as exc:  # urljoin/urlsplit raise ValueError and more on malformed values
        raise PageError("redirects", "bad redirect: %s (%s)" % (shown(text), shown(describe(exc), 80))) from None
    if scheme not in ("http", "https"):
        raise PageError("redirects", "redirect to a URL that is not http(s): %s" % shown(text))
    try:
        split_url(target)
    except PageError as exc:
        raise PageError("redirects", "bad redirect: %s (%s)" % (shown(text), exc.message.split(":", 1)[0])) \
            from None
    return target


def follow(fetcher, url, max_bytes, max_redirects, check=None):
    """GET ``url`` following redirects; returns (Answer, redirects followed).

    ``check(url)`` is called before every request; a PageError it raises ends the
    chain (robots.txt) and is recorded in the returned Answer. A Location that is not
    a usable URL ends it as a page error (``bad redirect``). Requests after the first
    are marked as due to a redirect on the fetcher (and so are those ``check`` makes).
    """
    redirects = 0
    outer = fetcher.redirected
    try:
        while True:
            fetcher.redirected = outer or redirects > 0
            if check is not None:
                try:
                    check(url)
                except PageError as exc:
                    answer = Answer(url)
                    answer.error, answer.kind = exc.message, exc.kind
                    return answer, redirects
            answer = fetcher.get(url, max_bytes)
            location = answer.header("Location")
            if answer.error or answer.status not in REDIRECT_STATUSES or not location:
                return answer, redirects
            if redirects >= max_redirects:
                answer.error = "more than %d redirects" % max_redirects
                answer.kind = "redirects"
                return answer, redirects
            try:
                url = redirect_target(url, location)
            except PageError as exc:
                answer.error, answer.kind = exc.message, exc.kind
                return answer, redirects
            redirects += 1
    finally:
        fetcher.redirected = outer


# ---------------------------------------------------------------------------- robots.txt


class Rules(object):
    """The robots.txt verdict for one origin, from its status and text (RFC 9309).

    2xx: the text decides (urllib.robotparser, for our user agent); 4xx other than
    429: no rules, all allowed; anything else (5xx, 429, unreachable: status None):
    everything disallowed. Only ``status`` and ``text`` count, so rules handed back
    by the coordinator decide exactly as the fetched ones did.
    """

    def __init__(self, status, text, user_agent, network=None):
        self.status = status
        self.user_agent = user_agent
        self.parser = None
        # (kind, error) when robots.txt could not be fetched because the site cannot be reached
        self.network = network if status is None else None
        if isinstance(status, int) and 200 <= status < 300:
            self.mode = "parse"
            self.parser = RobotFileParser()
            self.parser.parse((text or "").splitlines())
            self.parser.modified()  # older robotparsers refuse everything until "read"
            self.crawl_delay = crawl_delay(text or "", user_agent)
        elif isinstance(status, int) and 400 <= status < 500 and status != 429:
            self.mode, self.crawl_delay = "allow", None
        else:
            self.mode, self.crawl_delay = "unreachable", None

    def check(self, url):
        """Raise PageError("robots") unless ``url`` may be fetched."""
        if self.mode == "unreachable" and self.network:
            raise PageError(self.network[0], self.network[1])
        if self.mode == "unreachable":
            raise PageError("robots", DISALLOWED_UNREACHABLE)
        if self.mode == "parse" and not self.parser.can_fetch(self.user_agent, url):
            raise PageError("robots", DISALLOWED)


def crawl_delay(text, user_agent):
    """The Crawl-delay (seconds, float) of the robots.txt group that applies to us, or None.

    Groups are matched like urllib.robotparser does (the first group naming a part of
    our agent's product token, else the ``*`` group), but the value may be a decimal.
    """
    token = user_agent.split("/")[0].strip().lower()
    groups = []
    agents, delay, in_rules = [], None, False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                groups.append((agents, delay))
                agents, delay, in_rules = [], None, False
            agents.append(value.lower())
        elif key in ("allow", "disallow", "crawl-delay", "request-rate") and agents:
            in_rules = True
            if key == "crawl-delay" and delay is None:
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number) and number >= 0:
                    delay = number
    if agents:
        groups.append((agents, delay))
    for agents, delay in groups:
        if any(agent != "*" and agent and agent in token for agent in agents):
            return delay
    for agents, delay in groups:
        if "*" in agents:
            return delay
    return None


def fetch_robots(fetcher, origin):
    """Fetch ``origin``/robots.txt; returns the report dict {status, text, crawl_delay, error}.

    ``status`` is None when it could not be fetched (then everything is disallowed).
    """
    answer, redirects = follow(fetcher, origin + "/robots.txt", ROBOTS_MAX_BYTES, ROBOTS_MAX_REDIRECTS)
    report = {"status": answer.status, "text": None, "crawl_delay": None, "error": None}
    if answer.error:
        # A robots.txt that was not read completely decides nothing: treat it as unreachable.
        report["status"] = None
        report["error"] = "%s: %s" % (answer.kind, answer.error)
        if answer.kind in NETWORK_KINDS and answer.status is None and not redirects:
            # The site itself could not be reached: that is the error of each of its URLs.
            report["error_kind"], report["network_error"] = answer.kind, answer.error
        return report
    if 200 <= answer.status < 300:
        report["text"] = robots_text(answer.body)
    elif not 400 <= answer.status < 500 or answer.status == 429:
        report["error"] = "robots.txt answered HTTP %d" % answer.status
    return report


def robots_text(body):
    """The text of a robots.txt body: decoded, at most ROBOTS_MAX_BYTES in UTF-8 (replacement
    characters are longer than the bytes they replace), never a broken character."""
    text = body[:ROBOTS_MAX_BYTES].decode("utf-8", "replace")
    encoded = text.encode("utf-8")
    if len(encoded) > ROBOTS_MAX_BYTES:
        text = encoded[:ROBOTS_MAX_BYTES].decode("utf-8", "ignore")
    return text


class RobotsCache(object):
    """robots.txt rules per origin for one call: given, fetched once, or ignored.

    An origin whose robots.txt fetch was a refused private redirect keeps that refusal:
    it is the error of every page it would have decided.
    """

    def __init__(self, fetcher, user_agent):
        self.fetcher = fetcher
        self.user_agent = user_agent
        self.rules = {}
        self.reports = {}
        self.refusals = {}

    def give(self, origin, status, text):
        """Rules handed over by the coordinator for ``origin``."""
        self.rules[origin] = Rules(status, text, self.user_agent)

    def network_failure(self, report):
        """(kind, error) of a robots.txt report whose site could not be reached, else None."""
        if report.get("error_kind") in NETWORK_KINDS and report.get("network_error"):
            return report["error_kind"], report["network_error"]
        return None

    def fetch(self, origin):
        """Fetch and remember the rules of ``origin``; returns the report."""
        refused = self.fetcher.refused
        report = fetch_robots(self.fetcher, origin)
        if self.fetcher.refused is not refused:
            self.refusals[origin] = self.fetcher.refused
        rules = Rules(report["status"], report["text"], self.user_agent, self.network_failure(report))
        report["crawl_delay"] = rules.crawl_delay
        self.rules[origin] = rules
        self.reports[origin] = report
        return report

    def check(self, url):
        """Raise PageError("robots") unless robots.txt allows ``url`` (fetching unseen origins)."""
        origin = origin_of(url)
        if origin is None:
            return
        if origin not in self.rules:
            self.fetch(origin)
        refusal = self.refusals.get(origin)
        if refusal is not None:
            if origin_of(refusal.url) == origin:  # the site itself is private: name the page
                raise PrivateRedirect(url, refusal.address)
            raise refusal  # its robots.txt redirected to a private address: name that
        self.rules[origin].check(url)


# ---------------------------------------------------------------------------- results


def retry_after(value, now=None):
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        when = email.utils.mktime_tz(parsed)
    except Exception:  # the parser of some Pythons raises on odd dates; a bad date is no date
        return None
    return float(max(0.0, round(when - (time.time() if now is None else now), 3)))


def title_of(body, content_type):
    """The HTML <title> in the first TITLE_SCAN_BYTES of ``body``: unescaped, collapsed, cut."""
    match = _TITLE_RE.search(body[:TITLE_SCAN_BYTES])
    if match is None:
        return None
    charset = None
    if content_type:
        found = re.search(r"charset=[\"']?([A-Za-z0-9_.:-]+)", content_type, re.IGNORECASE)
        charset = found.group(1) if found else None
    if charset is None:
        found = _META_CHARSET_RE.search(body[:TITLE_SCAN_BYTES])
        charset = found.group(1).decode("ascii") if found else "utf-8"
    try:
        text = match.group(1).decode(charset, "replace")
    except Exception:  # unknown, not a text codec, or one without "replace" (idna): the server's word
        text = match.group(1).decode("utf-8", "replace")
    text = one_line(html.unescape(one_line(text)))
    return text[:MAX_TITLE_CHARS] or None


def _is_html(content_type, encoding):
    if encoding and encoding.strip().lower() not in ("identity", ""):
        return False  # compressed or otherwise encoded: never decoded
    if not content_type:
        return True
    content_type = content_type.lower()
    return "html" in content_type or "xml" in content_type


def _number(args, name, default, kind):
    value = args.get(name)
    if value is None:
        return default
    value = kind(value)
    if value < 0 or (kind is float and not math.isfinite(value)):
        raise ValueError("%s must be a non-negative number, not %r" % (name, args.get(name)))
    return value


def _fetch_page(gap, result, fetcher, url, robots, user_agent, deadline, max_bytes, max_redirects):
    """robots.txt as asked (its report into ``result``), then the page; (Answer, redirects)."""
    check = None
    if robots is not None:
        cache = RobotsCache(fetcher, user_agent)
        origin = origin_of(url)
        if origin is not None:
            if robots.get("fetch"):
                result["robots"] = cache.fetch(origin)
                fetched_at = time.monotonic()  # its answer is in: the site saw the request before
                # robots.txt was a request to the same site: keep the site's gap (--delay, or its
                # Crawl-delay when longer) before the page's own request.
                gap = max(gap, result["robots"].get("crawl_delay") or 0.0)
                pause = min(fetched_at + gap, deadline.end) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            else:
                cache.give(origin, robots.get("status"), robots.get("text"))
        elif robots.get("fetch"):
            result["robots"] = {"status": None, "text": None, "crawl_delay": None,
                                "error": "not an http(s) URL"}
        check = cache.check
    return follow(fetcher, url, max_bytes, max_redirects, check)


def run(args):
    """Fetch ``args["url"]`` (see the module docstring); return the result dict.

    Raises ProxyError when a proxy was asked for and cannot be used (PySocks missing,
    proxy down or misbehaving), and ValueError for malformed args.
    """
    after = args.get("after")  # this host's monotonic clock: the site's gap ends then (cluster/politeness.py)
    if isinstance(after, (int, float)) and math.isfinite(after):
        pause = min(after - time.monotonic(), MAX_AFTER_WAIT)
        if pause > 0:
            time.sleep(pause)
    started = time.monotonic()
    url = str(args["url"])
    timeout = _number(args, "timeout", DEFAULT_TIMEOUT, float)
    max_bytes = _number(args, "max_bytes", DEFAULT_MAX_BYTES, int)
    max_redirects = _number(args, "max_redirects", DEFAULT_MAX_REDIRECTS, int)
    user_agent = str(args.get("user_agent") or DEFAULT_USER_AGENT)
    gap = _number(args, "gap", 0.0, float)
    robots = args.get("robots")
    if robots is True:
        robots = {"fetch": True}
    specs = args.get("private_networks")
    private = None
    if not args.get("allow_private_redirects"):
        private = Networks(PRIVATE_NETWORKS if specs is None else list(specs))
    deadline = Deadline(timeout)
    route = Route(args.get("proxy"), args.get("isolation"), deadline)
    fetcher = Fetcher(route, user_agent, bool(args.get("insecure", False)), private)
    result = {"url": url, "final_url": url, "status": None, "content_type": None, "content_encoding": None,
              "size": 0,
              "truncated": False, "sha256": None, "title": None, "elapsed": 0.0, "redirects": 0,
              "via_proxy": route.proxy is not None, "retry_after": None, "error": None,
              "error_kind": None}
    try:
        answer, redirects = _fetch_page(gap, result, fetcher, url, robots, user_agent, deadline,
                                        max_bytes, max_redirects)
    except ProxyError:
        raise
    except Exception as exc:  # a bug here must not fail the block on every host: the page records it
        logger.warning("%s: internal error: %s", shown(url), describe(exc), exc_info=True)
        answer, redirects = Answer(url), 0
        answer.error, answer.kind = "internal error: %s: %s" % (type(exc).__name__, shown(describe(exc))), "other"
    result["answered_at"] = time.monotonic()  # the site saw the request before: its gap counts from here
    result["final_url"] = answer.url
    result["redirects"] = redirects
    result["status"] = answer.status
    result["error"] = answer.error
    result["error_kind"] = answer.kind
    if answer.status is not None:
        content_type = answer.header("Content-Type")
        result["content_type"] = content_type
        encoding = answer.header("Content-Encoding")
        if encoding and encoding.strip().lower() != "identity":
            result["content_encoding"] = one_line(encoding)[:MAX_ENCODING_CHARS]
        if answer.status in RETRY_AFTER_STATUSES:
            result["retry_after"] = retry_after(answer.header("Retry-After"))
        if answer.got_body:
            body = answer.body
            result["size"] = len(body)
            result["truncated"] = answer.truncated
            result["sha256"] = hashlib.sha256(body).hexdigest()
            if _is_html(content_type, answer.header("Content-Encoding")):
                result["title"] = title_of(body, content_type)
            if body and args.get("bodies", True):
                result["body"] = base64.b64encode(zlib.compress(body, 6)).decode("ascii")
    result["elapsed"] = round(time.monotonic() - started, 6)
    logger.debug("%s: %s %s in %.2fs%s", url, result["status"], result["error_kind"] or "ok",
                 result["elapsed"], " via proxy" if route.proxy else "")
    return result
