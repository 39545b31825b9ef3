"""cluster/jobs/primes.py: decoding, validation, export and the PrimesJob interface."""

import base64
import io
import random
import zlib

import numpy as np
import pytest

from client import primes as client
from cluster.errors import BeowulfError, UsageError
from cluster.jobs import primes as job
from cluster.jobs.primes import InvalidResult, PrimesJob, is_prime, validate


def reference(lo, hi):
    return [n for n in range(lo, hi + 1) if is_prime(n)]


def make_result(lo, hi, values, **override):
    """A list-mode result for an arbitrary list of 'primes' (honest fields unless overridden)."""
    gaps = [v - p for v, p in zip(values, [lo] + values[:-1])]
    data = zlib.compress(client.encode_varints(gaps), 1)
    result = {
        "lo": lo,
        "hi": hi,
        "count": len(values),
        "checksum": sum(values) % 2**64,
        "first": values[0] if values else None,
        "last": values[-1] if values else None,
        "engine": "test",
        "encoding": job.ENCODING,
        "data": base64.b64encode(data).decode("ascii"),
    }
    result.update(override)
    return result


def real(lo, hi, mode="list"):
    return client.run({"lo": lo, "hi": hi, "mode": mode})


# ------------------------------------------------------------------ is_prime


def test_miller_rabin_matches_a_sieve():
    flags = [is_prime(n) for n in range(10**5)]
    assert [n for n, f in enumerate(flags) if f] == client.decode_primes(0, real(0, 10**5 - 1)["data"])


def test_miller_rabin_strong_pseudoprimes_and_big_primes():
    # strong pseudoprimes to several small bases, Carmichael numbers
    for n in (
        2047,
        1373653,
        25326001,
        3215031751,
        2152302898747,
        3474749660383,
        341550071728321,
        3825123056546413051,
        318665857834031151167461,
        561,
        41041,
    ):
        assert not is_prime(n), n
    for p in (2, 3, 5, 41, 43, 999999999999989, 10**15 + 37, 2**61 - 1, 2**89 - 1):
        assert is_prime(p), p
    assert not is_prime(0) and not is_prime(1) and not is_prime(10**15)


# ------------------------------------------------------------------ validate


@pytest.mark.parametrize(
    "lo,hi",
    [
        (0, 0),
        (0, 1),
        (2, 2),
        (0, 2),
        (3, 3),
        (4, 4),
        (49, 49),
        (0, 10**5),
        (10**15 - 10**4, 10**15),
        (24, 28),
        (90, 96),
    ],
)
def test_validate_accepts_real_results(lo, hi):
    res = real(lo, hi)
    count, payload = validate(lo, hi, res, "list")
    assert count == len(reference(lo, hi)) if hi - lo < 20000 else count == res["count"]
    assert payload == base64.b64decode(res["data"])
    assert list(job.payload_to_array(lo, payload)) == client.decode_primes(lo, res["data"])
    assert validate(lo, hi, real(lo, hi, "count"), "count") == (res["count"], None)


def test_validate_accepts_a_big_real_block():
    lo, hi = 5 * 10**8, 5 * 10**8 + 10**7 - 1
    res = real(lo, hi)
    count, payload = validate(lo, hi, res, "list")
    assert count == res["count"] == 498385
    primes = job.payload_to_array(lo, payload)
    assert primes.dtype == np.uint64 and primes.size == count
    assert int(primes[0]) == res["first"] and int(primes[-1]) == res["last"]


def _bad(lo, hi, result, mode="list", match=None):
    with pytest.raises(InvalidResult, match=match):
        validate(lo, hi, result, mode)


def test_validate_rejects_wrong_count():
    lo, hi = 1000, 2000
    good = reference(lo, hi)
    _bad(lo, hi, make_result(lo, hi, good, count=len(good) + 1))
    _bad(lo, hi, make_result(lo, hi, good, count=len(good) - 1))
    _bad(lo, hi, make_result(lo, hi, good, count=-1))
    _bad(lo, hi, make_result(lo, hi, good, count=hi - lo + 2))
    _bad(lo, hi, make_result(lo, hi, good, count="3"))
    _bad(lo, hi, make_result(lo, hi, good[:-1]))  # a prime left out (after the last)
    _bad(lo, hi, make_result(lo, hi, good[1:]))  # a prime left out (before the first)


