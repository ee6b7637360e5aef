"""One preference trainer for every pairwise loss (METHODS §2), and `noisepo train`.

`PreferenceTrainer` is a `transformers.Trainer`, so checkpoints, resume, the progress bar,
loggers and `accelerate launch` work as usual. Its `compute_loss` reads

    forward (chosen + rejected in one pass) -> sequence log-probs -> per-pair loss -> weighted mean -> metrics

The reference is either precomputed once before training (`reference="precompute"`: one no-grad
pass stores `reference_chosen_logps` / `reference_rejected_logps` per pair; loops such as SPIN
and ROPO may hand these columns in directly), or a frozen model (`reference="model"`: a frozen copy
of the policy, the `ref_model` given, or with PEFT the base model with its adapters disabled).
`reference_logps(inputs)` is the one place that produces the reference side: NPO (METHODS §4.2)
overrides it to make the rejected side noisy from the reference's hidden states.

Per-pair weights (`weight` column, default 1): the loss of an optimizer step is
Σ wᵢℓᵢ / Σ wᵢ over every pair of the step, across gradient-accumulation micro-batches and
processes, so batch 8 × 1 and batch 1 × 8 give the same update (see `_get_num_items_in_batch`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from noisepo.distributed import accelerator_available
from noisepo.logprobs import DEFAULT_CHUNK_SIZE, SequenceLogps, model_sequence_logps, response_counts
from noisepo.losses import LOSS_INPUTS, loss_function
from noisepo.training.collate import (
    REFERENCE_COLUMNS,
    PackedPreferenceCollator,
    PreferenceCollator,
    encode_pair,
    pair_length,
)
from noisepo.training.guards import FiniteLossGuard
from noisepo.training.trackers import tracker_callbacks

logger = logging.getLogger(__name__)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: the policy and reference log-probs of the same pair must agree at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class PreferenceTrainer(FiniteLossGuard, Trainer):
    """`transformers.Trainer` for pairwise preference losses.

    Args beyond Trainer's: `loss` (a name of `noisepo.losses.LOSSES`), `beta`, `label_smoothing`,
    `alpha` (passed to the losses that take them), `reference` ("precompute" or "model"),
    `ref_model` (default: the initial policy), `group_by_length` (batches of similar lengths),
    `padding_free` (pack sequences into rows, `PackedPreferenceCollator`), `chunk_size`
    (positions per LM-head chunk), `dropout` (keep the model's dropout; off by default, as TRL).
    `train_dataset` (and `eval_dataset`) hold tokenised pairs (`noisepo.training.collate`).
    A NaN or inf loss stops training before its optimizer step (`noisepo.training.guards`).
    """

    loss_is_scaled_for_ga = True  # compute_loss already divides by the step's total weight

    def __init__(self, model, args: TrainingArguments, train_dataset, *, loss: str = "dpo", beta: float = 0.1,
                 label_smoothing: float = 0.0, alpha: float = 14.0, reference: str = "precompute",
                 ref_model=None, group_by_length: bool = True, padding_free: bool = False,
                 chunk_size: int | None = DEFAULT_CHUNK_SIZE, dropout: bool = False, processing_class=None,
                 data_collator=None, **kwargs):
        if reference not in ("precompute", "model"):
            raise ValueError(f"reference must be 'precompute' or 'model', got {reference!r}")
        self.loss_name = loss
        self.loss_fn = loss_function(loss, beta=beta, label_smoothing=label_smoothing, alpha=alpha)
        self.loss_inputs = LOSS_INPUTS[loss]
        self.beta = beta
        self.group_by_length = group_by_length
        self.chunk_size = chunk_size
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if not dropout:
            disable_dropout(model)
        if data_collator is None:
            pad_id = getattr(processing_class, "pad_token_id", None)
            pad_id = model.config.pad_token_id if pad_id is None else pad_id
            collator = PackedPreferenceCollator if padding_free else PreferenceCollator
            data_collator = collator(pad_token_id=pad_id or 0)
        args.remove_unused_columns = False  # the collator needs prompt/chosen/rejected ids
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         processing_class=processing_class, **kwargs)
        self.ref_model = self._frozen(ref_model) if ref_model is not None else None
        if reference == "precompute":
            self.train_dataset = self.with_reference(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self.with_reference(self.eval_dataset)
            self.ref_model = None  # precomputed: nothing to keep in memory
        elif self.ref_model is None and not is_peft_model(model):
            self.ref_model = self._frozen(copy.deepcopy(model))

    @staticmethod
    def _frozen(model):
        disable_dropout(model)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy_chosen, policy_rejected = self.policy_logps(model, inputs)  # forward: (B,) each
        reference_chosen, reference_rejected = self.reference_logps(inputs)
        kind = self.loss_inputs  # "sum", or "mean" for IPO
        losses = self.loss_fn(policy_chosen.reduce(kind), policy_rejected.reduce(kind),
                              reference_chosen.reduce(kind), reference_rejected.reduce(kind))  # (B,)
        loss = self.weighted_loss(losses, inputs["weight"], num_items_in_batch)
        self.store_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
        return (loss, {"losses": losses.detach()}) if return_outputs else loss

    def policy_logps(self, model, inputs) -> tuple[SequenceLogps, SequenceLogps]:
        """One forward of chosen and rejected together -> (chosen, rejected) SequenceLogps (B,)."""
        logps = model_sequence_logps(model, inputs, chunk_size=self.chunk_size,
                                     unwrapped=self.accelerator.unwrap_model(model))
        return logps.split()

    def reference_logps(self, inputs) -> tuple[SequenceLogps, SequenceLogps]:
        """(chosen, rejected) reference SequenceLogps (B,): precomputed columns, else a no-grad forward.

        The hook NPO overrides to replace the rejected side by a noisy reference.
        """
        if all(column in inputs for column in REFERENCE_COLUMNS):
            chosen_count, rejected_count = response_counts(inputs["labels"], inputs.get("sequence_ids")).chunk(2)
            return (SequenceLogps(inputs["reference_chosen_logps"], chosen_count),
                    SequenceLogps(inputs["reference_rejected_logps"], rejected_count))
        with torch.no_grad(), self.reference_context() as reference:
            logps = model_sequence_logps(reference, inputs, chunk_size=self.chunk_size,
                                         unwrapped=self.accelerator.unwrap_model(reference))
        return logps.detach().split()

    @contextlib.contextmanager
    def reference_context(self, *, policy_is_reference: bool = False):
        """Yields the reference model: the frozen one (moved to the policy's device), or the PEFT
        policy with its adapters disabled (the base model), or, before training
        (`policy_is_reference`), the policy itself."""
        if self.ref_model is not None:
            device = next(self.model.parameters()).device
            if next(self.ref_model.parameters()).device != device:
                self.ref_model.to(device)
            yield self.ref_model
        elif is_peft_model(self.accelerator.unwrap_model(self.model)):
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                yield self.model
        elif policy_is_reference:
            yield self.model
        else:
            raise RuntimeError("no reference: pass reference columns, a ref_model, or reference='model'")

    def weighted_loss(self, losses: torch.Tensor, weights: torch.Tensor, step_weight) -> torch.Tensor:
        """Σ wᵢℓᵢ / Σ wᵢ with the denominator taken over the whole optimizer step.

        `step_weight` is the step's total weight over every micro-batch and process (the Trainer's
        `num_items_in_batch`, see `_get_num_items_in_batch`); DDP averages gradients over processes,
        hence the × num_processes. Without it (evaluation), this batch's own weight.
        """
        weighted = (weights.to(losses.dtype) * losses).sum()
        if step_weight is None:
            return weighted / weights.sum().clamp(min=1e-12)
        return weighted * self.accelerator.num_processes / step_weight.clamp(min=1e-12)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The total pair weight of an optimizer step (all micro-batches, all processes)."""
        if not batch_samples or "weight" not in batch_samples[0]:
            return None
        total = sum(batch["weight"].sum() for batch in batch_samples).to(device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    # ------------------------------------------------------------------ metrics
    def store_metrics(self, policy_chosen: SequenceLogps, policy_rejected: SequenceLogps,
                      reference_chosen: SequenceLogps, reference_rejected: SequenceLogps) -> None:
        """TRL's metric names, from summed log-probs; averaged over micro-batches at `log` time."""
        mode = "train" if self.model.training else "eval"
        chosen_rewards = self.beta * (policy_chosen.sum - reference_chosen.sum).detach()
        rejected_rewards = self.beta * (policy_rejected.sum - reference_rejected.sum).detach()
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen.sum.detach(),
            "logps/rejected": policy_rejected.sum.detach(),
        }
        gathered = self.accelerator.gather_for_metrics(values)
        for key, value in gathered.items():
            self._metrics[mode][key].append(value.float().mean())  # a tensor: no device sync per step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():  # "..._max" keys: the largest micro-batch value
            reduced = torch.stack(values).max() if key.endswith("_max") else torch.stack(values).mean()
            logs[prefix + key] = reduced.item()
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches (shuffled megabatches sorted by length): less padding per batch."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.seed)
        # One optimizer step's pairs over every process: the same order whatever the number of
        # processes (accelerate deals consecutive batches to the ranks), so 2 × 2 == 4 × 1.
        step_pairs = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(step_pairs, lengths=[pair_length(pair) for pair in dataset], generator=generator)

    def with_reference(self, pairs: list[dict]) -> list[dict]:
        """`pairs` with the reference columns: as given when every pair has them, else precomputed."""
        if all(column in pair for pair in pairs for column in REFERENCE_COLUMNS):
            return pairs
        return self.precompute_reference(pairs)

    @torch.no_grad()
    def precompute_reference(self, pairs: list[dict], batch_size: int | None = None) -> list[dict]:
        """One no-grad pass of the reference over `pairs` (longest first, so batches pad little);
        returns copies with `reference_{chosen,rejected}_logps` (summed) and `..._mean` columns.

        Several processes share the pass: each takes every W-th batch and the columns are gathered
        to all ranks (the batches are the ones one process forms: the numbers do not depend on W)."""
        from noisepo import distributed

        batch_size = batch_size or self.args.per_device_eval_batch_size
        order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        columns: dict[int, dict[str, float]] = {}
        was_training = self.model.training
        self.model.eval()
        with self.reference_context(policy_is_reference=True) as reference:
            unwrapped = self.accelerator.unwrap_model(reference)
            device = next(unwrapped.parameters()).device
            for indices in distributed.shard(batches):
                batch = {k: v.to(device) for k, v in self.data_collator([pairs[i] for i in indices]).items()}
                with self.compute_loss_context_manager():
                    logps = model_sequence_logps(reference, batch, chunk_size=self.chunk_size, unwrapped=unwrapped)
                chosen, rejected = logps.split()
                for side, side_logps in (("chosen", chosen), ("rejected", rejected)):
                    sums, means = side_logps.sum.float().tolist(), side_logps.mean.float().tolist()
                    for i, total, mean in zip(indices, sums, means):
                        columns.setdefault(i, {})[f"reference_{side}_logps"] = total
                        columns[i][f"reference_{side}_logps_mean"] = mean
        self.model.train(was_training)
        columns = distributed.gather_indexed(columns)
        return [{**pair, **columns[i]} for i, pair in enumerate(pairs)]


# ---------------------------------------------------------------------- noisepo train
def training_arguments(config, **overrides) -> TrainingArguments:
    """TrainingOptions -> transformers.TrainingArguments. Trackers go through `tracker_callbacks`
    (training/trackers.py), which decide where they write, so transformers gets report_to none."""
    values = dict(
        output_dir=config.output, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps, save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, report_to="none",
        run_name="/".join(Path(config.output).parts[-2:]),  # a tracker's run name: e.g. dnpo/iter_1
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, processes started by torchrun / accelerate (--multi_gpu or
        # configs/accelerate/cpu.yaml) must say CPU, or accelerate sees no distributed setup at all.
        use_cpu=not accelerator_available(),
        ddp_find_unused_parameters=False,  # every trained weight is used in each step (LoRA: its adapters)
    )
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns);
    # earlier 5.x releases, which the package allows, know only the old one.
    fields = TrainingArguments.__dataclass_fields__
    values["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = \
        config.gradient_checkpointing
    values.update(overrides)
    return TrainingArguments(**values)


def add_lora(model, config):
    """Wrap `model` with fresh LoRA adapters (extra 'peft'); the base model stays the reference."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from noisepo.errors import ConfigError

        raise ConfigError("needs the 'peft' extra: pip install 'noisepo[peft]'", key="lora") from None
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def is_sharded(trainer) -> bool:
    """The policy's weights are sharded over the processes (FSDP, DeepSpeed): saving is a collective."""
    from accelerate.utils import DistributedType

    return trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def latest_checkpoint(output: Path) -> str | None:
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def run_train(config) -> int:
    """`noisepo train`: load pairs, train with `config.loss`, save OUTPUT/model and OUTPUT/metrics.json.

    With `--lora` the adapters are merged into the base weights for OUTPUT/model (a plain
    transformers model, loadable without peft) and also saved alone in OUTPUT/adapter.
    """
    from noisepo import distributed
    from noisepo.data import load_preferences
    from noisepo.data.chat import response_text
    from noisepo.io import write_json_atomic
    from noisepo.models import load_model, load_tokenizer, model_of_run_folder, resolve_model

    distributed.init()
    output = Path(config.output)
    loaded = load_preferences(config.data, skip_invalid=config.skip_invalid)
    records = loaded.records
    texts = [response_text(r[k]) for r in records for k in ("prompt", "chosen", "rejected")]
    # A preset is built once, by the main process; the others load the folder it wrote.
    model_path = distributed.run_on_main(
        lambda: resolve_model(config.model, output / "base_model", texts=texts, seed=config.seed,
                              tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code))
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    pairs = [encode_pair(tokenizer, r, max_length=config.max_length) for r in records]
    model = load_model(model_path, dtype=config.dtype, device="cpu", trust_remote_code=config.trust_remote_code)
    ref_model = None
    if config.reference_model:
        ref_model = load_model(model_of_run_folder(config.reference_model, option="reference-model"),
                               dtype=config.dtype, device="cpu",
                               trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = add_lora(model, config)
    trainer = PreferenceTrainer(
        model, training_arguments(config), pairs, loss=config.loss, beta=config.beta,
        label_smoothing=config.label_smoothing, alpha=config.alpha, reference=config.reference,
        ref_model=ref_model, group_by_length=config.group_by_length, padding_free=config.padding_free,
        processing_class=tokenizer,
        callbacks=tracker_callbacks(config))
    resume = latest_checkpoint(output) if config.resume else None
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    if is_sharded(trainer) and not is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        trainer.save_model(str(output / "model"))  # a collective: gathers the shards, rank 0 writes
    elif trainer.is_world_process_zero():
        save_final_model(trainer.model, tokenizer, output)
    if trainer.is_world_process_zero():
        write_json_atomic(output / "metrics.json", final_metrics(trainer, result, pairs=len(pairs),
                                                                skipped=loaded.skipped))
    return 0


def final_metrics(trainer, result, **extra) -> dict:
    """The Trainer's train metrics, the last logged preference metrics (rewards/..., logps/...), extras."""
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/margins" in h), {})
    preference = {k: v for k, v in last.items() if k.startswith(("rewards/", "logps/"))}
    return {**result.metrics, **preference, "global_step": trainer.state.global_step, **extra}


def save_final_model(model, tokenizer, output: Path) -> None:
    """OUTPUT/model: the trained policy as a plain transformers model (LoRA merged; adapter kept apart)."""
    if is_peft_model(model):
        model.save_pretrained(output / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output / "model")
    tokenizer.save_pretrained(output / "model")
