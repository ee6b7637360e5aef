"""Asking for vLLM where it cannot run is exit 2 naming the option and the fix, before any output
(the main venv has no vLLM; tests/vllm/ runs the engine itself in its own venv)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from noisepo.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


def sft(tmp_path) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    return str(path)


@pytest.mark.parametrize("command", ["dnpo", "spin", "ropo", "generate", "demo"])
def test_vllm_without_vllm_installed_exits_2_before_any_output(tmp_path, capsys, command):
    out = tmp_path / "out"
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    argv = {"dnpo": ["dnpo", "--data", sft(tmp_path), "--output", str(out), "--generation.backend", "vllm"],
            "spin": ["spin", "--data", sft(tmp_path), "--output", str(out), "--generation.backend", "vllm"],
            "ropo": ["ropo", "--data", str(data), "--output", str(out), "--generation.backend", "vllm"],
            "generate": ["generate", "--prompts", sft(tmp_path), "--output", str(out), "--backend", "vllm"],
            "demo": ["demo", "--output", str(out), "--backend", "vllm"]}[command]
    if command != "demo":
        argv += ["--model", "tiny"]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "backend" in err and "noisepo[vllm" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("flag, value, expected", [("--generation.backend", "tgi", "invalid choice: 'tgi'"),
                                                   ("--generation.tensor-parallel-size", "0", ">= 1"),
                                                   ("--generation.gpu-memory-utilization", "1.5", "(0, 1]")])
def test_bad_backend_options_exit_2_naming_the_option(tmp_path, capsys, flag, value, expected):
    try:
        status = main(["dnpo", "--model", "tiny", "--data", sft(tmp_path), "--output", str(tmp_path / "run"), flag, value])
    except SystemExit as stop:  # argparse's own refusal of a choice not offered: its usage line, status 2
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
