"""The generation contract: `GenerationParams` and the `Generator` protocol.

Torch-free, so configs and the CLI can import it. Prompt texts given to a generator are already
rendered by `noisepo.data.chat.render_prompt` (the same template as training, METHODS §3).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from noisepo.errors import ConfigError


@dataclass(frozen=True)
class GenerationParams:
    """How to decode. `temperature == 0` means greedy (the SPIN/DNPO default, METHODS §3)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"must be >= 1, got {self.max_new_tokens}", key="max_new_tokens")
        if self.temperature < 0:
            raise ConfigError(f"must be >= 0 (0 = greedy), got {self.temperature}", key="temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.top_p}", key="top_p")
        if self.num_samples < 1:
            raise ConfigError(f"must be >= 1, got {self.num_samples}", key="num_samples")
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings must be non-empty", key="stop")
        # A list field in a frozen dataclass: keep our own copy so callers cannot mutate it under us.
        object.__setattr__(self, "stop", list(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@runtime_checkable
class Generator(Protocol):
    """Turns rendered prompt texts into `num_samples` responses each (EOS and stop strings removed)."""

    def generate(self, prompt_texts: list[str], params: GenerationParams) -> list[list[str]]:
        ...


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest occurrence of any stop string (the stop string excluded)."""
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def sample_seed(seed: int, prompt_text: str, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) pair.

    Keyed by the prompt's text rather than its position, so a response does not depend on batch
    size, batch order or which other prompts are in the call: a resumed run that skips finished
    prompts samples exactly what an uninterrupted run would have.
    """
    digest = hashlib.sha256(f"{seed}\0{sample_index}\0{prompt_text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, shared by every backend so all see the same ids.

    No special tokens are added, exactly as `noisepo.data.chat.encode_example` does for training:
    chat templates write the BOS into the text themselves, and a model must be prompted the way it
    was trained (METHODS §3).
    """
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode_response(tokenizer, tokens: list[int], eos_ids) -> str:
    """Text of generated tokens up to (not including) the first EOS, special tokens skipped: every
    backend decodes this way, so the same tokens give the same text."""
    for at, token in enumerate(tokens):
        if token in eos_ids:
            tokens = tokens[:at]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)
