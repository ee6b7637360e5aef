"""Config of `noisepo ropo` (METHODS §5): rounds of robust training, noise filtering and refills.

Torch-free on purpose: `noisepo --help` imports every config module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from noisepo.config import option
from noisepo.generation.config import BackendOptions
from noisepo.training.config import LossName, OptimOptions, check, warn_small_alpha

# ℓ_ropo's gradient weight c(α)·p·(1+α(1−p)) is ~2x DPO's at h = 0 and ~3.7x for confident pairs (α = 14), so
# ROPO wants a smaller rate: 1e-5 was its best on clean validation (addition; 3e-5 on reversal), where 1e-4, the
# shared OptimOptions default, sent a new user's model to 0 % (issue 23; experiments/LOG.md 2026-12-07).
DEFAULT_ROPO_LEARNING_RATE = 1e-5


@dataclass
class ROPOConfig:
    """`noisepo ropo`: R rounds of train (kept set) -> score every pair with ℓ_ropo -> keep the (1−ρ)N
    lowest -> refill the discarded prompts by rejection sampling. `--loss dpo --no-filter` (or cdpo,
    rdpo, ipo, hinge) runs a baseline through the same stages, so a comparison differs in one thing."""

    model: str = option("", "Initial policy (also the reference of every round): a local folder, a hub "
                            "name, or a preset (micro, tiny, small) built once into OUTPUT/base_model.")
    tokenizer: str | None = option(None, "Tokenizer folder or hub name, for a --model folder saved without "
                                         "one: joined with the model's files in OUTPUT/base_model.")
    data: str = option("", "Preference pairs (prompt, chosen, rejected; optional weight, id, label_flipped): "
                           ".jsonl, .json, .parquet, a datasets folder or a hub name.")
    output: str = option("", "Run folder: manifest.json, reference/, round_<r>/, summary.json. A rerun "
                             "with the same options resumes at the first unfinished stage.")
    loss: LossName = option("ropo", "Training loss: ropo, or a baseline (dpo, cdpo, rdpo, ipo, hinge).")
    beta: float = option(0.1, "β: scale of the log-ratio margin (training, scoring, implicit rewards).")
    alpha: float = option(14.0, "α of ℓ_ropo (training with --loss ropo, and the filter's score).")
    label_smoothing: float = option(0.0, "ε of cdpo and rdpo, in [0, 0.5).")
    rounds: int = option(3, "R: rounds of train -> score -> filter -> refill.")
    filter: bool = option(True, "Filter the noisiest pairs each round (--no-filter: train on every pair "
                                "every round, as the baselines do; pairs are still scored and reported).")
    rho: float = option(0.2, "ρ: fraction of the original pairs discarded each round, in [0, 1).")
    filter_misranked_only: bool = option(
        True, "Discard only pairs the current model ranks against their label (h < 0), at most ρN of them "
              "(validated default). --no-filter-misranked-only is the paper's rule: exactly ρN pairs are discarded "
              "whatever the model thinks, which on clean pairs throws away the hardest correct ones and then "
              "over-trains on the easy rest (measured: −23 / −7 points on clean validation; experiments/LOG.md "
              "2026-12-07).")
    filter_reference_weight: float = option(
        1.0, "γ in [0, 1]: how much of the reference's preference the filter's score subtracts. It ranks pairs by "
             "h_γ = β[log π(y_w)/π(y_l) − γ·log π_ref(y_w)/π_ref(y_l)] = γ·(ℓ_ropo's margin) + (1−γ)·(the "
             "model's own likelihood preference). 1 (default): the paper's filter, ℓ_ropo itself. γ < 1 catches "
             "more flipped pairs (precision 1.00 against 0.81 at 40 % flips) but they are the flips the model "
             "already disbelieves, and it keeps the harmful ones (those its own reference agrees with) and drops "
             "hard clean pairs: validation accuracy fell 6 points (experiments/LOG.md 2026-12-07).")
    refill: bool = option(True, "Refill each discarded prompt by rejection sampling (METHODS §5.2); "
                                "--no-refill: train on the kept originals only.")
    refill_rule: Literal["best-worst", "replace-rejected", "ranked"] = option(
        "replace-rejected", "How a discarded prompt is refilled (METHODS §5.2; the paper names robustness-guided "
                      "rejection sampling but not its rule). best-worst: the pair (highest, lowest implicit "
                      "reward β·log π/π_ref) among the K samples and both original responses. replace-rejected: "
                      "the discarded pair's own chosen against the sample the current model finds least "
                      "likely to be preferred (lowest implicit reward). ranked: best-worst's pair, kept only "
                      "when its own ℓ_ropo ranks among the kept set's (≤ the largest kept ℓ_ropo). Default "
                      "replace-rejected: best mean validation accuracy of the three and no refill (LOG.md).")
    samples: int = option(4, "K: responses sampled per discarded prompt (>= 2; 0: no sampling, best-worst "
                             "and ranked then choose between the two original responses).")
    temperature: float = option(0.7, "Sampling temperature of the refill candidates.")
    top_p: float = option(1.0, "Nucleus mass of the refill candidates.")
    max_new_tokens: int = option(64, "Most new tokens per sampled candidate.")
    seed: int = option(0, "Sampling seed (round r samples with seed + r; a sample depends only on the "
                          "prompt, the seed and the model).")
    score_batch_size: int = option(16, "Pairs per forward pass when scoring (reference, filter, rewards); forward-only "
                                          "needs far less memory than training: raise it on a GPU.")
    generation_batch_size: int = option(32, "Sequences per generate call when sampling candidates.")
    task: str | None = option(None, "Task whose verifier scores the greedy evaluation and the refills: a "
                                    "built-in name (addition) or an import path (mypkg.mod:Task). Without "
                                    "--eval-data its test prompts are used.")
    verifier: str | None = option(None, "A verifier function (mypkg.mod:score, (prompt, response) -> 0..1) "
                                        "instead of a task; needs --eval-data.")
    eval_data: str | None = option(None, "Held-out prompts for the greedy evaluation after every round "
                                         "(an `answer` column unless --task/--verifier is given).")
    eval_limit: int = option(200, "Evaluate on at most this many prompts.")
    eval_max_new_tokens: int = option(32, "Most new tokens in the greedy evaluation.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weights dtype when loading.")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")
    progress: bool = option(True, "Show progress bars.")
    skip_invalid: bool = option(False, "Skip invalid data rows (counted and reported) instead of stopping.")
    training: OptimOptions = option(default_factory=lambda: OptimOptions(learning_rate=DEFAULT_ROPO_LEARNING_RATE),
                                    help="How each round trains (one epoch on the kept set by default; "
                                         f"learning rate {DEFAULT_ROPO_LEARNING_RATE:g}, validated for ℓ_ropo, "
                                         "whose gradient is 2-4x DPO's at the same rate).")
    generation: BackendOptions = option(default_factory=BackendOptions,
                                        help="The engine that samples the refill candidates: transformers or "
                                             "vllm (--generation.backend vllm).")

    def __post_init__(self):
        check(bool(self.model), "model", "is required (a model folder, hub name or preset)")
        check(bool(self.data), "data", "is required (a preference data file, folder or hub name)")
        check(bool(self.output), "output", "is required (a run folder)")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        warn_small_alpha(self.alpha)  # the filter scores with ℓ_ropo whatever the training loss
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(0 < self.rho < 1 or not self.filter, "rho",
              f"must be in (0, 1), got {self.rho} (--no-filter trains on every pair)")
        check(0 <= self.filter_reference_weight <= 1, "filter_reference_weight",
              f"must be in [0, 1], got {self.filter_reference_weight}")
        check(self.samples == 0 or self.samples >= 2, "samples",
              f"K must be >= 2 (or 0: no sampling), got {self.samples}: one sample has nothing to be compared with")
        check(self.refill_rule in ("best-worst", "replace-rejected", "ranked"), "refill_rule",
              f"must be one of best-worst, replace-rejected, ranked; got {self.refill_rule!r}")
        check(not (self.refill and self.filter and self.refill_rule == "replace-rejected" and self.samples == 0),
              "samples", "replace-rejected needs samples (K >= 2) to replace the rejected response with")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        for key in ("max_new_tokens", "score_batch_size", "generation_batch_size", "eval_limit",
                    "eval_max_new_tokens"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(not (self.task and self.verifier), "verifier", "give --task or --verifier, not both")
        check(not self.verifier or bool(self.eval_data), "eval_data",
              "is required with --verifier (held-out prompts to evaluate on)")

    @property
    def filtering(self) -> bool:
        """Whether rounds filter at all (`--no-filter` or ρ = 0: every pair is kept)."""
        return self.filter and self.rho > 0
