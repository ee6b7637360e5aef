"""Config of `noisepo data make` (torch-free: the CLI imports it for `--help`)."""
from __future__ import annotations

from dataclasses import dataclass

from noisepo.config import option
from noisepo.errors import ConfigError


@dataclass
class MakeDataConfig:
    """Write a task's imperfect "human" SFT data, its train prompts and the val and test prompts."""

    output: str = option("", "Output folder: sft.jsonl, prompts.jsonl (train prompts), val.jsonl, "
                             "test.jsonl, manifest.json.")
    task: str = option("addition", "A built-in task (addition) or the import path of one (mypkg.mod:Task).")
    n_train: int = option(5000, "SFT records (train split); prompts.jsonl holds the same prompts.")
    n_val: int = option(200, "Validation prompts (with answers).")
    n_test: int = option(500, "Test prompts (with answers).")
    error_rate: float = option(0.1, "Fraction of SFT records whose human completion is wrong.")
    error_kind: str = option(
        "mixed", "Kind of human mistake, defined by the task. addition: random (one digit slipped), "
                 "systematic (one carry dropped), mixed (either), habit (the units carry dropped on "
                 "most hard problems, slips at --error-rate elsewhere); reverse: the same with a "
                 "slipped letter and a copied word.")
    n_pairs: int = option(0, "Clean preference pairs to write to preferences.jsonl (chosen = the right "
                             "answer, rejected = a human mistake), for tasks with preference_data.")
    digits: int | None = option(None, "Operand digits of the addition task (default 2); passed to a "
                                      "plugin task as digits= when set.")
    seed: int = option(0, "Seed of the sampling of problems and errors.")

    def __post_init__(self):
        if not self.output:
            raise ConfigError("is required (an output folder)", key="output")
        for key in ("n_train", "n_val", "n_test", "n_pairs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", key=key)
        if not 0 <= self.error_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.error_rate}", key="error_rate")
        if self.digits is not None and self.digits < 1:
            raise ConfigError(f"must be >= 1, got {self.digits}", key="digits")
