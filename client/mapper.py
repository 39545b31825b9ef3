"""The host side of ``fab map``: render GNU parallel-style templates, run items, report each.

The agent's whitelist maps the job name ``map`` to ``run(args)`` here (README.md, "Wire
protocol"). One task carries a block of items of one run and either a command template
or a function spec:

    args = {"run": HEX, "mode": "command" | "function",
            "command": TEMPLATE,            # mode command: run by /bin/sh -c, values quoted
            "function": "MODULE:FUNC",      # mode function: imported from the shipped folder
            "ship": HEX,                    # WORKDIR/ship/HEX, content-addressed (function: required)
            "items": [{"seq": N, "value": STR or INT, "columns": [STR, ...],
                       "file": {"name": BASENAME, "sha256": HEX, "data": BASE64}}, ...],
            # or, for integers (fab map --range): items SEQ .. SEQ+COUNT-1, valued START + i*STEP
            "range": [SEQ, COUNT, START, STEP],
            "timeout": SECONDS or null, "stdout_cap": BYTES, "stderr_tail": BYTES,
            "return": [PATTERN, ...], "return_cap": BYTES}

and the result is ``{"items": [ITEM RESULT, ...], "left": [SEQ, ...], "slot": N}``: ``left``
are the items not run because the result reached RESULT_BUDGET_BYTES (the coordinator sends
them again); ``slot`` is the worker's slot, ``{%}`` (1-based). A function task may ask for
its answer in columns (``"columns": true``, run_function_columns) or in columns compressed
here (``"pack": "zlib"``, run_function_packed). An item result holds ``seq``, ``ok``, ``start`` (epoch), ``seconds``,
``timed_out``, ``error`` (one line or a traceback tail, or null), and for a command:
``exit`` (code or null), ``signal`` (or null), ``stdout`` (text, or base64 when
``stdout_b64``), ``truncated``, ``stderr`` (its tail, base64 when ``stderr_b64``),
``returned`` (one entry per --return pattern: ``path``, ``sha256``, ``size``, ``data``
base64, or ``path`` and ``error``) and ``path`` (the item's input file on the host);
for a function: ``value`` (its JSON-serialisable return value).

Files: the work folder of a run is WORKDIR/map/RUN (the commands' cwd); an item's input
file is written to WORKDIR/map/RUN/in/SHA-PID/NAME (content-addressed, one folder per
worker so two copies of an item never share one) and ``{}`` is that path relative to the
cwd; the folder is removed after the item. Returned files must lie inside the run's
work folder; they are removed once read.

Caps: stdout DEFAULT_STDOUT_CAP (1 MiB, at most MAX_STDOUT_CAP; also the cap on a
function's JSON value), stderr tail DEFAULT_STDERR_TAIL (4 KiB), input and returned files
MAX_FILE_BYTES (16 MiB each), a task's result RESULT_BUDGET_BYTES (40 MiB), a traceback
TRACEBACK_LINES lines / MAX_TRACEBACK_CHARS.

Processes: a command runs as ``/bin/sh -c`` in its own session (stdin /dev/null); a
timeout, or the shell's exit while something it started still holds its pipes, kills
the whole process group; a per-worker ``Reaper`` kills it if the worker itself is killed
(a cancel). A function's timeout is a SIGALRM timer ticking while the task runs (the
function must not use SIGALRM itself).

Standard library only, Python 3.6 syntax: this file is shipped to hosts.
"""
import base64
import binascii
import errno
import hashlib
import importlib
import importlib.machinery
import json
import keyword
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
# The agent's workdir: client/ lives in it (cluster/provision.py installs it so); this
# computer's agent runs the checkout's client/, so fab map names its workdir in the
# environment (beside the store; cluster/mapship.py local_workdir).
WORKDIR = os.environ.get("BEOWULF_MAP_WORKDIR") or os.path.dirname(HERE)
SHIP_FOLDER = "ship"
# fab map --requirements: wheels unpacked in WORKDIR/reqs/HEX (cluster/mapship.py), named in a
# task as "reqs": HEX; put on sys.path for a function, on PYTHONPATH for a command.
REQS_FOLDER = "reqs"
RUN_FOLDER = "map"
# Bytes of stdout kept per item (the rest is read and discarded, ``truncated`` set).
DEFAULT_STDOUT_CAP = 1 << 20
MAX_STDOUT_CAP = 16 << 20
# Bytes of the end of stderr kept per item.
DEFAULT_STDERR_TAIL = 4096
MAX_STDERR_TAIL = 1 << 20
# Largest input file sent in a task and largest returned file (raw bytes; base64 adds 1/3).
MAX_FILE_BYTES = 16 << 20
DEFAULT_RETURN_CAP = MAX_FILE_BYTES
# A task's result stops growing past this (stdout, stderr, returned files, values): the
# coordinator's agent link refuses lines over 64 MB (cluster/agents.py MAX_LINE_BYTES).
RESULT_BUDGET_BYTES = 40 << 20
# Longest per-item timeout accepted (a week).
MAX_TIMEOUT = 7 * 86400.0
# A function's failure: the last lines of its traceback, at most this many characters.
TRACEBACK_LINES = 15
MAX_TRACEBACK_CHARS = 4000
MAX_ERROR_CHARS = 500
# Seconds to wait for pipes held by a killed or escaped process before giving up on them.
DRAIN_GRACE_SECONDS = 1.0
READ_SIZE = 1 << 16
HEX = re.compile(r"^[0-9a-f]{16,64}$")

