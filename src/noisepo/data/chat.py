"""One chat template for training and generation, so a model is always prompted as it was trained.

`render_prompt(tokenizer, prompt)` turns a prompt into the text the model continues:

- a string prompt is used raw, as TRL does (the data already holds the exact text);
- a message list goes through the tokenizer's `chat_template` with the generation prompt
  (`add_generation_prompt=True`) when the tokenizer has one, else through the plain template:

      <|system|>
      {system content}
      <|user|>
      {user content}
      <|assistant|>
      {assistant content}
      <|user|>
      {user content}
      <|assistant|>

  i.e. every message is `<|ROLE|>\\n{content}\\n`, and the prompt ends with `<|assistant|>\\n` so the
  model writes the reply next. It is made of plain characters, so the character-level tokenizers of
  the tiny preset models encode it. The first message list a tokenizer without a template renders
  logs a one-line note (a warning) naming the tokenizer, so a base model (GPT-2) is never prompted
  with a made-up template silently.

`response_text(response)` is the reply as text: the string itself, or the assistant message's
content. `encode_example` tokenizes both (no special tokens added, as TRL: a template that writes
BOS would otherwise get it twice), appends EOS to the response so the model learns to stop, and
cuts an over-long example: the prompt from the left first (keeping its end, which is nearest the
reply, and at least `min_prompt_tokens` of it), then the response from the right.
"""
from __future__ import annotations

import logging
from typing import Any

from noisepo.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

Prompt = str | list[dict]
MIN_PROMPT_TOKENS = 8


def render_plain(messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The plain template (module docstring) for tokenizers without a chat template."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_NOTED: set[str] = set()  # tokenizers already told about (once per process each)


def _note_plain_template(tokenizer: Any) -> None:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _NOTED:
        _NOTED.add(name)
        logger.warning("noisepo: the tokenizer %s has no chat template; message lists use noisepo's plain template "
                       "(<|role|> lines, see noisepo.data.chat)", name)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text the model continues: a string raw, messages through the (chat or plain) template."""
    if isinstance(prompt, str):
        return prompt
    if not has_chat_template(tokenizer):
        _note_plain_template(tokenizer)
        return render_plain(prompt)
    import jinja2

    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as err:
        raise InputError(f"the tokenizer's chat template rejected the messages: {err}", field="prompt") from None
    return text


def response_text(response: Prompt) -> str:
    """The reply as text: a string as is; a message list -> its content.

    TRL's conversational responses hold one assistant message; several are joined with newlines.
    """
    if isinstance(response, str):
        return response
    return "\n".join(m["content"] for m in response)


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_length: int, *,
                  min_prompt_tokens: int = MIN_PROMPT_TOKENS) -> tuple[list[int], list[int]]:
    """Fit prompt + response into `max_length`: prompt cut from the left, then response from the right.

    The prompt keeps at least min(len(prompt), min_prompt_tokens, max_length // 2) tokens, so a long
    reply cannot leave the model with no context at all.
    """
    if max_length < 2:
        raise ConfigError(f"must be >= 2, got {max_length}", key="max_length")
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    floor = min(len(prompt_ids), min_prompt_tokens, max_length // 2)
    keep_prompt = max(max_length - len(response_ids), floor)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)]


def encode_example(tokenizer: Any, prompt: Prompt, response: Prompt, *, max_length: int,
                   min_prompt_tokens: int = MIN_PROMPT_TOKENS) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with EOS ending the response, cut to `max_length` in total.

    A response cut on the right loses its EOS too: the model must not learn to stop mid-reply.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; responses need one to end", key="model")
    prompt_ids = _token_ids(tokenizer, render_prompt(tokenizer, prompt))
    response_ids = _token_ids(tokenizer, response_text(response)) + [tokenizer.eos_token_id]
    return truncate_pair(prompt_ids, response_ids, max_length, min_prompt_tokens=min_prompt_tokens)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
