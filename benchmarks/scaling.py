"""How cost grows: step time and peak memory of DPO, NPO (full and low-rank head) and the ROPO
scoring pass as sequence length, vocabulary and batch grow.

    python benchmarks/scaling.py                    # every point (~15 min on 2 shared CPU cores)
    python benchmarks/scaling.py --plot-only        # redraw the plot from the JSON

Not part of `run.py --quick`. Writes benchmarks/results/scaling.json (one record per point) and
benchmarks/results/scaling.png.

The model: a randomly initialised Llama, width d = 128, 2 layers, 4 heads, MLP 344, untied LM
head (trunk ≈ 0.4M parameters: small enough for a CPU, so the vocabulary-sized terms show clearly),
float32, one CPU thread. Pairs of exactly T tokens per side (half prompt, half response). The
sweeps, around the base point T = 512, V = 32 000, B = 2 pairs:
- T (tokens per sequence): 128, 256, 512, 1024, 2048;
- V (vocabulary): 8 000, 16 000, 32 000, 64 000, 128 000;
- B (pairs per step): 1, 2, 4.

Methods (each through the trainer's own `training_step` + AdamW step, as in bench_npo.py):
- `dpo`: PreferenceTrainer, loss dpo, reference precomputed;
- `npo`: NPOTrainer as configured by default: full d × V noise head, the reference's rejected-side
  states cached per pair (`cache_reference_states="auto"`), so no reference forward;
- `npo_rank64`: the same with a rank-64 head;
- `ropo_scoring`: ROPO's per-round scoring pass over the same B pairs (`pipelines.common.pair_logps`'s
  work: eval mode, no grad, one forward of chosen + rejected, response log-probs).

Each (point, method) runs in a fresh process, so points cannot contaminate each other: after one
warm-up step it times 2 steps and reads the peak RSS (VmHWM) above
the RSS once the libraries and one copy of the model are loaded (glibc mmaps every block above
1 MiB, so freed tensors leave RSS). The step time is the median CPU time of the process
(`time.process_time`, one thread), not wall time: the 2 cores here are shared with other jobs (load
average 4-8 while this ran), which stretch wall times by 2-5x at random; CPU time does not count the
time the process waits for a core (wall times are kept in the JSON as `wall_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = dict(hidden=128, layers=2, heads=4, intermediate=344)
BASE = dict(length=512, vocab=32000, batch=2)
SWEEPS = {"length": [128, 256, 512, 1024, 2048], "vocab": [8000, 16000, 32000, 64000, 128000],
          "batch": [1, 2, 4]}
METHODS = ("dpo", "npo", "npo_rank64", "ropo_scoring")
TIMED_STEPS = 2


def points() -> list[dict]:
    """Every distinct (length, vocab, batch), each tagged with the sweeps it belongs to."""
    found: dict[tuple, dict] = {}
    for axis, values in SWEEPS.items():
        for value in values:
            shape = {**BASE, axis: value}
            key = (shape["length"], shape["vocab"], shape["batch"])
            found.setdefault(key, {**shape, "axes": []})["axes"].append(axis)
    return list(found.values())


def _child(method: str, length: int, vocab: int, batch: int) -> None:
    """One (point, method) in this fresh process: prints {"step_s", "peak_mb", ...} as JSON."""
    sys.path.insert(0, str(HERE))
    import bench_npo
    import torch
    from bench_training import Stepper, proc_status_mb

    torch.set_num_threads(1)
    shape = dict(vocab=vocab, length=length, batch=batch, **MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_npo.build_model(Path(tmp) / "model", shape)
        pairs = bench_npo.synthetic_pairs(shape, 2 * batch)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = proc_status_mb("VmRSS")  # libraries + one copy of the model
        times, walls = [], []
        if method == "ropo_scoring":
            run = _scoring_pass(model, pairs[:batch])
        else:
            del model
            stepper = Stepper(bench_npo.make_trainer(method, model_dir, pairs, str(Path(tmp) / "out"), 100, shape))

            def run():
                stepper.run(1)
        run()  # warm-up (optimizer state, caches)
        for _ in range(TIMED_STEPS):
            start, cpu = time.perf_counter(), time.process_time()
            run()
            times.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - start)
        peak = proc_status_mb("VmHWM") - base
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak, "cpu_s": times, "wall_s": walls}))


def _scoring_pass(model, pairs: list[dict]):
    import torch

    from noisepo.logprobs import model_sequence_logps
    from noisepo.training.collate import PreferenceCollator

    model.eval()
    batch = PreferenceCollator(pad_token_id=0)(pairs)

    def run():
        with torch.no_grad():
            model_sequence_logps(model, batch).split()
    return run


def measure(method: str, point: dict) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import scaling; "
            f"scaling._child({method!r}, {point['length']}, {point['vocab']}, {point['batch']})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def flop_terms(method: str, length: int, vocab: int, batch: int) -> dict:
    """The model's FLOPs per step by term (see README: which term dominates where)."""
    d, layers, mlp = MODEL["hidden"], MODEL["layers"], MODEL["intermediate"]
    trunk = layers * (4 * d * d + 3 * d * mlp)
    tokens, responses = 2 * batch * length, batch * length  # half of each sequence is response
    passes = 1 if method == "ropo_scoring" else 3  # forward, or forward + backward
    terms = {"trunk": 2 * passes * trunk * tokens,
             "attention": 2 * passes * 2 * layers * 2 * batch * length * length * d,  # QK^T and AV, causal ≈ 1/2
             # chunked LM head on the response positions: forward, and in training the recompute + 2 grads
             "lm_head": 2 * responses * d * vocab * (1 if method == "ropo_scoring" else 4)}
    if method.startswith("npo"):
        from noisepo.noise import NOISE_SAVE_BYTES, noise_chunk_rows

        rejected = responses // 2
        k = 64 if method == "npo_rank64" else d
        rows = noise_chunk_rows(vocab)  # positions per chunk; whole chunks are kept while they fit the budget
        kept = min(rejected, NOISE_SAVE_BYTES // (2 * 4 * vocab * rows) * rows)
        recomputed = rejected - kept  # their z and u are computed again in the backward
        terms["reference_forward"] = 2 * trunk * tokens // 2 + 2 * layers * 2 * batch * length * length * d // 2
        terms["noise_lm_head"] = 2 * d * vocab * (rejected + recomputed)
        terms["noise_head"] = 2 * k * vocab * (2 * rejected + recomputed) + (0 if k == d else 2 * 3 * rejected * d * k)
        terms["noise_kept_positions"] = kept
    return terms


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    labels = {"length": "tokens per sequence T (V = 32k, B = 2)", "vocab": "vocabulary V (T = 512, B = 2)",
              "batch": "pairs per step B (T = 512, V = 32k)"}
    for column, axis in enumerate(SWEEPS):
        for method in METHODS:
            rows = sorted((r for r in records if axis in r["axes"] and r["method"] == method and "step_s" in r),
                          key=lambda r: r[axis])
            xs = [r[axis] for r in rows]
            axes[0][column].plot(xs, [r["step_s"] for r in rows], marker="o", label=method)
            axes[1][column].plot(xs, [r["peak_mb"] for r in rows], marker="o", label=method)
        for row, name in enumerate(("step time (s)", "peak memory above the model (MiB)")):
            ax = axes[row][column]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(labels[axis])
            ax.set_ylabel(name)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"noisepo scaling: Llama d={MODEL['hidden']}, {MODEL['layers']} layers, float32, 1 CPU thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(RESULTS / "scaling.json"))
    parser.add_argument("--plot", default=str(RESULTS / "scaling.png"))
    parser.add_argument("--plot-only", action="store_true", help="Redraw the plot from --output.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of methods.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "src"))
    if args.plot_only:
        plot(json.loads(Path(args.output).read_text())["points"], Path(args.plot))
        return 0
    from run import describe, machine  # noqa: E402 (benchmarks/run.py)

    info = machine()
    records, start = [], time.perf_counter()
    for point in points():
        for method in args.methods.split(","):
            began = time.perf_counter()
            result = measure(method, point)
            record = {"method": method, **point, **result,
                      "flops": flop_terms(method, point["length"], point["vocab"], point["batch"])}
            records.append(record)
            print(f"{method:13s} T={point['length']:5d} V={point['vocab']:6d} B={point['batch']}: "
                  + (f"{result['step_s']:.3f} s, {result['peak_mb']:.0f} MiB" if "step_s" in result
                     else result["error"]) + f" ({time.perf_counter() - began:.0f} s)", flush=True)
    from noisepo.io import write_json_atomic

    write_json_atomic(args.output, {"machine": describe(info), "date": info["date"], "model": MODEL,
                                    "base": BASE, "timed_steps": TIMED_STEPS,
                                    "seconds": round(time.perf_counter() - start), "points": records})
    plot(records, Path(args.plot))
    print(f"wrote {args.output} and {args.plot} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
