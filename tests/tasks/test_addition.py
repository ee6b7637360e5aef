"""The built-in addition task: verifier, splits, imperfect human data, determinism."""
from __future__ import annotations

import pytest

from noisepo.errors import ConfigError, InputError
from noisepo.tasks.addition import (
    AdditionTask,
    carry_columns,
    digit_score,
    dropped_carry_sum,
    parse_problem,
    slipped_digit,
)


@pytest.fixture(scope="module")
def task():
    return AdditionTask()


# --------------------------------------------------------------------------- verifier
@pytest.mark.parametrize("response, expected", [
    ("132", 1.0), (" 132\n", 1.0), ("\t132 ", 1.0),
    ("131", 0.0), ("1320", 0.0), ("13 2", 0.0), ("", 0.0), ("abc", 0.0), ("132.0", 0.0), ("+132", 0.0),
])
def test_exact_score(task, response, expected):
    assert task.score("47+85=", response) == expected


@pytest.mark.parametrize("response, expected", [
    ("132", 1.0), (" 132 ", 1.0), ("142", 2 / 3), ("32", 2 / 3), ("1132", 3 / 4), ("999", 0.0),
    ("abc", 0.0), ("", 0.0), ("13a", 0.0), ("-132", 0.0),
])
def test_graded_score(task, response, expected):
    assert task.graded_score("47+85=", response) == pytest.approx(expected)


def test_graded_score_is_one_only_when_exact(task):
    for response in ("132", "133", "32", "0132", "1"):
        assert (task.graded_score("47+85=", response) == 1.0) == (task.score("47+85=", response) == 1.0)
        assert 0.0 <= task.graded_score("47+85=", response) <= 1.0


def test_verifier_reads_a_rendered_prompt(task):
    assert task.score("<|user|>\nWhat is 3+4=\n<|assistant|>\n", "7") == 1.0
    assert parse_problem("1+2= then 47+85=") == (47, 85)  # the last problem counts


def test_verifier_rejects_a_prompt_without_a_problem(task):
    with pytest.raises(InputError, match="not an addition prompt"):
        task.score("hello", "3")


def test_digit_score_penalises_length():
    assert digit_score("5", "05") == 0.5
    assert digit_score("100", "10") == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- splits
def test_splits_are_disjoint_and_cover_every_pair(task):
    splits = {s: set(task.split_pairs(s)) for s in ("train", "val", "test")}
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    assert sum(len(p) for p in splits.values()) == 100 * 100
    assert 0.7 < len(splits["train"]) / 10000 < 0.9
    # a+b and b+a share a split, so the test is not solved by commutativity
    for a, b in splits["test"]:
        assert (b, a) in splits["test"]


def test_prompts_sample_without_replacement_from_the_split(task):
    records = task.prompts(300, seed=3, split="test")
    assert len({r["id"] for r in records}) == 300
    test_pairs = set(task.split_pairs("test"))
    for r in records:
        a, b = parse_problem(r["prompt"])
        assert (a, b) in test_pairs and r["answer"] == str(a + b) and r["prompt"] == f"{a}+{b}="
    train_prompts = {r["prompt"] for r in task.prompts(2000, seed=3, split="train")}
    assert not train_prompts & {r["prompt"] for r in records}


def test_too_many_prompts_is_a_config_error(task):
    with pytest.raises(ConfigError, match="has 1"):
        task.prompts(5000, split="test")
    with pytest.raises(ConfigError, match="unknown split"):
        task.prompts(1, split="dev")


def test_digits_option():
    task = AdditionTask(digits=3)
    for r in task.prompts(50, seed=0):
        a, b = parse_problem(r["prompt"])
        assert 0 <= a < 1000 and 0 <= b < 1000
    with pytest.raises(ConfigError) as info:
        AdditionTask(digits=0)
    assert info.value.key == "digits"


# --------------------------------------------------------------------------- human SFT data
def test_dropped_carry_arithmetic():
    assert carry_columns(47, 85) == [0, 1]  # 7+5=12, 4+8+1=13
    assert dropped_carry_sum(47, 85, 0) == 122  # forgot the units' carry: 4+8=12 -> "122"
    assert dropped_carry_sum(47, 85, 1) == 32  # forgot the final carry: the leading 1 is missing
    assert dropped_carry_sum(95, 5, 0) == 90  # 9+0 (no carry in) = 9, no carry out
    assert carry_columns(12, 34) == []
    with pytest.raises(ValueError):
        dropped_carry_sum(12, 34, 0)


def column_sum_without_carry(a: int, b: int, dropped: int) -> int:
    """Long addition written out digit by digit, forgetting the carry out of column `dropped`."""
    digits, carry, k = [], 0, 0
    while a or b or carry:
        total = a % 10 + b % 10 + carry
        carry = 0 if k == dropped else total // 10
        digits.append(total % 10)
        a, b, k = a // 10, b // 10, k + 1
    return int("".join(map(str, reversed(digits))) or "0")


