import math

import pytest

from noisepo.pipelines.filtering import best_worst_pair, filter_quality, kept_count, select_kept


@pytest.mark.parametrize("n, rho, expected", [(10, 0.2, 8), (7, 0.2, 6), (1, 0.9, 1), (0, 0.2, 0), (5, 0.0, 5)])
def test_kept_count(n, rho, expected):
    assert kept_count(n, rho) == expected


def test_select_kept_keeps_exactly_the_lowest_losses():
    losses = [0.5, 3.0, 0.1, 2.0, 0.2, float("nan"), 0.3, 0.4, 0.6, 0.7]
    keep = select_kept(losses, 0.2)
    assert sum(keep) == 8
    assert not keep[1] and not keep[5]  # the largest loss and the NaN go


def test_ties_break_by_index():
    assert select_kept([1.0, 1.0, 1.0, 1.0], 0.5) == [True, True, False, False]


def test_filter_quality():
    kept = [True, False, False, True, False]
    flipped = [False, True, False, True, True]
    q = filter_quality(kept, flipped)
    assert q["discarded"] == 3 and q["discarded_flipped"] == 2
    assert math.isclose(q["filter_precision"], 2 / 3) and math.isclose(q["filter_recall"], 2 / 3)
    assert filter_quality([True], [False])["filter_precision"] is None


def test_best_worst_pair():
    assert best_worst_pair(["a", "b", "c"], [0.1, 0.9, -1.0]) == (1, 2)
    assert best_worst_pair(["a", "a"], [1.0, 0.0]) is None  # identical texts are skipped
    assert best_worst_pair(["a", "b", "c"], [1.0, 1.0, 0.0]) == (0, 2)  # ties go to the earlier one
