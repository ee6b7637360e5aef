"""ROPO's filter and rejection-sampling choice (METHODS §5.1-5.2), as pure functions.

For a fixed model the optimal weights of ROPO's constrained problem keep the (1−ρ)N pairs with the
smallest ℓ_ropo and discard the rest, so filtering is a sort. Rejection sampling refills a discarded
prompt with the (highest, lowest) implicit-reward candidates: ℓ_ropo falls as the margin grows, so
this is the candidate pair of smallest ℓ_ropo.
"""
from __future__ import annotations

import math


def kept_count(total: int, rho: float) -> int:
    """How many pairs are kept: round((1−ρ)·N), at least 1 when N > 0."""
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    return min(total, max(1 if total else 0, round((1 - rho) * total)))


def filter_margin(policy_chosen: float, policy_rejected: float, reference_chosen: float, reference_rejected: float,
                  *, beta: float, reference_weight: float) -> float:
    """The filter's credibility of a pair, h_γ = β[(log π(y_w) − log π(y_l)) − γ(log π_ref(y_w) − log π_ref(y_l))].

    γ = 1 is ℓ_ropo's own margin (the paper's filter); γ = 0 is the current model's plain likelihood
    preference. h_γ = γ·h + (1 − γ)·β log π(y_w)/π(y_l): the DPO margin only says how far training has
    moved a pair, ~0 for a pair it has not touched yet (then noise decides its sign); the likelihood
    term adds what the model already believes about it (METHODS §5.1, our addition).
    """
    return beta * ((policy_chosen - policy_rejected) - reference_weight * (reference_chosen - reference_rejected))


def is_misranked(margin: float) -> bool:
    """The model prefers the response labelled rejected (h < 0), or cannot score the pair (NaN)."""
    return math.isnan(margin) or margin < 0


def select_kept(losses: list[float], rho: float, margins: list[float] | None = None) -> list[bool]:
    """keep[i] is True for the (1−ρ)N lowest losses; ties break by index (deterministic).

    A NaN loss sorts last (it is discarded first): a pair the model cannot score is not credible.
    With `margins` (h per pair), only misranked pairs (h < 0 or NaN: the model prefers the response
    labelled rejected) may be discarded, so at most ρN are and a pair the model agrees with is always kept.
    """
    order = sorted(range(len(losses)), key=lambda i: (math.isnan(losses[i]), losses[i], i))
    keep = [False] * len(losses)
    for i in order[:kept_count(len(losses), rho)]:
        keep[i] = True
    if margins is not None:
        for i, h in enumerate(margins):
            if not is_misranked(h):
                keep[i] = True
    return keep


def filter_quality(kept: list[bool], flipped: list[bool], reference_agrees: list[bool] | None = None) -> dict:
    """Precision and recall of the discarded set at catching truly flipped pairs.

    With `reference_agrees` (the initial model prefers the response labelled chosen), also the recall of
    the *harmful* flips: those the initial model agrees with, so that training on them reinforces its
    own error. A flip the model already disbelieves is easy to catch and does little harm; precision
    counts both alike (issue 23: a filter with precision 1.00 kept every harmful flip).
    """
    discarded_flipped = sum(1 for k, f in zip(kept, flipped, strict=True) if not k and f)
    discarded = sum(1 for k in kept if not k)
    total_flipped = sum(1 for f in flipped if f)
    quality = {
        "discarded": discarded,
        "flipped_total": total_flipped,
        "discarded_flipped": discarded_flipped,
        "filter_precision": discarded_flipped / discarded if discarded else None,
        "filter_recall": discarded_flipped / total_flipped if total_flipped else None,
    }
    if reference_agrees is not None:
        harmful = [f and a for f, a in zip(flipped, reference_agrees, strict=True)]
        caught = sum(1 for k, h in zip(kept, harmful) if h and not k)
        quality.update({"harmful_flipped": sum(harmful), "discarded_harmful_flipped": caught,
                        "harmful_flip_recall": caught / sum(harmful) if any(harmful) else None})
    return quality


def best_worst_pair(candidates: list[str], rewards: list[float]) -> tuple[int, int] | None:
    """Indices (chosen, rejected) of the highest and lowest reward; None when their texts are equal.

    Ties resolve to the earliest candidate, so the originals (listed first) win ties.
    """
    if len(candidates) != len(rewards) or not candidates:
        raise ValueError("one reward per candidate, at least one candidate")
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if candidates[best] == candidates[worst]:
        return None
    return best, worst
