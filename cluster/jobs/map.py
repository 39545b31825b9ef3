"""The map job (``fab map``): a user's command or Python function over items, on the job interface.

Hosts run client/mapper.py's ``run`` on a block of items (its docstring has the task and
result formats). Here, on the coordinator:

- the run's identity and its pending items (cluster/mapinput.py, cluster/mapstore.py): the
  items already final in the store are skipped, the others are cut into blocks by
  cluster/mapschedule.py, sized from each host's measured rate like any job's blocks;
- ``prepare_host``: the shipped files uploaded once per host (content-addressed) and a
  --function imported there once; a host where it fails is left out with the reason
  (cluster/mapship.py);
- ``check`` (the host's reader thread): every field of every item result checked
  (cluster/mapexport.py ``parse_item_result`` for commands, a columnar loop for functions,
  the hot path of a million tiny calls); returned files written into --outdir (a temporary
  name renamed into place, first copy wins);
- ``decide``: final items (ok, or failed with no retry left) become ``map_items`` rows and
  earlier attempts ``map_attempts`` rows, stored with the block in its transaction (``rows``);
  items to retry go out again as a new block, elsewhere when another host is up;
- ``failure``: a worker that died splits its block until the item that killed it is alone;
  an item that killed its worker MAX_CRASHES times is committed as ``crashed``.

docs/ARCHITECTURE.md ("The job interface") describes the hooks.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import re
import secrets
import statistics
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from client import mapper
from cluster import mapship, mapstore
from cluster.errors import BeowulfError
from cluster.jobs.base import COMMIT, GIVE_BACK, KIND_DIED, RETRY, Decision, Job
from cluster.mapexport import ResultError, parse_item_result
from cluster.mapinput import MapInput, RangeInput, run_identity, value_bytes
from cluster.mapschedule import MAX_CRASHES, MapBlock, MapSchedule

# Items in one block at most: a function's results (~100 bytes of JSON an item, several
# times that once parsed) and a command's (up to its caps) stay a few MB per task.
MAX_FUNCTION_BLOCK = 20_000
MAX_COMMAND_BLOCK = 1_000
# First (probe) block on a host: its rate sizes the next ones (README.md, "fab map").
FIRST_FUNCTION_BLOCK = 64
FIRST_COMMAND_BLOCK = 1
# --files data in one task at most (base64 adds a third on the wire).
MAX_TASK_FILE_BYTES = 32 << 20
# Without --timeout a block is never overdue before this (an item may take hours: a render);
# stragglers are the endgame duplicates' business.
NO_TIMEOUT_FLOOR = 3600.0
# Samples of item seconds kept for --timeout N% (per host and overall).
TIMEOUT_SAMPLES = 1000
# A percentage timeout applies once this many items of the run (or of the host) are timed.
TIMEOUT_MIN_SAMPLES = 3
# Highest worker slot ({%}) a host may name.
MAX_SLOT = 65536


class InvalidMapResult(BeowulfError):
    """A host's map result breaks the protocol (the block is redone elsewhere)."""


@dataclass
class MapSpec:
    """What a map run does (flags of ``fab map``; tasks/map.py checks them)."""

    mode: str  # "command" | "function"
    command: str = ""  # the template (command mode)
    function: str = ""  # MODULE:FUNC as the user gave it (function mode)
    returns: tuple = ()
    retries: int = 2
    timeout: Optional[float] = None  # seconds
    timeout_percent: Optional[float] = None  # of the median item time
    stdout_cap: int = mapper.DEFAULT_STDOUT_CAP
    stderr_tail: int = mapper.DEFAULT_STDERR_TAIL
    requirements: Optional[object] = None  # cluster/requirements.py Requirements (--requirements)
    duplicates: bool = True
    retry_failed: bool = False
    outdir: str = "results"
    parts: list = field(default_factory=list)
    return_parts: list = field(default_factory=list)


