"""Pairwise preference losses (METHODS §2), one pure function each, and the name -> function table.

Every loss takes the per-pair sequence log-probs of the policy and the reference, each of shape
(B,), and keyword hyperparameters, and returns the per-pair losses, shape (B,). The trainer
reduces them (weighted mean). Notation (METHODS §1):

    ρ_w = policy_chosen_logps − reference_chosen_logps
    ρ_l = policy_rejected_logps − reference_rejected_logps
    Δ = ρ_w − ρ_l,   h = β·Δ

`log σ` is always `F.logsigmoid` (never `log(sigmoid)`), so every loss and its gradient stay
finite for |h| up to 1e4 in float32, bfloat16 and float16 (IPO's square is taken in float32).

What a loss needs besides its hyperparameters is declared here, not tested by name in the trainer:
`LOSS_INPUTS[name]` says whether it takes log-probs summed over the response tokens (`"sum"`) or
averaged over them (`"mean"`, IPO as in TRL); `loss_function(name, **hyperparameters)` binds the
hyperparameters a loss accepts and ignores the others.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Reduction = Literal["sum", "mean"]


def margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
           reference_chosen_logps: Tensor, reference_rejected_logps: Tensor) -> Tensor:
    """Δ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)), shape (B,)."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def dpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float) -> Tensor:
    """DPO: `−log σ(h)` (DPO paper Eq. 7; METHODS §2 `dpo`, and `spin`). All tensors (B,)."""
    h = beta * margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -F.logsigmoid(h)


def cdpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
         reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
         label_smoothing: float) -> Tensor:
    """Conservative DPO: `−(1−ε) log σ(h) − ε log σ(−h)` (METHODS §2 `cdpo`). All tensors (B,).

    The label-smoothed DPO of the reference implementation: the label is believed with
    probability 1−ε. At ε = 0 it is `dpo`.
    """
    h = beta * margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def rdpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
         reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
         label_smoothing: float) -> Tensor:
    """Robust DPO: `(−(1−ε) log σ(h) + ε log σ(−h)) / (1−2ε)` (rDPO paper Eq. 8; METHODS §2 `rdpo`).

    ε = flip rate, in [0, 0.5); the estimator is unbiased for the clean loss under symmetric flips.
    All tensors (B,). TRL's `robust` loss with `label_smoothing = ε`.
    """
    h = beta * margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (1 - 2 * label_smoothing)


def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float) -> Tensor:
    """IPO: `(Δ_avg − 1/(2β))²` (IPO paper Eq. 17, τ = β; METHODS §2 `ipo`). All tensors (B,).

    Takes **length-averaged** log-probs (`LOSS_INPUTS["ipo"] == "mean"`), as TRL does: with summed
    log-probs the squared loss would grow with the response length. The square is taken in at
    least float32: in float16 it overflows to inf once |Δ_avg| passes ~255.
    """
    delta = margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    return (delta - 1 / (2 * beta)) ** 2


def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
          reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float) -> Tensor:
    """Hinge (SLiC): `max(0, 1 − h)` (METHODS §2 `hinge`). All tensors (B,)."""
    h = beta * margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return torch.relu(1 - h)


def ropo_scale(alpha: float) -> float:
    """c(α) = 4α/(1+α)²: makes ROPO's gradient weight peak at exactly 1 (METHODS §2 `ropo`)."""
    return 4 * alpha / (1 + alpha) ** 2


def ropo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
         reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
         alpha: float) -> Tensor:
    """ROPO: `c(α)·[−log σ(h) + α·σ(−h)]`, `c(α) = 4α/(1+α)²` (ROPO paper; METHODS §2 `ropo`).

    With p = σ(−h) the gradient weight −dℓ/dh is `c(α)·p·(1 + α(1−p))`: it peaks at exactly 1 at
    p = (1+α)/(2α), i.e. h = log((α−1)/(α+1)), and falls to c(α) as h → −∞, so confidently-wrong
    pairs (likely flipped labels) are pushed less than by DPO, whose weight p tends to 1.
    All tensors (B,).
    """
    h = beta * margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return ropo_scale(alpha) * (-F.logsigmoid(h) + alpha * torch.sigmoid(-h))


LossFunction = Callable[..., Tensor]

LOSSES: dict[str, LossFunction] = {
    "dpo": dpo,
    "cdpo": cdpo,
    "rdpo": rdpo,
    "ipo": ipo,
    "hinge": hinge,
    "ropo": ropo,
}

# Which sequence log-probs each loss takes: summed over response tokens, or averaged over them.
LOSS_INPUTS: dict[str, Reduction] = {name: "sum" for name in LOSSES} | {"ipo": "mean"}


def loss_function(name: str, **hyperparameters: float) -> LossFunction:
    """`LOSSES[name]` with the hyperparameters it accepts bound (the others are ignored).

    `loss_function("ropo", beta=0.1, label_smoothing=0.0, alpha=14.0)` binds beta and alpha, so a
    caller can pass every option it has without knowing which loss wants which.
    """
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; losses: {', '.join(LOSSES)}")
    fn = LOSSES[name]
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return functools.partial(fn, **{k: v for k, v in hyperparameters.items() if k in accepted})
