"""lm-evaluation-harness, run for real (the dev extra installs it): noisepo's tasks as local lm-eval
tasks, evaluated on the SFT model and on each iteration's, shown in eval.json, lm_eval.json, the
per-iteration table and the report."""
from __future__ import annotations

import importlib.util
import json

import pytest

from noisepo.cli import main

pytest.importorskip("lm_eval")


def test_a_noisepo_task_scores_with_its_own_verifier(tmp_path):
    from noisepo.lm_eval_tasks import UTILS_MODULE, lm_eval_name, write_task
    from noisepo.tasks import load_task

    name = write_task("addition", tmp_path, n=5, max_new_tokens=7)
    assert name == lm_eval_name("addition") == "noisepo_addition"
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in rows] == \
        [(r["prompt"], r["answer"]) for r in load_task("addition").prompts(5, seed=0, split="test")]
    spec = importlib.util.spec_from_file_location(UTILS_MODULE, tmp_path / f"{UTILS_MODULE}.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert hook.process_results(rows[0], [rows[0]["answer"]]) == {"exact_match": 1.0}
    assert hook.process_results(rows[0], [rows[0]["answer"] + "1"]) == {"exact_match": 0.0}
    text = (tmp_path / f"{name}.yaml").read_text()
    assert "max_gen_toks: 7" in text and "generate_until" in text
    assert lm_eval_name("mypkg.mod:Task") == "noisepo_mypkg_mod_Task"


def test_spin_runs_lm_eval_on_the_sft_model_and_each_iteration(micro_model_dir, tmp_path, capsys):
    from noisepo.tasks import load_task

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in load_task("addition").sft_data(8, seed=0)))
    output = tmp_path / "spin"
    status = main(["spin", "--model", micro_model_dir, "--data", str(sft), "--output", str(output),
                   "--iterations", "1", "--no-progress", "--generation.max-new-tokens", "4",
                   "--training.max-steps", "1", "--training.batch-size", "8", "--training.report-to", "none",
                   "--training.max-length", "32", "--task", "addition", "--eval-limit", "5",
                   "--eval-max-new-tokens", "4", "--lm-eval-tasks", "noisepo:addition"])
    assert status == 0
    table = capsys.readouterr().out
    assert "lm-eval" in table and "noisepo_addition" in table
    for folder in (output / "base", output / "iter_0"):
        results = json.loads((folder / "lm_eval.json").read_text())
        evaluation = json.loads((folder / "eval.json").read_text())
        assert results["noisepo_addition"]["sample_len"] == 5 and evaluation["lm_eval"] == results
        # lm-eval generates through its own model wrapper: on the same prompts, greedy, the same
        # number of new tokens, its responses and score are those of our evaluation
        ours = [json.loads(line) for line in (folder / "eval_predictions.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (folder / "lm_eval_samples.jsonl").read_text().splitlines()]
        assert sorted((s["prompt"], s["response"]) for s in theirs) == sorted((p["prompt"], p["response"]) for p in ours)
        assert results["noisepo_addition"]["exact_match"] == pytest.approx(evaluation["accuracy"])
    metrics = json.loads((output / "iter_0" / "metrics.json").read_text())
    assert metrics["lm_eval"]["noisepo_addition"]["sample_len"] == 5

    from noisepo.report import load_run, write_report

    report = write_report([load_run(output)], tmp_path / "report").read_text()
    assert "lm-eval: noisepo_addition" in report


@pytest.mark.parametrize("task, message", [("noisepo:no_such_task", "no_such_task"),
                                           ("no_such_lm_eval_task", "lm-eval knows no task")])
def test_an_unknown_lm_eval_task_exits_2_before_the_run(micro_model_dir, tmp_path, capsys, task, message):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    status = main(["spin", "--model", micro_model_dir, "--data", str(sft), "--output", str(tmp_path / "run"),
                   "--lm-eval-tasks", task])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
