"""What a host or a web server said, made safe to show on a terminal (SECURITY.md, "Terminal escapes").

The store keeps what was received; everything is escaped when it is shown: tables,
progress, every log line (stderr and beowulf.log, through ``EscapingFormatter``), CSV
and JSON exports, plot labels. Escaped: C0 controls (ESC, BEL, CR, ...), DEL, C1
controls (``\\x9b`` is a one-byte CSI on some terminals), Unicode bidi overrides and
isolates, the Unicode line and paragraph separators and lone surrogates. They become
Python-style escapes: ``\\x1b``, ``\\x9b``, ``\\u202e``, ``\\n``. A backslash is left as
it is, so escaping twice changes nothing (a table cell later logged stays readable);
a host can make ``\\x1b`` appear as those four characters, never as the byte.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable, List

# C0 and DEL, C1, ALM, LRM/RLM, line/paragraph separators, LRE..RLO, LRI..PDI, surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
# The same but keeping newlines and tabs (multi-line text such as a traceback in a log).
_UNSAFE_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                                "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: Any, keep_lines: bool = False) -> str:
    """``text`` (any value; None is "") as one line that is safe on a terminal.

    ``keep_lines``: leave ``\\n`` and ``\\t`` as they are (text shown on several lines).
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    return (_UNSAFE_KEEP_LINES if keep_lines else _UNSAFE).sub(_escape, text)


def shown_cell(value: Any) -> Any:
    """A table cell: strings escaped, numbers and None left for tabulate to format."""
    return shown(value) if isinstance(value, str) else value


def shown_rows(rows: Iterable[Iterable[Any]]) -> List[list]:
    """Every string cell of a table escaped (see shown_cell)."""
    return [[shown_cell(value) for value in row] for row in rows]


def _json_escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_text(value: Any, **kwargs) -> str:
    """``json.dumps`` whose text is safe to ``cat``: it decodes to exactly ``value``.

    json.dumps always escapes C0 controls inside strings; DEL, C1, bidi controls, line
    separators and lone surrogates are escaped here as ``\\uXXXX`` too (they can only be
    inside strings: JSON's own syntax is ASCII). Other non-ASCII text stays readable UTF-8.
    """
    kwargs.setdefault("ensure_ascii", False)
    return _UNSAFE.sub(_json_escape, json.dumps(value, **kwargs))


class EscapingFormatter(logging.Formatter):
    """A logging Formatter whose every line is safe on a terminal, whatever module logged it.

    The message itself is escaped to one line (a host's text cannot start a line that
    looks like another record); a traceback keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = shown(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record), keep_lines=True)
