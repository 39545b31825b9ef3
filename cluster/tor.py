"""Tor on a host: is it answering, a new identity, a restart; install and start it for `fab setup --tor`.

Everything that touches tor runs on the host itself, with the host's own Python:
one script (``_HOST_SCRIPT``, Python 3.6, standard library only) sent on stdin,
its parameters inside the script text, so the command line is just
``python3 -``. It speaks SOCKS5 (greeting, no-auth) and tor's control protocol
(PROTOCOLINFO, cookie authentication, GETINFO, SIGNAL) to the addresses in
hosts.ini (``socks``, ``tor_control``) and prints one JSON line.

Secrets: the control cookie is read on the host by that script and never
leaves it: not on a command line, not in its output, not in a log. With
SAFECOOKIE (tor offers it whenever it offers COOKIE) not even tor's socket sees
the cookie, only an HMAC of it. A sudo password (system restarts) is Fabric's
business (``transport.sudo``): it is typed into sudo's prompt, never placed on
a command line or written anywhere.

Restart methods, chosen from what the host has (``auto``):

- ``systemd``: the tor answering on the control port is in a systemd unit, or tor
  is down and PID 1 is systemd with a tor.service: ``systemctl restart tor`` as root.
- ``service``: the tor answering is the one /etc/init.d/tor started (its pid file),
  or tor is down and there is /etc/init.d/tor: ``service tor restart`` as root.
- ``process``: a tor someone started by hand: its pid and command line from the
  control port and /proc; its configuration is checked (``--verify-config``), it is
  stopped (SIGTERM, by pid) and started again with the same arguments, environment
  and working folder, detached, as the same user. No sudo when it is our user's.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from typing import Optional

from .errors import RemoteError, SetupError, UsageError
from .provision import MachineOnce, host_python
from .transport import Transport

log = logging.getLogger(__name__)

_SOCKS_CHECK = (
    "import socket,sys\n"
    "h,p=sys.argv[1].rsplit(':',1)\n"
    "s=socket.create_connection((h.strip('[]'),int(p)),5)\n"
    "s.sendall(b'\\x05\\x01\\x00')\n"
    "r=s.recv(2)\n"
    "sys.exit(0 if r==b'\\x05\\x00' else 3)\n"
)
RESTART = "systemctl restart tor 2>/dev/null || service tor restart"
METHODS = ("auto", "systemd", "service", "process")
SYSTEM_COMMANDS = {"systemd": "systemctl restart tor", "service": "service tor restart"}
DEFAULT_RESTART_WAIT = 60.0
_SOCKS_FORMAT = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\]/]+):(\d{1,5})$")


def socks_answers(transport: Transport) -> bool:
    """True when the host's configured SOCKS endpoint answers a SOCKS5 greeting."""
    python = host_python(transport.host)
    command = f"{python} -c {shlex.quote(_SOCKS_CHECK)} {shlex.quote(transport.host.socks)}"
    return transport.run(command, timeout=30).ok


def ensure_tor(transport: Transport) -> str:
    """Install tor when missing (apt via sudo) and (re)start it until SOCKS answers; say what was done."""
    host = transport.host
    steps = []
    if not transport.run("command -v tor", timeout=30).ok:
        done = transport.sudo("DEBIAN_FRONTEND=noninteractive apt-get install -y -q tor", timeout=900)
        if not done.ok:
            raise SetupError(f"{host.name}: cannot install tor: {done.error_line()}")
        steps.append("installed")
    if socks_answers(transport):
        return ", ".join(steps + ["running"])
    done = transport.sudo(RESTART, timeout=120)
    if not done.ok:
        raise SetupError(f"{host.name}: tor does not answer on {host.socks} and cannot be restarted: "
                         f"{done.error_line()}")
    if not socks_answers(transport):
        raise SetupError(f"{host.name}: tor restarted but {host.socks} does not answer SOCKS5")
    return ", ".join(steps + ["restarted"])


# ---------------------------------------------------------------- the script that runs on the host

