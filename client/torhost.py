"""Tor on this host: SOCKS check, control port (status, NEWNYM), restart of a tor run by hand.

Runs on the host with the host's own Python (3.6+, standard library only). The
coordinator (cluster/tor.py) sends this file on stdin followed by one line,
``main('{json parameters}')``, so nothing but ``python3 -`` is on the command
line; the answer is one line ``BEOWULF-TOR {json}`` on stdout. It is also part of
the client bundle, so it can be imported and tested like any module.

Everything a listening socket says is hostile until checked (SECURITY.md, "Tor control port and restarts"):

- The control cookie is read only at an expected path (``expected_cookie``): the
  ``tor_cookie`` of hosts.ini when set, else Debian's /run/tor/control.authcookie,
  or, for a control *socket*, a file in the socket's own folder (not a folder
  anyone may write to). A path the server names (PROTOCOLINFO's COOKIEFILE) is
  only compared with those, never opened for its own sake.
- SAFECOOKIE whenever the server offers it, and the server must prove it knows the
  cookie (its hash is checked) before ours is sent. Plain COOKIE (the cookie itself
  on the wire) only when SAFECOOKIE is not offered, the server names the very
  expected path, and the listening socket belongs to the cookie file's owner or root.
- A restart by process (``do_respawn``) only restarts a tor that runs as the
  login user, after checking in /proc that this pid holds the listening socket of
  ``tor_control`` (``listening_inodes`` / ``pid_holds``), and only runs its
  program when that is a regular file owned by root or the login user that
  nobody else may write. It never changes user: other users' tors are restarted
  by systemctl/service (cluster/tor.py).
"""
import binascii
import hashlib
import hmac
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"
DEBIAN_COOKIE = "/run/tor/control.authcookie"
SOCKET_FOLDER_COOKIES = ("control.authcookie", "control_auth_cookie")
COOKIE_BYTES = 32
TIMEOUT = 5.0
MAX_LINE = 64 << 10  # one line of a control answer
MAX_REPLY = 1 << 20  # one whole control answer
MAX_SHOWN = 200  # characters of any text from the server that we pass on
MARK = "BEOWULF-TOR "
TCP_LISTEN = "0A"  # /proc/net/tcp state column
UNIX_LISTENING_FLAG = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


class ControlError(Exception):
    pass


def shown(text, limit=MAX_SHOWN):
    """Text from the server made safe to pass on: control characters escaped, length bounded."""
    if text is None:
        return None
    out = []
    for ch in str(text)[:limit]:
        code = ord(ch)
        if code < 32 or code == 127 or 0x80 <= code < 0xa0:
            out.append("\\x%02x" % code)
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(str(text)) > limit else "")


def reason(err):
    """A short lower-case reason for a socket or file error."""
    if isinstance(err, socket.timeout):
        return "no answer (timed out)"
    text = getattr(err, "strerror", None)
    if text:
        return text[0].lower() + text[1:]
    return str(err) or type(err).__name__


def endpoint(text):
    """(family, address) for "host:port", "[v6]:port", "unix:/path" or "/path"."""
    text = text.strip()
    if text.startswith("unix:"):
        text = text[5:]
    if text.startswith("/") or text.startswith("~"):
        return socket.AF_UNIX, os.path.expanduser(text)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("not host:port or a socket path: %r" % text)
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def connect(text):
    family, where = endpoint(text)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(where)
    except BaseException:
        sock.close()
        raise
    return sock


