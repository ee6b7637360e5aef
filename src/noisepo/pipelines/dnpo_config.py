"""Config of `noisepo dnpo` and `noisepo spin` (METHODS §3, §4): self-improvement iterations.

Torch-free on purpose: `noisepo --help` imports every config module.

    model: sft-model/            # the SFT model: policy_0
    data: sft.jsonl              # prompt + completion (the human responses)
    output: runs/dnpo
    iterations: 4                # iteration 0 is SPIN, 1..3 are DNPO
    dsl: {enabled: true, scorer: verifier, verifier: addition}
    npo: {enabled: true, sigma0: 0.5, noise_penalty: 0.01, learning_rate: 1.0e-2}
    training: {learning_rate: 5.0e-7, epochs: 2, batch_size: 8}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from noisepo.config import option
from noisepo.errors import ConfigError
from noisepo.generation.config import BackendOptions
from noisepo.judges.config import ScorerOptions
from noisepo.lm_eval_tasks import check_lm_eval
from noisepo.training.config import (
    DEFAULT_NOISE_LR,
    DEFAULT_NOISE_PENALTY,
    DEFAULT_SIGMA0,
    OptimOptions,
    check,
)

DSL_MODES = ("pointwise", "pairwise")
PAIRWISE_SCORERS = ("openai", "local-lm", "pairwise-rm")  # judges.base.COMPARERS' names


@dataclass
class DSLOptions(ScorerOptions):
    """Dynamic Sample Labeling (METHODS §4.1): the scorer that judges the human and the model response."""

    scorer: Literal["openai", "reward-model", "verifier", "local-lm", "pairwise-rm"] = option(
        "openai", "openai: an LLM judge over an OpenAI-compatible chat API; reward-model: a local "
                  "sequence-classification model; verifier: a task verifier or pkg.mod:function; local-lm: a "
                  "local causal LM prompted as a judge; pairwise-rm (mode pairwise only): a PairRM-style "
                  "object by import path (pairwise_model). Pairwise mode takes openai, local-lm or pairwise-rm.")
    enabled: bool = option(True, "Relabel pairs by the scorer from iteration 1 on (off: SPIN's labels, "
                                 "chosen = the human response).")
    mode: Literal["pointwise", "pairwise"] = option(
        "pointwise", "pointwise: the human and the model response are scored alone and the pair flips when "
                     "the model's scores strictly higher; pairwise: the judge says which of the two is "
                     "better, asked in both orders (A/B swapped), and the pair flips only when the model's "
                     "wins both; orders that disagree are a tie (counted, the pair stays unflipped).")
    pairwise_model: str | None = option(None, "pairwise-rm: import path pkg.mod:attr of an object with "
                                              "compare(prompt, response_a, response_b) -> P(A better) in [0, 1] "
                                              "or a bool (a class or factory there is called once, with no "
                                              "arguments).")

    def __post_init__(self):
        check(self.mode in DSL_MODES, "mode", f"must be one of {', '.join(DSL_MODES)}; got {self.mode!r}")
        if self.enabled:  # a disabled DSL needs no reachable scorer
            self.check_scorer()

    def check_scorer(self) -> None:
        """The scorer options, and that the scorer can judge in this mode (also for the win rate)."""
        ScorerOptions.__post_init__(self)
        if self.mode == "pairwise":
            check(self.scorer in PAIRWISE_SCORERS, "scorer",
                  f"{self.scorer} cannot compare two responses; with mode pairwise use one of "
                  f"{', '.join(PAIRWISE_SCORERS)}")
        else:
            check(self.scorer != "pairwise-rm", "scorer",
                  "pairwise-rm compares two responses: use it with mode pairwise")
        if self.scorer == "pairwise-rm":
            check(bool(self.pairwise_model), "pairwise_model",
                  "is required for the pairwise-rm scorer (an import path pkg.mod:attr)")


@dataclass
class NPOOptions:
    """Noise Preference Optimization (METHODS §4.2): a trainable noise head on the reference."""

    enabled: bool = option(True, "Train with a noisy reference on the rejected side from iteration 1 on "
                                 "(off: the plain DPO/SPIN loss).")
    sigma0: float = option(DEFAULT_SIGMA0, "σ₀: the noise scale a fresh head starts from (W = 0, b = softplus⁻¹(σ₀); "
                                 "bounded: logit(σ₀/σ_max)). Not given by the paper; 0.5 validated best "
                                 "(experiments/grids/npo.yaml).")
    noise_penalty: float = option(DEFAULT_NOISE_PENALTY, "α_σ: weight of mean(σ²) in the noise head's loss "
                                       "(constraint penalty or both; ignored with bound). Not given by the paper; "
                                       "0.01 validated best.")
    constraint: Literal["penalty", "bound", "both"] = option(
        "penalty", "How σ is kept small: penalty: α_σ·mean(σ²) in the head's loss, σ = softplus(·) unbounded; "
                   "bound: the paper's σ² < ε as σ = σ_max·sigmoid(·) ∈ (0, σ_max), no penalty; both: the bound "
                   "and the penalty.")
    sigma_max: float | None = option(None, "σ_max of the bound (constraint bound or both; must exceed sigma0). "
                                           "The paper's ε is σ_max²; it gives no value.")
    penalty_over: Literal["vocab", "response_tokens"] = option(
        "vocab", "What the penalty's mean(σ²) averages over: vocab: every entry of V at every rejected position "
                 "(the paper's mean σ²); response_tokens: σ at the rejected response's own tokens only.")
    schedule: Literal["joint", "alternating"] = option(
        "joint", "joint: one backward trains the policy and the head together (each on its own part); "
                 "alternating: head_steps updates of the head alone (its own AdamW) before each policy step, as "
                 "the paper's Fig. 3 caption describes.")
    head_steps: int = option(1, "k: head updates per policy step with schedule alternating (k >= 1).")
    resample: Literal["step", "pair_epoch"] = option(
        "step", "step: ε drawn afresh at every step; pair_epoch: ε fixed per pair within an epoch (a seed from "
                "the pair's tokens, the run's seed and the epoch).")
    objective: Literal["minmax", "eq10"] = option(
        "minmax", "minmax: the policy minimises ℓ(M) with the noise held fixed, the head maximises it under the "
                  "constraint (METHODS §4.2); eq10: the paper's Eq. 10 read literally, one joint minimisation over "
                  "policy and head of ℓ(M_noisy) − ℓ(M_clean) + α_σ·mean(σ²) (schedule joint only).")
    rank: int | None = option(None, "Rank of the head's W (null: full d × V, as in the paper; r: a cheaper "
                                    "low-rank head with r·(d + V) weights).")
    learning_rate: float | None = option(DEFAULT_NOISE_LR, "The noise head's learning rate (null: the policy's, "
                                     "at which Adam barely moves the head in an iteration). Not given by the paper.")
    reference_states: Literal["auto", "forward", "cache"] = option(
        "auto", "Where the rejected side's reference hidden states come from: forward: a frozen copy of "
                "the reference runs on the rejected half every step; cache: computed once per iteration and "
                "kept per pair (N·d floats per pair, no reference model in memory, no reference forward: "
                "cheaper for small models and datasets); auto: cache when the states fit 1 GiB of host "
                "memory, else forward. The numbers are the same either way.")
    chunk_size: int | None = option(None, "Response positions per chunk of the noisy log-softmax (null: "
                                          "chunks of ~16 MiB of float32 logits; memory ~4 such blocks).")

    def __post_init__(self):
        check(self.sigma0 > 0, "sigma0", f"must be > 0, got {self.sigma0}")
        check(self.noise_penalty >= 0, "noise_penalty", f"must be >= 0, got {self.noise_penalty}")
        check(self.constraint in ("penalty", "bound", "both"), "constraint",
              f"must be one of penalty, bound, both; got {self.constraint!r}")
        if self.constraint in ("bound", "both"):
            check(self.sigma_max is not None, "sigma_max", f"is required with constraint {self.constraint} "
                                                           f"(a value > sigma0 = {self.sigma0})")
            check(self.sigma_max > self.sigma0, "sigma_max", f"must be > sigma0 = {self.sigma0}, got {self.sigma_max}")
        check(self.sigma_max is None or self.sigma_max > 0, "sigma_max", f"must be > 0 or null, got {self.sigma_max}")
        check(self.penalty_over in ("vocab", "response_tokens"), "penalty_over",
              f"must be one of vocab, response_tokens; got {self.penalty_over!r}")
        check(self.schedule in ("joint", "alternating"), "schedule",
              f"must be one of joint, alternating; got {self.schedule!r}")
        check(self.head_steps >= 1, "head_steps", f"must be >= 1, got {self.head_steps}")
        check(self.resample in ("step", "pair_epoch"), "resample", f"must be one of step, pair_epoch; got {self.resample!r}")
        check(self.objective in ("minmax", "eq10"), "objective", f"must be one of minmax, eq10; got {self.objective!r}")
        check(not (self.objective == "eq10" and self.schedule != "joint"), "objective",
              "eq10 is one joint minimisation: use it with schedule joint")
        check(self.rank is None or self.rank >= 1, "rank", f"must be >= 1 or null, got {self.rank}")
        check(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be > 0 or null")
        check(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "must be >= 1 or null")


@dataclass
class RobustOptions:
    """Robust self-improvement (an arm neither paper has): ROPO's loss and noise filter (METHODS §2,
    §5.1) on DNPO's pairs, for when the scorer that labels them errs."""

    loss: Literal["dpo", "ropo"] = option("dpo", "Pairwise loss from iteration 1 on (iteration 0, the SPIN "
                                                 "warm-up, keeps dpo): dpo (SPIN/DNPO) or ropo (noise-tolerant, "
                                                 "α below).")
    alpha: float = option(14.0, "α of ℓ_ropo (the loss with --robust.loss ropo, and the filter's score).")
    rho: float = option(0.0, "ρ of ROPO's filter, in [0, 1): from iteration 1 on, each iteration first trains "
                             "on every pair, scores every pair with ℓ_ropo under that model, then trains again "
                             "from the same start on the (1−ρ)N pairs of lowest ℓ_ropo (0: no filter, one "
                             "training).")
    filter_misranked_only: bool = option(True, "Discard only pairs the filter's model ranks against their label "
                                               "(h < 0), at most ρN (as `noisepo ropo` does by default); "
                                               "--no-robust.filter-misranked-only: exactly ρN, the paper's rule.")
    filter_reference: str = option("initial", "The reference of the filter's ℓ_ropo scores: initial (the SFT "
                                              "model, fixed across iterations), previous (the iteration's own "
                                              "reference, policy_k: it drifts with the pairs it judges, and "
                                              "inverted the filter by iteration 3 in experiment C), or a model "
                                              "folder.")

    def __post_init__(self):
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.rho < 1, "rho", f"must be in [0, 1), got {self.rho}")
        check(bool(self.filter_reference), "filter_reference", "is required: initial, previous or a model folder")