def test_validate_rejects_wrong_checksum():
    lo, hi = 1000, 2000
    good = reference(lo, hi)
    _bad(lo, hi, make_result(lo, hi, good, checksum=sum(good) + 2), match="checksum")
    _bad(lo, hi, make_result(lo, hi, good, checksum=-5))
    _bad(lo, hi, make_result(lo, hi, good, checksum=2**64))


def test_validate_rejects_unsorted_and_duplicates():
    lo, hi = 1000, 2000
    good = reference(lo, hi)
    swapped = good[:]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    # gaps of a swapped list are negative: encode them as huge varints (wrapped)
    gaps = [v - p for v, p in zip(swapped, [lo] + swapped[:-1])]
    data = zlib.compress(b"".join(client.varint_bytes(g % 2**64) for g in gaps))
    bad = make_result(lo, hi, good, data=base64.b64encode(data).decode())
    _bad(lo, hi, bad)
    dup = good[:5] + [good[4]] + good[5:]
    _bad(lo, hi, make_result(lo, hi, dup, count=len(dup)))
    _bad(lo, hi, make_result(lo, hi, dup, count=len(good), checksum=sum(good)))


def test_validate_rejects_out_of_range():
    lo, hi = 1000, 2000
    good = reference(lo, hi)
    _bad(lo, hi, make_result(lo, hi, good + [2003]))
    _bad(lo, hi, make_result(lo, hi, good, last=2003))
    _bad(lo, hi, make_result(lo, hi, good, first=997))
    res = real(lo, hi)
    _bad(lo + 10, hi, res)  # a result for another block
    _bad(lo, hi + 10, res)
    wide = make_result(900, hi, reference(900, hi))
    wide["lo"] = lo
    _bad(lo, hi, wide)


def test_validate_rejects_a_composite_inserted():
    lo, hi = 1000, 2000  # narrower than FULL_CHECK_WIDTH: checked number by number
    good = reference(lo, hi)
    for composite in (1001, 1003, 1147, 1763, 1999 * 0 + 1991):  # 1147 = 31*37, 1763 = 41*43
        assert not is_prime(composite)
        values = sorted(set(good + [composite]))
        _bad(lo, hi, make_result(lo, hi, values))
        # the same lie in count mode: count and checksum no longer add up
        _bad(lo, hi, make_result(lo, hi, values), "count")
    _bad(lo, hi, make_result(lo, hi, sorted(good + [1500])))  # even: parity check too


def test_validate_rejects_composites_in_a_big_block():
    lo, hi = 10**6, 10**6 + 10**5
    good = reference(lo, hi)
    # a composite as first or last prime: always tested
    _bad(lo, hi, make_result(lo, hi, [lo + 1] + good))  # 1000001 = 101 * 9901
    _bad(lo, hi, make_result(lo, hi, good + [hi]))
    # a sieve that forgot to cross off 7: its multiples are everywhere
    forgot7 = sorted(set(good) | {n for n in range(lo + 1, hi + 1, 2) if n % 7 == 0 and n % 3 and n % 5})
    _bad(lo, hi, make_result(lo, hi, forgot7))
    forgot37 = sorted(
        set(good)
        | {
            n
            for n in range(lo + 1, hi + 1, 2)
            if n % 37 == 0 and all(n % q for q in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31))
        }
    )
    _bad(lo, hi, make_result(lo, hi, forgot37))


def test_validate_rejects_missing_primes():
    lo, hi = 1000, 2000
    good = reference(lo, hi)
    _bad(lo, hi, make_result(lo, hi, good[:40] + good[41:]))  # a narrow block: exact
    _bad(lo, hi, make_result(lo, hi, good[:40] + good[41:]), "count")
    lo, hi = 10**6, 10**6 + 10**5
    good = reference(lo, hi)
    # three primes out of four missing: sampled gaps are sure to hold one
    _bad(lo, hi, make_result(lo, hi, good[::4]), match="missing")


