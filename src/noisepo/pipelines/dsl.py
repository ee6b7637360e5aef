"""Dynamic Sample Labeling (METHODS §4.1): turn (human, model) responses + judgements into pairs.

Pointwise (`dsl.mode: pointwise`): per prompt, the human response y and the model's own y' are
scored by s(x, ·):
- s(x, y') > s(x, y) strictly: chosen = y', rejected = y (the label flips);
- otherwise (ties included): chosen = y, rejected = y';
- a failed score on either side: keep chosen = y, and count the failure.
Pairwise (`dsl.mode: pairwise`): a judge says which of y and y' is better, asked twice with the two
positions swapped (human shown as A, then the model's shown as A), since LLM judges favour a
position. The label flips only when y' wins both orders; orders that disagree are a tie (counted)
and, like a human win, keep SPIN's labels; a failed order keeps them too and counts as a failure.
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


_WHO = {"first": "human", "second": "model", None: None}  # pairwise_verdict's names, as label_pairs says them


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def label_pairs(records: list[dict], *, human_scores: list[float | None] | None = None,
                model_scores: list[float | None] | None = None,
                human_wins_as_a: list[float | None] | None = None,
                model_wins_as_a: list[float | None] | None = None, human_key: str = "completion",
                model_key: str = "response") -> tuple[list[dict], LabelStats]:
    """Build preference pairs from records holding the human (`human_key`) and model (`model_key`) text.

    Pointwise: `human_scores`/`model_scores`, one per record. Pairwise: `human_wins_as_a[i]` is the
    judge's P(human beats model) with the human response shown as A, `model_wins_as_a[i]` its
    P(model beats human) with the model's shown as A (1.0/0.0 for an "A"/"B" judge). Neither given:
    DSL is off (SPIN labels). Every other column of a record is carried into its pair, plus
    `flipped`, `human_score`, `model_score` (pairwise: `verdict` and both orders' values instead of
    scores). Returns (trainable pairs, stats).
    """
    pointwise = human_scores is not None or model_scores is not None
    pairwise = human_wins_as_a is not None or model_wins_as_a is not None
    if pointwise and pairwise:
        raise ValueError("pointwise scores or pairwise judgements, not both")
    first, second = (human_scores, model_scores) if pointwise else (human_wins_as_a, model_wins_as_a)
    dsl = pointwise or pairwise
    if dsl and not (first is not None and second is not None and len(first) == len(second) == len(records)):
        raise ValueError("one judgement of each kind per record")
    stats = LabelStats(pairs=len(records))
    pairs, seen_human, seen_model = [], [], []
    for i, record in enumerate(records):
        human, model = record[human_key], record[model_key]
        h = first[i] if dsl else None
        m = second[i] if dsl else None
        if pairwise:
            verdict = _WHO.get(pairwise_verdict(h, m), "tie")
            failed, flip, tie = verdict is None, verdict == "model", verdict == "tie"
        else:
            failed = dsl and (not _finite(h) or not _finite(m))
            flip, tie = bool(dsl and not failed and m > h), bool(dsl and not failed and m == h)
        if dsl and failed:
            stats.scorer_failures += 1
        elif pointwise:
            seen_human.append(h)
            seen_model.append(m)
        stats.ties += tie
        stats.flipped += flip
        if human == model:
            stats.identical += 1
            continue
        extra = {k: v for k, v in record.items() if k not in (human_key, model_key, "chosen", "rejected")}
        judged = ({"human_score": None, "model_score": None, "verdict": verdict, "human_wins_as_a": h,
                   "model_wins_as_a": m} if pairwise else {"human_score": h, "model_score": m})
        pairs.append({**extra, "chosen": model if flip else human, "rejected": human if flip else model,
                      "flipped": flip, **judged})
    stats.trainable = len(pairs)
    stats.mean_human_score = _mean(seen_human)
    stats.mean_model_score = _mean(seen_model)
    return pairs, stats


def pairwise_verdict(first_wins_as_a, second_wins_as_a) -> str | None:
    """Who wins both orders of a position swap: "first", "second", "tie" when the orders disagree
    (or either is an even 0.5), or None when either order failed.

    `first_wins_as_a`: P(first beats second) with the first shown as A; `second_wins_as_a`:
    P(second beats first) with the second shown as A. A judge that always says "A" gives 1.0 and
    1.0: each response wins once, a tie; only a preference that survives the swap counts.
    """
    if not (_finite(first_wins_as_a) and _finite(second_wins_as_a)):
        return None
    if first_wins_as_a < 0.5 and second_wins_as_a > 0.5:
        return "second"
    if first_wins_as_a > 0.5 and second_wins_as_a < 0.5:
        return "first"
    return "tie"


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


def pairwise_win_rate(new_wins_as_a: list[float | None], old_wins_as_a: list[float | None]) -> dict:
    """`win_rate` for a pairwise judge asked both orders: a win is the new response winning both,
    a loss the old one winning both, a tie orders that disagree (`pairwise_verdict`)."""
    counts = {"first": 0, "tie": 0, "second": 0, None: 0}
    for new, old in zip(new_wins_as_a, old_wins_as_a, strict=True):
        counts[pairwise_verdict(new, old)] += 1
    wins, ties, losses = counts["first"], counts["tie"], counts["second"]
    judged = wins + ties + losses
    return {"win_rate": (wins + 0.5 * ties) / judged if judged else None, "wins": wins, "ties": ties,
            "losses": losses, "failures": counts[None]}
