"""`noisepo sft`: supervised fine-tuning on `transformers.Trainer`, loss on response tokens only.

Stages of `run_sft`: load the data -> resolve the model (a preset is built once into
OUTPUT/base_model) -> tokenise with the shared chat template (`noisepo.data.chat.encode_example`,
so generation later prompts the model exactly as it was trained) -> train with the Trainer
(accelerate / DeepSpeed launchers, checkpoints, `--resume`, progress bar, TensorBoard in
OUTPUT/logs) -> save OUTPUT/model with `save_pretrained` -> greedy exact-match evaluation on held-out
prompts -> OUTPUT/metrics.json (written atomically).

The Trainer owns devices and distribution: the model is never moved by hand here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from noisepo.errors import ConfigError
from noisepo.io import write_json_atomic, write_jsonl_atomic
from noisepo.training.config import SFTConfig

IGNORE_INDEX = -100  # label of the positions the loss skips (prompt tokens, padding)


# --------------------------------------------------------------------------- data
def record_texts(records: list[dict], columns: tuple[str, ...] = ("prompt", "completion", "answer")) -> list[str]:
    """Every string in the given columns, message contents included (the char tokenizer's alphabet)."""
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item.get("content") if isinstance(item, dict) else item)

    for record in records:
        for column in columns:
            collect(record.get(column))
    return texts


def tokenize_sft(records: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Token ids + labels per record; labels are IGNORE_INDEX on the prompt, so the loss counts
    the response (and its EOS) only. Returns (examples, dropped): a record whose response was cut
    away entirely has nothing to learn from and is dropped."""
    from noisepo.data.chat import encode_example

    examples, dropped = [], 0
    for record in records:
        prompt_ids, response_ids = encode_example(tokenizer, record["prompt"], record["completion"],
                                                  max_length=max_length)
        if not response_ids:
            dropped += 1
            continue
        examples.append({"input_ids": prompt_ids + response_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids})
    return examples, dropped


@dataclass
class SFTCollator:
    """Dynamic padding: each batch is padded (on the right) to its own longest example."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- trainer
def training_arguments(config: SFTConfig):
    """TrainingOptions -> transformers.TrainingArguments, shared with `noisepo train` (checkpoints
    in OUTPUT; trackers through `noisepo.training.trackers.tracker_callbacks`)."""
    from noisepo.training.preference import training_arguments as shared_training_arguments

    return shared_training_arguments(config, logging_first_step=True, save_strategy="steps")


def with_lora(model, config: SFTConfig):
    """Wrap `model` in fresh LoRA adapters (PEFT), as `noisepo train` does."""
    from noisepo.training.preference import add_lora

    return add_lora(model, config)


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The Trainer's logged training points: step, loss, learning rate (and grad norm when logged)."""
    keys = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: entry[k] for k in keys if k in entry} for entry in log_history if "loss" in entry]


def save_final_model(trainer, tokenizer, folder: Path) -> None:
    """OUTPUT/model: a full model + tokenizer that `from_pretrained` loads (LoRA merged in)."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # PEFT: keep the adapters too, then merge them
        if trainer.is_world_process_zero():
            model.save_pretrained(folder.parent / "adapter")
        model = model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(folder)
    else:
        trainer.save_model(str(folder))  # handles DeepSpeed / FSDP gathering
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- evaluation
def answer_scorer(task) -> Callable[[str, str, dict], float]:
    """(prompt text, response, record) -> 1.0/0.0: the task's verifier, or exact match with the
    record's `answer` (whitespace stripped) when there is no task."""
    if task is not None:
        return lambda prompt, response, record: float(task.score(prompt, response))

    def exact(prompt: str, response: str, record: dict) -> float:
        if "answer" not in record:
            raise ConfigError("the evaluation prompts have no 'answer' column; give --task to score "
                              "them with a verifier", key="eval_data")
        return 1.0 if response.strip() == str(record["answer"]).strip() else 0.0

    return exact


def evaluate_greedy(model, tokenizer, records: list[dict], task=None, *, max_new_tokens: int = 32,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """Greedy exact-match accuracy of `model` on `records` (`prompt`, and `answer` without a task).

    Returns {"accuracy", "correct", "n", "predictions": [{"id", "prompt", "response", "score"}]}
    (plus "graded_score", the mean partial credit, when the task has `graded_score`).
    """
    from noisepo.data.chat import render_prompt
    from noisepo.generation.base import GenerationParams
    from noisepo.generation.transformers_backend import TransformersGenerator

    if not records:
        return {"accuracy": None, "correct": 0, "n": 0, "predictions": []}
    prompt_texts = [render_prompt(tokenizer, r["prompt"]) for r in records]
    generator = TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=progress)
    responses = [samples[0] for samples in generator.generate(
        prompt_texts, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))]
    score = answer_scorer(task)
    predictions = [{"id": r.get("id", i), "prompt": text, "response": response,
                    "score": score(text, response, r)}
                   for i, (r, text, response) in enumerate(zip(records, prompt_texts, responses))]
    correct = sum(p["score"] for p in predictions)
    result = {"accuracy": correct / len(records), "correct": int(correct), "n": len(records),
              "predictions": predictions}
    if task is not None and callable(getattr(task, "graded_score", None)):
        result["graded_score"] = sum(task.graded_score(p["prompt"], p["response"])
                                     for p in predictions) / len(predictions)
    subsets = accuracy_by_subset(records, predictions)
    if subsets:
        result["accuracy_by_subset"] = subsets
    return result


