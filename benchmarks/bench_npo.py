"""NPO benchmarks: one NPO training step against one DPO step on the same model (METHODS §4.2).

`BENCHMARKS[name](quick) -> {"name", "ours", "baseline", "unit", "ratio", ...}` (see run.py).

The model: a Llama built from a config with vocabulary V = 32 000 (width 256, 4 layers; `--quick`:
V = 8 000, width 128, 2 layers), float32, one CPU thread (or the GPU when there is one). The
batch: B = 8 pairs of T = 256 tokens (half prompt, half response; `--quick`: B = 4, T = 128).

What each step includes (both through the trainer's own `training_step` + optimizer step):
- DPO (`PreferenceTrainer`, reference precomputed: its best setting): the policy's forward and
  backward on chosen + rejected; no reference forward at all.
- NPO (`NPOTrainer`, its default `cache_reference_states="auto"`: at these shapes the reference's
  rejected-side hidden states are computed once and cached per pair, the same one-off precompute as
  DPO's reference log-probs; `ratio_forward` is the variant that instead runs a no-grad forward of the
  frozen reference on the rejected half every step): the same, plus the noisy log-softmax of the
  rejected response tokens (LM head + the full d × V noise head, chunked; up to
  `noise.NOISE_SAVE_BYTES` of blocks kept for the backward, the rest recomputed) and the noise
  head's gradient and AdamW update.

Time (`npo_vs_dpo_time`): `TIME_PROCESSES` fresh processes, each alternating the three steps after a
warm-up; the ratio is the median of the per-round NPO/DPO ratios over all of them (one process's
figure moves by ~±0.07 on a shared VM), `ratio_per_process` each process's median.

The floor: what NPO must compute beyond DPO. In FLOPs (`flop_floor`): per rejected response token
the reference's logits z, the head's W g and the head's weight gradient (3 × 2·N·d·V), plus the
reference forward on the rejected half (2·P·tokens/2) unless its states are cached, over the DPO
step's 6·P·tokens + 8·n·d·V; also given for Mistral-7B's shapes. Measured (`measured_floor`): those
matmuls, one draw of ε (from NPO's own generator: native.py's on CPU when it builds), one softplus and
one log-softmax over (N, V) in PyTorch, and the reference forward,
each timed alone in CPU time, over the DPO step's CPU time; compare with `ratio_cpu_time` (the
same rounds as the wall-clock ratio, in CPU time: robust to the waits for a core on a shared
machine).

Memory: each variant runs in a fresh process (glibc told to mmap every block above 1 MiB, so freed
tensors leave RSS); the figure is the peak RSS (VmHWM) above the RSS once the libraries and one
copy of the model are loaded (CPU), or `torch.cuda.max_memory_allocated` (GPU), over two steps:
the median of 5 rounds of two steps after a first (the peak is reset before each round).
NPO holds in addition the noise head (d × V) with its AdamW state and, by default here, the cached
states and a frozen copy of the LM head; with the reference forward, a frozen copy of the whole
reference instead (`ratio_forward`).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(vocab=8000, hidden=128, layers=2, heads=4, intermediate=344, batch=4, length=128)
    return dict(vocab=32000, hidden=256, layers=4, heads=4, intermediate=688, batch=8, length=256)


def build_model(folder: Path, s: dict) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                         intermediate_size=s["intermediate"], max_position_embeddings=2 * s["length"],
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def synthetic_pairs(s: dict, n: int, seed: int = 0) -> list[dict]:
    """`n` pairs of exactly `length` tokens per side: half prompt, half response."""
    import torch

    g = torch.Generator().manual_seed(seed)
    half = s["length"] // 2

    def ids(k):
        return torch.randint(3, s["vocab"], (k,), generator=g).tolist()

    return [{"prompt_ids": ids(half), "chosen_ids": ids(half), "rejected_ids": ids(half), "weight": 1.0}
            for _ in range(n)]


def make_trainer(kind: str, model_dir: str, pairs: list[dict], output: str, steps: int, s: dict):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from noisepo.training.npo import NPOTrainer
    from noisepo.training.preference import PreferenceTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=s["batch"], max_steps=steps,
                             learning_rate=1e-5, report_to="none", save_strategy="no",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             dataloader_pin_memory=False, seed=0)
    if kind == "dpo":
        return PreferenceTrainer(model, args, pairs, loss="dpo", beta=0.1, reference="precompute",
                                 group_by_length=False)
    variant = VARIANTS[kind]
    return NPOTrainer(model, args, pairs, loss="dpo", beta=0.1, reference="precompute", group_by_length=False,
                      **variant)


# NPO variants: the default (full-rank head, reference states "auto": cached when they fit 1 GiB, as here),
# the reference forward every step, and low-rank heads.
VARIANTS = {"npo": {}, "npo_forward": {"cache_reference_states": False},
            "npo_cached_rank64": {"cache_reference_states": True, "noise_rank": 64},
            "npo_rank64": {"noise_rank": 64}}


def flop_floor(*, tokens: int, rejected_response_tokens: int, response_tokens: int, d: int, vocab: int,
               trunk_params: int, reference_forward: bool = False) -> float:
    """What NPO must compute beyond DPO, over the DPO step's ≈ 6·P·tokens + 8·n_resp·d·V FLOPs (its
    chunked LM head: forward, recompute, two gradients): per rejected response token the reference's
    logits z and the head's u = W g (forward) and the head's weight gradient, 3 × 2·N·d·V; with
    `reference_forward`, also the reference's forward on the rejected half (2·P·tokens/2)."""
    dpo = 6 * trunk_params * tokens + 8 * response_tokens * d * vocab
    extra = 6 * rejected_response_tokens * d * vocab + (trunk_params * tokens if reference_forward else 0)
    return extra / dpo


