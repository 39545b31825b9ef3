"""client/primes.py: every engine, every edge, the encoding, and Python 3.6 syntax."""

import ast
import base64
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from client import primes
from cluster.jobs.primes import is_prime

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SRC = ROOT / "client" / "primes.py"
PI = {10: 4, 100: 25, 1000: 168, 10**4: 1229, 10**5: 9592, 10**6: 78498, 10**7: 664579}
ENGINES = [e for e in ("python", "numpy", "primesieve") if e in primes.AVAILABLE]


def simple_primes(lo, hi):
    """Reference: a plain sieve of [0, hi], cut to [lo, hi]."""
    if hi < 2:
        return []
    flags = bytearray([1]) * (hi + 1)
    flags[0] = flags[1] = 0
    for p in range(2, primes.isqrt(hi) + 1):
        if flags[p]:
            flags[p * p :: p] = bytes(len(range(p * p, hi + 1, p)))
    return [n for n in range(max(lo, 0), hi + 1) if flags[n]]


def mr_primes(lo, hi):
    """Reference for ranges anywhere: Miller-Rabin on every number (small widths only)."""
    return [n for n in range(lo, hi + 1) if is_prime(n)]


def run(lo, hi, mode="list", engine=None):
    return primes.run({"lo": lo, "hi": hi, "mode": mode}, engine=engine)


def listed(lo, hi, engine):
    res = run(lo, hi, "list", engine)
    got = primes.decode_primes(lo, res["data"])
    assert res["count"] == len(got)
    return res, got


def check_against(lo, hi, expected, engine):
    for mode in ("list", "count"):
        res = run(lo, hi, mode, engine)
        assert res["engine"] == engine
        assert (res["lo"], res["hi"]) == (lo, hi)
        assert res["count"] == len(expected), (lo, hi, engine, mode)
        if mode == "list":
            assert res["checksum"] == sum(expected) % 2**64
        else:
            assert "checksum" not in res and res["counts"] == [len(expected)]
        assert res["first"] == (expected[0] if expected else None)
        assert res["last"] == (expected[-1] if expected else None)
        if mode == "list":
            assert res["encoding"] == primes.ENCODING
            assert primes.decode_primes(lo, res["data"]) == expected
        else:
            assert "data" not in res


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", range(1, 8))
def test_pi_powers_of_ten(engine, k):
    n = 10**k
    for lo in (0, 1):
        assert run(lo, n, "count", engine)["count"] == PI[n]
    res, got = listed(0, n, engine)
    assert res["count"] == PI[n] == len(got)
    assert got[:5] == [2, 3, 5, 7, 11][: len(got[:5])]


