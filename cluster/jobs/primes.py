"""The primes job, coordinator side: cut the range, check results, store and export them.

A block is a range of numbers [lo, hi], both inclusive. The host runs
``client/primes.py``'s ``run({"lo", "hi", "mode"})`` and answers with a dict
(see that module): count, first, last and, in list mode, the checksum (sum of
the primes mod 2**64) and the primes encoded as ``ENCODING``: the first prime's
offset from ``lo``, then the gaps between successive primes, each an unsigned
LEB128 varint, zlib-compressed, then base64. In count mode it sends the counts
of the block's parts (``count_parts``) instead of a checksum and the primes.

The store keeps a block's payload as the raw zlib bytes (base64-decoded, not
re-encoded) beside the block's ``lo``: ``payload_to_array(lo, payload)`` gives
the primes back and ``write_text`` streams many blocks to a text file.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import math
import os
import random
import zlib
from typing import BinaryIO, Iterable, Optional, TextIO, Tuple, Union

import numpy as np

from cluster.errors import BeowulfError, UsageError
from cluster.jobs.base import Job
from cluster.scheduler import MIN_BLOCK

ENCODING = "gapvarint-zlib-b64"
MAX_END = 10**15
MASK64 = (1 << 64) - 1
# Cap on primes per list-mode block: with ~0.53-0.70 compressed bytes a prime
# (measured, 1e7..1e15), base64 and JSON, one result stays under ~4 MB.
MAX_PRIMES_PER_BLOCK = 4_000_000
# Cap on a count-mode block's width (its result is a few numbers; the client
# sieves in bounded chunks, so this only bounds a block's run time).
MAX_COUNT_BLOCK = 10**10
# A count-mode block is cut into parts (client/primes.py part_bounds) whose counts
# the host returns; the coordinator recounts one part, picked at random after the
# result arrived (SECURITY.md "Count-only results"). At most COUNT_PARTS parts, each
# at least MIN_COUNT_PART wide: a part is one call of the counting kernel, and
# libprimesieve spends ~1 ms setting up each call (measured; BENCHMARKS.md).
COUNT_PARTS = 32
MIN_COUNT_PART = 1 << 26
# Width of the first (probe) block given to a host.
FIRST_BLOCK = 200_000
# Primes spot-checked with Miller-Rabin per block (besides first and last);
# results with at most SPOT_ALL primes are checked in full.
SPOT_PRIMES = 8
SPOT_ALL = 64
# Gaps whose odd numbers are all checked composite (and numbers checked before
# the first / after the last prime).
SPOT_GAPS = 4
# Primes in one random run checked for small factors (a sieve that skipped a
# small prime leaves its multiples everywhere).
SPOT_RUN = 4096
SMALL_FACTORS = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
# Blocks at most this wide are checked in full with Miller-Rabin (both modes).
FULL_CHECK_WIDTH = 2000
# Deterministic Miller-Rabin with these bases is correct for every n < 3.3e24.
MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
# Primes formatted and written at a time by write_text (bounds its memory).
TEXT_CHUNK = 1 << 18
# Longest engine name accepted in a result (it is stored with every block).
MAX_ENGINE_CHARS = 64
# Longest varint accepted: 8 bytes hold 56 bits, more than any offset below 10**15.
MAX_VARINT_BYTES = 8


class InvalidResult(BeowulfError):
    """A host's result failed validation; ``reason`` says how. The block is redone elsewhere."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- arithmetic


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: exact for every n < 3.3e24 (bases 2..41)."""
    if n < 2:
        return False
    for p in MR_BASES:
        if n % p == 0:
            return n == p
    d = n - 1
    s = 0
    while not d & 1:
        d >>= 1
        s += 1
    for a in MR_BASES:
        x = pow(a, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _li(x: float) -> float:
    """Logarithmic integral li(x) for x > 1 (Ramanujan's series)."""
    if x <= 1.0:
        return float("-inf") if x == 1.0 else 0.0
    lnx = math.log(x)
    total = 0.0
    term = 1.0  # (ln x)^n / (n! 2^(n-1))
    inner = 0.0  # sum_{k=0}^{floor((n-1)/2)} 1/(2k+1)
    for n in range(1, 400):
        term *= lnx / n / (2.0 if n > 1 else 1.0)
        if (n - 1) % 2 == 0:
            inner += 1.0 / n
        sign = -1.0 if n % 2 == 0 else 1.0
        piece = sign * term * inner
        total += piece
        if abs(piece) < 1e-17 * abs(total) and n > 2 * lnx:
            break
    return 0.5772156649015329 + math.log(lnx) + math.sqrt(x) * total


def estimate_count(lo: int, hi: int) -> int:
    """Upper-bound estimate of the number of primes p with lo <= p <= hi.

    li(hi + 1) - li(lo), raised by 1% plus a few; never more than the width nor
    than Montgomery-Vaughan's bound 2W/ln W (+2), which holds for every interval.
    """
    if hi < 2 or hi < lo:
        return 0
    lo = max(lo, 2)
    width = hi - lo + 1
    guess = _li(hi + 1.0) - _li(float(lo)) if lo > 2 else _li(hi + 1.0) - _li(2.0) + 1.0
    guess = int(guess * 1.01) + 4
    return max(0, min(width, guess, _count_bound(width)))


def _count_bound(width: int) -> int:
    """Rigorous cap on the primes in any interval of ``width`` integers (Montgomery-Vaughan)."""
    if width <= 1:
        return max(width, 0)
    return int(2.0 * width / math.log(width)) + 2


def _bytes_per_prime(x: float) -> float:
    """Compressed payload bytes a prime near x, with ~15% headroom (measured: 0.53 at 1e7,
    0.59 at 1e9, 0.70 at 1e15)."""
    return 0.5 + 0.01 * math.log(max(x, 3.0))


def estimate_bytes(lo: int, hi: int, mode: str = "list") -> int:
    """Expected bytes the store needs for the block or run [lo, hi] (an over-estimate).

    List mode: the compressed payloads plus a row overhead per ~10**7 numbers.
    Count mode: a row per block only.
    """
    width = max(0, hi - lo + 1)
    rows = 64 * 1024 + 256 * (width // 10**7 + 1)
    if mode == "count":
        return rows
    return rows + int(estimate_count(lo, hi) * _bytes_per_prime(float(hi)))


# ---------------------------------------------------------------- decoding


def decode_varints(buf: bytes) -> np.ndarray:
    """Unsigned LEB128 varints -> an unsigned integer array, vectorised.

    The dtype is the narrowest that fits the encoding (uint8 when every value is
    one byte, uint16 with 2-byte values, else uint64). Raises InvalidResult.
    """
    a = np.frombuffer(buf, dtype=np.uint8)
    if not a.size:
        return np.zeros(0, dtype=np.uint64)
    if a[-1] & 128:
        raise InvalidResult("truncated varint at the end of the data")
    cont = np.flatnonzero(a >= 128)
    if not cont.size:
        return a
    nxt = cont + 1
    if not (a[nxt] >= 128).any():  # only 1- and 2-byte varints: the common case
        v = a.astype(np.uint16)
        v[cont] = (v[cont] & 127) | (v[nxt] << 7)
        return np.delete(v, nxt)
    ends = np.flatnonzero(a < 128)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise InvalidResult(f"a varint longer than {MAX_VARINT_BYTES} bytes")
    pos = np.arange(a.size, dtype=np.int64) - np.repeat(starts, lengths)
    shifted = (a & 127).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(shifted, starts)


def _inflate(payload: bytes, limit: int) -> bytes:
    """zlib-decompress at most ``limit`` bytes; InvalidResult on garbage or a bomb."""
    try:
        d = zlib.decompressobj()
        raw = d.decompress(payload, limit + 1)
        if d.unconsumed_tail or len(raw) > limit:
            raise InvalidResult(f"data decompresses to more than {limit} bytes")
        raw += d.flush()
        if not d.eof:
            raise InvalidResult("zlib stream is truncated")
        if d.unused_data:
            raise InvalidResult("bytes after the end of the zlib stream")
    except zlib.error as err:
        raise InvalidResult(f"data is not a zlib stream: {err}") from None
    return raw


def payload_to_array(lo: int, payload: bytes, limit: Optional[int] = None) -> np.ndarray:
    """The primes (uint64 array) of a stored payload (raw zlib bytes) of a block starting at lo.

    ``limit`` caps the decompressed size (default: far above any real payload's).
    """
    raw = _inflate(payload, limit if limit is not None else 1024 * (len(payload) + 64))
    return _absolute(lo, decode_varints(raw))


def _absolute(lo: int, values: np.ndarray) -> np.ndarray:
    """lo + running sums of the offsets (uint64). Converting first, then summing in
    place, is several times faster than cumsum(dtype=uint64) on a narrow array."""
    primes = values.astype(np.uint64)
    np.cumsum(primes, out=primes)
    primes += np.uint64(lo)
    return primes


def _payload_of(result: dict) -> bytes:
    """The raw zlib bytes of a list-mode result's data field."""
    if result.get("encoding") != ENCODING:
        raise InvalidResult(f"unknown encoding {result.get('encoding')!r}")
    data = result.get("data")
    if not isinstance(data, str):
        raise InvalidResult("data is missing or not a string")
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as err:
        raise InvalidResult(f"data is not base64: {err}") from None


def decode(result: dict, lo: Optional[int] = None) -> np.ndarray:
    """The primes (uint64 array) of a list-mode result dict.

    ``lo`` is the block's start; by default the result's own ``lo`` field.
    Raises InvalidResult on anything that does not decode.
    """
    if not isinstance(result, dict):
        raise InvalidResult("result is not an object")
    if lo is None:
        lo = result.get("lo")
        if not _is_int(lo):
            raise InvalidResult("result has no lo: pass the block's lo")
    count = result.get("count")
    limit = MAX_VARINT_BYTES * (count + 1) if _is_int(count) and count >= 0 else None
    return payload_to_array(lo, _payload_of(result), limit)


# ---------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def count_parts(lo: int, hi: int) -> int:
    """How many parts a count-mode block [lo, hi] is cut into (see COUNT_PARTS)."""
    return max(1, min(COUNT_PARTS, (hi - lo + 1) // MIN_COUNT_PART))


def part_bounds(lo: int, hi: int, parts: int) -> list:
    """The parts (a, b) of [lo, hi], exactly as client/primes.py part_bounds cuts them."""
    width = hi - lo + 1
    return [(lo + i * width // parts, lo + (i + 1) * width // parts - 1) for i in range(parts)]


def _check_fields(lo: int, hi: int, result: dict,
                  mode: str = "list") -> Tuple[int, Optional[int], Optional[int], Optional[int]]:
    """count, checksum (None in count mode), first, last of a result, checked for type
    and plausibility."""
    if not isinstance(result, dict):
        raise InvalidResult("result is not an object")
    for key, want in (("lo", lo), ("hi", hi)):
        if key in result and result[key] != want:
            raise InvalidResult(f"result is for {key}={result[key]!r}, not {want}")
    engine = result.get("engine")
    if engine is not None and not (isinstance(engine, str) and len(engine) <= MAX_ENGINE_CHARS):
        raise InvalidResult(f"engine must be a short name, not {type(engine).__name__} of {len(str(engine))}")
    count, checksum = result.get("count"), result.get("checksum")
    first, last = result.get("first"), result.get("last")
    if mode == "count":
        checksum = None  # counting generates no prime to sum: the parts are checked instead
    elif not _is_int(checksum):
        raise InvalidResult("count and checksum must be integers")
    if not _is_int(count):
        raise InvalidResult("count and checksum must be integers")
    if not 0 <= count <= min(hi - lo + 1, _count_bound(hi - lo + 1)):
        raise InvalidResult(f"count {count} is impossible for [{lo}, {hi}]")
    if checksum is not None and not 0 <= checksum <= MASK64:
        raise InvalidResult("checksum out of range")
    if count == 0:
        if first is not None or last is not None or checksum:
            raise InvalidResult("no primes but first/last/checksum are set")
        return count, checksum, None, None
    if not _is_int(first) or not _is_int(last):
        raise InvalidResult("first and last must be integers")
    if not lo <= first <= last <= hi:
        raise InvalidResult(f"first {first} / last {last} outside [{lo}, {hi}]")
    if count == 1 and (first != last or (checksum is not None and checksum != first & MASK64)):
        raise InvalidResult("one prime but first/last/checksum disagree")
    if count >= 2 and first == last:
        raise InvalidResult(f"{count} primes but first == last")
    if checksum is not None and count * last <= MASK64 and not count * first <= checksum <= count * last:
        raise InvalidResult(f"checksum is not a sum of {count} numbers in [first, last]")
    return count, checksum, first, last


def _check_parts(lo: int, hi: int, result: dict, count: int, first: Optional[int],
                 last: Optional[int], whole: bool = False) -> list:
    """The per-part counts of a count-mode result, checked for shape and against the
    total, first and last; returns [(a, b, count)]. ``whole``: one part (the whole
    block) is also accepted."""
    counts = result.get("counts")
    parts = count_parts(lo, hi)
    if isinstance(counts, list) and len(counts) == 1 and whole:
        parts = 1
    if not isinstance(counts, list) or len(counts) != parts or not all(_is_int(c) for c in counts):
        raise InvalidResult(f"counts must be a list of {parts} integers (one per part of the block)")
    bounds = part_bounds(lo, hi, parts)
    for (a, b), c in zip(bounds, counts):
        if not 0 <= c <= min(b - a + 1, _count_bound(b - a + 1)):
            raise InvalidResult(f"count {c} is impossible for the part [{a}, {b}]")
    if sum(counts) != count:
        raise InvalidResult(f"the parts' counts add up to {sum(counts)}, not {count}")
    if count:
        nonzero = [i for i, c in enumerate(counts) if c]
        a0, b0 = bounds[nonzero[0]]
        a1, b1 = bounds[nonzero[-1]]
        if not (a0 <= first <= b0 and a1 <= last <= b1):
            raise InvalidResult("first/last are not in the first/last part that holds primes")
    return [(a, b, c) for (a, b), c in zip(bounds, counts)]


_recount_rng = random.SystemRandom()


def recount(lo: int, hi: int) -> int:
    """The primes in [lo, hi] counted here, by this machine's best engine of client/primes.py."""
    from client import primes as local_primes

    return int(local_primes.run({"lo": lo, "hi": hi, "mode": "count"})["count"])


def _recount_one_part(parts: list) -> None:
    """Recount one part, picked at random now (the host cannot know which): a host
    that falsified the count of k of n parts is caught with probability k/n."""
    a, b, claimed = parts[_recount_rng.randrange(len(parts))]
    actual = recount(a, b)
    if actual != claimed:
        raise InvalidResult(f"[{a}, {b}] holds {actual} primes; result says {claimed}")


def _spot_check_ends(lo: int, hi: int, first: Optional[int], last: Optional[int], rng) -> None:
    """first/last prime, and a few numbers before first / after last composite."""
    for p in {first, last} - {None}:
        if not is_prime(p):
            raise InvalidResult(f"{p} is not prime")
    spans = [(lo, hi)] if first is None else [(lo, first - 1), (last + 1, hi)]
    for a, b in spans:
        for _ in range(SPOT_GAPS // 2 if first is not None else SPOT_GAPS):
            if a > b:
                break
            n = rng.randint(a, b)
            if is_prime(n):
                raise InvalidResult(f"prime {n} is missing from the result")


def _full_check(lo: int, hi: int, count: int, checksum: Optional[int]) -> list:
    """A tiny block: every number tested; count and checksum (list mode) must match
    exactly. Returns the primes found."""
    found = [n for n in range(lo, hi + 1) if is_prime(n)]
    if len(found) != count or (checksum is not None and sum(found) & MASK64 != checksum):
        raise InvalidResult(f"[{lo}, {hi}] holds {len(found)} primes; result says {count} with checksum {checksum}")
    return found


def _spot_check_list(primes: np.ndarray, values: np.ndarray, rng) -> None:
    """Miller-Rabin on sampled primes, small factors in a sampled run, and every odd
    number inside a few sampled gaps composite."""
    n = int(primes.size)
    picks = range(n) if n <= SPOT_ALL else rng.sample(range(n), SPOT_PRIMES)
    for i in picks:
        p = int(primes[i])
        if not is_prime(p):
            raise InvalidResult(f"{p} is not prime")
    start = rng.randrange(max(1, n - SPOT_RUN + 1))
    run = primes[start : start + SPOT_RUN]
    for q in SMALL_FACTORS:
        bad = (run % np.uint64(q) == 0) & (run != np.uint64(q))
        if bad.any():
            raise InvalidResult(f"{int(run[np.argmax(bad)])} is a multiple of {q}")
    for i in rng.sample(range(n - 1), min(SPOT_GAPS, max(n - 1, 0))):
        p, gap = int(primes[i]), int(values[i + 1])
        for x in range(p + 2 if p > 2 else 3, p + gap, 2):
            if is_prime(x):
                raise InvalidResult(f"prime {x} is missing from the result")


def validate(lo: int, hi: int, result: dict, mode: str = "list", recount_part: bool = True,
             whole: bool = False) -> Tuple[int, Optional[bytes]]:
    """Check a host's result for block [lo, hi]; return (count, payload to store or None).

    Raises InvalidResult with the reason when anything is off: fields, counts
    (never more than any interval can hold), decoding, order, range, checksum,
    parity; then spot checks: Miller-Rabin on first, last and sampled primes,
    small factors in a sampled run of primes, every odd number inside a few
    sampled gaps and a few outside [first, last] composite. Blocks narrower
    than FULL_CHECK_WIDTH are checked number by number, in both modes.
    The payload is the raw zlib bytes of the data field (list mode only).
    A count-mode result has no checksum (counting generates no prime): it
    carries the counts of the block's parts (count_parts), which must add up;
    besides the checks on first and last, one part picked at random is recounted
    here unless ``recount_part`` is False (SECURITY.md "Count-only results").
    ``whole``: a count of the whole block as one part is accepted too (and, when
    recounted, recounted whole).
    """
    if mode not in ("list", "count"):
        raise ValueError("mode must be 'list' or 'count'")
    count, checksum, first, last = _check_fields(lo, hi, result, mode)
    parts = _check_parts(lo, hi, result, count, first, last, whole) if mode == "count" else None
    rng = random.Random((lo * 1_000_003) ^ (checksum or 0) ^ count)
    _spot_check_ends(lo, hi, first, last, rng)
    found = _full_check(lo, hi, count, checksum) if hi - lo < FULL_CHECK_WIDTH else None
    if mode == "count":
        if found is None and recount_part:
            _recount_one_part(parts)
        return count, None
    payload = _payload_of(result)
    values = decode_varints(_inflate(payload, MAX_VARINT_BYTES * (count + 1)))
    if values.size != count:
        raise InvalidResult(f"count says {count}, data holds {values.size} primes")
    if not count:
        return 0, payload
    if count > 1 and not values[1:].all():
        raise InvalidResult("primes are not strictly increasing")
    if float(values.sum(dtype=np.float64)) > (hi - lo) * 1.000001 + 1:
        raise InvalidResult("primes run past hi")
    primes = _absolute(lo, values)
    if int(primes[0]) != first or int(primes[-1]) != last:
        raise InvalidResult("first/last disagree with the data")
    if int(primes.sum(dtype=np.uint64)) != checksum:
        raise InvalidResult("checksum disagrees with the data")
    # first is prime (checked); every later prime is odd iff the gaps are even,
    # but for 2 -> 3
    odd_gaps = int(np.count_nonzero(values[1:] & 1))
    if first == 2 and count > 1:
        if int(values[1]) != 1 or odd_gaps != 1:
            raise InvalidResult("even numbers in the data")
    elif odd_gaps:
        raise InvalidResult("even numbers in the data")
    if found is not None and primes.tolist() != found:
        raise InvalidResult(f"the data are not the primes of [{lo}, {hi}]")
    _spot_check_list(primes, values, rng)
    return count, payload


# ---------------------------------------------------------------- export

# The 4-digit texts of 0..9999 as little-endian uint32 words, so a word's bytes are the digits in order.
_DIGITS4 = np.frombuffer("".join(f"{i:04d}" for i in range(10000)).encode("ascii"), dtype="<u4")


def format_lines(primes: np.ndarray) -> bytes:
    """ASCII text of ascending integers (< 10**16), one per line, built with numpy."""
    out = []
    for a in range(0, int(primes.size), TEXT_CHUNK):
        out.append(_format_chunk(primes[a : a + TEXT_CHUNK]))
    return b"".join(out)


def _format_chunk(x: np.ndarray) -> bytes:
    if not x.size:
        return b""
    if int(x[-1]) >= 10**16 or int(x[0]) > int(x[-1]):
        return ("\n".join(map(str, x.tolist())) + "\n").encode("ascii")
    small = int(x[-1]) < 1 << 32
    x = x.astype(np.uint32 if small else np.uint64)
    # four 4-digit groups: a zero-padded 16-digit text of every number
    words = np.empty((x.size, 4), dtype="<u4")
    if small:  # < 4.3e9: the top group is always 0
        words[:, 0] = _DIGITS4[0]
        q = x // 10000
        words[:, 3] = _DIGITS4[x - q * 10000]
        q2 = q // 10000
        words[:, 2] = _DIGITS4[q - q2 * 10000]
        words[:, 1] = _DIGITS4[q2]
    else:
        q = x
        for col in (3, 2, 1, 0):
            nq = q // 10000
            words[:, col] = _DIGITS4[(q - nq * 10000).astype(np.int64)]
            q = nq
    text = words.view(np.uint8)  # (n, 16) digits, zero-padded
    # the numbers are sorted, so each digit count is one contiguous run
    top = int(x[-1])
    powers = np.array([10**d for d in range(1, 17) if 10**d <= top], dtype=x.dtype)
    ends = np.searchsorted(x, powers).tolist()
    ends += [x.size] * (16 - len(ends))
    parts = []
    start = 0
    for d, end in enumerate(ends, start=1):
        if end > start:
            rows = np.empty((end - start, d + 1), dtype=np.uint8)
            rows[:, :d] = text[start:end, 16 - d :]
            rows[:, d] = 10
            parts.append(rows.tobytes())
            start = end
    return b"".join(parts)


def _byte_sink(fileobj: Union[BinaryIO, TextIO]):
    """(write function taking bytes, flush-after or None) for a binary or text file.

    A text file over a binary buffer, with an ASCII-compatible encoding and no
    newline translation, is written through its buffer: no decode/encode pass.
    """
    if not isinstance(fileobj, io.TextIOBase):
        return fileobj.write, None
    buffer = getattr(fileobj, "buffer", None)
    try:
        codec = codecs.lookup(fileobj.encoding or "").name
    except (LookupError, TypeError):
        codec = ""
    if buffer is not None and os.linesep == "\n" and codec in _ASCII_SUPERSETS:
        fileobj.flush()
        return buffer.write, buffer.flush
    return (lambda data: fileobj.write(data.decode("ascii"))), None


_ASCII_SUPERSETS = ("ascii", "utf-8", "latin-1", "iso8859-1", "iso8859-15", "cp1252")


def write_text(blocks: Iterable[Tuple[int, Optional[bytes]]], fileobj: Union[BinaryIO, TextIO],
               start: int = 0, end: int = MAX_END) -> int:
    """Write the primes of stored blocks, one per line in ascending order; return how many.

    ``blocks`` yields (lo, payload) pairs in ascending lo order (payloads as
    stored: raw zlib bytes). Streams: one block in memory at a time. ``fileobj``
    may be binary (fastest) or text. Only primes in [start, end] are written (a
    smaller range answered from a bigger run). Raises ValueError when the blocks
    are out of order, overlap or have no payload (a count-only run),
    InvalidResult when a payload does not decode.
    """
    write, flush = _byte_sink(fileobj)
    written = 0
    previous = -1
    for lo, payload in blocks:
        if payload is None:
            raise ValueError(f"block at lo={lo} has no stored primes (a count-only run?)")
        primes = payload_to_array(lo, payload)
        if primes.size and (int(primes[0]) < start or int(primes[-1]) > end):
            primes = primes[int(np.searchsorted(primes, np.uint64(start))):
                            int(np.searchsorted(primes, np.uint64(end), side="right"))]
        if not primes.size:
            continue
        if int(primes[0]) <= previous:
            raise ValueError(f"blocks out of order at lo={lo}")
        previous = int(primes[-1])
        for a in range(0, int(primes.size), TEXT_CHUNK):
            write(_format_chunk(primes[a : a + TEXT_CHUNK]))
        written += int(primes.size)
    if flush is not None:
        flush()
    return written


def count_between(blocks: Iterable[Tuple[int, int, int, Optional[bytes]]], start: int, end: int) -> int:
    """The primes in [start, end] from stored list-mode blocks (lo, hi, found, payload)
    that tile a range covering it: a block inside counts its stored total, a block
    cut by start or end is decoded. ValueError when the blocks leave a gap."""
    total = 0
    covered = start
    for lo, hi, found, payload in blocks:
        if hi < start or lo > end:
            continue
        if lo > covered:
            raise ValueError(f"no block covers {covered}")
        covered = max(covered, hi + 1)
        if start <= lo and hi <= end:
            total += found
            continue
        if payload is None:
            raise ValueError(f"block at lo={lo} has no stored primes")
        primes = payload_to_array(lo, payload)
        total += int(np.searchsorted(primes, np.uint64(end), side="right")) - int(
            np.searchsorted(primes, np.uint64(start)))
    if covered <= end:
        raise ValueError(f"no block covers {covered}")
    return total


# ---------------------------------------------------------------- the job


class PrimesJob(Job):
    """Every prime p with start <= p <= end (both inclusive), as a list or a count.

    Items are numbers: item index i is the number start + i; a block is a range
    of numbers [lo, hi], both inclusive.
    """

    name = "primes"
    encoded_fields = ("data",)
    unit = ("number", "numbers")

    def __init__(self, start: int, end: int, count_only: bool = False):
        if not (_is_int(start) and _is_int(end)):
            raise UsageError("start and end must be integers")
        if not 0 <= start <= end <= MAX_END:
            raise UsageError(f"need 0 <= start <= end <= 10^15, got start={start} end={end}")
        self.start = start
        self.end = end
        self.count_only = bool(count_only)
        self.mode = "count" if self.count_only else "list"
        self.total = end - start + 1
        # Count-mode blocks sent to a host other than this machine (address = local):
        # only their results are recounted in part (SECURITY.md "Count-only results").
        # Blocks sent to this machine's agent: counted whole (no parts: nothing recounts them).
        self._sent_remote: set = set()
        self._sent_local: set = set()

    def params(self) -> dict:
        """The run's identity: range and mode (hosts and block sizes are not part of it)."""
        return {"start": self.start, "end": self.end, "mode": self.mode}

    def task_args(self, lo: int, hi: int) -> dict:
        """Arguments of the client's run() for the block of numbers [lo, hi] (inclusive);
        in count mode with the number of parts to count separately."""
        if not self.start <= lo <= hi <= self.end:
            raise ValueError(f"block [{lo}, {hi}] is outside [{self.start}, {self.end}]")
        if self.count_only:
            return {"lo": lo, "hi": hi, "mode": self.mode, "parts": count_parts(lo, hi)}
        return {"lo": lo, "hi": hi, "mode": self.mode}

    def task_args_for(self, block, link, task_id: int) -> dict:
        """task_args() of ``block`` for the host behind ``link``. In count mode this
        machine's own agent (address = local) counts the block whole, in one call of
        the kernel: its result is not recounted, so parts would only cost it time
        (~1 ms a part with libprimesieve); other hosts count it in parts."""
        args = self.task_args(block.lo, block.hi)
        if self.count_only:
            if getattr(getattr(link, "host", None), "is_local", False):
                self._sent_local.add((block.lo, block.hi))
                args["parts"] = 1
            else:
                self._sent_remote.add((block.lo, block.hi))
        return args

    def check(self, lo: int, hi: int, result: dict) -> Tuple[int, Optional[bytes]]:
        """validate() for this job's mode: (count, payload or None); raises InvalidResult.
        A count-mode block only ever sent to this machine's own agent is not recounted; a
        block also sent elsewhere (an endgame duplicate, a --verify copy) is, and a result
        of it counted whole (as this machine's is) is then recounted whole."""
        key = (lo, hi)
        return validate(lo, hi, result, self.mode, recount_part=key in self._sent_remote,
                        whole=key in self._sent_local)

    def max_block(self) -> int:
        """Widest block to hand out: in list mode at most ~4e6 primes (a ~3-4 MB result)
        where primes are densest (at start); in count mode MAX_COUNT_BLOCK."""
        if self.count_only:
            return min(MAX_COUNT_BLOCK, self.total)
        low, high = FIRST_BLOCK, 100 * MAX_PRIMES_PER_BLOCK  # estimate_count grows with width
        while low < high:
            mid = (low + high + 1) // 2
            if estimate_count(self.start, self.start + mid - 1) <= MAX_PRIMES_PER_BLOCK:
                low = mid
            else:
                high = mid - 1
        return min(low, self.total)

    def first_block(self) -> int:
        """Width of a host's first (probe) block, from which its rate is measured."""
        return min(FIRST_BLOCK, self.total)

    def estimate_bytes(self) -> int:
        """Store bytes the whole run needs (over-estimate): refuse the run if the disk has less."""
        return estimate_bytes(self.start, self.end, self.mode)

    def min_block(self) -> int:
        """The scheduler's MIN_BLOCK (a block of numbers)."""
        return MIN_BLOCK

    def block_meta(self, result: dict) -> dict:
        """The block's checksum (list mode) and the engine that computed it."""
        return {key: result.get(key) for key in ("checksum", "engine") if result.get(key) is not None}

    def verify_key(self, found: int, result: dict) -> tuple:
        """A --verify re-run must find as many primes with the same checksum."""
        return (found, result.get("checksum"))

    @classmethod
    def mode_of(cls, run: dict) -> str:
        """'list' or 'count': rates of the two modes are not comparable."""
        return str((run.get("params") or {}).get("mode") or "")