def flop_model_ratio(*, pairs: int, length: int, d: int, vocab: int, trunk_params: int) -> float:
    """NPO/DPO step FLOPs as implemented: DPO = 6·P·tokens + 8·n·d·V; NPO adds the reference
    forward on the rejected half (2·P·tokens/2) and 3 (N, d, V) matmuls on the N rejected response
    tokens (z, u, the head's weight gradient) while the blocks kept for the backward fit
    `noise.NOISE_SAVE_BYTES`, 5 past it (z and u recomputed in the backward). Elementwise work over
    (N, V) is not counted."""
    from noisepo.noise import NOISE_SAVE_BYTES

    tokens, responses = 2 * pairs * length, pairs * length  # half of every sequence is response
    rejected = responses // 2
    kept = min(rejected, NOISE_SAVE_BYTES // (2 * 4 * vocab))  # positions whose blocks are kept
    dpo = 6 * trunk_params * tokens + 8 * responses * d * vocab
    extra = 2 * trunk_params * tokens // 2 + 2 * d * vocab * (3 * kept + 5 * (rejected - kept))
    return 1 + extra / dpo


def _floors(s: dict, trunk_params: int) -> dict:
    b, t = s["batch"], s["length"]
    shapes = dict(tokens=2 * b * t, rejected_response_tokens=b * t // 2, response_tokens=b * t)
    # Mistral-7B: ~7.0e9 non-embedding params, d = 4096, V = 32 000, the same batch shapes
    mistral = dict(d=4096, vocab=32000, trunk_params=7_000_000_000)
    ours = dict(d=s["hidden"], vocab=s["vocab"], trunk_params=trunk_params)
    return {"floor_flops_ratio": round(1 + flop_floor(**shapes, **ours, reference_forward=True), 3),
            "floor_flops_ratio_cached_states": round(1 + flop_floor(**shapes, **ours), 3),
            "floor_flops_ratio_mistral7b_shapes": round(1 + flop_floor(**shapes, **mistral, reference_forward=True), 3),
            "flop_model_ratio": round(flop_model_ratio(pairs=b, length=t, **ours), 3),
            "flop_model_ratio_mistral7b_shapes": round(flop_model_ratio(pairs=b, length=t, **mistral), 3)}


def _child_json(call: str, env: dict | None = None) -> dict:
    """Run `bench_npo.<call>` in a fresh one-thread process; the JSON object of its last output line."""
    from bench_training import child_json

    return child_json("bench_npo", call, env)


# Fresh processes the time comparison runs in: the step times of one process differ from another's
# by up to ~10 % on a shared VM (memory placement), more than the rounds inside one process vary.
TIME_PROCESSES = 3


def npo_vs_dpo_time(quick: bool) -> dict:
    """NPO's step time over DPO's, in `TIME_PROCESSES` fresh processes, each alternating NPO, NPO with
    the reference forward and DPO after a warm-up. ratio: the median over every round of every process
    of NPO's time over DPO's in the same round (paired, so a slow process or a slow minute cancels);
    ours and baseline: the medians of all the rounds' times, for scale."""
    children = [_child_json(f"_time_child({quick!r})") for _ in range(TIME_PROCESSES)]
    s = _sizes(quick)

    def pooled(key: str) -> float:
        return statistics.median([x for child in children for x in child[key]])

    def paired(key: str, over: str = "dpo", among: list[dict] = children) -> float:
        return statistics.median([x / y for child in among for x, y in zip(child[key], child[over])])

    def floor_median(key: str, part: str | None = None) -> float:
        return statistics.median(c["floor"][key] if part is None else c["floor"][key][part] for c in children)

    npo, forward, dpo = pooled("npo"), pooled("npo_forward"), pooled("dpo")
    floor = {key: round(floor_median(key), digits) for key, digits in
             (("floor_measured_ratio", 3), ("floor_measured_ratio_cached_states", 3), ("dpo_step_cpu_ms", 2))}
    floor["floor_parts_cpu_ms"] = {part: round(floor_median("floor_parts_cpu_ms", part), 2)
                                   for part in children[0]["floor"]["floor_parts_cpu_ms"]}
    per_process = [round(paired("npo", among=[child]), 3) for child in children]
    ratio, ratio_forward = paired("npo"), paired("npo_forward")
    ratio_cpu, ratio_forward_cpu = paired("npo_cpu", "dpo_cpu"), paired("npo_forward_cpu", "dpo_cpu")
    return {"name": "npo_vs_dpo_time", "ours": round(npo, 4), "baseline": round(dpo, 4), "unit": "s/step",
            "ratio": round(ratio, 3), "target": "<= 1.3",
            "ours_forward": round(forward, 4), "ratio_forward": round(ratio_forward, 3),
            "ratio_cpu_time": round(ratio_cpu, 3), "ratio_forward_cpu_time": round(ratio_forward_cpu, 3),
            "ratio_per_process": per_process,
            **_floors(s, children[0]["trunk_params"]), **floor, "processes": TIME_PROCESSES,
            "rounds": children[0]["rounds"], "steps_per_round": children[0]["steps_per_round"],
            "notes": f"processes {', '.join(f'{r:.3f}' for r in per_process)}; CPU time {ratio_cpu:.3f} "
                     f"(floor {floor['floor_measured_ratio_cached_states']}); reference forward every step "
                     f"{ratio_forward:.3f}, CPU time {ratio_forward_cpu:.3f} (floor {floor['floor_measured_ratio']})",
            "shape": _shape(s), "device": children[0]["device"],
            "note": "ours = NPO step as configured by default (reference states cached: they fit 1 GiB; full-rank "
                    "noise head); baseline = DPO step with precomputed reference log-probs; ratio = the median of "
                    f"the per-round NPO/DPO ratios over {TIME_PROCESSES} fresh processes (ours and baseline: the "
                    "medians of the rounds' times)"}


def _time_child(quick: bool) -> None:
    """One process of `npo_vs_dpo_time`: prints its per-round step times (s), their CPU times, and
    its measured floor, as one JSON line."""
    import torch
    from bench_training import Stepper, alternate

    torch.set_num_threads(1)
    s = _sizes(quick)
    rounds, steps = (9, 2) if quick else (5, 1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", s)
        pairs = synthetic_pairs(s, 4 * s["batch"])
        steppers = {kind: Stepper(make_trainer(kind, model_dir, pairs, str(Path(tmp) / kind), 1000, s))
                    for kind in ("npo", "npo_forward", "dpo")}
        assert steppers["npo"].trainer.cache_reference_states  # "auto" caches at these shapes
        trunk = sum(p.numel() for n, p in steppers["dpo"].trainer.model.named_parameters()
                    if "embed" not in n and "lm_head" not in n)
        for stepper in steppers.values():
            stepper.run(1)  # warm-up
        times = {kind: [seconds / steps for seconds, _ in runs]
                 for kind, runs in alternate(steppers, rounds, steps).items()}
        # CPU time of the same rounds: what the step costs without the waits for a core on a shared machine
        cpu = {f"{kind}_cpu": [x / steps for x in stepper.cpu_seconds[-rounds:]] for kind, stepper in steppers.items()}
        floor = measured_floor(s, steppers["npo_forward"].trainer,
                               statistics.median(cpu["dpo_cpu"]))
    print(json.dumps({**times, **cpu, "floor": floor, "trunk_params": trunk, "rounds": rounds,
                      "steps_per_round": steps, "device": "cuda" if torch.cuda.is_available() else "cpu (1 thread)"}))


def measured_floor(s: dict, trainer, dpo_cpu: float) -> dict:
    """The floor in CPU time, measured here: NPO's irreducible extra work at this shape (3 (N, d, V)
    matmuls, one draw of ε, one softplus, one log-softmax over (N, V), each timed alone) and the
    reference forward on a batch's rejected half, over the DPO step's CPU time (`dpo_cpu`, s)."""
    import time

    import torch
    import torch.nn.functional as F

    from noisepo.noise import _epsilon  # the generator NPO draws ε from (native.py's on CPU when it builds)

    def cpu_ms(fn, repeats: int = 7) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times) * 1e3

    n, d, v = s["batch"] * s["length"] // 2, s["hidden"], s["vocab"]  # rejected response tokens
    g = torch.Generator().manual_seed(0)
    states, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.02
    logits = states @ weight.T
    parts = {"matmuls": 3 * cpu_ms(lambda: states @ weight.T), "epsilon": cpu_ms(lambda: _epsilon(0, logits)),
             "softplus": cpu_ms(lambda: F.softplus(logits)), "log_softmax": cpu_ms(lambda: torch.log_softmax(logits, -1))}
    batch = next(iter(trainer.get_train_dataloader()))
    half = batch["input_ids"].shape[0] // 2

    def reference_forward():
        with torch.no_grad():
            trainer.ref_model(input_ids=batch["input_ids"][half:], attention_mask=batch["attention_mask"][half:],
                              use_cache=False, output_hidden_states=True, logits_to_keep=1)
    parts["reference_forward"] = cpu_ms(reference_forward)
    noise = sum(parts.values()) - parts["reference_forward"]
    return {"floor_measured_ratio": round(1 + (noise + parts["reference_forward"]) / (dpo_cpu * 1e3), 3),
            "floor_measured_ratio_cached_states": round(1 + noise / (dpo_cpu * 1e3), 3),
            "floor_parts_cpu_ms": {k: round(x, 2) for k, x in parts.items()},
            "dpo_step_cpu_ms": round(dpo_cpu * 1e3, 2)}


def _shape(s: dict) -> str:
    return (f"B={s['batch']} pairs, T={s['length']} (half response), V={s['vocab']}, d={s['hidden']}, "
            f"{s['layers']} layers, float32")


def _vm(field: str) -> float:
    from bench_training import proc_status_mb

    return proc_status_mb(field)


def _memory_child(kind: str, quick: bool, model_dir: str) -> None:
    import torch
    from bench_training import Stepper

    torch.set_num_threads(1)
    s = _sizes(quick)
    pairs = synthetic_pairs(s, 2 * s["batch"])
    cuda = torch.cuda.is_available()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)  # the libraries and one model's weights: the base line
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _vm("VmRSS")
    from bench_training import MEMORY_ROUNDS, reset_peak_rss

    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(make_trainer(kind, model_dir, pairs, tmp, 100, s))
        for round_ in range(1 + MEMORY_ROUNDS):  # the first round includes building the trainer
            if round_ and cuda:
                torch.cuda.reset_peak_memory_stats()
            elif round_ and not reset_peak_rss():
                break  # VmHWM cannot be reset here: the first round's peak is the figure
            stepper.run(2)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _vm("VmHWM") - base)
    print(json.dumps({"peak_mb": statistics.median(peaks[1:] or peaks), "rounds": peaks}))


