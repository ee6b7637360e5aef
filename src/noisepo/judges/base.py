"""The `Scorer` protocol and the factory that builds a scorer from a `ScoreConfig`.

A scorer judges (prompt text, response text) items pointwise and returns one float per item,
or None where it failed (an unparsable judge reply, a request that kept failing, a verifier that
raised). `identity` names everything that decides a score (backend, model, template, options):
it is part of the cache key, so a changed judge never reads another judge's cached scores.

A scorer may also offer `score_stream(items)`, yielding `(index, score)` as each item finishes;
`CachedScorer` uses it to commit every score the moment it arrives.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from noisepo.judges.config import ScorerOptions as ScoreConfig

Item = tuple[str, str]


@runtime_checkable
class Scorer(Protocol):
    identity: str

    def score(self, items: list[Item]) -> list[float | None]:
        ...


@runtime_checkable
class StreamingScorer(Scorer, Protocol):
    def score_stream(self, items: list[Item]) -> Iterator[tuple[int, float | None]]:
        ...


def make_scorer(config: ScoreConfig) -> Scorer:
    """The scorer `config.scorer` names, built from the config's options (no cache)."""
    builders = {
        "openai": _openai,
        "reward-model": _reward_model,
        "verifier": _verifier,
        "local-lm": _local_lm,
    }
    return builders[config.scorer](config)


def _openai(config: ScoreConfig) -> Scorer:
    from noisepo.judges.openai_judge import OpenAIJudge

    return OpenAIJudge(base_url=config.base_url, judge_model=config.judge_model,
                       api_key_env=config.api_key_env, template=config.template,
                       max_concurrency=config.max_concurrency, timeout=config.timeout,
                       max_retries=config.max_retries, max_tokens=config.max_new_tokens)


def _reward_model(config: ScoreConfig) -> Scorer:
    from noisepo.judges.reward_model import RewardModelScorer

    return RewardModelScorer(config.model, batch_size=config.batch_size, max_length=config.max_length,
                             dtype=config.dtype, device=config.device,
                             trust_remote_code=config.trust_remote_code)


def _verifier(config: ScoreConfig) -> Scorer:
    from noisepo.judges.verifier import VerifierScorer

    return VerifierScorer(config.verifier, error_rate=getattr(config, "verifier_error_rate", 0.0))


def _local_lm(config: ScoreConfig) -> Scorer:
    from noisepo.judges.local_lm import LocalLMJudge

    return LocalLMJudge(config.model, template=config.template, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, dtype=config.dtype, device=config.device,
                        trust_remote_code=config.trust_remote_code)
