"""Per-architecture step time: each architecture's DPO and NPO step over Llama's (issue 22, item 3).

`BENCHMARKS[name](quick) -> {"name", "ours", "baseline", "unit", "ratio", ...}` (see run.py).

The architectures are the test matrix's (tests/architectures/micro_archs.py: GPT-2, Qwen2, Mistral,
Gemma, Phi-3, a tied-head Qwen2, Gemma-2 with logit soft-capping), built wider: width 128, 2 layers,
4 heads of 32 (`--quick`; full: width 256, 4 layers, 4 heads of 64), V = 8 000 (full 32 000), float32;
B = 4 pairs of T = 128 tokens.
Each is compared with a Llama of the same parameter count (±5 %): the architecture's MLP width is
solved for so that its total count matches a Llama with the same dimensions and the same tying of
the LM head (tied architectures against a tied Llama: the embedding alone is most of a small model,
so no MLP width could make up for it). The counts are printed and returned.

Per architecture one fresh one-thread process builds both models and alternates four steppers after
a warm-up: the architecture's DPO step and NPO step and Llama's (bench_training.Stepper: each
trainer's own dataloader, `training_step` and AdamW step; DPO with the reference precomputed, NPO
with its defaults, the reference's rejected-side states cached), on pairs of random ids (half
prompt, half response). ratio = the median over rounds of the per-round time ratio
architecture / Llama (`llama` against itself: the measurement's own spread). Target <= 1.5.

`gemma_cliff`: the user's report of issue 22 (a micro Gemma's DPO step ≈ 50× Mistral's, 10 steps
10.5 s against 0.18 s, through `noisepo train`, BPE tokenizer, ChatML). Reproduced with the same
micro size (width 64, 2 layers, 4 heads) and short ChatML pairs tokenised by a 400-token BPE:
`ours` = Gemma with GemmaConfig's defaults kept (vocab_size 256 000, head_dim 256), `baseline` =
Mistral with vocab_size = len(tokenizer), both loaded as `noisepo train` loads them (dtype "auto":
float32, what save_pretrained wrote), DPO with the trainer's defaults (length-grouped batches of 8,
reference precomputed); `ratio_npo` the same for NPO's step. The extra ratios change one default
at a time, which shows the cause: the 256 000-row LM head, whose softmax every log-prob computes; noisepo's
log-prob path is not involved (with the vocabulary fitted, Gemma steps as fast as Mistral).
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "tests"))  # the matrix's architecture table (tests/architectures)

ARCHS = ("llama", "gpt2", "qwen2", "mistral", "gemma", "phi3", "qwen2-tied", "gemma2")
TARGET = "<= 1.5"
TOLERANCE = 0.05  # parameter counts within ±5 % of the Llama's


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=128, layers=2, heads=4, head_dim=32, intermediate=344, vocab=8000,
                    batch=4, length=128)
    return dict(hidden=256, layers=4, heads=4, head_dim=64, intermediate=688, vocab=32000,
                batch=4, length=128)  # ~0.8 s per Llama DPO step on one core: the 8 architectures in ~10 min


def _tokenizer():
    from architectures.micro_archs import build_bpe_tokenizer

    return build_bpe_tokenizer()


def _config(arch: str, s: dict, intermediate: int, tokenizer):
    """`arch` at the benchmark's dimensions; "llama-tied": a Llama with its LM head tied."""
    from architectures.micro_archs import ARCHS as MICRO
    from architectures.micro_archs import arch_config

    base = "llama" if arch == "llama-tied" else arch
    values = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  head_dim=s["head_dim"], intermediate_size=intermediate, vocab_size=s["vocab"],
                  max_position_embeddings=2 * s["length"])
    kv = MICRO[base][1].get("num_key_value_heads")
    if kv is not None:
        values["num_key_value_heads"] = kv
    if arch == "llama-tied":
        values["tie_word_embeddings"] = True
    if base == "gemma2":
        values["query_pre_attn_scalar"] = s["head_dim"]
    return arch_config(base, tokenizer, **values)


def parameter_count(config) -> int:
    """Parameters of the model `config` builds (tied weights once), without allocating them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def is_tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def matched(arch: str, s: dict, tokenizer) -> tuple[object, object]:
    """(config of `arch`, config of its Llama baseline) with parameter counts within TOLERANCE: the
    architecture's MLP width solved for (the count is linear in it)."""
    config = _config(arch, s, s["intermediate"], tokenizer)
    baseline = _config("llama-tied" if is_tied(config) and arch != "llama" else "llama", s, s["intermediate"],
                       tokenizer)
    target = parameter_count(baseline)
    low, high = parameter_count(_config(arch, s, 64, tokenizer)), parameter_count(_config(arch, s, 1064, tokenizer))
    width = max(8, round(64 + (target - low) * 1000 / (high - low)))
    config = _config(arch, s, width, tokenizer)
    count = parameter_count(config)
    if abs(count - target) > TOLERANCE * target:
        raise RuntimeError(f"{arch}: {count} parameters at MLP width {width}, Llama {target}")
    return config, baseline


