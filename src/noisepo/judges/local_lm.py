"""A local causal LM prompted as a judge, with the same prompts as the LLM judge: pointwise
(`LocalLMJudge`, a 1-100 score) or pairwise (`LocalLMPairwiseJudge`, "A" or "B").

How its answer is read: the judge prompt (`prompt.py`, METHODS §4.1) is sent as one user message,
rendered with `noisepo.data.chat.render_prompt` (the model's chat template, or the plain template).
The model decodes greedily for at most `max_new_tokens` tokens (default 4: enough for "100" plus an
end-of-sequence token in most tokenizers) through `TransformersGenerator`; the text before EOS is
read by the strict parsers (`parsing.py`): after stripping surrounding whitespace it must be an
integer 1..100 (or the letter A or B) with nothing else, or the item fails (None). No
logit-weighted expectation and no search for an answer inside longer text: the same rule as the
API judge, so both fail alike. Unlike the API judge an unparsable reply is not retried: greedy
decoding would give the same reply again.
"""
from __future__ import annotations

from collections import Counter

from noisepo.errors import ConfigError
from noisepo.judges.common import UNPARSABLE, Item, PairItem, fingerprint
from noisepo.judges.parsing import parse_choice, parse_score
from noisepo.judges.prompt import (
    DEFAULT_TEMPLATE,
    PAIRWISE_FIELDS,
    PAIRWISE_TEMPLATE,
    POINTWISE_FIELDS,
    load_template,
    render_judge_prompt,
    render_pairwise_prompt,
    template_digest,
)


class _LocalJudge:
    kind = "local-lm"
    fields = POINTWISE_FIELDS
    default_template = DEFAULT_TEMPLATE

    def __init__(self, model_path: str | None, *, template: str | None = None, max_new_tokens: int = 4,
                 batch_size: int = 16, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, model=None, tokenizer=None, progress: bool = False):
        from noisepo.generation.transformers_backend import TransformersGenerator
        from noisepo.models import load_model, load_tokenizer

        if model is None and not model_path:
            raise ConfigError("is required for the local-lm scorer (a local folder or hub name)", key="model")
        if model is None:
            model = load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.model_path = model_path
        self.template = load_template(template, fields=self.fields, default=self.default_template)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.generator = TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=progress)
        self.identity = (f"{self.kind}|{model_path}|{fingerprint(model_path)}|"
                         f"template={template_digest(self.template)}|max_new_tokens={max_new_tokens}")
        self.last_replies: list[str] = []  # the raw replies of the latest call, for inspection
        self.failure_reasons: Counter[str] = Counter()

    @classmethod
    def from_config(cls, options):
        return cls(options.model, template=options.template, max_new_tokens=options.max_new_tokens,
                   batch_size=options.batch_size, dtype=options.dtype, device=options.device,
                   trust_remote_code=options.trust_remote_code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r})"

    def _judge(self, contents: list[str], parse) -> list[float | None]:
        from noisepo.data.chat import render_prompt
        from noisepo.generation.base import GenerationParams

        texts = [render_prompt(self.tokenizer, [{"role": "user", "content": c}]) for c in contents]
        replies = self.generator.generate(texts, GenerationParams(max_new_tokens=self.max_new_tokens))
        self.last_replies = [r[0] for r in replies]
        values = [parse(reply) for reply in self.last_replies]
        if None in values:
            self.failure_reasons[UNPARSABLE] += values.count(None)
        return values


class LocalLMJudge(_LocalJudge):
    """`Scorer`: a 1-100 score per (prompt, response)."""

    def score(self, items: list[Item]) -> list[float | None]:
        return self._judge([render_judge_prompt(self.template, *item) for item in items], parse_score)


class LocalLMPairwiseJudge(_LocalJudge):
    """`Comparer`: "A" -> 1.0, "B" -> 0.0 per (prompt, response_a, response_b)."""

    kind = "local-lm-pairwise"
    fields = PAIRWISE_FIELDS
    default_template = PAIRWISE_TEMPLATE

    def compare(self, items: list[PairItem]) -> list[float | None]:
        return self._judge([render_pairwise_prompt(self.template, *item) for item in items], parse_choice)
