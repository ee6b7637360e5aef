"""Label noise for experiments (METHODS §6): flip preference pairs and record which.

`corrupt(records, eta=, kind=, seed=)` returns new records (the input is not changed):

- `symmetric`: each pair is swapped independently with probability η (`random.Random(seed)`, one
  draw per pair in order, so the same seed and data flip the same pairs).
- `longer-wins`: a "practical" noise rule, the bias of a judge that prefers length. Each pair is
  selected independently with probability η (one draw per pair, as above), and in a selected pair
  the longer response (in characters of `response_text`) becomes `chosen`: the pair is swapped when
  its chosen response is strictly shorter. So η = 1 applies the rule to every pair, and the
  realised flip rate is η times the share of pairs whose chosen response is the shorter one.
- `flagged`: noise that follows the content, as an annotator's blind spot does: only the pairs whose
  boolean `column` (default `hard`, which the built-in tasks' `preference_data` writes) is true are
  selected, each with probability η (one draw per pair, as above). A pair without the column is a
  ConfigError naming it.

Swapping exchanges `chosen` and `rejected` and every per-response column that comes in a pair
(`score_chosen`/`score_rejected`, `chosen_rating`/`rejected_rating`, ...), so scores stay with their
responses. Every output pair gets `label_flipped`: true when its orientation now differs from the
true labels. An input that already carries `label_flipped` (relative to its own true labels) is
composed with XOR (flipped twice is back to true), so the column always answers "is this pair's
label wrong?", which is what the filter is scored against.
"""
from __future__ import annotations

import random
from collections.abc import Iterable

from noisepo.data.chat import response_text
from noisepo.data.config import NOISE_KINDS, CorruptConfig, check_eta
from noisepo.errors import ConfigError


def swap_pair(record: dict) -> dict:
    """A copy of `record` with chosen/rejected swapped, and their paired columns with them."""
    out = dict(record)
    for key in record:
        for a, b in (("chosen", "rejected"), ("rejected", "chosen")):
            if a in key:
                partner = key.replace(a, b)
                if partner in record and partner != key:
                    out[partner] = record[key]
    return out


def chosen_is_shorter(record: dict) -> bool:
    return len(response_text(record["chosen"])) < len(response_text(record["rejected"]))


def corrupt(records: Iterable[dict], *, eta: float, kind: str = "symmetric", seed: int = 0,
            column: str = "hard") -> list[dict]:
    """Flip pairs by `kind` at rate `eta` (module docstring); every output has `label_flipped`."""
    check_eta(eta)
    if kind not in NOISE_KINDS:
        raise ConfigError(f"must be one of {', '.join(NOISE_KINDS)}; got {kind!r}", key="kind")
    rng = random.Random(seed)
    out = []
    for index, record in enumerate(records):
        selected = rng.random() < eta  # drawn for every pair, so flips depend only on seed and order
        if kind == "flagged" and column not in record:
            raise ConfigError(f"pair {index + 1} has no {column!r} column, which the flagged rule reads",
                              key="column")
        rule = {"symmetric": True, "longer-wins": kind == "longer-wins" and chosen_is_shorter(record),
                "flagged": kind == "flagged" and bool(record.get(column))}[kind]
        flip = selected and rule
        new = swap_pair(record) if flip else dict(record)
        new["label_flipped"] = bool(record.get("label_flipped", False)) != flip
        out.append(new)
    return out


def run_corrupt(config: CorruptConfig) -> int:
    """`noisepo data corrupt`: load and check pairs, corrupt them, write JSONL, print one line."""
    from noisepo.data.loading import load_preferences
    from noisepo.io import write_jsonl_atomic

    loaded = load_preferences(config.input, skip_invalid=config.skip_invalid)
    before = sum(bool(r.get("label_flipped", False)) for r in loaded.records)
    corrupted = corrupt(loaded.records, eta=config.eta, kind=config.kind, seed=config.seed,
                        column=config.column)
    write_jsonl_atomic(config.output, corrupted)
    after = sum(r["label_flipped"] for r in corrupted)
    flipped_now = sum(bool(r.get("label_flipped", False)) != c["label_flipped"]
                      for r, c in zip(loaded.records, corrupted))
    skipped = f", {loaded.skipped} invalid skipped" if loaded.skipped else ""
    print(f"corrupt ({config.kind}, eta={config.eta}, seed={config.seed}): {len(corrupted)} pairs, "
          f"{flipped_now} flipped now, {after} label_flipped in all (was {before}){skipped} -> {config.output}")
    return 0
