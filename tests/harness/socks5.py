"""A small threaded SOCKS5 server for tests: ``*.test`` names go to a loopback address.

    with Socks5Server() as proxy:           # 127.0.0.1, a free port
        fetch(..., proxy=proxy.address)     # "127.0.0.1:PORT"
        assert proxy.log[0].host == "a.test" and proxy.log[0].atyp == "domain"

- Authentication: "no auth" and username/password (RFC 1929) are both accepted, any
  password; when the client offers username/password it is chosen, so the username
  (Tor's circuit-isolation tag) is recorded.
- CONNECT only (other commands get reply 0x07). Address types IPv4, domain name, IPv6.
- A domain name ending in ``.test`` is connected to ``target_ip`` (127.0.0.1) on the
  port asked for; any other name gets 0x04 (host unreachable) and is never resolved.
- An IP address is allowed only inside 127.0.0.0/8; others get 0x02 (not allowed).
  IPv6 addresses are all refused (0x02): nothing ever leaves the loopback network.
- A refused target gets 0x05, a target that does not answer in time 0x06.
- ``reply = CODE`` forces that reply to every CONNECT (to play a failing proxy);
  ``stall = True`` accepts connections and never answers (a hung proxy).

Every CONNECT is logged (``.log``) with its time, the client's address, what was
asked (name or address, as sent), port, username and the reply code sent.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

logger = logging.getLogger("harness.socks5")

# Reply codes (RFC 1928).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08
# Seconds allowed to connect to a target, and to read each part of a client's request.
CONNECT_TIMEOUT = 5.0
CLIENT_TIMEOUT = 10.0
# Bytes relayed per read.
RELAY_CHUNK = 65536
ALLOWED_NETWORK = ipaddress.ip_network("127.0.0.0/8")
TEST_SUFFIX = ".test"


@dataclass(frozen=True)
class SocksRequest:
    """One CONNECT: ``atyp`` is "ipv4", "domain" or "ipv6"; ``host`` is exactly what was asked."""

    time: float
    peer: Tuple[str, int]
    atyp: str
    host: str
    port: int
    username: Optional[str]
    reply: int


class _Closed(Exception):
    """The client closed the connection or sent garbage."""


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise _Closed(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


class _Handler(socketserver.BaseRequestHandler):
    proxy: Socks5Server  # set on the subclass each Socks5Server makes

    def handle(self) -> None:
        client = self.request
        proxy = self.proxy
        proxy._track(client)
        target = None
        try:
            if proxy.stall:
                proxy._stopping.wait()
                return
            client.settimeout(CLIENT_TIMEOUT)
            username = self._greet(client)
            request = self._request(client)
            if request is None:
                return
            atyp, host, port = request
            code, target = self._decide(atyp, host, port, proxy)
            proxy._record(SocksRequest(time.time(), self.client_address[:2], atyp, host, port, username, code))
            if code != SUCCEEDED:
                self._reply(client, code)
                return
            proxy._track(target)
            bound = target.getsockname()
            self._reply(client, SUCCEEDED, bound[0], bound[1])
            client.settimeout(None)
            target.settimeout(None)
            self._relay(client, target)
        except (_Closed, OSError) as exc:
            logger.debug("socks5 %s: %s", self.client_address, exc)
        finally:
            for sock in (target, client):
                if sock is not None:
                    proxy._untrack(sock)
                    try:
                        sock.close()
                    except OSError:
                        pass

    def _greet(self, client: socket.socket) -> Optional[str]:
        version, count = _read(client, 2)
        if version != 5:
            raise _Closed(f"not SOCKS5 (version {version})")
        methods = _read(client, count)
        if 0x02 in methods:
            client.sendall(b"\x05\x02")
            subversion, length = _read(client, 2)
            if subversion != 1:
                raise _Closed("bad username/password subnegotiation")
            username = _read(client, length).decode("utf-8", "replace")
            (password_length,) = _read(client, 1)
            _read(client, password_length)
            client.sendall(b"\x01\x00")
            return username
        if 0x00 in methods:
            client.sendall(b"\x05\x00")
            return None
        client.sendall(b"\x05\xff")
        raise _Closed("no acceptable authentication method")

    def _request(self, client: socket.socket) -> Optional[Tuple[str, str, int]]:
        version, command, _, atyp = _read(client, 4)
        if version != 5:
            raise _Closed(f"bad request version {version}")
        if atyp == 0x01:
            kind, host = "ipv4", socket.inet_ntop(socket.AF_INET, _read(client, 4))
        elif atyp == 0x03:
            (length,) = _read(client, 1)
            kind, host = "domain", _read(client, length).decode("utf-8", "replace")
        elif atyp == 0x04:
            kind, host = "ipv6", socket.inet_ntop(socket.AF_INET6, _read(client, 16))
        else:
            self._reply(client, ADDRESS_TYPE_NOT_SUPPORTED)
            return None
        (port,) = struct.unpack(">H", _read(client, 2))
        if command != 0x01:
            self.proxy._record(SocksRequest(time.time(), self.client_address[:2], kind, host, port, None,
                                            COMMAND_NOT_SUPPORTED))
            self._reply(client, COMMAND_NOT_SUPPORTED)
            return None
        return kind, host, port

    def _decide(self, atyp: str, host: str, port: int, proxy: Socks5Server) -> Tuple[int, Optional[socket.socket]]:
        """(reply code, connected target socket or None)."""
        if proxy.reply is not None:
            return proxy.reply, None
        if atyp == "domain":
            name = host.rstrip(".").lower()
            if not name.endswith(TEST_SUFFIX):
                return HOST_UNREACHABLE, None
            address = proxy.target_ip
        else:
            ip = ipaddress.ip_address(host)
            if ip.version != 4 or ip not in ALLOWED_NETWORK:
                return NOT_ALLOWED, None
            address = str(ip)
        try:
            target = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            return CONNECTION_REFUSED, None
        except socket.timeout:
            return TTL_EXPIRED, None
        except OSError:
            return HOST_UNREACHABLE, None
        return SUCCEEDED, target

    def _reply(self, client: socket.socket, code: int, address: str = "0.0.0.0", port: int = 0) -> None:
        client.sendall(b"\x05" + bytes([code]) + b"\x00\x01" + socket.inet_aton(address) + struct.pack(">H", port))

    def _relay(self, client: socket.socket, target: socket.socket) -> None:
        """Copy bytes both ways until both sides are done (half-closes passed on)."""
        peers = {client: target, target: client}
        open_ends = [client, target]
        stopping = self.proxy._stopping
        while open_ends and not stopping.is_set():
            ready, _, _ = select.select(open_ends, [], [], 0.5)
            for sock in ready:
                data = sock.recv(RELAY_CHUNK)
                other = peers[sock]
                if data:
                    other.sendall(data)
                    continue
                open_ends.remove(sock)
                try:
                    other.shutdown(socket.SHUT_WR)
                except OSError:
                    pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        logger.debug("socks5: error serving %s", client_address, exc_info=True)


class Socks5Server:
    """A SOCKS5 server on ``ip`` and a free port (or ``port``); see the module docstring."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 0, target_ip: str = "127.0.0.1",
                 reply: Optional[int] = None, stall: bool = False):
        self.ip = ip
        self.target_ip = target_ip
        self.reply = reply
        self.stall = stall
        self._want_port = port
        self._lock = threading.Lock()
        self._log: List[SocksRequest] = []
        self._sockets: set = set()
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    def start(self) -> Socks5Server:
        """Bind and serve in a background thread; returns self."""
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = _Server((self.ip, self._want_port), handler)
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"socks5-{self.ip}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and close every connection still open."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Socks5Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``ip:port``, the form scrape's ``proxy`` argument takes."""
        return f"{self.ip}:{self.port}"

    @property
    def log(self) -> List[SocksRequest]:
        """A copy of the CONNECT requests so far, in order."""
        with self._lock:
            return list(self._log)

    def clear(self) -> None:
        """Forget the logged requests."""
        with self._lock:
            self._log.clear()

    def _record(self, entry: SocksRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
