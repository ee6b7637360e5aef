"""NPOTrainer on the micro model (METHODS §4.2): gradients stay on their side, σ = 0 is DPO, the
noise head is optimised, logged, checkpointed and never exported, and how σ moves.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from noisepo.noise import NoiseHead, noisy_sequence_logps, npo_objective
from noisepo.training.npo import NOISE_HEAD_FILE, NPOTrainer
from noisepo.training.preference import PreferenceTrainer


@pytest.fixture(scope="module")
def tokenizer(micro_model_dir):
    return AutoTokenizer.from_pretrained(micro_model_dir)


def load(micro_model_dir):
    return AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)


def make_pairs(tokenizer, n=8):
    eos = tokenizer.eos_token_id
    return [{"prompt_ids": tokenizer.encode(f"{i}+{i * 3}="), "chosen_ids": tokenizer.encode(str(4 * i)) + [eos],
             "rejected_ids": tokenizer.encode("x" * (1 + i % 4)) + [eos], "weight": 1.0} for i in range(n)]


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                  learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                  report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  logging_steps=1)
    values.update(overrides)
    return TrainingArguments(**values)


def npo(model, tmp_path, pairs, tokenizer, training=None, **kwargs):
    return NPOTrainer(model, args(tmp_path, **(training or {})), pairs, beta=0.5, processing_class=tokenizer,
                      **kwargs)


@pytest.mark.parametrize("cache", [False, True])
def test_policy_loss_reaches_only_the_policy_and_noise_loss_only_the_head(micro_model_dir, tokenizer, tmp_path,
                                                                           cache):
    model = load(micro_model_dir)
    tr = npo(model, tmp_path, make_pairs(tokenizer), tokenizer, sigma0=0.3, cache_reference_states=cache)
    batch = tr.data_collator(tr.train_dataset)
    model.train()
    pc, pr = tr.policy_logps(model, batch)
    ref = tr.noisy_reference_logps(batch)
    policy_losses, noise_loss = npo_objective(pc.sum, pr.sum, ref.chosen.sum, ref.rejected, ref.penalised_sq, beta=0.5)

    policy_losses.mean().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in tr.noise_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert cache or all(p.grad is None for p in tr.ref_model.parameters())

    model.zero_grad(set_to_none=True)
    noise_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert tr.noise_head.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("cache", [False, True])
def test_with_sigma_held_at_zero_npo_is_dpo_exactly(micro_model_dir, tokenizer, tmp_path, cache):
    """σ ≡ 0: the noisy reference is the clean one, so loss and policy gradients are DPO's."""
    pairs = make_pairs(tokenizer)
    dpo_model, npo_model = load(micro_model_dir), load(micro_model_dir)
    dpo = PreferenceTrainer(dpo_model, args(tmp_path / "d"), pairs, loss="dpo", beta=0.5, processing_class=tokenizer)
    tr = npo(npo_model, tmp_path / "n", pairs, tokenizer, cache_reference_states=cache)
    with torch.no_grad():
        tr.noise_head.bias.fill_(-1e4)  # softplus(-1e4) == 0 exactly: σ ≡ 0 (W = 0 in a fresh head)
    dpo_model.train()
    npo_model.train()
    dpo_loss = dpo.compute_loss(dpo_model, dpo.data_collator(dpo.train_dataset))
    npo_loss = tr.compute_loss(npo_model, tr.data_collator(tr.train_dataset))  # the same pairs (+ states)
    # the noisy forward is a different (chunked, noise-added) computation of the same log-softmax
    assert torch.allclose(npo_loss, dpo_loss, atol=1e-5)
    dpo_loss.backward()
    npo_loss.backward()
    for (name, a), b in zip(dpo_model.named_parameters(), npo_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_training_updates_head_logs_sigma_and_exports_no_noise(micro_model_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file

    from noisepo.pipelines.common import save_model_atomically

    model = load(micro_model_dir)
    tr = npo(model, tmp_path, make_pairs(tokenizer), tokenizer, sigma0=0.1, noise_lr=0.5,
             training=dict(max_steps=3, save_strategy="steps", save_steps=2))
    bias_before = tr.noise_head.bias.detach().clone()
    tr.train()
    assert not torch.equal(tr.noise_head.bias, bias_before)  # the head was optimised
    groups = [g for g in tr.optimizer.param_groups if g.get("noise_head")]
    assert len(groups) == 1 and groups[0]["lr"] == 0.5
    logged = [h for h in tr.state.log_history if "npo/sigma_mean" in h]
    assert len(logged) == 3 and all("npo/noise_loss" in h for h in logged)
    assert logged[0]["npo/sigma_mean"] == pytest.approx(0.1, rel=1e-4)  # step 1 reads the fresh head
    # checkpointed beside the optimizer state ...
    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / NOISE_HEAD_FILE))
    assert set(saved) == {"weight", "bias"}
    # ... never in the exported policy
    assert not any("noise" in name for name in tr.model.state_dict())
    save_model_atomically(tr.model, tokenizer, tmp_path / "exported")
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) <= set(load(micro_model_dir).state_dict())  # the policy's own weights only
    assert not any("noise" in name for name in exported)