class MapJob(Job):
    """Run a command or a function over every item of the input, exactly once (see module docstring)."""

    name = "map"
    migrations = mapstore.MIGRATIONS
    unit = ("item", "items")

    def __init__(self, spec: MapSpec, map_input: MapInput, shipment=None):
        self.spec = spec
        self.input = map_input
        self.shipment = shipment
        self.total = len(map_input)
        self.start, self.end = 1, self.total
        self.range = map_input if isinstance(map_input, RangeInput) else None
        shipped = (shipment.digest if shipment else "") + (f" reqs {spec.requirements.digest}"
                                                           if spec.requirements else "")
        self.identity = run_identity(spec.mode, spec.command if spec.mode == "command" else spec.function,
                                     map_input.form, shipped or None, spec.returns)
        self.wheels = None  # cluster/wheels.py RequirementWheels, made when a host needs one
        self.reqs: dict = {}  # host name -> its --requirements folder (WORKDIR/reqs/HEX)
        self.run_hex = self.identity[:32]
        if spec.mode == "command":
            self.parts = spec.parts or mapper.parse_template(spec.command)
            self.return_parts = spec.return_parts or [mapper.parse_template(p) for p in spec.returns]
        else:
            self.parts, self.return_parts = [], []
        self.schedule: Optional[MapSchedule] = None
        self.prior: dict = {}  # key -> (highest attempt, failures, crashes) from earlier sessions
        self.keys: dict = {}  # seq -> key, for items whose key is needed again (retries, crashes)
        self.reset = 0
        self.samples: deque = deque(maxlen=TIMEOUT_SAMPLES)
        self.host_samples: dict = {}
        self.returned_files = 0

    # ------------------------------------------------------------ identity and shape

    def params(self) -> dict:
        """The run's identity (README.md, "fab map": the command or function, the shipped
        files' content, the --return patterns and the input form; not the items, not the hosts)."""
        shown = self.spec.command if self.spec.mode == "command" else self.spec.function
        return {"identity": self.identity, "mode": self.spec.mode, "spec": shown, "input": self.input.kind}

    def bind(self, run_id: int, store) -> None:
        super().bind(run_id, store)
        path = getattr(store, "path", None)
        if path is None:
            return
        mapstore.ensure_tables(path)
        if self.spec.retry_failed:
            self.reset = mapstore.reset_failed(path, run_id)

    def min_block(self) -> int:
        return 1

    def first_block(self) -> int:
        first = FIRST_FUNCTION_BLOCK if self.spec.mode == "function" else FIRST_COMMAND_BLOCK
        return max(1, min(first, self.total))

    def max_block(self) -> int:
        return MAX_FUNCTION_BLOCK if self.spec.mode == "function" else MAX_COMMAND_BLOCK

    def make_schedule(self, done: list, min_block: int = 1) -> MapSchedule:
        """The items not final in the store, in input order; block numbers past every one used."""
        conn = mapstore.connect(self.store.path)
        try:
            base = max([hi for _, hi in done] + [mapstore.max_block(conn, self.run_id)]) + 1
            self.prior = mapstore.prior_attempts(conn, self.run_id)
            if self.spec.retry_failed:  # fresh retries; the attempt numbers go on
                self.prior = {key: (top, 0, 0) for key, (top, _, _) in self.prior.items()}
            if self.range is not None:
                ranges = mapstore.done_seq_ranges(conn, self.run_id)
                pending = _range_gaps(self.total, ranges)
                left = sum(hi - lo + 1 for lo, hi in pending)
            else:
                prefixes = mapstore.done_key_prefixes(conn, self.run_id)
                left = sum(1 for item in self.input if mapstore.key_prefix(item.key) not in prefixes)
                pending = ((item.seq, item) for item in self.input
                           if mapstore.key_prefix(item.key) not in prefixes)
        finally:
            conn.close()
        weight = _file_weight if self.input.kind == "files" else None
        self.schedule = MapSchedule(pending, max(0, left), base, min_block=1, duplicates=self.spec.duplicates,
                                    weight=weight, max_task_bytes=MAX_TASK_FILE_BYTES)
        return self.schedule

    def task_floor(self) -> Optional[float]:
        if self.spec.timeout:
            return 2 * self.spec.timeout + 30.0
        return NO_TIMEOUT_FLOOR

    # ------------------------------------------------------------ per host

    def prepare_host(self, transport) -> None:
        """Ship the files once (content-addressed) and import a --function there once: a
        host where that fails is left out with the reason."""
        workdir = mapship.host_workdir_path(transport)
        reqs = None
        if self.spec.requirements:
            if self.wheels is None:
                from cluster.wheels import RequirementWheels

                self.wheels = RequirementWheels()
            reqs, _ = mapship.install_requirements(transport, workdir, self.spec.requirements, self.wheels)
        self.reqs[transport.host.name] = reqs
        if self.shipment is not None:
            mapship.upload(transport, workdir, self.shipment)
            if self.spec.mode == "function":
                mapship.import_check(transport, workdir, self.shipment, reqs)

    def engine_of(self, hello: dict) -> str:
        return "function" if self.spec.mode == "function" else "sh"

    def key_of(self, seq: int, item):
        """An item's key: its content key, or for --range its value (an integer)."""
        if item is not None:
            return item.key
        return self.range.start + (seq - 1) * self.range.step

    def value_of(self, seq: int, item):
        if item is not None:
            return item.value
        return self.range.start + (seq - 1) * self.range.step

    def _timeout_for(self, host: str) -> Optional[float]:
        if self.spec.timeout:
            return self.spec.timeout
        if not self.spec.timeout_percent:
            return None
        samples = self.host_samples.get(host)
        if not samples or len(samples) < TIMEOUT_MIN_SAMPLES:
            samples = self.samples
        if len(samples) < TIMEOUT_MIN_SAMPLES:
            return None
        return min(mapper.MAX_TIMEOUT, max(0.05, statistics.median(samples) * self.spec.timeout_percent / 100))

    def task_args_for(self, block, link, task_id: int) -> dict:
        spec = self.spec
        args = {"run": self.run_hex, "mode": spec.mode, "timeout": self._timeout_for(link.name),
                "stdout_cap": spec.stdout_cap}
        if self.shipment is not None:
            args["ship"] = self.shipment.digest
        if self.reqs.get(link.name):
            args["reqs"] = self.reqs[link.name]
        if spec.mode == "function":
            args["function"] = self.shipment.function
            # Answers in columns compressed by the host (client/mapper.py run_function_packed); a
            # host with an older client/mapper.py answers in plain columns (run_function_columns).
            args["columns"] = True
            args["pack"] = mapper.PACK
        else:
            args.update(command=spec.command, stderr_tail=spec.stderr_tail, **{"return": list(spec.returns)})
        if block.verdict:
            args["items"] = []
            return args
        if block.items is None:  # --range: the host makes the items
            start, step = self.range.start, self.range.step
            seqs = block.seqs
            if _consecutive(seqs):
                args["range"] = [seqs[0], len(seqs), start + (seqs[0] - 1) * step, step]
            else:
                args["items"] = [{"seq": seq, "value": start + (seq - 1) * step} for seq in seqs]
        elif self.input.kind == "files":
            args["items"] = [item.task_item(_file_data(item.path)) for item in block.items]
        else:
            args["items"] = [item.task_item() for item in block.items]
        return args

    # ------------------------------------------------------------ results

    def check(self, lo: int, hi: int, result: dict) -> tuple:
        """Every item result checked (runs in the host's reader thread); (items ok, None).
        The checked items are kept on the result (``_map``) for ``decide``; the raw ones dropped."""
        block = self.schedule.in_flight.get(lo) if self.schedule is not None else None
        if block is None:
            raise InvalidMapResult(f"block {lo} is not in flight (a late copy)")
        if not isinstance(result, dict):
            raise InvalidMapResult("result is not an object")
        packed = result.get("pack")
        columns = result.get("columns") if packed is None else result.get("chunk")
        raw_items = result.get("failed") if columns is not None else result.get("items")
        left = result.get("left", [])
        if not isinstance(raw_items, list) or not isinstance(left, list) or \
                (columns is not None and self.spec.mode != "function"):
            raise InvalidMapResult("items (or columns or chunk, and failed) and left must be lists")
        slot = result.get("slot")
        if slot is not None and (type(slot) is not int or not 1 <= slot <= MAX_SLOT):
            raise InvalidMapResult(f"slot must be an integer in [1, {MAX_SLOT}]")
        result["_slot"] = slot
        if block.verdict:
            expected = {}
        elif block.items is None:
            expected = block.seqs if isinstance(block.seqs, range) else set(block.seqs)
        else:
            expected = dict(zip(block.seqs, block.items))
        ok_columns = None
        try:
            if self.spec.mode == "function":
                checked = self._check_function(raw_items, expected)
                if packed is not None:
                    ok_columns = _unpack(result, expected, self.spec.stdout_cap)
                elif columns is not None:
                    ok_columns = _check_columns(columns, expected, self.spec.stdout_cap)
            else:
                checked = self._check_command(raw_items, expected, slot)
        except ResultError as exc:
            raise InvalidMapResult(f"block {lo}: {exc}") from None
        if ok_columns is not None and not checked and not left:
            # The hot path: every item sent answered once, in order (seqs equal to the block's).
            payload = self._chunk_of_columns(block, ok_columns)
            if payload is not None:
                result["_chunk"] = (block.seqs[0], len(block.seqs))
                result["_samples"] = [us / 1e6 for us in ok_columns[3][-50:]]
                result["columns"] = result["chunk"] = None
                return len(block.seqs), payload
        seen = {entry[0] for entry in checked}
        if ok_columns is not None:
            count = len(seen)
            seen.update(ok_columns[0])
            if len(seen) != count + len(ok_columns[0]):
                raise InvalidMapResult(f"block {lo}: an item came twice")
            checked = _rows_of_columns(ok_columns) + checked
        for seq in left:
            if type(seq) is not int or seq not in expected or seq in seen:
                raise InvalidMapResult(f"block {lo}: left holds {str(seq)[:20]!r}, not an item sent and not run")
            seen.add(seq)
        if len(seen) != len(expected):
            raise InvalidMapResult(f"block {lo}: {len(expected) - len(seen)} items sent got no answer")
        result["_map"] = (checked, list(left))
        result["items"] = None  # the checked copy is what is kept
        result["columns"] = result["chunk"] = None
        return sum(1 for entry in checked if entry[1] == "ok"), None

    def _chunk_of_columns(self, block, columns: tuple) -> Optional[bytes]:
        """The payload of a block of a function over --range whose items all succeeded at their
        first try (cluster/mapstore.py map_chunks), or None when it is not such a block."""
        seqs = block.seqs
        if block.items is not None or block.verdict or self.prior or not _consecutive(seqs):
            return None
        attempts = self.schedule.attempts
        if attempts and any(seq in attempts for seq in seqs):
            return None
        got, t0, start_us, us, values, values_json, raw = columns
        if len(got) != len(seqs) or got[0] != seqs[0] or got[-1] != seqs[-1] or \
                not (isinstance(got, range) or got == list(range(seqs[0], seqs[-1] + 1))):
            return None  # not in order: stored item by item
        if raw is not None:  # the host's bytes, checked by _unpack: stored as they are
            return raw
        if values_json is None:
            values_json = json.dumps(values, ensure_ascii=False)
        return mapstore.encode_chunk(t0, _starts(start_us, us), us, values_json)

    def _check_function(self, raw_items: list, expected: dict) -> list:
        """(seq, status, exit (0 ok, 1 not), None, b"", False, b"", start, seconds, value JSON, error,
        bytes received, []) per item; the hot path: one pass, no object per item beyond the tuple."""
        checked = []
        seen = set()
        cap = self.spec.stdout_cap
        isfinite = math.isfinite
        for raw in raw_items:
            if type(raw) is not dict:
                raise ResultError("an item result is not an object")
            seq = raw.get("seq")
            if type(seq) is not int or seq not in expected or seq in seen:
                raise ResultError(f"item {str(seq)[:20]} was not sent (or came twice)")
            seen.add(seq)
            start, seconds = raw.get("start"), raw.get("seconds")
            if type(start) not in (int, float) or type(seconds) not in (int, float) or not isfinite(start) \
                    or not isfinite(seconds) or not 0 <= start <= 1e11 or not 0 <= seconds <= 1e8:
                raise ResultError(f"item {seq}: start or seconds out of range")
            error = raw.get("error")
            timed_out = raw.get("timed_out")
            if error is not None and type(error) is not str or timed_out not in (None, True, False):
                raise ResultError(f"item {seq}: error or timed_out of the wrong type")
            if error is None and not timed_out:
                value = raw.get("value")
                kind = type(value)
                text = str(value) if kind is int else json.dumps(value, allow_nan=False, ensure_ascii=False)
                if len(text) > cap:
                    raise ResultError(f"item {seq}: value over {cap} bytes of JSON")
                checked.append((seq, "ok", 0, None, b"", False, b"", start, seconds, text, None, len(text), []))
            else:
                error = (error or "timed out")[-mapper.MAX_TRACEBACK_CHARS:]
                checked.append((seq, "timeout" if timed_out else "failed", 1, None, b"", False, b"", start,
                                seconds, None, error, 0, []))
        return checked

    def _check_command(self, raw_items: list, expected, slot: Optional[int] = None) -> list:
        if not isinstance(expected, dict):
            expected = dict.fromkeys(expected)
        values = {seq: self.value_of(seq, item) for seq, item in expected.items()}
        checked = []
        seen = set()
        for raw in raw_items:
            record, files = parse_item_result(raw, values, "", "command", returns=len(self.spec.returns),
                                              stdout_cap=self.spec.stdout_cap, stderr_tail=self.spec.stderr_tail)
            if record.seq in seen:
                raise ResultError(f"item {record.seq} came twice")
            seen.add(record.seq)
            stored = []
            if record.status == "ok":
                item = expected[record.seq]
                for parts, returned in zip(self.return_parts, files):
                    stored.append(self._keep_file(parts, record.seq, item, returned.data, slot))
            checked.append((record.seq, record.status, record.exitval, record.signal, record.stdout,
                            record.truncated, record.stderr, record.start, record.runtime, None,
                            record.error or None, record.receive, stored))
        return checked

    def _keep_file(self, parts: list, seq: int, item, data: bytes, slot: Optional[int] = None) -> str:
        """Write a returned file into --outdir under the pattern rendered with the local item (and
        the slot it ran in, ``{%}``): a temporary name, then linked into place unless a first copy
        is there already."""
        local = mapper.render(parts, self.value_of(seq, item), seq, slot or 1,
                              item.columns if item is not None and item.path is None else None, quote=False)
        path = os.path.join(self.spec.outdir, safe_relative(local))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{PARTIAL_MARK}{secrets.token_hex(4)}")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, path)  # fails if a first copy is there: that one wins
                self.returned_files += 1
            except FileExistsError:
                pass
        finally:
            try:
                os.unlink(temp)
            except OSError:
                pass
        return path

    def _attempt_base(self, key: str) -> tuple:
        return self.prior.get(key, (0, 0, 0))

    def decide(self, block, result: dict, host: str) -> Decision:
        """Final items become rows of the block; items with a retry left go out again."""
        schedule = self.schedule
        checked, left = result.get("_map") or ([], [])
        if self.spec.timeout_percent is not None:
            own = self.host_samples.setdefault(host, deque(maxlen=TIMEOUT_SAMPLES))
            for entry in checked:
                if entry[1] == "ok":
                    self.samples.append(entry[8])
                    own.append(entry[8])
        chunk = result.get("_chunk")
        if chunk is not None:  # the hot path: every item ok at its first try, stored as the payload
            if self.spec.timeout_percent is not None:
                self.samples.extend(result.get("_samples") or ())
                self.host_samples.setdefault(host, deque(maxlen=TIMEOUT_SAMPLES)).extend(
                    result.get("_samples") or ())
            block.final = chunk[1]
            result["_rows"] = ([(chunk[0], chunk[1], host, result.get("_slot"))], [], [])
            return Decision(COMMIT)
        items = dict(zip(block.seqs, block.items)) if block.items is not None else None
        finals, attempts_rows, again = [], [], []
        retries = self.spec.retries
        slot = result.get("_slot")
        if block.verdict:
            for seq in block.seqs:
                finals.append(self._crashed_row(block, seq, items.get(seq) if items else None))
        for entry in checked:
            seq, status = entry[0], entry[1]
            item = items[seq] if items is not None else None
            if status == "ok":
                finals.append(self._row(seq, item, entry, host, slot))
                continue
            key = self.key_of(seq, item)
            _, failures, _ = self._attempt_base(key)
            if failures + schedule.failures.get(seq, 0) < retries:
                attempts_rows.append(self._row(seq, item, entry, host, slot, attempt_row=True))
                schedule.attempts[seq] = schedule.attempts.get(seq, 0) + 1
                schedule.failures[seq] = schedule.failures.get(seq, 0) + 1
                again.append((seq, item))
            else:
                finals.append(self._row(seq, item, entry, host, slot))
        if again:
            schedule.requeue([seq for seq, _ in again], [item for _, item in again] if items is not None else None,
                             avoid=host)
        if left:
            schedule.requeue(left, [items[seq] for seq in left] if items is not None else None)
        block.final = len(finals)
        result["_rows"] = ([], finals, attempts_rows)
        return Decision(COMMIT)

    def _row(self, seq: int, item, entry: tuple, host: str, slot: Optional[int], attempt_row: bool = False) -> tuple:
        (_, status, exitval, signal, stdout, truncated, stderr, start, seconds, value, error, receive,
         files) = entry
        key = self.key_of(seq, item)
        attempt = self._attempt_base(key)[0] + self.schedule.attempts.get(seq, 0) + 1
        raw = None if item is None else value_bytes(item.value)
        send = os.path.getsize(item.path) if item is not None and item.path and os.path.exists(item.path) else 0
        if attempt_row:
            return (key, seq, raw, status, exitval, signal, stderr, host, start, seconds, attempt, error, send,
                    receive, slot)
        return (key, seq, raw, status, exitval, signal, stdout, int(bool(truncated)), stderr, host, start,
                seconds, attempt, value, error, send, receive, slot)

    def _crashed_row(self, block, seq: int, item) -> tuple:
        key = self.key_of(seq, item)
        host, start, seconds, error = getattr(block, "crash", ("", time.time(), 0.0, "worker died"))
        attempt = self._attempt_base(key)[0] + self.schedule.attempts.get(seq, 0)
        raw = None if item is None else value_bytes(item.value)
        return (key, seq, raw, "crashed", None, None, None, 0, None, host, start, seconds, attempt, None,
                f"killed its worker {MAX_CRASHES} times; last: {error}", 0, 0, None)

    def failure(self, block, kind: str, message: str, host: str) -> Decision:
        """A worker that died: its block is split until the culprit is alone; that item's deaths
        are attempts (recorded now), and after MAX_CRASHES it is committed as crashed."""
        if kind != KIND_DIED or not isinstance(block, MapBlock) or block.verdict:
            return Decision(GIVE_BACK)
        if len(block.seqs) > 1:
            block.split_on_death = True
            return Decision(RETRY)
        seq = block.seqs[0]
        item = block.items[0] if block.items is not None else None
        key = self.key_of(seq, item)
        started = block.copies.get(host, (0, time.monotonic(), 0))[1] if hasattr(block, "copies") else None
        seconds = max(0.0, time.monotonic() - started) if started is not None else 0.0
        now = time.time()
        if self.schedule.crashed(block, before=self._attempt_base(key)[2]):
            block.crash = (host, now - seconds, seconds, message)
            return Decision(RETRY, avoid=True)
        attempt = self._attempt_base(key)[0] + self.schedule.attempts.get(seq, 0)
        row = dict(zip(mapstore.ATTEMPT_COLUMNS, (key, seq, None if item is None else value_bytes(item.value),
                                                   "crashed", None, None, None, host, now - seconds, seconds,
                                                   attempt, message, 0, 0, None)))
        return Decision(RETRY, avoid=True, record=(("map_attempts", row),))

    def block_meta(self, result: dict) -> dict:
        return {}

    # ------------------------------------------------------------ presentation (stats, report)

    @classmethod
    def found_label(cls) -> str:
        return "ok"

    @classmethod
    def describe_run(cls, run: dict) -> str:
        params = run.get("params") or {}
        return f" of a {params.get('mode', '')} {str(params.get('spec', ''))[:60]!r} over --{params.get('input', '')}"

    @classmethod
    def item_counts(cls, store, run_id: int) -> dict:
        """Per host, its items' failed attempts (failures) and those of them tried again (retries)."""
        if not store.has_table("map_items"):
            return {}
        counts: dict = {}
        for sql, names in (("SELECT host, count(*) AS n FROM map_attempts WHERE run_id = ? GROUP BY host",
                            ("retries", "failures")),
                           ("SELECT host, count(*) AS n FROM map_items WHERE run_id = ? AND status <> 'ok'"
                            " GROUP BY host", ("failures",))):
            for row in store.query(sql, (run_id,)):
                host = counts.setdefault(row["host"], {"retries": 0, "failures": 0})
                for name in names:
                    host[name] += row["n"]
        return counts

    def retry_line(self, block, delay: float, why: str) -> str:
        """Not on the console: a worker's death is in the run's summary (tasks/map.py), by item."""
        return ""

    @classmethod
    def recent_items(cls, store, run_id: int, limit: int) -> list:
        """The run's latest final items (seq, status, host, seconds) for the dashboard."""
        if not store.has_table("map_items"):
            return []
        return store.query("SELECT seq, status, host, seconds, error FROM map_items WHERE run_id = ?"
                           " ORDER BY rowid DESC LIMIT ?", (run_id, limit))

    def rows(self, block, result: dict, host: str) -> list:
        """The block's final items (map_items) and earlier attempts (map_attempts), stored in
        the block's transaction."""
        chunks, finals, attempts_rows = result.pop("_rows", ([], [], []))
        rows = []
        if chunks:
            rows.append(("map_chunks", mapstore.CHUNK_COLUMNS, chunks))
        if finals:  # columnar (cluster/store.py _insert_many): one statement for the block's items
            rows.append(("map_items", mapstore.ITEM_COLUMNS, finals))
        if attempts_rows:
            rows.append(("map_attempts", mapstore.ATTEMPT_COLUMNS, attempts_rows))
        return rows


