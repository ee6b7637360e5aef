"""The second built-in task, word reversal: verifier, splits, human habits, pairs, the plug-in path."""
from __future__ import annotations

import pytest

from noisepo.errors import ConfigError, InputError
from noisepo.tasks import load_task
from noisepo.tasks.reverse import ReverseTask, letter_score, parse_word


@pytest.fixture(scope="module")
def task():
    return ReverseTask()


@pytest.mark.parametrize("response, expected", [("ebdac", 1.0), (" ebdac\n", 1.0), ("cadbe", 0.0), ("ebda", 0.0),
                                                ("", 0.0)])
def test_exact_score(task, response, expected):
    assert task.score("rev cadbe=", response) == expected


@pytest.mark.parametrize("response, expected", [("ebdac", 1.0), ("ebdaa", 0.8), ("ebda", 0.8), ("cadbe", 0.2),
                                                ("ebdacx", 5 / 6), ("", 0.0)])
def test_letter_score(response, expected):
    assert letter_score("ebdac", response) == pytest.approx(expected)


def test_parse_word_reads_the_last_problem_and_rejects_others():
    assert parse_word("User: rev abc=\nAssistant: rev hgf=") == "hgf"
    with pytest.raises(InputError, match="not a reversal prompt"):
        parse_word("12+3=")


def test_splits_are_disjoint_deterministic_and_sized(task):
    splits = {s: task.prompts(300, seed=1, split=s) for s in ("train", "val", "test")}
    words = {s: {r["prompt"] for r in records} for s, records in splits.items()}
    assert all(len(w) == 300 for w in words.values())
    assert not (words["train"] & words["val"]) and not (words["train"] & words["test"]) and not (words["val"] & words["test"])
    assert splits["test"] == ReverseTask().prompts(300, seed=1, split="test")
    assert {3, 7} <= {len(parse_word(r["prompt"])) for r in splits["test"]} <= set(range(3, 8))
    for r in splits["test"]:
        assert task.score(r["prompt"], r["answer"]) == 1.0
        assert r["subset"] == ("hard" if len(parse_word(r["prompt"])) == 7 else "easy")


def test_too_many_prompts_is_a_config_error(task):
    with pytest.raises(ConfigError, match="at most"):
        ReverseTask(min_length=2, max_length=2, hard_length=2).prompts(100, split="test")


@pytest.mark.parametrize("kind", ["random", "systematic", "mixed"])
def test_sft_errors_of_each_kind(task, kind):
    records = task.sft_data(400, seed=1, error_rate=0.2, error_kind=kind)
    wrong = [r for r in records if not r["human_correct"]]
    assert 70 <= len(wrong) <= 80  # 80 chosen; a copied palindrome is right after all
    for r in wrong:
        assert task.score(r["prompt"], r["completion"]) == 0.0
        if r["error_kind"] == "systematic":
            assert r["completion"] == parse_word(r["prompt"])
    assert {r["error_kind"] for r in wrong} == ({"random", "systematic"} if kind == "mixed" else {kind})


def test_habit_copies_most_hard_words(task):
    records = task.sft_data(2000, seed=0, error_rate=0.05, error_kind="habit")
    hard = [r for r in records if r["subset"] == "hard"]
    copied = [r for r in hard if r["completion"] == parse_word(r["prompt"]) and not r["human_correct"]]
    assert 0.7 * len(hard) <= len(copied) <= 0.76 * len(hard)
    easy_wrong = [r for r in records if r["subset"] == "easy" and not r["human_correct"]]
    assert all(r["error_kind"] == "random" for r in easy_wrong)
    assert 0.04 * (len(records) - len(hard)) <= len(easy_wrong) <= 0.06 * (len(records) - len(hard))


def test_preference_pairs(task):
    pairs = task.preference_data(300, seed=4)
    for p in pairs:
        assert task.score(p["prompt"], p["chosen"]) == 1.0 and task.score(p["prompt"], p["rejected"]) == 0.0
        if p["hard"] and p["chosen"] != p["chosen"][::-1]:
            assert p["rejected"] == parse_word(p["prompt"])


def test_loads_by_name_and_by_import_path():
    assert isinstance(load_task("reverse"), ReverseTask)
    assert isinstance(load_task("noisepo.tasks.reverse:ReverseTask", hard_length=6), ReverseTask)
