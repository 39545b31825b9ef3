"""A small threaded TCP relay for network-fault tests, loopback only.

``Relay(listen_ip, target_ip, target_port)`` accepts on ``listen_ip:port`` and
forwards each connection to the target. While it runs it can:

- add a one-way ``delay`` to every chunk in each direction (a round trip gets
  twice that), without capping throughput;
- cap ``bandwidth`` (bytes per second, per connection and direction);
- ``set_blackhole(True)``: stop moving bytes without closing anything, like a
  network partition. Held bytes are delivered when the blackhole is lifted (TCP
  would retransmit them); new connections are accepted but not forwarded until then;
- ``drop_all()``: close every connection it carries.

Each connection uses a reader and a writer thread per direction, so delayed data
keeps flowing in order while newer data queues behind it.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
import time
from typing import List, Optional, Set

log = logging.getLogger(__name__)

CHUNK = 16384  # bytes read at once; also the largest piece sent between bandwidth checks
CONNECT_TIMEOUT = 5.0  # seconds to connect to the target
POLL = 0.1  # seconds between checks of the stop flag in blocking waits
_EOF = b""


def _loopback(ip: str) -> str:
    if ipaddress.ip_address(ip) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"the relay only uses 127.0.0.0/8 addresses, not {ip}")
    return ip


class Relay:
    """Forward TCP from ``listen_ip:port`` to ``target_ip:target_port`` with faults on demand.

    ``delay`` is seconds added to each direction, ``bandwidth`` bytes/s per connection
    and direction (None: unlimited). ``port`` is chosen by the kernel unless given.
    Counters: ``accepted`` (connections so far), ``bytes_up`` (client to target),
    ``bytes_down`` (target to client); ``connections`` is the number open now.
    """

    def __init__(
        self,
        listen_ip: str,
        target_ip: str,
        target_port: int,
        delay: float = 0.0,
        bandwidth: Optional[float] = None,
        listen_port: int = 0,
    ) -> None:
        self.listen_ip = _loopback(listen_ip)
        self.target_ip = _loopback(target_ip)
        self.target_port = int(target_port)
        self.delay = float(delay)
        self.bandwidth = bandwidth
        self._listen_port = listen_port
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: Set[_Conn] = set()
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def __repr__(self) -> str:
        return (f"<Relay {self.listen_ip}:{self.port} -> {self.target_ip}:{self.target_port}"
                f" delay={self.delay} bw={self.bandwidth} blackhole={self.blackholed}>")

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The listening port (valid after start())."""
        if self._sock is None:
            raise RuntimeError("relay not started")
        return self._sock.getsockname()[1]

    @property
    def connections(self) -> int:
        """Number of connections open through the relay right now."""
        with self._lock:
            return len(self._conns)

    @property
    def blackholed(self) -> bool:
        """True while bytes are held back (a partition)."""
        return not self._flowing.is_set()

    def start(self) -> Relay:
        """Bind, listen and start accepting in a background thread; return self."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.listen_ip, self._listen_port))
        s.listen(128)
        s.settimeout(POLL)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"relay-{self.listen_ip}:{self.port}")
        self._thread.start()
        log.debug("%r started", self)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopped.set()
        self._flowing.set()  # release waiters so they can see the stop
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        for c in self.drop_all():
            c.join(5)

    def set_blackhole(self, on: bool = True) -> None:
        """Hold back (True) or resume (False) all bytes, without closing connections."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()
        for c in self._snapshot():
            c.wake()
        log.debug("%s:%d blackhole %s", self.listen_ip, self.port, "on" if on else "off")

    def set_delay(self, seconds: float) -> None:
        """Set the one-way delay for data read from now on."""
        self.delay = float(seconds)

    def set_bandwidth(self, bytes_per_second: Optional[float]) -> None:
        """Set the cap in bytes/s per connection and direction (None: unlimited)."""
        self.bandwidth = bytes_per_second

    def drop_all(self) -> List[_Conn]:
        """Close every open connection (FIN to both ends); return them."""
        conns = self._snapshot()
        for c in conns:
            c.close()
        return conns

    def _snapshot(self) -> List[_Conn]:
        with self._lock:
            return list(self._conns)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if not self._stopped.is_set():
                    log.exception("relay accept failed")
                return
            self.accepted += 1
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        # A partition also holds new connections: accepted, but not forwarded yet.
        while not self._flowing.wait(POLL):
            if self._stopped.is_set():
                break
        if self._stopped.is_set():
            client.close()
            return
        try:
            server = socket.create_connection((self.target_ip, self.target_port),
                                              timeout=CONNECT_TIMEOUT)
        except OSError as e:
            log.debug("relay: cannot reach %s:%d: %s", self.target_ip, self.target_port, e)
            client.close()
            return
        conn = _Conn(self, client, server)
        with self._lock:
            if self._stopped.is_set():
                client.close()
                server.close()
                return
            self._conns.add(conn)
        conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)


