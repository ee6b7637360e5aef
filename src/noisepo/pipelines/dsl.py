"""Dynamic Sample Labeling (METHODS §4.1): turn (human, model) responses + scores into pairs.

Per prompt, the human response y and the model's own y' are scored by s(x, ·):
- s(x, y') > s(x, y) strictly: chosen = y', rejected = y (the label flips);
- otherwise (ties included): chosen = y, rejected = y';
- a failed score on either side: keep chosen = y, and count the failure.
With DSL off (SPIN) every pair is (chosen = y, rejected = y'). Pairs whose two texts are identical
carry no gradient in any pairwise loss, so they are left out of training and counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LabelStats:
    pairs: int = 0  # prompts seen
    trainable: int = 0  # pairs kept for training (distinct texts)
    flipped: int = 0
    ties: int = 0
    scorer_failures: int = 0
    identical: int = 0
    mean_human_score: float | None = None
    mean_model_score: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def label_pairs(records: list[dict], *, human_scores: list[float | None] | None = None,
                model_scores: list[float | None] | None = None, human_key: str = "completion",
                model_key: str = "response") -> tuple[list[dict], LabelStats]:
    """Build preference pairs from records holding the human (`human_key`) and model (`model_key`) text.

    `human_scores`/`model_scores` None means DSL is off (SPIN labels). Every other column of a record is
    carried into its pair, plus `flipped`, `human_score`, `model_score`. Returns (trainable pairs, stats).
    """
    dsl = human_scores is not None and model_scores is not None
    if dsl and not (len(human_scores) == len(model_scores) == len(records)):
        raise ValueError("one human and one model score per record")
    stats = LabelStats(pairs=len(records))
    pairs, seen_human, seen_model = [], [], []
    for i, record in enumerate(records):
        human, model = record[human_key], record[model_key]
        h = human_scores[i] if dsl else None
        m = model_scores[i] if dsl else None
        failed = dsl and (not _finite(h) or not _finite(m))
        if dsl and failed:
            stats.scorer_failures += 1
        elif dsl:
            seen_human.append(h)
            seen_model.append(m)
        flip = bool(dsl and not failed and m > h)
        if dsl and not failed and m == h:
            stats.ties += 1
        stats.flipped += flip
        if human == model:
            stats.identical += 1
            continue
        extra = {k: v for k, v in record.items() if k not in (human_key, model_key, "chosen", "rejected")}
        pairs.append({**extra, "chosen": model if flip else human, "rejected": human if flip else model,
                      "flipped": flip, "human_score": h, "model_score": m})
    stats.trainable = len(pairs)
    stats.mean_human_score = _mean(seen_human)
    stats.mean_model_score = _mean(seen_model)
    return pairs, stats


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def win_rate(new_scores: list[float | None], old_scores: list[float | None]) -> dict:
    """Head-to-head of two models' responses to the same prompts: wins + ½ ties over scored pairs."""
    wins = ties = losses = failures = 0
    for new, old in zip(new_scores, old_scores, strict=True):
        if not (_finite(new) and _finite(old)):
            failures += 1
        elif new > old:
            wins += 1
        elif new == old:
            ties += 1
        else:
            losses += 1
    judged = wins + ties + losses
    return {"win_rate": (wins + 0.5 * ties) / judged if judged else None, "wins": wins, "ties": ties,
            "losses": losses, "failures": failures}
