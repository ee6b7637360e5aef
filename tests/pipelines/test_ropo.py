"""ROPO's loop (METHODS §5) on the micro model: filter, refills, baselines, artifacts, a user's own task.

The data is a rule a micro model learns in one short round: the chosen response is a run of `a`,
the rejected a run of `b` as long; a quarter of the pairs are flipped (`label_flipped: true`), so after
round 0 the flipped pairs have clearly higher ℓ_ropo.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from noisepo.cli import main
from noisepo.pipelines.filtering import kept_count
from noisepo.pipelines.ropo import (
    auroc,
    candidates_of,
    discarded_groups,
    loss_distribution,
    refill_pairs,
    ropo_scores,
    summary_table,
)

N_PAIRS = 24
FAST = ["--samples", "2", "--max-new-tokens", "6", "--no-progress", "--beta", "0.5",
        "--training.learning-rate", "5e-3", "--training.batch-size", "4", "--training.report-to", "none",
        "--training.max-length", "64", "--training.warmup-ratio", "0"]


def rule_pairs(n: int = N_PAIRS, flip_rate: float = 0.25, seed: int = 0) -> list[dict]:
    """Pairs of the rule chosen = 'aaa…', rejected = 'bbb…'; the first 4 prompts appear twice (pairs
    i and n−4+i). Exactly round(flip_rate·n) pairs are flipped, both pairs of prompt Q0 among them
    (when at least 2), so two discarded pairs share a prompt."""
    rng = random.Random(seed)
    count = round(flip_rate * n)
    flipped = {0, n - 4} if count >= 2 else set()
    flipped |= set(rng.sample([i for i in range(n) if i not in flipped], count - len(flipped)))
    rows = []
    for i in range(n):
        length = rng.randint(3, 6)  # same length on both sides: the letter is the only signal
        good, bad = "a" * length, "b" * length
        chosen, rejected = (bad, good) if i in flipped else (good, bad)
        rows.append({"id": i, "prompt": f"Q{i % (n - 4)}:", "chosen": chosen, "rejected": rejected,
                     "label_flipped": i in flipped})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ropo_cli(model: str, data: str, output: Path, *extra: str) -> int:
    return main(["ropo", "--model", model, "--data", data, "--output", str(output), *FAST, *extra])


# --------------------------------------------------------------------------- pure pieces
def test_scores_are_the_ropo_loss_and_rank_flipped_pairs_first():
    """Synthetic log-probs where flipped pairs clearly lose: the filter's precision is >= 0.9."""
    rng = random.Random(1)
    records, policy, flipped = [], [], []
    for i in range(200):
        is_flipped = i % 5 == 0  # 20 %
        gain = rng.gauss(-4.0 if is_flipped else 4.0, 1.5)  # Δ = policy − reference margin
        records.append({"reference_chosen_logps": -10.0, "reference_rejected_logps": -12.0})
        policy.append({"chosen": -10.0 + gain / 2, "rejected": -12.0 - gain / 2})
        flipped.append(is_flipped)
    losses, margins = ropo_scores(policy, records, beta=0.5, alpha=14.0)
    c = 4 * 14 / 15 ** 2
    for loss, h in zip(losses, margins):  # ℓ_ropo = c(α)·(−log σ(h) + α σ(−h))
        sig = 1 / (1 + math.exp(h))
        assert math.isclose(loss, c * (-math.log(1 - sig) + 14 * sig), rel_tol=1e-9)
    from noisepo.pipelines.filtering import filter_quality, select_kept

    kept = select_kept(losses, 0.2)
    quality = filter_quality(kept, flipped)
    assert sum(kept) == kept_count(200, 0.2) == 160
    assert quality["filter_precision"] >= 0.9 and quality["filter_recall"] >= 0.9
    distribution = loss_distribution(losses, kept, flipped)
    assert distribution["auroc_flipped"] > 0.95
    assert sum(distribution["counts"]["clean"]) + sum(distribution["counts"]["flipped"]) == 200
    assert distribution["stats"]["flipped"]["mean"] > distribution["stats"]["clean"]["mean"]