# ------------------------------------------------------------------------ templates
# GNU parallel's replacement strings (README.md, "fab map"), checked against parallel
# 20221122: {} the item; {.} without its extension; {/} basename; {//} dirname (POSIX
# dirname(1)); {/.} basename without extension; {#} sequence number (1-based); {%} slot
# (1-based); {N} column N (negative: from the end; past the last: nothing), also with the
# modifiers: {N.} {N/} {N//} {N/.}. ``${...}`` belongs to the shell and is never replaced.
# Outside quotes every ``{TEXT}`` without blanks, quotes, ``$`` or backslashes (and ``{ }``)
# is taken for a replacement string, and one that is not known is an error (parallel would
# pass it on as text: a typo such as {1x} would silently run the wrong command), except the
# shell's brace expansions {a,b} and {1..3}; quoted (``'{foo}'``) or escaped (``\\{foo}``)
# braces are the command's. Inside quotes, ``${...}``, comments and here-documents only the
# known forms are looked for (and refused there): ``awk '{print}'`` is the command's.
_CANDIDATE = re.compile(r"\{(=[^\n]*?=|[^\s{}'\"$`\\]*|[ \t]+)\}")
_KNOWN = re.compile(r"^(?:(-?[1-9][0-9]*)?(\.|/|//|/\.)?|#|%)$")
_BRACE_EXPANSION = re.compile(r"^(?:[^,]*,.*|-?[0-9]+\.\.-?[0-9]+(?:\.\.-?[0-9]+)?"
                              r"|[A-Za-z]\.\.[A-Za-z](?:\.\.-?[0-9]+)?)$")
KNOWN_FORMS = "{} {.} {/} {//} {/.} {#} {%} {1} {2.} {-1} ..."
_EXTENSION = re.compile(r"\.[^/.]*$")
_DIRPART = re.compile(r"^.*/")


class TemplateError(ValueError):
    """A template that cannot be rendered safely (one line, for the user)."""


def posix_dirname(path):
    """dirname(1): ``a/b/`` -> ``a``, ``a`` -> ``.``, ``/x`` -> ``/``."""
    stripped = path.rstrip("/")
    if not stripped:
        return "/" if path else "."
    cut = stripped.rfind("/")
    if cut < 0:
        return "."
    return stripped[:cut].rstrip("/") or "/"


def modify(value, modifier):
    """Apply a replacement string's modifier ("", ".", "/", "//", "/.") to ``value``."""
    if modifier == ".":
        return _EXTENSION.sub("", value, count=1)
    if modifier == "/":
        return _DIRPART.sub("", value, count=1)
    if modifier == "//":
        return posix_dirname(value)
    if modifier == "/.":
        return _EXTENSION.sub("", _DIRPART.sub("", value, count=1), count=1)
    return value


def _word_start(text, index):
    return index == 0 or text[index - 1] in " \t\n;&|()<>"


def parse_template(template):
    """Split ``template`` into literal strings and replacement tuples ``(what, column, modifier)``.

    ``what`` is "value", "column", "seq" or "slot". Raises TemplateError for an unknown
    replacement string, or one where quoting cannot protect it: inside quotes, backticks,
    ``${...}``, a comment or a here-document (there the value's own quotes would end the
    context and its text would become code).
    """
    if not isinstance(template, str) or not template.strip():
        raise TemplateError("the command is empty")
    if "\0" in template:
        raise TemplateError("the command holds a NUL byte")
    parts = []
    literal = []
    stack = ["n"]  # n normal, c $( ) or ( ) inside it, s '', q $'', d "", b ``, p ${}, h #/heredoc
    heredoc = False
    index = 0
    size = len(template)
    while index < size:
        char = template[index]
        state = stack[-1]
        pair = template[index:index + 2]
        if char == "{":
            match = _CANDIDATE.match(template, index)
            if match:
                text = match.group(0)
                known = _KNOWN.match(match.group(1))
                if known and state not in ("n", "c"):
                    raise TemplateError("replacement string %s inside %s: values are quoted "
                                        "already, remove the quotes" % (text, _CONTEXT[state]))
                if not known and state in ("n", "c") and not _BRACE_EXPANSION.match(match.group(1)):
                    raise TemplateError("unknown replacement string %s (the known ones: %s); quote it, "
                                        "'%s', to give the command the braces" % (text, KNOWN_FORMS, text))
            if match and known:
                if literal:
                    parts.append("".join(literal))
                    literal = []
                body = match.group(1)
                if body == "#":
                    parts.append(("seq", None, ""))
                elif body == "%":
                    parts.append(("slot", None, ""))
                elif known.group(1):
                    parts.append(("column", int(known.group(1)), known.group(2) or ""))
                else:
                    parts.append(("value", None, known.group(2) or ""))
                index = match.end()
                continue
        step = 1
        if state == "h":
            if char == "\n" and not heredoc:
                stack.pop()
        elif state in ("n", "c"):
            if char == "\\":
                step = 2
            elif char == "'":
                stack.append("s")
            elif char == '"':
                stack.append("d")
            elif char == "`":
                stack.append("b")
            elif pair == "$'":
                stack.append("q")
                step = 2
            elif pair == "${":
                stack.append("p")
                step = 2
            elif pair == "$(":
                stack.append("c")
                step = 2
            elif char == "(" and state == "c":
                stack.append("c")
            elif char == ")" and state == "c":
                stack.pop()
            elif char == "#" and _word_start(template, index):
                stack.append("h")
            elif pair == "<<" and template[index:index + 3] != "<<<":
                heredoc = True
                step = 2
            elif char == "\n" and heredoc:
                stack.append("h")  # the rest of the template is a here-document's body
        elif state == "s":
            if char == "'":
                stack.pop()
        elif state in ("q", "b"):
            if char == "\\":
                step = 2
            elif char == ("'" if state == "q" else "`"):
                stack.pop()
        elif state == "d":
            if char == "\\":
                step = 2
            elif char == '"':
                stack.pop()
            elif pair == "$(":
                stack.append("c")
                step = 2
            elif pair == "${":
                stack.append("p")
                step = 2
            elif char == "`":
                stack.append("b")
        elif state == "p":
            if char == "}":
                stack.pop()
            elif char in "'\"":
                stack.append("s" if char == "'" else "d")
        literal.append(template[index:index + step])
        index += step
    if literal:
        parts.append("".join(literal))
    return parts


