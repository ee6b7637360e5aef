"""The pairwise losses: hand-worked values, limits, numerical safety, ROPO's gradient weight, TRL parity."""
from __future__ import annotations

import math
import typing
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from noisepo.losses import LOSS_INPUTS, LOSSES, loss_function, ropo_scale
from noisepo.training.config import LossName


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# policy_chosen, policy_rejected, reference_chosen, reference_rejected = -1, -3, -2, -2:
# ρ_w = -1 - (-2) = 1, ρ_l = -3 - (-2) = -1, Δ = 2.
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
SOFTPLUS_M1 = math.log1p(math.exp(-1))  # -log σ(1) = log(1 + e^-1) = 0.3132616875
SOFTPLUS_P1 = math.log1p(math.exp(1))  # -log σ(-1) = log(1 + e)   = 1.3132616875


def test_table_matches_config_names():
    assert set(LOSSES) == set(typing.get_args(LossName))
    assert set(LOSS_INPUTS) == set(LOSSES) and LOSS_INPUTS["ipo"] == "mean"
    assert {LOSS_INPUTS[name] for name in LOSSES if name != "ipo"} == {"sum"}


def test_dpo_by_hand():
    """β = 0.5, Δ = 2 -> h = 1; −log σ(1) = log(1 + e^−1) = 0.31326."""
    assert LOSSES["dpo"](*PAIR, beta=0.5).item() == pytest.approx(SOFTPLUS_M1, abs=1e-12)


def test_cdpo_by_hand():
    """h = 1, ε = 0.1: 0.9·0.31326 + 0.1·1.31326 = 0.28194 + 0.13133 = 0.41326."""
    value = LOSSES["cdpo"](*PAIR, beta=0.5, label_smoothing=0.1).item()
    assert value == pytest.approx(0.9 * SOFTPLUS_M1 + 0.1 * SOFTPLUS_P1, abs=1e-12)
    assert value == pytest.approx(0.41326169, abs=1e-8)


def test_rdpo_by_hand():
    """h = 1, ε = 0.1: (0.9·0.31326 − 0.1·1.31326) / 0.8 = (0.28194 − 0.13133) / 0.8 = 0.18826."""
    value = LOSSES["rdpo"](*PAIR, beta=0.5, label_smoothing=0.1).item()
    assert value == pytest.approx((0.9 * SOFTPLUS_M1 - 0.1 * SOFTPLUS_P1) / 0.8, abs=1e-12)
    assert value == pytest.approx(0.18826169, abs=1e-8)


def test_ipo_by_hand():
    """Δ = 2 (of whatever log-probs are given: the trainer passes means), β = 0.5: (2 − 1/(2·0.5))² = 1;
    β = 0.25: (2 − 2)² = 0; β = 1: (2 − 0.5)² = 2.25."""
    assert LOSSES["ipo"](*PAIR, beta=0.5).item() == pytest.approx(1.0)
    assert LOSSES["ipo"](*PAIR, beta=0.25).item() == pytest.approx(0.0)
    assert LOSSES["ipo"](*PAIR, beta=1.0).item() == pytest.approx(2.25)


def test_hinge_by_hand():
    """β = 0.25 -> h = 0.5: max(0, 1 − 0.5) = 0.5; β = 1 -> h = 2: max(0, −1) = 0."""
    assert LOSSES["hinge"](*PAIR, beta=0.25).item() == pytest.approx(0.5)
    assert LOSSES["hinge"](*PAIR, beta=1.0).item() == 0.0


def test_ropo_by_hand():
    """α = 14: c = 4·14/15² = 56/225 = 0.248889; h = 1: σ(−1) = 0.268941;
    c·(0.313262 + 14·0.268941) = 0.248889·(0.313262 + 3.765180) = 0.248889·4.078442 = 1.015079."""
    assert ropo_scale(14.0) == pytest.approx(56 / 225)
    value = LOSSES["ropo"](*PAIR, beta=0.5, alpha=14.0).item()
    assert value == pytest.approx(56 / 225 * (SOFTPLUS_M1 + 14 / (1 + math.e)), abs=1e-12)
    assert value == pytest.approx(1.015079, abs=1e-6)


@pytest.mark.parametrize("name", ["cdpo", "rdpo"])
def test_label_smoothing_zero_is_dpo(name):
    torch.manual_seed(0)
    logps = [torch.randn(16, dtype=torch.float64) * 5 for _ in range(4)]
    assert torch.allclose(LOSSES[name](*logps, beta=0.3, label_smoothing=0.0), LOSSES["dpo"](*logps, beta=0.3))


