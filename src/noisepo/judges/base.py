"""The `Scorer` and `Comparer` protocols, and the registry that builds either from a config.

A scorer judges (prompt text, response text) items pointwise and returns one float per item,
or None where it failed (an unparsable judge reply, a request that kept failing, a verifier that
raised). A comparer judges (prompt, response_a, response_b) items pairwise and returns, per item,
the probability that response A is better than response B (1.0 or 0.0 for a judge that answers
"A" or "B"), or None where it failed. `identity` names everything that decides a value (backend,
model, template, options): it is part of the cache key, so a changed judge never reads another
judge's cached values.

Either may also offer `score_stream(items)` / `compare_stream(items)`, yielding `(index, value)` as
each item finishes (`CachedScorer` commits every value the moment it arrives), and
`failure_reasons`, a Counter of its failed items by reason (the stage summaries report it).

The registry is a table of import paths resolved when a scorer is built: this module imports no
scorer module, so no scorer module importing `common` can close a circle through it, and building
a local scorer never imports `openai` (nor the API judge torch).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from noisepo.errors import ConfigError
from noisepo.judges.common import Item, PairItem

if TYPE_CHECKING:
    from noisepo.judges.config import ScorerOptions

__all__ = ["COMPARERS", "SCORERS", "Comparer", "Item", "PairItem", "Scorer", "StreamingScorer",
           "make_comparer", "make_scorer"]

# scorer name -> "module:Class"; each class has `from_config(options)`.
SCORERS = {
    "openai": "noisepo.judges.openai_judge:OpenAIJudge",
    "reward-model": "noisepo.judges.reward_model:RewardModelScorer",
    "verifier": "noisepo.judges.verifier:VerifierScorer",
    "local-lm": "noisepo.judges.local_lm:LocalLMJudge",
}
COMPARERS = {
    "openai": "noisepo.judges.openai_judge:OpenAIPairwiseJudge",
    "local-lm": "noisepo.judges.local_lm:LocalLMPairwiseJudge",
    "pairwise-rm": "noisepo.judges.pairwise_rm:PairwiseRewardModel",
}


@runtime_checkable
class Scorer(Protocol):
    identity: str

    def score(self, items: list[Item]) -> list[float | None]:
        ...


@runtime_checkable
class StreamingScorer(Scorer, Protocol):
    def score_stream(self, items: list[Item]) -> Iterator[tuple[int, float | None]]:
        ...


@runtime_checkable
class Comparer(Protocol):
    identity: str

    def compare(self, items: list[PairItem]) -> list[float | None]:
        ...


def make_scorer(config: ScorerOptions) -> Scorer:
    """The pointwise scorer `config.scorer` names, built from the config's options (no cache)."""
    return _resolve(SCORERS, config.scorer, "pointwise").from_config(config)


def make_comparer(config: ScorerOptions) -> Comparer:
    """The pairwise judge `config.scorer` names, built from the config's options (no cache)."""
    return _resolve(COMPARERS, config.scorer, "pairwise").from_config(config)


def _resolve(table: dict[str, str], name: str, mode: str):
    if name not in table:
        raise ConfigError(f"{name!r} cannot judge {mode}; {mode} scorers: {', '.join(table)}", key="scorer")
    module, _, attribute = table[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
