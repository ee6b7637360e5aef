"""Config dataclasses of the training commands (`noisepo sft`, `noisepo train`).

Torch-free on purpose: `noisepo --help` imports every config module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from noisepo.config import check, option
from noisepo.training.trackers import check_trackers

# NPO's defaults, chosen on validation by the grid of issue 20 (experiments/grids/npo.yaml, LOG.md
# 2026-12-06): among the configurations whose noise moves the margin (mean |M_noisy − M_clean| ≥ 0.1 on both
# built-in tasks), σ₀ = 0.5, α_σ = 0.01 over V, head lr 1e-2 validated best. The paper gives none of these;
# the old σ₀ = 0.01, α_σ = 1, head at the policy's lr left every margin unchanged (|ΔM| < 1e-3).
DEFAULT_SIGMA0 = 0.5
DEFAULT_NOISE_PENALTY = 0.01
DEFAULT_NOISE_LR = 1e-2

logger = logging.getLogger(__name__)

LossName = Literal["dpo", "cdpo", "rdpo", "ipo", "hinge", "ropo"]


def warn_small_alpha(alpha: float) -> None:
    """ROPO with α <= 2 runs, with a warning: its gradient weight on confidently-wrong pairs tends to
    c(α) = 4α/(1+α)² (0.89 at α = 2, 1 at α = 1; 0.25 at the default 14), so it pushes likely-flipped
    pairs almost as hard as DPO does and tolerates little label noise (METHODS §2)."""
    if alpha <= 2:
        tail = 4 * alpha / (1 + alpha) ** 2
        logger.warning("'alpha': %g <= 2: ROPO's gradient weight on confidently-wrong pairs tends to %.2f (0.25 "
                       "at the default 14), little tolerance of flipped labels; alpha > 2 is recommended", alpha, tail)


@dataclass
class ModelOptions:
    model: str = option("tiny", "A local model folder, a Hugging Face hub name, or a preset built "
                                "offline from a config: micro (tests), tiny (~1M params, demo), small (~5M).")
    tokenizer: str | None = option(None, "Tokenizer folder or hub name, for a --model folder saved without "
                                         "one: joined with the model's files in OUTPUT/base_model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weights dtype when loading.")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")


@dataclass
class OptimOptions:
    """How to train: what every training stage shares (commands and loops); maps onto
    transformers.TrainingArguments. Loops nest it as `training:` (flags `--training.learning-rate`)."""

    max_length: int = option(512, "Maximum tokens of prompt + response; prompts are cut from the left, "
                                  "then responses from the right.")
    learning_rate: float = option(1e-4, "Peak learning rate (AdamW).")
    epochs: float = option(1.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = option(8, "Per-device batch size.")
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    lr_scheduler: str = option("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = option(0.03, "Fraction of steps used for linear warm-up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    seed: int = option(0, "Random seed (model init for presets, data order, dropout).")
    logging_steps: int = option(10, "Log metrics every N steps.")
    save_steps: int = option(500, "Checkpoint every N steps (resumable with --resume).")
    save_total_limit: int = option(2, "Keep at most this many checkpoints.")
    report_to: list[str] = option(default_factory=lambda: ["tensorboard"],
                                  help="Trackers for metrics, any of: tensorboard (OUTPUT/logs), mlflow "
                                       "(MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db), wandb (online with "
                                       "WANDB_API_KEY or WANDB_MODE=online, else offline in OUTPUT/wandb), "
                                       "none.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory.")
    lora: bool = option(False, "Train LoRA adapters through PEFT (extra 'peft') instead of all weights.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = option(default_factory=lambda: ["all-linear"],
                                            help="Modules that get adapters (PEFT names).")

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 unless max_steps > 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check_trackers(self.report_to)


@dataclass
class TrainingOptions(OptimOptions, ModelOptions):
    """What every training command shares: a model, a data source, an output folder, and OptimOptions."""

    data: str = option("", "Training data: .jsonl, .json, .parquet, a datasets save_to_disk folder, "
                           "or a hub dataset name.")
    output: str = option("", "Output folder (checkpoints, final model, logs, metrics.json).")
    resume: bool = option(False, "Resume from the latest checkpoint in OUTPUT.")
    skip_invalid: bool = option(False, "Skip invalid data rows (counted and reported) instead of stopping.")

    def __post_init__(self):
        check(bool(self.data), "data", "is required (a data file, folder or hub name)")
        check(bool(self.output), "output", "is required (an output folder)")
        OptimOptions.__post_init__(self)


@dataclass
class SFTConfig(TrainingOptions):
    """`noisepo sft`: supervised fine-tuning with the loss on response tokens only."""

    task: str | None = option(None, "Task whose verifier scores the greedy evaluation: a built-in name "
                                    "(addition) or an import path (mypkg.mod:Task); none: exact match "
                                    "with the eval data's `answer` column.")
    eval_data: str | None = option(None, "Held-out prompts (with an `answer` column unless --task is "
                                         "given) for the greedy exact-match evaluation; none: skip it.")
    eval_max_new_tokens: int = option(32, "Maximum new tokens in the greedy evaluation.")
    eval_limit: int = option(1000, "Evaluate at most this many held-out prompts.")

    def __post_init__(self):
        super().__post_init__()
        check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", f"must be >= 1, got {self.eval_max_new_tokens}")
        check(self.eval_limit >= 1, "eval_limit", f"must be >= 1, got {self.eval_limit}")


@dataclass
class TrainConfig(TrainingOptions):
    """`noisepo train`: preference training with one loss (METHODS §2)."""

    loss: LossName = option("dpo", "Pairwise loss: dpo, cdpo, rdpo, ipo, hinge, ropo.")
    beta: float = option(0.1, "β: scale of the log-ratio margin.")
    label_smoothing: float = option(0.0, "ε of cdpo and rdpo, in [0, 0.5).")
    alpha: float = option(14.0, "α of the ROPO loss (> 2 recommended).")
    reference: Literal["precompute", "model"] = option(
        "precompute", "precompute: one no-grad pass of the reference before training, stored per pair; "
                      "model: keep a frozen reference copy in memory.")
    reference_model: str | None = option(None, "Reference model (default: the initial policy).")
    learning_rate: float = option(5e-6, "Peak learning rate (AdamW).")
    group_by_length: bool = option(True, "Batch pairs of similar length (shuffled megabatches sorted by "
                                         "length): less padding, faster steps.")
    padding_free: bool = option(False, "Pack the sequences of a batch into rows without padding (position ids "
                                       "restart per sequence): faster; needs a transformers-native model whose "
                                       "attention honours packed position ids (Llama, Qwen, Mistral, ...).")

    def __post_init__(self):
        super().__post_init__()
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        if self.loss == "ropo":
            warn_small_alpha(self.alpha)
