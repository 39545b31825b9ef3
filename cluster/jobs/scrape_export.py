"""The scrape job's export: a run's pages as JSON lines, optionally with each body once.

``fab scrape --export`` calls ``export_pages``: FILE.jsonl (one record a line) or a folder
(index.jsonl plus bodies/, each body once, named by its sha256). What is written is safe
to cat (cluster/shown.py json_text); a body is inflated a piece at a time and checked.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Callable

from cluster.errors import UsageError
from cluster.jobs.scrape import iter_pages
from cluster.shown import json_text

# Bytes a body may inflate to when the run's --max-bytes is not known (the flag's maximum),
# and bytes inflated at a time.
EXPORT_MAX_BYTES = 32_000_000
EXPORT_CHUNK = 1 << 20


def export_pages(store, run_id: int, target: Path, warn: Callable[[str], None]) -> tuple[int, int]:
    """FILE.jsonl: one record a line; a folder: index.jsonl plus each body once, named by its sha256.

    A body is inflated a piece at a time, to at most the run's --max-bytes, and must be the
    body its record names (sha256): a damaged one is left out of bodies/, its record says
    why (``body_error``) and ``warn`` gets one line a body. Returns (records, damaged bodies).
    """
    as_folder = not target.name.endswith(".jsonl")
    index = target / "index.jsonl" if as_folder else target
    if as_folder:
        (target / "bodies").mkdir(parents=True, exist_ok=True)
    elif not target.parent.exists():
        raise UsageError(f"--export: folder {target.parent} does not exist")
    temp = index.with_name(f".{index.name}.part")
    count, damaged = 0, 0
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            run = store.run(run_id) or {}
            options = (run.get("params") or {}).get("options") or {}
            limit = options.get("max_bytes")
            if not isinstance(limit, int) or not 0 < limit <= EXPORT_MAX_BYTES:
                limit = EXPORT_MAX_BYTES
            for record, payload in iter_pages(store, run_id):
                record["tor"], record["truncated"] = bool(record["tor"]), bool(record["truncated"])
                sha256 = record["sha256"]
                if as_folder and payload is not None and isinstance(sha256, str) and len(sha256) == 64 \
                        and all(ch in "0123456789abcdef" for ch in sha256):
                    problem = export_body(payload, target / "bodies" / sha256, sha256, limit)
                    if problem:
                        damaged += 1
                        record["body_error"] = problem
                        warn(f"URL {record['index']}: body not exported: {problem}")
                    else:
                        record["body"] = f"bodies/{sha256}"
                handle.write(json_text(record) + "\n")  # safe to cat (cluster/shown.py)
                count += 1
        os.replace(temp, index)
    finally:
        if temp.exists():
            temp.unlink()
    return count, damaged


def export_body(payload: bytes, path: Path, sha256: str, limit: int) -> str:
    """Inflate ``payload`` into ``path`` (unless it is there) a piece at a time; "" or what is wrong."""
    if path.exists():
        return ""
    temp = path.with_name(f".{path.name}.part")
    stream, digest, size = zlib.decompressobj(), hashlib.sha256(), 0
    problem = ""
    try:
        with open(temp, "wb") as out:
            data = payload
            while True:
                piece = stream.decompress(data, EXPORT_CHUNK)
                size += len(piece)
                if size > limit:
                    problem = f"inflates to more than {limit} bytes"
                    break
                digest.update(piece)
                out.write(piece)
                data = stream.unconsumed_tail
                if not data:
                    break
        if not problem and not stream.eof:
            problem = "the compressed body is cut off"
        elif not problem and digest.hexdigest() != sha256:
            problem = "the body does not match its sha256"
        if not problem:
            os.replace(temp, path)
    except zlib.error as err:
        problem = f"the compressed body is damaged ({err})"
    finally:
        if temp.exists():
            temp.unlink()
    return problem
