"""`noisepo report` over real run folders: two DNPO seeds and a ROPO run on label_flipped data (micro model)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from noisepo.cli import main
from noisepo.errors import ConfigError, InputError
from noisepo.report import ReportConfig, fmt_mean_std, load_run, mean_std

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DNPO_FAST = ["--iterations", "2", "--no-progress", "--beta", "0.5", "--generation.max-new-tokens", "4",
             "--training.learning-rate", "5e-3", "--training.batch-size", "8", "--training.report-to", "none",
             "--training.max-length", "32", "--training.warmup-ratio", "0", "--training.max-steps", "1",
             "--task", "addition", "--eval-limit", "4", "--eval-max-new-tokens", "4",
             "--dsl.scorer", "verifier", "--dsl.verifier", "addition"]
ROPO_FAST = ["--rounds", "2", "--samples", "2", "--max-new-tokens", "4", "--no-progress", "--beta", "0.5",
             "--training.learning-rate", "5e-3", "--training.batch-size", "8", "--training.report-to", "none",
             "--training.max-length", "32", "--training.warmup-ratio", "0", "--training.max-steps", "1",
             "--task", "addition", "--eval-limit", "4"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def flipped_pairs(n: int = 12, flip_rate: float = 0.25) -> list[dict]:
    rng = random.Random(0)
    flipped = set(rng.sample(range(n), round(flip_rate * n)))
    rows = []
    for i in range(n):
        good, bad = "a" * 3, "b" * 3
        chosen, rejected = (bad, good) if i in flipped else (good, bad)
        rows.append({"id": i, "prompt": f"Q{i}:", "chosen": chosen, "rejected": rejected,
                     "label_flipped": i in flipped})
    return rows


@pytest.fixture(scope="module")
def runs(micro_model_dir, tmp_path_factory) -> dict[str, Path]:
    from noisepo.tasks import load_task

    root = tmp_path_factory.mktemp("report_runs")
    sft = write_jsonl(root / "sft.jsonl", load_task("addition").sft_data(8, seed=0, error_rate=0.25))
    pairs = write_jsonl(root / "pairs.jsonl", flipped_pairs())
    out = {}
    for seed in (0, 1):
        out[f"dnpo-s{seed}"] = root / f"dnpo-s{seed}"
        assert main(["dnpo", "--model", micro_model_dir, "--data", sft, "--output", str(out[f"dnpo-s{seed}"]),
                     "--training.seed", str(seed), "--seed", str(seed), *DNPO_FAST]) == 0
    out["ropo"] = root / "ropo"
    assert main(["ropo", "--model", micro_model_dir, "--data", pairs, "--output", str(out["ropo"]),
                 *ROPO_FAST]) == 0
    # an unfinished seed: the same run without its summary
    out["dnpo-s2"] = root / "dnpo-s2"
    shutil.copytree(out["dnpo-s1"], out["dnpo-s2"])
    (out["dnpo-s2"] / "summary.json").unlink()
    return out


def test_report_lists_every_seed_with_mean_std_and_valid_plots(runs, tmp_path, capsys):
    report_dir = tmp_path / "report"
    root = runs["ropo"].parent
    argv = ["report", "--runs", f"{root}/dnpo-s*,{runs['ropo']}", "--output", str(report_dir)]
    assert main(argv) == 0
    assert "(4 runs, 1 incomplete)" in capsys.readouterr().out
    text = (report_dir / "report.md").read_text()
    for name in ("dnpo-s0", "dnpo-s1", "dnpo-s2", "ropo"):
        assert name in text
    assert "sampling=0, training=0" in text and "sampling=1, training=1" in text
    assert "incomplete (no summary.json)" in text and "dnpo-s2" in text
    assert " ± " in text and "(n=2)" in text  # two finished DNPO seeds in one group
    assert "### dnpo" in text and "ropo[ropo, filter] @ 25% flipped" in text
    assert "filter precision" in text and "filter recall" in text
    pngs = ["accuracy_per_iteration.png", "ropo_filter.png", "ropo_histograms_ropo.png"]
    for png in pngs:
        assert f"]({png})" in text
        assert (report_dir / png).read_bytes()[:8] == PNG_MAGIC
    assert not (report_dir / "accuracy_vs_flip_rate.png").exists()  # one flip rate only
    # the numbers behind the tables, per run and step, in plain JSON
    results = {r["run"]: r for r in json.loads((report_dir / "results.json").read_text())}
    assert set(results) == {"dnpo-s0", "dnpo-s1", "dnpo-s2", "ropo"}
    summary = json.loads((runs["dnpo-s0"] / "summary.json").read_text())
    assert [s["accuracy"] for s in results["dnpo-s0"]["steps"]] == [i["accuracy"] for i in summary["iterations"]]
    assert results["ropo"]["noise_rate"] == pytest.approx(0.25) and not results["dnpo-s2"]["complete"]
    assert "filter_precision" in results["ropo"]["steps"][0]


def test_run_folders_as_positional_arguments(runs, tmp_path, capsys):
    # the form: noisepo report RUN_DIR... --output DIR (globs and --runs add up)
    root = runs["ropo"].parent
    assert main(["report", str(runs["dnpo-s0"]), f"{root}/dnpo-s1", "--runs", str(runs["ropo"]),
                 "--output", str(tmp_path / "r")]) == 0
    assert "(3 runs, 0 incomplete)" in capsys.readouterr().out
    assert main(["report", "--output", str(tmp_path / "none")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_histograms_first_seed_or_none(runs, tmp_path):
    other = tmp_path / "ropo-s1"
    shutil.copytree(runs["ropo"], other)
    for choice, expected in [("first-seed", {"ropo_histograms_ropo.png"}), ("none", set())]:
        report_dir = tmp_path / choice
        assert main(["report", "--runs", f"{runs['ropo']},{other}", "--output", str(report_dir),
                     "--histograms", choice]) == 0
        assert {p.name for p in report_dir.glob("ropo_histograms_*.png")} == expected


def test_accuracy_against_flip_rate_when_rates_differ(runs, tmp_path):
    other = tmp_path / "ropo-noise0.4"
    shutil.copytree(runs["ropo"], other)
    (other / "reference" / "pairs.jsonl").unlink()  # no flags: the rate comes from the folder name
    assert load_run(other).noise_rate == pytest.approx(0.4)
    report_dir = tmp_path / "report"
    assert main(["report", "--runs", f"{runs['ropo']},{other}", "--output", str(report_dir)]) == 0
    assert (report_dir / "accuracy_vs_flip_rate.png").read_bytes()[:8] == PNG_MAGIC
    assert "40% flipped" in (report_dir / "report.md").read_text()


def test_bad_folders_exit_2_naming_the_path(runs, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["report", "--runs", str(empty), "--output", str(tmp_path / "r")]) == 2
    assert str(empty) in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs["dnpo-s0"], corrupt)
    (corrupt / "summary.json").write_text("{not json")
    assert main(["report", "--runs", str(corrupt), "--output", str(tmp_path / "r")]) == 2
    assert str(corrupt / "summary.json") in capsys.readouterr().err
    with pytest.raises(InputError, match="no manifest.json"):
        load_run(empty)


def test_config_validation_and_statistics():
    with pytest.raises(ConfigError, match="runs"):
        ReportConfig(runs=[], output="o")
    with pytest.raises(ConfigError, match="output"):
        ReportConfig(runs=["a"], output="")
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([None]) is None and mean_std([0.5]) == (0.5, None)
    assert fmt_mean_std([0.5, None, 0.7]) == "0.600 ± 0.141 (n=2)"


def test_missing_matplotlib_names_the_report_extra(runs, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import raises ImportError
    assert main(["report", "--runs", str(runs["dnpo-s0"]), "--output", str(tmp_path / "r")]) == 2
    assert "noisepo[report]" in capsys.readouterr().err


def test_runs_with_other_hyperparameters_are_not_averaged_as_seeds(tmp_path):
    from noisepo.report import Run, _label, group_runs

    def run(name, lr, seed):
        # each seed has its own data, SFT model and evaluation split (experiments/run.py): still seeds
        config = {"output": f"runs/{name}", "seed": seed, "dsl": {"enabled": True}, "npo": {"enabled": True},
                  "training": {"learning_rate": lr, "seed": seed}, "data": f"data-s{seed}/sft.jsonl",
                  "eval_data": f"data-s{seed}/test.jsonl", "model": f"sft-s{seed}/model"}
        return Run(tmp_path / name, "dnpo", "dnpo", {"training": seed}, None, {}, config=config)

    groups = group_runs([run("a", 1e-5, 0), run("b", 1e-5, 1), run("c", 3e-5, 0)])
    sizes = {_label(key): len(members) for key, members in groups.items()}
    assert sizes == {"dnpo (training.learning_rate=1e-05)": 2, "dnpo (training.learning_rate=3e-05)": 1}
    same = group_runs([run("a", 1e-5, 0), run("b", 1e-5, 1)])
    assert [_label(key) for key in same] == ["dnpo"]  # seeds alone: one group, no variant label


def test_accuracy_per_subset_of_the_task_is_reported(runs, tmp_path):
    from noisepo.report import load_run

    run = load_run(runs["dnpo-s0"])
    subsets = {k for step in run.steps for k in step if k.startswith("accuracy_")}
    assert subsets and subsets <= {"accuracy_easy", "accuracy_hard"}  # from each iteration's eval.json
    assert set(run.initial) == subsets  # the SFT model's, from base/eval.json
    assert main(["report", "--runs", str(runs["dnpo-s0"]), "--output", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    name = sorted(subsets)[0][len("accuracy_"):]
    assert f"accuracy on the {name} problems" in text and f"final accuracy {name}" in text


def test_seeds_of_one_noise_setting_are_one_group_whatever_share_each_realises(tmp_path):
    from noisepo.report import Run, _label, group_runs

    def run(name, realised, seed):
        config = {"output": name, "seed": seed, "loss": "dpo", "rho": 0.2, "training": {"seed": seed}}
        return Run(tmp_path / name, "ropo", "ropo[dpo, no-filter]", {"training": seed}, realised, {}, config=config)

    groups = group_runs([run("dpo-noise0.1-s0", 0.107, 0), run("dpo-noise0.1-s1", 0.1, 1),
                         run("dpo-noise0.2-s0", 0.195, 0), run("dpo-flagged0.4-s0", 0.089, 0),
                         run("dpo-flagged0.4-s1", 0.077, 1)])
    sizes = {_label(key): len(members) for key, members in groups.items()}
    assert sizes == {"ropo[dpo, no-filter] @ 10% flipped": 2, "ropo[dpo, no-filter] @ 20% flipped": 1,
                     "ropo[dpo, no-filter] @ 8.3% flipped": 2}  # the rule's mean realised share


def test_variants_of_a_rule_based_setting_stay_apart(tmp_path):
    from noisepo.report import Run, _label, group_runs

    def run(name, refill, seed):
        config = {"output": name, "seed": seed, "loss": "ropo", "rho": 0.2, "refill": refill}
        return Run(tmp_path / name, "ropo", "ropo[ropo, filter]", {"training": seed}, 0.08, {}, config=config)

    groups = group_runs([run("ropo-flagged0.4-s0", True, 0), run("ropo-flagged0.4-s1", True, 1),
                         run("ropo-norefill-flagged0.4-s0", False, 0)])
    assert {_label(key): len(members) for key, members in groups.items()} == {
        "ropo[ropo, filter] (refill=True) @ 8% flipped": 2, "ropo[ropo, filter] (refill=False) @ 8% flipped": 1}