_HOST_SCRIPT = r'''
import binascii, hashlib, hmac, json, os, signal, socket, subprocess, sys, time

SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"
TIMEOUT = 5.0


class ControlError(Exception):
    pass


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
            if len(self.buffer) > 4 << 20:
                raise ControlError("control answer too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def one(self):
        """One complete reply or async event: its lines as (code, text)."""
        lines = []
        while True:
            line = self.line()
            if len(line) < 4 or line[3] not in " -+":
                raise ControlError("not a tor control answer: %r" % line[:80])
            code, kind, text = line[:3], line[3], line[4:]
            if kind == "+":
                data = []
                while True:
                    more = self.line()
                    if more == ".":
                        break
                    data.append(more[1:] if more.startswith("..") else more)
                text = text + "\n" + "\n".join(data)
            lines.append((code, text))
            if kind == " ":
                return lines

    def reply(self):
        while True:
            lines = self.one()
            if lines[-1][0] != "650":
                return lines
            self.events.append(lines)

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


def ok(reply):
    return bool(reply) and reply[-1][0] == "250"


def said(reply):
    return " / ".join((code + " " + text).strip() for code, text in reply)[:300]


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


def authenticate(ctl, info, prefer):
    """Authenticate on ctl; return the method used. The cookie is read here and never shown."""
    methods = set(info["methods"])
    if "NULL" in methods:
        reply = ctl.command("AUTHENTICATE")
        if not ok(reply):
            raise ControlError("AUTHENTICATE refused: " + said(reply))
        return "none needed"
    path = info["cookiefile"]
    if not (methods & set(["COOKIE", "SAFECOOKIE"])) or not path:
        if "HASHEDPASSWORD" in methods:
            raise ControlError("tor wants a control password (HashedControlPassword); "
                               "beowulf uses cookie authentication only (CookieAuthentication 1)")
        raise ControlError("no authentication method beowulf can use (tor offers %s)"
                           % (",".join(sorted(methods)) or "none"))
    try:
        with open(path, "rb") as handle:
            cookie = handle.read(64)
    except OSError as err:
        raise ControlError("cannot read the cookie %s: %s" % (path, reason(err)))
    if len(cookie) != 32:
        raise ControlError("the cookie %s is not 32 bytes" % path)
    if "SAFECOOKIE" in methods and prefer != "cookie":
        nonce = os.urandom(32)
        reply = ctl.command("AUTHCHALLENGE SAFECOOKIE " + binascii.hexlify(nonce).decode())
        if not ok(reply):
            raise ControlError("AUTHCHALLENGE refused: " + said(reply))
        pairs = keywords(reply[-1][1])
        try:
            server_hash = binascii.unhexlify(pairs["SERVERHASH"])
            server_nonce = binascii.unhexlify(pairs["SERVERNONCE"])
        except (KeyError, ValueError, TypeError):
            raise ControlError("unexpected AUTHCHALLENGE answer")
        message = cookie + nonce + server_nonce
        if not hmac.compare_digest(hmac.new(SERVER_KEY, message, hashlib.sha256).digest(), server_hash):
            raise ControlError("the control port does not know tor's cookie (not this tor?)")
        answer = hmac.new(CLIENT_KEY, message, hashlib.sha256).hexdigest()
        method = "safecookie"
    else:
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


def open_control(address, prefer):
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
    status["version"] = info["version"]
    try:
        status["auth"] = authenticate(ctl, info, prefer)
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


def control_status(address, prefer, details=True):
    ctl, status = open_control(address, prefer)
    if ctl is None:
        return status
    try:
        status["version"] = getinfo(ctl, "version") or status["version"]
        pid = getinfo(ctl, "process/pid")
        status["pid"] = int(pid) if pid and pid.isdigit() else None
        if details:
            status["disable_network"] = getconf(ctl, "DisableNetwork")
            status["socks_listeners"] = getinfo(ctl, "net/listeners/socks")
            status["config_file"] = getinfo(ctl, "config-file")
            status["user_option"] = getconf(ctl, "User")
    except (OSError, ControlError) as err:
        status["auth_error"] = "after authenticating: " + (reason(err) if isinstance(err, OSError) else str(err))
    finally:
        ctl.close()
    return status


def do_status(p):
    return {"socks": socks_check(p["socks"]), "control": control_status(p["control"], p.get("prefer"))}


def do_newnym(p):
    ctl, status = open_control(p["control"], p.get("prefer"))
    if ctl is None:
        return {"control": status}
    try:
        subscribed = ok(ctl.command("SETEVENTS SIGNAL NOTICE"))
        reply = ctl.command("SIGNAL NEWNYM")
        status["reply"] = said(reply)
        status["newnym"] = ok(reply)
        if ok(reply) and subscribed:
            event = ctl.wait_event(lambda text: "NEWNYM" in text, float(p.get("listen", 1.0)))
            status["event"] = event
    except (OSError, ControlError) as err:
        status["newnym"] = False
        status["reply"] = reason(err) if isinstance(err, OSError) else str(err)
    finally:
        ctl.close()
    return {"control": status}


# -- restart --------------------------------------------------------------------------------------


def read(path, mode="r"):
    try:
        with open(path, mode) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def alive(pid):
    stat = read("/proc/%d/stat" % pid, "rb")
    if stat is None:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def ids(pid):
    """(real uid, real gid) of pid from /proc/PID/status."""
    uid = gid = None
    for line in (read("/proc/%d/status" % pid) or "").splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def managed_by(pid):
    cgroup = read("/proc/%d/cgroup" % pid) or ""
    if "/tor.service" in cgroup or "/tor@" in cgroup:
        return "systemd"
    pidfile = (read("/run/tor/tor.pid") or read("/var/run/tor/tor.pid") or "").strip()
    if pidfile == str(pid):
        return "service"
    return None


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
        "machine_id": machine or None,
        "uid": os.geteuid(),
        "systemd": comm == "systemd" or (comm == "init" and os.path.isdir("/run/systemd/system")),
        "pid1": comm,
        "tor_unit": any(os.path.exists(u) for u in units),
        "initd": os.path.exists("/etc/init.d/tor") and which("service") is not None,
    }
    control = control_status(p["control"], p.get("prefer"))
    facts["control"] = control
    pid = control.get("pid")
    if pid:
        facts["managed"] = managed_by(pid)
        uid, _ = ids(pid)
        facts["tor_uid"] = uid
    return facts


def same_user(uid, gid):
    def drop():
        import pwd
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = os.getgrouplist(name, gid)
        except KeyError:
            groups = [gid]
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    return drop


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
    raw = read("/proc/%d/cmdline" % pid, "rb")
    if not raw:
        return {"error": "tor (pid %d) is gone before the restart" % pid}
    argv = [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]
    try:
        exe = os.readlink("/proc/%d/exe" % pid)
    except OSError as err:
        return {"error": "cannot see tor's program (pid %d): %s" % (pid, reason(err))}
    if exe.endswith(" (deleted)"):
        exe = which(argv[0]) if "/" not in argv[0] else argv[0]
        if not exe:
            return {"error": "tor's program was replaced and %s is not on PATH" % argv[0]}
    if not os.path.basename(exe).startswith("tor"):
        return {"error": "pid %d is %s, not tor" % (pid, exe)}
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
    uid, gid = ids(pid)
    me = os.geteuid()
    preexec = None
    if uid != me:
        if me != 0:
            return {"error": "tor (pid %d) runs as uid %s, not as us (uid %d): restart it as its user, "
                             "or use --method systemd/service" % (pid, uid, me)}
        if not p.get("user_option"):
            preexec = same_user(uid, gid)
    check = subprocess.Popen([exe] + argv[1:] + ["--verify-config"], executable=exe, cwd=cwd, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=preexec, close_fds=True)
    try:
        output = check.communicate(timeout=60)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        check.kill()
        check.wait()
        return {"error": "tor --verify-config took over 60 s; not restarting"}
    if check.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return {"error": "tor's configuration does not verify, tor left running: %s"
                         % (lines[-1][:200] if lines else "exit status %d" % check.returncode)}
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
                             stdout=out, stderr=err, preexec_fn=preexec, close_fds=True,
                             start_new_session=True)
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
        control = control_status(p["control"], p.get("prefer"))
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
        result = {"error": "%s: %s" % (type(err).__name__, err)}
    sys.stdout.write("BEOWULF-TOR " + json.dumps(result) + "\n")
    sys.stdout.flush()
'''