def test_validate_rejects_corrupt_data():
    lo, hi = 1000, 2000
    good = make_result(lo, hi, reference(lo, hi))
    _bad(lo, hi, dict(good, data=good["data"][:-4] + "!!!!"), match="base64")
    _bad(lo, hi, dict(good, data="AAAA" + good["data"]))
    _bad(lo, hi, dict(good, data=base64.b64encode(b"not zlib at all").decode()), match="zlib")
    raw = base64.b64decode(good["data"])
    _bad(lo, hi, dict(good, data=base64.b64encode(raw[:-3]).decode()))
    _bad(lo, hi, dict(good, data=base64.b64encode(raw + b"junk").decode()))
    _bad(lo, hi, dict(good, data=None))
    _bad(lo, hi, dict(good, data=12))
    _bad(lo, hi, dict(good, encoding="json"))
    _bad(lo, hi, dict(good, data=base64.b64encode(zlib.compress(b"\x81")).decode()), match="truncated")
    _bad(lo, hi, dict(good, data=base64.b64encode(zlib.compress(b"\x81" * 9 + b"\x01")).decode()))
    bomb = zlib.compress(b"\x02" * 10**7)
    _bad(lo, hi, dict(good, data=base64.b64encode(bomb).decode()))
    _bad(lo, hi, "not a dict")
    _bad(lo, hi, {k: v for k, v in good.items() if k != "checksum"})


def test_validate_count_mode_plausibility():
    lo, hi = 1000, 2000
    good = real(lo, hi, "count")
    assert validate(lo, hi, good, "count") == (good["count"], None)
    _bad(lo, hi, dict(good, count=hi - lo + 2), "count")
    _bad(lo, hi, dict(good, count=600), "count")  # more than any interval of 1001 can hold
    _bad(lo, hi, dict(good, first=1001), "count")  # not prime
    _bad(lo, hi, dict(good, last=1999 + 2), "count")
    _bad(lo, hi, dict(good, count=0, counts=[0], first=None, last=None), "count")  # primes missed
    _bad(lo, hi, dict(good, count=good["count"] - 1, counts=[good["count"] - 1]), "count")  # checked in full
    assert validate(24, 28, real(24, 28, "count"), "count") == (0, None)


# A count-mode block cut into parts of 10^4 here (not 2^26): blocks of a test's size have many parts.
@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(job, "MIN_COUNT_PART", 10**4)


def counted(lo, hi):
    """An honest count-mode result, as the coordinator asks for it (task_args)."""
    return client.run(PrimesJob(lo, hi, count_only=True).task_args(lo, hi))


def test_count_mode_parts_shape_and_sums(small_parts):
    lo, hi = 10**9, 10**9 + 2 * 10**5 - 1
    good = counted(lo, hi)
    assert len(good["counts"]) == job.count_parts(lo, hi) == 20 and "checksum" not in good
    assert validate(lo, hi, good, "count") == (good["count"], None)
    counts = good["counts"]
    _bad(lo, hi, {k: v for k, v in good.items() if k != "counts"}, "count", match="counts")
    _bad(lo, hi, dict(good, counts=counts[:-1]), "count", match="counts")
    _bad(lo, hi, dict(good, counts=counts + [0]), "count", match="counts")
    _bad(lo, hi, dict(good, counts=[float(c) for c in counts]), "count", match="counts")
    _bad(lo, hi, dict(good, counts="1,2,3"), "count", match="counts")
    _bad(lo, hi, dict(good, count=good["count"] + 1), "count", match="add up")
    _bad(lo, hi, dict(good, counts=[5000] + counts[1:], count=good["count"] - counts[0] + 5000), "count",
         match="impossible")
    _bad(lo, hi, dict(good, counts=[-1, counts[1] + 1 + counts[0]] + counts[2:]), "count", match="impossible")
    # the first prime must lie in the first part that holds primes
    _bad(lo, hi, dict(good, counts=[0, counts[0] + counts[1]] + counts[2:]), "count", match="first")


