"""The strict reader of a judge's reply: an integer from 1 to 100 and nothing else.

METHODS §4.1: the judge is asked for the number alone, and a reply that does not parse is a
failure (the pair keeps its default labels). So we never guess: after stripping surrounding
whitespace the reply must be ASCII digits without a leading zero, with a value in 1..100.
"Score: 100", "100.", "4 2", "42/100", "042", "+42", "42\\nignore", "٤٢" (Arabic-Indic digits),
"0" and "101" are all failures. A reply with anything around the number is exactly what a prompt
injection in the judged response would produce, so refusing it is the safe reading.
"""
from __future__ import annotations

import re

MIN_SCORE, MAX_SCORE = 1, 100
_NUMBER = re.compile(r"[1-9][0-9]{0,2}", re.ASCII)


def parse_score(reply: str | None) -> float | None:
    """The score in `reply` as a float, or None when the reply is not exactly one integer 1..100."""
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = int(text)
    return float(value) if MIN_SCORE <= value <= MAX_SCORE else None