_CONTEXT = {"s": "single quotes", "q": "$'...' quotes", "d": "double quotes",
            "b": "backticks", "p": "${...}", "h": "a comment or a here-document"}


def has_replacements(parts):
    """True when the parsed template holds at least one replacement string."""
    return any(isinstance(part, tuple) for part in parts)


def _column(columns, number):
    """Column ``number`` (1-based, negative from the end), None past either end."""
    if number > 0:
        return columns[number - 1] if number <= len(columns) else None
    return columns[number] if -number <= len(columns) else None


def render(parts, value, seq, slot=1, columns=None, quote=True):
    """The command for one item: ``parts`` from parse_template, every value shell-quoted.

    ``value`` is the item as text (its host path for a file); ``columns`` its columns
    (``[value]`` when None). With no replacement string the item (or each column) is
    appended. ``quote=False`` renders a path (``--return``), not a command.
    """
    value = str(value)
    columns = [value] if columns is None else [str(column) for column in columns]
    escape = shlex.quote if quote else str
    out = []
    for part in parts:
        if not isinstance(part, tuple):
            out.append(part)
            continue
        what, number, modifier = part
        if what == "seq":
            out.append(escape(str(seq)))
        elif what == "slot":
            out.append(escape(str(slot)))
        elif what == "column":
            column = _column(columns, number)
            if column is not None:  # a missing column renders as nothing, as in parallel
                out.append(escape(modify(column, modifier)))
        else:
            out.append(escape(modify(value, modifier)))
    if not has_replacements(parts):
        out.extend(" " + escape(column) for column in columns)
    return "".join(out)


# ------------------------------------------------------------------------ checks


class TaskError(ValueError):
    """The task itself is malformed: the whole task fails with this one line."""


def check_hex(value, what):
    """``value`` if it is a lowercase hex digest (16 to 64 digits), else TaskError."""
    if not isinstance(value, str) or not HEX.match(value):
        raise TaskError("%s must be a hex digest, not %r" % (what, str(value)[:80]))
    return value


def check_bytes(args, name, default, highest):
    value = args.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TaskError("%s must be a byte count, not %r" % (name, value))
    return min(value, highest)


