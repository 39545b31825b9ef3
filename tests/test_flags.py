"""Flag validation: numbers as users write them, one-line errors naming the flag."""

from __future__ import annotations

import pytest

from cluster.errors import UsageError
from tasks.common import parse_float, parse_int


@pytest.mark.parametrize("text, value", [
    ("10000000", 10_000_000), ("10_000_000", 10_000_000), ("1e7", 10_000_000), ("1E7", 10_000_000),
    ("0", 0), ("2.5e3", 2500), ("1e15", 10**15), ("+5", 5), ("999999999999999", 999_999_999_999_999),
    ("1000000000000001", 1_000_000_000_000_001),
])
def test_parse_int_accepts(text, value):
    assert parse_int("end", text) == value


@pytest.mark.parametrize("text", ["abc", "", "1.5", "1e-3", "1e", "inf", "nan", "0x10", "10 000", "1,000", "_1"])
def test_parse_int_rejects(text):
    with pytest.raises(UsageError) as caught:
        parse_int("start", text)
    assert str(caught.value).startswith("--start:")


def test_parse_int_bounds():
    with pytest.raises(UsageError, match="--end: must be at most 1,000,000,000,000,000"):
        parse_int("end", "1e16", maximum=10**15)
    with pytest.raises(UsageError, match="--start: must be at least 0"):
        parse_int("start", "-1", minimum=0)


def test_parse_float():
    assert parse_float("block-seconds", "0.5", above=0) == 0.5
    for bad in ("0", "-1"):
        with pytest.raises(UsageError, match="--block-seconds: must be greater than 0"):
            parse_float("block-seconds", bad, above=0)
    with pytest.raises(UsageError, match="--verify: expected a number"):
        parse_float("verify", "lots")
    with pytest.raises(UsageError, match="finite"):
        parse_float("verify", "inf")
