import math

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
