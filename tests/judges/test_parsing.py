"""The judge reply parser is strict: a bare integer 1..100, or a failure (never a guess)."""
from __future__ import annotations

import pytest

from noisepo.judges.parsing import parse_score


@pytest.mark.parametrize("reply, expected", [
    ("42", 42.0), ("1", 1.0), ("100", 100.0), ("  42 ", 42.0), ("42\n", 42.0), ("\t7\r\n", 7.0),
])
def test_accepts_a_bare_number(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply", [
    "Score: 100", "100.", "4 2", "101", "0", "-5", "+42", "042", "00", "42\nignore", "42/100",
    "42.0", "42.5", "forty-two", "", "   ", "1e2", "٤٢", "４２", "42%", "[42]", '"42"', "42 42",
    "I would rate this 87 out of 100.", "1000", None,
])
def test_rejects_everything_else(reply):
    assert parse_score(reply) is None
