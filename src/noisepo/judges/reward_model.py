"""A local reward model as a scorer: `AutoModelForSequenceClassification`, batched.

Input text: the tokenizer's chat template over [user: prompt, assistant: response] when it has one
(how reward models are trained), else `prompt + response`. Over-long inputs are cut from the left,
since a sequence-classification head reads the last token. Score: the first logit (the only one
for a reward model with `num_labels = 1`).
"""
from __future__ import annotations

import math
from collections import Counter

from noisepo.errors import ConfigError
from noisepo.judges.common import Item, fingerprint

__all__ = ["RewardModelScorer", "fingerprint"]


class RewardModelScorer:
    def __init__(self, model_path: str | None, *, batch_size: int = 16, max_length: int = 1024,
                 dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                 model=None, tokenizer=None):
        if model is None and not model_path:
            raise ConfigError("is required for the reward-model scorer (a local folder or hub name)",
                              key="model")
        self.model_path = model_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.model, self.tokenizer = (model, tokenizer) if model is not None else _load(
            model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:  # needed to find each row's last real token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.identity = f"reward-model|{model_path}|{fingerprint(model_path)}|max_length={max_length}"
        self.failure_reasons: Counter[str] = Counter()

    @classmethod
    def from_config(cls, options):
        return cls(options.model, batch_size=options.batch_size, max_length=options.max_length,
                   dtype=options.dtype, device=options.device, trust_remote_code=options.trust_remote_code)

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.model_path!r})"

    def score(self, items: list[Item]) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(items), self.batch_size):
            scores.extend(self._score_batch(items[start:start + self.batch_size]))
        return scores

    def _score_batch(self, items: list[Item]) -> list[float | None]:
        import torch

        texts = [self._text(prompt, response) for prompt, response in items]
        saved = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   add_special_tokens=not self._templated, return_tensors="pt")
        finally:
            self.tokenizer.truncation_side = saved
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits  # (B, num_labels)
        values = logits[:, 0].float().tolist()
        scores = [v if math.isfinite(v) else None for v in values]
        if None in scores:
            self.failure_reasons["not_finite"] += scores.count(None)
        return scores

    @property
    def _templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _text(self, prompt: str, response: str) -> str:
        if not self._templated:
            return prompt + response
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)


def _load(path: str, *, dtype: str, device: str, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification

    from noisepo.models import default_device, load_tokenizer, torch_dtype

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a sequence-classification model from {path!r}: {err}",
                          key="model") from None
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model.to(default_device(device)), tokenizer