def npo_vs_dpo_memory(quick: bool) -> dict:
    s = _sizes(quick)
    from bench_training import memory_children

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", s)
        # the rank-64 variant only in full runs: it keeps --quick under 5 minutes
        kinds = ("npo", "npo_forward", "dpo") + (() if quick else ("npo_cached_rank64",))
        found = memory_children("bench_npo", {kind: f"_memory_child({kind!r}, {quick!r}, {model_dir!r})"
                                              for kind in kinds}, MALLOC_ENV)
    results = {kind: found[kind]["peak_mb"] for kind in kinds}
    d, v = s["hidden"], s["vocab"]
    head_mb = (d * v + v) * 4 * 4 / 2**20  # weights + grad + two AdamW moments, float32
    return {"name": "npo_vs_dpo_memory", "ours": round(results["npo"], 1), "baseline": round(results["dpo"], 1),
            "unit": "MiB peak above the loaded libraries and one model", "ratio": round(results["npo"] / results["dpo"], 3),
            "target": "<= 1.2", "ours_forward": round(results["npo_forward"], 1),
            "ratio_forward": round(results["npo_forward"] / results["dpo"], 3),
            **({} if quick else {"ours_cached_states_rank64": round(results["npo_cached_rank64"], 1),
                                 "ratio_cached_states_rank64": round(results["npo_cached_rank64"] / results["dpo"], 3)}),
            "noise_head_with_adamw_mb": round(head_mb, 1), "shape": _shape(s),
            "notes": f"reference forward every step {results['npo_forward'] / results['dpo']:.3f}" + (
                "" if quick else f", cached + rank 64 {results['npo_cached_rank64'] / results['dpo']:.3f}"),
            "note": "NPO (default: reference states cached) also holds the d x V noise head with its AdamW state, "
                    "the cached states and a frozen LM head; with the forward, a frozen reference copy instead"}


# Every allocation above 1 MiB is its own mmap, returned to the system when freed: without this,
# glibc's adaptive threshold serves blocks of tens of MiB from the heap, and fragmentation makes
# VmHWM drift by ~100 MiB from run to run.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


BENCHMARKS = {
    "npo_vs_dpo_time": npo_vs_dpo_time,
    "npo_vs_dpo_memory": npo_vs_dpo_memory,
}
