"""A local causal LM prompted as a judge, with the same pointwise prompt as the LLM judge.

How its number is read: the judge prompt (`prompt.py`, METHODS §4.1) is sent as one user message,
rendered with `noisepo.data.chat.render_prompt` (the model's chat template, or the plain template).
The model decodes greedily for at most `max_new_tokens` tokens (default 4: enough for "100" plus an
end-of-sequence token in most tokenizers) through `TransformersGenerator`; the text before EOS is
read by the strict parser (`parsing.parse_score`): after stripping surrounding whitespace it must be
an integer 1..100 with nothing else, or the item fails (None). No logit-weighted expectation and no
search for a number inside longer text: the same rule as the API judge, so both fail alike.
"""
from __future__ import annotations

from noisepo.errors import ConfigError
from noisepo.judges.base import Item
from noisepo.judges.parsing import parse_score
from noisepo.judges.prompt import load_template, render_judge_prompt, template_digest
from noisepo.judges.reward_model import fingerprint


class LocalLMJudge:
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
        self.template = load_template(template)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.generator = TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=progress)
        self.identity = (f"local-lm|{model_path}|{fingerprint(model_path)}|"
                         f"template={template_digest(self.template)}|max_new_tokens={max_new_tokens}")
        self.last_replies: list[str] = []  # the raw replies of the latest call, for inspection

    def __repr__(self) -> str:
        return f"LocalLMJudge({self.model_path!r})"

    def score(self, items: list[Item]) -> list[float | None]:
        from noisepo.data.chat import render_prompt
        from noisepo.generation.base import GenerationParams

        texts = [render_prompt(self.tokenizer, [{"role": "user", "content": render_judge_prompt(
            self.template, prompt, response)}]) for prompt, response in items]
        replies = self.generator.generate(texts, GenerationParams(max_new_tokens=self.max_new_tokens))
        self.last_replies = [r[0] for r in replies]
        return [parse_score(reply) for reply in self.last_replies]