def _build(config, folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return str(folder)


def _pairs(s: dict, n: int, seed: int = 0) -> list[dict]:
    from bench_npo import synthetic_pairs

    return synthetic_pairs(s, n, seed)


def _trainer(kind: str, model_dir: str, pairs: list[dict], output: str, s: dict):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from noisepo.training.npo import NPOTrainer
    from noisepo.training.preference import PreferenceTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=s["batch"], max_steps=1000,
                             learning_rate=1e-5, report_to="none", save_strategy="no",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_pin_memory=False,
                             seed=0)
    cls = NPOTrainer if kind == "npo" else PreferenceTrainer
    return cls(model, args, pairs, loss="dpo", beta=0.1, reference="precompute", group_by_length=False)


def _time_child(arch: str, quick: bool) -> None:
    """One architecture against its Llama: per-round step times of the four steppers, one JSON line."""
    import torch
    from bench_training import Stepper, alternate

    from noisepo.logprobs import has_plain_lm_head

    torch.set_num_threads(1)
    s = _sizes(quick)
    rounds, steps = (7, 2) if quick else (7, 1)
    tokenizer = _tokenizer()
    config, baseline = matched(arch, s, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"arch": _build(config, Path(tmp) / "arch"), "llama": _build(baseline, Path(tmp) / "llama")}
        pairs = _pairs(s, 4 * s["batch"])
        steppers = {f"{side}_{kind}": Stepper(_trainer(kind, folders[side], pairs, str(Path(tmp) / f"{side}_{kind}"), s))
                    for side in ("arch", "llama") for kind in ("dpo", "npo")}
        for stepper in steppers.values():
            stepper.run(1)  # warm-up
        times = {name: [seconds / steps for seconds, _ in runs]
                 for name, runs in alternate(steppers, rounds, steps).items()}
        hidden_path = has_plain_lm_head(steppers["arch_dpo"].trainer.model)
    print(json.dumps({**times, "parameters": parameter_count(config), "llama_parameters": parameter_count(baseline),
                      "mlp_width": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
                      "llama_tied": is_tied(baseline), "hidden_path": hidden_path, "rounds": rounds,
                      "steps_per_round": steps, "attention": _attention(config),
                      "device": "cuda" if torch.cuda.is_available() else "cpu (1 thread)"}))


def _attention(config) -> str:
    """The attention implementation transformers picks for `config` (Gemma-2: eager; SDPA cannot soft-cap)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).config._attn_implementation


@functools.cache
def _measure(arch: str, quick: bool) -> dict:
    """The child's results, shared by the DPO and the NPO row of `arch`."""
    from bench_training import child_json

    return child_json("bench_architectures", f"_time_child({arch!r}, {quick!r})")


def _row(arch: str, kind: str, quick: bool) -> dict:
    found = _measure(arch, quick)
    ours, llama = found[f"arch_{kind}"], found[f"llama_{kind}"]
    ratio = statistics.median(x / y for x, y in zip(ours, llama))
    s = _sizes(quick)
    baseline = "tied Llama" if found["llama_tied"] else "Llama"
    return {"name": f"arch_{kind}_{arch}", "ours": round(statistics.median(ours), 4),
            "baseline": round(statistics.median(llama), 4), "unit": "s/step", "ratio": round(ratio, 3),
            "target": TARGET, "parameters": found["parameters"], "llama_parameters": found["llama_parameters"],
            "mlp_width": found["mlp_width"], "attention": found["attention"], "hidden_path": found["hidden_path"],
            "rounds": found["rounds"], "steps_per_round": found["steps_per_round"], "device": found["device"],
            "shape": f"B={s['batch']} pairs, T={s['length']} (half response), V={s['vocab']}, d={s['hidden']}, "
                     f"{s['layers']} layers, heads {s['heads']}x{s['head_dim']}, float32",
            "notes": f"{found['parameters']:,} vs {found['llama_parameters']:,} params ({baseline}); MLP "
                     f"{found['mlp_width']}; {found['attention']} attention"
                     + ("" if found["hidden_path"] else "; full-logits path")}


