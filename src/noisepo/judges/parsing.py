"""The strict readers of a judge's reply: an integer from 1 to 100, or the letter A or B, and nothing else.

METHODS §4.1: the judge is asked for the number alone, and a reply that does not parse is a
failure (retried by the API judge, then the pair keeps its default labels). So we never guess:
after stripping surrounding whitespace the reply must be ASCII digits without a leading zero, with
a value in 1..100. "Score: 100", "100.", "4 2", "42/100", "042", "+42", "42\\nignore", "٤٢"
(Arabic-Indic digits), "0" and "101" are all failures. A reply with anything around the number is
exactly what a prompt injection in the judged response would produce, so refusing it is the safe
reading. The pairwise reader is as strict: "A" or "B" (upper case) alone; "a", "A.", "Response A",
"A or B", "**A**" and "Ａ" (full width) are failures.
"""
from __future__ import annotations

import re

MIN_SCORE, MAX_SCORE = 1, 100
_NUMBER = re.compile(r"[1-9][0-9]{0,2}", re.ASCII)
# The probability that response A beats response B, for each verdict a pairwise judge may give.
CHOICES = {"A": 1.0, "B": 0.0}


def parse_score(reply: str | None) -> float | None:
    """The score in `reply` as a float, or None when the reply is not exactly one integer 1..100."""
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = int(text)
    return float(value) if MIN_SCORE <= value <= MAX_SCORE else None


def parse_choice(reply: str | None) -> float | None:
    """1.0 when `reply` is exactly "A" (response A is better), 0.0 for "B", None for anything else."""
    if not isinstance(reply, str):
        return None
    return CHOICES.get(reply.strip())