def test_count_mode_a_lie_in_every_part_is_caught(small_parts):
    lo, hi = 10**9, 10**9 + 2 * 10**5 - 1
    good = counted(lo, hi)
    lie = dict(good, counts=[c + 1 for c in good["counts"]], count=good["count"] + len(good["counts"]))
    for _ in range(5):
        _bad(lo, hi, lie, "count", match="holds")


def test_count_mode_the_recounted_part_is_picked_after_the_result(small_parts, monkeypatch):
    """A lie in one part is caught when that part is recounted, and only then: the part
    is drawn from the system's random source once the result is in (SECURITY.md)."""
    assert isinstance(job._recount_rng, random.SystemRandom)
    lo, hi = 10**9, 10**9 + 2 * 10**5 - 1
    good = counted(lo, hi)
    counts = list(good["counts"])
    counts[7] -= 1
    lie = dict(good, counts=counts, count=good["count"] - 1)
    monkeypatch.setattr(job._recount_rng, "randrange", lambda n: 7)
    _bad(lo, hi, lie, "count", match=r"holds \d+ primes; result says")
    monkeypatch.setattr(job._recount_rng, "randrange", lambda n: 3)
    assert validate(lo, hi, lie, "count") == (good["count"] - 1, None)  # one part in 20: this one escapes
    picks = set()
    monkeypatch.undo()
    monkeypatch.setattr(job, "MIN_COUNT_PART", 10**4)
    real_recount = job.recount
    monkeypatch.setattr(job, "recount", lambda a, b: picks.add(a) or real_recount(a, b))
    for _ in range(200):
        validate(lo, hi, good, "count")
    assert len(picks) > 10  # not always the same part


def test_count_job_recounts_only_blocks_sent_to_another_machine(small_parts, monkeypatch):
    from types import SimpleNamespace

    lo, hi = 10**9, 10**9 + 2 * 10**5 - 1
    c = PrimesJob(lo, hi, count_only=True)
    recounted = []
    monkeypatch.setattr(job, "recount", lambda a, b: recounted.append((a, b)) or client.run(
        {"lo": a, "hi": b, "mode": "count"})["count"])
    block = SimpleNamespace(lo=lo, hi=hi)
    local = SimpleNamespace(host=SimpleNamespace(is_local=True))
    remote = SimpleNamespace(host=SimpleNamespace(is_local=False))
    args = c.task_args_for(block, local, 1)
    assert args == dict(c.task_args(lo, hi), parts=1)  # this machine counts it whole: nothing recounts it
    whole = client.run(args)
    assert c.check(lo, hi, whole) == (whole["count"], None) and not recounted
    remote_args = c.task_args_for(block, remote, 2)  # a duplicate (or --verify copy) on an SSH host
    assert remote_args == c.task_args(lo, hi) and remote_args["parts"] == 20
    parts = client.run(remote_args)
    assert c.check(lo, hi, parts) == (parts["count"], None) and len(recounted) == 1
    assert recounted[0] in job.part_bounds(lo, hi, 20)
    # a one-part result of a block also sent elsewhere may be anyone's: recounted whole
    assert c.check(lo, hi, whole) == (whole["count"], None) and recounted[1] == (lo, hi)
    lie = dict(whole, count=whole["count"] + 1, counts=[whole["count"] + 1])
    with pytest.raises(InvalidResult, match="holds"):
        c.check(lo, hi, lie)
    # a block sent only to SSH hosts: one part is not accepted
    other = SimpleNamespace(lo=lo + 1, hi=hi)
    c.task_args_for(other, remote, 3)
    with pytest.raises(InvalidResult, match="counts must be a list of"):
        c.check(lo + 1, hi, client.run({"lo": lo + 1, "hi": hi, "mode": "count"}))
    assert PrimesJob(lo, hi).task_args_for(block, remote, 4) == {"lo": lo, "hi": hi, "mode": "list"}


# ------------------------------------------------------------------ a smaller range from a finished run