def test_pi_10_8_numpy():
    if "numpy" not in primes.AVAILABLE:
        pytest.skip("numpy is not installed")
    res = run(1, 10**8, "list", "numpy")
    assert res["count"] == 5761455
    assert res["last"] == 99999989


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "lo,hi",
    [
        (0, 0),
        (0, 1),
        (1, 1),
        (2, 2),
        (0, 2),
        (1, 2),
        (3, 3),
        (4, 4),
        (2, 3),
        (0, 3),
        (49, 49),
        (48, 50),
        (49, 53),
        (25, 25),
        (9, 9),
        (121, 121),
        (15, 19),
        (17, 17),
        (0, 17),
        (18, 18),
        (0, 100),
        (89, 97),
        (97, 97),
        (1, 1000),
        (24, 28),
        (7919, 7919),
    ],
)
def test_edges(engine, lo, hi):
    check_against(lo, hi, simple_primes(lo, hi), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_squares_of_primes_are_not_prime(engine):
    for p in simple_primes(2, 3000):
        assert run(p * p, p * p, "count", engine)["count"] == 0
        assert run(p, p, "count", engine)["count"] == 1


def test_near_the_top_engines_agree_and_pass_miller_rabin():
    lo, hi = 10**15 - 10**5, 10**15
    results = {e: listed(lo, hi, e) for e in ENGINES}
    base_res, base = results[ENGINES[0]]
    for engine, (res, got) in results.items():
        assert got == base, engine
        assert res["checksum"] == base_res["checksum"]
    assert base and base[-1] <= 10**15
    rng = random.Random(7)
    for p in rng.sample(base, 50) + [base[0], base[-1]]:
        assert is_prime(p)
    # the numbers around the first and last primes hold no other prime
    assert mr_primes(lo, base[0]) == [base[0]]
    assert mr_primes(base[-1], hi) == [base[-1]]
    gap = base.index(base[len(base) // 2])
    assert mr_primes(base[gap], base[gap + 1]) == [base[gap], base[gap + 1]]


def test_near_the_top_python_engine_full_width_block():
    """The stdlib engine must manage a 10^6-wide block near 10^15 (base primes to 3.2e7)."""
    lo, hi = 10**15 - 10**6, 10**15
    res = run(lo, hi, "count", "python")
    other = run(lo, hi, "count", ENGINES[-1])
    assert (res["count"], res["first"], res["last"]) == (other["count"], other["first"], other["last"])
    assert is_prime(res["first"]) and is_prime(res["last"])


def test_random_ranges_agree_between_engines():
    rng = random.Random(12345)
    for _ in range(40):
        scale = rng.choice([10**3, 10**6, 10**9, 10**12, 10**15])
        lo = rng.randrange(0, scale)
        hi = min(10**15, lo + rng.choice([0, 1, 2, 3, 100, 10**4, 10**5, 6 * 10**5]))
        ref = None
        for engine in ENGINES:
            res, got = listed(lo, hi, engine)
            if ref is None:
                ref = got
            assert got == ref, (lo, hi, engine)
        if hi - lo <= 200:
            assert ref == mr_primes(lo, hi)


def test_segment_and_chunk_boundaries(monkeypatch):
    """Tiny segments / chunks: every boundary falls somewhere interesting."""
    monkeypatch.setattr(primes, "PY_SEGMENT_ODDS", 37)
    monkeypatch.setattr(primes, "PY_SEGMENT_MAX", 37)
    if "numpy" in primes.AVAILABLE:
        monkeypatch.setattr(primes, "NP_CHUNK_ODDS", 41)
    monkeypatch.setattr(primes, "PS_CHUNK", 97)
    for lo, hi in [
        (0, 5000),
        (1, 1),
        (2, 76),
        (3, 77),
        (73, 75),
        (10**6, 10**6 + 3000),
        (10**12 - 1000, 10**12 + 1000),
    ]:
        expected = simple_primes(lo, hi) if hi < 10**7 else mr_primes(lo, hi)
        for engine in ENGINES:
            check_against(lo, hi, expected, engine)


@pytest.mark.skipif("numpy" not in primes.AVAILABLE, reason="numpy is not installed")
def test_numpy_chunk_boundary_full_size():
    """A block wider than one numpy chunk (2^23 odd numbers) counts right."""
    width = 2 * primes.NP_CHUNK_ODDS + 1000
    lo = 10**9
    ref = ENGINES[-1] if ENGINES[-1] != "numpy" else "python"
    a = run(lo, lo + width, "count", "numpy")
    b = run(lo, lo + width, "count", ref)
    assert (a["count"], a["first"], a["last"]) == (b["count"], b["first"], b["last"])


def test_bad_args_raise_value_error():
    for args in [
        {"lo": 5, "hi": 4, "mode": "list"},
        {"lo": -1, "hi": 4, "mode": "list"},
        {"lo": 0, "hi": 10**15 + 1, "mode": "list"},
        {"lo": 0.0, "hi": 4, "mode": "list"},
        {"lo": "0", "hi": 4, "mode": "list"},
        {"lo": True, "hi": 4, "mode": "list"},
        {"lo": 0, "hi": 4, "mode": "sum"},
        {"hi": 4, "mode": "list"},
        [0, 4],
        {"lo": 0, "hi": 4, "mode": "count", "parts": 0},
        {"lo": 0, "hi": 4, "mode": "count", "parts": 6},  # wider than the block
        {"lo": 0, "hi": 10**6, "mode": "count", "parts": primes.MAX_PARTS + 1},
        {"lo": 0, "hi": 10**6, "mode": "count", "parts": 2.0},
        {"lo": 0, "hi": 10**6, "mode": "count", "parts": True},
        {"lo": 0, "hi": 10**6, "mode": "list", "parts": 2},
    ]:
        with pytest.raises(ValueError):
            primes.run(args)
    with pytest.raises(ValueError):
        primes.run({"lo": 0, "hi": 4}, engine="nonesuch")


def test_result_is_json_and_no_integer_lists():
    import json

    res = run(0, 10**5)
    text = json.dumps(res)
    assert json.loads(text) == res
    assert "[" not in text
    assert set(res) == {"lo", "hi", "count", "checksum", "first", "last", "engine", "encoding", "data"}


# pi(x) of the counting function, known values (OEIS A006880 and A007053: pi(10^n), pi(2^n)).
KNOWN_PI = {10**8: 5761455, 10**9: 50847534, 2**32: 203280221, 10**10: 455052511}


@pytest.mark.parametrize("engine", ENGINES)
def test_count_parts_add_up_and_match_the_cut(engine):
    lo, hi = 10**9 - 12345, 10**9 + 10**6
    expected = primes.decode_primes(lo, run(lo, hi, "list", engine)["data"])
    for parts in (1, 2, 7, 64):
        res = primes.run({"lo": lo, "hi": hi, "mode": "count", "parts": parts}, engine=engine)
        bounds = primes.part_bounds(lo, hi, parts)
        assert bounds[0][0] == lo and bounds[-1][1] == hi
        assert all(b[0] == a[1] + 1 for a, b in zip(bounds, bounds[1:]))
        assert res["counts"] == [sum(1 for p in expected if a <= p <= b) for a, b in bounds]
        assert (res["count"], res["first"], res["last"]) == (len(expected), expected[0], expected[-1])
    # parts as wide as a single number
    res = primes.run({"lo": 2, "hi": 12, "mode": "count", "parts": 11}, engine=engine)
    assert res["counts"] == [1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0]


@pytest.mark.skipif("primesieve" not in primes.AVAILABLE, reason="libprimesieve is not installed")
@pytest.mark.parametrize("n", sorted(KNOWN_PI))
def test_count_mode_known_pi_primesieve(n):
    res = primes.run({"lo": 0, "hi": n, "mode": "count", "parts": 32}, engine="primesieve")
    assert res["count"] == KNOWN_PI[n] and sum(res["counts"]) == KNOWN_PI[n]
    assert res["first"] == 2 and is_prime(res["last"]) and not any(is_prime(x) for x in range(res["last"] + 1, n + 1))


@pytest.mark.skipif("primesieve" not in primes.AVAILABLE, reason="libprimesieve is not installed")
def test_count_mode_matches_the_primesieve_command():
    """Counts of random ranges against the primesieve CLI (the same library, another door)."""
    import shutil

    if not shutil.which("primesieve"):
        pytest.skip("the primesieve command is not installed")
    rng = random.Random(99)
    for _ in range(6):
        lo = rng.randrange(0, 10**12)
        hi = lo + rng.randrange(0, 10**8)
        out = subprocess.run(["primesieve", str(lo), str(hi), "-c", "--no-status"], capture_output=True,
                             text=True, check=True).stdout
        cli = int(out.split("Primes:")[1].split()[0])
        res = primes.run({"lo": lo, "hi": hi, "mode": "count", "parts": 5}, engine="primesieve")
        assert res["count"] == cli, (lo, hi)
        py = run(hi - 2000 if hi - lo > 2000 else lo, hi, "count", "python")
        assert res["last"] == py["last"]


def test_encoding_layout():
    """Offset of the first prime from lo, then gaps; LEB128; zlib; base64."""
    lo = 90
    res = run(lo, 130, "list", "python")
    raw = zlib.decompress(base64.b64decode(res["data"]))
    assert list(raw) == [97 - 90, 4, 2, 4, 2, 4, 14]  # 97 101 103 107 109 113 127
    assert primes.decode_primes(lo, res["data"]) == simple_primes(lo, 130)
    # 436273009 -> 436273291 is a gap of 282 (a maximal gap): two varint bytes
    lo = 436273000
    res = run(lo, 436273300, "list", "python")
    raw = zlib.decompress(base64.b64decode(res["data"]))
    assert list(raw) == [9, (282 & 127) | 128, 282 >> 7]
    assert primes.decode_primes(lo, res["data"]) == [436273009, 436273291]


def test_varint_encoders_round_trip():
    rng = random.Random(3)
    for _ in range(200):
        values = [
            rng.choice([rng.randrange(128), rng.randrange(1 << 14), rng.randrange(1 << 40), rng.randrange(1 << 63)])
            for _ in range(rng.randrange(60))
        ]
        ref = b"".join(primes.varint_bytes(v) for v in values)
        assert primes.encode_varints(values) == ref
        if "numpy" in primes.AVAILABLE:
            import numpy as np

            assert primes.encode_varints_np(np.array(values, dtype=np.uint64)) == ref
            assert primes.encode_varints_np(np.array(values, dtype=np.int64)) == ref
    assert primes.varint_bytes(300) == bytes([0xAC, 0x02])
    with pytest.raises(ValueError):
        primes.encode_varints([1, -1])


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_give_identical_data(engine):
    lo, hi = 999_000, 1_200_000
    assert run(lo, hi, "list", engine)["data"] == run(lo, hi, "list", "python")["data"]


def test_isqrt():
    for n in list(range(2000)) + [
        10**15,
        10**15 - 1,
        (10**8 + 7) ** 2,
        (10**8 + 7) ** 2 - 1,
        (1 << 80) + 12345,
        10**40,
    ]:
        r = primes.isqrt(n)
        assert r * r <= n < (r + 1) * (r + 1)


def test_engine_env_var_forces_engine():
    for name in ("python", "numpy"):
        if name not in primes.AVAILABLE:
            continue
        env = dict(os.environ, BEOWULF_PRIMES_ENGINE=name, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from client import primes; print(primes.ENGINE, primes.run("
                "{'lo': 0, 'hi': 100, 'mode': 'count'})['engine'])",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=str(ROOT),
        ).stdout.split()
        assert out == [name, name]


def _guarded_nodes(tree):
    """Nodes inside the body of a try whose handlers catch ImportError (or wider)."""
    catching = ("ImportError", "ModuleNotFoundError", "Exception")
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is None or (isinstance(h.type, ast.Name) and h.type.id in catching) for h in node.handlers
        ):
            for stmt in node.body:
                guarded.update(ast.walk(stmt))
    return guarded


def test_client_parses_as_python_36_and_imports_only_stdlib():
    tree = ast.parse(CLIENT_SRC.read_text(), feature_version=(3, 6))
    guarded = _guarded_nodes(tree)
    stdlib = set(sys.stdlib_module_names)
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            seen.add(top)
            assert top in stdlib or node in guarded, f"unguarded import of {name}"
    assert "numpy" in seen  # the guard is really exercised


def test_client_runs_without_numpy(tmp_path):
    """With numpy unimportable: libprimesieve through ctypes when the host has it (both
    modes; count mode never needed numpy), else the stdlib engine; and still right."""
    (tmp_path / "numpy.py").write_text("raise ImportError('no numpy here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("BEOWULF_PRIMES_ENGINE", None)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from client import primes; r = primes.run({'lo': 0, 'hi': 10**6, 'mode': 'list'});"
            "c = primes.run({'lo': 0, 'hi': 10**9, 'mode': 'count', 'parts': 3}) if primes.ENGINE == 'primesieve'"
            " else {'count': 50847534, 'counts': 3};"
            "print(primes.ENGINE, r['count'], len(primes.decode_primes(0, r['data'])), c['count'], len(c['counts']),"
            " primes.np is None)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=str(ROOT),
    ).stdout.split()
    engine = "primesieve" if "primesieve" in primes.AVAILABLE else "python"
    assert out == [engine, "78498", "78498", "50847534", "3", "True"]
