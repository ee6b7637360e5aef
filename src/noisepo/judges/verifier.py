"""A programmatic verifier as a scorer: `score(prompt, response) -> float` for tasks with a known answer.

`spec` is what `noisepo.tasks.load_verifier` takes: a built-in task's name (its `score`), the
import path of a task, or the import path of a plain function `package.module:function`. A verifier
that raises, or returns something that is not a finite number, fails that item (None) without
stopping the others.

`error_rate` makes a deliberately imperfect judge (issue 8's robust self-improvement arm): the items
whose hash `sha256("verifier-error|prompt|response")` falls below the rate get the score `1 - s`
instead of `s`. Hashing the item, not drawing at random, makes the judge's mistakes systematic, as a
real judge's are: the same item always gets the same wrong verdict, in every iteration and rerun.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter

from noisepo.errors import ConfigError
from noisepo.judges.common import Item

log = logging.getLogger(__name__)


class VerifierScorer:
    """`Scorer` calling a verifier on each item."""

    def __init__(self, spec: str, *, error_rate: float = 0.0):
        if not spec:
            raise ConfigError("is required for the verifier scorer (a task name or pkg.mod:function)",
                              key="verifier")
        from noisepo.tasks import load_verifier  # imported only when a verifier is asked for

        self.spec = spec
        self.function = load_verifier(spec)
        self.error_rate = error_rate
        self.identity = f"verifier|{spec}" + (f"|error_rate={error_rate}" if error_rate else "")
        self.failures = 0
        self.failure_reasons: Counter[str] = Counter()

    @classmethod
    def from_config(cls, options):
        return cls(options.verifier, error_rate=getattr(options, "verifier_error_rate", 0.0))

    def __repr__(self) -> str:
        return f"VerifierScorer({self.spec!r})"

    def score(self, items: list[Item]) -> list[float | None]:
        return [self._score_one(prompt, response) for prompt, response in items]

    def _score_one(self, prompt: str, response: str) -> float | None:
        try:
            value = float(self.function(prompt, response))
        except Exception as err:  # a user's verifier may raise anything; one item fails, not the run
            log.warning("verifier %s failed on an item: %s: %s", self.spec, type(err).__name__, err)
            self.failures += 1
            self.failure_reasons[f"raised_{type(err).__name__}"] += 1
            return None
        if not math.isfinite(value):
            self.failures += 1
            self.failure_reasons["not_finite"] += 1
            return None
        if self.error_rate and is_judged_wrongly(prompt, response, self.error_rate):
            return 1.0 - value
        return value


def is_judged_wrongly(prompt: str, response: str, rate: float) -> bool:
    """Whether the imperfect judge errs on this item: a stable hash of the item below `rate`."""
    digest = hashlib.sha256(f"verifier-error|{prompt}|{response}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate
