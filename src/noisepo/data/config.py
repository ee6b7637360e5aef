"""Config of `noisepo data corrupt` (label noise for experiments, METHODS §6).

Torch- and datasets-free on purpose: `noisepo --help` imports every config module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from noisepo.config import option
from noisepo.errors import ConfigError

NoiseKind = Literal["symmetric", "longer-wins", "flagged"]
NOISE_KINDS: tuple[str, ...] = ("symmetric", "longer-wins", "flagged")


def check_eta(eta: float) -> None:
    """η is a probability (symmetric) or a fraction of pairs (longer-wins): it must lie in [0, 1]."""
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ConfigError(f"must be in [0, 1], got {eta}", key="eta")


@dataclass
class CorruptConfig:
    """`noisepo data corrupt IN OUT`: flip preference labels and record `label_flipped`."""

    input: str = option(help="Preference pairs to corrupt: .jsonl, .json, .parquet, a datasets "
                             "save_to_disk folder, or a hub dataset name.", positional=True)
    output: str = option(help="Output JSONL (written atomically); every pair gets label_flipped.",
                         positional=True)
    eta: float = option(0.2, "Noise rate in [0, 1]. symmetric: the probability each pair is swapped; "
                             "longer-wins: the fraction of pairs the rule is applied to.")
    kind: NoiseKind = option("symmetric", "symmetric: swap chosen/rejected independently with "
                                          "probability eta; longer-wins: on a fraction eta of pairs, "
                                          "make the longer response the chosen one; flagged: swap with "
                                          "probability eta only the pairs whose --column is true (an "
                                          "annotator whose mistakes follow the task's hard problems).")
    column: str = option("hard", "flagged: the boolean column that marks the pairs the rule may flip.")
    seed: int = option(0, "Random seed (the same seed flips the same pairs).")
    skip_invalid: bool = option(False, "Skip invalid rows (counted and reported) instead of stopping.")

    def __post_init__(self):
        if not self.input:
            raise ConfigError("is required (a preference data file, folder or hub name)", key="input")
        if not self.output:
            raise ConfigError("is required (an output .jsonl file)", key="output")
        check_eta(self.eta)
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"must be one of {', '.join(NOISE_KINDS)}; got {self.kind!r}", key="kind")
