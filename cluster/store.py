"""The results store: one SQLite file (WAL) with runs, blocks, results, hosts and events.

This is the only module that speaks SQL. It follows huey's SqliteStorage and
sqlite-utils: the DDL is plain strings, every write is one transaction in a
context manager, and ``Store`` takes a path or ``":memory:"``.

Guarantees the rest of beowulf builds on:

- **Exactly once.** A block is a row keyed by ``(run_id, lo)``; its result (the
  payload) is written in the same transaction, so a block is either absent or
  present with its result. A second result for the same block is ignored.
- **Nothing half-written.** WAL with ``synchronous=NORMAL``: a crash (SIGKILL) at
  any moment loses at most the transaction in progress; ``integrity_check`` stays ok.
- **Readers never block the writer** (WAL): ``fab stats`` can read during a run.
- **Versioned schema.** ``PRAGMA user_version`` holds the schema version and
  ``PRAGMA application_id`` marks the file as ours. Older stores are migrated on
  open; newer ones and foreign files are refused with a one-line ``StoreError``.

Only committed (done) blocks are stored: blocks in flight live in the coordinator's
memory, so after a crash exactly those are redone.

Threads: one ``Store`` (one connection) per thread is the rule. A ``Store`` guards
its connection with a lock, so sharing one is safe, just serialised. Results are
written by ``BlockWriter``, one thread with its own connection that batches rows.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

from cluster.errors import StoreError

log = logging.getLogger(__name__)

# Marks a SQLite file as a beowulf store (PRAGMA application_id): "beow" in ASCII.
APPLICATION_ID = 0x62656F77
# The schema this code writes; stores with a smaller user_version are migrated.
SCHEMA_VERSION = 4
# The oldest schema open_readonly reads (v4 only added job_schema: the reads do not need it).
READABLE_SCHEMA = 3
# Seconds a connection waits for another one's write lock before giving up.
BUSY_TIMEOUT_SECONDS = 5.0
# The WAL file is truncated back to this size after a checkpoint.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# A run's life: running -> done | interrupted | failed; --fresh turns it into replaced.
RUN_STATES = ("running", "done", "interrupted", "failed", "replaced")
# Oldest SQLite we run on: UPSERT (ON CONFLICT ... DO NOTHING) arrived in 3.24.
MIN_SQLITE = (3, 24, 0)
# BlockWriter: cap on payload bytes committed in one transaction.
MAX_BATCH_BYTES = 8 * 1024 * 1024
# BlockWriter: put() waits while this many payload bytes are queued (back-pressure: the
# coordinator's loop waits, the hosts' readers then wait for their byte budget, and the
# hosts' output waits in their SSH windows; BENCHMARKS.md, coordinator memory).
MAX_PENDING_BYTES = 8 * 1024 * 1024
# BlockWriter: times a batch is retried when the database stays locked (each waits 5 s).
BUSY_RETRIES = 3

# -- schema -----------------------------------------------------------------------

SCHEMA_V1 = (
    """CREATE TABLE runs (
        id       INTEGER PRIMARY KEY,
        job      TEXT    NOT NULL,
        params   TEXT    NOT NULL,            -- canonical JSON (sorted keys)
        key      TEXT    NOT NULL,            -- job + params: the run's identity
        state    TEXT    NOT NULL CHECK (state IN
                     ('running', 'done', 'interrupted', 'failed', 'replaced')),
        started  REAL    NOT NULL,            -- epoch seconds
        finished REAL,
        total    INTEGER NOT NULL             -- items in the whole run
    )""",
    # One live run per identity; replaced runs are kept for the record.
    "CREATE UNIQUE INDEX runs_live_key ON runs (key) WHERE state <> 'replaced'",
    """CREATE TABLE blocks (
        run_id   INTEGER NOT NULL REFERENCES runs (id),
        lo       INTEGER NOT NULL,
        hi       INTEGER NOT NULL,
        host     TEXT    NOT NULL,
        started  REAL    NOT NULL,
        finished REAL    NOT NULL,
        seconds  REAL    NOT NULL,            -- compute time (agent's elapsed)
        items    INTEGER NOT NULL,
        found    INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        meta     TEXT,                        -- JSON or NULL
        PRIMARY KEY (run_id, lo),
        CHECK (hi >= lo)
    )""",
    # Results live apart from blocks so that scanning blocks (stats, resume) stays
    # small and fast however big the results are.
    """CREATE TABLE payloads (
        run_id INTEGER NOT NULL,
        lo     INTEGER NOT NULL,
        data   BLOB    NOT NULL,
        PRIMARY KEY (run_id, lo),
        FOREIGN KEY (run_id, lo) REFERENCES blocks (run_id, lo) ON DELETE CASCADE
    )""",
    """CREATE TABLE hosts (
        name      TEXT PRIMARY KEY,
        facts     TEXT NOT NULL DEFAULT '{}', -- JSON object
        last_seen REAL NOT NULL
    )""",
    """CREATE TABLE events (
        id     INTEGER PRIMARY KEY,
        run_id INTEGER REFERENCES runs (id),  -- NULL: not tied to a run
        time   REAL    NOT NULL,
        host   TEXT,
        kind   TEXT    NOT NULL,
        detail TEXT    NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX events_run ON events (run_id, time)",
    """CREATE TABLE locks (
        run_id   INTEGER PRIMARY KEY REFERENCES runs (id),
        pid      INTEGER NOT NULL,
        hostname TEXT    NOT NULL,
        since    REAL    NOT NULL,
        token    TEXT                         -- boot id + process start: tells PID reuse
    )""",
    """CREATE TABLE calibration (
        host     TEXT NOT NULL,
        job      TEXT NOT NULL,
        variant  TEXT NOT NULL DEFAULT '',    -- e.g. 'tor' for scraping through Tor
        rate     REAL NOT NULL,               -- items per second, standalone
        measured REAL NOT NULL,
        PRIMARY KEY (host, job, variant)
    )""",
)

SCHEMA_V4 = (
    """CREATE TABLE job_schema (
        job     TEXT    PRIMARY KEY,
        version INTEGER NOT NULL              -- how many of the job's migrations were applied
    )""",
)

# A migration is SQL statements or a function of the connection, run inside the
# migrating transaction. MIGRATIONS[n] takes a store from version n-1 to n; v1
# creates the core tables (a job's own come from Job.migrations, Store.migrate_job).
# To change the schema: add MIGRATIONS[SCHEMA_VERSION + 1] and bump SCHEMA_VERSION.
Migration = Union[Sequence[str], Callable[[sqlite3.Connection], None]]
MIGRATIONS: dict[int, Migration] = {
    1: SCHEMA_V1,
    # v2: the Content-Encoding a page came with (bodies are kept as sent, never inflated). The
    # scrape job's table was in the core schema then: only stores made before v4 have it here.
    2: lambda conn: _migrate_v2(conn),
    # v3: what each host was in each run (run_hosts), and every calibration kept with what it
    # measured (job, mode, range, run), so that a past run's figures never change.
    3: lambda conn: _migrate_v3(conn),
    # v4: job tables belong to their jobs (Job.migrations, applied by Store.migrate_job); the
    # version of each job's tables is in job_schema. A table a store got from v1/v2 is left as
    # it is: the job's first migration creates it only if it is not there (CREATE ... IF NOT EXISTS).
    4: SCHEMA_V4,
}

# Job table and column names are code, never data; still checked before they go into SQL.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """v1 -> v2: the scrape job's table, made by the core schema v1 before v4, gets content_encoding
    (a store made since v4 has no job table here: the job's migration makes it whole)."""
    if _has_table(conn, "pages"):
        conn.execute("ALTER TABLE pages ADD COLUMN content_encoding TEXT")


SCHEMA_V3 = (
    # One row per host per run: what the host was in that run, from its hello(s) in it.
    """CREATE TABLE run_hosts (
        run_id INTEGER NOT NULL REFERENCES runs (id),
        host   TEXT    NOT NULL,
        joined REAL    NOT NULL,              -- its first hello in the run
        slots  INTEGER NOT NULL,              -- slots (primes) or workers (scrape): the most it had
        engine TEXT    NOT NULL DEFAULT '',
        facts  TEXT    NOT NULL DEFAULT '{}', -- its hello (JSON object): Python, cores, ...
        PRIMARY KEY (run_id, host)
    )""",
    """CREATE TABLE calibrations (
        id       INTEGER PRIMARY KEY,
        host     TEXT    NOT NULL,
        job      TEXT    NOT NULL,
        variant  TEXT    NOT NULL DEFAULT '',  -- e.g. 'tor' for scraping through Tor
        mode     TEXT    NOT NULL DEFAULT '',  -- primes: 'list' or 'count'
        lo       INTEGER,                      -- primes: the numbers measured (NULL: unknown)
        hi       INTEGER,
        run_id   INTEGER,                      -- measured for this run (fab calibrate --run)
        slots    INTEGER,
        rate     REAL    NOT NULL,             -- items per second, standalone
        measured REAL    NOT NULL
    )""",
    "CREATE INDEX calibrations_job ON calibrations (job, host, measured)",
)


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """v2 -> v3. Old runs get run_hosts from their 'up' events ("N slots"); a host that did
    blocks without one gets the facts the store holds now, frozen from here on. Old
    calibrations were primes in count mode, range unknown."""
    for statement in SCHEMA_V3:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO calibrations (host, job, variant, mode, rate, measured)"
        " SELECT host, job, variant, CASE job WHEN 'primes' THEN 'count' ELSE '' END, rate, measured"
        " FROM calibration"
    )
    conn.execute("DROP TABLE calibration")
    ups = conn.execute(
        "SELECT run_id, host, min(time), detail FROM events WHERE kind = 'up' AND run_id IS NOT NULL"
        " AND host IS NOT NULL GROUP BY run_id, host"
    ).fetchall()
    for run_id, host, joined, detail in ups:
        try:
            slots = max(1, int((detail or "").split()[0]))
        except (ValueError, IndexError):
            slots = 1
        conn.execute("INSERT INTO run_hosts (run_id, host, joined, slots) VALUES (?, ?, ?, ?)",
                     (run_id, host, joined, slots))
    facts = {name: text for name, text in conn.execute("SELECT name, facts FROM hosts")}
    rest = conn.execute(
        "SELECT run_id, host, min(started) FROM blocks b WHERE NOT EXISTS (SELECT 1 FROM run_hosts r"
        " WHERE r.run_id = b.run_id AND r.host = b.host) GROUP BY run_id, host"
    ).fetchall()
    for run_id, host, joined in rest:
        known = _json_object(facts.get(host))
        slots = _positive_int(known.get("slots")) or _positive_int(known.get("cores")) or 1
        conn.execute("INSERT INTO run_hosts (run_id, host, joined, slots, facts) VALUES (?, ?, ?, ?, ?)",
                     (run_id, host, joined, slots, canonical_json(known)))


def _json_object(text) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _positive_int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0



@dataclass
class BlockRow:
    """One finished block as the coordinator hands it to the store.

    ``lo``/``hi`` are the job's own bounds (the store only orders by ``lo``);
    ``seconds`` is the compute time and defaults to ``finished - started``.
    """

    run_id: int
    lo: int
    hi: int
    host: str
    started: float
    finished: float
    items: int
    found: int
    attempts: int = 1
    payload: bytes | None = None
    meta: dict | None = None
    seconds: float | None = None
    # Rows of the job's own tables, stored in the same transaction: (table, row dict) pairs
    # (Job.rows); the store adds run_id and lo.
    rows: Sequence[tuple] = ()


def canonical_json(value) -> str:
    """``value`` as JSON with sorted keys and no spaces: equal dicts give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Store:
    """A beowulf results store on ``path`` (a file, created with its folder, or ``":memory:"``)."""

    def __init__(self, path: str | os.PathLike):
        self.path: str = os.fspath(path)
        self._lock = threading.RLock()
        self._conn = self._connect()
        try:
            if self._configure() < SCHEMA_VERSION:
                self._migrate()
        except BaseException:
            self._conn.close()
            raise
        log.debug("%s: open (schema %d)", self.path, SCHEMA_VERSION)

    # -- opening ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"{self.path}: this Python's SQLite {sqlite3.sqlite_version} is too old"
                f" (beowulf needs {'.'.join(map(str, MIN_SQLITE))} or newer)"
            )
        if self.path != ":memory:":
            folder = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create its folder ({exc.strerror})") from exc
            if os.path.isdir(self.path):
                raise StoreError(f"{self.path}: is a folder, not a beowulf store")
            # A new store is private (0600); SQLite gives its -wal and -shm the file's mode.
            # O_EXCL: an existing file keeps its mode.
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create ({exc.strerror})") from exc
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open ({exc})") from exc
        conn.row_factory = sqlite3.Row
        return conn

    def _configure(self) -> int:
        """Check the file is ours, set the pragmas; return its schema version."""
        conn = self._conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            # The first read of the header: a file that is not SQLite fails here.
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:  # locked, unreadable, ...
            raise StoreError(f"{self.path}: cannot open ({exc})") from exc
        except sqlite3.DatabaseError as exc:  # not SQLite, or a damaged header
            raise StoreError(f"{self.path}: not a beowulf store ({exc})") from exc
        self._check_identity(app_id, version)
        with self._errors("opening"):
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                log.warning("%s: journal mode is %s, not wal", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        return version

    def _check_identity(self, app_id: int, version: int) -> None:
        if app_id == 0 and version == 0:
            tables = self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{self.path}: not a beowulf store (another program's database)")
        elif app_id != APPLICATION_ID:
            raise StoreError(f"{self.path}: not a beowulf store (another program's database)")
        elif version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: made by a newer beowulf "
                f"(schema {version}, this one knows {SCHEMA_VERSION})"
            )

    def _migrate(self) -> None:
        with self._tx("migrating") as conn:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self._check_identity(APPLICATION_ID, version)
            if version == 0:
                log.info("%s: new store (schema %d)", self.path, SCHEMA_VERSION)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                if version:
                    log.info("%s: migrating the store to schema %d", self.path, target)
                step = MIGRATIONS[target]
                if callable(step):
                    step(conn)
                else:
                    for statement in step:
                        conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    # -- plumbing -----------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str):
        """Turn SQLite's exceptions into one-line StoreErrors naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {doing} failed ({exc})") from exc

    @contextlib.contextmanager
    def _tx(self, doing: str, immediate: bool = True):
        """One transaction: BEGIN IMMEDIATE (take the write lock now), COMMIT or ROLLBACK."""
        with self._lock, self._errors(doing):
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _rows(self, sql: str, args: Sequence = ()) -> list[dict]:
        with self._lock, self._errors("reading"):
            return [dict(row) for row in self._conn.execute(sql, args)]

    def _value(self, sql: str, args: Sequence = ()):
        with self._lock, self._errors("reading"):
            row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the connection (the last one to close also checkpoints the WAL)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    # -- runs ---------------------------------------------------------------------

    def open_run(self, job: str, params: dict, total: int, *, fresh: bool = False) -> int:
        """Id of the run for ``job`` + ``params``, resumed (state back to running) or new.

        ``params`` are the parameters that define the answer; key order does not
        matter. ``fresh=True`` marks an existing run 'replaced' (superseded: its blocks,
        events and hosts stay, for ``fab stats``; its results are deleted to free space)
        and starts a new run. A run whose lock is held by
        a live coordinator is not replaced (StoreError).
        """
        canon = canonical_json(params)
        key = f"{job}:{canon}"
        now = time.time()
        with self._tx("opening a run") as conn:
            row = conn.execute(
                "SELECT id, state FROM runs WHERE key = ? AND state <> 'replaced'", (key,)
            ).fetchone()
            if row is not None and not fresh:
                run_id = row[0]
                conn.execute(
                    "UPDATE runs SET state = 'running', finished = NULL, total = ? WHERE id = ?",
                    (total, run_id),
                )
                self._event(conn, run_id, None, "resume")
                # A finished run is not resumed: the task says "already complete" (README.md).
                log.log(logging.DEBUG if row[1] == "done" else logging.INFO, "run %d: resuming %s %s",
                        run_id, job, canon)
                return run_id
            if row is not None:
                self._replace(conn, row[0])
            run_id = conn.execute(
                "INSERT INTO runs (job, params, key, state, started, total)"
                " VALUES (?, ?, ?, 'running', ?, ?)",
                (job, canon, key, now, total),
            ).lastrowid
            self._event(conn, run_id, None, "start")
        log.info("run %d: new %s %s", run_id, job, canon)
        return run_id

    def _replace(self, conn: sqlite3.Connection, run_id: int) -> None:
        holder = self._live_lock(conn, run_id)
        if holder is not None:
            raise StoreError(_locked_message(run_id, holder))
        # Its history (blocks, events, run_hosts) is kept: a past run's stats never change.
        conn.execute("DELETE FROM payloads WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM locks WHERE run_id = ?", (run_id,))
        conn.execute(
            "UPDATE runs SET state = 'replaced', finished = coalesce(finished, ?) WHERE id = ?",
            (time.time(), run_id),
        )
        log.info("run %d: replaced (--fresh); its results are deleted, its history kept", run_id)

    def find_run(self, job: str, params: dict) -> int | None:
        """Id of the live (not replaced) run for ``job`` + ``params``, or None."""
        key = f"{job}:{canonical_json(params)}"
        return self._value("SELECT id FROM runs WHERE key = ? AND state <> 'replaced'", (key,))

    def finish_run(self, run_id: int, state: str) -> None:
        """Set the run's final state ('done', 'interrupted', 'failed') and its finish time."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}")
        with self._tx("finishing a run") as conn:
            conn.execute(
                "UPDATE runs SET state = ?, finished = ? WHERE id = ?", (state, time.time(), run_id)
            )
            self._event(conn, run_id, None, state)

    _RUN_SQL = """
        SELECT r.id, r.job, r.params, r.state, r.started, r.finished, r.total,
               coalesce(b.blocks, 0) AS blocks, coalesce(b.items, 0) AS items,
               coalesce(b.found, 0) AS found,
               CASE r.state WHEN 'replaced' THEN (SELECT min(n.id) FROM runs n
                   WHERE n.key = r.key AND n.id > r.id) END AS superseded_by
        FROM runs r LEFT JOIN (
            SELECT run_id, count(*) AS blocks, sum(items) AS items, sum(found) AS found
            FROM blocks GROUP BY run_id
        ) b ON b.run_id = r.id"""

    def runs(self) -> list[dict]:
        """Every run, oldest first: id, job, params (dict), state, started, finished,
        total, and what is done so far: blocks, items, found; superseded_by: for a replaced
        run, the run --fresh started in its place."""
        return [_run_dict(row) for row in self._rows(self._RUN_SQL + " ORDER BY r.id")]

    def run(self, run_id: int) -> dict | None:
        """One run as in ``runs()``, or None if there is no such run."""
        rows = self._rows(self._RUN_SQL + " WHERE r.id = ?", (run_id,))
        return _run_dict(rows[0]) if rows else None

    def run_totals(self, run_id: int) -> dict:
        """What is committed for a run: {'blocks', 'items', 'found', 'seconds'}."""
        rows = self._rows(
            "SELECT count(*) AS blocks, coalesce(sum(items), 0) AS items,"
            " coalesce(sum(found), 0) AS found, coalesce(sum(seconds), 0.0) AS seconds"
            " FROM blocks WHERE run_id = ?",
            (run_id,),
        )
        return rows[0]

    # -- the run lock ---------------------------------------------------------------

    def lock_run(self, run_id: int, *, force: bool = False) -> None:
        """Make this process the run's one coordinator, or raise StoreError naming the holder.

        A lock held by a live process (same host and its PID alive, or another host,
        which we cannot check) is refused; a stale one (same host, process gone or its
        PID reused) is taken over. ``force=True`` takes over any lock. Race-free
        between processes: the check and the insert are one IMMEDIATE transaction.
        """
        with self._tx("locking the run") as conn:
            holder = None if force else self._live_lock(conn, run_id)
            if holder is not None:
                raise StoreError(_locked_message(run_id, holder))
            old = conn.execute(
                "SELECT pid, hostname FROM locks WHERE run_id = ?", (run_id,)
            ).fetchone()
            if old is not None:
                log.warning(
                    "run %d: taking over the lock of PID %d on %s (%s)",
                    run_id, old["pid"], old["hostname"], "forced" if force else "stale",
                )
            pid = os.getpid()
            conn.execute(
                "INSERT OR REPLACE INTO locks (run_id, pid, hostname, since, token)"
                " VALUES (?, ?, ?, ?, ?)",
                (run_id, pid, socket.gethostname(), time.time(), _process_token(pid)),
            )

    def unlock_run(self, run_id: int) -> None:
        """Release this process's lock on the run (a lock held by another is left alone)."""
        with self._tx("unlocking the run") as conn:
            conn.execute(
                "DELETE FROM locks WHERE run_id = ? AND pid = ? AND hostname = ?",
                (run_id, os.getpid(), socket.gethostname()),
            )

    def lock_holder(self, run_id: int) -> dict | None:
        """The live lock on a run ({'pid', 'hostname', 'since'}), or None if free or stale."""
        with self._lock, self._errors("reading the lock"):
            holder = self._live_lock(self._conn, run_id)
        if holder is not None:
            del holder["token"]
        return holder

    def _live_lock(self, conn: sqlite3.Connection, run_id: int) -> dict | None:
        row = conn.execute(
            "SELECT pid, hostname, since, token FROM locks WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        holder = dict(row)
        if holder["hostname"] != socket.gethostname():
            return holder
        return holder if _process_alive(holder["pid"], holder["token"]) else None

    # -- blocks ---------------------------------------------------------------------

    def commit_blocks(self, rows: Sequence[BlockRow]) -> list[bool]:
        """Commit finished blocks with their results in ONE transaction.

        Returns, per row, True if it was newly committed and False if that
        ``(run_id, lo)`` was already there (this second result is ignored).
        """
        flags = []
        with self._tx("committing blocks") as conn:
            for row in rows:
                flags.append(self._insert_block(conn, row))
        return flags

    @staticmethod
    def _insert_block(conn: sqlite3.Connection, row: BlockRow) -> bool:
        seconds = row.seconds if row.seconds is not None else row.finished - row.started
        meta = None if row.meta is None else canonical_json(row.meta)
        cur = conn.execute(
            # Only the primary key's conflict is ignored (INSERT OR IGNORE would also
            # swallow a failed CHECK or NOT NULL and call it a duplicate).
            "INSERT INTO blocks (run_id, lo, hi, host, started, finished, seconds,"
            " items, found, attempts, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run_id, lo) DO NOTHING",
            (row.run_id, row.lo, row.hi, row.host, row.started, row.finished, seconds,
             row.items, row.found, row.attempts, meta),
        )
        if cur.rowcount != 1:
            return False
        if row.payload is not None:
            conn.execute(
                "INSERT INTO payloads (run_id, lo, data) VALUES (?, ?, ?)",
                (row.run_id, row.lo, row.payload),
            )
        _insert_job_rows(conn, row.run_id, row.lo, row.rows)
        return True

    def add_job_rows(self, run_id: int, lo: int, rows: Sequence[tuple]) -> None:
        """Store rows of a job's own tables now, in one transaction ((table, row dict) pairs,
        as Decision.record carries them; ``run_id`` and ``lo`` are added)."""
        if rows:
            with self._tx("recording job rows") as conn:
                _insert_job_rows(conn, run_id, lo, rows)

    def migrate_job(self, job) -> None:
        """Create or update the job's own tables (Job.migrations) up to its last version,
        recorded in job_schema; StoreError when the store has a newer version of them."""
        steps = list(job.migrations or ())
        if not steps:
            return
        with self._tx("migrating the job's tables") as conn:
            got = conn.execute("SELECT version FROM job_schema WHERE job = ?", (job.name,)).fetchone()
            version = got[0] if got else 0
            if version > len(steps):
                raise StoreError(f"{self.path}: the {job.name} tables are from a newer beowulf "
                                 f"(version {version}, this one knows {len(steps)})")
            for step in steps[version:]:
                for statement in step:
                    conn.execute(statement)
            if version < len(steps):
                log.info("%s: %s tables at version %d", self.path, job.name, len(steps))
                conn.execute("INSERT INTO job_schema (job, version) VALUES (?, ?) ON CONFLICT (job)"
                             " DO UPDATE SET version = excluded.version", (job.name, len(steps)))

    def has_table(self, name: str) -> bool:
        """Whether the store has table ``name`` (a job's table exists once a run of it started)."""
        with self._lock, self._errors("reading"):
            return _has_table(self._conn, name)

    def query(self, sql: str, args: Sequence = ()) -> list[dict]:
        """Rows of one read-only SELECT (a job reading its own tables), as dicts."""
        _check_select(sql)
        return self._rows(sql, args)

    def iter_query(self, sql: str, args: Sequence = ()) -> Iterator[tuple]:
        """Rows of one read-only SELECT as tuples, streamed (the store's lock is taken per row,
        not held between them)."""
        _check_select(sql)
        cur = self._conn.cursor()
        cur.row_factory = None
        with self._lock, self._errors("reading"):
            cur.execute(sql, args)
        while True:
            with self._lock, self._errors("reading"):
                row = cur.fetchone()
            if row is None:
                return
            yield row

    def done_ranges(self, run_id: int) -> list[tuple[int, int]]:
        """Committed blocks of a run as (lo, hi), ordered by lo (nothing else is read)."""
        with self._lock, self._errors("reading blocks"):
            cur = self._conn.cursor()
            cur.row_factory = None
            return cur.execute(
                "SELECT lo, hi FROM blocks WHERE run_id = ? ORDER BY lo", (run_id,)
            ).fetchall()

    def iter_payloads(self, run_id: int) -> Iterator[tuple[int, int, bytes | None]]:
        """Yield (lo, hi, payload) of each committed block in order of lo, one at a time.

        Streams from a cursor: only the current row is in memory. The rows are one
        consistent snapshot even while a writer adds blocks.
        """
        cur = self._conn.cursor()
        cur.row_factory = None
        try:
            with self._lock, self._errors("reading results"):
                cur.execute(
                    "SELECT b.lo, b.hi, p.data FROM blocks b LEFT JOIN payloads p"
                    " ON p.run_id = b.run_id AND p.lo = b.lo"
                    " WHERE b.run_id = ? ORDER BY b.lo",
                    (run_id,),
                )
            while True:
                with self._lock, self._errors("reading results"):
                    row = cur.fetchone()
                if row is None:
                    return
                yield row
        finally:
            with self._lock:
                cur.close()

    def payloads_between(self, run_id: int, lo: int, hi: int, limit: int = 1) -> list[tuple[int, int, bytes | None]]:
        """(lo, hi, payload) of the first ``limit`` committed blocks of a run that overlap
        [lo, hi], in order of lo: a smaller range answered from a finished run, a few
        blocks at a time."""
        with self._lock, self._errors("reading results"):
            cur = self._conn.cursor()
            cur.row_factory = None
            return cur.execute(
                "SELECT b.lo, b.hi, p.data FROM blocks b LEFT JOIN payloads p"
                " ON p.run_id = b.run_id AND p.lo = b.lo"
                " WHERE b.run_id = ? AND b.hi >= ? AND b.lo <= ? ORDER BY b.lo LIMIT ?",
                (run_id, lo, hi, max(1, limit)),
            ).fetchall()

    def blocks(self, run_id: int) -> list[dict]:
        """A run's blocks in order of lo, for stats: everything but the payload, plus
        ``bytes`` (the payload's size, None without one) and ``meta`` as a dict."""
        rows = self._rows(
            "SELECT b.run_id, b.lo, b.hi, b.host, b.started, b.finished, b.seconds, b.items,"
            " b.found, b.attempts, b.meta, length(p.data) AS bytes FROM blocks b"
            " LEFT JOIN payloads p ON p.run_id = b.run_id AND p.lo = b.lo"
            " WHERE b.run_id = ? ORDER BY b.lo",
            (run_id,),
        )
        for row in rows:
            row["meta"] = None if row["meta"] is None else json.loads(row["meta"])
        return rows

    # -- events, hosts, calibration ------------------------------------------------------

    @staticmethod
    def _event(conn, run_id, host, kind, detail="") -> None:
        conn.execute(
            "INSERT INTO events (run_id, time, host, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (run_id, time.time(), host, kind, detail),
        )

    def add_event(self, run_id: int | None, host: str | None, kind: str, detail: str = "") -> None:
        """Record something that happened to a host in a run (time = now), for stats.

        Kinds in use: retry, failure, lost, quarantine, invalid; the store itself
        writes start, resume, done, interrupted and failed (host None) for runs.
        """
        with self._tx("recording an event") as conn:
            self._event(conn, run_id, host, kind, detail)

    def events(self, run_id: int | None = None) -> list[dict]:
        """Events in time order (of one run, or all): id, run_id, time, host, kind, detail."""
        if run_id is None:
            return self._rows("SELECT * FROM events ORDER BY time, id")
        return self._rows(
            "SELECT * FROM events WHERE run_id = ? ORDER BY time, id", (run_id,)
        )

    def upsert_host(self, name: str, facts: dict) -> None:
        """Merge ``facts`` into the host's facts (new keys win) and set last_seen = now."""
        with self._tx("recording a host") as conn:
            row = conn.execute("SELECT facts FROM hosts WHERE name = ?", (name,)).fetchone()
            merged = json.loads(row[0]) if row is not None else {}
            merged.update(facts)
            conn.execute(
                "INSERT INTO hosts (name, facts, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET facts = excluded.facts,"
                " last_seen = excluded.last_seen",
                (name, canonical_json(merged), time.time()),
            )

    def hosts(self) -> list[dict]:
        """Every host ever seen, by name: {'name', 'facts' (dict), 'last_seen'}."""
        rows = self._rows("SELECT name, facts, last_seen FROM hosts ORDER BY name")
        for row in rows:
            row["facts"] = json.loads(row["facts"])
        return rows

    def record_run_host(self, run_id: int, name: str, facts: dict, slots: int, engine: str = "") -> None:
        """Record what host ``name`` is in run ``run_id`` (its hello): the first hello's time is
        kept, slots become the most it had in the run, facts and engine the latest."""
        with self._tx("recording a host of the run") as conn:
            conn.execute(
                "INSERT INTO run_hosts (run_id, host, joined, slots, engine, facts) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, host) DO UPDATE SET slots = max(slots, excluded.slots),"
                " engine = CASE excluded.engine WHEN '' THEN engine ELSE excluded.engine END,"
                " facts = excluded.facts",
                (run_id, name, time.time(), max(1, int(slots)), engine or "", canonical_json(facts)),
            )

    def run_hosts(self, run_id: int) -> list[dict]:
        """What each host was in a run, by name: {'name', 'joined', 'slots', 'engine', 'facts' (dict)}."""
        rows = self._rows(
            "SELECT host AS name, joined, slots, engine, facts FROM run_hosts WHERE run_id = ? ORDER BY host",
            (run_id,),
        )
        for row in rows:
            row["facts"] = _json_object(row["facts"])
        return rows

    def set_calibration(self, host: str, job: str, rate: float, variant: str = "", *, mode: str = "",
                        lo: int | None = None, hi: int | None = None, run_id: int | None = None,
                        slots: int | None = None) -> None:
        """Store a host's standalone rate (items/s) for a job (variant e.g. 'tor'), measured now
        on ``mode`` ('list'/'count') over [lo, hi], for run ``run_id`` if given. Kept with every
        earlier one: a run's efficiency uses the calibrations comparable to it (cluster/figures.py)."""
        with self._tx("recording a calibration") as conn:
            conn.execute(
                "INSERT INTO calibrations (host, job, variant, mode, lo, hi, run_id, slots, rate, measured)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (host, job, variant, mode, lo, hi, run_id, slots, rate, time.time()),
            )

    def calibrations(self, job: str | None = None) -> list[dict]:
        """Every stored standalone rate, oldest first: {'host', 'job', 'variant', 'mode', 'lo',
        'hi', 'run_id', 'slots', 'rate', 'measured'}."""
        sql = "SELECT host, job, variant, mode, lo, hi, run_id, slots, rate, measured FROM calibrations"
        if job is None:
            return self._rows(sql + " ORDER BY measured, id")
        return self._rows(sql + " WHERE job = ? ORDER BY measured, id", (job,))

    # -- health ---------------------------------------------------------------------

    def integrity_ok(self) -> bool:
        """True if ``PRAGMA integrity_check`` finds nothing wrong (reads the whole file)."""
        with self._lock:
            try:
                rows = self._conn.execute("PRAGMA integrity_check").fetchall()
            except sqlite3.DatabaseError as exc:
                log.warning("%s: integrity check failed: %s", self.path, exc)
                return False
        return len(rows) == 1 and rows[0][0] == "ok"

    def free_disk_bytes(self) -> int:
        """Free bytes on the filesystem holding the store (the working folder for :memory:)."""
        folder = os.getcwd() if self.path == ":memory:" else os.path.dirname(
            os.path.abspath(self.path)
        )
        return shutil.disk_usage(folder).free

    # -- read-only access (fab stats) -------------------------------------------------

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> Store:
        """An existing store opened for reading only (SQLite ``mode=ro``): ``fab stats``.

        Nothing is created, migrated or changed (SQLite may create the ``-wal`` and
        ``-shm`` files WAL readers need). Reads see the last committed state while a
        run writes. StoreError for a missing, foreign, older, newer, corrupt or locked file.
        """
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        if not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such store")
        if os.path.isdir(self.path):
            raise StoreError(f"{self.path}: is a folder, not a beowulf store")
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS,
                                         isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:  # locked, unreadable, ...
            raise StoreError(f"{self.path}: cannot open ({exc})") from exc
        except sqlite3.DatabaseError as exc:  # not SQLite, or a damaged header
            raise StoreError(f"{self.path}: not a beowulf store ({exc})") from exc
        try:
            self._check_identity(app_id, version)
            if version < READABLE_SCHEMA:
                what = "is empty" if version == 0 else f"has the older schema {version}"
                raise StoreError(f"{self.path}: {what}; a run (fab primes ...) sets it up")
        except BaseException:
            self._conn.close()
            raise
        return self


def _check_select(sql: str) -> None:
    if not sql.lstrip().upper().startswith("SELECT"):
        raise ValueError("Store.query reads only (one SELECT)")


def _insert_job_rows(conn: sqlite3.Connection, run_id: int, lo: int, rows: Sequence[tuple]) -> None:
    for table, record in rows:
        columns = list(record)
        if not _IDENTIFIER.match(table) or not all(_IDENTIFIER.match(str(c)) for c in columns):
            raise ValueError(f"bad job table or column name in {table!r}: {columns}")
        conn.execute(
            f"INSERT INTO {table} (run_id, lo{''.join(', ' + c for c in columns)})"
            f" VALUES (?, ?{', ?' * len(columns)})",
            (run_id, lo, *(record[c] for c in columns)),
        )


def _run_dict(row: dict) -> dict:
    row["params"] = json.loads(row["params"])
    return row


def _locked_message(run_id: int, holder: dict) -> str:
    since = time.localtime(holder["since"])
    if time.strftime("%Y-%m-%d", since) == time.strftime("%Y-%m-%d"):
        when = time.strftime("%H:%M:%S", since)
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", since)
    return (
        f"run {run_id} is already being worked on by PID {holder['pid']}"
        f" on host {holder['hostname']} (started {when})"
    )


def _process_token(pid: int) -> str | None:
    """Boot id + start time of process ``pid`` (Linux), or None where /proc does not tell.

    Together with the PID this names one process for the life of the machine, so a
    lock whose PID was reused by another process (a restarted container) is stale.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, token: str | None) -> bool:
    """Whether the process that took a lock on this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, but belongs to someone else
    except (OSError, OverflowError):
        return False
    if token is None:
        return True
    current = _process_token(pid)
    return current is None or current == token


# -- the writer thread -------------------------------------------------------------------


def _payload_size(row: BlockRow) -> int:
    return len(row.payload) if row.payload is not None else 0


def _is_busy(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, sqlite3.OperationalError) and (
        "locked" in str(cause) or "busy" in str(cause)
    )


class BlockWriter:
    """The one writer thread: batches BlockRows into transactions.

    ``put()`` queues a row and returns at once (it waits only when more than
    MAX_PENDING_BYTES of payload are queued). The thread opens its own ``Store`` on
    ``path``, commits up to ``max_batch`` rows, waiting at most ``max_delay`` seconds
    for a batch to fill, and then calls ``on_commit(row, new)`` for each row, in the
    writer thread, after the transaction committed; ``new`` is False for a duplicate.

    If a commit fails (disk full, I/O error), that batch is rolled back, ``error`` is
    set, the thread stops, and ``put()``/``flush()`` raise StoreError from then on.
    ``on_commit`` must not call ``flush()`` (it would wait for itself); an exception
    in it is logged and does not stop the writer.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        on_commit: Callable[[BlockRow, bool], None] | None = None,
        max_batch: int = 256,
        max_delay: float = 0.2,
    ):
        self.path = os.fspath(path)
        self.error: BaseException | None = None
        self._on_commit = on_commit
        self._max_batch = max(1, max_batch)
        self._max_delay = max_delay
        self._queue: collections.deque[BlockRow] = collections.deque()
        self._cond = threading.Condition()
        self._queued_bytes = 0
        self._put_count = 0
        self._done_count = 0
        self._flushing = 0
        self._closing = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error

    def put(self, row: BlockRow) -> None:
        """Queue a finished block for committing; StoreError if an earlier commit failed."""
        size = _payload_size(row)
        with self._cond:
            self._raise_error()
            if self._closing:
                raise RuntimeError("BlockWriter.put() after close()")
            while self._queue and self._queued_bytes + size > MAX_PENDING_BYTES:
                self._cond.wait()
                self._raise_error()
            self._queue.append(row)
            self._queued_bytes += size
            self._put_count += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every row put so far is committed and its on_commit has run.

        Raises StoreError if a commit failed, or if ``timeout`` seconds passed first.
        """
        with self._cond:
            target = self._put_count
            self._flushing += 1
            self._cond.notify_all()
            try:
                done = self._cond.wait_for(
                    lambda: self._done_count >= target or self.error is not None, timeout
                )
            finally:
                self._flushing -= 1
            self._raise_error()
            if not done:
                raise StoreError(f"{self.path}: results not written within {timeout:g} s")

    def close(self) -> None:
        """Commit what is queued, then stop the thread. Never raises: check ``error``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        if self._queue:
            log.error("%s: %d results were not written", self.path, len(self._queue))

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Rows put but not yet committed."""
        with self._cond:
            return self._put_count - self._done_count

    def _raise_error(self) -> None:
        if self.error is not None:
            raise StoreError(str(self.error)) from self.error

    # -- in the writer thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            store = Store(self.path)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                batch = self._next_batch()
                if not batch:
                    return
                flags = self._commit(store, batch)
                self._report(batch, flags)
        except BaseException as exc:
            if not isinstance(exc, StoreError):
                log.exception("%s: the writer thread crashed", self.path)
                exc = StoreError(f"{self.path}: writing results failed ({exc!r})")
            log.error("%s", exc)
            with self._cond:
                self.error = exc
                self._cond.notify_all()
        finally:
            store.close()

    def _next_batch(self) -> list[BlockRow]:
        """Wait for rows; take up to max_batch of them, waiting max_delay for stragglers."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            batch: list[BlockRow] = []
            size = 0
            deadline = time.monotonic() + self._max_delay
            while len(batch) < self._max_batch and size < MAX_BATCH_BYTES:
                if self._queue:
                    row = self._queue.popleft()
                    batch.append(row)
                    size += _payload_size(row)
                    continue
                left = deadline - time.monotonic()
                if not batch or self._closing or self._flushing or left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _commit(self, store: Store, batch: list[BlockRow]) -> list[bool]:
        for attempt in range(1, BUSY_RETRIES + 1):
            try:
                return store.commit_blocks(batch)
            except StoreError as exc:
                if attempt == BUSY_RETRIES or not _is_busy(exc):
                    raise
                log.warning("%s: busy, retrying %d blocks", self.path, len(batch))
        raise AssertionError("unreachable")

    def _report(self, batch: list[BlockRow], flags: list[bool]) -> None:
        for row, new in zip(batch, flags):
            if self._on_commit is not None:
                try:
                    self._on_commit(row, new)
                except Exception:
                    log.exception("run %d: on_commit failed for block %d", row.run_id, row.lo)
        with self._cond:
            self._queued_bytes -= sum(_payload_size(row) for row in batch)
            self._done_count += len(batch)
            self._cond.notify_all()
