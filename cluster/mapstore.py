"""``fab map``'s own tables in the store, and what is read back from them.

- ``map_items``: one row per item of a run, its final attempt (ok, failed, timeout,
  crashed): exit, signal, stdout (BLOB, capped, ``truncated``), the tail of stderr, the
  function's value (JSON), host, start, seconds, attempt number. ``UNIQUE (run_id, key)``:
  an item is final once, committed in the same transaction as its block (MapJob.rows).
- ``map_attempts``: every earlier attempt (a failure that was retried, a worker killed);
  with map_items, the joblog (``--joblog``: every attempt).
- ``map_chunks``: a block of a function over --range whose items all succeeded at their
  first try, one row (first seq, count, host, slot); its items' columns are the block's
  payload: the zlib bytes the host sent (client/mapper.py run_function_packed, checked by
  cluster/jobs/map.py ``_unpack``), or encode_chunk's for older hosts.

Version 3 of the tables (MIGRATIONS[2]) adds ``slot`` (``{%}``, the worker slot an item ran
in; NULL in rows from before) to all three; ``ensure_tables`` and Store.migrate_job bring
an older store up to it.

The rows are written by the engine (the job's ``rows`` and ``Decision.record``); this
module creates the tables (the job's migration) and reads them with its own SQLite
connection (read-only, except ``reset_failed`` for --retry-failed, which runs on a finished
run, before it is resumed, or under this process's lock on the run).
"""

from __future__ import annotations

import heapq
import itertools
import json
import sqlite3
import zlib
from typing import Iterator, Optional

from .errors import StoreError
from .mapexport import Chunk, ItemRecord

ITEM_COLUMNS = ("key", "seq", "item", "status", "exit", "signal", "stdout", "truncated", "stderr", "host",
                "start", "seconds", "attempt", "value", "error", "send", "receive", "slot")
ATTEMPT_COLUMNS = ("key", "seq", "item", "status", "exit", "signal", "stderr", "host", "start", "seconds",
                   "attempt", "error", "send", "receive", "slot")

