"""The built-in verifiable task: integer addition, `"47+85="` -> `"132"`.

Why addition: the answer is checkable by a program, a ~1M-parameter model learns it in minutes on a
CPU, and a human's mistakes have a recognisable shape (a slipped digit, a dropped carry), so the
demo and the experiments can make imperfect "human" SFT data whose errors are known exactly.

Splits. Every unordered operand pair {a, b} is assigned to `train`, `val` or `test` by a stable
hash of the pair, so the splits are disjoint by construction, do not depend on the seed or on how
many problems are asked for, and `a+b` and `b+a` always fall in the same split (the test split is
not solved by commutativity alone).

Errors of the "human" data (`sft_data`):
- `random`: one digit of the sum is changed to a different digit (a slip of the pen);
- `systematic`: one carry is dropped, i.e. the column sum is written without adding the carry to
  the next column, which gives `a + b - 10**(k + 1)` where column `k` (0 = units) produced a carry;
  only problems with a carry can have this error;
- `mixed`: each erroneous record is `random` or `systematic` with probability 1/2 (`random` when
  the problem has no carry).
Exactly `round(error_rate * n)` records are wrong, chosen at random under the seed.
- `habit`: a wrong *behaviour* that is the majority on a class of problems, as a real annotator's
  blind spot would be: on the "hard" problems (units digits summing to `hard_units_sum` = 13 or
  more, 21 % of 2-digit problems) the human drops the units carry on `round(habit_rate * n_hard)`
  of them (habit_rate 0.75 by default); of the other problems `round(error_rate * n_other)` get a
  random slip. A model trained on this data answers the hard problems wrongly by preference (its
  majority mode) while it can still produce the right answer: the setting in which preference
  learning selects among behaviours the model has (experiments A and B of issue 8).

Preference pairs (`preference_data`): chosen = the right sum, rejected = the mistake a human makes
on that problem (the dropped units carry on a hard problem, else a slipped digit); `label_flipped`
false. `noisepo data corrupt` adds label noise.
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

# The last "a+b=" in a prompt: works on the raw prompt and on one rendered by a chat template.
_PROBLEM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=")
_NUMBER = re.compile(r"\d+")


def parse_problem(prompt: str) -> tuple[int, int]:
    """The operands of the last `a+b=` in `prompt`; InputError if there is none."""
    found = _PROBLEM.findall(prompt)
    if not found:
        raise InputError(f"not an addition prompt (no 'a+b='): {prompt[:80]!r}", field="prompt")
    a, b = found[-1]
    return int(a), int(b)


def exact_score(answer: str, response: str) -> float:
    """1.0 when the response, whitespace stripped, is exactly the answer's digits, else 0.0."""
    return 1.0 if response.strip() == answer else 0.0


def digit_score(answer: str, response: str) -> float:
    """Partial credit in [0, 1]: digits that match, aligned from the right, over the longer length.

    Aligning from the right compares units with units (how a sum is written); dividing by the
    longer of the two lengths is the length penalty: a missing or extra digit costs as much as a
    wrong one. A response that is not a plain digit string (after stripping whitespace) scores 0.
    Examples for answer "132": "132" -> 1, "142" -> 2/3, "32" -> 2/3, "1132" -> 3/4, "abc" -> 0.
    """
    text = response.strip()
    if not _NUMBER.fullmatch(text):
        return 0.0
    matches = sum(1 for x, y in zip(reversed(answer), reversed(text)) if x == y)
    return matches / max(len(answer), len(text))


def carry_columns(a: int, b: int) -> list[int]:
    """Columns (0 = units) whose column sum, carry in included, produces a carry out."""
    columns, carry, k = [], 0, 0
    while a or b or carry:
        total = a % 10 + b % 10 + carry
        carry = total // 10
        if carry:
            columns.append(k)
        a, b, k = a // 10, b // 10, k + 1
    return columns


def dropped_carry_sum(a: int, b: int, column: int) -> int:
    """The sum written by someone who forgets the carry out of `column` (and only that one).

    Forgetting a carry of 1 into column `column + 1` makes the rest of the column algorithm add
    up `a + b - 10**(column + 1)` (later carries are still propagated correctly).
    """
    if column not in carry_columns(a, b):
        raise ValueError(f"column {column} of {a}+{b} produces no carry")
    return a + b - 10 ** (column + 1)


