"""The second built-in task: write a word backwards, `"rev cadbe="` -> `"ebdac"`.

Why this task beside addition: its answer is checkable by a program and a ~1M-parameter model learns
it on a CPU, but its skill (attending to positions from the far end of the input) and its typical
human mistakes share nothing with carrying digits, so a claim that holds on both tasks is not an
artefact of one.

Words are 3 to 7 letters from `a`..`h`. A word belongs to `train`, `val` or `test` by a stable hash
of the word, so the splits are disjoint by construction and independent of the seed.

Errors of the "human" data (`sft_data`):
- `random`: one letter of the answer is replaced by another (a slip);
- `systematic`: the word is copied instead of reversed (the lazy annotator);
- `mixed`: either, half and half;
- `habit`: the lazy copy is the majority on the hard problems (words of `hard_length` = 7 letters,
  one fifth of the problems): `round(habit_rate * n_hard)` of them (habit_rate 0.75) are copied;
  `round(error_rate * n_other)` of the other records get a slip. As with addition's `habit`, a model
  trained on this data prefers the wrong behaviour on the hard problems while it can still produce
  the right one.

Preference pairs (`preference_data`): chosen = the reversed word, rejected = the human's mistake on
that word (the copy on a hard word, else a slip).
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Literal

from noisepo.errors import ConfigError, InputError

ErrorKind = Literal["random", "systematic", "mixed", "habit"]
ERROR_KINDS = ("random", "systematic", "mixed", "habit")
SPLITS = ("train", "val", "test")
LETTERS = "abcdefgh"

# The last "rev word=" in a prompt: works on the raw prompt and on one rendered by a chat template.
_PROBLEM = re.compile(r"rev ([a-z]+)=")


def parse_word(prompt: str) -> str:
    """The word of the last `rev word=` in `prompt`; InputError if there is none."""
    found = _PROBLEM.findall(prompt)
    if not found:
        raise InputError(f"not a reversal prompt (no 'rev word='): {prompt[:80]!r}", field="prompt")
    return found[-1]


def letter_score(answer: str, response: str) -> float:
    """Partial credit in [0, 1]: letters equal position by position, over the longer length.

    Examples for answer "ebdac": "ebdac" -> 1, "ebdaa" -> 4/5, "ebda" -> 4/5, "cadbe" -> 1/5.
    """
    text = response.strip()
    if not text:
        return 0.0
    matches = sum(1 for x, y in zip(answer, text) if x == y)
    return matches / max(len(answer), len(text))


def slipped_letter(answer: str, rng: random.Random) -> str:
    """`answer` with one letter replaced by a different letter of the alphabet."""
    position = rng.randrange(len(answer))
    choice = rng.choice([c for c in LETTERS if c != answer[position]])
    return answer[:position] + choice + answer[position + 1:]


def _split_of(word: str, fractions: tuple[float, float, float]) -> str:
    digest = hashlib.sha256(f"reverse/{word}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, val, _ = fractions
    return "train" if u < train else "val" if u < train + val else "test"


class ReverseTask:
    """Reverse words of `min_length`..`max_length` letters from `a`..`h`."""

    name = "reverse"

    def __init__(self, min_length: int = 3, max_length: int = 7,
                 split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 hard_length: int = 7, habit_rate: float = 0.75):
        if not 2 <= min_length <= max_length <= 12:
            raise ConfigError(f"need 2 <= min_length <= max_length <= 12, got {min_length}..{max_length}",
                              key="max_length")
        if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-9:
            raise ConfigError(f"must be three shares >= 0 summing to 1, got {split_fractions}",
                              key="split_fractions")
        if not min_length <= hard_length <= max_length:
            raise ConfigError(f"must be within {min_length}..{max_length}, got {hard_length}", key="hard_length")
        if not 0 <= habit_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {habit_rate}", key="habit_rate")
        self.min_length, self.max_length = min_length, max_length
        self.split_fractions = tuple(split_fractions)
        self.hard_length = hard_length
        self.habit_rate = habit_rate

    # ------------------------------------------------------------------ problems
    def _sample_words(self, n: int, seed: int, split: str) -> list[str]:
        """`n` distinct words of `split`: lengths uniform, letters uniform, rejection on the split."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; one of {', '.join(SPLITS)}", key="split")
        share = self.split_fractions[SPLITS.index(split)]
        capacity = share * sum(len(LETTERS) ** k for k in range(self.min_length, self.max_length + 1))
        if n < 0 or n > capacity / 4:  # far below the split's size, so sampling stays fast
            raise ConfigError(f"asked for {n} words of split {split!r}; at most {int(capacity / 4)} with "
                              f"{self.min_length}..{self.max_length} letters", key="n")
        rng = random.Random(f"{seed}/{split}")
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < n:
            length = rng.randint(self.min_length, self.max_length)
            word = "".join(rng.choice(LETTERS) for _ in range(length))
            if word not in seen and _split_of(word, self.split_fractions) == split:
                seen.add(word)
                words.append(word)
        return words

    def record(self, word: str) -> dict:
        """A problem; `subset` (hard/easy, the `habit` kind's classes) lets evaluation report both."""
        return {"id": f"reverse-{word}", "prompt": f"rev {word}=", "answer": word[::-1],
                "subset": "hard" if len(word) >= self.hard_length else "easy"}

    def prompts(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` distinct words of `split`, sampled under `seed`."""
        return [self.record(w) for w in self._sample_words(n, seed, split)]

    def is_hard(self, prompt: str) -> bool:
        """Whether the word has `hard_length` letters or more (the `habit` kind's hard problems)."""
        return len(parse_word(prompt)) >= self.hard_length

    # ------------------------------------------------------------------ verifier
    def score(self, prompt: str, response: str) -> float:
        """1.0 if the response (whitespace stripped) is the reversed word, else 0.0."""
        return 1.0 if response.strip() == parse_word(prompt)[::-1] else 0.0

    def graded_score(self, prompt: str, response: str) -> float:
        """Letters right position by position, over the longer length (`letter_score`)."""
        return letter_score(parse_word(prompt)[::-1], response)

    # ------------------------------------------------------------------ "human" data
    def sft_data(self, n: int, *, seed: int = 0, error_rate: float = 0.0,
                 error_kind: ErrorKind = "random") -> list[dict]:
        """`n` SFT records from the train split with human mistakes of `error_kind` (module docstring)."""
        if not 0 <= error_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {error_rate}", key="error_rate")
        if error_kind not in ERROR_KINDS:
            raise ConfigError(f"must be one of {', '.join(ERROR_KINDS)}, got {error_kind!r}", key="error_kind")
        words = self._sample_words(n, seed, "train")
        rng = random.Random(f"{seed}/errors")
        if error_kind == "habit":
            hard = [i for i, w in enumerate(words) if len(w) >= self.hard_length]
            hard_set = set(hard)
            other = [i for i in range(n) if i not in hard_set]
            wrong = {i: "systematic" for i in rng.sample(hard, round(self.habit_rate * len(hard)))}
            wrong.update({i: "random" for i in rng.sample(other, round(error_rate * len(other)))})
        else:
            chosen = rng.sample(range(n), round(error_rate * n))
            wrong = {i: error_kind if error_kind != "mixed" else rng.choice(["random", "systematic"])
                     for i in chosen}
        records = []
        for index, word in enumerate(words):
            record = self.record(word)
            kind = wrong.get(index)
            # A palindrome's copy is right: such a record counts as correct.
            completion = (record["answer"] if kind is None else word if kind == "systematic"
                          else slipped_letter(record["answer"], rng))
            correct = completion == record["answer"]
            records.append({**record, "completion": completion, "human_correct": correct,
                            "error_kind": None if correct else kind})
        return records

    def preference_data(self, n: int, *, seed: int = 0) -> list[dict]:
        """`n` clean pairs from the train split: chosen = the reversed word, rejected = the human's
        mistake on it (the copy on a hard word, else a slip; a palindrome always gets a slip)."""
        rng = random.Random(f"{seed}/pairs")
        records = []
        for word in self._sample_words(n, seed + 7919, "train"):
            record = self.record(word)
            hard = len(word) >= self.hard_length
            rejected = word if hard and word != word[::-1] else slipped_letter(record["answer"], rng)
            records.append({"id": record["id"], "prompt": record["prompt"], "chosen": record["answer"],
                            "rejected": rejected, "answer": record["answer"], "hard": hard,
                            "label_flipped": False})
        return records
