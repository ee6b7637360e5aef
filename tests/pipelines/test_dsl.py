import math

import pytest

from noisepo.pipelines.dsl import label_pairs, win_rate


def _records():
    return [
        {"id": 0, "prompt": "1+1=", "completion": "2", "response": "3", "answer": "2"},
        {"id": 1, "prompt": "2+2=", "completion": "5", "response": "4", "answer": "4"},  # model better
        {"id": 2, "prompt": "3+3=", "completion": "6", "response": "6", "answer": "6"},  # identical
        {"id": 3, "prompt": "4+4=", "completion": "9", "response": "7", "answer": "8"},  # tie (both wrong)
        {"id": 4, "prompt": "5+5=", "completion": "11", "response": "10", "answer": "10"},  # failure
    ]


def test_spin_labels_keep_human_chosen_and_drop_identical():
    pairs, stats = label_pairs(_records())
    assert [p["id"] for p in pairs] == [0, 1, 3, 4]
    assert all(p["chosen"] == r["completion"] for p, r in zip(pairs, [_records()[i] for i in (0, 1, 3, 4)]))
    assert stats.identical == 1 and stats.flipped == 0 and stats.trainable == 4
    assert pairs[0]["answer"] == "2"  # extra columns carried


def test_dsl_flips_strictly_better_model_responses_only():
    human = [1.0, 0.0, 1.0, 0.0, None]
    model = [0.0, 1.0, 1.0, 0.0, 1.0]
    pairs, stats = label_pairs(_records(), human_scores=human, model_scores=model)
    by_id = {p["id"]: p for p in pairs}
    assert by_id[1]["chosen"] == "4" and by_id[1]["rejected"] == "5" and by_id[1]["flipped"]
    assert by_id[3]["chosen"] == "9" and not by_id[3]["flipped"]  # tie keeps the human response
    assert by_id[4]["chosen"] == "11" and not by_id[4]["flipped"]  # failure keeps the default labels
    assert (stats.flipped, stats.ties, stats.scorer_failures, stats.identical) == (1, 2, 1, 1)
    assert math.isclose(stats.mean_human_score, 0.5) and math.isclose(stats.mean_model_score, 0.5)


def test_nan_score_counts_as_failure():
    pairs, stats = label_pairs(_records()[:2], human_scores=[float("nan"), 0.0], model_scores=[1.0, 1.0])
    assert stats.scorer_failures == 1 and stats.flipped == 1


def test_win_rate_counts_ties_half_and_skips_failures():
    result = win_rate([1, 0, 1, None], [0, 0, 2, 1])
    assert result == {"win_rate": 0.5, "wins": 1, "ties": 1, "losses": 1, "failures": 1}


def test_pairwise_labels_flip_only_on_a_win_in_both_orders():
    # human_wins_as_a: P(human beats model), human shown as A; model_wins_as_a: the swapped order
    human_as_a = [0.0, 1.0, 1.0, 0.0, None]
    model_as_a = [1.0, 0.0, 1.0, 0.0, 1.0]
    pairs, stats = label_pairs(_records(), human_wins_as_a=human_as_a, model_wins_as_a=model_as_a)
    by_id = {p["id"]: p for p in pairs}
    assert by_id[0]["flipped"] and by_id[0]["chosen"] == "3" and by_id[0]["verdict"] == "model"
    assert not by_id[1]["flipped"] and by_id[1]["verdict"] == "human"
    assert by_id[3]["verdict"] == "tie" and by_id[3]["chosen"] == "9"  # "B" twice: the orders disagree
    assert by_id[4]["verdict"] is None and by_id[4]["chosen"] == "11"  # a failed order: default labels
    # id 2 is identical (dropped) but still judged: "A" twice, a tie
    assert (stats.flipped, stats.ties, stats.scorer_failures, stats.identical) == (1, 2, 1, 1)
    assert stats.mean_human_score is None and by_id[0]["human_score"] is None
    assert by_id[0]["human_wins_as_a"] == 0.0 and by_id[0]["model_wins_as_a"] == 1.0


def test_pairwise_and_pointwise_judgements_do_not_mix():
    with pytest.raises(ValueError):
        label_pairs(_records(), human_scores=[1.0] * 5, model_wins_as_a=[1.0] * 5)
    with pytest.raises(ValueError):
        label_pairs(_records(), human_wins_as_a=[1.0] * 5)


DNPO = ["dnpo", "--model", "micro", "--data", "sft.jsonl"]


def test_dsl_mode_is_a_flag_with_its_choices_and_help(capsys):
    from noisepo.cli import main

    with pytest.raises(SystemExit):
        main(["dnpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dsl.mode {pointwise,pairwise}" in text and "asked in both orders" in text
    assert "--dsl.pairwise-model" in text


def test_an_unknown_dsl_mode_exits_2_naming_the_option_and_the_choices(tmp_path, capsys):
    from noisepo.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main([*DNPO, "--output", str(out), "--dsl.mode", "listwise"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--dsl.mode" in err and "'listwise'" in err and "pointwise" in err and "pairwise" in err
    config = tmp_path / "dnpo.yaml"
    config.write_text(f"model: micro\ndata: sft.jsonl\noutput: {out}\ndsl: {{mode: listwise}}\n")
    assert main(["dnpo", "--config", str(config)]) == 2
    assert "'dsl.mode': must be one of pointwise, pairwise; got 'listwise'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("options, key, message", [
    (["--dsl.mode", "pairwise", "--dsl.scorer", "verifier", "--dsl.verifier", "addition"], "dsl.scorer",
     "verifier cannot compare two responses; with mode pairwise use one of openai, local-lm, pairwise-rm"),
    (["--dsl.mode", "pairwise", "--dsl.scorer", "pairwise-rm"], "dsl.pairwise_model", "is required"),
    (["--dsl.scorer", "pairwise-rm", "--dsl.pairwise-model", "m:x"], "dsl.scorer", "use it with mode pairwise"),
    (["--no-dsl.enabled", "--win-rate", "--dsl.mode", "pairwise", "--dsl.scorer", "reward-model",
      "--dsl.model", "rm"], "dsl.scorer", "reward-model cannot compare two responses"),
])
def test_a_scorer_that_cannot_judge_in_the_mode_exits_2(options, key, message, tmp_path, capsys):
    from noisepo.cli import main

    out = tmp_path / "run"
    assert main([*DNPO, "--output", str(out), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"'{key}'" in err and message in err, err
    assert not out.exists()