def check_timeout(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT:
        raise TaskError("timeout must be a number of seconds in (0, %d], not %r" % (MAX_TIMEOUT, value))
    return float(value)


def check_function_spec(spec):
    """``(module, function)`` from ``MODULE:FUNC`` (``mod.py:f``, ``pkg.sub:f``), else TaskError.

    Only dotted identifiers: no path, no ``..``, no absolute name can get through.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise TaskError("function must be MODULE:FUNC, not %r" % (str(spec)[:80],))
    module, function = spec.split(":")
    if module.endswith(".py"):
        module = module[:-3]
    for name in module.split(".") + [function]:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise TaskError("function must be MODULE:FUNC with Python names, not %r" % (spec[:80],))
    return module, function


def check_basename(name):
    """An input file's name: one path component, no NUL, not . or .., at most 255 bytes."""
    if (not isinstance(name, str) or not name or "/" in name or "\0" in name
            or name in (".", "..") or len(name.encode("utf-8", "surrogateescape")) > 255):
        raise TaskError("bad input file name %r" % (str(name)[:80],))
    return name


def fs(path):
    """A path as bytes (UTF-8, undecodable bytes kept): the same bytes the shell sees."""
    return path.encode("utf-8", "surrogateescape")


def one_line(exc):
    text = " ".join(str(exc).split())
    text = "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def as_text(data):
    """``(text, False)`` when ``data`` is UTF-8, else ``(base64, True)``."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), True


def run_folder(run_id):
    """WORKDIR/map/RUN, created private (0700) if missing."""
    path = os.path.join(WORKDIR, RUN_FOLDER, check_hex(run_id, "run"))
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def ship_folder(ship):
    """WORKDIR/ship/HEX: it must exist and really lie there (no symlink out of ship/)."""
    base = os.path.realpath(os.path.join(WORKDIR, SHIP_FOLDER))
    path = os.path.realpath(os.path.join(base, check_hex(ship, "ship")))
    if os.path.dirname(path) != base or not os.path.isdir(path):
        raise TaskError("no shipped folder %s on this host" % ship)
    return path


def reqs_folder(reqs):
    """WORKDIR/reqs/HEX: it must exist and really lie there (no symlink out of reqs/)."""
    base = os.path.realpath(os.path.join(WORKDIR, REQS_FOLDER))
    path = os.path.realpath(os.path.join(base, check_hex(reqs, "reqs")))
    if os.path.dirname(path) != base or not os.path.isdir(path):
        raise TaskError("no requirements folder %s on this host" % reqs)
    return path


def inside(path, folder):
    """True when the real ``path`` lies inside the real ``folder`` (str or bytes, compared as bytes)."""
    path = path if isinstance(path, bytes) else fs(path)
    folder = os.path.realpath(folder if isinstance(folder, bytes) else fs(folder))
    return os.path.realpath(path).startswith(folder.rstrip(b"/") + b"/")


# ------------------------------------------------------------------------ functions

_FUNCTIONS = {}      # (ship folder, module, function) -> callable: imported once per worker
_ACTIVE = [None]     # the shipped folder now on sys.path and in sys.modules


def _module_folder(module):
    path = getattr(module, "__file__", None) or ""
    return os.path.realpath(path) if path else ""


def _forget(old):
    """Take folder ``old`` off sys.path and forget the modules imported from it."""
    for name, module in list(sys.modules.items()):
        if module is not None and inside(_module_folder(module), old):
            del sys.modules[name]
    while old in sys.path:
        sys.path.remove(old)
    for key in [key for key in _FUNCTIONS if key[0] == old]:
        del _FUNCTIONS[key]


def _activate(folder):
    """Make ``folder`` the one shipped folder on sys.path; forget modules of the previous one."""
    old = _ACTIVE[0]
    if old == folder:
        return
    if old is not None:
        _forget(old)
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    _ACTIVE[0] = folder


_REQS = [None]       # the requirements folder now on sys.path


def use_requirements(reqs):
    """Put WORKDIR/reqs/HEX (or nothing, for None) on sys.path behind the shipped folder; a
    change forgets the modules of the previous one and of the shipped folder (they imported them)."""
    folder = reqs_folder(reqs) if reqs else None
    if _REQS[0] == folder:
        return folder
    for old in (_REQS[0], _ACTIVE[0]):
        if old is not None:
            _forget(old)
    _ACTIVE[0] = None
    if folder is not None:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()
    _REQS[0] = folder
    return folder


def load_function(ship, spec):
    """The function ``MODULE:FUNC`` from the run's shipped folder, imported once per worker.

    The module must be found in the shipped folder, not anywhere else on sys.path: a
    name already imported from elsewhere (``os``, ``json``) or found only elsewhere is
    refused before anything is imported.
    """
    module_name, function_name = check_function_spec(spec)
    folder = ship_folder(ship)
    key = (folder, module_name, function_name)
    function = _FUNCTIONS.get(key)
    if function is not None:
        return function
    _activate(folder)
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None and not inside(_module_folder(loaded), folder):
        raise TaskError("module %s is not one of the shipped files (it names a module "
                        "already loaded here)" % top)
    found = importlib.machinery.PathFinder.find_spec(top, [folder])
    origin = getattr(found, "origin", None) if found else None
    locations = list(getattr(found, "submodule_search_locations", None) or []) if found else []
    if not found or not all(inside(place, folder) for place in ([origin] if origin else []) + locations) \
            or not (origin or locations):
        raise TaskError("no module %s in the shipped files" % top)
    module = importlib.import_module(module_name)
    if not inside(_module_folder(module), folder):
        raise TaskError("module %s is not one of the shipped files" % module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError("module %s has no function %s" % (module_name, function_name))
    _FUNCTIONS[key] = function
    return function


class ItemTimeout(BaseException):
    """Raised inside a function call by SIGALRM (BaseException: ``except Exception`` misses it)."""


# The item now running: [monotonic start, timeout] ([None, None] between items). The timer
# ticks every TICK_FRACTION of the timeout while a task runs (no system call per item);
# an item is stopped at most one tick after its timeout.
_CLOCK = [None, None]
TICK_FRACTION = 0.1
MAX_TICK_SECONDS = 1.0


def _alarm(signum, frame):
    started, limit = _CLOCK
    if started is not None and time.monotonic() - started >= limit:
        _CLOCK[0] = None
        raise ItemTimeout()


def _main_thread():
    """Signals are the main thread's: off it (a task run inside a Dask worker's thread) there is
    no timer, and the process's SIGALRM, which belongs to its host, is never touched."""
    return threading.current_thread() is threading.main_thread()


def arm_timer(timeout):
    """Start the ticking timer for items of ``timeout`` seconds; False where there is no setitimer
    or off the main thread (the Dask engine runs map tasks in a child worker, where it is on)."""
    if timeout is None or not hasattr(signal, "setitimer") or not _main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) is not _alarm:
        signal.signal(signal.SIGALRM, _alarm)
    tick = max(0.005, min(timeout * TICK_FRACTION, MAX_TICK_SECONDS))
    signal.setitimer(signal.ITIMER_REAL, tick, tick)
    return True


def disarm_timer():
    _CLOCK[0] = None
    if hasattr(signal, "setitimer") and _main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