def socks_check(address):
    try:
        sock = connect(address)
    except ValueError as err:
        return {"ok": False, "error": str(err)}
    except OSError as err:
        return {"ok": False, "error": reason(err)}
    try:
        sock.sendall(b"\x05\x01\x00")
        reply = b""
        while len(reply) < 2:
            chunk = sock.recv(2 - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError as err:
        return {"ok": False, "error": reason(err)}
    finally:
        sock.close()
    if reply == b"\x05\x00":
        return {"ok": True}
    if not reply:
        return {"ok": False, "error": "closed without a SOCKS5 answer"}
    return {"ok": False, "error": "answered %r, not SOCKS5 without authentication" % reply}


# ---------------------------------------------------------------- the control protocol


def unquote(text, i):
    """The QuotedString starting at text[i] (a double quote) and the index after it."""
    out = bytearray()
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return out.decode("utf-8", "surrogateescape"), i + 1
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in "01234567":
                digits = nxt
                while len(digits) < 3 and i + 1 + len(digits) < len(text) and text[i + 1 + len(digits)] in "01234567":
                    digits += text[i + 1 + len(digits)]
                out.append(int(digits, 8) & 255)
                i += 1 + len(digits)
                continue
            out += {"n": b"\n", "t": b"\t", "r": b"\r"}.get(nxt, nxt.encode("utf-8"))
            i += 2
            continue
        out += ch.encode("utf-8", "surrogateescape")
        i += 1
    raise ControlError("unterminated quoted string in tor's answer")


def keywords(text):
    """KEY=VALUE and KEY="quoted" pairs of a reply line (bare words map to "")."""
    out, i = {}, 0
    while i < len(text):
        while i < len(text) and text[i] == " ":
            i += 1
        j = i
        while j < len(text) and text[j] not in "= ":
            j += 1
        key = text[i:j]
        if j < len(text) and text[j] == "=":
            j += 1
            if j < len(text) and text[j] == '"':
                value, j = unquote(text, j)
            else:
                k = j
                while j < len(text) and text[j] != " ":
                    j += 1
                value = text[k:j]
            out[key] = value
        elif key:
            out.setdefault(key, "")
        i = j
    return out


class Control(object):
    """One control connection; replies are lists of (code, text); async 650 events are set aside."""

    def __init__(self, address):
        self.address = address
        self.sock = connect(address)
        self.buffer = b""
        self.events = []

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def line(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ControlError("tor closed the control connection")
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer[:MAX_LINE]:
                raise ControlError("control answer line too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        if len(line) > MAX_LINE:
            raise ControlError("control answer line too long")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def one(self):
        """One complete reply or async event: its lines as (code, text)."""
        lines, size = [], 0
        while True:
            line = self.line()
            if len(line) < 4 or line[3] not in " -+":
                raise ControlError("not a tor control answer: %s" % shown(line[:80]))
            code, kind, text = line[:3], line[3], line[4:]
            if kind == "+":
                data = []
                while True:
                    more = self.line()
                    if more == ".":
                        break
                    data.append(more[1:] if more.startswith("..") else more)
                    size += len(more)
                    if size > MAX_REPLY:
                        raise ControlError("control answer too long")
                text = text + "\n" + "\n".join(data)
            size += len(line)
            if size > MAX_REPLY or len(lines) > 1000:
                raise ControlError("control answer too long")
            lines.append((code, text))
            if kind == " ":
                return lines

    def reply(self):
        skipped = 0
        while True:
            lines = self.one()
            if lines[-1][0] != "650":
                return lines
            if len(self.events) < 100:
                self.events.append(lines)
            skipped += 1
            if skipped > 10000:
                raise ControlError("only events, no answer")

    def command(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.reply()

    def wait_event(self, match, seconds):
        """The first 650 event (its lines joined) for which match(text) holds, or None after seconds."""
        deadline = time.time() + seconds
        while True:
            while self.events:
                text = " ".join(t for _, t in self.events.pop(0))
                if match(text):
                    return text
            left = deadline - time.time()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                lines = self.one()
                if lines[-1][0] == "650":
                    self.events.append(lines)
            except socket.timeout:
                return None
            finally:
                self.sock.settimeout(TIMEOUT)

    def peer_uid(self):
        """The uid of the process listening on a unix control socket (SO_PEERCRED), else None."""
        if self.sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return None
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        return struct.unpack("3i", raw)[1]


def ok(reply):
    return bool(reply) and reply[-1][0] == "250"


def said(reply):
    return shown(" / ".join((code + " " + text).strip() for code, text in reply), 300)


def protocolinfo(ctl):
    reply = ctl.command("PROTOCOLINFO 1")
    if not ok(reply):
        raise ControlError("PROTOCOLINFO refused: " + said(reply))
    info = {"methods": [], "cookiefile": None, "version": None}
    for _, text in reply:
        if text.startswith("AUTH "):
            pairs = keywords(text[5:])
            info["methods"] = [m for m in pairs.get("METHODS", "").split(",") if m]
            info["cookiefile"] = pairs.get("COOKIEFILE")
        elif text.startswith("VERSION "):
            info["version"] = keywords(text[8:]).get("Tor")
    return info


# ---------------------------------------------------------------- which cookie, and how


def same_path(a, b):
    """True when two paths name the same place (normalised; symlinks in folders resolved)."""
    if not a or not b:
        return False
    a, b = os.path.expanduser(a), os.path.expanduser(b)
    if not (os.path.isabs(a) and os.path.isabs(b)):
        return False
    norm = lambda p: os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))  # noqa: E731
    return norm(a) == norm(b)


def private_folder(path):
    """True when ``path`` is a folder that not everybody may write to (not /tmp)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and not info.st_mode & stat.S_IWOTH


def expected_cookie(control, configured, named):
    """(path to read, why not) for the cookie of ``control``; the server's ``named`` path only as a hint.

    ``configured`` (hosts.ini ``tor_cookie``) is the only candidate when set. Else
    the candidates are the files in a control socket's own folder (when no one else
    may write there) and Debian's /run/tor/control.authcookie. A named path is used
    only when it is one of the candidates; otherwise the first existing candidate.
    """
    if configured:
        return os.path.expanduser(configured), None
    try:
        family, where = endpoint(control)
    except ValueError as err:
        return None, str(err)
    candidates = []
    if family == socket.AF_UNIX:
        folder = os.path.dirname(where)
        if private_folder(folder):
            if (named and os.path.isabs(named) and os.path.basename(named) not in ("", ".", "..")
                    and os.path.realpath(os.path.dirname(named)) == os.path.realpath(folder)):
                candidates.append(os.path.join(folder, os.path.basename(named)))
            candidates += [os.path.join(folder, name) for name in SOCKET_FOLDER_COOKIES]
    candidates.append(DEBIAN_COOKIE)
    for path in candidates:
        if named and same_path(named, path):
            return path, None
    if named:
        return None, ("tor names its cookie file %s, which is not where beowulf looks for one; "
                      "set tor_cookie = PATH in hosts.ini" % shown(named))
    for path in candidates:
        if os.path.lexists(path):
            return path, None
    return None, "no cookie file at %s; set tor_cookie = PATH in hosts.ini" % ", ".join(candidates)


def read_cookie(path):
    """(32 bytes, owner uid) of the cookie at ``path``: a regular file, not a symlink; ControlError if not."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ControlError("cannot read the cookie %s: %s" % (shown(path), reason(err))) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ControlError("the cookie %s is not a regular file" % shown(path))
        if info.st_size != COOKIE_BYTES:
            raise ControlError("the cookie %s is not %d bytes" % (shown(path), COOKIE_BYTES))
        cookie = os.read(fd, COOKIE_BYTES + 1)
    finally:
        os.close(fd)
    if len(cookie) != COOKIE_BYTES:
        raise ControlError("the cookie %s is not %d bytes" % (shown(path), COOKIE_BYTES))
    return cookie, info.st_uid


def safecookie_hashes(cookie, client_nonce, server_nonce):
    """(the server's hash, ours) for SAFECOOKIE (tor's control-spec, AUTHCHALLENGE)."""
    message = cookie + client_nonce + server_nonce
    return (hmac.new(SERVER_KEY, message, hashlib.sha256).digest(),
            hmac.new(CLIENT_KEY, message, hashlib.sha256).digest())


def check_server_hash(cookie, client_nonce, server_nonce, server_hash):
    """True when the server's SAFECOOKIE hash proves it knows ``cookie``."""
    expected, _ = safecookie_hashes(cookie, client_nonce, server_nonce)
    return hmac.compare_digest(expected, server_hash)


def authenticate(ctl, info, configured):
    """Authenticate on ctl; return the method used. The cookie is read here and never shown."""
    methods = set(info["methods"])
    if "NULL" in methods:
        reply = ctl.command("AUTHENTICATE")
        if not ok(reply):
            raise ControlError("AUTHENTICATE refused: " + said(reply))
        return "none needed"
    if not methods & set(["COOKIE", "SAFECOOKIE"]):
        if "HASHEDPASSWORD" in methods:
            raise ControlError("tor wants a control password (HashedControlPassword); "
                               "beowulf uses cookie authentication only (CookieAuthentication 1)")
        raise ControlError("no authentication method beowulf can use (tor offers %s)"
                           % (shown(",".join(sorted(methods))) or "none"))
    path, why = expected_cookie(ctl.address, configured, info["cookiefile"])
    if path is None:
        raise ControlError(why)
    if "SAFECOOKIE" in methods:
        cookie, _ = read_cookie(path)
        nonce = os.urandom(32)
        reply = ctl.command("AUTHCHALLENGE SAFECOOKIE " + binascii.hexlify(nonce).decode())
        if not ok(reply):
            raise ControlError("AUTHCHALLENGE refused: " + said(reply))
        pairs = keywords(reply[-1][1])
        try:
            server_hash = binascii.unhexlify(pairs["SERVERHASH"])
            server_nonce = binascii.unhexlify(pairs["SERVERNONCE"])
        except (KeyError, ValueError, TypeError):
            raise ControlError("unexpected AUTHCHALLENGE answer") from None
        if not check_server_hash(cookie, nonce, server_nonce, server_hash):
            raise ControlError("the control port does not know tor's cookie %s (not this tor?)" % shown(path))
        answer = binascii.hexlify(safecookie_hashes(cookie, nonce, server_nonce)[1]).decode()
        method = "safecookie"
    else:
        # Plain COOKIE puts the cookie itself on the wire: only to a server that names this very
        # expected file and whose listening socket belongs to the file's owner (or root).
        if not same_path(info["cookiefile"], path):
            raise ControlError("tor offers only plain COOKIE without naming %s; not sending a cookie"
                               % shown(path))
        cookie, owner = read_cookie(path)
        listener = listener_uid(ctl)
        if listener is None or listener not in (0, owner):
            raise ControlError("the control port %s is not served by the owner of %s (uid %s, the listener's "
                               "uid %s); not sending the cookie"
                               % (shown(ctl.address), shown(path), owner, "?" if listener is None else listener))
        answer = binascii.hexlify(cookie).decode()
        method = "cookie"
    cookie = None
    reply = ctl.command("AUTHENTICATE " + answer)
    answer = None
    if not ok(reply):
        raise ControlError("AUTHENTICATE refused: " + said(reply)[:120])
    return method


def getinfo(ctl, key):
    reply = ctl.command("GETINFO " + key)
    if not ok(reply):
        return None
    for _, text in reply:
        if text.startswith(key + "="):
            return text[len(key) + 1:].strip()
    return None


def getconf(ctl, key):
    reply = ctl.command("GETCONF " + key)
    if not ok(reply):
        return None
    text = reply[0][1]
    return text.split("=", 1)[1] if "=" in text else ""


def open_control(address, configured):
    """(Control, status dict); status["ok"] when PROTOCOLINFO was answered."""
    status = {"ok": False, "error": None, "auth": None, "auth_error": None, "version": None, "pid": None}
    try:
        ctl = Control(address)
    except ValueError as err:
        status["error"] = str(err)
        return None, status
    except OSError as err:
        status["error"] = reason(err)
        return None, status
    try:
        info = protocolinfo(ctl)
    except (OSError, ControlError) as err:
        ctl.close()
        status["error"] = reason(err) if isinstance(err, OSError) else str(err)
        return None, status
    status["ok"] = True
    status["version"] = shown(info["version"], 60)
    try:
        status["auth"] = authenticate(ctl, info, configured)
    except (OSError, ControlError) as err:
        ctl.close()
        status["auth_error"] = reason(err) if isinstance(err, OSError) else str(err)
        return None, status
    return ctl, status


def control_answers(address):
    """True when something at address answers PROTOCOLINFO like tor."""
    try:
        ctl = Control(address)
    except (OSError, ValueError):
        return False
    try:
        protocolinfo(ctl)
        return True
    except (OSError, ControlError):
        return False
    finally:
        ctl.close()


def control_status(address, configured, details=True):
    ctl, status = open_control(address, configured)
    if ctl is None:
        return status
    try:
        status["version"] = shown(getinfo(ctl, "version"), 60) or status["version"]
        pid = getinfo(ctl, "process/pid")
        status["pid"] = int(pid) if pid and pid.isdigit() and len(pid) < 10 else None
        status.update(bootstrap_of(getinfo(ctl, "status/bootstrap-phase")))
        circuit = getinfo(ctl, "status/circuit-established")
        status["circuit"] = circuit if circuit in ("0", "1") else None
        if details:
            status["disable_network"] = shown(getconf(ctl, "DisableNetwork"), 10)
            status["socks_listeners"] = shown(getinfo(ctl, "net/listeners/socks"))
    except (OSError, ControlError) as err:
        status["auth_error"] = "after authenticating: " + (reason(err) if isinstance(err, OSError) else str(err))
    finally:
        ctl.close()
    return status


def bootstrap_of(text):
    """{"progress": 0-100 or None, "tag", "summary"} from GETINFO status/bootstrap-phase.

    Tor answers e.g. ``NOTICE BOOTSTRAP PROGRESS=14 TAG=handshake_dir SUMMARY="Handshaking
    with a relay"`` (a WARN line when bootstrapping has trouble); anything else is unknown.
    """
    found = {"progress": None, "tag": None, "summary": None}
    words = (text or "").split(" ", 2)
    if len(words) < 3 or words[1] != "BOOTSTRAP":
        return found
    try:
        pairs = keywords(words[2])
    except ControlError:
        return found
    progress = pairs.get("PROGRESS", "")
    if progress.isdigit() and len(progress) <= 3 and int(progress) <= 100:
        found["progress"] = int(progress)
    found["tag"] = shown(pairs.get("TAG"), 40)
    found["summary"] = shown(pairs.get("SUMMARY"), 100)
    # REASON names the trouble (NOROUTE, CONNECTREFUSED, ...); "DONE" (a connection closed) says nothing
    said = [w for w in (pairs.get("REASON"), pairs.get("WARNING")) if w and w.upper() != "DONE"]
    if words[0] == "WARN" and said:
        found["warning"] = shown(", ".join(sorted(set(said), key=said.index)), 100)
    return found


def do_status(p):
    return {"socks": socks_check(p["socks"]), "control": control_status(p["control"], p.get("cookie"))}


def do_newnym(p):
    ctl, status = open_control(p["control"], p.get("cookie"))
    if ctl is None:
        return {"control": status}
    try:
        subscribed = ok(ctl.command("SETEVENTS SIGNAL NOTICE"))
        reply = ctl.command("SIGNAL NEWNYM")
        status["reply"] = said(reply)
        status["newnym"] = ok(reply)
        if ok(reply) and subscribed:
            event = ctl.wait_event(lambda text: "NEWNYM" in text, float(p.get("listen", 1.0)))
            status["event"] = shown(event, 300)
    except (OSError, ControlError) as err:
        status["newnym"] = False
        status["reply"] = reason(err) if isinstance(err, OSError) else str(err)
    finally:
        ctl.close()
    return {"control": status}


# ---------------------------------------------------------------- who owns the control socket


def proc_ipv4(text):
    """The address of /proc/net/tcp's hex form (host byte order), e.g. "0100007F" -> "127.0.0.1"."""
    return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(text, 16)))