_MARK = "BEOWULF-TOR "


def check_addresses(host) -> None:
    """UsageError when ``socks`` is not host:port or ``tor_control`` is neither a path nor host:port."""
    match = _SOCKS_FORMAT.match(host.socks)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise UsageError(f"{host.name}: socks = {host.socks!r} is not host:port")
    control = host.tor_control[5:] if host.tor_control.startswith("unix:") else host.tor_control
    match = _SOCKS_FORMAT.match(control)
    if not (control.startswith(("/", "~")) or (match and 0 < int(match.group(2)) < 65536)):
        raise UsageError(f"{host.name}: tor_control = {host.tor_control!r} is neither a socket path nor host:port")


def host_script(params: dict) -> bytes:
    """The script for one action, parameters included (nothing goes on the command line)."""
    return (_HOST_SCRIPT + f"\nmain({json.dumps(params)!r})\n").encode("utf-8")


def run_on_host(transport: Transport, action: str, timeout: float = 60, prefer: str = "safecookie",
                **params) -> dict:
    """Run one action of the host script with the host's Python; its JSON answer."""
    host = transport.host
    check_addresses(host)
    params = {"action": action, "socks": host.socks, "control": host.tor_control, "prefer": prefer, **params}
    result = transport.run(f"{host_python(host)} -", stdin=host_script(params), timeout=timeout)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                answer = json.loads(line[len(_MARK):])
            except ValueError:
                break
            if isinstance(answer, dict):
                if answer.get("error") and len(answer) == 1:
                    raise RemoteError(f"{host.name}: {answer['error']}")
                return answer
    raise RemoteError(f"{host.name}: the tor check did not run with {host.python or 'python3'}: "
                      f"{result.error_line()}")


