"""What every loop does with models: train on pairs, score pairs and responses, evaluate on a task.

Shared by the SPIN/DNPO and ROPO loops so each is a short sequence of stages. Models are passed
around as folders (`save_pretrained`), which is what a stage writes and the next one reads.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from noisepo.logprobs import model_sequence_logps
from noisepo.training.collate import PreferenceCollator, encode_pair, pair_length


@dataclass
class LossOptions:
    """The pairwise loss a training stage uses (names as in `noisepo.losses`)."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    alpha: float = 14.0


def load_policy(model_dir: str, *, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) from a folder, on CPU: the Trainer/accelerate places it."""
    from noisepo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    return model, tokenizer


def save_model_atomically(model, tokenizer, folder: Path) -> None:
    """Write `folder` as a whole or not at all: save into `folder.partial`, then rename."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def train_pairs(records: list[dict], *, init_model: str, output: Path, options, loss: LossOptions,
                trainer_cls=None, trainer_kwargs: dict | None = None, dtype: str = "auto",
                trust_remote_code: bool = False) -> dict:
    """Train `init_model` on preference `records`; save the policy to `output/model`; return metrics.

    `options` is a `noisepo.training.config.OptimOptions`. Records that carry
    `reference_chosen_logps`/`reference_rejected_logps` use them as the reference (ROPO: the initial
    model's, fixed across rounds); otherwise the reference is `init_model` itself, precomputed in one
    no-grad pass before training (SPIN/DNPO: the previous iterate). A killed stage restarts from
    `init_model`, so a rerun gives the same result as an uninterrupted run with the same seed.
    """
    from noisepo.training.preference import (PreferenceTrainer, final_metrics, tensorboard_callbacks,
                                             training_arguments)

    output = Path(output)
    trainer_cls = trainer_cls or PreferenceTrainer
    model, tokenizer = load_policy(init_model, dtype=dtype, trust_remote_code=trust_remote_code)
    pairs = [encode_pair(tokenizer, r, max_length=options.max_length) for r in records]
    work = output / "trainer"
    logged = _with_output(options, output)
    args = training_arguments(logged, output_dir=str(work), save_strategy="no")
    trainer = trainer_cls(model, args, pairs, loss=loss.loss, beta=loss.beta, label_smoothing=loss.label_smoothing,
                          alpha=loss.alpha, reference="precompute", processing_class=tokenizer,
                          callbacks=tensorboard_callbacks(logged), **(trainer_kwargs or {}))
    result = trainer.train()
    metrics = final_metrics(trainer, result, pairs=len(pairs))
    metrics["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        save_model_atomically(trainer.accelerator.unwrap_model(trainer.model), tokenizer, output / "model")
    shutil.rmtree(work, ignore_errors=True)
    return metrics


class _with_output:
    """`options` seen with `output` set (tensorboard_callbacks reads config.output and report_to)."""

    def __init__(self, options, output: Path):
        self._options, self.output = options, str(output)

    def __getattr__(self, name):
        return getattr(self._options, name)


@torch.no_grad()
def pair_logps(model, tokenizer, records: list[dict], *, max_length: int, batch_size: int = 16,
               chunk_size: int | None = None, progress: bool = False) -> list[dict]:
    """Forward-only summed log-probs of both sides of every pair, in eval mode (no dropout).

    Returns, per record, `{"chosen": s, "rejected": s, "chosen_count": n, "rejected_count": n}`.
    Batches are formed longest-first so little is padded; the order of the output is the input's.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = [encode_pair(tokenizer, r, max_length=max_length) for r in records]
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id or 0)
    order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
    out: list[dict] = [{} for _ in pairs]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="log-probs", disable=not progress):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in indices]).items()}
        chosen, rejected = model_sequence_logps(model, batch, chunk_size=chunk_size).split()
        values = zip(chosen.sum.float().tolist(), rejected.sum.float().tolist(), chosen.count.tolist(),
                     rejected.count.tolist())
        for i, (c, r, nc, nr) in zip(indices, values):
            out[i] = {"chosen": c, "rejected": r, "chosen_count": int(nc), "rejected_count": int(nr)}
    model.train(was_training)
    return out


def response_logps(model, tokenizer, prompts: list, responses: list, *, max_length: int, batch_size: int = 16,
                   chunk_size: int | None = None, progress: bool = False) -> list[float]:
    """Summed log π(response | prompt) for each (prompt, response), forward only, eval mode."""
    # Pair each response with itself: one code path (and one chat template) for pairs and singles.
    records = [{"prompt": p, "chosen": r, "rejected": r} for p, r in zip(prompts, responses, strict=True)]
    scored = pair_logps(model, tokenizer, records, max_length=max_length, batch_size=max(1, batch_size // 2),
                        chunk_size=chunk_size, progress=progress)
    return [s["chosen"] for s in scored]


def evaluate_task(model_dir: str, task, records: list[dict], *, max_new_tokens: int = 32, batch_size: int = 64,
                  dtype: str = "auto") -> dict:
    """Greedy accuracy of the model in `model_dir` on held-out `records` (with `answer`) under `task`."""
    from noisepo.training.sft import evaluate_greedy

    model, tokenizer = load_policy(model_dir, dtype=dtype)
    return evaluate_greedy(model, tokenizer, records, task, max_new_tokens=max_new_tokens, batch_size=batch_size)
