"""GPU figures on a real architecture and size: DPO step tokens/s and MFU, NPO's overhead, generation tokens/s.

    python benchmarks/gpu.py                          # Qwen2-0.5B shapes, bf16, on the GPU
    python benchmarks/gpu.py --arch llama-1b          # Llama-3.2-1B shapes
    python benchmarks/gpu.py --tiny                   # a few seconds on a CPU: checks the script runs

The model is built from a configuration with random weights (speed does not depend on the values),
in bfloat16 (weights, gradients and AdamW state: pure bf16, no fp32 master copy). Data: synthetic
pairs of exactly `--length` tokens per side, half prompt and half response (`bench_npo.synthetic_pairs`).

- DPO step: `PreferenceTrainer` (loss dpo, reference log-probs precomputed, as a real run does), its
  own dataloader + `training_step` + the optimizer step (`bench_training.Stepper`), timed alternately
  with the NPO step after a warm-up, median of `--rounds` rounds of `--steps` steps.
- MFU = model FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs, per step:
      6 · N · tokens                       the trunk (N = non-embedding parameters of the decoder layers)
    + 6 · L · d · Σ T²                     causal attention (QKᵀ and AV; 12·L·d·T² halved by the mask)
    + 6 · d · V · response tokens           the LM head, on the positions whose log-prob the loss needs
    + 2 · (N · tokens + …)                  a reference forward, only when it is not precomputed (here: 0)
  tokens = every token of chosen + rejected. Recomputation (ours: the LM head's chunk logits in the
  backward) is not counted: MFU counts the model's work, not ours.
- NPO overhead: NPO step time / DPO step time, the default NPO (full d × V noise head, reference
  forward on the rejected half every step); target <= 1.3.
- Generation: `model.generate` (what `TransformersGenerator` calls), greedy, KV cache, `--gen-prompts`
  prompts of `--gen-prompt-length` tokens in one batch, exactly `--gen-tokens` new tokens each
  (`min_new_tokens`); tokens/s = generated tokens / wall time, median of `--rounds`.

Prints the figures and writes them as JSON (`--output`, default benchmarks/results/gpu.json) with the
GPU's name and the command line. Never run in CI: nothing requires a GPU (`--tiny` is what the tests run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ARCHS = {
    # Qwen2-0.5B: 24 layers, d 896, 14 heads (2 KV), MLP 4864, V 151 936, tied embeddings (~494M params)
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    # Llama-3.2-1B: 16 layers, d 2048, 32 heads (8 KV), MLP 8192, V 128 256, tied embeddings (~1.24B params)
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # --tiny: checks the script on a CPU in seconds
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=172, vocab_size=1024, tie_word_embeddings=False),
}
# Dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0,
               "RTX 4090": 165.0, "V100": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # the more specific names come first
        if key in device_name:
            return value
    return None


def build_model(arch: dict, *, dtype, device, max_positions: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    spec = dict(arch)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=max_positions,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


def model_flops(model, *, pairs: int, length: int) -> dict:
    """The MFU numerator by term (module docstring) for one DPO step on `pairs` pairs of `length`
    tokens per side, half response."""
    config = model.config
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    trunk = sum(p.numel() for p in model.model.layers.parameters())
    sequences, responses = 2 * pairs, 2 * pairs * (length // 2)
    tokens = sequences * length
    terms = {"trunk": 6 * trunk * tokens, "attention": 6 * layers * d * sequences * length ** 2,
             "lm_head": 6 * d * vocab * responses, "reference_forward": 0}
    return {"terms": terms, "total": sum(terms.values()), "tokens": tokens, "non_embedding_params": trunk}


def make_trainer(kind: str, model, pairs: list[dict], output: str, batch: int, *, device):
    from transformers import TrainingArguments

    from noisepo.training.npo import NPOTrainer
    from noisepo.training.preference import PreferenceTrainer

    args = TrainingArguments(output_dir=output, per_device_train_batch_size=batch, max_steps=10_000,
                             learning_rate=1e-6, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=device.type == "cpu", dataloader_pin_memory=False, seed=0)
    cls = NPOTrainer if kind == "npo" else PreferenceTrainer
    return cls(model, args, pairs, loss="dpo", beta=0.1, reference="precompute", group_by_length=False)


def time_training(arch: dict, args, device, dtype) -> dict:
    import torch
    from bench_npo import synthetic_pairs
    from bench_training import Stepper, alternate

    shape = dict(vocab=arch["vocab_size"], length=args.length, batch=args.batch)
    pairs = synthetic_pairs(shape, args.batch * (args.rounds * args.steps + 2))
    with tempfile.TemporaryDirectory() as tmp:
        steppers = {}
        for kind in ("dpo", "npo"):
            model = build_model(arch, dtype=dtype, device=device, max_positions=2 * args.length)
            steppers[kind] = Stepper(make_trainer(kind, model, pairs, str(Path(tmp) / kind), args.batch,
                                                  device=device))
        flops = model_flops(steppers["dpo"].trainer.model, pairs=args.batch, length=args.length)
        for stepper in steppers.values():
            stepper.run(1)  # warm-up: kernels, allocator, optimizer state
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = alternate(steppers, args.rounds, args.steps)
    seconds = {kind: statistics.median(s / args.steps for s, _ in rows) for kind, rows in runs.items()}
    return {"seconds": seconds, "flops": flops}


def time_generation(arch: dict, args, device, dtype) -> dict:
    import torch

    model = build_model(arch, dtype=dtype, device=device, max_positions=args.gen_prompt_length + args.gen_tokens + 8)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, arch["vocab_size"], (args.gen_prompts, args.gen_prompt_length), generator=generator)
    prompts = prompts.to(device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                           max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, pad_token_id=0,
                           eos_token_id=2, temperature=None, top_p=None, top_k=None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()  # warm-up
    seconds = statistics.median(run() for _ in range(args.rounds))
    return {"seconds": seconds, "tokens": args.gen_prompts * args.gen_tokens,
            "tokens_per_s": args.gen_prompts * args.gen_tokens / seconds}


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[a for a in ARCHS if a != "tiny"], default="qwen2-0.5b")
    parser.add_argument("--tiny", action="store_true", help="A tiny model on whatever device (a CPU: seconds).")
    parser.add_argument("--batch", type=int, default=8, help="Pairs per step.")
    parser.add_argument("--length", type=int, default=1024, help="Tokens per side (half prompt, half response).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="Steps per timed round.")
    parser.add_argument("--gen-prompts", type=int, default=64)
    parser.add_argument("--gen-prompt-length", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, help="The device's dense bf16 peak (default: from its name).")
    parser.add_argument("--output", default=str(HERE / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "src"))
    import torch
    from run import describe, machine

    if args.tiny:
        args.arch = "tiny"
        args.batch, args.length, args.rounds, args.steps = 2, 32, 5, 1
        args.gen_prompts, args.gen_prompt_length, args.gen_tokens = 4, 8, 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    arch = ARCHS[args.arch]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    training = time_training(arch, args, device, dtype)
    generation = time_generation(arch, args, device, dtype)
    dpo, npo = training["seconds"]["dpo"], training["seconds"]["npo"]
    flops = training["flops"]
    achieved = flops["total"] / dpo / 1e12
    result = {
        "device": name, "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(machine()), "arch": args.arch, "dtype": str(dtype).replace("torch.", ""),
        "non_embedding_params": flops["non_embedding_params"], "batch_pairs": args.batch, "length": args.length,
        "dpo_step_s": round(dpo, 4), "dpo_tokens_per_s": round(flops["tokens"] / dpo, 1),
        "model_tflops_per_step": _sig(flops["total"] / 1e12),
        "flop_terms_tflops": {k: _sig(v / 1e12) for k, v in flops["terms"].items()},
        "achieved_tflops": _sig(achieved), "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None, "mfu_target": ">= 0.35",
        "npo_step_s": round(npo, 4), "npo_overhead": round(npo / dpo, 3), "npo_target": "<= 1.3",
        "generation_tokens_per_s": round(generation["tokens_per_s"], 1),
        "generation": {"prompts": args.gen_prompts, "prompt_length": args.gen_prompt_length,
                       "new_tokens": args.gen_tokens, "seconds": round(generation["seconds"], 4)},
        "rounds": args.rounds, "steps_per_round": args.steps,
    }
    print(json.dumps(result, indent=2))
    from noisepo.io import write_json_atomic

    write_json_atomic(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