def slipped_digit(answer: str, rng: random.Random) -> str:
    """`answer` with one digit changed to a different one (a leading digit never becomes 0)."""
    position = rng.randrange(len(answer))
    lowest = 1 if position == 0 and len(answer) > 1 else 0
    choices = [d for d in "0123456789"[lowest:] if d != answer[position]]
    return answer[:position] + rng.choice(choices) + answer[position + 1:]


def _split_of(a: int, b: int, digits: int, fractions: tuple[float, float, float]) -> str:
    """The split of the unordered pair {a, b}: a stable hash, the same on every machine and run."""
    low, high = min(a, b), max(a, b)
    digest = hashlib.sha256(f"addition/{digits}/{low}+{high}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, val, _ = fractions
    return "train" if u < train else "val" if u < train + val else "test"


class AdditionTask:
    """Addition of non-negative integers with up to `digits` digits each (default 2: 0..99).

    `split_fractions` are the expected shares of train, val and test problems.
    """

    name = "addition"

    def __init__(self, digits: int = 2, split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 hard_units_sum: int = 13, habit_rate: float = 0.75):
        if not 1 <= digits <= 4:
            # 4 digits is already 10^8 pairs to enumerate; larger tasks would need another sampler.
            raise ConfigError(f"must be between 1 and 4, got {digits}", key="digits")
        if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-9:
            raise ConfigError(f"must be three shares >= 0 summing to 1, got {split_fractions}",
                              key="split_fractions")
        if not 10 <= hard_units_sum <= 18:
            raise ConfigError(f"must be between 10 and 18 (a units carry), got {hard_units_sum}",
                              key="hard_units_sum")
        if not 0 <= habit_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {habit_rate}", key="habit_rate")
        self.digits = digits
        self.split_fractions = tuple(split_fractions)
        self.hard_units_sum = hard_units_sum
        self.habit_rate = habit_rate
        self._pairs: dict[str, list[tuple[int, int]]] | None = None

    # ------------------------------------------------------------------ problems
    def split_pairs(self, split: str) -> list[tuple[int, int]]:
        """Every ordered pair (a, b) of `split`, in a fixed order."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; one of {', '.join(SPLITS)}", key="split")
        if self._pairs is None:
            self._pairs = {s: [] for s in SPLITS}
            top = 10 ** self.digits
            for a in range(top):
                for b in range(top):
                    self._pairs[_split_of(a, b, self.digits, self.split_fractions)].append((a, b))
        return self._pairs[split]

    def _sample_pairs(self, n: int, seed: int, split: str) -> list[tuple[int, int]]:
        pairs = self.split_pairs(split)
        if not 0 <= n <= len(pairs):
            raise ConfigError(f"asked for {n} problems of split {split!r}, which has {len(pairs)} "
                              f"with {self.digits}-digit operands", key="n")
        # The split name is part of the seed so that the same seed gives unrelated orders per split.
        return random.Random(f"{seed}/{split}").sample(pairs, n)

    def record(self, a: int, b: int) -> dict:
        """A problem; `subset` (hard/easy, the `habit` kind's classes) lets evaluation report both."""
        return {"id": f"addition-{a}+{b}", "prompt": f"{a}+{b}=", "answer": str(a + b),
                "subset": "hard" if a % 10 + b % 10 >= self.hard_units_sum else "easy"}

    def prompts(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` distinct problems of `split`, sampled without replacement under `seed`."""
        return [self.record(a, b) for a, b in self._sample_pairs(n, seed, split)]

    # ------------------------------------------------------------------ verifier
    def score(self, prompt: str, response: str) -> float:
        """1.0 if the response (whitespace stripped) is the sum, else 0.0."""
        a, b = parse_problem(prompt)
        return exact_score(str(a + b), response)

    def graded_score(self, prompt: str, response: str) -> float:
        """Digits right, aligned from the right, over the longer length (`digit_score`)."""
        a, b = parse_problem(prompt)
        return digit_score(str(a + b), response)

    def is_hard(self, prompt: str) -> bool:
        """Whether a problem is one of the `habit` kind's hard ones (units digits sum >= hard_units_sum)."""
        a, b = parse_problem(prompt)
        return a % 10 + b % 10 >= self.hard_units_sum

    # ------------------------------------------------------------------ "human" SFT data
    def sft_data(self, n: int, *, seed: int = 0, error_rate: float = 0.0,
                 error_kind: ErrorKind = "random") -> list[dict]:
        """`n` SFT records from the train split; `round(error_rate * n)` of them have a wrong
        completion of `error_kind`. Records: id, prompt, completion, answer, human_correct,
        plus `error_kind` (None when correct)."""
        if not 0 <= error_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {error_rate}", key="error_rate")
        if error_kind not in ERROR_KINDS:
            raise ConfigError(f"must be one of {', '.join(ERROR_KINDS)}, got {error_kind!r}",
                              key="error_kind")
        pairs = self._sample_pairs(n, seed, "train")
        rng = random.Random(f"{seed}/errors")
        if error_kind == "habit":
            hard = [i for i, (a, b) in enumerate(pairs) if a % 10 + b % 10 >= self.hard_units_sum]
            hard_set = set(hard)
            other = [i for i in range(len(pairs)) if i not in hard_set]
            wrong = {i: "systematic" for i in rng.sample(hard, round(self.habit_rate * len(hard)))}
            wrong.update({i: "random" for i in rng.sample(other, round(error_rate * len(other)))})
        else:
            wrong = _choose_wrong(pairs, round(error_rate * n), error_kind, rng)
        records = []
        for index, (a, b) in enumerate(pairs):
            record = self.record(a, b)
            kind = wrong.get(index)
            if kind == "systematic" and error_kind == "habit":
                completion = str(dropped_carry_sum(a, b, 0))  # the habit: the units carry
            else:
                completion = record["answer"] if kind is None else _wrong_answer(a, b, kind, rng)
            records.append({**record, "completion": completion, "human_correct": kind is None,
                            "error_kind": kind})
        return records


    def preference_data(self, n: int, *, seed: int = 0) -> list[dict]:
        """`n` clean preference pairs from the train split: chosen = the sum, rejected = the human's
        mistake on that problem (dropped units carry on a hard problem, else a slipped digit)."""
        rng = random.Random(f"{seed}/pairs")
        records = []
        for a, b in self._sample_pairs(n, seed + 7919, "train"):  # another sample than sft_data's
            record = self.record(a, b)
            hard = a % 10 + b % 10 >= self.hard_units_sum
            rejected = str(dropped_carry_sum(a, b, 0)) if hard else slipped_digit(record["answer"], rng)
            records.append({"id": record["id"], "prompt": record["prompt"], "chosen": record["answer"],
                            "rejected": rejected, "answer": record["answer"], "hard": hard,
                            "label_flipped": False})
        return records


def _choose_wrong(pairs: list[tuple[int, int]], count: int, error_kind: str,
                  rng: random.Random) -> dict[int, str]:
    """Indices of the records to get wrong -> the kind of their error."""
    if error_kind == "random":
        return {i: "random" for i in rng.sample(range(len(pairs)), count)}
    with_carry = [i for i, (a, b) in enumerate(pairs) if carry_columns(a, b)]
    can_drop_carry = set(with_carry)
    if error_kind == "systematic":
        if count > len(with_carry):
            raise ConfigError(f"only {len(with_carry)} of {len(pairs)} problems have a carry to drop; "
                              f"a systematic error rate of at most {len(with_carry) / len(pairs):.2f} is "
                              "possible", key="error_rate")
        return {i: "systematic" for i in rng.sample(with_carry, count)}
    chosen = rng.sample(range(len(pairs)), count)
    return {i: "systematic" if i in can_drop_carry and rng.random() < 0.5 else "random" for i in chosen}


def _wrong_answer(a: int, b: int, kind: str, rng: random.Random) -> str:
    if kind == "systematic":
        return str(dropped_carry_sum(a, b, rng.choice(carry_columns(a, b))))
    return slipped_digit(str(a + b), rng)