def test_count_between_and_write_text_of_a_subrange():
    ranges = [(0, 999), (1000, 50_000), (50_001, 50_001), (50_002, 200_000)]
    stored = _stored(ranges)
    rows = [(lo, hi, len(reference(lo, hi)) if hi < 2000 else real(lo, hi)["count"], payload)
            for (lo, hi), (_, payload) in zip(ranges, stored)]
    for start, end in [(0, 200_000), (1, 1), (2, 2), (500, 120_000), (1000, 50_000), (999, 50_002),
                       (7, 7), (8, 10), (199_999, 200_000), (50_001, 50_001)]:
        expected = [p for p in client.decode_primes(0, real(0, 200_000)["data"]) if start <= p <= end]
        only_cut = [(lo, hi, found, payload if (lo < start or hi > end) else None)
                    for lo, hi, found, payload in rows]
        assert job.count_between(only_cut, start, end) == len(expected), (start, end)
        out = io.BytesIO()
        assert job.write_text(iter(stored), out, start, end) == len(expected)
        assert out.getvalue().decode() == "".join(f"{p}\n" for p in expected)
    with pytest.raises(ValueError, match="covers"):
        job.count_between(rows[:1] + rows[2:], 0, 200_000)
    with pytest.raises(ValueError, match="covers"):
        job.count_between(rows[:-1], 0, 200_000)


def test_invalid_result_is_a_beowulf_error():
    err = InvalidResult("bad")
    assert isinstance(err, BeowulfError) and err.reason == "bad" and str(err) == "bad"


# ------------------------------------------------------------------ decoding


def test_decode_varints_all_widths():
    rng = random.Random(5)
    for _ in range(100):
        values = [
            rng.choice([rng.randrange(128), rng.randrange(1 << 14), rng.randrange(1 << 21), rng.randrange(1 << 49)])
            for _ in range(rng.randrange(1, 50))
        ]
        got = job.decode_varints(b"".join(client.varint_bytes(v) for v in values))
        assert got.tolist() == values
    assert job.decode_varints(b"").size == 0


def test_decode_uses_result_lo():
    res = real(10**9, 10**9 + 10**5)
    got = job.decode(res)
    assert got.dtype == np.uint64
    assert got.tolist() == client.decode_primes(10**9, res["data"])
    assert job.decode(res, lo=10**9).tolist() == got.tolist()
    with pytest.raises(InvalidResult):
        job.decode({k: v for k, v in res.items() if k != "lo"})
    with pytest.raises(InvalidResult):
        job.decode(dict(res, data="%%%"))


# ------------------------------------------------------------------ export


def _stored(ranges):
    out = []
    for lo, hi in ranges:
        count, payload = validate(lo, hi, real(lo, hi), "list")
        out.append((lo, payload))
    return out


def straightforward(blocks):
    text = []
    for lo, payload in blocks:
        text.extend(str(p) for p in job.payload_to_array(lo, payload).tolist())
    return "".join(t + "\n" for t in text)


def test_write_text_matches_a_straightforward_version():
    ranges = [
        (0, 1),
        (2, 1000),
        (1001, 1001),
        (1002, 10**6),
        (10**6 + 1, 10**6 + 3),
        (4294967000, 4294968000),
        (10**15 - 5000, 10**15),
    ]
    blocks = _stored(ranges)
    expected = straightforward(blocks)
    binary = io.BytesIO()
    assert job.write_text(iter(blocks), binary) == expected.count("\n")
    assert binary.getvalue().decode("ascii") == expected
    text = io.StringIO()
    job.write_text(blocks, text)
    assert text.getvalue() == expected
    assert expected.startswith("2\n3\n5\n") and expected.endswith(f"{reference(10**15 - 5000, 10**15)[-1]}\n")


def test_write_text_to_real_files(tmp_path):
    blocks = _stored([(0, 10**5), (10**5 + 1, 3 * 10**5)])
    expected = straightforward(blocks)
    for name, mode, kwargs in (
        ("b.txt", "wb", {}),
        ("a.txt", "w", {"encoding": "ascii"}),
        ("u.txt", "w", {"encoding": "utf-16"}),
    ):
        path = tmp_path / name
        with open(path, mode, **kwargs) as handle:
            if "b" not in mode:
                handle.write("head\n")  # buffered text before the bytes must stay in order
            job.write_text(iter(blocks), handle)
            if "b" not in mode:
                handle.write("end\n")
        enc = kwargs.get("encoding", "ascii")
        if "b" in mode:
            assert path.read_bytes().decode(enc) == expected
        else:
            assert path.read_bytes().decode(enc) == "head\n" + expected + "end\n"