# ---------------------------------------------------------------------------- the Gemma cliff
CLIFF_VARIANTS = {
    # name: (arch, config overrides): the user's micro size; None = the tokenizer's vocabulary
    "mistral": ("mistral", {}),
    "gemma_user": ("gemma", {"head_dim": 256, "vocab_size": 256000}),  # GemmaConfig's defaults kept
    "gemma_vocab_default": ("gemma", {"vocab_size": 256000}),  # head_dim fitted, vocabulary kept
    "gemma_head_dim_default": ("gemma", {"head_dim": 256}),  # vocabulary fitted, head_dim kept
    "gemma_fitted": ("gemma", {}),
}


NPO_VARIANTS = ("mistral", "gemma_user", "gemma_fitted")


def _cliff_child(quick: bool) -> None:
    """DPO step times of the CLIFF_VARIANTS on short ChatML pairs through the BPE, one JSON line."""
    import torch
    from bench_training import Stepper, alternate
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from architectures.micro_archs import QUESTIONS, build_model
    from noisepo.training.collate import encode_pair
    from noisepo.training.npo import NPOTrainer
    from noisepo.training.preference import PreferenceTrainer

    torch.set_num_threads(1)
    rounds, steps = (5, 2) if quick else (7, 3)
    records = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": f"It is {a}."}],
                "rejected": [{"role": "assistant", "content": f"Maybe {a}1, or not."}]} for q, a in QUESTIONS] * 4
    steppers, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, overrides) in CLIFF_VARIANTS.items():
            folder = build_model(arch, Path(tmp) / name, **overrides)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")  # as `noisepo train` loads it
            counts[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                            "vocab_size": model.config.vocab_size, "tokenizer": len(tokenizer),
                            "head_dim": model.config.head_dim, "dtype": str(model.dtype).removeprefix("torch.")}
            args = TrainingArguments(output_dir=str(Path(tmp) / f"out_{name}"), per_device_train_batch_size=8,
                                     max_steps=1000, learning_rate=5e-6, report_to="none", save_strategy="no",
                                     use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
            pairs = [encode_pair(tokenizer, r, max_length=512) for r in records]
            steppers[name] = Stepper(PreferenceTrainer(model, args, pairs, loss="dpo", processing_class=tokenizer))
            if name in NPO_VARIANTS:  # NPO too: its noise head is d × V as well
                npo = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
                steppers[f"{name}_npo"] = Stepper(NPOTrainer(npo, args, pairs, loss="dpo", processing_class=tokenizer))
        for stepper in steppers.values():
            stepper.run(1)
        times = {name: [seconds / steps for seconds, _ in runs]
                 for name, runs in alternate(steppers, rounds, steps).items()}
    print(json.dumps({"times": times, "counts": counts, "rounds": rounds, "steps_per_round": steps}))


def gemma_cliff(quick: bool) -> dict:
    from bench_training import child_json

    found = child_json("bench_architectures", f"_cliff_child({quick!r})")
    times, counts = found["times"], found["counts"]

    def ratio(name: str, over: str = "mistral") -> float:
        return round(statistics.median(x / y for x, y in zip(times[name], times[over])), 2)

    def npo_ratio(name: str) -> float:
        return ratio(f"{name}_npo", "mistral_npo")

    user, mistral = counts["gemma_user"], counts["mistral"]
    return {"name": "gemma_cliff", "ours": round(statistics.median(times["gemma_user"]), 4),
            "baseline": round(statistics.median(times["mistral"]), 4), "unit": "s/step",
            "ratio": ratio("gemma_user"), "target": "(explains issue 22)",
            **{f"ratio_{name}": ratio(name) for name in CLIFF_VARIANTS if name not in ("mistral", "gemma_user")},
            "ratio_npo": npo_ratio("gemma_user"), "ratio_npo_gemma_fitted": npo_ratio("gemma_fitted"),
            "counts": counts, "rounds": found["rounds"], "steps_per_round": found["steps_per_round"],
            "notes": f"Gemma with GemmaConfig's vocab_size {user['vocab_size']} and head_dim {user['head_dim']} "
                     f"kept ({user['parameters']:,} params) vs Mistral ({mistral['parameters']:,}), "
                     f"{mistral['tokenizer']}-token BPE, both {user['dtype']}: vocabulary fitted, head_dim 256 kept "
                     f"{ratio('gemma_head_dim_default')}; head_dim fitted, vocabulary kept "
                     f"{ratio('gemma_vocab_default')}; both fitted {ratio('gemma_fitted')}. NPO step "
                     f"{npo_ratio('gemma_user')} (both fitted {npo_ratio('gemma_fitted')})"}


BENCHMARKS = {f"arch_{kind}_{arch}": functools.partial(_row, arch, kind) for arch in ARCHS for kind in ("dpo", "npo")}
BENCHMARKS["gemma_cliff"] = gemma_cliff
