"""One chat template for training and generation; encode_example's EOS and truncation."""
from __future__ import annotations

import pytest

from noisepo.data.chat import encode_example, render_prompt, response_text, truncate_pair
from noisepo.errors import InputError
from noisepo.models import build_char_tokenizer

MESSAGES = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1"}]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


@pytest.fixture()
def templated_tok():
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def decode(tok, ids):
    return tok.decode(ids)


def test_string_prompts_are_used_raw(char_tok, templated_tok):
    assert render_prompt(char_tok, "1+1=") == "1+1="
    assert render_prompt(templated_tok, "1+1=") == "1+1="


def test_plain_template_without_chat_template(char_tok):
    assert render_prompt(char_tok, MESSAGES) == "<|system|>\nAdd.\n<|user|>\n1+1\n<|assistant|>\n"


def test_tokenizer_chat_template_with_generation_prompt(templated_tok):
    assert render_prompt(templated_tok, MESSAGES) == "[system] Add.\n[user] 1+1\n[assistant] "


def test_a_template_error_is_an_input_error(templated_tok):
    templated_tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(InputError, match="no system role") as info:
        render_prompt(templated_tok, MESSAGES)
    assert info.value.field == "prompt"


def test_response_text():
    assert response_text("2") == "2"
    assert response_text([{"role": "assistant", "content": "2"}]) == "2"


@pytest.mark.parametrize("templated", [False, True])
def test_encode_example_appends_eos_and_adds_no_bos(char_tok, templated_tok, templated):
    tok = templated_tok if templated else char_tok
    prompt_ids, response_ids = encode_example(tok, MESSAGES, [{"role": "assistant", "content": "2"}],
                                              max_length=512)
    assert decode(tok, prompt_ids) == render_prompt(tok, MESSAGES)
    assert response_ids == [tok.convert_tokens_to_ids("2"), tok.eos_token_id]
    assert tok.bos_token_id not in prompt_ids


def test_encode_example_cuts_prompt_from_left_then_response_from_right(char_tok):
    prompt, response = "abcdefghijklmnopqrst", "0123456789"  # 20 + 10 chars (+ EOS)
    p, r = encode_example(char_tok, prompt, response, max_length=25)
    assert decode(char_tok, p) == "ghijklmnopqrst" and decode(char_tok, r[:-1]) == response  # prompt's end kept
    assert r[-1] == char_tok.eos_token_id and len(p) + len(r) == 25

    # a response that alone overflows: the prompt keeps its floor (8 tokens), the response is cut
    # on the right and loses its EOS (the model must not learn to stop mid-reply)
    p, r = encode_example(char_tok, prompt, "x" * 40, max_length=20)
    assert decode(char_tok, p) == "mnopqrst" and len(r) == 12 and char_tok.eos_token_id not in r


def test_truncate_pair_limits():
    assert truncate_pair([1, 2], [3, 4], 8) == ([1, 2], [3, 4])
    # floor is also capped by half of max_length and by the prompt's own length
    assert truncate_pair(list(range(10)), list(range(100, 120)), 6) == ([7, 8, 9], [100, 101, 102])
    assert truncate_pair([1], list(range(100, 120)), 4) == ([1], [100, 101, 102])
