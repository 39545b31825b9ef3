"""Primes of one block [lo, hi] (both inclusive) by a segmented sieve of Eratosthenes.

Shipped to every host: standard library only, Python 3.6 syntax. Optional
speed-ups are used when they import on the host:

* ``primesieve``: the ``primesieve`` Python package, or the system library
  ``libprimesieve`` through ctypes. Count mode calls its counting function
  (no prime is generated) and needs no numpy; list mode encodes with numpy
  when there is numpy, else with the stdlib encoder.
* ``numpy``: an odd-only boolean sieve, vectorised.
* ``python``: an odd-only bytearray sieve with slice assignment.

The engine is picked once, at import (``ENGINE``). The environment variable
``BEOWULF_PRIMES_ENGINE=python|numpy|primesieve`` forces one (when available).

``run(args)`` is what the agent calls; it returns a small JSON-ready dict. A
list of primes never travels as JSON integers: it is encoded as the first
prime's offset from ``lo``, then the gaps between successive primes, each an
unsigned LEB128 varint, the bytes compressed with zlib (level 1, Huffman only)
and then base64 (``ENCODING``).
"""

import base64
import os
import sys
import zlib
from array import array
from itertools import compress, islice
from operator import sub

# numpy, once _numpy() has imported it: only what needs it imports it (count mode
# with libprimesieve never does; importing numpy costs a worker ~0.1-0.4 s).
np = None
_NUMPY_TRIED = []


def _numpy():
    """numpy, imported on first need; None when it cannot be imported here."""
    global np
    if not _NUMPY_TRIED:
        _NUMPY_TRIED.append(True)
        try:
            import numpy
        except Exception:  # ImportError, or a numpy that cannot load on this CPU
            numpy = None
        np = numpy
    return np


def _numpy_installed():
    """True when numpy can be found here (found, not imported)."""
    try:
        from importlib.util import find_spec

        return find_spec("numpy") is not None
    except Exception:
        return False


ENCODING = "gapvarint-zlib-b64"
MAX_HI = 10**15
MASK64 = (1 << 64) - 1
# Odd numbers per segment of the stdlib engine (a 256 KiB bytearray, L2-sized).
PY_SEGMENT_ODDS = 1 << 18
# ... grown up to this when there are many base primes (each costs a few Python
# operations per segment: near 10**15 there are 1.95 million of them).
PY_SEGMENT_MAX = 1 << 22
# Odd numbers per chunk of the numpy engine; numpy's per-call overhead (~1 us a
# slice) favours big chunks over cache-sized ones. Bounds the engine's memory:
# ~50 MB a process, ~90 MB near 10**15 (base primes up to 3.2e7).
NP_CHUNK_ODDS = 1 << 23
# Numbers per chunk asked of libprimesieve (bounds memory: 8 bytes a prime).
PS_CHUNK = 1 << 25
# Most parts a count-mode block may be cut into (each part's count is returned).
MAX_PARTS = 1024
# In the numpy engine a base prime with fewer expected hits in a chunk than
# this is crossed off by a vectorised scatter instead of a slice assignment.
NP_SCATTER_HITS = 64
# The numpy engine removes multiples of these by copying a periodic pattern.
PRESIEVE = (3, 5, 7, 11, 13, 17)
# Base primes per scatter batch, and hits per scatter pass (bounds temporaries).
NP_SCATTER_BATCH = 1 << 18
# zlib settings: level 1, Huffman only (gap bytes have no long repeats: LZ
# matching costs time and gains nothing). The stream is ordinary zlib.
ZLIB_LEVEL = 1
ZLIB_STRATEGY = getattr(zlib, "Z_HUFFMAN_ONLY", 2)


