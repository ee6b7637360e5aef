"""TransformersGenerator: batching must not change results; sampling is reproducible under a seed."""
from __future__ import annotations

import pytest

from noisepo.errors import ConfigError
from noisepo.generation.base import GenerationParams, Generator, cut_at_stop

PROMPTS = ["1+1=", "hello there, how are", "abc", "What is 12+30? Answer:", "x", "Q: 7*8\nA:"]


@pytest.fixture(scope="module")
def model_and_tokenizer(micro_model_dir):
    from noisepo.models import load_model, load_tokenizer

    return load_model(micro_model_dir, device="cpu"), load_tokenizer(micro_model_dir)


def make(model_and_tokenizer, batch_size=4):
    from noisepo.generation.transformers_backend import TransformersGenerator

    model, tokenizer = model_and_tokenizer
    return TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=False)


def test_is_a_generator(model_and_tokenizer):
    assert isinstance(make(model_and_tokenizer), Generator)


def test_batched_greedy_equals_one_prompt_at_a_time(model_and_tokenizer):
    params = GenerationParams(max_new_tokens=10)
    batched = make(model_and_tokenizer, batch_size=4).generate(PROMPTS, params)
    single = make(model_and_tokenizer, batch_size=1)
    one_by_one = [single.generate([p], params)[0] for p in PROMPTS]
    assert batched == one_by_one
    assert all(len(r) == 1 and isinstance(r[0], str) for r in batched)


def test_sampling_is_reproducible_and_independent_of_batching(model_and_tokenizer):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, num_samples=2, seed=3)
    first = make(model_and_tokenizer, batch_size=4).generate(PROMPTS, params)
    again = make(model_and_tokenizer, batch_size=4).generate(PROMPTS, params)
    reordered = make(model_and_tokenizer, batch_size=1).generate(PROMPTS[::-1], params)[::-1]
    subset = make(model_and_tokenizer, batch_size=3).generate(PROMPTS[2:], params)
    assert first == again == reordered
    assert subset == first[2:]  # what a resumed run that skips finished prompts relies on
    assert all(len(r) == 2 for r in first)
    assert any(r[0] != r[1] for r in first)  # samples of one prompt are distinct draws


def test_a_different_seed_gives_different_samples(model_and_tokenizer):
    generator = make(model_and_tokenizer)
    a = generator.generate(PROMPTS, GenerationParams(max_new_tokens=10, temperature=1.0, seed=1))
    b = generator.generate(PROMPTS, GenerationParams(max_new_tokens=10, temperature=1.0, seed=2))
    assert a != b


def test_greedy_samples_are_copies(model_and_tokenizer):
    out = make(model_and_tokenizer).generate(PROMPTS[:2], GenerationParams(max_new_tokens=5, num_samples=3))
    assert all(len(r) == 3 and len(set(r)) == 1 for r in out)


def test_top_p_tiny_is_greedy(model_and_tokenizer):
    generator = make(model_and_tokenizer)
    greedy = generator.generate(PROMPTS, GenerationParams(max_new_tokens=8))
    nucleus = generator.generate(PROMPTS, GenerationParams(max_new_tokens=8, temperature=1.0, top_p=1e-6))
    assert nucleus == greedy  # only the most likely token survives the nucleus


def test_stop_strings_cut_the_text(model_and_tokenizer):
    generator = make(model_and_tokenizer)
    params = GenerationParams(max_new_tokens=12, temperature=1.0, seed=5)
    full = generator.generate(PROMPTS, params)
    text = next(r[0] for r in full if len(r[0]) >= 6)
    stop = text[3:5]
    stopped = generator.generate(PROMPTS, GenerationParams(max_new_tokens=12, temperature=1.0, seed=5,
                                                           stop=[stop]))
    for (whole,), (cut,) in zip(full, stopped, strict=True):
        assert cut == cut_at_stop(whole, [stop])
        assert stop not in cut


def test_eos_ends_the_text(model_and_tokenizer):
    from noisepo.generation.transformers_backend import TransformersGenerator

    model, tokenizer = model_and_tokenizer
    generator = TransformersGenerator(model, tokenizer, progress=False)
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert generator._decode(ids + [eos] + ids + [pad]) == "ab"


def test_restores_padding_side_and_training_mode(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    generator = make(model_and_tokenizer)
    tokenizer.padding_side = "right"
    model.train()
    try:
        generator.generate(PROMPTS[:2], GenerationParams(max_new_tokens=2))
        assert tokenizer.padding_side == "right" and model.training
        def broken(**kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(model, "generate", broken)
        with pytest.raises(RuntimeError):
            generator.generate(PROMPTS[:2], GenerationParams(max_new_tokens=2))
        assert tokenizer.padding_side == "right" and model.training
    finally:
        model.eval()


def test_empty_input(model_and_tokenizer):
    assert make(model_and_tokenizer).generate([], GenerationParams()) == []


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(num_samples=0), dict(stop=[""])])
def test_params_validation(bad):
    with pytest.raises(ConfigError):
        GenerationParams(**bad)