MIGRATIONS = (
    (
        """CREATE TABLE IF NOT EXISTS map_items (
            run_id    INTEGER NOT NULL,
            lo        INTEGER NOT NULL,          -- the block (number) it was committed with
            key               NOT NULL,          -- content key (cluster/mapinput.py); --range: the value
            seq       INTEGER NOT NULL,          -- {#}: input order
            item      BLOB,                      -- the value's bytes (NULL for --range: from seq)
            status    TEXT    NOT NULL,          -- ok, failed, timeout, crashed
            exit      INTEGER,
            signal    INTEGER,
            stdout    BLOB,
            truncated INTEGER NOT NULL DEFAULT 0,
            stderr    BLOB,                      -- its tail
            host      TEXT    NOT NULL,
            start     REAL,                      -- epoch seconds
            seconds   REAL,
            attempt   INTEGER NOT NULL,
            value     TEXT,                      -- a function's return value, JSON
            error     TEXT,
            send      INTEGER NOT NULL DEFAULT 0,
            receive   INTEGER NOT NULL DEFAULT 0,
            UNIQUE (run_id, key)
        )""",
        """CREATE TABLE IF NOT EXISTS map_attempts (
            run_id  INTEGER NOT NULL,
            lo      INTEGER NOT NULL,
            key             NOT NULL,
            seq     INTEGER NOT NULL,
            item    BLOB,
            status  TEXT    NOT NULL,            -- failed, timeout, crashed (its worker died)
            exit    INTEGER,
            signal  INTEGER,
            stderr  BLOB,
            host    TEXT    NOT NULL,
            start   REAL,
            seconds REAL,
            attempt INTEGER NOT NULL,
            error   TEXT,
            send    INTEGER NOT NULL DEFAULT 0,
            receive INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS map_attempts_key ON map_attempts (run_id, key)",
        # A block of a function over --range whose items all succeeded at their first try:
        # one row; the items' start, seconds and values are the block's payload (payloads
        # table, zlib JSON: CHUNK_FIELDS), committed with the block like any payload.
        """CREATE TABLE IF NOT EXISTS map_chunks (
            run_id INTEGER NOT NULL,
            lo     INTEGER NOT NULL,
            seq    INTEGER NOT NULL,            -- the first item's seq
            count  INTEGER NOT NULL,            -- items seq .. seq + count - 1
            host   TEXT    NOT NULL,
            PRIMARY KEY (run_id, lo)
        )""",
    ),
    (
        # The failed items by host (MapJob.item_counts: fab stats, the summary, the dashboard
        # once a second) without reading a million ok rows: 0.2 ms instead of 135 ms.
        "CREATE INDEX IF NOT EXISTS map_items_failed ON map_items (run_id, host) WHERE status <> 'ok'",
    ),
    # Version 3: the worker slot ({%}) an item ran in (NULL: not known, a row from before or a
    # crash); a chunk's payload may be the host's own bytes (client/mapper.py run_function_packed).
    (
        "ALTER TABLE map_items ADD COLUMN slot INTEGER",
        "ALTER TABLE map_attempts ADD COLUMN slot INTEGER",
        "ALTER TABLE map_chunks ADD COLUMN slot INTEGER",
    ),
)
CHUNK_COLUMNS = ("seq", "count", "host", "slot")


def connect(path: str, readonly: bool = True) -> sqlite3.Connection:
    """A connection of its own to the store (WAL: readers never block the writer)."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open ({exc})") from None


def ensure_tables(path: str) -> None:
    """Create or update the map tables to the last version, as Store.migrate_job does (the same
    steps, the version recorded in the store's job_schema; the store exists already)."""
    conn = connect(path, readonly=False)
    try:
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            got = conn.execute("SELECT version FROM job_schema WHERE job = 'map'").fetchone()
            version = got[0] if got else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"{path}: the map tables are from a newer beowulf (version {version},"
                                 f" this one knows {len(MIGRATIONS)})")
            for step in MIGRATIONS[version:]:
                for statement in step:
                    try:
                        conn.execute(statement)
                    except sqlite3.OperationalError as exc:
                        # A column already there (a store whose version was not recorded, or
                        # made by a development build that numbered the slot step 2): the step
                        # is done.
                        if not (statement.startswith("ALTER TABLE") and "duplicate column" in str(exc)):
                            raise
            if version < len(MIGRATIONS):
                conn.execute("INSERT INTO job_schema (job, version) VALUES ('map', ?) ON CONFLICT (job)"
                             " DO UPDATE SET version = excluded.version", (len(MIGRATIONS),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot create the map tables ({exc})") from None
    finally:
        conn.close()


def reset_failed(path: str, run_id: int) -> int:
    """--retry-failed: every final item that did not succeed becomes an earlier attempt again
    (moved to map_attempts, so the joblog keeps it and attempt numbers go on, and no longer
    counted in its block's items); how many."""
    conn = connect(path, readonly=False)
    columns = ", ".join(("run_id", "lo") + ATTEMPT_COLUMNS)
    try:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            # The items are counted again where they end: their blocks no longer count them
            # (the run's items and the hosts' throughputs stay within the run's items).
            conn.execute("UPDATE blocks SET items = max(0, items - (SELECT count(*) FROM map_items i"
                         " WHERE i.run_id = blocks.run_id AND i.lo = blocks.lo AND i.status <> 'ok'))"
                         " WHERE run_id = ? AND lo IN (SELECT lo FROM map_items WHERE run_id = ? AND status <> 'ok')",
                         (run_id, run_id))
            conn.execute(f"INSERT INTO map_attempts ({columns}) SELECT {columns} FROM map_items"
                         " WHERE run_id = ? AND status <> 'ok'", (run_id,))
            return conn.execute("DELETE FROM map_items WHERE run_id = ? AND status <> 'ok'", (run_id,)).rowcount
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot reset the failed items ({exc})") from None
    finally:
        conn.close()


def done_seq_ranges(conn: sqlite3.Connection, run_id: int) -> list:
    """The seqs of finished items as sorted, merged [lo, hi] ranges (streamed, a range at a time)."""
    ranges: list = []
    rows = conn.execute("SELECT seq, seq FROM map_items WHERE run_id = ? UNION ALL"
                        " SELECT seq, seq + count - 1 FROM map_chunks WHERE run_id = ? ORDER BY 1",
                        (run_id, run_id))
    for lo, hi in rows:
        if ranges and lo <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    return ranges


def key_prefix(key: str) -> int:
    """A 64-bit int of a hex key (the done set holds these, not the 64-character strings)."""
    return int(key[:16], 16) if len(key) >= 16 else hash(key)


def done_key_prefixes(conn: sqlite3.Connection, run_id: int) -> set:
    return {key_prefix(key) for (key,) in conn.execute("SELECT key FROM map_items WHERE run_id = ?", (run_id,))}


def done_count(conn: sqlite3.Connection, run_id: int) -> int:
    items = conn.execute("SELECT count(*) FROM map_items WHERE run_id = ?", (run_id,)).fetchone()[0]
    return items + (conn.execute("SELECT coalesce(sum(count), 0) FROM map_chunks WHERE run_id = ?",
                                 (run_id,)).fetchone()[0])


def prior_attempts(conn: sqlite3.Connection, run_id: int) -> dict:
    """key -> (highest attempt number, failures, crashes) of items with attempts but no final row."""
    rows = conn.execute(
        "SELECT a.key, max(a.attempt), sum(a.status IN ('failed', 'timeout')), sum(a.status = 'crashed')"
        " FROM map_attempts a WHERE a.run_id = ? AND NOT EXISTS"
        " (SELECT 1 FROM map_items i WHERE i.run_id = a.run_id AND i.key = a.key) GROUP BY a.key",
        (run_id,))
    return {key: (int(top), int(failures or 0), int(crashes or 0)) for key, top, failures, crashes in rows}


def max_block(conn: sqlite3.Connection, run_id: int) -> int:
    """The highest block number used by the run's items or attempts (0 for none)."""
    top = 0
    for table in ("map_items", "map_attempts", "map_chunks"):
        value = conn.execute(f"SELECT max(lo) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]
        top = max(top, value or 0)
    return top


def counts(conn: sqlite3.Connection, run_id: int) -> dict:
    """status -> items of a run."""
    found = dict(conn.execute("SELECT status, count(*) FROM map_items WHERE run_id = ? GROUP BY status",
                              (run_id,)).fetchall())
    chunked = conn.execute("SELECT coalesce(sum(count), 0) FROM map_chunks WHERE run_id = ?", (run_id,)).fetchone()[0]
    if chunked:
        found["ok"] = found.get("ok", 0) + chunked
    return found


def worker_deaths(conn: sqlite3.Connection, run_id: int, limit: int) -> list:
    """``(seq, deaths, final status or None)`` of the first ``limit`` items that killed their worker
    (each death recorded once the item was alone in its block) and were not failed as crashed
    for it (those are among the failed items), in input order."""
    return conn.execute(
        "SELECT d.seq, d.deaths, i.status FROM (SELECT seq, key, count(*) AS deaths FROM"
        " (SELECT seq, key FROM map_attempts WHERE run_id = ? AND status = 'crashed' UNION ALL"
        "  SELECT seq, key FROM map_items WHERE run_id = ? AND status = 'crashed') GROUP BY key) d"
        " LEFT JOIN map_items i ON i.run_id = ? AND i.key = d.key"
        " WHERE i.status IS NULL OR i.status <> 'crashed' ORDER BY d.seq LIMIT ?",
        (run_id, run_id, run_id, limit)).fetchall()


def _item_value(raw, seq: int, range_input) -> object:
    if raw is None:
        return range_input.start + (seq - 1) * range_input.step if range_input is not None else ""
    return bytes(raw).decode("utf-8", "surrogateescape")


_SELECT_ITEMS = ("SELECT seq, item, status, host, start, seconds, exit, signal, stdout, stderr, attempt,"
                 " truncated, error, value, send, receive, slot FROM map_items")


def _record(row, range_input) -> ItemRecord:
    (seq, item, status, host, start, seconds, exitval, signal, stdout, stderr, attempt, truncated,
     error, value, send, receive, slot) = row
    if value is not None and not stdout:  # a function's value is its output (JSON, a line)
        stdout = value.encode("utf-8", "surrogateescape") + b"\n"
    return ItemRecord(seq, _item_value(item, seq, range_input), status, host=host, start=start or 0.0,
                      runtime=seconds or 0.0, exitval=exitval, signal=signal, stdout=bytes(stdout or b""),
                      stderr=bytes(stderr or b""), attempt=attempt, truncated=bool(truncated),
                      error=error or "", value=value, send=send or 0, receive=receive or 0, slot=slot)


def failed_items(conn: sqlite3.Connection, run_id: int, limit: int, range_input=None) -> list:
    """The first ``limit`` items (input order) whose final status is not ok."""
    rows = conn.execute(_SELECT_ITEMS + " WHERE run_id = ? AND status <> 'ok' ORDER BY seq LIMIT ?",
                        (run_id, limit)).fetchall()
    return [_record(row, range_input) for row in rows]


def records_in_order(conn: sqlite3.Connection, run_id: int, map_input, chunks: bool = False) -> Iterator:
    """Each finished item's record in input order (--export), streamed.

    --range: by seq; with ``chunks``, the items of a chunk come as one mapexport.Chunk (the
    exports write it whole, with no record per item). --args/--files: the input is read again
    and each item looked up by its key, so items whose line moved (lines added before them)
    still come in order.
    """
    from .mapinput import RangeInput

    if isinstance(map_input, RangeInput):
        cursor = conn.execute(_SELECT_ITEMS + " WHERE run_id = ? ORDER BY seq", (run_id,))
        items = (_record(row, map_input) for row in cursor)
        yield from heapq.merge(items, chunk_records(path_of(conn), run_id, map_input, whole=chunks), key=_by_seq)
        return
    # The rows in the order they were run: an item still at the seq it ran with is matched with
    # the cursor; one that moved (lines added before it) is looked up by its key.
    cursor = conn.execute(_SELECT_ITEMS.replace(" FROM", ", key FROM") + " WHERE run_id = ? ORDER BY seq", (run_id,))
    ahead = next(cursor, None)
    for item in map_input:
        while ahead is not None and ahead[0] < item.seq:
            ahead = next(cursor, None)
        if ahead is not None and ahead[0] == item.seq and ahead[-1] == item.key:
            row, ahead = ahead[:-1], next(cursor, None)
        else:
            row = conn.execute(_SELECT_ITEMS + " WHERE run_id = ? AND key = ?", (run_id, item.key)).fetchone()
        if row is not None:
            record = _record(row, None)
            record.seq = item.seq
            yield record


def attempts(conn: sqlite3.Connection, run_id: int, range_input=None, chunks: bool = False) -> Iterator:
    """Every attempt of a run, earlier ones and final ones, by seq then attempt (--joblog),
    streamed; ``chunks`` as for records_in_order."""
    cursor = conn.execute(
        "SELECT seq, item, status, host, start, seconds, exit, signal, NULL, stderr, attempt, 0, error,"
        " NULL, send, receive, slot FROM map_attempts WHERE run_id = ?"
        " UNION ALL SELECT seq, item, status, host, start, seconds, exit, signal, NULL, stderr, attempt, truncated,"
        " error, NULL, send, receive, slot FROM map_items WHERE run_id = ? ORDER BY 1, 11", (run_id, run_id))
    rows = (_record(row, range_input) for row in cursor)
    if range_input is None:
        yield from rows
        return
    yield from heapq.merge(rows, chunk_records(path_of(conn), run_id, range_input, whole=chunks), key=_by_seq)


def _by_seq(record: ItemRecord) -> tuple:
    return (record.seq, record.attempt)


def path_of(conn: sqlite3.Connection) -> str:
    """The file of a connection's main database."""
    return next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")


def chunk_records(path: str, run_id: int, range_input, whole: bool = False) -> Iterator:
    """The items of the run's chunks (map_chunks + their payloads), by seq: a chunk at a time
    in memory, each item as an ItemRecord, or (``whole``) each chunk as one mapexport.Chunk.
    Its own connection, so that it can be read beside another cursor."""
    conn = connect(path)
    try:
        cursor = conn.execute(
            "SELECT c.seq, c.count, c.host, c.slot, p.data FROM map_chunks c JOIN payloads p"
            " ON p.run_id = c.run_id AND p.lo = c.lo WHERE c.run_id = ? ORDER BY c.seq", (run_id,))
        for seq, count, host, slot, data in cursor:
            decoded = decode_chunk(data, count)
            chunk = Chunk(seq, count, host, slot, decoded["t0"], decoded["start_us"], decoded["us"],
                          decoded["value"], range_input.start, range_input.step)
            if whole:
                yield chunk
            else:
                yield from chunk.records()
    finally:
        conn.close()


def encode_chunk(t0: float, start_us: list, us: list, values_json: str) -> bytes:
    """A chunk's payload: zlib of {"t0", "start_us", "us", "value"} as a host sent them
    (client/mapper.py run_function_columns); ``values_json`` is the values' JSON array, as text."""
    text = ('{"t0":' + json.dumps(t0) + ',"start_us":' + json.dumps(start_us) + ',"us":' + json.dumps(us)
            + ',"value":' + values_json + "}")
    return zlib.compress(text.encode("utf-8", "surrogatepass"), 1)


def decode_chunk(data: bytes, count: int) -> dict:
    """A chunk's payload as {"t0", "start_us", "us", "value"}: encode_chunk's, or the host's
    own (client/mapper.py run_function_packed: ``seq0`` or ``seq``, and without ``start_us``
    when the items ran back to back: then item i started when item i-1 ended)."""
    chunk = json.loads(zlib.decompress(data).decode("utf-8", "surrogatepass"))
    us = chunk.get("us")
    if isinstance(us, list) and "start_us" not in chunk:
        chunk["start_us"] = [0] + list(itertools.accumulate(us[:-1])) if us else []
    if not isinstance(chunk.get("t0"), (int, float)) or not all(
            isinstance(chunk.get(name), list) and len(chunk[name]) == count for name in ("start_us", "us", "value")):
        raise StoreError("a map chunk does not hold its items")
    return chunk


def item_count(conn: sqlite3.Connection, run_id: int) -> int:
    return done_count(conn, run_id)


def one(conn: sqlite3.Connection, run_id: int, seq: int) -> Optional[ItemRecord]:
    row = conn.execute(_SELECT_ITEMS + " WHERE run_id = ? AND seq = ?", (run_id, seq)).fetchone()
    return _record(row, None) if row else None
