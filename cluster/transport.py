"""One interface, two kinds: commands on a host over SSH (Paramiko channels), or locally.

Everything above this module speaks in shell command strings (already quoted
by the caller) and bytes, so provisioning and the coordinator are the same code
for a Raspberry Pi across the house and for this computer.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Optional

import paramiko
from fabric import Config, Connection

from .errors import ConnectError, RemoteError
from .inventory import Host
from .ssh import open_connection

log = logging.getLogger(__name__)
# Most bytes of output (stdout and stderr together) kept from one command run with run(): probes,
# setup and tor steps print a few kB. A host that sends more is stopped and reported (SECURITY.md).
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
# Longest stderr line of a long-running command (the agent) kept; the rest of the line is dropped.
MAX_STDERR_LINE = 4096
# Bytes read from a pipe or channel at a time.
CHUNK = 65536
# SSH window of an agent's channel: what the host may send before the coordinator reads it. The
# coordinator reads results only as fast as it checks and stores them (agents.ByteBudget), so
# this is memory held per host: 512 kB (Paramiko's default is 2 MB) still carries 5 MB/s over a
# link with 100 ms round trips (BENCHMARKS.md, coordinator memory).
AGENT_WINDOW_BYTES = 512 * 1024


@dataclass
class CommandResult:
    """Exit status and output of one finished command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> str:
        """The last non-empty line of stderr (or stdout), for one-line error messages."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1][:300]
        return f"exit status {self.returncode}"


class Stream:
    """A long-running command (the agent): write to its stdin, read its stdout by lines."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def readline(self, limit: int = -1) -> bytes:
        """One line of stdout (at most ``limit`` bytes), b"" at end of stream."""
        raise NotImplementedError

    def close_stdin(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Stop the command and release the stream; safe to call twice."""
        raise NotImplementedError

    def last_received(self) -> float:
        """``time.monotonic()`` when stdout bytes last arrived (0.0 where not tracked)."""
        return 0.0

    def stderr_tail(self) -> str:
        """The last lines the command wrote to stderr (for error messages)."""
        return "\n".join(self._stderr_lines[-20:])

    def _drain_stderr(self, read, label: str) -> None:
        """Keep the command's stderr flowing into our log (and a short tail) until EOF.

        ``read(n)`` returns up to n bytes as they come (b"" at EOF). A line is kept up to
        MAX_STDERR_LINE bytes and the rest of it dropped as it arrives: a host writing
        gigabytes with no newline costs neither memory nor more than one pass over the bytes.
        """
        partial = bytearray()
        dropped = 0
        while True:
            try:
                chunk = read(CHUNK)
            except (OSError, EOFError, socket.timeout, ValueError):
                chunk = b""
            if not chunk:
                break
            start = 0
            while start < len(chunk):
                end = chunk.find(b"\n", start)
                stop = len(chunk) if end < 0 else end
                room = MAX_STDERR_LINE - len(partial)
                if room > 0:
                    partial += chunk[start:min(stop, start + room)]
                dropped += max(0, stop - start - room)
                if end < 0:
                    break
                self._stderr_line(partial, dropped, label)
                partial, dropped = bytearray(), 0
                start = end + 1
        if partial or dropped:
            self._stderr_line(partial, dropped, label)

    def _stderr_line(self, line: bytearray, dropped: int, label: str) -> None:
        text = bytes(line).decode("utf-8", "replace").rstrip()
        if dropped:
            text += f" ... ({dropped} more bytes of this line dropped)"
        self._stderr_lines.append(text)
        del self._stderr_lines[:-50]
        log.debug("%s: %s", label, text)


class Transport:
    """Commands and files on one host."""

    host: Host

    def run(self, command: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None) -> CommandResult:
        raise NotImplementedError

    def put(self, data: bytes, path: str) -> None:
        """Write ``data`` to the absolute ``path`` on the host, atomically (temp file, rename)."""
        raise NotImplementedError

    def spawn(self, command: str) -> Stream:
        raise NotImplementedError

    def sudo(self, command: str, timeout: Optional[float] = None) -> CommandResult:
        """Run as root: directly when we are root, else through sudo (password never on a command line)."""
        raise NotImplementedError

    def round_trip(self) -> float:
        """Seconds for one exchange with the host (0 for this computer)."""
        return 0.0

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- local


class LocalStream(Stream):
    def __init__(self, command: str, label: str):
        self._stderr_lines: list[str] = []
        self.process = subprocess.Popen(
            ["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        threading.Thread(target=self._drain_stderr, args=(self.process.stderr.read1, label),
                         daemon=True).start()

    def write(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as err:
            raise ConnectionError(str(err)) from None

    def readline(self, limit: int = -1) -> bytes:
        try:
            return self.process.stdout.readline(limit)
        except (ValueError, OSError):
            return b""

    def close_stdin(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        self.close_stdin()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class LocalTransport(Transport):
    """This computer, no SSH: commands through ``sh -c``."""

    def __init__(self, host: Host):
        self.host = host

    def run(self, command, stdin=None, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        output = _Output(self.host.name)
        process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _feed_stdin(process.stdin, stdin or b"")
            streams = {process.stdout.fileno(): output.out, process.stderr.fileno(): output.err}
            while streams:
                # The deadline is checked on every pass, also while data keeps arriving.
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    raise RemoteError(f"{self.host.name}: command timed out after {timeout:.0f}s")
                ready, _, _ = select.select(list(streams), [], [], min(wait, 1.0))
                for fd in ready:
                    data = os.read(fd, CHUNK)
                    if data:
                        output.add(streams[fd], data)
                    else:
                        del streams[fd]
            try:
                returncode = process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RemoteError(f"{self.host.name}: command timed out after {timeout:.0f}s") from None
        finally:
            if process.poll() is None:  # timed out, too much output, or interrupted: stop it all
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
            process.stdout.close()
            process.stderr.close()
        return output.result(returncode)

    def put(self, data, path):
        target = os.path.expanduser(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temp = f"{target}.tmp{os.getpid()}"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, target)

    def spawn(self, command):
        return LocalStream(command, self.host.name)

    def sudo(self, command, timeout=None):
        if os.geteuid() == 0:
            return self.run(command, timeout=timeout)
        return self.run(f"sudo -n sh -c {shlex.quote(command)}", timeout=timeout)


# ---------------------------------------------------------------- ssh


class _TimedChannelFile(paramiko.ChannelFile):
    """A channel's stdout that notes when bytes last arrived.

    Over a slow link one result line can take longer than the heartbeat timeout to
    arrive (4 MB at 100 kB/s: 40 s); bytes still flowing mean the host is alive.
    """

    last_data = 0.0

    def _read(self, size):
        data = super()._read(size)
        if data:
            self.last_data = time.monotonic()
        return data


class ChannelStream(Stream):
    def __init__(self, channel: paramiko.Channel, label: str):
        self._stderr_lines: list[str] = []
        self.channel = channel
        self._stdout = _TimedChannelFile(channel, "rb")
        threading.Thread(target=self._drain_stderr, args=(channel.recv_stderr, label), daemon=True).start()

    def write(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise ConnectionError(str(err) or "channel closed") from None

    def readline(self, limit: int = -1) -> bytes:
        try:
            return self._stdout.readline(limit if limit > 0 else None)
        except (OSError, EOFError, socket.timeout, paramiko.SSHException):
            return b""

    def last_received(self) -> float:
        return self._stdout.last_data

    def close_stdin(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def kill(self) -> None:
        # Closing the channel closes the agent's stdin; it then kills its workers and exits.
        self.close_stdin()
        try:
            self.channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass


class SshTransport(Transport):
    """A host over one SSH connection; every command is one channel on it."""

    def __init__(self, host: Host, connection: Connection):
        self.host = host
        self.connection = connection
        self._sftp: Optional[paramiko.SFTPClient] = None

    @classmethod
    def connect(cls, host: Host, config: Config, accept_new: bool = False) -> SshTransport:
        return cls(host, open_connection(host, config, accept_new=accept_new))

    def _channel(self, window: Optional[int] = None) -> paramiko.Channel:
        transport = self.connection.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectError(f"{self.host.name}: connection lost")
        try:
            return transport.open_session(window_size=window, timeout=30)
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise ConnectError(f"{self.host.name}: cannot open a session: {err}") from None

    def run(self, command, stdin=None, timeout=None):
        return self._run(command, stdin, timeout)

    def _run(self, command: str, stdin: Optional[bytes], timeout: Optional[float],
             prompt: bytes = b"", password: Optional[str] = None) -> CommandResult:
        """run(); with ``prompt``, stdin stays open and ``password`` answers the first ``prompt``
        seen on stderr (sudo -S): a second one, or one with no password, stops the command."""
        channel = self._channel()
        deadline = None if timeout is None else time.monotonic() + timeout
        output = _Output(self.host.name)
        seen = b""  # stderr not yet searched for the prompt (its last bytes)
        answered = False
        try:
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            if not prompt:
                channel.shutdown_write()
            wakeup = channel.fileno()  # readable while stdout or stderr bytes wait, and once closed
            while True:
                # The deadline is checked on every pass, also while data keeps arriving.
                if deadline is not None and time.monotonic() > deadline:
                    raise RemoteError(f"{self.host.name}: command timed out after {timeout:.0f}s")
                busy = False
                if channel.recv_ready():
                    output.add(output.out, channel.recv(CHUNK))
                    busy = True
                if channel.recv_stderr_ready():
                    data = channel.recv_stderr(CHUNK)
                    busy = True
                    if prompt:
                        seen += data
                        if prompt in seen:
                            if answered or password is None:
                                return CommandResult(1, "", "sudo failed: " + (
                                    "the password was refused" if answered else
                                    "sudo asks for a password: give it with fab --prompt-for-sudo-password, "
                                    "or allow the command with a NOPASSWD rule"))
                            channel.sendall((password + "\n").encode("utf-8"))
                            answered = True
                            data = seen.replace(prompt, b"")
                            seen = b""
                        else:
                            data, seen = seen[:-len(prompt)], seen[-len(prompt):]
                    output.add(output.err, data)
                if busy:
                    continue
                if channel.eof_received or channel.closed:
                    break
                wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
                select.select([wakeup], [], [], wait)
            if seen:
                output.add(output.err, seen)
            status = channel.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise ConnectError(f"{self.host.name}: connection lost: {err or type(err).__name__}") from None
        finally:
            # Closing the channel stops the command: sshd closes its pipes (EOF, SIGPIPE).
            channel.close()
        return output.result(status)

    def round_trip(self) -> float:
        """One SSH global request answered by sshd itself: network + sshd, no process started."""
        transport = self.connection.client.get_transport()
        began = time.perf_counter()
        try:
            transport.global_request("keepalive@openssh.com", wait=True)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise ConnectError(f"{self.host.name}: connection lost: {err}") from None
        return time.perf_counter() - began

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.connection.client.open_sftp()
            except (paramiko.SSHException, OSError, EOFError) as err:
                raise ConnectError(f"{self.host.name}: cannot open SFTP: {err}") from None
        return self._sftp

    def put(self, data, path):
        if not path.startswith("/"):
            raise ValueError(f"remote path must be absolute: {path}")
        temp = str(PurePosixPath(path).with_name(PurePosixPath(path).name + ".part"))
        sftp = self.sftp()
        try:
            sftp.putfo(io.BytesIO(data), temp, file_size=len(data), confirm=True)
            sftp.posix_rename(temp, path)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise RemoteError(f"{self.host.name}: upload to {path} failed: {err}") from None

    def spawn(self, command):
        channel = self._channel(window=AGENT_WINDOW_BYTES)
        try:
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise ConnectError(f"{self.host.name}: cannot start {command.split()[0]}: {err}") from None
        return ChannelStream(channel, self.host.name)

    def sudo(self, command, timeout=None):
        who = self.run("id -u", timeout=30)
        if who.ok and who.stdout.strip() == "0":
            return self.run(command, timeout=timeout)
        # sudo -S prints our prompt on stderr and reads the password on stdin: it is sent then,
        # once, from --prompt-for-sudo-password (Fabric's config only, never a file or a command
        # line); a NOPASSWD rule needs nothing. The output is bounded like run()'s.
        password = self.connection.config.get("sudo", {}).get("password")
        prompt = f"[sudo] beowulf {secrets.token_hex(8)}: "
        return self._run(f"sudo -S -p {shlex.quote(prompt)} sh -c {shlex.quote(command)}", None, timeout,
                         prompt=prompt.encode("ascii"), password=password)

    def close(self):
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError):
                pass
        self.connection.close()


class _Output:
    """stdout and stderr of one command run(), at most MAX_OUTPUT_BYTES together."""

    def __init__(self, host: str):
        self.host = host
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.size = 0

    def add(self, chunks: list[bytes], data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_OUTPUT_BYTES:
            raise RemoteError(f"{self.host}: output too large (over {MAX_OUTPUT_BYTES // 2**20} MB); "
                              "the command was stopped")
        chunks.append(data)

    def result(self, returncode: int) -> CommandResult:
        return CommandResult(returncode, b"".join(self.out).decode("utf-8", "replace"),
                             b"".join(self.err).decode("utf-8", "replace"))


def _feed_stdin(pipe, data: bytes) -> None:
    """Write ``data`` to a command's stdin and close it; from a thread when there is data, so that a
    command that prints before it reads cannot block us with its output unread."""
    def feed():
        try:
            pipe.write(data)
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    if data:
        threading.Thread(target=feed, name="stdin-feeder", daemon=True).start()
    else:
        feed()


def connect(host: Host, config: Config, accept_new: bool = False) -> Transport:
    """A transport for ``host``: local for ``address = local``, else a checked SSH connection."""
    if host.is_local:
        return LocalTransport(host)
    return SshTransport.connect(host, config, accept_new=accept_new)