def proc_ipv6(text):
    """The address of /proc/net/tcp6's hex form (four host-order words)."""
    words = [int(text[i:i + 8], 16) for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words))


def tcp_listeners(text, family):
    """[(address, port, uid, inode)] of the LISTEN sockets in the text of /proc/net/tcp or tcp6."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        try:
            address, port = fields[1].split(":")
            address = proc_ipv4(address) if family == socket.AF_INET else proc_ipv6(address)
            found.append((address, int(port, 16), int(fields[7]), int(fields[9])))
        except (ValueError, struct.error, OSError):
            continue
    return found


def unix_listeners(text):
    """[(path, inode)] of the listening sockets in the text of /proc/net/unix."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) < 8:
            continue
        try:
            flags, state, inode = int(fields[3], 16), fields[5], int(fields[6])
        except ValueError:
            continue
        if flags & UNIX_LISTENING_FLAG and state == "01":
            found.append((fields[7], inode))
    return found


def _wildcard(address):
    return address in ("0.0.0.0", "::")


def listening_inodes(control, proc="/proc"):
    """({inodes of the sockets listening at ``control``}, {their owners' uids}); None when unparseable."""
    try:
        family, where = endpoint(control)
    except ValueError:
        return None
    inodes, uids = set(), set()
    if family == socket.AF_UNIX:
        for path, inode in unix_listeners(read(proc + "/net/unix") or ""):
            if same_path(path, where):
                inodes.add(inode)
        return inodes, uids
    host, port = where
    try:
        wanted = socket.inet_ntop(family, socket.inet_pton(family, host))
    except (OSError, ValueError):
        return None
    tables = [("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)]
    for name, table_family in tables:
        for address, lport, uid, inode in tcp_listeners(read(proc + "/net/" + name) or "", table_family):
            if lport != port:
                continue
            mapped = address.startswith("::ffff:") and address[7:] == wanted
            if address == wanted or mapped or (_wildcard(address) and
                                                (table_family == family or address == "::")):
                inodes.add(inode)
                uids.add(uid)
    return inodes, uids


def socket_inodes(pid, proc="/proc"):
    """The socket inodes among pid's open files; None when they cannot be read (another user's process)."""
    folder = "%s/%d/fd" % (proc, pid)
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    found = set()
    for name in names:
        try:
            target = os.readlink(folder + "/" + name)
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            try:
                found.add(int(target[8:-1]))
            except ValueError:
                continue
    return found


def pid_holds(pid, control, proc="/proc"):
    """(True/False/None, why): does pid hold the socket listening at ``control``? None: cannot tell."""
    listening = listening_inodes(control, proc)
    if listening is None:
        return None, "cannot parse %s" % shown(control)
    inodes = listening[0]
    if not inodes:
        return False, "nothing listens at %s in %s/net" % (shown(control), proc)
    held = socket_inodes(pid, proc)
    if held is None:
        return None, "cannot see the open files of pid %d (another user's process)" % pid
    if held & inodes:
        return True, None
    return False, "pid %d does not hold the socket listening at %s" % (pid, shown(control))


def listener_uid(ctl):
    """The uid owning the socket we are connected to (SO_PEERCRED or /proc/net/tcp*), or None."""
    uid = ctl.peer_uid()
    if uid is not None:
        return uid
    listening = listening_inodes(ctl.address)
    if listening and len(listening[1]) == 1:
        return next(iter(listening[1]))
    return None


# ---------------------------------------------------------------- restart


def read(path, mode="r"):
    try:
        with open(path, mode) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def alive(pid):
    stat_text = read("/proc/%d/stat" % pid, "rb")
    if stat_text is None:
        return False
    return stat_text[stat_text.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def ids(pid):
    """(uids, gids) of pid from /proc/PID/status: (real, effective, saved, filesystem) each."""
    uids = gids = None
    for line in (read("/proc/%d/status" % pid) or "").splitlines():
        if line.startswith("Uid:"):
            uids = [int(x) for x in line.split()[1:5]]
        elif line.startswith("Gid:"):
            gids = [int(x) for x in line.split()[1:5]]
    return uids, gids


def managed_by(pid):
    cgroup = read("/proc/%d/cgroup" % pid) or ""
    if "/tor.service" in cgroup or "/tor@" in cgroup:
        return "systemd"
    pidfile = (read("/run/tor/tor.pid") or read("/var/run/tor/tor.pid") or "").strip()
    if pidfile == str(pid):
        return "service"
    return None


def program_ok(path, me):
    """None when ``path`` is a program we may run again as ``me``, else why not.

    A regular file (not a symlink), owned by root or by ``me``, that neither its
    group nor others may write.
    """
    try:
        info = os.lstat(path)
    except OSError as err:
        return "cannot see %s: %s" % (shown(path), reason(err))
    if not stat.S_ISREG(info.st_mode):
        return "%s is not a regular file" % shown(path)
    if info.st_uid not in (0, me):
        return "%s belongs to uid %d, neither root nor us (uid %d)" % (shown(path), info.st_uid, me)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "%s may be written by others (mode %o)" % (shown(path), stat.S_IMODE(info.st_mode))
    return None


def restartable(pid, control, me=None):
    """(facts, why not): may this pid be restarted by process, by us, as us?

    Only a tor that runs as us (all four uids), holds the socket listening at
    ``control`` (checked in /proc), and whose program passes ``program_ok``.
    """
    me = os.geteuid() if me is None else me
    uids, gids = ids(pid)
    if uids is None:
        return None, "tor (pid %d) is gone" % pid
    holds, why = pid_holds(pid, control)
    if holds is False:
        return None, "the control port is not that tor's: " + (why or "?")
    if set(uids) != set([me]):
        return None, ("tor (pid %d) runs as uid %d, not as the login user (uid %d): beowulf restarts "
                      "another user's tor only with --method systemd or service" % (pid, uids[0], me))
    if not holds:
        return None, "cannot check that the control port is that tor's: " + (why or "?")
    raw = read("/proc/%d/cmdline" % pid, "rb")
    if not raw:
        return None, "tor (pid %d) is gone before the restart" % pid
    argv = [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]
    if not argv:
        return None, "pid %d has no command line" % pid
    try:
        exe = os.readlink("/proc/%d/exe" % pid)
    except OSError as err:
        return None, "cannot see tor's program (pid %d): %s" % (pid, reason(err))
    if exe.endswith(" (deleted)"):  # upgraded while running: the new file at the same path
        exe = exe[:-len(" (deleted)")]
    if not os.path.basename(exe).startswith("tor"):
        return None, "pid %d is %s, not tor" % (pid, shown(exe))
    why = program_ok(exe, me)
    if why:
        return None, why
    return {"argv": argv, "exe": exe, "gid": gids[0] if gids else None}, None


def which(name):
    for folder in (os.environ.get("PATH") or "/usr/bin:/bin").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def do_inspect(p):
    comm = (read("/proc/1/comm") or "").strip()
    units = ["/etc/systemd/system/tor.service", "/lib/systemd/system/tor.service",
             "/usr/lib/systemd/system/tor.service"]
    machine = (read("/etc/machine-id") or read("/var/lib/dbus/machine-id") or "").strip()
    facts = {
        "machine_id": shown(machine, 64) or None,
        "uid": os.geteuid(),
        "systemd": comm == "systemd" or (comm == "init" and os.path.isdir("/run/systemd/system")),
        "pid1": shown(comm, 32),
        "tor_unit": any(os.path.exists(u) for u in units),
        "initd": os.path.exists("/etc/init.d/tor") and which("service") is not None,
    }
    control = control_status(p["control"], p.get("cookie"))
    facts["control"] = control
    pid = control.get("pid")
    if pid:
        facts["managed"] = managed_by(pid)
        uids, _ = ids(pid)
        facts["tor_uid"] = uids[0] if uids else None
        holds, why = pid_holds(pid, p["control"])
        facts["holds"] = holds
        facts["holds_why"] = why
        _, facts["process_refused"] = restartable(pid, p["control"])
    return facts


def reopen(pid, fd):
    """Tor's stdout/stderr again when it was a regular file (appending), else /dev/null."""
    try:
        target = os.readlink("/proc/%d/fd/%d" % (pid, fd))
    except OSError:
        target = None
    if target and target.startswith("/") and os.path.isfile(target):
        try:
            return open(target, "ab")
        except OSError:
            pass
    return open(os.devnull, "wb")


def do_respawn(p):
    pid = int(p["pid"])
    found, why = restartable(pid, p["control"])
    if why:
        return {"error": why}
    argv, exe = found["argv"], found["exe"]
    try:
        cwd = os.readlink("/proc/%d/cwd" % pid)
    except OSError:
        cwd = "/"
    environ = read("/proc/%d/environ" % pid, "rb")
    env = None
    if environ:
        env = {}
        for item in environ.split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep and key:
                env[os.fsdecode(key)] = os.fsdecode(value)
    check = subprocess.Popen([exe] + argv[1:] + ["--verify-config"], executable=exe, cwd=cwd, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             close_fds=True)
    try:
        output = check.communicate(timeout=60)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        check.kill()
        check.wait()
        return {"error": "tor --verify-config took over 60 s; not restarting"}
    if check.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return {"error": "tor's configuration does not verify, tor left running: %s"
                         % (shown(lines[-1]) if lines else "exit status %d" % check.returncode)}
    out, err = reopen(pid, 1), reopen(pid, 2)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        return {"error": "cannot stop tor (pid %d): %s" % (pid, reason(error))}
    deadline = time.time() + 20
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 5
        while alive(pid) and time.time() < deadline:
            time.sleep(0.05)
    if alive(pid):
        return {"error": "tor (pid %d) did not stop" % pid}
    child = subprocess.Popen(argv, executable=exe, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, close_fds=True, start_new_session=True)
    out.close()
    err.close()
    deadline = time.time() + 1.5
    while time.time() < deadline and child.poll() is None:
        if control_answers(p["control"]):
            break
        time.sleep(0.05)
    if child.returncode not in (None, 0):
        return {"error": "tor exited with status %d right after the restart (see its log)" % child.returncode,
                "spawned": child.pid}
    return {"spawned": child.pid, "argv": len(argv)}


def do_wait(p):
    old = p.get("old_pid")
    deadline = time.time() + float(p["seconds"])
    while True:
        socks = socks_check(p["socks"])
        control = control_status(p["control"], p.get("cookie"))
        pid = control.get("pid")
        restarted = (pid is not None and pid != old) or (pid is None and not (old and alive(old)))
        if restarted and socks["ok"]:
            return {"ok": True, "socks": socks, "control": control}
        if restarted and pid is not None and control.get("disable_network") == "1":
            return {"ok": True, "socks": socks, "control": control}
        if time.time() >= deadline:
            return {"ok": False, "socks": socks, "control": control, "restarted": restarted}
        time.sleep(0.2)


ACTIONS = {"status": do_status, "newnym": do_newnym, "inspect": do_inspect, "respawn": do_respawn,
           "wait": do_wait}


def main(params):
    p = json.loads(params)
    try:
        result = ACTIONS[p["action"]](p)
    except Exception as err:
        result = {"error": "%s: %s" % (type(err).__name__, shown(err))}
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
