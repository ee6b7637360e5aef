"""The openai judge against `noisepo serve` over real HTTP on 127.0.0.1."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="noisepo serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="noisepo serve needs the 'serve' extra (fastapi, uvicorn)")


class NumberJudgeModel:
    """A served "model" that answers every judge prompt with a number taken from the response."""

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, texts, params):
        self.prompts.extend(texts)
        return [[text.split("<response>\n")[-1].split("\n</response>")[0]] * params.num_samples
                for text in texts]


def judge_for(url, **options):
    from noisepo.judges.openai_judge import OpenAIJudge

    return OpenAIJudge(base_url=url, judge_model="micro", api_key_env=None, max_retries=1,
                       backoff_base=0.0, timeout=60, **options)


def test_a_tiny_served_model_is_judge_items_end_scored_or_failed(micro_model_dir):
    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.models import load_model, load_tokenizer
    from noisepo.serve import ServerThread, create_app

    tokenizer = load_tokenizer(micro_model_dir)
    generator = TransformersGenerator(load_model(micro_model_dir, device="cpu"), tokenizer, progress=False)
    with ServerThread(create_app(generator, tokenizer, model_name="micro")) as server:
        judge = judge_for(server.url, max_concurrency=2, max_tokens=3)
        scores = judge.score([("2+2=", "4"), ("Name a colour.", "blue"), ("hi", "hello")])
    assert len(scores) == 3 and all(s is None or 1 <= s <= 100 for s in scores)
    # every request made it through and back; an unparsable reply was asked once more (max_retries=1)
    assert judge.stats["requests"] == 3 + judge.stats["unparsable_retries"]
    assert judge.stats["scored"] + judge.failure_reasons["unparsable"] == 3
    assert judge.stats["unparsable_retries"] == judge.stats["unparsable"] - judge.failure_reasons["unparsable"]


def test_served_numbers_become_scores(micro_model_dir):
    from noisepo.models import load_tokenizer
    from noisepo.serve import ServerThread, create_app

    model = NumberJudgeModel()
    with ServerThread(create_app(model, load_tokenizer(micro_model_dir), model_name="micro")) as server:
        judge = judge_for(server.url)
        assert judge.score([("q", "57"), ("q", "100"), ("q", "Score: 9"), ("q", "0")]) == [
            57.0, 100.0, None, None]
    # The judge prompt went through the server's chat rendering (noisepo's plain template here).
    assert all(p.startswith("<|user|>\n") and p.endswith("<|assistant|>\n") for p in model.prompts)
