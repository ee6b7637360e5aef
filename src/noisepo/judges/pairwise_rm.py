"""A pairwise reward model named by import path (`pkg.mod:attr`), as a `Comparer`.

The object is PairRM-style: `compare(prompt, response_a, response_b)` returns the probability that
response A is better than B (a number in [0, 1]) or a bool (True: A is better). `attr` may be that
object, or a class or factory called once with no arguments to build it (so loading weights
happens when the judge is built, not at import). A call that raises, or returns anything else (a
number outside [0, 1], NaN, a string), fails that item (None) without stopping the others.

Identity: the import path, plus the object's own `identity` attribute when it has one. Nothing
else about the object is hashed: give it an `identity` that changes with its weights, or cached
verdicts of old weights are reused.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

from noisepo.errors import ConfigError
from noisepo.judges.common import PairItem

log = logging.getLogger(__name__)
KEY = "pairwise_model"


class PairwiseRewardModel:
    def __init__(self, spec: str | None):
        if not spec:
            raise ConfigError("is required for the pairwise-rm scorer (an import path pkg.mod:attr)", key=KEY)
        from noisepo.tasks.base import import_object  # imported only when this judge is asked for

        target = import_object(spec, key=KEY)
        if isinstance(target, type) or (callable(target) and not callable(getattr(target, "compare", None))):
            try:
                target = target()
            except TypeError as err:
                raise ConfigError(f"cannot build {spec!r} with no arguments: {err}", key=KEY) from None
        if not callable(getattr(target, "compare", None)):
            raise ConfigError(f"{spec!r} has no compare(prompt, response_a, response_b) method", key=KEY)
        self.spec = spec
        self.model = target
        own = getattr(target, "identity", None)
        self.identity = f"pairwise-rm|{spec}" + (f"|{own}" if own is not None else "")
        self.failure_reasons: Counter[str] = Counter()

    @classmethod
    def from_config(cls, options):
        return cls(getattr(options, KEY, None))

    def __repr__(self) -> str:
        return f"PairwiseRewardModel({self.spec!r})"

    def compare(self, items: list[PairItem]) -> list[float | None]:
        return [self._compare_one(*item) for item in items]

    def _compare_one(self, prompt: str, a: str, b: str) -> float | None:
        try:
            value = self.model.compare(prompt, a, b)
        except Exception as err:  # a user's model may raise anything; one item fails, not the run
            log.warning("pairwise model %s failed on an item: %s: %s", self.spec, type(err).__name__, err)
            self.failure_reasons[f"raised_{type(err).__name__}"] += 1
            return None
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        try:  # numpy and torch scalars too; a string is not a probability, even "0.7"
            probability = math.nan if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            probability = math.nan
        if not (0.0 <= probability <= 1.0):  # NaN fails this too
            self.failure_reasons["not_a_probability"] += 1
            return None
        return probability