def traceback_tail(exc):
    """The last TRACEBACK_LINES lines of ``exc``'s traceback, at most MAX_TRACEBACK_CHARS."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
    text = "\n".join(lines[-TRACEBACK_LINES:])
    return text if len(text) <= MAX_TRACEBACK_CHARS else "..." + text[-(MAX_TRACEBACK_CHARS - 3):]


def run_function_item(function, item, timeout, cap):
    """Call ``function(value)``: ``(result dict described in the module docstring, its size)``.

    A timeout needs the timer started by ``arm_timer``.
    """
    result = {"seq": item["seq"], "ok": False, "value": None, "error": None, "timed_out": False,
              "start": time.time()}
    size = 200
    started = time.perf_counter()
    try:
        if timeout is not None:
            _CLOCK[1] = timeout
            _CLOCK[0] = time.monotonic()
        try:
            value = function(item.get("value"))
        finally:
            _CLOCK[0] = None
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            result["error"] = "the return value is not JSON-serialisable: %s" % one_line(exc)
        else:
            if len(encoded) > cap:
                result["error"] = "the return value is %d bytes of JSON, over the cap of %d" % (
                    len(encoded), cap)
            else:
                result["ok"] = True
                result["value"] = value
                size += len(encoded)
    except ItemTimeout:
        result["timed_out"] = True
        result["error"] = "timed out after %gs" % timeout
    except BaseException as exc:  # the item's failure, whatever it raised (SystemExit too)
        result["error"] = traceback_tail(exc)
    result["seconds"] = round(time.perf_counter() - started, 6)
    return result, size + len(result["error"] or "")


# JSON types whose values need no check (serialisable, and small unless a long str).
_PLAIN = (int, float, bool, type(None))


def _value_size(value, cap):
    """``(error or None, size)`` of a function's return value: its JSON size (plain scalars
    counted as 24 bytes without encoding them), or why it cannot be sent (not JSON, over ``cap``)."""
    kind = type(value)
    try:
        if kind in _PLAIN:
            if kind is float and value - value != 0:
                raise ValueError("Out of range float values are not JSON compliant")
            size = 24
        elif kind is str:
            size = len(value) + 2
        else:
            size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        return "the return value is not JSON-serialisable: %s" % one_line(exc), 0
    if size > cap:
        return "the return value is %d bytes of JSON, over the cap of %d" % (size, cap), size
    return None, size


def run_function_columns(function, items, timeout, cap, budget):
    """``run_function_item`` for many items at once, answering in columns (``"columns": true``
    in the task): the items that succeeded as ``{"seq": [...], "t0": EPOCH, "start_us": [...],
    "us": [...], "value": [...]}`` (start: microseconds after t0; duration: microseconds), the
    others as item results in ``failed``; the items beyond ``budget`` bytes in ``left``. No
    dict per item, one clock reading per item, integers rather than floats on the wire: the
    hot path of a million tiny calls (README.md, "fab map").
    """
    seqs, starts, seconds, values, failed, left = [], [], [], [], [], []
    used = 0
    clock = time.perf_counter
    wall = time.time() - clock()
    timed = timeout is not None
    if timed:
        _CLOCK[1] = timeout
    began = first = clock()
    for item in items:
        seq = item["seq"]
        if used > budget:
            left.append(seq)
            continue
        error = None
        timed_out = False
        try:
            if timed:
                _CLOCK[0] = time.monotonic()
            try:
                value = function(item.get("value"))
            finally:
                _CLOCK[0] = None
        except ItemTimeout:
            timed_out = True
            error = "timed out after %gs" % timeout
        except BaseException as exc:  # the item's failure, whatever it raised (SystemExit too)
            error = traceback_tail(exc)
        else:
            error, size = _value_size(value, cap)
        ended = clock()
        if error is None:
            seqs.append(seq)
            starts.append(int((began - first) * 1e6))
            seconds.append(int((ended - began) * 1e6))
            values.append(value)
            used += size + 40
        else:
            failed.append({"seq": seq, "ok": False, "value": None, "timed_out": timed_out,
                           "start": wall + began, "seconds": round(ended - began, 6), "error": error})
            used += 200 + len(error)
        began = ended
    return {"columns": {"seq": seqs, "t0": wall + first, "start_us": starts, "us": seconds, "value": values},
            "failed": failed, "left": left}


# A clock in integer nanoseconds (Python 3.7+), or None (3.6: perf_counter's float seconds).
_CLOCK_NS = getattr(time, "perf_counter_ns", None)
# Answer of a task with ``"pack": "zlib"``: the successful items' columns as one zlib stream.
PACK = "zlib"
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _task_items(args):
    """``(seqs, values)`` of a task's items: plain integers for a ``range`` (no dict per item)."""
    if "range" not in args:
        items = _check_items(args.get("items"))
        return [item["seq"] for item in items], [item.get("value") for item in items]
    _range_items(args.get("range"))  # checks it
    seq, count, start, step = args["range"]
    return range(seq, seq + count), (range(start, start + count * step, step) if step else [start] * count)