def test_write_text_refuses_out_of_order_blocks():
    blocks = _stored([(1000, 2000), (0, 999)])
    with pytest.raises(ValueError):
        job.write_text(blocks, io.BytesIO())
    with pytest.raises(ValueError):
        job.write_text([(0, None)], io.BytesIO())


def test_format_lines_every_digit_count():
    values = sorted(
        {0, 1, 9, 10, 99, 100, 4294967295, 4294967296, 10**15, 10**16 - 1}
        | {10**d + o for d in range(16) for o in (-1, 0, 1) if 10**d + o >= 0}
    )
    for arr in (values, [7], [10**15 - 11], values[:5]):
        a = np.array(arr, dtype=np.uint64)
        assert job.format_lines(a) == "".join(f"{v}\n" for v in arr).encode()
    assert job.format_lines(np.zeros(0, dtype=np.uint64)) == b""


# ------------------------------------------------------------------ estimates


@pytest.mark.parametrize(
    "lo,hi",
    [(0, 10), (0, 100), (2, 2), (0, 10**6), (10**6, 2 * 10**6), (10**9, 10**9 + 10**6), (10**15 - 10**5, 10**15)],
)
def test_estimate_count_is_an_upper_bound_and_close(lo, hi):
    actual = real(lo, hi, "count")["count"]
    est = job.estimate_count(lo, hi)
    assert est >= actual
    assert est <= actual * 1.1 + 10


def test_estimate_bytes_covers_the_payloads():
    lo, hi = 1, 10**7
    payload_bytes = sum(len(p) for _, p in _stored([(lo, 5 * 10**6), (5 * 10**6 + 1, hi)]))
    est = job.estimate_bytes(lo, hi, "list")
    assert payload_bytes <= est <= 2 * payload_bytes + 10**5
    assert job.estimate_bytes(lo, hi, "count") < 10**5
    assert job.estimate_bytes(1, 10**15, "list") > 2 * 10**13


# ------------------------------------------------------------------ PrimesJob


def test_primes_job_interface():
    j = PrimesJob(1, 10**9)
    assert j.name == "primes"
    assert j.params() == {"start": 1, "end": 10**9, "mode": "list"}
    assert j.total == 10**9
    assert j.task_args(1, 1000) == {"lo": 1, "hi": 1000, "mode": "list"}
    with pytest.raises(ValueError):
        j.task_args(0, 10)
    res = client.run(j.task_args(1, 1000))
    assert j.check(1, 1000, res)[0] == 168
    assert 0 < j.first_block() <= j.max_block() <= j.total
    c = PrimesJob(0, 10**15, count_only=True)
    assert c.params()["mode"] == "count"
    assert c.task_args(5, 9) == {"lo": 5, "hi": 9, "mode": "count", "parts": 1}
    assert c.task_args(0, 10**10 - 1)["parts"] == job.COUNT_PARTS
    assert c.check(0, 100, client.run(c.task_args(0, 100))) == (25, None)
    assert c.max_block() >= 10**9
    small = PrimesJob(5, 5)
    assert small.total == 1 and small.first_block() == 1 and small.max_block() == 1


def test_max_block_keeps_results_small():
    j = PrimesJob(0, 10**9)
    width = j.max_block()
    res = real(0, width - 1)
    assert res["count"] <= job.MAX_PRIMES_PER_BLOCK * 1.02
    assert len(res["data"]) < 4 * 2**20
    top = PrimesJob(10**15 - 10**9, 10**15)
    assert top.max_block() > width  # primes are sparser up there


@pytest.mark.parametrize("start,end", [(10, 1), (-1, 5), (0, 10**15 + 1), (0.5, 10), ("1", 10), (True, 10)])
def test_primes_job_rejects_bad_ranges(start, end):
    with pytest.raises(UsageError):
        PrimesJob(start, end)
