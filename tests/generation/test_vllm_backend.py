"""VLLMGenerator: the Generator contract on vLLM (needs the 'vllm' extra and a CUDA GPU)."""
from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (extra 'vllm', CUDA machines only)")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from noisepo.generation.vllm_backend import VLLMGenerator
    from noisepo.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny_for_vllm")
    build_tiny_model("tiny", path, seed=0)  # head size 32: supported by vLLM's attention kernels
    return VLLMGenerator(str(path), gpu_memory_utilization=0.2, progress=False)


def test_contract_and_determinism(generator):
    from noisepo.generation.base import GenerationParams

    prompts = ["1+1=", "hello there", "abc"]
    greedy = generator.generate(prompts, GenerationParams(max_new_tokens=8, num_samples=2))
    assert len(greedy) == 3 and all(len(r) == 2 and r[0] == r[1] for r in greedy)
    params = GenerationParams(max_new_tokens=8, temperature=1.0, num_samples=2, seed=3)
    assert generator.generate(prompts, params) == generator.generate(prompts, params)
    assert generator.generate(prompts[1:], params) == generator.generate(prompts, params)[1:]
    stopped = generator.generate(prompts, GenerationParams(max_new_tokens=8, stop=["e"]))
    assert all("e" not in r[0] for r in stopped)