def test_resume_reloads_the_noise_head(micro_model_dir, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer)
    straight = npo(load(micro_model_dir), tmp_path / "a", pairs, tokenizer, sigma0=0.1, noise_lr=0.5,
                   training=dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2))
    straight.train()
    resumed = npo(load(micro_model_dir), tmp_path / "b", pairs, tokenizer, sigma0=0.1, noise_lr=0.5,
                  training=dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                                output_dir=str(tmp_path / "a" / "out")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert torch.allclose(resumed.noise_head.bias, straight.noise_head.bias, atol=1e-6)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("rank", [None, 3])
def test_cached_reference_states_give_the_forward_numbers_without_a_reference_model(
        micro_model_dir, tokenizer, tmp_path, rank):
    pairs = make_pairs(tokenizer)
    results = []
    for cache in (False, True):
        model = load(micro_model_dir)
        torch.manual_seed(3)
        tr = npo(model, tmp_path / str(cache), pairs, tokenizer, sigma0=0.3, noise_rank=rank,
                 cache_reference_states=cache)
        assert (tr.ref_model is None) == cache
        batch = tr._prepare_inputs(tr.data_collator(tr.train_dataset))
        model.train()
        torch.manual_seed(0)
        loss = tr.compute_loss(model, batch)
        loss.backward()
        logged = tr._metrics["train"]["npo/sigma_mean"][-1]
        results.append((loss.detach(), logged, [p.grad.clone() for p in model.parameters()],
                        [p.grad.clone() for p in tr.noise_head.parameters()]))
    (loss_a, sigma_a, policy_a, head_a), (loss_b, sigma_b, policy_b, head_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5) and torch.allclose(sigma_a, sigma_b, atol=1e-7)
    for a, b in zip(policy_a + head_a, policy_b + head_b):
        assert torch.allclose(a, b, atol=1e-5)


def test_auto_caches_the_reference_states_only_when_they_fit_and_the_reference_is_the_policy(
        micro_model_dir, tokenizer, tmp_path, monkeypatch):
    import noisepo.training.npo as npo_module

    pairs = make_pairs(tokenizer)
    model = load(micro_model_dir)
    d = model.get_output_embeddings().weight.shape[1]
    tokens = sum(len(p["rejected_ids"]) for p in pairs)
    assert npo_module.reference_states_bytes(pairs, model) == tokens * d * 4  # float32
    assert npo_module.reference_states_bytes([{"prompt": "x"}], model) is None  # not tokenised
    default = npo(model, tmp_path / "a", pairs, tokenizer)  # the default is "auto": these states fit
    assert default.cache_reference_states and default.ref_model is None
    assert npo_module.STATES_COLUMN in default.train_dataset[0]
    given = npo(load(micro_model_dir), tmp_path / "b", pairs, tokenizer, ref_model=load(micro_model_dir))
    assert not given.cache_reference_states and given.ref_model is not None  # a separate reference: never cached
    monkeypatch.setattr(npo_module, "CACHE_STATES_BUDGET_BYTES", tokens * d * 4 - 1)  # one byte short
    over = npo(load(micro_model_dir), tmp_path / "c", pairs, tokenizer)
    assert not over.cache_reference_states and over.ref_model is not None
    with pytest.raises(ValueError, match="auto"):
        npo(load(micro_model_dir), tmp_path / "d", pairs, tokenizer, cache_reference_states="yes")


def test_low_rank_head_and_rejecting_other_losses(micro_model_dir, tokenizer, tmp_path):
    tr = npo(load(micro_model_dir), tmp_path, make_pairs(tokenizer), tokenizer, noise_rank=4,
             cache_reference_states=True, training=dict(max_steps=2, per_device_train_batch_size=4))
    assert tr.noise_head.rank == 4
    tr.train()
    assert len([h for h in tr.state.log_history if "npo/sigma_mean" in h]) == 2
    with pytest.raises(ValueError, match="DPO"):
        npo(load(micro_model_dir), tmp_path, make_pairs(tokenizer), tokenizer, loss="ipo")


# ---------------------------------------------------------------------- how σ moves
def _sigma_after(steps, *, margin_offset, penalty, vocab=64, lr=0.05, seed=0):
    """Train only a fresh head (Adam, σ₀ = 0.01) against fixed reference states; return mean σ.

    Policy log-probs are fixed so that the clean margin is `margin_offset` (in units of β·Δ).
    """
    g = torch.Generator().manual_seed(seed)
    B, T, d = 8, 6, 16
    hidden = torch.randn(B, T, d, generator=g)
    lm_weight = torch.randn(vocab, d, generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    head = NoiseHead(d, vocab, sigma0=0.01)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    torch.manual_seed(seed)
    with torch.no_grad():
        clean, _, _ = noisy_sequence_logps(hidden, labels, lm_weight, NoiseHead(d, vocab, sigma0=1e-12))
    beta = 0.5
    pc, rc = torch.zeros(B), torch.zeros(B)
    pr = clean - margin_offset / beta  # M = β(0 − (pr − rr)) = margin_offset at σ = 0
    for _ in range(steps):
        noisy, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head)
        _, noise_loss = npo_objective(pc, pr, rc, noisy, sq, beta=beta, noise_penalty=penalty)
        optimizer.zero_grad()
        noise_loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head(hidden).mean().item()


def test_sigma_grows_when_the_loss_is_not_saturated_and_stalls_when_the_margin_is_large():
    """What actually happens (reported in docs/dnpo.md): the head's ascent gradient on ℓ(M) is
    β·σ(−M)·∂(−log π̃)/∂σ. Raising σ lowers E[log π̃_ref(y_l)] (Jensen on logsumexp), so σ grows
    where the policy's margin is small or negative. Where the margin is LARGE, σ(−M) ≈ 0: the
    ascent gradient vanishes and the α_σ penalty alone pulls σ back down.
    """
    small_margin = _sigma_after(40, margin_offset=0.0, penalty=0.0)
    small_margin_penalised = _sigma_after(40, margin_offset=0.0, penalty=1.0)
    large_margin = _sigma_after(40, margin_offset=20.0, penalty=1.0)
    assert small_margin > 0.05  # grows well above σ₀ = 0.01
    assert small_margin_penalised > 0.01  # α_σ = 1 with the mean over V: the penalty is weak per entry
    assert large_margin < 0.01  # saturated loss: nothing pushes σ up, the penalty shrinks it


# ---------------------------------------------------------------- issue 20: the noise's effect, logged
def _logged_npo(tr) -> dict:
    return next(h for h in tr.state.log_history if "npo/margin_effect" in h)


@pytest.mark.parametrize("cache", [False, True])
def test_margin_effect_and_moved_weights_read_zero_without_noise_and_clearly_nonzero_at_sigma_1(
        micro_model_dir, tokenizer, tmp_path, cache):
    """The diagnostics of issue 20 on a toy: |M_noisy − M_clean|, the share of pairs whose DPO weight
    σ(−M) moves by > 10 %, σ at the rejected tokens and the gradient norms of the head's two terms."""
    pairs = make_pairs(tokenizer)
    silent = npo(load(micro_model_dir), tmp_path / "zero", pairs, tokenizer, cache_reference_states=cache)
    with torch.no_grad():
        silent.noise_head.bias.fill_(-1e4)  # σ ≡ 0
    silent.train()
    zero = _logged_npo(silent)
    # (the noisy path recomputes the clean log-probs the reference column holds: float rounding apart)
    assert zero["npo/margin_effect"] < 1e-5 and zero["npo/margin_effect_max"] < 1e-5
    assert zero["npo/weight_moved"] == 0.0 and zero["npo/sigma_target"] == 0.0
    assert zero["npo/relative_weight_moved"] == 0.0 and zero["npo/weight_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert zero["npo/grad_norm_penalty"] == 0.0

    loud = npo(load(micro_model_dir), tmp_path / "one", pairs, tokenizer, sigma0=1.0, cache_reference_states=cache)
    loud.train()
    one = _logged_npo(loud)
    assert one["npo/margin_effect"] > 0.05 and one["npo/margin_effect_max"] >= one["npo/margin_effect"]
    assert one["npo/weight_moved"] > 0 and one["npo/sigma_target"] == pytest.approx(1.0, rel=1e-3)
    assert one["npo/weight_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert one["npo/grad_norm_loss"] > 0 and one["npo/grad_norm_penalty"] > 0
    summary = loud.npo_summary()
    assert summary["margin_effect"] == pytest.approx(one["npo/margin_effect"], rel=1e-5)


def test_bounded_head_moves_within_its_bound_and_its_penalty_term_is_zero(
        micro_model_dir, tokenizer, tmp_path):
    tr = npo(load(micro_model_dir), tmp_path, make_pairs(tokenizer), tokenizer, sigma0=0.5, sigma_max=1.0,
             constraint="bound", noise_lr=0.5, training=dict(max_steps=6, optim="adamw_torch"))
    tr.train()
    logged = [h for h in tr.state.log_history if "npo/sigma_mean" in h]
    assert logged[-1]["npo/sigma_target"] != pytest.approx(0.5, abs=1e-3)  # the head moved ...
    assert 0 < logged[-1]["npo/sigma_target"] <= 1.0 and 0 < logged[-1]["npo/sigma_mean"] <= 1.0  # ... inside it
    assert all(h["npo/grad_norm_penalty"] == 0.0 for h in logged)  # constraint "bound": α_σ ignored


def test_alternating_schedule_steps_the_head_on_its_own_k_times_per_policy_step(micro_model_dir, tokenizer,
                                                                               tmp_path):
    pairs = make_pairs(tokenizer)
    policy_start = load(micro_model_dir)
    tr = npo(load(micro_model_dir), tmp_path, pairs, tokenizer, sigma0=0.5, sigma_max=1.0, constraint="bound",
             schedule="alternating", head_steps=3, noise_lr=0.1, training=dict(max_steps=2, save_strategy="steps",
                                                                                save_steps=1))
    bias_before = tr.noise_head.bias.detach().clone()
    tr.train()
    assert not any(g.get("noise_head") for g in tr.optimizer.param_groups)  # the head has its own optimizer
    assert tr.head_optimizer is not None
    assert tr.head_optimizer.state[tr.noise_head.bias]["step"].item() == 6  # 3 head steps × 2 policy steps
    assert not torch.equal(tr.noise_head.bias, bias_before)
    assert any(not torch.equal(a, b) for a, b in zip(tr.model.parameters(), policy_start.parameters()))
    from safetensors.torch import load_file

    from noisepo.training.npo import NOISE_OPTIMIZER_FILE

    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / NOISE_OPTIMIZER_FILE))
    assert {"bias.exp_avg", "bias.exp_avg_sq", "bias.step"} <= set(saved)


@pytest.mark.parametrize("options, message", [
    (dict(constraint="box"), "constraint"), (dict(constraint="bound"), "sigma_max"),
    (dict(constraint="bound", sigma0=1.0, sigma_max=1.0), "sigma_max"), (dict(head_steps=0), "head_steps"),
    (dict(schedule="sometimes"), "schedule"), (dict(resample="never"), "resample"),
    (dict(objective="eq10", schedule="alternating"), "eq10"), (dict(penalty_over="all"), "penalty_over")])
def test_the_trainer_refuses_bad_npo_options(micro_model_dir, tokenizer, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        npo(load(micro_model_dir), tmp_path, make_pairs(tokenizer), tokenizer, **options)


@pytest.mark.parametrize("objective", ["minmax", "eq10"])
def test_fixed_noise_per_pair_and_eq10_train_and_log(micro_model_dir, tokenizer, tmp_path, objective):
    tr = npo(load(micro_model_dir), tmp_path, make_pairs(tokenizer), tokenizer, sigma0=1.0, sigma_max=2.0,
             constraint="both", noise_penalty=0.1, resample="pair_epoch", objective=objective,
             training=dict(max_steps=2, per_device_train_batch_size=4))
    batch = tr.data_collator(tr.train_dataset[:4])
    tr.model.train()
    first, again = (tr.noisy_reference_logps(batch).rejected.detach() for _ in range(2))
    assert torch.equal(first, again)  # the same pair, the same epoch: the same noise
    tr.state.epoch = 1.0
    assert not torch.equal(first, tr.noisy_reference_logps(batch).rejected.detach())  # a new epoch redraws
    tr.state.epoch = 0.0
    tr.train()
    assert _logged_npo(tr)["npo/margin_effect"] > 0
