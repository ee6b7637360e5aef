"""Label noise (METHODS §6): rates, determinism, label_flipped on every pair, XOR, longer-wins."""
from __future__ import annotations

import pytest

from noisepo.config import from_dict
from noisepo.data.config import CorruptConfig
from noisepo.data.noise import corrupt, swap_pair
from noisepo.errors import ConfigError


def pairs(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"{i}?", "chosen": f"good {i}", "rejected": f"bad {i}",
             "score_chosen": 1.0, "score_rejected": 0.0} for i in range(n)]


def is_swapped(original: dict, out: dict) -> bool:
    return out["chosen"] == original["rejected"]


def test_symmetric_rate_is_close_to_eta_and_recorded():
    data = pairs(2000)
    out = corrupt(data, eta=0.2, kind="symmetric", seed=0)
    assert all(isinstance(r["label_flipped"], bool) for r in out)
    flipped = sum(r["label_flipped"] for r in out)
    assert 0.17 < flipped / 2000 < 0.23  # ±3.4 standard deviations of Binomial(2000, 0.2)
    assert all(r["label_flipped"] == is_swapped(d, r) for d, r in zip(data, out))
    assert data == pairs(2000)  # the input is not changed


def test_same_seed_same_flips_other_seed_other_flips():
    data = pairs(200)
    first = corrupt(data, eta=0.3, seed=7)
    assert first == corrupt(data, eta=0.3, seed=7)
    assert first != corrupt(data, eta=0.3, seed=8)


def test_eta_limits():
    data = pairs(50)
    assert not any(r["label_flipped"] for r in corrupt(data, eta=0.0, seed=0))
    assert all(r["label_flipped"] for r in corrupt(data, eta=1.0, seed=0))
    with pytest.raises(ConfigError) as info:
        corrupt(data, eta=1.5, seed=0)
    assert info.value.key == "eta"


def test_swap_moves_paired_columns_with_the_responses():
    record = pairs(1)[0]
    swapped = swap_pair(record)
    assert (swapped["chosen"], swapped["rejected"]) == ("bad 0", "good 0")
    assert (swapped["score_chosen"], swapped["score_rejected"]) == (0.0, 1.0)
    assert swapped["prompt"] == record["prompt"] and swapped["id"] == 0


def test_existing_label_flipped_composes_with_xor():
    data = [{**r, "label_flipped": i % 2 == 0} for i, r in enumerate(pairs(400))]
    out = corrupt(data, eta=0.5, seed=1)
    for before, after in zip(data, out):
        assert after["label_flipped"] == (before["label_flipped"] != is_swapped(before, after))
    # flipping everything twice restores the true labels
    twice = corrupt(corrupt(pairs(30), eta=1.0, seed=0), eta=1.0, seed=0)
    assert twice == [{**r, "label_flipped": False} for r in pairs(30)]


def test_longer_wins_makes_the_longer_response_chosen():
    data = [{"prompt": "p", "chosen": "short", "rejected": "much longer"},
            {"prompt": "p", "chosen": "much longer", "rejected": "short"},
            {"prompt": "p", "chosen": "same", "rejected": "size"},
            {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "abc"}]}]
    out = corrupt(data, eta=1.0, kind="longer-wins", seed=0)
    assert [r["label_flipped"] for r in out] == [True, False, False, True]
    assert out[0]["chosen"] == "much longer" and out[3]["chosen"][0]["content"] == "abc"


def test_longer_wins_eta_is_the_fraction_of_pairs_the_rule_applies_to():
    data = [{"prompt": "p", "chosen": "s", "rejected": "long"} for _ in range(2000)]
    rate = sum(r["label_flipped"] for r in corrupt(data, eta=0.3, kind="longer-wins", seed=0)) / 2000
    assert 0.27 < rate < 0.33


def test_corrupt_config_validates_eta_and_kind():
    config = from_dict(CorruptConfig, {"input": "a.jsonl", "output": "b.jsonl", "eta": 0.1})
    assert (config.kind, config.seed, config.skip_invalid) == ("symmetric", 0, False)
    for bad, key in (({"eta": -0.1}, "eta"), ({"eta": 2}, "eta"), ({"kind": "random"}, "kind")):
        with pytest.raises(ConfigError) as info:
            from_dict(CorruptConfig, {"input": "a.jsonl", "output": "b.jsonl", **bad})
        assert info.value.key == key


def test_flagged_flips_only_the_flagged_pairs():
    records = [{"prompt": str(i), "chosen": "a", "rejected": "b", "hard": i % 3 == 0} for i in range(3000)]
    out = corrupt(records, eta=0.5, kind="flagged", seed=1)
    flipped = [r for r in out if r["label_flipped"]]
    assert all(r["hard"] and r["chosen"] == "b" for r in flipped)
    assert 400 < len(flipped) < 600  # half of the 1000 flagged pairs
    with pytest.raises(ConfigError, match="'hard'"):
        corrupt([{"prompt": "p", "chosen": "a", "rejected": "b"}], eta=0.5, kind="flagged")
