"""SPIN/DNPO loop (METHODS §3, §4) on the micro model: artifacts, DSL statistics, NPO, ablation switches.

SFT data: 16 addition problems, a quarter with a wrong "human" answer. The scorer is a verifier
written into the test's folder (the closer to 3 characters the better), so DSL flips some pairs,
ties others, and fails on responses containing 'x' (a scorer failure).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from noisepo.cli import main
from noisepo.config import from_dict
from noisepo.errors import ConfigError
from noisepo.pipelines.dnpo import summary_table
from noisepo.pipelines.dnpo_config import DNPOConfig, SPINConfig

N_PROMPTS = 16
FAST = ["--iterations", "2", "--no-progress", "--beta", "0.5", "--generation.max-new-tokens", "4",
        "--training.learning-rate", "5e-3", "--training.batch-size", "8", "--training.report-to", "none",
        "--training.max-length", "32", "--training.warmup-ratio", "0", "--training.max-steps", "2",
        "--training.logging-steps", "1", "--task", "addition", "--eval-limit", "6", "--eval-max-new-tokens", "4"]
VERIFIER = '''
def about_three_characters(prompt, response):
    if "x" in response:
        raise ValueError("unscorable")
    return -abs(len(response.strip()) - 3.0)
'''


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture()
def sft_data(tmp_path) -> str:
    from noisepo.tasks import load_task

    rows = load_task("addition").sft_data(N_PROMPTS, seed=0, error_rate=0.25)
    rows[0]["completion"] = "x"  # the verifier fails on this human response
    rows[1]["completion"], rows[2]["completion"] = "123456", "99999"  # the 4-token responses score higher
    rows[3]["completion"] = "===="  # what the untrained micro model answers greedily: an identical pair
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture()
def verifier(tmp_path, monkeypatch) -> str:
    (tmp_path / "dnpo_test_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("dnpo_test_verifier", None)
    return "dnpo_test_verifier:about_three_characters"


def dnpo_argv(model, data, output, verifier, *extra):
    return ["dnpo", "--model", model, "--data", data, "--output", str(output), *FAST,
            "--dsl.scorer", "verifier", "--dsl.verifier", verifier, *extra]


def test_dnpo_run_writes_every_artifact_and_dsl_statistics(micro_model_dir, sft_data, verifier, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(dnpo_argv(micro_model_dir, sft_data, out, verifier, "--win-rate")) == 0
    printed = capsys.readouterr().out
    assert "mean σ" in printed and "dnpo" in printed and "spin" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dsl"]["enabled"] and manifest["seeds"] == {"training": 0, "sampling": 0}
    assert manifest["packages"]["torch"]
    for k in (0, 1):
        folder = out / f"iter_{k}"
        for name in ("generations.jsonl", "pairs.jsonl", "train.json", "metrics.json", "eval.json",
                     "model/config.json", ".metrics.done"):
            assert (folder / name).exists(), f"iter_{k}/{name}"
        assert not (folder / "trainer").exists() and not (folder / "model.partial").exists()
    assert not (out / "iter_0" / "scores.jsonl").exists()  # iteration 0 is SPIN: no DSL

    generations = read_jsonl(out / "iter_1" / "generations.jsonl")
    scores = read_jsonl(out / "iter_1" / "scores.jsonl")
    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
    metrics = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert len(generations) == len(scores) == N_PROMPTS == metrics["prompts"]

    # DSL's statistics, recomputed from the raw scores
    def ok(s):
        return s["human_score"] is not None and s["model_score"] is not None
    assert metrics["scorer_failures"] == sum(not ok(s) for s in scores) >= 1
    assert metrics["flipped"] == sum(ok(s) and s["model_score"] > s["human_score"] for s in scores) >= 1
    assert metrics["ties"] == sum(ok(s) and s["model_score"] == s["human_score"] for s in scores) >= 1
    identical = sum(g["response"] == g["completion"] for g in generations)
    assert metrics["identical"] == identical and metrics["trainable_pairs"] == N_PROMPTS - identical == len(pairs)
    scored = [s for s in scores if ok(s)]
    assert metrics["mean_human_score"] == pytest.approx(sum(s["human_score"] for s in scored) / len(scored))
    assert metrics["mean_model_score"] == pytest.approx(sum(s["model_score"] for s in scored) / len(scored))
    for pair in pairs:
        g = generations[pair["index"]]
        assert {pair["chosen"], pair["rejected"]} == {g["completion"], g["response"]}
        assert pair["flipped"] == (pair["chosen"] == g["response"])
        assert pair["chosen"] != pair["rejected"]

    # training: iteration 1 uses the pairs of 1 and 0, NPO, with σ logged
    train = json.loads((out / "iter_1" / "train.json").read_text())
    assert metrics["trained_pairs"] == len(pairs) + len(read_jsonl(out / "iter_0" / "pairs.jsonl"))
    assert metrics["npo"] and metrics["sigma_mean"] is not None and metrics["noise_loss"] is not None
    assert any("npo/sigma_mean" in h for h in train["log_history"])
    iter0 = json.loads((out / "iter_0" / "metrics.json").read_text())
    assert not iter0["npo"] and not iter0["dsl"] and iter0["sigma_mean"] is None and iter0["flipped"] == 0
    assert iter0["identical"] == 1 and iter0["trainable_pairs"] == N_PROMPTS - 1  # left out of training
    # evaluation: accuracy, and a win rate against the previous iterate
    assert 0 <= metrics["accuracy"] <= 1 and metrics["win_rate"] is not None
    assert json.loads((out / "iter_1" / "win_rate.json").read_text())["against"] == "iter_0"
    summary = json.loads((out / "summary.json").read_text())
    assert [m["iteration"] for m in summary["iterations"]] == [0, 1]
    # the exported policy has no noise head
    from safetensors.torch import load_file

    assert not any("noise" in name for name in load_file(str(out / "iter_1" / "model" / "model.safetensors")))


@pytest.mark.parametrize("switches, expect", [
    (["--no-dsl.enabled", "--no-npo.enabled"], (False, False)),
    (["--no-npo.enabled"], (True, False)),
    (["--no-dsl.enabled", "--npo.reference-states", "cache", "--npo.rank", "2"], (False, True)),
])
def test_ablation_switches_change_one_thing(micro_model_dir, sft_data, verifier, tmp_path, switches, expect):
    out = tmp_path / "run"
    assert main(dnpo_argv(micro_model_dir, sft_data, out, verifier, "--iterations", "2", *switches)) == 0
    metrics = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert (metrics["dsl"], metrics["npo"]) == expect
    assert (out / "iter_1" / "scores.jsonl").exists() == expect[0]
    assert (metrics["sigma_mean"] is not None) == expect[1]
    if not expect[0]:  # SPIN's labels: the human response is always chosen
        generations = read_jsonl(out / "iter_1" / "generations.jsonl")
        pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
        assert metrics["flipped"] == 0 and pairs
        assert all(p["chosen"] == generations[p["index"]]["completion"] and not p["flipped"] for p in pairs)


def test_spin_command_from_yaml_is_the_loop_with_dsl_and_npo_off(micro_model_dir, sft_data, tmp_path):
    import yaml

    out = tmp_path / "spin"
    config = {"model": micro_model_dir, "data": sft_data, "output": str(out), "iterations": 3, "beta": 0.5,
              "progress": False, "task": "addition", "eval_limit": 4, "eval_max_new_tokens": 4,
              "generation": {"max_new_tokens": 3},
              "training": {"learning_rate": 5e-3, "batch_size": 8, "report_to": ["none"], "max_length": 32,
                           "warmup_ratio": 0.0, "max_steps": 1}}
    (tmp_path / "spin.yaml").write_text(yaml.safe_dump(config))
    assert main(["spin", "--config", str(tmp_path / "spin.yaml"), "--iterations", "2"]) == 0  # flags win
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["config"]["dsl"]["enabled"] and not manifest["config"]["npo"]["enabled"]
    assert manifest["config"]["iterations"] == 2 and manifest["config"]["generation"]["max_new_tokens"] == 3
    assert not (out / "iter_2").exists()
    for k in (0, 1):
        m = json.loads((out / f"iter_{k}" / "metrics.json").read_text())
        assert not m["dsl"] and not m["npo"] and m["flipped"] == 0
        assert all(len(g["response"]) <= 3 for g in read_jsonl(out / f"iter_{k}" / "generations.jsonl"))
    # iteration 1 starts from iteration 0's model, and trains on the pairs of 1 and 0
    m = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert m["stages"]["generate"]["policy"] == str(out / "iter_0" / "model")
    assert m["trained_pairs"] == sum(len(read_jsonl(out / f"iter_{k}" / "pairs.jsonl")) for k in (0, 1))


def test_history_zero_trains_on_this_iterations_pairs_only(micro_model_dir, sft_data, verifier, tmp_path):
    out = tmp_path / "run"
    assert main(dnpo_argv(micro_model_dir, sft_data, out, verifier, "--history", "0", "--no-npo.enabled")) == 0
    metrics = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert metrics["trained_pairs"] == len(read_jsonl(out / "iter_1" / "pairs.jsonl"))


def test_lm_eval_tasks_without_the_extra_exit_2_naming_it(micro_model_dir, sft_data, tmp_path, capsys, monkeypatch):
    """Asked for lm-eval without it installed: refused up front (not skipped: a number the user asked
    for must not silently go missing)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    status = main(["spin", "--model", micro_model_dir, "--data", sft_data, "--output", str(tmp_path / "run"),
                   "--lm-eval-tasks", "noisepo:addition"])
    err = capsys.readouterr().err
    assert status == 2 and "lm_eval_tasks" in err.replace("-", "_") and "noisepo[eval]" in err
    assert not (tmp_path / "run").exists()


