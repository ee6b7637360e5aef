"""PreferenceTrainer on the micro model: accumulation invariance, weights, references, losses, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from noisepo.losses import LOSSES
from noisepo.training.preference import PreferenceTrainer

METRIC_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def tokenizer(micro_model_dir):
    return AutoTokenizer.from_pretrained(micro_model_dir)


def load(micro_model_dir):
    return AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)


def make_pairs(tokenizer, n=8, weights=None):
    """Trivially separable: the chosen answer is the sum, the rejected one a run of 'x' (varied lengths)."""
    eos = tokenizer.eos_token_id
    pairs = []
    for i in range(n):
        pairs.append({"prompt_ids": tokenizer.encode(f"{i}+{i * 3}="),
                      "chosen_ids": tokenizer.encode(str(4 * i)) + [eos],
                      "rejected_ids": tokenizer.encode("x" * (1 + i % 4)) + [eos],
                      "weight": 1.0 if weights is None else weights[i]})
    return pairs


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                  learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                  report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def trainer(model, tmp_path, pairs, tokenizer, *, loss="dpo", training=None, **kwargs):
    return PreferenceTrainer(model, args(tmp_path, **(training or {})), pairs, loss=loss, beta=0.5,
                             processing_class=tokenizer, **kwargs)


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.0, 1.5, 1.0, 3.0, 0.25]])
def test_batch_8x1_equals_1x8_accumulation(micro_model_dir, tokenizer, tmp_path, weights):
    """One SGD step over the same 8 pairs: the weighted mean Σwℓ/Σw is over the whole step in both."""
    pairs = make_pairs(tokenizer, weights=weights)
    big = trainer(load(micro_model_dir), tmp_path / "a", pairs, tokenizer)
    big.train()
    accumulated = trainer(load(micro_model_dir), tmp_path / "b", pairs, tokenizer,
                          training=dict(per_device_train_batch_size=1, gradient_accumulation_steps=8))
    accumulated.train()
    initial = load(micro_model_dir).state_dict()
    moved = 0.0
    for name, value in big.model.state_dict().items():
        assert torch.allclose(value, accumulated.model.state_dict()[name], atol=1e-6), name
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-4  # the step did something
    assert big.state.log_history[-1]["train_loss"] == pytest.approx(
        accumulated.state.log_history[-1]["train_loss"], rel=1e-5)


def batch_gradient(model, tmp_path, pairs, tokenizer):
    tr = trainer(model, tmp_path, pairs, tokenizer)
    batch = tr.data_collator(tr.train_dataset)
    model.zero_grad()
    tr.compute_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_zero_weight_pair_has_no_effect(micro_model_dir, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer, n=4, weights=[1.0, 0.0, 2.0, 1.0])
    with_zero = batch_gradient(load(micro_model_dir), tmp_path / "a", pairs, tokenizer)
    without = batch_gradient(load(micro_model_dir), tmp_path / "b", [p for p in pairs if p["weight"]], tokenizer)
    for name, grad in with_zero.items():
        assert torch.allclose(grad, without[name], atol=1e-7), name


def test_precompute_and_frozen_copy_give_the_same_first_loss(micro_model_dir, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer)
    precomputed = trainer(load(micro_model_dir), tmp_path / "a", pairs, tokenizer, reference="precompute")
    frozen = trainer(load(micro_model_dir), tmp_path / "b", pairs, tokenizer, reference="model")
    assert "reference_chosen_logps" in precomputed.train_dataset[0] and frozen.ref_model is not None
    assert "reference_chosen_logps" not in frozen.train_dataset[0]
    losses = []
    for tr in (precomputed, frozen):
        batch = tr.data_collator(tr.train_dataset)
        losses.append(tr.compute_loss(tr.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference: −log σ(0) = log 2


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_raises_the_margin(micro_model_dir, tokenizer, tmp_path, loss):
    pairs = make_pairs(tokenizer)
    tr = trainer(load(micro_model_dir), tmp_path, pairs, tokenizer, loss=loss, alpha=14.0, label_smoothing=0.1,
                 training=dict(max_steps=6, optim="adamw_torch", learning_rate=3e-3, logging_steps=1))
    tr.train()
    history = [h for h in tr.state.log_history if "rewards/margins" in h]
    assert METRIC_KEYS <= set(history[0])
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    assert history[-1]["loss"] < history[0]["loss"]


def write_pairs(path, n=12):
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": "no" * (1 + i % 3),
                                     "weight": 1.0 + (i % 2)}) + "\n")
    return path


def test_cli_end_to_end(micro_model_dir, tmp_path):
    from noisepo.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl")
    output = tmp_path / "run"
    status = main(["train", "--loss", "ipo", "--model", micro_model_dir, "--data", str(data), "--output",
                   str(output), "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1",
                   "--save-steps", "2", "--learning-rate", "1e-3"])
    assert status in (0, None)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["pairs"] == 12 and "train_loss" in metrics and "rewards/margins" in metrics
    assert list((output / "logs").glob("events.out.tfevents.*"))  # TensorBoard by default
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert METRIC_KEYS <= set(state["log_history"][0])
    saved = AutoModelForCausalLM.from_pretrained(output / "model")
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert set(saved.state_dict()) == set(base.state_dict())
    assert AutoTokenizer.from_pretrained(output / "model").eos_token_id == base.config.eos_token_id

    # --resume continues from the last checkpoint to the new max_steps
    status = main(["train", "--loss", "ipo", "--model", micro_model_dir, "--data", str(data), "--output",
                   str(output), "--max-steps", "4", "--batch-size", "4", "--resume", "--report-to", "none"])
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][0]["step"] == 1


def test_lora_end_to_end(micro_model_dir, tmp_path):
    pytest.importorskip("peft")
    from noisepo.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    output = tmp_path / "run"
    main(["train", "--model", micro_model_dir, "--data", str(data), "--output", str(output), "--lora",
          "--lora-r", "4", "--max-steps", "2", "--batch-size", "4", "--report-to", "none", "--learning-rate", "1e-2",
          "--reference", "model"])
    saved = AutoModelForCausalLM.from_pretrained(output / "model")  # merged: no peft needed to load
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert set(saved.state_dict()) == set(base.state_dict())
    changed = any(not torch.equal(v, base.state_dict()[k]) for k, v in saved.state_dict().items())
    assert changed and (output / "adapter" / "adapter_config.json").exists()


def test_packed_rows_give_the_padded_log_probs_and_gradients(micro_model_dir, tokenizer):
    """Padding-free batches (sequences packed into rows, positions restarting at 0) == padded batches."""
    from noisepo.logprobs import model_sequence_logps
    from noisepo.training.collate import PackedPreferenceCollator, PreferenceCollator

    pairs = make_pairs(tokenizer, n=6)
    pairs[2]["prompt_ids"] = []  # a sequence with no prompt must not be predicted from its row neighbour
    padded = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    packed = PackedPreferenceCollator(tokenizer.pad_token_id)(pairs)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # rows were actually shared
    results = []
    for batch in (padded, packed):
        model = load(micro_model_dir)
        logps = model_sequence_logps(model, batch, chunk_size=7)
        (logps.sum * torch.linspace(0.5, 2.0, 12)).sum().backward()
        results.append((logps, {n: p.grad for n, p in model.named_parameters()}))
    (ours, grads), (theirs, packed_grads) = results
    assert torch.allclose(ours.sum, theirs.sum, atol=1e-5) and torch.equal(ours.count, theirs.count)
    for name, grad in grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-5), name


def test_given_reference_columns_are_used_as_is(micro_model_dir, tokenizer, tmp_path):
    """SPIN/ROPO hand in precomputed reference log-probs: no recomputation, and they enter the loss."""
    pairs = make_pairs(tokenizer, n=4)
    for pair in pairs:
        pair["reference_chosen_logps"], pair["reference_rejected_logps"] = -100.0, 0.0
    tr = trainer(load(micro_model_dir), tmp_path, pairs, tokenizer)
    assert tr.train_dataset is pairs
    batch = tr.data_collator(tr.train_dataset)
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, batch).item()
    assert loss < 1e-3  # ρ_w − ρ_l ≈ 100 − (logps gap), β = 0.5: the margin is huge -> −log σ(h) ≈ 0


class ShiftedRejectedReference(PreferenceTrainer):
    """What NPO will do: replace the rejected side of the reference (here by a constant shift)."""

    def reference_logps(self, inputs):
        chosen, rejected = super().reference_logps(inputs)
        return chosen, type(rejected)(rejected.sum + 10.0, rejected.count)


def test_reference_logps_is_the_hook(micro_model_dir, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer, n=4)
    tr = ShiftedRejectedReference(load(micro_model_dir), args(tmp_path), pairs, loss="dpo", beta=0.5,
                                  processing_class=tokenizer)
    batch = tr.data_collator(tr.train_dataset)
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, batch).item()
    # policy == reference except the rejected reference is 10 higher: Δ = +10, h = 5, −log σ(5)
    assert loss == pytest.approx(torch.nn.functional.softplus(torch.tensor(-5.0)).item(), abs=1e-5)


def test_evaluate_reports_loss_and_metrics(micro_model_dir, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer)
    tr = trainer(load(micro_model_dir), tmp_path, pairs, tokenizer, eval_dataset=make_pairs(tokenizer, n=4))
    metrics = tr.evaluate()
    assert metrics["eval_loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert {"eval_rewards/margins", "eval_logps/chosen"} <= set(metrics)


def test_cli_builds_a_preset_model(tmp_path):
    from noisepo.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    output = tmp_path / "run"
    main(["train", "--model", "micro", "--data", str(data), "--output", str(output), "--max-steps", "1",
          "--batch-size", "4", "--report-to", "none", "--padding-free"])
    assert (output / "base_model" / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(output / "model").config.num_hidden_layers == 2
