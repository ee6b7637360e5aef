"""Config of `noisepo score` (pointwise scores for preference pairs, METHODS §4.1).

Torch-free on purpose: `noisepo --help` imports every config module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from noisepo.config import check, option

ScorerName = Literal["openai", "reward-model", "verifier", "local-lm"]


@dataclass
class ScorerOptions:
    """Which scorer and how to reach it (what `make_scorer` reads); the loops nest it (DNPO's `dsl:`)."""

    scorer: ScorerName = option("openai", "openai: an LLM judge over an OpenAI-compatible chat API; "
                                          "reward-model: a local sequence-classification model; "
                                          "verifier: a task verifier or pkg.mod:function; "
                                          "local-lm: a local causal LM prompted as a judge.")
    # openai
    base_url: str | None = option(None, "openai: API base URL (e.g. http://127.0.0.1:8000/v1 for "
                                        "`noisepo serve` or vLLM); null: OpenAI's.")
    judge_model: str = option("gpt-4o-mini", "openai: the judge model's name on that server.")
    api_key_env: str = option("OPENAI_API_KEY", "openai: the environment variable holding the API key "
                                                "(the key itself is never printed or stored).")
    max_concurrency: int = option(8, "openai: requests in flight at once.")
    timeout: float = option(60.0, "openai: seconds before a request times out (then it is retried).")
    max_retries: int = option(5, "openai: retries per item (at most 1 + this many requests): on 429, "
                                 "5xx, timeouts and dropped connections with exponential backoff and "
                                 "jitter; on an unparsable reply at once (counted as unparsable_retries).")
    template: str | None = option(None, "openai, local-lm: the judge prompt, a file path or a string "
                                        "with {prompt} and {response} (pairwise: {prompt}, {response_a} "
                                        "and {response_b}); null: the built-in 1-100 (pairwise: A or B) prompt.")
    max_new_tokens: int = option(8, "openai, local-lm: most tokens of the judge's reply (a number, or "
                                    "pairwise a letter).")
    # local models
    model: str | None = option(None, "reward-model, local-lm: a local model folder or hub name.")
    batch_size: int = option(16, "reward-model, local-lm: items per forward pass.")
    max_length: int = option(1024, "reward-model: most tokens per input (cut from the left).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weights dtype when loading.")
    device: str = option("auto", "reward-model, local-lm: cpu, cuda, cuda:1, ... (auto: cuda if available).")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")
    # verifier
    verifier: str | None = option(None, "verifier: a built-in task name (addition) or an import path "
                                        "pkg.mod:function with signature (prompt, response) -> float.")
    verifier_error_rate: float = option(0.0, "verifier: a deliberately imperfect judge for robustness "
                                             "experiments: on this fraction of items (chosen by a hash of the "
                                             "item, so the same item always gets the same verdict) the score s "
                                             "becomes 1 - s.")

    def __post_init__(self):
        check(self.max_concurrency >= 1, "max_concurrency", f"must be >= 1, got {self.max_concurrency}")
        check(math.isfinite(self.timeout) and self.timeout > 0, "timeout", f"must be > 0, got {self.timeout}")
        check(self.max_retries >= 0, "max_retries", f"must be >= 0, got {self.max_retries}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        if self.scorer in ("reward-model", "local-lm"):
            check(bool(self.model), "model", f"is required for the {self.scorer} scorer")
        if self.scorer == "verifier":
            check(bool(self.verifier), "verifier", "is required for the verifier scorer "
                                                   "(a task name or pkg.mod:function)")
        check(0 <= self.verifier_error_rate <= 1, "verifier_error_rate",
              f"must be in [0, 1], got {self.verifier_error_rate}")


@dataclass
class ScoreConfig(ScorerOptions):
    """`noisepo score`: add `chosen_score` and `rejected_score` to every preference pair."""

    data: str = option("", "Preference pairs (prompt, chosen, rejected): .jsonl, .json, .parquet, a "
                           "datasets folder or a hub name.")
    output: str = option("", "Output JSONL (written atomically): every input row and column, plus "
                             "chosen_score and rejected_score (null where scoring failed).")
    # cache and data
    cache: bool = option(True, "Keep every successful score in an SQLite cache, so a rerun after a "
                               "crash repeats no finished request.")
    cache_path: str | None = option(None, "Cache file (default: OUTPUT.cache.sqlite).")
    skip_invalid: bool = option(False, "Skip invalid data rows (counted and reported) instead of stopping.")

    def __post_init__(self):
        check(bool(self.data), "data", "is required (a preference data file, folder or hub name)")
        check(bool(self.output), "output", "is required (an output .jsonl file)")
        super().__post_init__()

    @property
    def resolved_cache_path(self) -> str | None:
        if not self.cache:
            return None
        return self.cache_path or f"{self.output}.cache.sqlite"
