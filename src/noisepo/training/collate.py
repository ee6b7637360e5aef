"""Preference pairs as token lists, and the collator that batches them for one forward pass.

A tokenised pair is a dict (TRL's token columns): `prompt_ids`, `chosen_ids`, `rejected_ids`
(lists of ints), `weight` (float, default 1) and, when the reference was precomputed or given,
`reference_chosen_logps` / `reference_rejected_logps` (summed over response tokens). Extra keys
are ignored by the collator.

The collator concatenates chosen then rejected along the batch, so the policy sees every pair in
one forward pass, and pads on the right to the longest sequence of the batch only (dynamic
padding; with length-grouped sampling batches hold similar lengths and waste little).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
# Summed reference log-probs per pair; the length-averaged variants use the labels' token counts.
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


def encode_pair(tokenizer: Any, record: dict, *, max_length: int) -> dict:
    """A preference record (`prompt`, `chosen`, `rejected`, optional `weight`, reference columns)
    -> a tokenised pair, each side at most `max_length` tokens (same chat template as generation).
    Other columns (`id`, `label_flipped`, ...) are carried along; the collator ignores them."""
    from noisepo.data.chat import encode_example

    prompt_chosen, chosen = encode_example(tokenizer, record["prompt"], record["chosen"], max_length=max_length)
    prompt_rejected, rejected = encode_example(tokenizer, record["prompt"], record["rejected"],
                                               max_length=max_length)
    # Both prompts are left cuts of the same text; the shorter one fits both responses' budgets.
    prompt = min(prompt_chosen, prompt_rejected, key=len)
    room = max_length - len(prompt)
    extras = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", *REFERENCE_COLUMNS)}
    pair = {**extras, "prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room],
            "weight": float(record.get("weight", 1.0))}
    pair.update({column: float(record[column]) for column in REFERENCE_COLUMNS if record.get(column) is not None})
    return pair


def pair_columns(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """The per-pair columns of a batch, (B,) each: `weight` (default 1), and the reference columns
    when every pair has them."""
    columns = {"weight": torch.tensor([float(p.get("weight", 1.0)) for p in pairs], dtype=torch.float32)}
    for column in REFERENCE_COLUMNS:
        if all(column in p for p in pairs):
            columns[column] = torch.tensor([p[column] for p in pairs], dtype=torch.float32)
    return columns


def pair_length(pair: dict) -> int:
    """Tokens of the longer side: what the pair costs in a padded batch."""
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


@dataclass
class PreferenceCollator:
    """Tokenised pairs -> one batch: input_ids, attention_mask, labels (2B, T), weight (B,), and the
    reference columns (B,) when every pair has them. Rows 0..B-1 are chosen, B..2B-1 rejected;
    labels are -100 on prompt and padding."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [p["prompt_ids"] for p in pairs] * 2
        responses = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        return {**collate_sequences(prompts, responses, self.pad_token_id, self.pad_to_multiple_of),
                **pair_columns(pairs)}


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Rows prompt + response, right-padded to the longest: input_ids, attention_mask, labels (R, T),
    labels -100 on prompt and padding."""
    width = max(len(a) + len(b) for a, b in zip(prompts, responses, strict=True))
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, attention_mask, labels = [], [], []
    for prompt, response in zip(prompts, responses):
        pad = width - len(prompt) - len(response)
        input_ids.append(prompt + response + [pad_token_id] * pad)
        attention_mask.append([1] * (len(prompt) + len(response)) + [0] * pad)
        labels.append([IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most `width` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


@dataclass
class PackedPreferenceCollator:
    """Padding-free batches: the 2B sequences (chosen 0..B-1, rejected B..2B-1) packed into rows
    as wide as the longest one, so the model runs on real tokens, not padding.

    Returns input_ids, position_ids, labels, sequence_ids (R, T), weight (B,) (+ reference
    columns). Positions restart at 0 at each sequence; transformers (>= 5) turns that into a
    block-diagonal causal mask when no attention_mask is given (flash-attention: varlen), so
    sequences of a row never see each other. The tail of a row is one padding segment with its
    own positions, labels -100 and sequence id -1. Only for models whose attention honours packed
    position ids (all transformers-native decoders); keep `PreferenceCollator` otherwise.
    """

    pad_token_id: int

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [p["prompt_ids"] for p in pairs] * 2
        responses = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        lengths = [len(a) + len(b) for a, b in zip(prompts, responses)]
        width = max(lengths)
        input_ids, position_ids, labels, sequence_ids = [], [], [], []
        for row in pack_rows(lengths, width):
            ids, positions, row_labels, ids_of_sequence = [], [], [], []
            for i in row:
                # The first token of a sequence predicts nothing from the previous sequence of the row.
                first = [IGNORE_INDEX] if not prompts[i] else []
                ids += prompts[i] + responses[i]
                positions += range(lengths[i])
                row_labels += [IGNORE_INDEX] * len(prompts[i]) + first + responses[i][len(first):]
                ids_of_sequence += [i] * lengths[i]
            pad = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            position_ids.append(positions + list(range(pad)))
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            sequence_ids.append(ids_of_sequence + [-1] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "sequence_ids": torch.tensor(sequence_ids, dtype=torch.long),
            **pair_columns(pairs),
        }
        return batch