def test_auroc_counts_ties_half():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0], [2.0]) == 0.0
    assert auroc([2.0, 1.0], [2.0]) == 0.25  # (0.5 + 0) / 2


def test_discarded_prompts_are_grouped_and_candidates_deduplicated():
    records = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x", "rejected": "y"},
               {"prompt": "p", "chosen": "z", "rejected": "x"},
               {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "u"}],
                "rejected": [{"role": "assistant", "content": "v"}]}]
    assert discarded_groups(records, [False, True, False, False]) == [[0, 2], [3]]
    texts, sources = candidates_of(records, [0, 2], ["y", "", "w", "w"])
    assert texts == ["x", "y", "z", "w"]
    assert sources == ["original_chosen", "original_rejected", "original_chosen", "sample"]
    texts, _ = candidates_of(records, [3], ["u", "s"])
    assert texts == ["u", "v", "s"]


def test_refill_pairs_take_the_highest_and_lowest_reward():
    records = [{"prompt": "p", "chosen": "x", "rejected": "y", "label_flipped": True},
               {"prompt": "q", "chosen": "x", "rejected": "y", "label_flipped": False},
               {"prompt": [{"role": "user", "content": "r"}], "chosen": [{"role": "assistant", "content": "u"}],
                "rejected": [{"role": "assistant", "content": "v"}], "label_flipped": False}]
    groups = [[0], [1], [2]]
    candidates = [candidates_of(records, [0], ["s"]), (["x"], ["original_chosen"]), candidates_of(records, [2], ["w"])]
    rewards = [-1.0, 2.0, 0.5,  # p: x, y, s -> turn the original pair around
               0.0,  # q: a single distinct candidate -> skipped
               0.3, 0.3, 0.9]  # r: u, v tie (u, listed first, is the worst), w best
    refills, summary = refill_pairs(records, groups, candidates, rewards, round_index=1)
    assert [(x["chosen"], x["rejected"]) for x in refills] == [
        ("y", "x"), ([{"role": "assistant", "content": "w"}], [{"role": "assistant", "content": "u"}])]
    assert refills[0]["id"] == "refill-1-0" and refills[1]["refill_of"] == [2]
    assert summary == {"rule": "best-worst", "refills": 2, "identical_skipped": 1, "declined": 0, "reoriented": 1,
                       "reoriented_flipped": 1,
                       "sources": {"original_rejected>original_chosen": 1, "sample>original_chosen": 1}}
    with pytest.raises(ValueError):
        refill_pairs(records, groups, candidates, rewards[:-1], round_index=1)


def test_replace_rejected_keeps_the_chosen_against_the_least_preferred_sample():
    records = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
               {"prompt": "r", "chosen": "c", "rejected": "d"}]
    candidates = [candidates_of(records, [0], ["s", "t"]),  # x, y, s, t
                  candidates_of(records, [1], []),  # a, b: no sample -> nothing to replace with
                  candidates_of(records, [2], ["c"])]  # c, d: the only sample is the chosen itself
    rewards = [-5.0, -9.0, 1.0, -2.0,  # p: y is the lowest of all, but only samples replace: t
               0.0, 1.0,
               0.0, 1.0]
    refills, summary = refill_pairs(records, [[0], [1], [2]], candidates, rewards, round_index=0,
                                    rule="replace-rejected")
    assert [(x["chosen"], x["rejected"]) for x in refills] == [("x", "t")]
    assert summary["identical_skipped"] == 2 and summary["sources"] == {"original_chosen>sample": 1}