def accuracy_by_subset(records: list[dict], predictions: list[dict]) -> dict[str, float]:
    """Accuracy per value of the records' `subset` column (e.g. the built-in tasks' hard/easy), so a
    method that only moves the hard problems is seen; {} when no record has the column."""
    totals: dict[str, list[float]] = {}
    for record, prediction in zip(records, predictions, strict=True):
        if record.get("subset") is not None:
            totals.setdefault(str(record["subset"]), []).append(prediction["score"])
    return {name: sum(scores) / len(scores) for name, scores in sorted(totals.items())}


# --------------------------------------------------------------------------- the command
def load_sft_model(config: SFTConfig, texts: list[str], args):
    """(model, tokenizer) from `config.model`; a preset is built once, by the main process."""
    from transformers import AutoModelForCausalLM

    from noisepo.models import load_tokenizer, resolve_model, torch_dtype

    with args.main_process_first(desc="build the preset model"):
        path = resolve_model(config.model, Path(config.output) / "base_model", texts=texts, seed=config.seed,
                             tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code, padding_side="right")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(config.dtype),
                                                     trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a causal LM from {path!r}: {err}", key="model") from None
    return model, tokenizer


def load_inputs(config: SFTConfig):
    """(training LoadResult, evaluation records, task or None), checked before any training."""
    from noisepo.data import load_prompts, load_sft
    from noisepo.tasks import load_task

    train_data = load_sft(config.data, skip_invalid=config.skip_invalid)
    if not train_data.records:
        raise ConfigError(f"no training records in {train_data.source}", key="data")
    eval_records = []
    if config.eval_data:
        eval_records = load_prompts(config.eval_data, skip_invalid=config.skip_invalid).records
        eval_records = eval_records[: config.eval_limit]
    task = load_task(config.task) if config.task else None
    if task is None and any("answer" not in r for r in eval_records):
        # Found now rather than after training: without a verifier the answers are the ground truth.
        raise ConfigError("some evaluation prompts have no 'answer' column; add one or give --task to "
                          "score them with a verifier", key="eval_data")
    return train_data, eval_records, task


def fit(config: SFTConfig, train_data, texts: list[str], callbacks=()):
    """Train with the Trainer (resuming when asked) and save OUTPUT/model; `callbacks`: extra
    TrainerCallbacks. Returns (trainer, tokenizer, training metrics)."""
    from transformers.trainer_utils import get_last_checkpoint

    from noisepo.training.guards import GuardedTrainer
    from noisepo.training.trackers import tracker_callbacks

    output = Path(config.output)
    started = time.perf_counter()
    args = training_arguments(config)
    model, tokenizer = load_sft_model(config, texts, args)
    if config.lora:
        model = with_lora(model, config)
    examples, dropped = tokenize_sft(train_data.records, tokenizer, config.max_length)
    trainer = GuardedTrainer(model=model, args=args, train_dataset=examples,
                             data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                             callbacks=tracker_callbacks(config) + list(callbacks))
    checkpoint = get_last_checkpoint(str(output)) if config.resume and output.is_dir() else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_final_model(trainer, tokenizer, output / "model")
    curve = loss_curve(trainer.state.log_history)
    return trainer, tokenizer, {
        "steps": trainer.state.global_step,
        "examples": len(examples),
        "skipped_invalid": train_data.skipped,
        "dropped_too_long": dropped,
        "resumed_from": checkpoint,
        "mean_loss": result.training_loss,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "seconds": round(time.perf_counter() - started, 2),
    }


def train_sft(config: SFTConfig, callbacks=()) -> dict:
    """Train, save, evaluate; return the metrics (also written to OUTPUT/metrics.json):
    {"train": {steps, loss_curve, final_loss, ...}, "eval": {accuracy, correct, n, ...} | None, "model"}.
    `callbacks`: extra TrainerCallbacks (the demo's stops SFT once it has learnt)."""
    output = Path(config.output)
    train_data, eval_records, task = load_inputs(config)
    trainer, tokenizer, train_metrics = fit(config, train_data, record_texts(train_data.records + eval_records),
                                            callbacks)
    metrics: dict[str, Any] = {"train": train_metrics, "eval": None, "model": str(output / "model")}
    if not trainer.is_world_process_zero():
        return metrics
    if eval_records:
        started = time.perf_counter()
        evaluation = evaluate_greedy(trainer.model, tokenizer, eval_records, task,
                                     max_new_tokens=config.eval_max_new_tokens)
        write_jsonl_atomic(output / "eval_predictions.jsonl", evaluation.pop("predictions"))
        metrics["eval"] = {**evaluation, "data": config.eval_data,
                           "seconds": round(time.perf_counter() - started, 2)}
    write_json_atomic(output / "metrics.json", metrics)
    return metrics


def run_sft(config: SFTConfig) -> int:
    metrics = train_sft(config)
    train = metrics["train"]
    loss = "n/a" if train["final_loss"] is None else f"{train['final_loss']:.4f}"
    print(f"sft: {train['steps']} steps, final train loss {loss}, model saved to {metrics['model']}")
    if metrics["eval"] is not None:
        ev = metrics["eval"]
        print(f"greedy exact match on {ev['n']} held-out prompts: {ev['accuracy']:.1%} "
              f"({ev['correct']}/{ev['n']})")
    return 0
