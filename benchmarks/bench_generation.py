"""Batched generation (TransformersGenerator) vs one prompt at a time (plain `model.generate` per prompt).

Same model (the `tiny` preset, random weights), same prompts, same greedy decoding and
max_new_tokens. After one warm-up of each, the two alternate (which goes first flips every round),
and each reports the median of its 5 (full: 7) repeats. Tokens/s counts the tokens actually generated (up to EOS); the two produce the same text
(checked: `outputs_equal`), so they are credited the same tokens.

    python benchmarks/bench_generation.py [--quick]
"""
from __future__ import annotations

import json
import statistics
import sys
import time


def _prompts(count: int) -> list[str]:
    """Prompts of mixed lengths (6 to ~45 characters), like the demo task's and short chat turns."""
    shapes = ["{a}+{b}=", "What is {a} plus {b}?", "Add {a} and {b}, then explain the steps.",
              "Q: {a}+{b}\nA:"]
    return [shapes[i % len(shapes)].format(a=7 * i % 100, b=13 * i % 100) for i in range(count)]


def _one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """The baseline: one `model.generate` per prompt, no batching. Returns (texts, new tokens)."""
    import torch

    texts, tokens = [], 0
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, temperature=None, top_p=None, top_k=None)
            new = out[0, ids.shape[1]:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, tokens


def generation_batched_vs_loop(quick: bool) -> dict:
    import torch

    from noisepo.generation.base import GenerationParams
    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.models import build_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the numbers steady
    try:
        num_prompts, max_new_tokens, repeats = (32, 48, 5) if quick else (32, 64, 7)
        model, tokenizer = build_tiny_model("tiny", None, seed=0)
        model.eval()
        prompts = _prompts(num_prompts)
        generator = TransformersGenerator(model, tokenizer, batch_size=32, progress=False)
        params = GenerationParams(max_new_tokens=max_new_tokens)

        ours_texts = [r[0] for r in generator.generate(prompts, params)]  # warm-up
        base_texts, tokens = _one_at_a_time(model, tokenizer, prompts, max_new_tokens)
        ours_s, base_s = [], []
        sides = ((ours_s, lambda: generator.generate(prompts, params)),
                 (base_s, lambda: _one_at_a_time(model, tokenizer, prompts, max_new_tokens)))
        for round_ in range(repeats):  # alternate, so a busy neighbour slows both alike
            for times, run in sides if round_ % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    ours = tokens / statistics.median(ours_s)
    baseline = tokens / statistics.median(base_s)
    return {
        "name": "generation_batched_vs_loop",
        "ours": round(ours, 1),
        "baseline": round(baseline, 1),
        "unit": "tokens/s",
        "ratio": round(ours / baseline, 2),
        "target": ">= 8",
        "prompts": num_prompts,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": tokens,
        "repeats": repeats,
        "ours_seconds": [round(s, 4) for s in ours_s],
        "baseline_seconds": [round(s, 4) for s in base_s],
        "outputs_equal": ours_texts == base_texts,
        "notes": f"outputs equal: {ours_texts == base_texts}; {num_prompts} prompts × {max_new_tokens} tokens",
        "model": "tiny preset (4 layers, width 128), CPU, 1 thread, greedy",
        "batch_size": 32,
    }


BENCHMARKS = {"generation_batched_vs_loop": generation_batched_vs_loop}


if __name__ == "__main__":
    print(json.dumps(generation_batched_vs_loop("--quick" in sys.argv[1:]), indent=2))
