"""The benchmark scripts that no CI run exercises otherwise: gpu.py's `--tiny` mode and run.py's report."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_tiny_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert _module("gpu").main(["--tiny", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["arch"] == "tiny" and result["command"].startswith("python benchmarks/gpu.py --tiny")
    assert result["dpo_tokens_per_s"] > 0 and result["npo_overhead"] > 0 and result["generation_tokens_per_s"] > 0
    assert result["model_tflops_per_step"] > 0 and set(result["flop_terms_tflops"]) >= {"trunk", "attention", "lm_head"}
    assert result["device"] != "cpu" or result["mfu"] is None  # no peak known for a CPU


def test_gpu_peak_lookup_and_flop_count():
    gpu = _module("gpu")
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and gpu.peak_tflops("Some GPU") is None
    import torch

    model = gpu.build_model(gpu.ARCHS["tiny"], dtype=torch.float32, device=torch.device("cpu"), max_positions=64)
    flops = gpu.model_flops(model, pairs=2, length=32)
    d, layers, vocab = 64, 2, 1024
    trunk = sum(p.numel() for p in model.model.layers.parameters())
    assert flops["tokens"] == 128 and flops["terms"]["trunk"] == 6 * trunk * 128
    assert flops["terms"]["attention"] == 6 * layers * d * 4 * 32 ** 2
    assert flops["terms"]["lm_head"] == 6 * d * vocab * 64


def test_run_report_marks_targets_and_hides_cpu_times():
    run = _module("run")
    results = [{"name": "a", "ours": 2.0, "baseline": 1.0, "unit": "s/step", "ratio": 2.0, "target": "<= 1.3"},
               {"name": "b", "ours": 9.0, "baseline": 1.0, "unit": "tokens/s", "ratio": 9.0, "target": ">= 8"},
               {"name": "c", "ours": 5.0, "baseline": 4.0, "unit": "MiB", "ratio": 1.25},
               {"name": "d", "ours": 5.0, "baseline": 4.0, "unit": "tokens/s", "ratio": 1.25, "target": ">= 1.25",
                "memory_ok": False}]
    assert [run.target_met(r) for r in results] == [False, True, None, False]
    info = {"cpu": "X", "cores": 2, "torch": "2", "python": "3", "date": "today", "gpu": None}
    text = run.markdown(results, info, quick=True, seconds=60, command="python benchmarks/run.py --quick")
    assert "X, 2 cores, no GPU, torch 2" in text and "| `a` | — | — | s/step | **2.0** | <= 1.3 | NOT met |" in text
    assert "| `c` | 5.0 | 4.0 | MiB |" in text  # memory is not a time: quoted
