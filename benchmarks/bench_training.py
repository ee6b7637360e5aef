"""Training benchmarks: our PreferenceTrainer vs TRL 1.16's DPOTrainer; chunked vs naive log-probs.

`BENCHMARKS[name](quick) -> {"name", "ours", "baseline", "unit", "ratio", ...}` (see run.py).

dpo_step_vs_trl: the same tiny Llama (preset `tiny`, char tokenizer), the same pairs (prompts and
responses of varied lengths, as real preference data has), batch size 8, loss dpo / TRL `sigmoid`,
β 0.1, AdamW, float32, one CPU thread. Both with their best settings: reference log-probs
precomputed (TRL `precompute_ref_log_probs=True`), dropout off; ours also with length-grouped
batches and padding-free packed rows (TRL 1.16 has `padding_free` but disables it: "temporarily
unavailable after a refactor"; its DPO has no length grouping). Timed on the training step itself (collate + forward +
backward + optimizer step) through each trainer's own dataloader and `training_step`, alternating
ours / TRL in rounds after a warm-up; ratio = median tokens/s of ours ÷ TRL's (tokens = non-pad
tokens fed to the model). Peak RSS is measured in a fresh subprocess per trainer (the only clean
way to read a process's peak: ru_maxrss never goes down), running the same steps.

logprobs_chunked_vs_naive_memory: peak memory of forward + backward of the response log-probs at
vocabulary 32k, from the last hidden states: our chunked path vs `log_softmax(logits.float())`.
Measured with the torch profiler's allocator (CPU) or `torch.cuda.max_memory_allocated` (CUDA).
"""
from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 8
BETA = 0.1


# ---------------------------------------------------------------------------- data and model
def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs whose prompt and response lengths vary (5x range), like real data."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "noise", "label", "model", "token", "reward", "policy"]

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(3, 25) + "?\n", "chosen": text(2, 20), "rejected": text(2, 20)} for _ in range(n)]


def build_model(folder: Path, records: list[dict]):
    from noisepo.models import build_tiny_model

    texts = [r[k] for r in records for k in ("prompt", "chosen", "rejected")]
    build_tiny_model("tiny", folder, texts=texts, seed=0)
    return str(folder)


def our_trainer(model_dir: str, records: list[dict], output: str, steps: int, padding_free: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from noisepo.training.collate import encode_pair
    from noisepo.training.preference import PreferenceTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    pairs = [encode_pair(tokenizer, r, max_length=512) for r in records]
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=BATCH_SIZE, max_steps=steps,
                             learning_rate=1e-5, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    return PreferenceTrainer(model, args, pairs, loss="dpo", beta=BETA, reference="precompute",
                             group_by_length=True, padding_free=padding_free, processing_class=tokenizer)


def trl_trainer(model_dir: str, records: list[dict], output: str, steps: int):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    args = DPOConfig(output_dir=output, per_device_train_batch_size=BATCH_SIZE, max_steps=steps, learning_rate=1e-5,
                     report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                     dataloader_pin_memory=False, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     max_length=512, dataset_num_proc=None)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)