PARTIAL_MARK = ".beowulf-part-"


def safe_relative(path: str) -> str:
    """A returned file's local name, inside --outdir: no leading /, no .. (each becomes _)."""
    parts = [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]
    parts = ["_" if part == ".." else part for part in parts]
    return os.path.join(*parts) if parts else "_"


def _range_gaps(total: int, done: list) -> list:
    """The [lo, hi] runs of seqs 1..total not covered by the sorted, merged ``done`` ranges."""
    gaps, cursor = [], 1
    for lo, hi in done:
        if lo > cursor:
            gaps.append([cursor, min(lo - 1, total)])
        cursor = max(cursor, hi + 1)
        if cursor > total:
            break
    if cursor <= total:
        gaps.append([cursor, total])
    return [gap for gap in gaps if gap[0] <= gap[1]]


def _ints(values, low: int, high: int, what: str) -> None:
    if not set(map(type, values)) <= _INT or (values and (min(values) < low or max(values) > high)):
        raise ResultError(f"columns: {what} must be integers in [{low}, {high}]")


def _check_columns(columns, expected, cap: int) -> tuple:
    """(seqs, t0, start_us, us, values, values as a JSON array) of a columnar function result
    (client/mapper.py run_function_columns), every column checked; ResultError otherwise."""
    if not isinstance(columns, dict):
        raise ResultError("columns is not an object")
    seqs, start_us, us, values = (columns.get(name) for name in ("seq", "start_us", "us", "value"))
    t0 = columns.get("t0")
    if not all(isinstance(column, list) for column in (seqs, start_us, us, values)) or \
            not len(seqs) == len(start_us) == len(us) == len(values):
        raise ResultError("columns must be lists of one length")
    if type(t0) not in (int, float) or not math.isfinite(t0) or not 0 <= t0 <= 1e11:
        raise ResultError("columns: t0 out of range")
    _ints(start_us, 0, 10**14, "start_us")
    _ints(us, 0, 10**14, "us")
    if isinstance(expected, range) and expected.step == 1:
        _ints(seqs, expected.start, expected.stop - 1, "seq")
    elif not all(type(seq) is int and seq in expected for seq in seqs):
        raise ResultError("columns: an item that was not sent")
    try:
        values_json = json.dumps(values, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ResultError(f"columns: values are not JSON ({exc})") from None
    if len(values_json) > cap:  # the cap is per item: check them one by one
        for value in values:
            if len(json.dumps(value, ensure_ascii=False)) > cap:
                raise ResultError(f"columns: a value over {cap} bytes of JSON")
    return seqs, t0, start_us, us, values, values_json, None


# A packed chunk (client/mapper.py run_function_packed) decompresses to this at most: the
# host stops adding items at RESULT_BUDGET_BYTES (its count is an estimate, hence the margin).
MAX_CHUNK_BYTES = 2 * mapper.RESULT_BUDGET_BYTES
_CHUNK_KEYS = {"t0", "seq0", "seq", "us", "start_us", "value"}
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most MAX_CHUNK_BYTES; ResultError on garbage, a bomb or trailing bytes."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_CHUNK_BYTES + 1)
        if inflater.unconsumed_tail or len(raw) > MAX_CHUNK_BYTES:
            raise ResultError(f"chunk: decompresses to more than {MAX_CHUNK_BYTES} bytes")
        raw += inflater.flush()
        if not inflater.eof or inflater.unused_data:
            raise ResultError("chunk: a truncated zlib stream, or bytes after its end")
    except zlib.error as exc:
        raise ResultError(f"chunk: not a zlib stream ({exc})") from None
    return raw


def _unpack(result: dict, expected, cap: int) -> tuple:
    """(seqs, t0, start_us or None, us, values, None, the host's zlib bytes or None) of a packed
    function result (client/mapper.py run_function_packed), every field checked, ResultError
    otherwise. The host's bytes are returned only when they can be stored as they are (they
    hold exactly the checked columns); a value with a lone surrogate is stored as text
    (U+FFFD), as cluster/agents.py does for every other string, so the bytes are not."""
    count, encoded = result.get("count"), result.get("chunk")
    if result.get("pack") != mapper.PACK or type(count) is not int or not 0 <= count <= mapper.MAX_RANGE_ITEMS \
            or type(encoded) is not str:
        raise ResultError("chunk: pack, count or chunk of the wrong type")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ResultError("chunk: not base64") from None
    try:
        text = _inflate(data).decode("utf-8")
        chunk = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ResultError(f"chunk: not UTF-8 JSON ({str(exc)[:80]})") from None
    if type(chunk) is not dict or not chunk.keys() <= _CHUNK_KEYS or ("seq0" in chunk) == ("seq" in chunk):
        raise ResultError("chunk: not an object of t0, seq0 or seq, us, start_us, value")
    t0, us, start_us, values = chunk.get("t0"), chunk.get("us"), chunk.get("start_us"), chunk.get("value")
    if type(t0) not in (int, float) or not 0 <= t0 <= 1e11:
        raise ResultError("chunk: t0 out of range")
    if type(us) is not list or type(values) is not list or len(us) != count or len(values) != count or \
            (start_us is not None and (type(start_us) is not list or len(start_us) != count)):
        raise ResultError(f"chunk: us, start_us and value must be lists of {count}")
    _ints(us, 0, 10**14, "us")
    if start_us is not None:
        _ints(start_us, 0, 10**14, "start_us")
    elif sum(us) > 10**14:
        raise ResultError("chunk: us out of range")
    if "seq0" in chunk:
        first = chunk["seq0"]
        if type(first) is not int:
            raise ResultError("chunk: seq0 must be an integer")
        seqs = range(first, first + count)
        if count and isinstance(expected, range) and expected.step == 1:
            if first < expected.start or first + count > expected.stop:
                raise ResultError("chunk: an item that was not sent")
        elif not all(seq in expected for seq in seqs):
            raise ResultError("chunk: an item that was not sent")
    else:
        seqs = chunk["seq"]
        if type(seqs) is not list or len(seqs) != count:
            raise ResultError(f"chunk: seq must be a list of {count}")
        if not all(type(seq) is int and seq in expected for seq in seqs):
            raise ResultError("chunk: an item that was not sent")
    if len(text) > cap:  # the cap is per item: check the values that can be long one by one
        for value in values:
            if type(value) not in _SHORT and len(json.dumps(value, ensure_ascii=False)) > cap:
                raise ResultError(f"chunk: a value over {cap} bytes of JSON")
    if _SURROGATE.search(text):
        from cluster.agents import _text_only

        return seqs, t0, start_us, us, _text_only(values), None, None
    return seqs, t0, start_us, us, values, None, data


_SHORT = (int, float, bool, type(None))
_INT = {int}


def _starts(start_us, us: list) -> list:
    """The items' start_us: as given, or (a chunk without them) the running sum of ``us`` from 0."""
    if start_us is not None:
        return start_us
    return [0] + list(itertools.accumulate(us[:-1])) if us else []


def _rows_of_columns(columns: tuple) -> list:
    """The checked tuples (as MapJob._check_function makes them) of a columnar result's items."""
    seqs, t0, start_us, us, values = columns[:5]
    start_us = _starts(start_us, us)
    rows = []
    for seq, start, took, value in zip(seqs, start_us, us, values):
        text = json.dumps(value, ensure_ascii=False)
        rows.append((seq, "ok", 0, None, b"", False, b"", t0 + start / 1e6, took / 1e6, text, None, len(text), []))
    return rows


def _consecutive(seqs) -> bool:
    """Whether ``seqs`` are n, n+1, n+2, ... (a task then carries them as a range)."""
    if not seqs:
        return False
    if isinstance(seqs, range):
        return seqs.step == 1
    return seqs[-1] - seqs[0] + 1 == len(seqs) and all(b == a + 1 for a, b in zip(seqs, seqs[1:]))


def _file_weight(item) -> int:
    try:
        return os.path.getsize(item.path)
    except OSError:
        return 0


def _file_data(path: str) -> str:
    import base64

    try:
        with open(path, "rb") as handle:
            data = handle.read(mapper.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise BeowulfError(f"--files {path}: {exc.strerror or exc}") from None
    return base64.b64encode(data).decode("ascii")
