"""The issue-8 support: `data make --n-pairs`, accuracy per subset, and the shipped experiment specs
(every arm's options must build the real config of its command, on both built-in tasks)."""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from noisepo.cli import COMMANDS, main
from noisepo.config import from_dict

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))


def load_runner():
    spec = importlib.util.spec_from_file_location("experiments_run", ROOT / "experiments" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_class(command: str):
    module, _, name = COMMANDS[command].config.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("task", ["addition", "noisepo.tasks.reverse:ReverseTask"])
@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_arm_of_every_spec_builds_its_config(spec_path, quick, task, tmp_path, capsys):
    runner_module = load_runner()
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    if quick:
        spec = runner_module.deep_merge(spec, spec.get("quick", {}))
    spec["task"] = task
    spec = runner_module.with_task_overrides(spec)
    runner = runner_module.Runner(spec, tmp_path, dry_run=True)
    runner.run(list(spec["seeds"]), None)
    arms = len(spec["arms"]) * len(spec["seeds"])
    if spec.get("noise"):
        arms *= len(spec["noise"]["rates"]) + len(spec["noise"].get("practical") or {})
    assert len(runner.configs) == arms
    rates = {from_dict(config_class(c), o).training.learning_rate for c, o in runner.configs}
    expected = {("a", "addition"): {3e-5}, ("b", "addition"): {1e-4, 3e-5, 1e-5},  # searched per method
                ("b", "noisepo.tasks.reverse:ReverseTask"): {1e-4, 3e-5},
                ("a", "noisepo.tasks.reverse:ReverseTask"): {1e-5, 3e-5}, ("c", "addition"): {1e-5},
                ("c", "noisepo.tasks.reverse:ReverseTask"): {1e-4, 3e-5},
                # the testbed: baselines 2e-5 and ROPO 1e-5 (five-point grid), its variants at the loop's 1e-4
                ("b_testbed", "addition"): {1e-4, 2e-5, 1e-5}}
    key = (spec_path.stem, task) if (spec_path.stem, task) in expected else (spec_path.stem[0], task)
    assert rates == expected.get(key, {3e-5} if "reverse" in task else {3e-6})
    for command, options in runner.configs:
        config = from_dict(config_class(command), options)
        assert config.task == task
        if command in ("dnpo", "spin") and config.dsl.enabled:
            assert config.dsl.verifier == task
    printed = capsys.readouterr().out
    assert "noisepo data make" in printed and "noisepo sft" in printed


def test_deep_merge_and_flags():
    runner_module = load_runner()
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert runner_module.deep_merge(base, {"a.b": 5, "e": {"f": 1}}) == {"a": {"b": 5, "c": 2}, "d": 3, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}
    assert runner_module.flags({"n_train": 3, "progress": False, "x": None, "tasks": ["a", "b"]}) == \
        ["--n-train", "3", "--no-progress", "--tasks", "a,b"]


@pytest.mark.parametrize("task", ["addition", "reverse"])
def test_data_make_writes_clean_pairs(task, tmp_path):
    out = tmp_path / "data"
    assert main(["data", "make", "--task", task, "--output", str(out), "--n-train", "300", "--n-val", "20",
                 "--n-test", "30", "--n-pairs", "50", "--error-kind", "habit", "--error-rate", "0.05"]) == 0
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(pairs) == 50 == manifest["counts"]["preferences"]
    assert all(p["chosen"] == p["answer"] != p["rejected"] and p["label_flipped"] is False for p in pairs)
    assert any(p["hard"] for p in pairs) and not all(p["hard"] for p in pairs)


def test_accuracy_by_subset():
    from noisepo.training.sft import accuracy_by_subset

    records = [{"subset": "hard"}, {"subset": "easy"}, {"subset": "hard"}, {}]
    predictions = [{"score": 1.0}, {"score": 1.0}, {"score": 0.0}, {"score": 1.0}]
    assert accuracy_by_subset(records, predictions) == {"easy": 1.0, "hard": 0.5}
    assert accuracy_by_subset([{}], [{"score": 1.0}]) == {}


def test_search_runs_every_arm_at_every_rate_on_validation(tmp_path):
    runner_module = load_runner()
    import yaml

    spec = yaml.safe_load((ROOT / "experiments" / "b_label_noise.yaml").read_text())
    spec = runner_module.with_task_overrides(spec)
    spec["noise"] = {"rates": [0.2]}
    runner = runner_module.Runner(spec, tmp_path, dry_run=True, search_lrs=[1e-5, 1e-4])
    folders = runner.run([0], None)
    assert len(runner.configs) == len(folders) == 2 * len(spec["arms"])
    assert {from_dict(config_class(c), o).training.learning_rate for c, o in runner.configs} == {1e-5, 1e-4}
    assert all(o["eval_data"].endswith("val.jsonl") for _, o in runner.configs)  # never the test split
    assert {f.parent.name for f in folders} == {"b_label_noise-search"}
    assert "dpo-noise0.2-lr1e-5-s0" in {f.name for f in folders}

    for folder, accuracy in [("dpo-noise0.2-lr1e-5-s0", 0.5), ("dpo-noise0.2-lr1e-4-s0", 0.75),
                             ("ropo-norefill-noise0.2-lr1e-5-s0", 0.625)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps({"rounds": [{"accuracy": 0.1},
                                                                                 {"accuracy": accuracy}]}))
    table = runner.search_table([tmp_path / f for f in ("dpo-noise0.2-lr1e-5-s0", "dpo-noise0.2-lr1e-4-s0",
                                                        "ropo-norefill-noise0.2-lr1e-5-s0")])
    assert table.splitlines()[0] == "| lr | dpo-noise0.2 | ropo-norefill-noise0.2 |"
    assert "| 1e-5 | 50.0 | 62.5 |" in table and "| 1e-4 | 75.0 | - |" in table


def test_jobs_run_every_queued_arm_once(tmp_path):
    runner_module = load_runner()
    runner = runner_module.Runner({"task": "addition", "name": "x"}, tmp_path, jobs=2)
    calls = []
    runner.noisepo = lambda *args, output=None: calls.append((args, output))
    runner.pending = [(tmp_path / f"arm{i}", ["ropo", "--config", f"c{i}.yaml"]) for i in range(5)]
    runner.run_pending()
    assert sorted(args for args, _ in calls) == sorted(("ropo", "--config", f"c{i}.yaml") for i in range(5))
    assert {output.name for _, output in calls} == {f"arm{i}.log" for i in range(5)}
    assert runner.pending == []


def test_filter_diagnostics_auroc_by_subset(tmp_path, capsys):
    """The filter table: the iteration's pairs plus the history's, in filter order; AUROC 1 when every
    wrongly labelled pair's ℓ_ropo is above every right one's, 0 when below."""
    spec = importlib.util.spec_from_file_location("filter_diagnostics", ROOT / "experiments" / "filter_diagnostics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def pair(i, subset, wrong, same=False):
        chosen, rejected = ("1", "2") if wrong else ("2", "1")
        return {"id": f"p{i}", "answer": "2", "subset": subset, "chosen": chosen,
                "rejected": chosen if same else rejected}

    run = tmp_path / "robust-s0"
    previous = [pair(0, "easy", False), pair(1, "hard", True), pair(9, "easy", False, same=True)]
    current = [pair(2, "easy", True), pair(3, "easy", False), pair(4, "hard", False), pair(5, "hard", True)]
    for k, records in ((0, previous), (1, current)):
        (run / f"iter_{k}").mkdir(parents=True)
        (run / f"iter_{k}" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # training order: this iteration's pairs, then the history's (the identical pair p9 is not trained on)
    losses = {"p2": 3.0, "p3": 1.0, "p4": 2.0, "p5": 0.5, "p0": 0.1, "p1": 5.0}
    kept = {"p2": False, "p1": False}
    filtered = [{"id": r["id"], "ropo_loss": losses[r["id"]], "kept": kept.get(r["id"], True)}
                for r in current + previous[:2]]
    (run / "iter_1" / "filter.jsonl").write_text("".join(json.dumps(r) + "\n" for r in filtered))
    table = {(row[1], row[2]): row for row in module.rows(run)}
    assert table[(1, "easy")][3:] == (3, 1, 1, "1.00")   # wrong p2 (3.0) above right p3 (1.0) and p0 (0.1)
    assert table[(1, "hard")][3:] == (3, 2, 1, "0.50")   # wrong p5 (0.5) below p4 (2.0), wrong p1 (5.0) above
    assert table[(1, "this iteration")][3:] == (4, 2, 1, "0.50")
    assert table[(1, "history")][3:] == (2, 1, 1, "1.00")
    module.main([str(run)])
    assert "| robust-s0 | 1 | all | 6 | 3 | 2 |" in capsys.readouterr().out


def test_only_queues_its_arms_and_reports_the_finished_others(tmp_path):
    """`--only ropo-norefill` runs that arm; the report still covers the other arms' finished runs."""
    runner_module = load_runner()
    import yaml

    spec = yaml.safe_load((ROOT / "experiments" / "b_label_noise.yaml").read_text())
    spec["noise"] = {"rates": [0.2]}
    spec["task"] = "addition"
    spec = runner_module.with_task_overrides(spec)
    root = tmp_path / "addition" / spec["name"]
    (root / "dpo-noise0.2-s0").mkdir(parents=True)
    (root / "dpo-noise0.2-s0" / "summary.json").write_text("{}")  # finished; cdpo etc. are not
    runner = runner_module.Runner(spec, tmp_path, dry_run=True)
    folders = runner.run([0], ["ropo-norefill"])
    assert [f.name for f in folders] == ["dpo-noise0.2-s0", "ropo-norefill-noise0.2-s0"]
    assert [Path(options["output"]).name for _, options in runner.configs] == ["ropo-norefill-noise0.2-s0"]


@pytest.mark.parametrize("task", ["addition", "reverse"])
def test_npo_search_runs_npo_only_once_per_grid_entry_on_validation(task, tmp_path):
    """Each grid entry is the npo-only arm at SPIN's learning rate with that `npo:` section, so the search
    compares noise against noise and nothing else; every entry must build a valid config."""
    runner_module = load_runner()
    import yaml

    spec = yaml.safe_load((ROOT / "experiments" / "a_self_improvement.yaml").read_text())
    spec["task"] = task
    spec = runner_module.with_task_overrides(spec)
    grid = yaml.safe_load((ROOT / "experiments" / "grids" / "npo.yaml").read_text())
    runner = runner_module.Runner(spec, tmp_path, dry_run=True, npo_grid=grid)
    folders = runner.run([0], None)
    assert len(runner.configs) == len(folders) == len(grid)
    assert {f.parent.name for f in folders} == {"a_self_improvement-npo-search"}
    configs = [from_dict(config_class(c), o) for c, o in runner.configs]
    assert {c.training.learning_rate for c in configs} == {1e-5 if task == "reverse" else 3e-5}
    assert all(not c.dsl.enabled and c.npo.enabled for c in configs)
    assert all(o["eval_data"].endswith("val.jsonl") for _, o in runner.configs)
    for config, (name, options) in zip(configs, grid.items()):
        assert all(getattr(config.npo, key) == value for key, value in options.items()), name

    folder = tmp_path / "npo-only-bound-s1-m2-s0"
    for i, metrics in enumerate([{"accuracy": 0.5}, {"accuracy": 0.6, "npo": True, "npo/margin_effect": 0.2,
                                                     "npo/margin_effect_max": 1.5, "sigma_mean": 1.0,
                                                     "sigma_target": 1.1},
                                 {"accuracy": 0.7, "npo": True, "npo/margin_effect": 0.4,
                                  "npo/margin_effect_max": 0.9, "sigma_mean": 1.2, "sigma_target": 1.3}]):
        (folder / f"iter_{i}").mkdir(parents=True)
        (folder / f"iter_{i}" / "metrics.json").write_text(json.dumps(metrics))
    [row] = runner.npo_search_rows([folder])
    assert row["config"] == "bound-s1-m2" and row["accuracy"] == 0.7
    assert row["margin_effect"] == pytest.approx(0.3) and row["margin_effect_max"] == 1.5
    assert "| bound-s1-m2 | constraint=bound" in runner.npo_search_table([row])