def real_tokens(batch) -> int:
    """Non-pad tokens of a batch: padded rows have an attention mask, packed rows sequence ids."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["sequence_ids"] >= 0).sum())


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS, VmRSS: current), MiB;
    0.0 where there is no /proc."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


MEMORY_ROUNDS = 5  # peaks measured per fresh process (the process's peak is reset between rounds)
MEMORY_ROUNDS_QUICK = 3  # the same for the TRL comparison's RSS children under --quick
# Memory children (each measures only its own peak RSS, never a time) run this many at a time.
MEMORY_PROCESSES_AT_ONCE = max(1, min(2, os.cpu_count() or 1))


def child_json(module: str, call: str, env: dict | None = None) -> dict:
    """Run `<module>.<call>` (a benchmarks/ module) in a fresh one-thread process; the JSON object on
    its last output line."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {module} as b; b.{call}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_children(module: str, calls: dict[str, str], env: dict | None = None) -> dict[str, dict]:
    """name -> `child_json(module, call)` for processes that measure memory only, run
    `MEMORY_PROCESSES_AT_ONCE` at a time: the suite spends much of its wall time in these. A peak
    measured beside another process came out ~2 % higher on average on this VM, within its run-to-run
    spread (benchmarks/README.md)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(MEMORY_PROCESSES_AT_ONCE) as pool:
        futures = {name: pool.submit(child_json, module, call, env) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: `5 > /proc/self/clear_refs`),
    so one process can measure several peaks; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_self_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across exec, so a child
    would report its parent's peak."""
    return proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stepper:
    """Runs a trainer's real training step (its dataloader, collator, `training_step`) one batch at a time."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cpu_seconds: list[float] = []  # CPU time of each `run` (this process, all its threads)
        self.loader = trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        self.optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's training loop
        trainer.model.train()

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def run(self, steps: int) -> tuple[float, int]:
        """(seconds, non-pad tokens) of `steps` optimizer steps."""
        tokens = 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = self.next_batch()
            tokens += real_tokens(batch)
            self.trainer.training_step(self.trainer.model, batch)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.cpu_seconds.append(time.process_time() - cpu)
        return time.perf_counter() - start, tokens


def alternate(steppers: dict[str, Stepper], rounds: int, steps: int) -> dict[str, list[tuple[float, int]]]:
    """Time every stepper `rounds` times, `steps` steps each, alternating the order every round so
    neither side always runs first; returns name -> [(seconds, tokens)] per round. CUDA work is
    synchronised around each timing."""
    import torch

    results: dict[str, list[tuple[float, int]]] = {name: [] for name in steppers}
    for round_ in range(rounds):
        order = list(steppers) if round_ % 2 == 0 else list(reversed(steppers))
        for name in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds, tokens = steppers[name].run(steps)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            results[name].append((seconds, tokens))
    return results


def peak_rss_mb(quick: bool, which=("ours", "trl")) -> dict[str, float]:
    """Per trainer, the peak RSS of a fresh process that builds it and runs the timed steps: the
    median over MEMORY_ROUNDS (--quick: MEMORY_ROUNDS_QUICK) rounds of steps after the first (the peak
    reset before each)."""
    found = memory_children("bench_training", {name: f"_rss_child({name!r}, {quick!r})" for name in which})
    return {name: statistics.median(result["peak_rss_mb"]) for name, result in found.items()}


def _rss_child(which: str, quick: bool) -> None:
    import torch

    torch.set_num_threads(1)
    n_pairs, steps = (64, 8) if quick else (256, 24)
    records = synthetic_records(n_pairs)
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", records)
        make = our_trainer if which == "ours" else trl_trainer
        stepper = Stepper(make(model_dir, records, str(Path(tmp) / which), steps * (MEMORY_ROUNDS + 1)))
        stepper.run(steps)  # the first round: optimizer state, caches
        peaks.append(peak_rss_self_mb())
        # each round is a whole epoch, so each sees the longest batch
        for _ in range((MEMORY_ROUNDS_QUICK if quick else MEMORY_ROUNDS) if reset_peak_rss() else 0):
            stepper.run(steps)
            peaks.append(peak_rss_self_mb())
    print(json.dumps({"peak_rss_mb": peaks[1:] or peaks}))


def dpo_step_vs_trl(quick: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    n_pairs, rounds, steps = (64, 5, 4) if quick else (256, 7, 12)
    records = synthetic_records(n_pairs)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", records)
        steppers = {"ours": Stepper(our_trainer(model_dir, records, str(Path(tmp) / "ours"), steps)),
                    "trl": Stepper(trl_trainer(model_dir, records, str(Path(tmp) / "trl"), steps))}
        if not quick:  # where the gain comes from: ours with padded (length-grouped) batches, no packing
            steppers["ours_padded"] = Stepper(our_trainer(model_dir, records, str(Path(tmp) / "padded"), steps,
                                                          padding_free=False))
        for stepper in steppers.values():
            stepper.run(2)  # warm-up
        rates = {name: [tokens / seconds for seconds, tokens in runs]
                 for name, runs in alternate(steppers, rounds, steps).items()}
    ours, trl = statistics.median(rates["ours"]), statistics.median(rates["trl"])
    rss = peak_rss_mb(quick)
    padded = {} if quick else {"ours_padded_no_packing": round(statistics.median(rates["ours_padded"]), 1)}
    return {"name": "dpo_step_vs_trl", "ours": round(ours, 1), "baseline": round(trl, 1), "unit": "tokens/s",
            "ratio": round(ours / trl, 3), "target": ">= 1.25", "memory_ok": rss["ours"] <= rss["trl"],
            **padded, "peak_rss_mb_ours": round(rss["ours"], 1),
            "peak_rss_mb_baseline": round(rss["trl"], 1), "rounds": rounds, "steps_per_round": steps,
            "notes": f"peak RSS {rss['ours']:.0f} vs {rss['trl']:.0f} MiB"
                     + ("" if quick else f"; without packing {padded['ours_padded_no_packing'] / trl:.2f}"),
            "batch_size": BATCH_SIZE, "model": "tiny preset (4 layers, width 128, char vocab), float32, 1 thread"}


# ---------------------------------------------------------------------------- log-prob memory
def _logprob_shapes(quick: bool) -> tuple[int, int, int, int]:
    return (4, 256, 256, 32000) if quick else (8, 512, 512, 32000)  # pairs, length, width, vocab


def _vm_rss_mb() -> float:
    return proc_status_mb("VmRSS")


def _logprob_child(variant: str, quick: bool) -> None:
    """Forward + backward of the response log-probs (`variant`: chunked or naive) from the last hidden
    states; prints the peak memory above what the inputs already hold."""
    import torch

    from noisepo.logprobs import IGNORE_INDEX, sequence_logps_from_hidden

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs, length, width, vocab = _logprob_shapes(quick)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, width, generator=generator).to(device).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=generator) * 0.02).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=generator).to(device)
    labels[:, : length // 2] = IGNORE_INDEX  # half of every sequence is prompt
    peaks = []
    for _ in range(MEMORY_ROUNDS):
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            reset = reset_peak_rss()
            base = _vm_rss_mb()
        if variant == "chunked":
            sequence_logps_from_hidden(hidden, weight, labels).sum.sum().backward()
        else:
            logps = torch.log_softmax((hidden @ weight.T).float(), dim=-1)[:, :-1]  # (2B, T-1, V) float32
            targets = labels[:, 1:]
            mask = targets != IGNORE_INDEX
            (logps.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * mask).sum().backward()
            del logps
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20 - base)
        else:
            peaks.append(peak_rss_self_mb() - base)
            if not reset:
                break  # VmHWM cannot be reset here: only the first round is a clean measurement
    print(json.dumps({"peak_mb": statistics.median(peaks), "rounds": len(peaks), "device": device.type}))


def logprobs_chunked_vs_naive_memory(quick: bool) -> dict:
    """Each variant in a fresh process: on CPU the peak RSS (VmHWM) above the inputs (large
    tensors are mmapped and returned on free, so this is the peak of live tensors plus the
    library's workspace); on CUDA `max_memory_allocated` above the inputs."""
    results = memory_children("bench_training", {variant: f"_logprob_child({variant!r}, {quick!r})"
                                                 for variant in ("chunked", "naive")})
    ours, naive = results["chunked"]["peak_mb"], results["naive"]["peak_mb"]
    pairs, length, width, vocab = _logprob_shapes(quick)
    return {"name": "logprobs_chunked_vs_naive_memory", "ours": round(ours, 1), "baseline": round(naive, 1),
            "unit": "MiB peak (fwd+bwd)", "ratio": round(naive / max(ours, 1e-9), 2),
            "shape": f"B={2 * pairs} (chosen+rejected), T={length}, d={width}, V={vocab}, half prompt",
            "device": results["chunked"]["device"], "note": "ratio = naive / ours: higher is better",
            "notes": f"naive ÷ ours; B={2 * pairs}, T={length}, d={width}, V={vocab}"}


BENCHMARKS = {
    "dpo_step_vs_trl": dpo_step_vs_trl,
    "logprobs_chunked_vs_naive_memory": logprobs_chunked_vs_naive_memory,
}