@dataclass
class GenerationOptions(BackendOptions):
    """How each iteration samples the model's own responses (greedy by default, METHODS §3), and with
    which engine (`backend`: transformers or vllm)."""

    max_new_tokens: int = option(256, "Most new tokens per response.")
    temperature: float = option(0.0, "0: greedy (the default of SPIN's and DNPO's pipelines).")
    top_p: float = option(1.0, "Nucleus mass when sampling.")
    batch_size: int = option(32, "Prompts per generate call.")

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        BackendOptions.__post_init__(self)


@dataclass
class DNPOConfig:
    """`noisepo dnpo`: from an SFT model and its data, iteration 0 is SPIN and iterations 1.. are DNPO.
    Each iteration: generate -> score (DSL) -> pairs -> train (reference: the previous iterate) ->
    evaluate. `--dsl.no-enabled --npo.no-enabled` is SPIN; one of them alone is an ablation."""

    model: str = option("", "The SFT model (policy_0): a local folder, a hub name, or a preset (micro, "
                            "tiny, small) built once into OUTPUT/base_model.")
    tokenizer: str | None = option(None, "Tokenizer folder or hub name, for a --model folder saved without "
                                         "one: joined with the model's files in OUTPUT/base_model.")
    data: str = option("", "SFT data (prompt + completion, or messages): the prompts and human responses.")
    output: str = option("", "Run folder: manifest.json, iter_<k>/, summary.json. A rerun with the same "
                             "options resumes at the first unfinished stage.")
    iterations: int = option(4, "Iterations in all: 0 (the SPIN warm-up), then 1..N-1 (DNPO).")
    history: int = option(1, "Iteration k trains on the pairs of iterations k, k-1, ..., k-history "
                             "(SPIN: 1).")
    beta: float = option(0.1, "β (λ in SPIN): scale of the log-ratio margin.")
    seed: int = option(0, "Sampling seed (iteration k samples with seed + k; unused when greedy).")
    limit: int | None = option(None, "Use at most this many SFT records (null: all).")
    task: str | None = option(None, "Task whose verifier scores the greedy evaluation after each iteration: "
                                    "a built-in name (addition) or an import path (mypkg.mod:Task). Without "
                                    "--eval-data its test prompts are used.")
    eval_data: str | None = option(None, "Held-out prompts for the evaluation after every iteration (an "
                                         "`answer` column unless --task is given).")
    eval_limit: int = option(200, "Evaluate on at most this many prompts.")
    eval_max_new_tokens: int = option(32, "Most new tokens in the greedy evaluation.")
    win_rate: bool = option(False, "After each iteration, judge the new model's evaluation responses "
                                   "against the previous iterate's with the dsl scorer's options.")
    lm_eval_tasks: list[str] = option(default_factory=list,
                                      help="lm-evaluation-harness tasks run on the SFT model and each iteration's "
                                           "(extra 'eval'): lm-eval names (hellaswag, ...) or noisepo:TASK, a "
                                           "noisepo task's test prompts (--eval-limit of them) as an lm-eval "
                                           "generate_until task scored by the task's verifier "
                                           "(noisepo:addition, noisepo:mypkg.mod:Task).")
    lm_eval_limit: int | None = option(None, "lm-eval: examples per task (null: all).")
    lm_eval_include: str | None = option(None, "lm-eval: a folder of your own task YAMLs (TaskManager "
                                               "include_path).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weights dtype when loading.")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")
    skip_invalid: bool = option(False, "Skip invalid data rows (counted and reported) instead of stopping.")
    progress: bool = option(True, "Show progress bars.")
    dsl: DSLOptions = option(default_factory=DSLOptions, help="Dynamic Sample Labeling.")
    npo: NPOOptions = option(default_factory=NPOOptions, help="Noise Preference Optimization.")
    generation: GenerationOptions = option(default_factory=GenerationOptions, help="Sampling the model's responses.")
    training: OptimOptions = option(default_factory=OptimOptions, help="How each iteration trains.")
    robust: RobustOptions = option(default_factory=RobustOptions,
                                   help="ROPO's loss and filter on the self-generated pairs (off by default).")

    def __post_init__(self):
        check(bool(self.model), "model", "is required (the SFT model: a folder, hub name or preset)")
        check(bool(self.data), "data", "is required (the SFT data file, folder or hub name)")
        check(bool(self.output), "output", "is required (a run folder)")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(self.history >= 0, "history", f"must be >= 0, got {self.history}")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        for key in ("eval_limit", "eval_max_new_tokens"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(not (self.robust.loss != "dpo" and self.npo.enabled), "robust.loss",
              f"NPO is defined on the DPO loss (METHODS §4.2); use --no-npo.enabled with --robust.loss "
              f"{self.robust.loss}")
        check_lm_eval(self.lm_eval_tasks, self.lm_eval_include)  # before any output: missing extra, unknown task
        if self.win_rate and not self.dsl.enabled:  # the win rate uses the scorer even without DSL
            try:
                self.dsl.check_scorer()
            except ConfigError as err:
                err.key = f"dsl.{err.key}" if err.key else err.key
                raise

    def uses_dsl(self, iteration: int) -> bool:
        """DSL relabels from iteration 1 on (iteration 0 is the SPIN warm-up)."""
        return self.dsl.enabled and iteration >= 1

    def uses_npo(self, iteration: int) -> bool:
        return self.npo.enabled and iteration >= 1

    def loss_of(self, iteration: int) -> str:
        return self.robust.loss if iteration >= 1 else "dpo"

    def uses_filter(self, iteration: int) -> bool:
        """ROPO's filter runs from iteration 1 on, like DSL (iteration 0 is the SPIN warm-up)."""
        return self.robust.rho > 0 and iteration >= 1


@dataclass
class SPINConfig(DNPOConfig):
    """`noisepo spin`: SPIN's iterations (METHODS §3): the DNPO loop with DSL and NPO off."""

    dsl: DSLOptions = option(default_factory=lambda: DSLOptions(enabled=False), help="Dynamic Sample Labeling "
                                                                                     "(off for SPIN).")
    npo: NPOOptions = option(default_factory=lambda: NPOOptions(enabled=False), help="Noise Preference "
                                                                                     "Optimization (off for SPIN).")