def run_function_packed(function, seqs, givens, timeout, cap, budget):
    """``run_function_columns`` answering with the columns compressed here (``"pack": "zlib"`` in
    the task), so that the coordinator stores the host's bytes as they are (README.md, "fab map"):

        {"pack": "zlib", "count": N, "chunk": BASE64, "failed": [ITEM RESULT, ...], "left": [SEQ, ...]}

    ``chunk`` is zlib of the compact JSON object ``{"t0": EPOCH, "seq0": FIRST | "seq": [...],
    "us": [...], "start_us": [...], "value": [...]}`` of the N items that succeeded: ``seq0``
    when their seqs are FIRST, FIRST+1, ...; ``start_us`` only when some item failed between
    them (otherwise item i started when item i-1 ended: start_us is the running sum of ``us``,
    from 0). ``givens`` are the items' values, ``seqs`` their seqs. An integer result takes the
    short path (two appends and a clock reading, its size counted as 64 bytes and the budget
    checked at the next other result: a million tiny calls are the case this is for).
    """
    ends, values, failed, left = [], [], [], []
    add_end, add_value = ends.append, values.append
    resumed = {}  # index of an ok item -> its start, for the ok items that follow a failed one
    failed_at = []  # indexes (among all items) of the items that failed
    used = 0
    clock, per_second = _CLOCK_NS or time.perf_counter, 1e9 if _CLOCK_NS else 1.0
    timed = timeout is not None
    if timed:
        _CLOCK[1] = timeout
    began = first = clock()
    t0 = time.time()
    for given in givens:
        error = None
        timed_out = False
        try:
            if timed:
                _CLOCK[0] = time.monotonic()
            try:
                value = function(given)
            finally:
                _CLOCK[0] = None
        except ItemTimeout:
            timed_out = True
            error = "timed out after %gs" % timeout
        except BaseException as exc:  # the item's failure, whatever it raised (SystemExit too)
            error = traceback_tail(exc)
        else:
            if type(value) is int:  # the short path
                began = clock()
                add_end(began)
                add_value(value)
                continue
            error, size = _value_size(value, cap)
        ended = clock()
        done = len(values) + len(failed)
        if error is None:
            add_end(ended)
            add_value(value)
            used += size + 40
        else:
            failed.append({"seq": seqs[done], "ok": False, "value": None, "timed_out": timed_out,
                           "start": t0 + (began - first) / per_second,
                           "seconds": round((ended - began) / per_second, 6), "error": error})
            failed_at.append(done)
            used += 200 + len(error)
            resumed[len(values)] = ended
        began = ended
        if used + 64 * len(values) > budget:
            left = list(seqs[done + 1:])
            break
    if failed_at:
        skip = set(failed_at)
        ok_seqs = [seq for index, seq in enumerate(seqs[:len(values) + len(failed)]) if index not in skip]
    else:
        ok_seqs = seqs[:len(values)]
    if _CLOCK_NS:  # integer nanoseconds: no float per item
        marks = [(mark - first) // 1000 for mark in ends]
    else:
        marks = [int((mark - first) * 1e6) for mark in ends]
    starts = None
    if resumed:  # some ok items did not start when the ok item before them ended
        starts, before = [], first
        for index, mark in enumerate(ends):
            starts.append(int((resumed.get(index, before) - first) * 1e6 / per_second))
            before = mark
        durations = [max(0, b - a) for a, b in zip(starts, marks)]
    else:  # back to back: each item began when the one before it ended
        durations = [b - a for a, b in zip([0] + marks, marks)]
    chunk = {"t0": t0}
    if isinstance(ok_seqs, range) or ok_seqs and ok_seqs[-1] - ok_seqs[0] + 1 == len(ok_seqs) and \
            ok_seqs == list(range(ok_seqs[0], ok_seqs[-1] + 1)):
        chunk["seq0"] = ok_seqs[0] if len(ok_seqs) else (seqs[0] if len(seqs) else 1)
    else:
        chunk["seq"] = list(ok_seqs)
    chunk["us"] = durations
    if starts is not None:
        chunk["start_us"] = starts
    chunk["value"] = values
    data = zlib.compress(_COMPACT(chunk).encode("utf-8"), 1)
    return {"pack": PACK, "count": len(values), "chunk": base64.b64encode(data).decode("ascii"),
            "failed": failed, "left": left}


# ------------------------------------------------------------------------ commands


class Reaper(object):
    """A helper process that kills the running command's process group if this worker dies.

    Commands run in their own session (a timeout kills their whole group without killing
    the worker), so the agent's SIGKILL of a worker (cancel, shutdown) does not reach
    them; the reaper holds the other end of a pipe and kills the group it was last told
    of when that pipe closes. One per worker, started at its first command.
    """

    def __init__(self):
        self.proc = None

    def ready(self):
        """Start the reaper if it is not running: before the command, so that only a pipe write,
        not a fork, lies between the command's start and the reaper knowing its group."""
        if self.proc is None or self.proc.poll() is not None:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable or "python3", os.path.abspath(__file__), "--reaper"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                    start_new_session=True)
            except OSError:
                self.proc = None
        return self.proc is not None

    def tell(self, line):
        for _ in range(2):
            if not self.ready():
                return
            try:
                self.proc.stdin.write(line.encode("ascii") + b"\n")
                self.proc.stdin.flush()
                return
            except OSError:
                self.proc = None


REAPER = Reaper()


def reaper_main():
    """``mapper.py --reaper``: kill the last announced process group when stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = None
    for line in sys.stdin.buffer:
        line = line.strip()
        group = int(line[1:]) if line.startswith(b"+") and line[1:].isdigit() else None
    if group:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def exited(proc):
    """True when ``proc`` has exited, without reaping it where waitid allows (its pid stays ours)."""
    if proc.returncode is not None:
        return True
    waitid = getattr(os, "waitid", None)
    if waitid is not None:
        try:
            return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
        except OSError:
            pass
    return proc.poll() is not None


class Capture(object):
    """Reads a command's stdout (first ``cap`` bytes kept) and stderr (last ``tail`` bytes kept)."""

    def __init__(self, cap, tail):
        self.cap = cap
        self.tail = tail
        self.out = []
        self.out_size = 0
        self.truncated = False
        self.err = bytearray()
        self.err_seen = 0

    def on_stdout(self, data):
        room = self.cap - self.out_size
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if data:
            self.out.append(data)
            self.out_size += len(data)

    def on_stderr(self, data):
        self.err_seen += len(data)
        self.err += data
        if len(self.err) > 2 * self.tail + READ_SIZE:
            del self.err[:len(self.err) - self.tail]

    def stderr_tail(self):
        data = bytes(self.err[len(self.err) - self.tail:]) if self.tail else b""
        if self.err_seen > len(data):
            cut = 0
            while cut < min(3, len(data)) and 0x80 <= data[cut] < 0xC0:
                cut += 1  # a UTF-8 character cut in half at the start of the tail
            data = data[cut:]
        return data


