"""A programmatic verifier as a scorer: `score(prompt, response) -> float` for tasks with a known answer.

`spec` is what `noisepo.tasks.load_verifier` takes: a built-in task's name (its `score`), the
import path of a task, or the import path of a plain function `package.module:function`. A verifier
that raises, or returns something that is not a finite number, fails that item (None) without
stopping the others.
"""
from __future__ import annotations

import logging
import math

from noisepo.errors import ConfigError
from noisepo.judges.base import Item

log = logging.getLogger(__name__)


class VerifierScorer:
    """`Scorer` calling a verifier on each item."""

    def __init__(self, spec: str):
        if not spec:
            raise ConfigError("is required for the verifier scorer (a task name or pkg.mod:function)",
                              key="verifier")
        from noisepo.tasks import load_verifier  # imported only when a verifier is asked for

        self.spec = spec
        self.function = load_verifier(spec)
        self.identity = f"verifier|{spec}"
        self.failures = 0

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
            return None
        if not math.isfinite(value):
            self.failures += 1
            return None
        return value