class _Conn:
    """One relayed connection: two sockets and a pipe each way."""

    def __init__(self, relay: Relay, client: socket.socket, server: socket.socket) -> None:
        self.relay = relay
        self.socks = (client, server)
        for s in self.socks:
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.closed = False
        self._lock = threading.Lock()
        self._running = 0
        self._eofs = 0
        self.pipes = (_Pipe(self, client, server, up=True), _Pipe(self, server, client, up=False))
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for p in self.pipes:
            for fn in (p.read_loop, p.write_loop):
                self._threads.append(threading.Thread(target=self._run, args=(fn,), daemon=True))
        with self._lock:
            self._running = len(self._threads)
        for t in self._threads:
            t.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except OSError:
            self.close()
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:  # nobody uses the sockets any more: safe to release the fds
                self.close()
                for s in self.socks:
                    s.close()

    def eof(self) -> None:
        """A direction has finished; the connection ends when both have."""
        with self._lock:
            self._eofs += 1
            done = self._eofs == 2
        if done:
            self.close()

    def close(self) -> None:
        """Shut both sockets down (waking blocked readers) and stop the pipes."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.wake()
        self.relay._forget(self)

    def wake(self) -> None:
        for p in self.pipes:
            with p.cond:
                p.cond.notify_all()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


class _Pipe:
    """One direction: a reader queues (due time, bytes); a writer sends them when due."""

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self._next_send = 0.0

    def read_loop(self) -> None:
        relay = self.conn.relay
        while not self.conn.closed:
            if not relay._flowing.wait(POLL):  # partition: let the sender's buffers fill
                continue
            data = self.src.recv(CHUNK)
            with self.cond:
                self.queue.append((time.monotonic() + relay.delay, data))
                self.cond.notify_all()
            if not data:
                return

    def write_loop(self) -> None:
        relay = self.conn.relay
        while True:
            with self.cond:
                while True:
                    if self.conn.closed:
                        return
                    wait = POLL
                    if self.queue and not relay.blackholed:
                        wait = self.queue[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                    self.cond.wait(min(wait, POLL))
                _, data = self.queue.popleft()
            if data == _EOF:
                self.dst.shutdown(socket.SHUT_WR)
                self.conn.eof()
                return
            self._send(data)

    def _send(self, data: bytes) -> None:
        relay = self.conn.relay
        view = memoryview(data)
        while view:
            while not relay._flowing.wait(POLL):
                if self.conn.closed:
                    return
            bw = relay.bandwidth
            piece = view if not bw else view[: max(1, min(len(view), int(bw / 20)))]
            if bw:
                now = time.monotonic()
                if self._next_send > now:
                    time.sleep(self._next_send - now)
                self._next_send = max(self._next_send, now) + len(piece) / bw
            self.dst.sendall(piece)
            if self.up:
                relay.bytes_up += len(piece)
            else:
                relay.bytes_down += len(piece)
            view = view[len(piece):]