# ---------------------------------------------------------------- what the tasks call


def _hint(text: Optional[str]) -> str:
    """``text``, with what usually fixes a permission error on Debian's control socket or cookie."""
    text = text or "?"
    if "permission denied" in text.lower():
        return f"{text} (is the user in tor's group? debian-tor on Debian)"
    return text


def _control_line(control: dict) -> str:
    if not control.get("ok"):
        return f"no: {_hint(control.get('error'))}"
    return "yes"


def tor_status(transport: Transport, prefer: str = "safecookie") -> dict:
    """SOCKS and control port of one host: what answers, tor's version, and why not."""
    answer = run_on_host(transport, "status", timeout=45, prefer=prefer)
    socks, control = answer["socks"], answer["control"]
    row = {
        "socks_ok": bool(socks.get("ok")),
        "socks": "yes" if socks.get("ok") else f"no: {socks.get('error')}",
        "control_ok": bool(control.get("ok")),
        "control": _control_line(control),
        "auth": control.get("auth") or (f"no: {_hint(control['auth_error'])}" if control.get("auth_error") else "-"),
        "version": control.get("version") or "?",
        "pid": control.get("pid"),
        "disable_network": control.get("disable_network"),
    }
    notes = []
    if not row["socks_ok"] and control.get("disable_network") == "1":
        notes.append("tor has DisableNetwork 1, so it opens no SOCKS port")
    elif not row["socks_ok"] and control.get("auth") and control.get("socks_listeners") is not None:
        listeners = control.get("socks_listeners") or "none"
        notes.append(f"tor's SOCKS listeners: {listeners}")
    row["notes"] = notes
    return row