def _poller(fds):
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        return poller
    return None


def run_command(command, cwd, env, timeout, capture):
    """Run ``/bin/sh -c command``; returns ``(returncode, timed_out)`` with output in ``capture``."""
    REAPER.ready()
    proc = subprocess.Popen([b"/bin/sh", b"-c", fs(command)], cwd=fs(cwd), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    REAPER.tell("+%d" % proc.pid)
    timed_out = False
    killed_at = None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    handlers = {out_fd: capture.on_stdout, err_fd: capture.on_stderr}
    poller = _poller(handlers)
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    next_check = started + 0.1
    try:
        while handlers:
            now = time.monotonic()
            if killed_at is not None and now - killed_at > DRAIN_GRACE_SECONDS:
                break  # a process outside the group still holds a pipe: stop reading it
            if deadline is not None and now >= deadline and killed_at is None:
                timed_out = True
                kill_group(proc.pid)
                killed_at = now
            if now >= next_check and killed_at is None:
                next_check = now + 0.1
                if exited(proc):  # the shell is gone but something it left holds a pipe
                    kill_group(proc.pid)
                    killed_at = now
            wait = next_check - now
            if deadline is not None and killed_at is None:
                wait = min(wait, deadline - now)
            wait = max(wait, 0.001)
            if poller is not None:
                ready = [fd for fd, _ in poller.poll(wait * 1000)]
            else:
                ready = select.select(list(handlers), [], [], wait)[0]
            for fd in ready:
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError:
                    data = b""
                if data:
                    handlers[fd](data)
                else:
                    del handlers[fd]
                    if poller is not None:
                        poller.unregister(fd)
        # Both pipes closed: wait for the shell (its timeout still counts), then kill what it
        # left behind in its group while its pid is still ours (not yet reaped).
        pause = 0.0001
        while not exited(proc):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            time.sleep(min(pause, deadline - now) if deadline is not None else pause)
            pause = min(pause * 2, 0.05)
    finally:
        kill_group(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
        REAPER.tell("-")
    return proc.returncode, timed_out


def write_input(folder, item):
    """Write an item's shipped file into its content-addressed folder; its path relative to ``folder``."""
    spec = item.get("file")
    if not isinstance(spec, dict):
        raise TaskError("item %s: file must be an object" % item.get("seq"))
    name = check_basename(spec.get("name"))
    digest = check_hex(spec.get("sha256"), "file sha256")
    data = spec.get("data")
    if not isinstance(data, str) or len(data) > (MAX_FILE_BYTES + 2) // 3 * 4 + 4:
        raise TaskError("item %s: file data missing or over %d bytes" % (item.get("seq"), MAX_FILE_BYTES))
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise TaskError("item %s: file data is not base64" % item.get("seq")) from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise TaskError("item %s: file content does not match its sha256" % item.get("seq"))
    relative = os.path.join("in", "%s-%d" % (digest[:24], os.getpid()))
    holder = os.path.join(folder, relative)
    shutil.rmtree(fs(holder), ignore_errors=True)
    os.makedirs(fs(holder), mode=0o700)
    fd = os.open(fs(os.path.join(holder, name)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    return os.path.join(relative, name)


def fetch_return(folder, path, cap):
    """Read a returned file (inside the run folder, regular, at most ``cap`` bytes), then remove it."""
    entry = {"path": path}
    full = os.path.join(folder, path)
    try:
        if not inside(fs(full), fs(folder)):
            entry["error"] = "outside the run's work folder"
            return entry
        fd = os.open(fs(full), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not (info.st_mode & 0o170000 == 0o100000):
                entry["error"] = "not a regular file"
                return entry
            if info.st_size > cap:
                entry["error"] = "%d bytes, over the cap of %d" % (info.st_size, cap)
                return entry
            data = handle.read(cap + 1)
        if len(data) > cap:
            entry["error"] = "over the cap of %d bytes" % cap
            return entry
        os.remove(fs(full))
    except OSError as exc:
        entry["error"] = "no such file" if exc.errno == errno.ENOENT else one_line(exc)
        return entry
    entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                 data=base64.b64encode(data).decode("ascii"))
    return entry


def run_command_item(parts, returns, item, folder, settings):
    """Run one item's command; the result dict described in the module docstring."""
    seq = item["seq"]
    slot = settings["slot"]
    result = {"seq": seq, "ok": False, "exit": None, "signal": None, "timed_out": False,
              "stdout": "", "stdout_b64": False, "truncated": False, "stderr": "",
              "stderr_b64": False, "error": None, "returned": [], "start": time.time()}
    started = time.perf_counter()
    holder = None
    try:
        value = item.get("value")
        if "file" in item:
            value = write_input(folder, item)
            holder = os.path.dirname(os.path.join(folder, value))
            result["path"] = value
        columns = item.get("columns")
        command = render(parts, value, seq, slot, columns if "file" not in item else None)
        env = dict(settings["env"], PARALLEL_SEQ=str(seq))
        capture = Capture(settings["stdout_cap"], settings["stderr_tail"])
        try:
            code, timed_out = run_command(command, folder, env, settings["timeout"], capture)
        except OSError as exc:
            result["error"] = "cannot start /bin/sh: %s" % one_line(exc)
            return result
        result["stdout"], result["stdout_b64"] = as_text(b"".join(capture.out))
        result["truncated"] = capture.truncated
        result["stderr"], result["stderr_b64"] = as_text(capture.stderr_tail())
        result["timed_out"] = timed_out
        if code < 0:
            result["signal"] = -code
        else:
            result["exit"] = code
        if timed_out:
            result["error"] = "timed out after %gs" % settings["timeout"]
        for pattern in returns:
            path = render(pattern, value, seq, slot, columns if "file" not in item else None,
                          quote=False)
            entry = fetch_return(folder, path, settings["return_cap"])
            result["returned"].append(entry)
            if "error" in entry and result["error"] is None:
                result["error"] = "return %s: %s" % (path, entry["error"])
        result["ok"] = code == 0 and not timed_out and result["error"] is None
        return result
    finally:
        if holder is not None:
            shutil.rmtree(fs(holder), ignore_errors=True)
        result["seconds"] = round(time.perf_counter() - started, 6)


def _size(result):
    total = len(result.get("stdout") or "") + len(result.get("stderr") or "")
    total += len(result.get("error") or "")
    for entry in result.get("returned") or ():
        total += len(entry.get("data") or "")
    return total + 200


def _check_items(items):
    if not isinstance(items, list):
        raise TaskError("items must be a list")
    for item in items:
        if not isinstance(item, dict) or isinstance(item.get("seq"), bool) \
                or not isinstance(item.get("seq"), int):
            raise TaskError("each item must be an object with an integer seq")
        if not isinstance(item.get("value"), (str, int)) or isinstance(item.get("value"), bool):
            raise TaskError("item %d: value must be a string or an integer" % item["seq"])
        columns = item.get("columns")
        if columns is not None and not (isinstance(columns, list)
                                        and all(isinstance(column, str) for column in columns)):
            raise TaskError("item %d: columns must be a list of strings" % item["seq"])
    return items


# Items of one ``range`` task at most.
MAX_RANGE_ITEMS = 10 ** 6


def _range_items(spec):
    """The items of a task's ``range`` [SEQ, COUNT, START, STEP], made one at a time."""
    if not isinstance(spec, list) or len(spec) != 4 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in spec):
        raise TaskError("range must be [SEQ, COUNT, START, STEP] integers")
    seq, count, start, step = spec
    if seq < 1 or not 0 <= count <= MAX_RANGE_ITEMS:
        raise TaskError("range holds %r items from %r" % (count, seq))
    return ({"seq": seq + i, "value": start + i * step} for i in range(count))


def worker_slot():
    """This worker's slot, ``{%}`` (1-based; the agent numbers its workers from 0)."""
    try:
        return int(os.environ.get("BEOWULF_WORKER_SLOT", "0") or 0) + 1
    except ValueError:
        return 1


def run(args):
    """The ``map`` job: run a block of items; see the module docstring for args and result."""
    mode = args.get("mode")
    if "range" in args:
        items = _range_items(args.get("range"))
    else:
        items = _check_items(args.get("items"))
    timeout = check_timeout(args.get("timeout"))
    stdout_cap = check_bytes(args, "stdout_cap", DEFAULT_STDOUT_CAP, MAX_STDOUT_CAP)
    results = []
    left = []
    used = 0
    reqs = use_requirements(args.get("reqs")) if mode in ("function", "command") else None
    if mode == "function":
        function = load_function(args.get("ship"), args.get("function"))
        run_folder(args.get("run"))
        arm_timer(timeout)
        try:
            if args.get("pack") == PACK:
                seqs, givens = _task_items(args)
                result = run_function_packed(function, seqs, givens, timeout, stdout_cap, RESULT_BUDGET_BYTES)
                result["slot"] = worker_slot()
                return result
            if args.get("columns") is True:
                result = run_function_columns(function, items, timeout, stdout_cap, RESULT_BUDGET_BYTES)
                result["slot"] = worker_slot()
                return result
            for item in items:
                if used > RESULT_BUDGET_BYTES:
                    left.append(item["seq"])
                    continue
                result, size = run_function_item(function, item, timeout, stdout_cap)
                used += size
                results.append(result)
        finally:
            disarm_timer()
        return {"items": results, "left": left, "slot": worker_slot()}
    if mode != "command":
        raise TaskError("mode must be command or function, not %r" % (mode,))
    try:
        parts = parse_template(args.get("command"))
        returns = args.get("return") or []
        if not isinstance(returns, list) or not all(isinstance(pattern, str) for pattern in returns):
            raise TaskError("return must be a list of patterns")
        returns = [parse_template(pattern) for pattern in returns]
    except TemplateError as exc:
        raise TaskError(str(exc)) from None
    folder = run_folder(args.get("run"))
    slot = worker_slot()
    env = dict(os.environ, PARALLEL_JOBSLOT=str(slot))
    if args.get("ship"):
        env["BEOWULF_SHIP"] = ship_folder(args.get("ship"))
    if reqs:
        env["PYTHONPATH"] = os.pathsep.join([reqs] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    settings = {"slot": slot, "env": env, "timeout": timeout, "stdout_cap": stdout_cap,
                "stderr_tail": check_bytes(args, "stderr_tail", DEFAULT_STDERR_TAIL, MAX_STDERR_TAIL),
                "return_cap": check_bytes(args, "return_cap", DEFAULT_RETURN_CAP, MAX_FILE_BYTES)}
    for item in items:
        if used > RESULT_BUDGET_BYTES:
            left.append(item["seq"])
            continue
        result = run_command_item(parts, returns, item, folder, settings)
        used += _size(result)
        results.append(result)
    return {"items": results, "left": left, "slot": slot}


if __name__ == "__main__" and sys.argv[1:] == ["--reaper"]:
    reaper_main()