def test_config_yaml_sections_and_validation(tmp_path):
    config = from_dict(DNPOConfig, {"model": "m", "data": "d", "output": "o",
                                    "dsl": {"enabled": True, "scorer": "verifier", "verifier": "addition"},
                                    "npo": {"rank": 8, "sigma0": 0.02}, "training": {"learning_rate": 1e-6}})
    assert config.dsl.verifier == "addition" and config.npo.rank == 8 and config.training.learning_rate == 1e-6
    assert not config.uses_dsl(0) and config.uses_dsl(1) and config.uses_npo(2)
    spin = from_dict(SPINConfig, {"model": "m", "data": "d", "output": "o"})
    assert not spin.dsl.enabled and not spin.npo.enabled  # no scorer needed
    with pytest.raises(ConfigError, match="verifier"):
        from_dict(DNPOConfig, {"model": "m", "data": "d", "output": "o", "dsl": {"scorer": "verifier"}})
    with pytest.raises(ConfigError, match="sigma0"):
        from_dict(DNPOConfig, {"model": "m", "data": "d", "output": "o", "npo": {"sigma0": 0}})
    with pytest.raises(ConfigError, match="win_rate|verifier"):
        from_dict(SPINConfig, {"model": "m", "data": "d", "output": "o", "win_rate": True,
                               "dsl": {"scorer": "verifier"}})