@pytest.mark.parametrize("a, b", [(47, 85), (95, 5), (99, 99), (58, 67), (9, 1)])
def test_dropped_carry_matches_long_addition(a, b):
    for column in carry_columns(a, b):
        assert dropped_carry_sum(a, b, column) == column_sum_without_carry(a, b, column)


def test_slipped_digit_changes_exactly_one_digit():
    import random

    rng = random.Random(0)
    for answer in ("132", "7", "10", "198"):
        for _ in range(20):
            wrong = slipped_digit(answer, rng)
            assert len(wrong) == len(answer) and sum(x != y for x, y in zip(wrong, answer)) == 1
            assert len(wrong) == 1 or wrong[0] != "0"


@pytest.mark.parametrize("kind", ["random", "systematic", "mixed"])
def test_sft_error_rate_and_kind(task, kind):
    records = task.sft_data(400, seed=1, error_rate=0.2, error_kind=kind)
    wrong = [r for r in records if not r["human_correct"]]
    assert len(wrong) == 80
    for r in records:
        assert set(r) >= {"id", "prompt", "completion", "answer", "human_correct"}
        assert (r["completion"] == r["answer"]) == r["human_correct"]
        assert task.score(r["prompt"], r["completion"]) == float(r["human_correct"])
    train_pairs = set(task.split_pairs("train"))
    assert all(parse_problem(r["prompt"]) in train_pairs for r in records)
    kinds = {r["error_kind"] for r in wrong}
    assert kinds == ({"random", "systematic"} if kind == "mixed" else {kind})
    for r in wrong:
        a, b = parse_problem(r["prompt"])
        if r["error_kind"] == "systematic":  # really a dropped carry
            assert int(r["completion"]) in {dropped_carry_sum(a, b, k) for k in carry_columns(a, b)}
        else:
            assert sum(x != y for x, y in zip(r["completion"], r["answer"])) == 1


def test_systematic_rate_beyond_the_carries_is_a_config_error(task):
    with pytest.raises(ConfigError) as info:
        task.sft_data(100, error_rate=0.95, error_kind="systematic")
    assert info.value.key == "error_rate"


def test_clean_data_and_determinism(task):
    assert all(r["human_correct"] for r in task.sft_data(100, seed=0, error_rate=0.0))
    assert task.sft_data(100, seed=5, error_rate=0.3, error_kind="mixed") == \
        AdditionTask().sft_data(100, seed=5, error_rate=0.3, error_kind="mixed")
    assert task.prompts(50, seed=5, split="val") == AdditionTask().prompts(50, seed=5, split="val")
    assert task.prompts(50, seed=5) != task.prompts(50, seed=6)


# --------------------------------------------------------------------------- the `habit` kind and pairs
def test_habit_drops_the_units_carry_on_most_hard_problems_and_slips_elsewhere(task):
    records = task.sft_data(2000, seed=3, error_rate=0.1, error_kind="habit")
    hard = [r for r in records if task.is_hard(r["prompt"])]
    easy = [r for r in records if not task.is_hard(r["prompt"])]
    assert 0.15 < len(hard) / len(records) < 0.27  # 21 % of 2-digit problems have units sum >= 13
    wrong_hard = [r for r in hard if not r["human_correct"]]
    assert len(wrong_hard) == round(0.75 * len(hard))
    for r in wrong_hard:  # exactly the dropped units carry: 10 less than the sum
        assert int(r["completion"]) == int(r["answer"]) - 10 and r["error_kind"] == "systematic"
    wrong_easy = [r for r in easy if not r["human_correct"]]
    assert len(wrong_easy) == round(0.1 * len(easy))
    assert all(r["error_kind"] == "random" and len(r["completion"]) == len(r["answer"]) for r in wrong_easy)
    assert {r["subset"] for r in hard} == {"hard"} and {r["subset"] for r in easy} == {"easy"}


def test_habit_options_are_checked():
    with pytest.raises(ConfigError, match="hard_units_sum"):
        AdditionTask(hard_units_sum=9)
    with pytest.raises(ConfigError, match="habit_rate"):
        AdditionTask(habit_rate=1.5)
    assert all(r["human_correct"] for r in AdditionTask(habit_rate=0.0).sft_data(300, error_kind="habit"))


def test_preference_pairs_pit_the_sum_against_the_human_mistake(task):
    pairs = task.preference_data(500, seed=2)
    assert len({p["prompt"] for p in pairs}) == 500 and pairs == task.preference_data(500, seed=2)
    for p in pairs:
        assert task.score(p["prompt"], p["chosen"]) == 1.0 and task.score(p["prompt"], p["rejected"]) == 0.0
        assert p["hard"] == task.is_hard(p["prompt"]) and p["label_flipped"] is False
        if p["hard"]:
            assert int(p["rejected"]) == int(p["chosen"]) - 10
