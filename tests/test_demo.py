"""`noisepo demo` end to end on a tiny budget (micro model, a few steps), and its resume."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from noisepo.cli import main

TINY_BUDGET = ["--model", "micro", "--n-train", "32", "--n-test", "8", "--max-steps", "3", "--batch-size", "8",
               "--iterations", "2", "--dnpo-prompts", "16", "--dnpo-epochs", "1", "--dnpo-batch-size", "8"]


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), *TINY_BUDGET]) == 0
    first = capsys.readouterr().out
    for stage in ("data", "sft"):
        assert (output / stage / "DONE").exists()
    assert (output / "sft" / "model" / "config.json").exists()
    summary = json.loads((output / "dnpo" / "summary.json").read_text())
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    assert not summary["iterations"][0]["dsl"] and summary["iterations"][1]["dsl"]  # 0 is SPIN
    assert summary["iterations"][1]["npo"] and summary["iterations"][1]["sigma_mean"] is not None
    assert 0 <= summary["initial_accuracy"] <= 1
    assert all(0 <= it["accuracy"] <= 1 for it in summary["iterations"])
    assert (output / "dnpo" / "iter_1" / "model" / "config.json").exists()
    sft_summary = json.loads((output / "sft" / "DONE").read_text())
    assert sft_summary["steps"] == 3 and sft_summary["train_loss"] > 0
    assert first.count(" ran ") == 2 and "mean σ" in first and "dnpo" in first
    assert "human 78.1%" in first  # 7 of 32 human answers are wrong: the habit on the hard ones, 5 % slips
    # plain SPIN from the same SFT model, side by side with DNPO
    spin = json.loads((output / "spin" / "summary.json").read_text())
    assert [(it["dsl"], it["npo"]) for it in spin["iterations"]] == [(False, False), (False, False)]
    assert spin["initial_accuracy"] == summary["initial_accuracy"]
    assert "SPIN (all / hard)" in first and "DNPO: DSL + NPO (all / hard)" in first

    model_written = (output / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    loop_model = output / "dnpo" / "iter_1" / "model" / "model.safetensors"
    loop_written = loop_model.stat().st_mtime_ns
    assert main(["demo", "--output", str(output), *TINY_BUDGET]) == 0
    second = capsys.readouterr().out
    assert second.count(" skipped ") == 2 and " ran " not in second
    assert (output / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == model_written
    assert loop_model.stat().st_mtime_ns == loop_written
    # the tables of the resumed run report the numbers of the first
    def sft_table(out):
        return out.split("stage")[1].split("Training curves")[0]

    def loop_table(out):
        return out[out.index("iter  method"):].split("\n\n")[0]

    assert sft_table(second) == sft_table(first).replace(" ran     ", " skipped ")
    assert loop_table(second) == loop_table(first)


def test_sft_stops_once_it_has_learnt_and_the_wall_time_is_split_by_stage(tmp_path, capsys):
    output = tmp_path / "demo"
    budget = ["--model", "micro", "--n-train", "32", "--n-test", "8", "--max-steps", "6", "--batch-size", "8",
              "--iterations", "0"]
    # an accuracy of 0 is reached at the first check: training stops there
    assert main(["demo", "--output", str(output), *budget, "--sft-check-steps", "2", "--sft-stop-accuracy", "0"]) == 0
    out = capsys.readouterr().out
    sft = json.loads((output / "sft" / "DONE").read_text())
    assert sft["steps"] == 2 and [c["step"] for c in sft["validation_checks"]] == [2]
    timing = json.loads((output / "timing.json").read_text())["seconds"]
    assert set(timing) == {"data", "sft", "generation", "scoring", "pairs", "training", "evaluation"}
    assert timing["sft"] > 0 and timing["evaluation"] > 0  # the check counts as evaluation, not SFT
    assert "Wall time by kind of work: data" in out

    # never reached (above 1): every check runs, training goes on to max_steps
    assert main(["demo", "--output", str(tmp_path / "all"), *budget, "--sft-check-steps", "2",
                 "--sft-stop-accuracy", "1.5"]) == 0
    sft = json.loads((tmp_path / "all" / "sft" / "DONE").read_text())
    assert sft["steps"] == 6 and [c["step"] for c in sft["validation_checks"]] == [2, 4]


def test_demo_module_imports_no_torch():
    code = "import sys, noisepo.demo, noisepo.tasks.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_refuses_to_resume_with_other_options(tmp_path, capsys):
    output = tmp_path / "demo"
    output.mkdir()
    (output / "manifest.json").write_text(json.dumps({"config": {"model": "micro", "n_train": 999}}))
    assert main(["demo", "--output", str(output), *TINY_BUDGET]) == 2
    assert "n_train" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tiny_model_learns_addition_and_the_habit_from_imperfect_data(tmp_path):
    """The acceptance run: the demo's SFT (tiny preset, experiment A's habit data) learns the easy problems
    and the human habit on the hard ones, the regime experiment A needs. 1500 steps instead of the
    default 3000 to keep CI short: seed 0 is in that regime by then (measured: test 79.2 %, easy 94.4 %,
    hard 23.4 %)."""
    from noisepo.demo import DemoConfig, run_demo

    assert run_demo(DemoConfig(output=str(tmp_path / "demo"), iterations=1, max_steps=1500,
                               compare_spin=False)) == 0
    base = json.loads((tmp_path / "demo" / "dnpo" / "base" / "eval.json").read_text())
    assert base["accuracy"] >= 0.7
    assert base["accuracy_by_subset"]["easy"] >= 0.9 and base["accuracy_by_subset"]["hard"] <= 0.5