def test_summary_table_lists_every_iteration():
    summary = {"initial_accuracy": 0.25, "iterations": [
        {"iteration": 0, "dsl": False, "npo": False, "trainable_pairs": 10, "flipped": 0, "identical": 6,
         "sigma_mean": None, "accuracy": 0.5, "win_rate": 0.75, "seconds": 1.0},
        {"iteration": 1, "dsl": True, "npo": True, "trainable_pairs": 12, "flipped": 3, "identical": 4,
         "sigma_mean": 0.0123, "accuracy": None, "win_rate": None, "seconds": 2.0}]}
    table = summary_table(summary).splitlines()
    assert len(table) == 4 and "spin" in table[2] and "dnpo" in table[3] and "0.0123" in table[3]
    assert "25.0%" in table[1]


def test_robust_arm_trains_with_ropo_on_the_pairs_its_filter_keeps(micro_model_dir, sft_data, tmp_path):
    out = tmp_path / "robust"
    argv = ["dnpo", "--model", micro_model_dir, "--data", sft_data, "--output", str(out), *FAST,
            "--dsl.scorer", "verifier", "--dsl.verifier", "addition", "--dsl.verifier-error-rate", "0.3",
            "--robust.loss", "ropo", "--robust.rho", "0.25", "--no-robust.filter-misranked-only"]  # exactly ρN
    assert main(argv) == 2  # NPO is defined on the DPO loss: a clear error before anything runs
    assert not out.exists()
    argv.append("--no-npo.enabled")
    assert main(argv) == 0
    first, second = (json.loads((out / f"iter_{k}" / "train.json").read_text()) for k in (0, 1))
    assert "filter" not in first  # iteration 0 is the SPIN warm-up of every arm: no filter, loss dpo
    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl") + read_jsonl(out / "iter_0" / "pairs.jsonl")
    scored = read_jsonl(out / "iter_1" / "filter.jsonl")
    kept = [row for row in scored if row["kept"]]
    assert len(scored) == len(pairs) == second["filter"]["pairs"] and second["pairs"] == len(kept)
    assert len(kept) == round(0.75 * len(pairs)) == second["filter"]["kept"]
    assert max(r["ropo_loss"] for r in kept) <= min(r["ropo_loss"] for r in scored if not r["kept"])
    assert "filter_precision" in second["filter"]  # the task's verifier says which labels were wrong
    assert not (out / "iter_1" / "probe" / "model").exists()
    metrics = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert metrics["loss"] == "ropo" and metrics["filter"]["discarded"] == len(pairs) - len(kept)