def new_identity(transport: Transport, prefer: str = "safecookie") -> dict:
    """SIGNAL NEWNYM through the host's control port (cookie authentication on the host); what tor said."""
    host = transport.host
    answer = run_on_host(transport, "newnym", timeout=45, prefer=prefer)
    control = answer["control"]
    if not control.get("ok"):
        raise RemoteError(f"{host.name}: control {host.tor_control} does not answer: {_hint(control.get('error'))}")
    if not control.get("auth"):
        raise RemoteError(f"{host.name}: cannot authenticate to tor: {_hint(control.get('auth_error'))}")
    if not control.get("newnym"):
        raise RemoteError(f"{host.name}: tor refused NEWNYM: {control.get('reply')}")
    event = control.get("event") or ""
    delay = re.search(r"delaying by (\d+) second", event)
    if delay:
        note = f"rate limited: tor applies it in {delay.group(1)} s"
    elif "SIGNAL NEWNYM" in event:
        note = "new identity now"
    else:
        note = "accepted"
    return {"reply": control.get("reply"), "note": note, "auth": control.get("auth"),
            "version": control.get("version") or "?"}


def _choose(facts: dict, method: str, host) -> str:
    control = facts.get("control") or {}
    if method != "auto":
        if method == "process" and not control.get("pid"):
            why = control.get("error") or control.get("auth_error") or "no pid"
            raise RemoteError(f"{host.name}: no tor answers on {host.tor_control} to restart ({why})")
        return method
    if control.get("pid"):
        return facts.get("managed") or "process"
    if facts.get("systemd") and facts.get("tor_unit"):
        return "systemd"
    if facts.get("initd"):
        return "service"
    why = control.get("error") or control.get("auth_error") or "no pid"
    raise RemoteError(f"{host.name}: nothing to restart: tor's control {host.tor_control} does not tell its pid "
                      f"({why}) and the host has neither systemd with tor.service nor /etc/init.d/tor")


def restart_tor(transport: Transport, method: str = "auto", command: Optional[str] = None,
                wait: float = DEFAULT_RESTART_WAIT, prefer: str = "safecookie",
                once: Optional[MachineOnce] = None) -> dict:
    """Restart tor on one host (see the module docstring) and wait until it answers again.

    ``once`` (shared by the host threads of one run) restarts a tor once per machine
    when several inventory entries reach the same one (same machine-id and pid, or
    the same system service); the others only wait for it to answer.
    """
    host = transport.host
    if method not in METHODS:
        raise UsageError(f"--method: expected one of {', '.join(METHODS)}, not {method!r}")
    facts = run_on_host(transport, "inspect", timeout=45, prefer=prefer)
    control = facts.get("control") or {}
    old_pid = control.get("pid")
    chosen = "command" if command else _choose(facts, method, host)
    log.debug("%s: restarting tor by %s (pid %s)", host.name, chosen, old_pid)

    def step() -> str:
        if chosen == "process":
            done = run_on_host(transport, "respawn", timeout=120, prefer=prefer, pid=old_pid,
                               user_option=control.get("user_option") or "")
            if done.get("error"):
                raise RemoteError(f"{host.name}: {done['error']}")
        else:
            what = command or SYSTEM_COMMANDS[chosen]
            done = transport.sudo(what, timeout=180)
            if not done.ok:
                raise RemoteError(f"{host.name}: {what}: {done.error_line()}")
        return host.name

    machine = facts.get("machine_id") or f"host:{host.name}"
    key = (machine, "pid", old_pid) if chosen == "process" else (machine, chosen, command)
    by = (once or MachineOnce()).run(key, step)
    answer = run_on_host(transport, "wait", timeout=wait + 45, prefer=prefer, old_pid=old_pid, seconds=wait)
    after = answer.get("control") or {}
    socks = answer.get("socks") or {}
    report = {"method": chosen if chosen != "command" else f"command: {command}", "before": old_pid,
              "after": after.get("pid"), "socks": "yes" if socks.get("ok") else f"no: {socks.get('error')}"}
    if not answer.get("ok"):
        if not answer.get("restarted"):
            raise RemoteError(f"{host.name}: tor did not come back within {wait:g}s "
                              f"(control: {after.get('error') or after.get('auth_error') or 'same pid'})")
        raise RemoteError(f"{host.name}: tor restarted but SOCKS {host.socks} did not answer within {wait:g}s: "
                          f"{socks.get('error')}")
    if socks.get("ok"):
        report["note"] = "SOCKS answers"
    else:
        report["note"] = "control answers; no SOCKS port: tor has DisableNetwork 1"
    if by != host.name:
        report["note"] += f" (same tor as {by}, restarted once)"
    return report
