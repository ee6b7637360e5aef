"""benchmarks/bench_architectures.py compares like with like: every architecture against a Llama of the
same parameter count (±5 %) and the same LM-head tying (counted on the meta device: nothing is built)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_architectures", BENCHMARKS / "bench_architectures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_each_architecture_is_matched_to_a_llama_of_its_size(bench, quick):
    tokenizer = bench._tokenizer()
    s = bench._sizes(quick)
    for arch in bench.ARCHS:
        config, baseline = bench.matched(arch, s, tokenizer)
        count, target = bench.parameter_count(config), bench.parameter_count(baseline)
        assert abs(count - target) <= bench.TOLERANCE * target, arch
        assert baseline.model_type == "llama" and bench.is_tied(baseline) == (bench.is_tied(config) and arch != "llama")
        assert config.vocab_size == s["vocab"] and (config.model_type == "gpt2" or config.head_dim == s["head_dim"])
    assert set(bench.BENCHMARKS) == {f"arch_{k}_{a}" for a in bench.ARCHS for k in ("dpo", "npo")} | {"gemma_cliff"}
