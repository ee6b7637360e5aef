"""`noisepo generate`: rows = input + response(s) + prompt_index; a rerun after a kill resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from noisepo.config import from_dict
from noisepo.errors import ConfigError, InputError
from noisepo.generation.command import run_generate
from noisepo.generation.config import GenerateConfig


def write_prompts(path, n):
    rows = []
    for i in range(n):
        prompt = f"{i}+{2 * i}=" if i % 3 else [{"role": "user", "content": f"Say {i}."}]
        rows.append({"prompt": prompt, "answer": str(3 * i), "id": f"p{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def generate(model, prompts, output, **options):
    config = from_dict(GenerateConfig, {"model": model, "prompts": prompts, "output": str(output),
                                        "max_new_tokens": 6, "batch_size": 3, "chunk_size": 2,
                                        "progress": False, **options})
    assert run_generate(config) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_rows_keep_the_input_and_add_responses(micro_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    rows = generate(micro_model_dir, prompts, tmp_path / "out.jsonl")
    assert [r["prompt_index"] for r in rows] == list(range(5))
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(5)] and rows[1]["answer"] == "3"
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say 0."}]
    assert all(isinstance(r["response"], str) for r in rows)
    many = generate(micro_model_dir, prompts, tmp_path / "many.jsonl", num_samples=3, temperature=1.0)
    assert all(len(r["responses"]) == 3 and "response" not in r for r in many)


def test_resume_after_a_torn_write_equals_an_uninterrupted_run(micro_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 7)
    options = dict(temperature=1.0, num_samples=2, seed=11)
    full = generate(micro_model_dir, prompts, tmp_path / "full.jsonl", **options)
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # 3 rows + half a row
    (tmp_path / "torn.jsonl.meta.json").write_text((tmp_path / "full.jsonl.meta.json").read_text())
    resumed = generate(micro_model_dir, prompts, torn, batch_size=1, chunk_size=3, **options)
    assert resumed == full  # no duplicate, no missing row, the same samples
    assert generate(micro_model_dir, prompts, torn, **options) == full  # a complete output is left alone


def test_resuming_with_other_options_is_refused(micro_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    generate(micro_model_dir, prompts, tmp_path / "out.jsonl", temperature=1.0, seed=1)
    with pytest.raises(ConfigError) as err:
        generate(micro_model_dir, prompts, tmp_path / "out.jsonl", temperature=1.0, seed=2)
    assert err.value.key == "seed"


def test_an_output_from_another_prompt_file_is_refused(micro_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    (tmp_path / "out.jsonl").write_text(json.dumps({"prompt": "x", "response": "y", "prompt_index": 9}) + "\n")
    with pytest.raises(InputError, match="prompt_index"):
        generate(micro_model_dir, prompts, tmp_path / "out.jsonl")


def test_a_preset_model_is_built_once(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    rows = generate("micro", prompts, tmp_path / "out.jsonl")
    assert len(rows) == 2 and (tmp_path / "out.jsonl.model" / "config.json").exists()


@pytest.mark.parametrize("options, key", [({"batch_size": 0}, "batch_size"), ({"top_p": 0}, "top_p"),
                                          ({"num_samples": 0}, "num_samples"), ({"model": ""}, "model"),
                                          ({"backend": "tgi"}, "backend")])
def test_config_validation(options, key):
    with pytest.raises(ConfigError) as err:
        from_dict(GenerateConfig, {"model": "m", "prompts": "p.jsonl", "output": "o.jsonl", **options})
    assert err.value.key == key


def test_vllm_backend_missing_is_a_clear_error(micro_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; this test is about its absence")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    with pytest.raises(ConfigError, match="vLLM"):
        generate(micro_model_dir, prompts, tmp_path / "out.jsonl", backend="vllm")


def test_sigkill_mid_run_then_resume(micro_model_dir, tmp_path):
    """A real `python -m noisepo generate`, killed with SIGKILL once rows appear, then rerun."""
    n = 60
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    output = tmp_path / "killed.jsonl"
    argv = [sys.executable, "-m", "noisepo", "generate", "--model", micro_model_dir, "--prompts", prompts,
            "--output", str(output), "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "5",
            "--batch-size", "1", "--chunk-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:  # poll until rows are written
            if output.exists() and output.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
        process.stderr.close()
    written = output.read_bytes().count(b"\n")
    assert process.returncode == -signal.SIGKILL and 3 <= written < n
    options = dict(max_new_tokens=24, temperature=1.0, seed=5, batch_size=1, chunk_size=1)
    resumed = generate(micro_model_dir, prompts, output, **{**options, "batch_size": 8, "chunk_size": 16})
    uninterrupted = generate(micro_model_dir, prompts, tmp_path / "full.jsonl", **options)
    assert resumed == uninterrupted