def test_loss_function_binds_only_accepted_hyperparameters():
    every = dict(beta=0.5, label_smoothing=0.1, alpha=14.0)
    for name in LOSSES:
        assert torch.isfinite(loss_function(name, **every)(*PAIR))
    assert loss_function("cdpo", **every)(*PAIR).item() == pytest.approx(0.41326169, abs=1e-8)
    with pytest.raises(KeyError):
        loss_function("nope", beta=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_with_finite_gradients_at_extreme_margins(name, dtype):
    h = t(-1e4, -1e3, -30.0, 0.0, 30.0, 1e3, 1e4, dtype=dtype)
    policy_chosen = h.clone().requires_grad_(True)  # β = 1, other log-probs 0 -> h = Δ = policy_chosen
    zeros = torch.zeros_like(h)
    fn = loss_function(name, beta=1.0, label_smoothing=0.1, alpha=14.0)
    losses = fn(policy_chosen, zeros, zeros, zeros)
    losses.sum().backward()
    expected = torch.promote_types(dtype, torch.float32) if name == "ipo" else dtype  # IPO squares in fp32
    assert losses.dtype == expected and torch.isfinite(losses).all(), losses
    assert torch.isfinite(policy_chosen.grad).all(), policy_chosen.grad


def ropo_weight(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """−dℓ/dh by autograd (β = 1, so h = policy_chosen)."""
    h = h.clone().requires_grad_(True)
    zeros = torch.zeros_like(h)
    LOSSES["ropo"](h, zeros, zeros, zeros, beta=1.0, alpha=alpha).sum().backward()
    return -h.grad


def test_ropo_weight_peaks_at_one_and_tends_to_c():
    """−dℓ/dh = c·p·(1 + α(1−p)), p = σ(−h). d/dp [p + αp − αp²] = 1 + α − 2αp = 0 at p* = (1+α)/(2α);
    there p*(1 + α(1−p*)) = (1+α)/(2α) · (1+α)/2 = (1+α)²/(4α), times c = 4α/(1+α)²: exactly 1.
    h* = log((1−p*)/p*) = log((α−1)/(α+1)) = log(13/15) = −0.1431 for α = 14. As h → −∞, p → 1 and the
    weight -> c·1·(1 + 0) = c = 56/225 = 0.2489 (DPO's weight p tends to 1)."""
    alpha = 14.0
    h_star = math.log((alpha - 1) / (alpha + 1))
    grid = torch.linspace(-10, 10, 200_001, dtype=torch.float64)  # step 1e-4
    weights = ropo_weight(grid, alpha)
    assert weights.max().item() == pytest.approx(1.0, abs=1e-8)
    assert grid[weights.argmax()].item() == pytest.approx(h_star, abs=1e-4)
    assert ropo_weight(t(h_star), alpha).item() == pytest.approx(1.0, abs=1e-14)
    assert ropo_weight(t(-60.0), alpha).item() == pytest.approx(4 * alpha / (1 + alpha) ** 2, rel=1e-12)
    for other in (3.0, 30.0):  # the peak is 1 for every α >= 1
        assert ropo_weight(t(math.log((other - 1) / (other + 1))), other).item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------- TRL parity
def trl_loss(loss_type: str, beta: float, label_smoothing: float, chosen: tuple, rejected: tuple) -> float:
    """TRL 1.16's `DPOTrainer._compute_loss` on given log-probs, without a real model or trainer.

    `_compute_loss(self, model, inputs, ...)` reads the policy's per-token log-probs from
    `model(..., fused_lm_head=True).log_probs` and, with `precompute_ref_logps`, the reference's
    summed log-probs from `inputs["ref_chosen_logps" / "ref_rejected_logps"]`. So we call it unbound
    on a stand-in `self` that holds the attributes it reads (beta, loss type, accelerator with
    identity gathers, metric store) and a stand-in model that returns the per-token log-probs we
    choose: a side with summed log-prob L over n response tokens gets L/n on each of its n
    tokens, and `completion_mask` marks those n tokens (so IPO's length normalisation sees n).
    `chosen` / `rejected` = (policy_logp, reference_logp, n_tokens). One pair per call, so the
    batch mean TRL returns is the per-pair loss.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    sides = [chosen, rejected]
    width = max(n for _, _, n in sides) + 1  # one prompt token, then the response
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    per_token = torch.zeros(2, width - 1, dtype=torch.float64)
    for row, (policy, _, n) in enumerate(sides):
        completion_mask[row, 1:1 + n] = 1
        per_token[row, :n] = policy / n

    def model(**kwargs):
        shape = per_token.shape
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                               is_top1=torch.zeros(shape, dtype=torch.bool))

    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": torch.ones(2, width),
              "completion_mask": completion_mask, "ref_chosen_logps": t(chosen[1]), "ref_rejected_logps": t(rejected[1])}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False).item()


@pytest.mark.parametrize("name, loss_type", [("dpo", "sigmoid"), ("rdpo", "robust"), ("ipo", "ipo"),
                                             ("hinge", "hinge")])
def test_parity_with_trl(name, loss_type):
    pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(0)
    for beta, eps in [(0.1, 0.0), (0.5, 0.2), (2.0, 0.1)]:
        for _ in range(8):
            policy_c, policy_r, ref_c, ref_r = (-30 * torch.rand(4, generator=generator, dtype=torch.float64)).tolist()
            n_c, n_r = torch.randint(1, 9, (2,), generator=generator).tolist()
            expected = trl_loss(loss_type, beta, eps, (policy_c, ref_c, n_c), (policy_r, ref_r, n_r))
            if LOSS_INPUTS[name] == "mean":  # what the trainer hands IPO: length-averaged log-probs
                policy_c, ref_c, policy_r, ref_r = policy_c / n_c, ref_c / n_c, policy_r / n_r, ref_r / n_r
            ours = loss_function(name, beta=beta, label_smoothing=eps)(t(policy_c), t(policy_r), t(ref_c), t(ref_r))
            assert ours.item() == pytest.approx(expected, abs=1e-6, rel=1e-6)


def test_cdpo_is_not_trl_sigmoid_but_the_formula():
    """TRL 1.16's `sigmoid` ignores label_smoothing; cdpo follows −(1−ε) log σ(h) − ε log σ(−h)."""
    pytest.importorskip("trl")
    trl_value = trl_loss("sigmoid", 0.5, 0.1, (-1.0, -2.0, 1), (-3.0, -2.0, 1))
    assert trl_value == pytest.approx(SOFTPLUS_M1, abs=1e-6)  # plain DPO at h = 1
    assert LOSSES["cdpo"](*PAIR, beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.41326169, abs=1e-8)