def test_ranked_keeps_a_refill_only_when_its_loss_ranks_among_the_kept():
    from noisepo.pipelines.ropo import ropo_loss_of_margin

    records = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    candidates = [candidates_of(records, [0], ["s"]), candidates_of(records, [1], ["e"])]
    rewards = [0.0, -3.0, 0.5,  # p: s vs y, margin 3.5 -> a small loss
               0.0, 0.05, 0.1]  # q: e vs a, margin 0.1 -> about ln 2 + α/2 scaled: large
    kept = [ropo_loss_of_margin(1.0, 14.0), ropo_loss_of_margin(2.0, 14.0)]  # the kept set's worst: margin 1
    refills, summary = refill_pairs(records, [[0], [1]], candidates, rewards, round_index=0, rule="ranked",
                                    alpha=14.0, kept_losses=kept)
    assert [(x["chosen"], x["rejected"]) for x in refills] == [("s", "y")]
    assert summary["declined"] == 1
    everything, _ = refill_pairs(records, [[0], [1]], candidates, rewards, round_index=0, rule="best-worst")
    assert len(everything) == 2  # the same pairs, none declined


def test_ropo_loss_of_a_margin_matches_the_loss_function():
    import torch

    from noisepo.losses import ropo
    from noisepo.pipelines.ropo import ropo_loss_of_margin

    for h in (-800.0, -3.0, 0.0, 0.7, 40.0):
        expected = ropo(torch.tensor([h]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                        beta=1.0, alpha=14.0)
        assert ropo_loss_of_margin(h, 14.0) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("argv, key", [(["--refill-rule", "nearest"], "refill"), (["--rho", "0"], "rho"),
                                       (["--rho", "1.5"], "rho"), (["--samples", "1"], "samples"),
                                       (["--filter-reference-weight", "1.5"], "filter_reference_weight"),
                                       (["--refill-rule", "replace-rejected", "--samples", "0"], "samples")])
def test_bad_refill_options_exit_2_naming_the_option(micro_model_dir, tmp_path, capsys, argv, key):
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8))
    try:
        status = ropo_cli(micro_model_dir, data, tmp_path / "out", *argv)
    except SystemExit as stop:  # argparse refuses a choice it does not offer, with its usage line
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and key in err.replace("-", "_") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ropo_help_says_what_each_refill_rule_does(capsys):
    from noisepo.cli import main

    with pytest.raises(SystemExit):
        main(["ropo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for rule, words in (("best-worst", "highest, lowest implicit"), ("replace-rejected", "own chosen against"),
                        ("ranked", "ranks among the kept")):
        assert rule in text and words in text


# --------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def ropo_run(micro_model_dir, tmp_path_factory):
    """One 2-round ROPO run (ρ = 0.25) on the rule data, shared by the tests below: the paper's filter (exactly
    ρN discarded, ranked by ℓ_ropo's own margin, γ = 1) and the best-worst refill, which these tests describe (the defaults are checked elsewhere)."""
    folder = tmp_path_factory.mktemp("ropo")
    data = write_jsonl(folder / "pairs.jsonl", rule_pairs())
    assert ropo_cli(micro_model_dir, data, folder / "out", "--rounds", "2", "--rho", "0.25",
                    "--no-filter-misranked-only", "--filter-reference-weight", "1", "--refill-rule", "best-worst") == 0
    return folder / "out"


def test_every_round_keeps_exactly_one_minus_rho_n(ropo_run):
    for r in (0, 1):
        rows = read_jsonl(ropo_run / f"round_{r}" / "pairs.jsonl")
        assert len(rows) == N_PAIRS  # every original pair is scored every round
        assert sum(row["kept"] for row in rows) == kept_count(N_PAIRS, 0.25) == 18
        assert all(row["weight"] == (1.0 if row["kept"] else 0.0) for row in rows)
        discarded = [row["loss"] for row in rows if not row["kept"]]
        assert min(discarded) >= max(row["loss"] for row in rows if row["kept"])


def test_the_filter_catches_the_flipped_pairs(ropo_run):
    metrics = json.loads((ropo_run / "round_0" / "metrics.json").read_text())
    assert metrics["filter_precision"] >= 0.9 and metrics["filter_recall"] >= 0.9
    histogram = json.loads((ropo_run / "round_0" / "loss_histogram.json").read_text())
    assert histogram["stats"]["flipped"]["mean"] > histogram["stats"]["clean"]["mean"]
    assert len(histogram["bin_edges"]) == len(histogram["counts"]["clean"]) + 1
    pytest.importorskip("matplotlib")
    assert histogram["png"] == "loss_histogram.png"
    assert (ropo_run / "round_0" / "loss_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_refills_cover_discarded_prompts_once_and_feed_the_next_round(ropo_run):
    originals = read_jsonl(ropo_run / "reference" / "pairs.jsonl")
    rows = read_jsonl(ropo_run / "round_0" / "pairs.jsonl")
    refills = read_jsonl(ropo_run / "round_0" / "refills.jsonl")
    discarded_prompts = {originals[row["index"]]["prompt"] for row in rows if not row["kept"]}
    prompts = [refill["prompt"] for refill in refills]
    assert len(prompts) == len(set(prompts)) and set(prompts) <= discarded_prompts
    assert [0, N_PAIRS - 4] in [refill["refill_of"] for refill in refills]  # Q0's two flipped pairs: one refill
    refill_metrics = json.loads((ropo_run / "round_0" / "metrics.json").read_text())["refill"]
    assert len(refills) + refill_metrics["identical_skipped"] == len(discarded_prompts)
    for refill in refills:
        assert refill["chosen"] != refill["rejected"] and refill["chosen_reward"] >= refill["rejected_reward"]
        assert set(refill["refill_of"]) <= {row["index"] for row in rows if not row["kept"]}
        assert "reference_chosen_logps" in refill and "reference_rejected_logps" in refill
    train = json.loads((ropo_run / "round_1" / "metrics.json").read_text())["train"]
    assert (train["originals"], train["refills"]) == (18, len(refills))
    assert train["init_model"] == str(ropo_run / "round_0" / "model")
    # The last round has no next round: its refill stage is skipped (and says so).
    last = json.loads((ropo_run / "round_1" / "metrics.json").read_text())
    assert last["refills"] == 0 and "last round" in last["refill"]["skipped"]
    summary = json.loads((ropo_run / "summary.json").read_text())
    assert [m["kept"] for m in summary["rounds"]] == [18, 18]
    assert "precision" in summary_table(summary)


def test_reference_is_the_initial_model_in_every_round(ropo_run, micro_model_dir):
    from noisepo.pipelines.common import load_policy, pair_logps

    originals = read_jsonl(ropo_run / "reference" / "pairs.jsonl")
    model, tok = load_policy(micro_model_dir)
    again = pair_logps(model, tok, originals[:4], max_length=64)
    for record, s in zip(originals, again):
        assert math.isclose(record["reference_chosen_logps"], s["chosen"], rel_tol=1e-5, abs_tol=1e-5)


def test_a_pair_dropped_in_one_round_can_return(micro_model_dir, tmp_path, monkeypatch):
    """Filtering is recomputed from the whole original set: pair 0 (clean) looks noisy in round 0 only."""
    import noisepo.pipelines.ropo as ropo_module

    real, calls = ropo_module.ropo_scores, []

    def scores(policy, records, **kw):
        losses, margins = real(policy, records, **kw)
        calls.append(1)
        losses[0] = 1e6 if len(calls) == 1 else -1e6
        return losses, margins

    monkeypatch.setattr(ropo_module, "ropo_scores", scores)
    rows = rule_pairs(16, flip_rate=0.0)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "2", "--rho", "0.25",
                    "--samples", "0", "--refill-rule", "best-worst", "--no-filter-misranked-only",
                    "--filter-reference-weight", "1") == 0  # the filter ranks by the (patched) ℓ_ropo
    first, second = (read_jsonl(tmp_path / "out" / f"round_{r}" / "pairs.jsonl") for r in (0, 1))
    assert not first[0]["kept"] and second[0]["kept"]
    refills = read_jsonl(tmp_path / "out" / "round_0" / "refills.jsonl")
    assert any(0 in refill["refill_of"] for refill in refills)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_baselines_run_the_same_stages_without_filtering(micro_model_dir, tmp_path, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(16))
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "2", "--loss", loss, "--no-filter") == 0
    for r in (0, 1):
        metrics = json.loads((tmp_path / "out" / f"round_{r}" / "metrics.json").read_text())
        assert (metrics["trained_pairs"], metrics["kept"], metrics["refills"]) == (16, 16, 0)
        assert metrics["filter_precision"] is None and metrics["filter_recall"] == 0.0
        assert metrics["filter"]["auroc_flipped"] is not None  # still scored with ℓ_ropo
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["loss"] == loss and manifest["config"]["filter"] is False


