"""Generation with vLLM (extra 'vllm', needs a GPU): the same `Generator` contract, much faster.

Written against vLLM's documented offline API: `LLM(model=..., tensor_parallel_size=...)` and
`LLM.generate(prompts, SamplingParams(n=, temperature=, top_p=, max_tokens=, seed=, stop=))`.
Prompts are passed as token ids (`{"prompt_token_ids": ...}`) encoded by `base.encode_prompt`, so
vLLM sees exactly the ids the transformers backend and training see (vLLM's own text path would add
a BOS that chat templates already wrote). vLLM removes EOS and stop strings from the text itself.

Determinism: every request carries `seed`, which vLLM uses for that request alone, so a response
does not depend on batching. Outputs are not bitwise equal to the transformers backend's (different
kernels), only statistically alike.

Several GPUs: vLLM splits the model itself (`tensor_parallel_size`, its own worker processes), so
this backend is not sharded by rank like `TransformersGenerator(shard=True)`: run it from one
process (`noisepo generate --backend vllm`), not under `accelerate launch`.
"""
from __future__ import annotations

from noisepo.errors import ConfigError
from noisepo.generation.base import GenerationParams, encode_prompt


class VLLMGenerator:
    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 trust_remote_code: bool = False, progress: bool = True, tokenizer=None):
        try:
            import vllm
        except ImportError:
            raise ConfigError("the vllm backend needs vLLM (pip install 'noisepo[vllm]', on a CUDA "
                              "machine); or use --backend transformers", key="backend") from None
        self._vllm = vllm
        self.progress = progress
        self.llm = vllm.LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code)
        if tokenizer is None:
            from noisepo.models import load_tokenizer

            tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer

    def generate(self, prompt_texts: list[str], params: GenerationParams) -> list[list[str]]:
        if not prompt_texts:
            return []
        # Greedy samples are all the same: ask for one and copy (vLLM rejects n > 1 when greedy in
        # some versions).
        n = 1 if params.greedy else params.num_samples
        sampling = self._vllm.SamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            seed=params.seed, stop=list(params.stop) or None)
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, text)} for text in prompt_texts]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=self.progress)
        results = []
        for output in outputs:
            texts = [completion.text for completion in output.outputs]
            results.append(texts * params.num_samples if n == 1 else texts)
        return results
