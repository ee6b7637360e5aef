"""What every loop does: train on pairs, score pairs and responses, evaluate on a task, print a table.

Shared by the SPIN/DNPO and ROPO loops so each is a short sequence of stages. Models are passed
around as folders (`save_pretrained`), which is what a stage writes and the next one reads.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from noisepo.logprobs import model_sequence_logps
from noisepo.training.collate import collate_sequences, encode_pair


@dataclass
class LossOptions:
    """The pairwise loss a training stage uses (names as in `noisepo.losses`)."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    alpha: float = 14.0


def load_policy(model_dir: str, *, dtype: str = "auto", trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer) from a folder; on CPU by default, where the Trainer/accelerate places it
    (device="auto": the GPU when there is one, for forward passes and generation)."""
    from noisepo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
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
                trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Train `init_model` on preference `records`; save the policy to `output/model`; return metrics.

    `options` is a `noisepo.training.config.OptimOptions`. Records that carry
    `reference_chosen_logps`/`reference_rejected_logps` use them as the reference (ROPO: the initial
    model's, fixed across rounds); otherwise the reference is `init_model` itself, precomputed in one
    no-grad pass before training (SPIN/DNPO: the previous iterate). A killed stage restarts from
    `init_model`, so a rerun gives the same result as an uninterrupted run with the same seed.
    """
    from noisepo.training.preference import (
        PreferenceTrainer,
        final_metrics,
        training_arguments,
    )
    from noisepo.training.trackers import tracker_callbacks

    output = Path(output)
    trainer_cls = trainer_cls or PreferenceTrainer
    model, tokenizer = load_policy(init_model, dtype=dtype, trust_remote_code=trust_remote_code)
    pairs = [encode_pair(tokenizer, r, max_length=options.max_length) for r in records]
    work = output / "trainer"
    logged = _with_output(options, output)
    args = training_arguments(logged, output_dir=str(work), save_strategy="no", disable_tqdm=not progress)
    trainer = trainer_cls(model, args, pairs, loss=loss.loss, beta=loss.beta, label_smoothing=loss.label_smoothing,
                          alpha=loss.alpha, reference="precompute", processing_class=tokenizer,
                          callbacks=tracker_callbacks(logged), **(trainer_kwargs or {}))
    result = trainer.train()
    metrics = final_metrics(trainer, result, pairs=len(pairs))
    metrics["log_history"] = trainer.state.log_history
    if hasattr(trainer, "npo_summary"):  # NPO: how much the noise moved the margin over the whole training
        metrics["npo"] = trainer.npo_summary()
    save_trained_atomically(trainer, tokenizer, output / "model")
    if trainer.is_world_process_zero():
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def save_trained_atomically(trainer, tokenizer, folder: Path) -> None:
    """`save_model_atomically` for a trained policy on every rank: under FSDP / DeepSpeed ZeRO-3 the
    weights are sharded, so `trainer.save_model` (a collective) gathers them; the main process writes."""
    from noisepo import distributed
    from noisepo.training.preference import is_sharded

    folder = Path(folder)
    if not is_sharded(trainer):
        if trainer.is_world_process_zero():
            save_model_atomically(trainer.accelerator.unwrap_model(trainer.model), tokenizer, folder)
        return
    partial = folder.with_name(folder.name + ".partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(str(partial))  # saves the processing class (tokenizer) too
    if trainer.is_world_process_zero():
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    distributed.barrier()


class _with_output:
    """`options` seen with `output` set (tracker_callbacks reads config.output and report_to)."""

    def __init__(self, options, output: Path):
        self._options, self.output = options, str(output)

    def __getattr__(self, name):
        return getattr(self._options, name)


def pair_logps(model, tokenizer, records: list[dict], *, max_length: int, batch_size: int = 16,
               chunk_size: int | None = None, progress: bool = False, shard: bool = False) -> list[dict]:
    """Forward-only summed log-probs of both sides of every pair, in eval mode (no dropout).

    Returns, per record, `{"chosen": s, "rejected": s, "chosen_count": n, "rejected_count": n}`.
    Each side is a sequence of its own (`batch_size` pairs = 2 × `batch_size` sequences a batch), so
    batches group sequences of similar length whichever pair they come from (the two sides of a
    pair often differ in length); the order of the output is the input's.
    `shard`: a collective over the processes: each takes every W-th batch, every rank gets all rows
    (the batches are the ones one process forms, so the numbers do not depend on W).
    """
    pairs = [encode_pair(tokenizer, r, max_length=max_length) for r in records]
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    scored = _sequence_logps(model, tokenizer, sequences, batch_size=2 * batch_size, chunk_size=chunk_size,
                             progress=progress, shard=shard)
    n = len(pairs)
    return [{"chosen": c, "rejected": r, "chosen_count": nc, "rejected_count": nr}
            for (c, nc), (r, nr) in zip(scored[:n], scored[n:])]


def response_logps(model, tokenizer, prompts: list, responses: list, *, max_length: int, batch_size: int = 16,
                   chunk_size: int | None = None, progress: bool = False, shard: bool = False) -> list[float]:
    """Summed log π(response | prompt) for each (prompt, response), forward only, eval mode;
    `batch_size` sequences a batch. Encoded as one side of a pair (the same chat template and
    truncation as `pair_logps`)."""
    encoded = [encode_pair(tokenizer, {"prompt": p, "chosen": r, "rejected": r}, max_length=max_length)
               for p, r in zip(prompts, responses, strict=True)]
    scored = _sequence_logps(model, tokenizer, [(e["prompt_ids"], e["chosen_ids"]) for e in encoded],
                             batch_size=batch_size, chunk_size=chunk_size, progress=progress, shard=shard)
    return [total for total, _ in scored]


@torch.no_grad()
def _sequence_logps(model, tokenizer, sequences: list[tuple[list[int], list[int]]], *, batch_size: int,
                    chunk_size: int | None, progress: bool, shard: bool) -> list[tuple[float, int]]:
    """(summed response log-prob, response tokens) of each (prompt_ids, response_ids), in its order:
    longest-first batches of `batch_size` sequences, right-padded, eval mode."""
    from tqdm.auto import tqdm

    from noisepo import distributed

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id or 0
    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    batch_size = max(1, batch_size)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    found: dict[int, tuple[float, int]] = {}
    for indices in tqdm(distributed.shard(batches) if shard else batches, desc="log-probs", disable=not progress):
        rows = collate_sequences(*zip(*(sequences[i] for i in indices)), pad_token_id=pad_token_id)
        result = model_sequence_logps(model, {k: v.to(device) for k, v in rows.items()}, chunk_size=chunk_size)
        for i, total, count in zip(indices, result.sum.float().tolist(), result.count.tolist()):
            found[i] = (total, int(count))
    model.train(was_training)
    if shard:
        found = distributed.gather_indexed(found)
    return [found[i] for i in range(len(sequences))]


def evaluate_task(model_dir: str, task, records: list[dict], *, max_new_tokens: int = 32, batch_size: int = 64,
                  dtype: str = "auto", trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Greedy accuracy of the model in `model_dir` on held-out `records` (with `answer`) under `task`,
    on the GPU when there is one."""
    from noisepo.training.sft import evaluate_greedy

    model, tokenizer = load_policy(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, device="auto")
    return evaluate_greedy(model, tokenizer, records, task, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress)


class VerifierTask:
    """A plain verifier function `(prompt, response) -> score` seen as a task (what evaluation takes)."""

    def __init__(self, verifier, name: str):
        self.verifier, self.name = verifier, name

    def score(self, prompt: str, response: str) -> float:
        return float(self.verifier(prompt, response))


def load_evaluation(config) -> tuple[object | None, list[dict]]:
    """(task or verifier or None, held-out records) from a loop's config, checked before any training.

    Reads `task`, `eval_data`, `eval_limit`, `skip_invalid` and, where the command has one, `verifier`.
    `--task` alone evaluates on the task's test prompts; `--eval-data` without a task or verifier
    compares the greedy response with each record's `answer`.
    """
    from noisepo.data import load_prompts
    from noisepo.errors import ConfigError
    from noisepo.tasks import load_task, load_verifier

    verifier = getattr(config, "verifier", None)
    scorer = None
    if config.task:
        scorer = load_task(config.task)
    elif verifier:
        scorer = VerifierTask(load_verifier(verifier), verifier)
    records: list[dict] = []
    if config.eval_data:
        records = load_prompts(config.eval_data, skip_invalid=config.skip_invalid).records[: config.eval_limit]
        if scorer is None and any("answer" not in r for r in records):
            flags = "--task or --verifier" if hasattr(config, "verifier") else "--task"
            raise ConfigError(f"some evaluation prompts have no 'answer' column; add one or give {flags} to "
                              "score them", key="eval_data")
    elif config.task:
        records = scorer.prompts(config.eval_limit, seed=0, split="test")
    return scorer, records


@contextlib.contextmanager
def open_run(config, texts: list[str]):
    """A loop's run folder (lock, manifest; `--progress` may change on resume) and its initial model:
    yields (RunFolder, model path); a preset is built into OUTPUT/base_model from `texts`.

    Reads `output`, `model`, `tokenizer`, `trust_remote_code`, `progress`, `seed` and `training.seed` of
    the loop's config.
    """
    from noisepo import distributed
    from noisepo.config import to_dict
    from noisepo.models import resolve_model
    from noisepo.pipelines.stages import RunFolder

    distributed.init()  # under accelerate launch / torchrun: every rank runs the loop
    output = Path(config.output)
    seeds = {"training": config.training.seed, "sampling": config.seed}
    with RunFolder(output, to_dict(config), seeds=seeds, resume_keys_ignored=("progress",)) as run, \
            transformers_progress(config.progress and distributed.is_main()):
        # A preset is built once, by the main process; the others use the folder it wrote.
        yield run, distributed.run_on_main(
            lambda: resolve_model(config.model, output / "base_model", texts=texts, seed=config.training.seed,
                                  tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code))


@contextlib.contextmanager
def transformers_progress(enabled: bool):
    """Within the block, transformers' and the hub's own progress bars ("Loading weights", downloads)
    are off unless `enabled`; they are restored after. Never turns on bars that were off."""
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def cell(value, spec: str = "") -> str:
    """A cell of a loop's summary table: '-' for a missing value, else `format(value, spec)`."""
    return "-" if value is None else format(value, spec)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first is the header) as right-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(text.rjust(w) for text, w in zip(row, widths)) for row in rows)