def test_bad_options_and_a_changed_config_exit_2(micro_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8))
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rho", "1.0") == 2
    assert "'rho'" in capsys.readouterr().err
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--verifier", "m:score") == 2
    assert "'eval_data'" in capsys.readouterr().err
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "1", "--samples", "0", "--refill-rule", "best-worst") == 0
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "1", "--samples", "2") == 2
    assert "different config" in capsys.readouterr().err


# --------------------------------------------------------------------------- a user's own task
TASK_MODULE = '''
import random

LETTERS = "abcdefgh"


def score(prompt, response):
    """1 when the response repeats the letter after 'say ' in the prompt."""
    return float(response.strip() == prompt.split("say ")[-1].rstrip(":"))


class Echo:
    name = "echo"

    def prompts(self, n, *, seed=0, split="train"):
        rng = random.Random(f"{split}-{seed}")
        return [{"id": i, "prompt": f"say {rng.choice(LETTERS)}:", "answer": None} for i in range(n)]

    def score(self, prompt, response):
        return score(prompt, response)
'''


@pytest.mark.parametrize("how", ["task", "verifier"])
def test_a_users_own_task_runs_end_to_end(micro_model_dir, tmp_path, monkeypatch, request, how):
    import sys

    (tmp_path / "ropo_user_task.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ropo_user_task", None)  # each run imports its own file; none is left behind
    request.addfinalizer(lambda: sys.modules.pop("ropo_user_task", None))
    rng = random.Random(0)
    pairs = []
    for i in range(16):
        letter, wrong = rng.sample("abcdefgh", 2)
        chosen, rejected = (wrong, letter) if i % 4 == 0 else (letter, wrong)  # 25 % flipped, unmarked
        pairs.append({"prompt": f"say {letter}:", "chosen": chosen, "rejected": rejected})
    data = write_jsonl(tmp_path / "mine.jsonl", pairs)
    if how == "task":
        extra = ["--task", "ropo_user_task:Echo", "--eval-limit", "6"]
    else:
        eval_data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"say {c}:"} for c in "abcd"])
        extra = ["--verifier", "ropo_user_task:score", "--eval-data", eval_data]
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "2", "--eval-max-new-tokens", "3",
                    *extra) == 0
    out = tmp_path / "out"
    initial = json.loads((out / "reference" / "eval.json").read_text())
    assert initial["n"] == (6 if how == "task" else 4)
    for r in (0, 1):
        metrics = json.loads((out / f"round_{r}" / "metrics.json").read_text())
        assert metrics["accuracy"] is not None and metrics["filter_precision"] is None  # no label_flipped
    refills = read_jsonl(out / "round_0" / "refills.jsonl")
    assert refills and all(refill["chosen_score"] in (0.0, 1.0) for refill in refills)
    assert json.loads((out / "summary.json").read_text())["initial_accuracy"] is not None