def test_robust_filter_discards_only_misranked_pairs_by_default(micro_model_dir, sft_data, tmp_path):
    """As in `noisepo ropo`: a pair the filter's model ranks the labelled way round (h ≥ 0) is always kept, so at
    most ρN go; the summary counts the misranked pairs."""
    out = tmp_path / "robust"
    assert main(["dnpo", "--model", micro_model_dir, "--data", sft_data, "--output", str(out), *FAST,
                 "--dsl.scorer", "verifier", "--dsl.verifier", "addition", "--dsl.verifier-error-rate", "0.3",
                 "--robust.loss", "ropo", "--robust.rho", "0.5", "--no-npo.enabled"]) == 0
    scored = read_jsonl(out / "iter_1" / "filter.jsonl")
    summary = json.loads((out / "iter_1" / "train.json").read_text())["filter"]
    assert all(row["margin"] < 0 for row in scored if not row["kept"])
    assert summary["discarded"] == min(summary["misranked"], len(scored) - round(0.5 * len(scored)))


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_the_robust_filter_scores_against_the_reference_it_is_given(micro_model_dir, sft_data, tmp_path, reference):
    """Claim C's fix (issue 23): by default the filter's reference is the SFT model in every iteration,
    not the previous iterate; which one was used is in the filter's summary, and the scores differ."""
    out = tmp_path / reference
    argv = ["dnpo", "--model", micro_model_dir, "--data", sft_data, "--output", str(out), *FAST, "--iterations", "3",
            "--dsl.scorer", "verifier", "--dsl.verifier", "addition", "--dsl.verifier-error-rate", "0.3",
            "--robust.loss", "ropo", "--robust.rho", "0.25", "--no-npo.enabled",
            "--robust.filter-reference", reference]
    assert main(argv) == 0
    second = json.loads((out / "iter_2" / "train.json").read_text())["filter"]
    expected = micro_model_dir if reference == "initial" else str(out / "iter_1" / "model")
    assert second["filter_reference"] == expected
    assert "filter_precision" in json.loads((out / "iter_2" / "metrics.json").read_text())


def test_a_fixed_filter_reference_changes_the_scores(micro_model_dir, sft_data, tmp_path):
    losses = {}
    for reference in ("initial", "previous"):
        out = tmp_path / reference
        assert main(["dnpo", "--model", micro_model_dir, "--data", sft_data, "--output", str(out), *FAST,
                     "--iterations", "3", "--dsl.scorer", "verifier", "--dsl.verifier", "addition",
                     "--robust.loss", "ropo", "--robust.rho", "0.25", "--no-npo.enabled",
                     "--robust.filter-reference", reference]) == 0
        losses[reference] = [r["ropo_loss"] for r in read_jsonl(out / "iter_2" / "filter.jsonl")]
    # from iteration 1 on, "previous" is a trained iterate (policy_k = iter_{k-1}/model), not the SFT model
    assert losses["initial"] != pytest.approx(losses["previous"], rel=1e-3)
