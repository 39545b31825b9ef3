"""The URL file of `fab scrape`: one URL a line, checked, normalised, deduplicated.

Blank lines and ``#`` comments are skipped. Normalising lowercases the scheme and
host, drops the default port and the fragment, keeps the query, and makes an empty
path ``/``; two lines that normalise to the same URL are fetched once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from .errors import UsageError
from .inventory import decode_text, line_of

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192


@dataclass(frozen=True)
class BadLine:
    """A line of the URL file that is not an http(s) URL."""

    number: int
    text: str
    reason: str


def normalise(url: str) -> str:
    """The canonical form of an http(s) URL; ValueError (with the reason) when it is not one."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("contains spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("not an http(s) URL" if scheme else "no scheme (expected http:// or https://)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("bad port") from None
    if not host:
        raise ValueError("no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in URLs are not supported")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a normalised URL: the unit of politeness and of robots.txt."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def read_url_file(path: str, skip_bad: bool = False) -> tuple[list[str], list[BadLine], int]:
    """(unique normalised URLs in first-seen order, bad lines, duplicate count) of a URL file or ``-``.

    Bad lines raise UsageError (listing them with line numbers) unless ``skip_bad``.
    """
    label = "stdin" if path == "-" else path
    try:
        if path == "-":
            buffer = getattr(sys.stdin, "buffer", None)
            text = decode_text(buffer.read()) if buffer is not None else sys.stdin.read()
        else:
            text = decode_text(Path(path).read_bytes())
    except FileNotFoundError:
        raise UsageError(f"--urls: {label}: no such file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"--urls: {label}:{line_of(err)}: not UTF-8 text (byte {err.object[err.start]:#04x})") \
            from None
    except OSError as err:
        raise UsageError(f"--urls: {label}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    urls, bad, seen, duplicates = [], [], set(), 0
    for number, line in enumerate(text.split("\n"), start=1):  # numbered as editors number them
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            url = normalise(stripped)
        except ValueError as err:
            bad.append(BadLine(number, stripped[:120], str(err)))
            continue
        if url in seen:
            duplicates += 1
            continue
        seen.add(url)
        urls.append(url)
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad lines; --skip-bad skips them)" if len(bad) > 1 else \
            " (--skip-bad skips such lines)"
        raise UsageError(f"--urls: {label}:{first.number}: {first.reason}: {first.text!r}{more}")
    if not urls:
        raise UsageError(f"--urls: {label}: no URLs in it")
    return urls, bad, duplicates


def describe_bad(bad: list[BadLine], label: Optional[str] = None) -> list[str]:
    """One line per skipped bad line, for --skip-bad's report."""
    prefix = f"{label}:" if label else "line "
    return [f"{prefix}{line.number}: {line.reason}: {line.text!r}" for line in bad]