def isqrt(n):
    """Largest r with r * r <= n, for any integer n >= 0."""
    if n < 0:
        raise ValueError("isqrt of a negative number")
    if n < 1 << 52:
        r = int(n**0.5)
    else:  # Newton's method: floats lose precision (or overflow) here
        r = 1 << ((n.bit_length() + 1) // 2)
        while True:
            s = (r + n // r) // 2
            if s >= r:
                break
            r = s
    while r * r > n:
        r -= 1
    while (r + 1) * (r + 1) <= n:
        r += 1
    return r


# ---------------------------------------------------------------- base primes
# Odd primes up to a limit, cached per process and grown on demand. Blocks
# near 10**15 need all odd primes below ~3.2e7 (1.95 million of them).

_py_base = {"limit": 0, "primes": array("L")}
_np_base = {"limit": 0, "primes": None}


def _grow_to(limit, cached):
    """New cache limit covering ``limit``: at least double, at most what 10**15 needs."""
    top = isqrt(MAX_HI) + 1
    return max(limit, min(2 * cached, top), 1000)


def _sieve_upto_python(n):
    """Flags (bytearray) of odd numbers 2i+1 <= n: 1 for prime."""
    size = n // 2 + 1
    flags = bytearray(b"\x01") * size
    flags[0] = 0
    zeros = memoryview(bytes(size))
    for i in range(1, (isqrt(n) - 1) // 2 + 1):
        if flags[i]:
            p = 2 * i + 1
            start = p * p // 2
            flags[start::p] = zeros[: (size - 1 - start) // p + 1]
    return flags


def python_base_primes(limit):
    """Odd primes <= ``limit`` (an ``array('L')``, ascending), from the process cache."""
    cache = _py_base
    if limit > cache["limit"]:
        new = _grow_to(limit, cache["limit"])
        flags = _sieve_upto_python(new)
        cache["primes"] = array("L", compress(range(1, 2 * len(flags), 2), flags))
        cache["limit"] = new
    primes = cache["primes"]
    if primes and primes[-1] > limit:
        from bisect import bisect_right

        return primes[: bisect_right(primes, limit)]
    return primes


def numpy_base_primes(limit):
    """Odd primes <= ``limit`` as an int64 numpy array, from the process cache."""
    _numpy()
    cache = _np_base
    if limit > cache["limit"]:
        new = _grow_to(limit, cache["limit"])
        flags = np.ones(new // 2 + 1, dtype=bool)
        flags[0] = False
        for i in range(1, (isqrt(new) - 1) // 2 + 1):
            if flags[i]:
                p = 2 * i + 1
                flags[p * p // 2 :: p] = False
        cache["primes"] = 2 * np.flatnonzero(flags) + 1
        cache["limit"] = new
    primes = cache["primes"]
    return primes[: int(np.searchsorted(primes, limit, side="right"))]


# ---------------------------------------------------------------- varints


_VARINT_TABLE = []


def _varint_table():
    """bytes of each value below 2**14, built once (values up to 16383 cover every
    gap below 10**15)."""
    if not _VARINT_TABLE:
        for v in range(1 << 14):
            if v < 128:
                _VARINT_TABLE.append(bytes((v,)))
            else:
                _VARINT_TABLE.append(bytes(((v & 127) | 128, v >> 7)))
    return _VARINT_TABLE


def varint_bytes(v):
    """Unsigned LEB128 encoding of one integer >= 0."""
    out = bytearray()
    while v >= 128:
        out.append((v & 127) | 128)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode_varints(values):
    """LEB128 bytes of a list of integers >= 0 (stdlib).

    Prime gaps are almost all below 128 (one byte each): the runs between the
    few larger values are converted by bytes() in C, only those values one by one.
    """
    values = values if isinstance(values, list) else list(values)
    big = [i for i, v in enumerate(values) if v > 127]
    table = _varint_table()
    pieces = []
    at = 0
    for i in big:
        pieces.append(bytes(values[at:i]))  # a negative value raises ValueError here
        v = values[i]
        pieces.append(table[v] if v < 1 << 14 else varint_bytes(v))
        at = i + 1
    pieces.append(bytes(values[at:]))
    return b"".join(pieces)


def encode_varints_np(v):
    """LEB128 bytes of a numpy integer array (values >= 0), vectorised."""
    _numpy()
    if v.size == 0:
        return b""
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("varints are unsigned")
    # common case: almost every gap fits one byte; a few need two
    big = np.flatnonzero(v >= 128)
    low = v.astype(np.uint8)  # truncating cast: the low 8 bits
    if not big.size:
        return low.tobytes()
    vbig = v[big]
    vmax = int(vbig.max())
    if vmax < 1 << 14:
        low[big] = (vbig & 127) | 128
        return np.insert(low, big + 1, (vbig >> 7).astype(np.uint8)).tobytes()
    v = v.astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    k = 1
    while vmax >> (7 * k):
        nbytes += v >= np.uint64(1 << (7 * k))
        k += 1
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    for j in range(k):
        sel = nbytes > j
        part = (v[sel] >> np.uint64(7 * j)) & np.uint64(127)
        part = part.astype(np.uint8)
        part[nbytes[sel] > j + 1] |= np.uint8(128)
        out[starts[sel] + j] = part
    return out.tobytes()


def _compressor():
    return zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 15, 9, ZLIB_STRATEGY)


def decode_primes(lo, data):
    """The primes (a list) of an encoded ``data`` string from a block starting at ``lo``.

    The stdlib decoder, for tests and hosts without numpy; the coordinator uses
    the vectorised one in cluster/jobs/primes.py.
    """
    raw = zlib.decompress(base64.b64decode(data.encode("ascii"), validate=True))
    primes = []
    value = lo
    shift = 0
    acc = 0
    for byte in bytearray(raw):
        acc |= (byte & 127) << shift
        if byte & 128:
            shift += 7
        else:
            value += acc
            primes.append(value)
            acc = 0
            shift = 0
    if shift:
        raise ValueError("truncated varint")
    return primes


# ---------------------------------------------------------------- engines
# An engine is a function (lo, hi, acc) that feeds the primes of [lo, hi] to the
# accumulator in ascending pieces (one segment or chunk at a time); the
# accumulator folds them into count, checksum, first, last and the encoded gaps,
# so memory stays bounded by a piece, not by the block.


class _Accumulator(object):
    """Folds pieces of primes into the result fields; encodes in list mode."""

    def __init__(self, lo, hi, want_list):
        self.lo = lo
        self.hi = hi
        self.prev = lo
        self.count = 0
        self.total = 0
        self.first = None
        self.last = None
        self.comp = _compressor() if want_list else None
        self.parts = []

    def add_list(self, primes):
        """A Python list of ascending primes."""
        if not primes:
            return
        self.count += len(primes)
        if self.comp is not None:
            self.total += sum(primes)
        if self.first is None:
            self.first = primes[0]
        if self.comp is not None:
            gaps = [primes[0] - self.prev]
            gaps.extend(map(sub, islice(primes, 1, None), primes))
            self.parts.append(self.comp.compress(encode_varints(gaps)))
        self.prev = self.last = primes[-1]

    def add_np(self, primes):
        """A numpy int64/uint64 array of ascending primes."""
        n = int(primes.size)
        if not n:
            return
        first = int(primes[0])
        last = int(primes[-1])
        self.count += n
        if self.comp is not None:
            # exact: int64/uint64 sums wrap mod 2**64, which is what the checksum is
            self.total += int(primes.sum(dtype=np.uint64))
        if self.first is None:
            self.first = first
        if self.comp is not None:
            gaps = np.empty(n, dtype=np.int64)
            gaps[0] = first - self.prev
            np.subtract(primes[1:], primes[:-1], out=gaps[1:], casting="unsafe")
            self.parts.append(self.comp.compress(encode_varints_np(gaps)))
        self.prev = self.last = last

    def add_odd_flags_np(self, base, flags):
        """A numpy bool array: flags[i] is True when base + 2i is prime."""
        if self.comp is None:  # count mode: no index list, no sum
            n = int(np.count_nonzero(flags))
            if n:
                self.count += n
                if self.first is None:
                    self.first = base + 2 * int(np.argmax(flags))
                self.last = base + 2 * (int(flags.size) - 1 - int(np.argmax(flags[::-1])))
            return
        idx = np.flatnonzero(flags)
        n = int(idx.size)
        if not n:
            return
        first = base + 2 * int(idx[0])
        last = base + 2 * int(idx[-1])
        self.count += n
        self.total += n * base + 2 * int(idx.sum())
        if self.first is None:
            self.first = first
        if self.comp is not None:
            gaps = np.empty(n, dtype=np.int64)
            gaps[0] = first - self.prev
            np.subtract(idx[1:], idx[:-1], out=gaps[1:])
            gaps[1:] *= 2
            self.parts.append(self.comp.compress(encode_varints_np(gaps)))
        self.prev = self.last = last

    def result(self, engine):
        """The JSON-ready result dict (list mode: with the checksum and the data)."""
        out = {
            "lo": self.lo,
            "hi": self.hi,
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "engine": engine,
        }
        if self.comp is not None:
            out["checksum"] = self.total & MASK64
            self.parts.append(self.comp.flush())
            out["encoding"] = ENCODING
            out["data"] = base64.b64encode(b"".join(self.parts)).decode("ascii")
        return out


def _odd_start(lo):
    """First odd number >= max(lo, 3): the odd sieves never see 1 (nor 2)."""
    return max(3, lo | 1)


def _run_python(lo, hi, acc):
    """The stdlib engine: odd-only bytearray segments, slice assignment."""
    if lo <= 2 <= hi:
        acc.add_list([2])
    base = _odd_start(lo)
    if base > hi:
        return
    total = (hi - base) // 2 + 1
    root = isqrt(hi)
    primes = python_base_primes(root)
    # with many base primes the per-prime bookkeeping dominates: fewer, bigger segments
    seg_odds = min(total, max(PY_SEGMENT_ODDS, min(PY_SEGMENT_MAX, 64 * len(primes))))
    ones = b"\x01" * seg_odds
    zeros = memoryview(bytes(seg_odds))
    for s0 in range(0, total, seg_odds):
        n = min(seg_odds, total - s0)
        sb = base + 2 * s0
        shi = sb + 2 * (n - 1)
        seg = bytearray(ones[:n])
        for p in primes:
            m = p * p
            if m > shi:
                break
            if m < sb:
                m = sb + (-sb) % p
                if not m & 1:
                    m += p
            i = (m - sb) >> 1
            if i < n:
                seg[i::p] = zeros[: (n - 1 - i) // p + 1]
        if acc.comp is None:
            # count mode: no list, no sum
            count = seg.count(1)
            if count:
                acc.count += count
                if acc.first is None:
                    acc.first = sb + 2 * seg.find(1)
                acc.last = sb + 2 * seg.rfind(1)
        else:
            acc.add_list(list(compress(range(sb, shi + 1, 2), seg)))


_np_pattern = {}


def _presieve_pattern(length):
    """Flags of odd numbers 2j+1 (j from 0) with multiples of PRESIEVE cleared,
    repeated to at least ``length`` + one period; slice it at j0 % period."""
    period = 1
    for q in PRESIEVE:
        period *= q
    pat = _np_pattern.get("flags")
    if pat is None or pat.size < length + period:
        one = np.ones(period, dtype=bool)
        odd = 2 * np.arange(period, dtype=np.int64) + 1
        for q in PRESIEVE:
            one[odd % q == 0] = False
        reps = (length + period) // period + 1
        pat = np.tile(one, reps)
        _np_pattern["flags"] = pat
    return pat, period


def _np_cross_scatter(seg, n, ps, idx):
    """Clear seg[idx + k*p] (< n) for each prime p, its first index idx: vectorised."""
    keep = idx < n
    ps = ps[keep]
    idx = idx[keep]
    if not ps.size:
        return
    counts = (n - 1 - idx) // ps + 1
    if int(counts.max()) == 1:
        seg[idx] = False
        return
    ends = np.cumsum(counts)
    cut = 0
    while cut < ps.size:
        done = int(ends[cut - 1]) if cut else 0
        stop = int(np.searchsorted(ends, done + NP_SCATTER_BATCH, side="right"))
        stop = max(stop, cut + 1)
        c = counts[cut:stop]
        total = int(c.sum())
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
        pos = np.repeat(idx[cut:stop], c) + np.repeat(ps[cut:stop], c) * offsets
        seg[pos] = False
        cut = stop


def _np_sieve_chunk(sb, n, out):
    """Sieve the odd numbers sb, sb+2, ..., sb+2(n-1) into out[:n] (True = prime)."""
    shi = sb + 2 * (n - 1)
    pat, period = _presieve_pattern(NP_CHUNK_ODDS)
    j0 = ((sb - 1) // 2) % period
    seg = out[:n]
    seg[:] = pat[j0 : j0 + n]
    if sb <= PRESIEVE[-1]:
        for q in PRESIEVE:
            if sb <= q <= shi:
                seg[(q - sb) // 2] = True
    ps = numpy_base_primes(isqrt(shi))
    low = int(np.searchsorted(ps, PRESIEVE[-1], side="right"))
    split = max(low, int(np.searchsorted(ps, n // NP_SCATTER_HITS, side="right")))
    small = ps[low:split]
    for p, i in zip(small.tolist(), _first_index(sb, small).tolist()):
        seg[i::p] = False
    # the rest in batches of primes: near 10**15 there are 1.95 million of them
    for a in range(split, ps.size, NP_SCATTER_BATCH):
        part = ps[a : a + NP_SCATTER_BATCH]
        _np_cross_scatter(seg, n, part, _first_index(sb, part))
    return seg


def _first_index(sb, ps):
    """Index (from odd sb, step 2) of each prime's first odd multiple >= max(sb, p*p)."""
    m = sb + (-sb) % ps
    m += ps * ((m & 1) == 0)
    np.maximum(m, ps * ps, out=m)
    m -= sb
    m >>= 1
    return m


def _run_numpy(lo, hi, acc):
    """The numpy engine: odd-only boolean chunks, presieved by pattern copy."""
    if _numpy() is None:
        raise RuntimeError("the numpy engine needs numpy, which cannot be imported here")
    if lo <= 2 <= hi:
        acc.add_list([2])
    base = _odd_start(lo)
    if base > hi:
        return
    total = (hi - base) // 2 + 1
    out = np.empty(min(total, NP_CHUNK_ODDS), dtype=bool)
    for s0 in range(0, total, NP_CHUNK_ODDS):
        n = min(NP_CHUNK_ODDS, total - s0)
        sb = base + 2 * s0
        acc.add_odd_flags_np(sb, _np_sieve_chunk(sb, n, out))


# ------------------------------------------------------------ primesieve


class _Primesieve(object):
    """The primesieve library, from the ``primesieve`` Python package or the system's
    ``libprimesieve`` through ctypes (no numpy needed). One thread per call: a
    host runs one worker per slot, one slot per core by default (README.md, "slots").

    ``count(lo, hi)``: how many primes in [lo, hi]; ``primes(lo, hi)``: them, as
    a list; ``primes_np(lo, hi)``: them, as a uint64 numpy array (once _numpy()
    has imported numpy).
    """

    def __init__(self, count, primes, primes_np):
        self.count = count
        self.primes = primes
        self.primes_np = primes_np

    def works(self):
        """True when it gets known answers right (a broken build is not trusted)."""
        if self.count(0, 100) != 25 or self.count(7, 7) != 1 or self.count(8, 10) != 0:
            return False
        small = self.primes(0, 100)
        return len(small) == 25 and sum(small) == 1060 and not self.primes(8, 10)


def _package_primesieve():
    """The ``primesieve`` Python package, or None."""
    try:
        import primesieve as pkg
    except Exception:  # ImportError, or a build that cannot load here
        return None

    setter = getattr(pkg, "set_num_threads", None)
    if setter is not None:
        setter(1)

    def primes_np(lo, hi):
        try:
            from primesieve.numpy import primes as _np_primes
        except ImportError:  # a package built without its numpy module
            return np.asarray(pkg.primes(lo, hi), dtype=np.uint64)
        return np.asarray(_np_primes(lo, hi), dtype=np.uint64)

    count_one = getattr(pkg, "count_primes", None)
    if count_one is None:
        return None
    return _Primesieve(lambda lo, hi: int(count_one(lo, hi)), lambda lo, hi: list(pkg.primes(lo, hi)), primes_np)


def _ctypes_primesieve():
    """libprimesieve's C API (primesieve.h, stable since 5.0) through ctypes, or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("primesieve")
    if not name:
        return None
    lib = ctypes.CDLL(name)
    u64 = ctypes.c_uint64
    count_fn = lib.primesieve_count_primes
    count_fn.restype = u64
    count_fn.argtypes = [u64, u64]
    gen = lib.primesieve_generate_primes
    gen.restype = ctypes.c_void_p
    gen.argtypes = [u64, u64, ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
    free = lib.primesieve_free
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    threads = lib.primesieve_set_num_threads
    threads.restype = None
    threads.argtypes = [ctypes.c_int]
    threads(1)
    uint64_primes = 13  # enum value of UINT64_PRIMES in primesieve.h (stable since 5.0)

    def generated(lo, hi, take):
        size = ctypes.c_size_t(0)
        ptr = gen(lo, hi, ctypes.byref(size), uint64_primes)
        if not ptr:
            if size.value:
                raise MemoryError("primesieve_generate_primes failed")
            return take(None, 0)
        try:
            return take(ptr, size.value)
        finally:
            free(ptr)

    def to_list(ptr, n):
        if not n:
            return []
        # through a memoryview: tolist() in C, ~5x faster than iterating the ctypes array
        return memoryview((u64 * n).from_address(ptr)).cast("B").cast("Q").tolist()

    def to_np(ptr, n):
        if not n:
            return np.zeros(0, dtype=np.uint64)
        return np.frombuffer((u64 * n).from_address(ptr), dtype=np.uint64).copy()

    def count(lo, hi):
        return int(count_fn(lo, hi))

    return _Primesieve(count, lambda lo, hi: generated(lo, hi, to_list), lambda lo, hi: generated(lo, hi, to_np))


def _load_primesieve():
    """A working _Primesieve (the package first, then libprimesieve), or None."""
    for loader in (_package_primesieve, _ctypes_primesieve):
        try:
            lib = loader()
            if lib is not None and lib.works():
                return lib
        except Exception:  # not installed, a broken build, a foreign ABI: try the next
            continue
    return None


def _run_primesieve(lo, hi, acc):
    """The primesieve engine: primes from the C++ library; numpy encoder when there is numpy."""
    with_numpy = _numpy() is not None
    for a in range(lo, hi + 1, PS_CHUNK):
        b = min(hi, a + PS_CHUNK - 1)
        if with_numpy:
            acc.add_np(_PRIMESIEVE.primes_np(a, b))
        else:
            acc.add_list(_PRIMESIEVE.primes(a, b))


def _edge_prime(lo, hi, lowest):
    """The smallest (``lowest``) or largest prime in [lo, hi] by primesieve, or None:
    searched in windows growing from that end (prime gaps below 10**15 are < 1500)."""
    width = 512
    a, b = lo, hi
    while a <= b:
        if lowest:
            found = _PRIMESIEVE.primes(a, min(b, a + width - 1))
            if found:
                return found[0]
            a += width
        else:
            found = _PRIMESIEVE.primes(max(a, b - width + 1), b)
            if found:
                return found[-1]
            b -= width
        width *= 4
    return None


def _count_primesieve(lo, hi, parts):
    """Count mode of the primesieve engine: primesieve_count_primes per part (no prime
    is generated), first and last from small windows at the ends."""
    counts = [_PRIMESIEVE.count(a, b) for a, b in part_bounds(lo, hi, parts)]
    if not sum(counts):
        return counts, None, None
    return counts, _edge_prime(lo, hi, True), _edge_prime(lo, hi, False)


_PRIMESIEVE = _load_primesieve()

_ENGINES = {"python": _run_python}
# Without libprimesieve numpy is the best engine: import it now (a numpy that cannot
# load is then not listed); with it, numpy is imported only for list mode.
_FORCED = os.environ.get("BEOWULF_PRIMES_ENGINE", "").strip().lower()
if (_numpy() is not None) if (_PRIMESIEVE is None or _FORCED == "numpy") else _numpy_installed():
    _ENGINES["numpy"] = _run_numpy
if _PRIMESIEVE is not None:
    _ENGINES["primesieve"] = _run_primesieve
# Engines with their own count mode (the others count what their sieve finds).
_COUNTERS = {"primesieve": _count_primesieve}


def _pick_engine():
    forced = _FORCED
    if forced:
        if forced in _ENGINES:
            return forced
        sys.stderr.write("primes: BEOWULF_PRIMES_ENGINE=%s is not available here; using the best one\n" % forced)
    for name in ("primesieve", "numpy", "python"):
        if name in _ENGINES:
            return name
    return "python"


ENGINE = _pick_engine()
AVAILABLE = tuple(name for name in ("primesieve", "numpy", "python") if name in _ENGINES)


def part_bounds(lo, hi, parts):
    """The ``parts`` consecutive ranges (a, b), both inclusive, that a count-mode
    block [lo, hi] is cut into: as equal as integers allow. The coordinator cuts
    the same way (cluster/jobs/primes.py) to recount one part itself."""
    width = hi - lo + 1
    return [(lo + i * width // parts, lo + (i + 1) * width // parts - 1) for i in range(parts)]


def _check_args(args):
    """(lo, hi, mode, parts) from run()'s args, or ValueError."""
    if not isinstance(args, dict):
        raise ValueError("args must be a dict with lo, hi and mode")
    lo = args.get("lo")
    hi = args.get("hi")
    mode = args.get("mode", "list")
    parts = args.get("parts", 1)
    for name, value in (("lo", lo), ("hi", hi), ("parts", parts)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("%s must be an integer, got %r" % (name, value))
    if not 0 <= lo <= hi <= MAX_HI:
        raise ValueError("need 0 <= lo <= hi <= 10**15, got lo=%d hi=%d" % (lo, hi))
    if mode not in ("list", "count"):
        raise ValueError("mode must be 'list' or 'count', got %r" % (mode,))
    if not 1 <= parts <= min(MAX_PARTS, hi - lo + 1) or (parts > 1 and mode != "count"):
        raise ValueError("parts must be 1..%d and at most the block's width (count mode only), got %d"
                         % (MAX_PARTS, parts))
    return lo, hi, mode, parts


def run(args, engine=None):
    """Find the primes p with lo <= p <= hi (both inclusive).

    ``args``: ``{"lo": int, "hi": int, "mode": "list" | "count"}`` with
    0 <= lo <= hi <= 10**15, and in count mode optionally ``"parts": k``
    (1..MAX_PARTS, at most the width); anything else raises ValueError.
    ``engine`` overrides ``ENGINE`` (tests compare engines in one process).

    Returns ``{"lo", "hi" (echoed), "count", "first", "last" (None when there
    is no prime), "engine"}``; in list mode also ``"checksum"`` (sum of the
    primes mod 2**64), ``"encoding": ENCODING`` and ``"data"`` (ascii): the
    first prime's offset from lo, then the gaps, as LEB128 varints, zlib,
    base64; in count mode also ``"counts"``: the count of each of the k parts
    of ``part_bounds(lo, hi, k)`` (no checksum: counting generates no prime).
    """
    lo, hi, mode, parts = _check_args(args)
    name = engine or ENGINE
    if name not in _ENGINES:
        raise ValueError("engine %r is not available here (have %s)" % (name, ", ".join(AVAILABLE)))
    if mode == "list":
        acc = _Accumulator(lo, hi, True)
        _ENGINES[name](lo, hi, acc)
        return acc.result(name)
    if name in _COUNTERS:
        counts, first, last = _COUNTERS[name](lo, hi, parts)
    else:
        acc = _Accumulator(lo, hi, False)
        counts = []
        for a, b in part_bounds(lo, hi, parts):
            before = acc.count
            _ENGINES[name](a, b, acc)
            counts.append(acc.count - before)
        first, last = acc.first, acc.last
    return {"lo": lo, "hi": hi, "count": sum(counts), "counts": counts, "first": first, "last": last,
            "engine": name}