def test_yaml_config_with_a_training_section(tmp_path):
    from noisepo.config import parse_config
    from noisepo.pipelines.ropo_config import ROPOConfig

    path = tmp_path / "ropo.yaml"
    path.write_text("model: m\ndata: d.jsonl\noutput: out\nrho: 0.3\nrounds: 2\n"
                    "training:\n  learning_rate: 0.001\n  max_steps: 5\n")
    config = parse_config(ROPOConfig, ["--config", str(path), "--training.max-steps", "7", "--no-filter"])
    assert (config.rho, config.rounds, config.filter, config.filtering) == (0.3, 2, False, False)
    assert (config.training.learning_rate, config.training.max_steps) == (0.001, 7)
    assert (config.alpha, config.samples, ROPOConfig(model="m", data="d", output="o").rounds) == (14.0, 4, 3)


@pytest.mark.parametrize("rule", ["replace-rejected", "ranked"])
def test_each_refill_rule_runs_in_the_loop(micro_model_dir, tmp_path, rule):
    """Through `noisepo ropo`: the rule is the refill stage's, its pairs have the rule's shape."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(16))
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "2", "--rho", "0.25", "--samples", "2",
                    "--refill-rule", rule) == 0
    summary = json.loads((tmp_path / "out" / "round_0" / ".refill.done").read_text())
    assert summary["rule"] == rule and summary["prompts"] >= 1
    refills = read_jsonl(tmp_path / "out" / "round_0" / "refills.jsonl")
    assert summary["refills"] == len(refills)
    if rule == "replace-rejected":
        assert refills and all((x["chosen_source"], x["rejected_source"]) == ("original_chosen", "sample")
                               for x in refills)
    else:
        assert summary["refills"] + summary["declined"] + summary["identical_skipped"] == summary["prompts"]


def test_the_round_table_warns_when_accuracy_or_the_filter_goes_backwards():
    from noisepo.pipelines.ropo import summary_table

    def round_(r, accuracy, auroc):
        return {"round": r, "trained_pairs": 10, "kept": 8, "refills": 2, "filter_precision": 0.5,
                "filter_recall": 0.5, "auroc_flipped": auroc, "accuracy": accuracy, "seconds": 1.0}

    table = summary_table({"initial_accuracy": 0.5, "rounds": [round_(0, 0.6, 0.8), round_(1, 0.4, 0.45)]})
    warnings = [line for line in table.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: round 1's accuracy 40.0% is below the initial model's 50.0%",
                        "warning: round 1's filter AUROC 0.450 is below round 0's 0.800 (below chance)"]
    calm = summary_table({"initial_accuracy": 0.5, "rounds": [round_(0, 0.6, 0.8), round_(1, 0.7, 0.85)]})
    assert "warning" not in calm


def test_misranked_only_filter_never_discards_a_pair_the_model_agrees_with():
    from noisepo.pipelines.filtering import select_kept

    losses = [0.1, 5.0, 3.0, 4.0, 2.0]
    margins = [2.0, -3.0, 0.5, -1.0, 1.0]  # pairs 1 and 3 are misranked (h < 0)
    assert select_kept(losses, 0.4) == [True, False, True, False, True]
    assert select_kept(losses, 0.4, margins) == [True, False, True, False, True]
    assert select_kept(losses, 0.6, margins) == [True, False, True, False, True]  # 3 allowed, only 2 misranked
    assert select_kept(losses, 0.6) == [True, False, False, False, True]
    assert select_kept(losses, 0.2, margins) == [True, False, True, True, True]  # at most ρN
    assert select_kept([1.0, float("nan")], 0.5, [1.0, float("nan")]) == [True, False]


def test_misranked_only_filter_acts_in_the_loop(micro_model_dir, tmp_path):
    """Through `noisepo ropo`: with --filter-misranked-only every discarded pair has h < 0, so the loop
    discards fewer pairs than ρN whenever fewer are misranked (the paper's rule always discards ρN)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(16))
    assert ropo_cli(micro_model_dir, data, tmp_path / "out", "--rounds", "1", "--rho", "0.5",
                    "--filter-misranked-only", "--no-refill") == 0
    rows = read_jsonl(tmp_path / "out" / "round_0" / "pairs.jsonl")
    summary = json.loads((tmp_path / "out" / "round_0" / ".filter.done").read_text())
    assert all(row["filter_margin"] < 0 for row in rows if not row["kept"])
    assert summary["discarded"] == min(summary["misranked"], 16 - kept_count(16, 0.5))


def test_filter_margin_by_hand():
    """h_γ = β[(log π(y_w) − log π(y_l)) − γ(log π_ref(y_w) − log π_ref(y_l))] = γ·h + (1−γ)·β·log π(y_w)/π(y_l).
    Policy (−1, −3), reference (−2, −1), β = 0.1: h = 0.1·(2 − (−1)) = 0.3; the likelihood term 0.1·2 = 0.2."""
    from noisepo.pipelines.filtering import filter_margin

    for gamma, expected in ((1.0, 0.3), (0.0, 0.2), (0.5, 0.25), (0.8, 0.28)):
        assert filter_margin(-1.0, -3.0, -2.0, -1.0, beta=0.1, reference_weight=gamma) == pytest.approx(expected)
        assert expected == pytest.approx(gamma * 0.3 + (1 - gamma) * 0.2)


def test_filter_reference_weight_changes_what_the_loop_discards(micro_model_dir, tmp_path):
    """The knob acts: with γ = 1 the filter ranks by ℓ_ropo's own margin (filter_margin = margin); with γ = 0 by the
    model's likelihood preference, which ranks the same scores in a different order."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(16))
    runs = {}
    for gamma in ("1", "0"):
        out = tmp_path / f"g{gamma}"
        assert ropo_cli(micro_model_dir, data, out, "--rounds", "1", "--rho", "0.25", "--no-filter-misranked-only",
                        "--filter-reference-weight", gamma, "--no-refill") == 0
        runs[gamma] = read_jsonl(out / "round_0" / "pairs.jsonl")
        scores = read_jsonl(out / "round_0" / "scores.jsonl")
        for row, score in zip(runs[gamma], scores, strict=True):
            likelihood = 0.5 * (score["policy_chosen_logps"] - score["policy_rejected_logps"])  # FAST: β = 0.5
            expected = score["margin"] if gamma == "1" else likelihood
            assert row["filter_margin"] == pytest.approx(expected, abs=1e-9)
        discarded = [row["filter_loss"] for row in runs[gamma] if not row["kept"]]
        assert min(discarded) >= max(row["filter_loss"] for row in runs[gamma] if row["kept"])
    # the same model scored both (same seed, same data): only the filter's statistic, and so its order, differs
    assert [r["margin"] for r in runs["1"]] == pytest.approx([r["margin"] for r in runs["0"]])
    order = {g: sorted(range(16), key=lambda i, g=g: runs[g][i]["filter_loss"]) for g in runs}
    assert order["1"] != order["0"]


def test_filter_quality_counts_the_harmful_flips():
    """Harmful flips = flipped pairs the initial model agrees with; recall of those among the discarded."""
    from noisepo.pipelines.filtering import filter_quality

    kept = [True, False, False, True, True]
    flipped = [True, True, False, True, False]
    agrees = [True, False, True, True, False]  # flips 0 and 3 are harmful, both kept; flip 1 (caught) is not
    quality = filter_quality(kept, flipped, agrees)
    assert quality["filter_precision"] == 0.5 and quality["filter_recall"] == pytest.approx(1 / 3)
    assert (quality["harmful_flipped"], quality["discarded_harmful_flipped"], quality["harmful_flip_recall"]) == (2, 0, 0.0)
    assert "harmful_flip_recall" not in filter_quality(kept, flipped)


def test_ropo_defaults_are_the_validated_ones_and_help_shows_them(capsys):
    """Issue 23: the misranked-only filter, replace-rejected refills and ROPO's own learning rate (1e-5, not the
    shared OptimOptions 1e-4 that sent a new user's model to 0 %), and `--help` prints ROPO's rate."""
    from noisepo.pipelines.ropo_config import DEFAULT_ROPO_LEARNING_RATE, ROPOConfig

    config = ROPOConfig(model="m", data="d", output="o")
    assert (config.filter_misranked_only, config.refill, config.refill_rule) == (True, True, "replace-rejected")
    assert config.filter_reference_weight == 1.0
    assert config.training.learning_rate == DEFAULT_ROPO_LEARNING_RATE == 1e-5
    with pytest.raises(SystemExit):
        main(["ropo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Peak learning rate (AdamW). (default: 1e-05)" in text
