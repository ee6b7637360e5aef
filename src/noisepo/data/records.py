"""Record validation: TRL's column names, checked one record at a time.

Records are plain dicts. Three kinds are checked here (see docs/architecture.md):

- SFT: `prompt` + `completion` (strings, or message lists), or conversational `messages`. A
  `messages` record gets `prompt` (every message before the last one) and `completion` (the last
  message, which must be the assistant's) added, so consumers read one pair of columns; `messages`
  itself is kept.
- Preference: `prompt`, `chosen`, `rejected`: strings, or message lists (TRL conversational:
  prompt = messages, chosen/rejected = the assistant message(s)). TRL's "implicit prompt" form
  (no `prompt`; chosen/rejected are whole conversations) is split as TRL's `extract_prompt` does:
  the longest common message prefix becomes `prompt`. Optional `weight` (finite number >= 0) and
  `label_flipped` (bool).
- Prompt: `prompt` (string or message list).

Every other column is carried through untouched. A validator returns the (possibly completed)
record or raises `InputError` naming the field; the loader adds the file and the line.
"""
from __future__ import annotations

import math
from typing import Any

from noisepo.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


class RecordError(InputError):
    """An InputError for a row of a JSON / Parquet / datasets source, located as 'record N'.

    JSONL problems use the file's line (`path:line:`); the other formats have no useful line, so
    the 1-based record number is given instead. `line` holds that number too.

    >>> str(RecordError("is empty", path="d.json", record=3, field="chosen"))
    "d.json: record 3: field 'chosen': is empty"
    """

    def __init__(self, message: str, *, path=None, record: int, field: str | None = None):
        self.record = record
        super().__init__(message, path=path, line=record, field=field)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        what = f"field '{self.field}': " if self.field is not None else ""
        return f"{where}record {self.record}: {what}{self.message}"


# --------------------------------------------------------------------------- small checks
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_conversation(value: Any) -> bool:
    """True for a message list (TRL's conversational format), False for a plain string."""
    return isinstance(value, list)


def check_text(value: Any, field: str) -> str:
    """A required non-empty string."""
    if value is None:
        raise InputError("is null", field=field)
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {_type_name(value)}", field=field)
    if not value.strip():
        raise InputError("is empty", field=field)
    return value


def check_message(message: Any, field: str) -> None:
    """One `{"role", "content"}` message; extra keys (name, tool_calls, ...) are allowed."""
    if not isinstance(message, dict):
        raise InputError(f"must be a message object with 'role' and 'content', got {_type_name(message)}",
                         field=field)
    for key in ("role", "content"):
        if key not in message:
            raise InputError(f"missing '{key}'", field=field)
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}; roles: {', '.join(ROLES)}", field=f"{field}.role")
    if not isinstance(content, str):
        raise InputError(f"must be a string, got {_type_name(content)}", field=f"{field}.content")


def check_messages(value: Any, field: str) -> list[dict]:
    """A required non-empty list of valid messages."""
    if value is None:
        raise InputError("is null", field=field)
    if not isinstance(value, list):
        raise InputError(f"must be a list of messages, got {_type_name(value)}", field=field)
    if not value:
        raise InputError("is empty", field=field)
    for i, message in enumerate(value):
        check_message(message, f"{field}[{i}]")
    return value


def check_text_or_messages(value: Any, field: str) -> str | list[dict]:
    if is_conversation(value):
        return check_messages(value, field)
    return check_text(value, field)


def check_response(value: Any, field: str, prompt: str | list[dict]) -> str | list[dict]:
    """A response in the same format as its prompt; a message list must end with the assistant."""
    if is_conversation(prompt) and not is_conversation(value) and value is not None:
        raise InputError(f"must be a list of messages (the prompt is one), got {_type_name(value)}",
                         field=field)
    if not is_conversation(prompt) and is_conversation(value):
        raise InputError("must be a string (the prompt is a string), got a list", field=field)
    value = check_text_or_messages(value, field)
    if is_conversation(value):
        if value[-1]["role"] != "assistant":
            raise InputError(f"the last message must be the assistant's, got role {value[-1]['role']!r}",
                             field=f"{field}[{len(value) - 1}].role")
        if not value[-1]["content"].strip():
            raise InputError("is empty", field=f"{field}[{len(value) - 1}].content")
    return value


def check_optional_columns(record: dict) -> None:
    """`weight`: finite number >= 0; `label_flipped`: bool (null counts as a wrong type)."""
    if "weight" in record:
        weight = record["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InputError(f"must be a number >= 0, got {_type_name(weight)}", field="weight")
        if not math.isfinite(weight) or weight < 0:
            raise InputError(f"must be a finite number >= 0, got {weight}", field="weight")
    if "label_flipped" in record and not isinstance(record["label_flipped"], bool):
        raise InputError(f"must be true or false, got {_type_name(record['label_flipped'])}",
                         field="label_flipped")


def _require(record: dict, field: str, hint: str = "") -> Any:
    if field not in record:
        raise InputError("is missing" + hint, field=field)
    return record[field]


def _check_object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"a record must be a JSON object, got {_type_name(record)}")
    return record


# --------------------------------------------------------------------------- record kinds
def split_conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(context, [last message]): the SFT view of a conversation (the last turn is the target)."""
    return messages[:-1], messages[-1:]


def validate_sft(record: Any) -> dict:
    """Check an SFT record; a `messages` record gets `prompt`/`completion` added (module docstring)."""
    record = _check_object(record)
    if "completion" not in record and "messages" in record:
        messages = check_messages(record["messages"], "messages")
        last = len(messages) - 1
        if messages[-1]["role"] != "assistant":
            raise InputError(f"the last message must be the assistant's, got role {messages[-1]['role']!r}",
                             field=f"messages[{last}].role")
        if not messages[-1]["content"].strip():
            raise InputError("is empty", field=f"messages[{last}].content")
        if last == 0:
            raise InputError("needs at least one message before the assistant's reply", field="messages")
        prompt, completion = split_conversation(messages)
        check_optional_columns(record)
        return {**record, "prompt": prompt, "completion": completion}
    prompt = check_text_or_messages(_require(record, "prompt", " (SFT records need 'prompt' + 'completion', "
                                                               "or 'messages')"), "prompt")
    check_response(_require(record, "completion"), "completion", prompt)
    check_optional_columns(record)
    return record


def extract_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two whole conversations at their longest common message prefix (TRL's extract_prompt)."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    return chosen[:common], chosen[common:], rejected[common:]


def _complete_implicit_prompt(record: dict) -> dict:
    """TRL's implicit-prompt form -> explicit `prompt`/`chosen`/`rejected` (conversational only)."""
    chosen = check_messages(record.get("chosen"), "chosen") if "chosen" in record else None
    rejected = check_messages(record.get("rejected"), "rejected") if "rejected" in record else None
    if chosen is None or rejected is None:
        raise InputError("is missing", field="prompt")
    prompt, chosen_tail, rejected_tail = extract_prompt(chosen, rejected)
    if not prompt:
        raise InputError("is missing, and 'chosen'/'rejected' share no leading messages to use as the "
                         "prompt (TRL's implicit-prompt form)", field="prompt")
    return {**record, "prompt": prompt, "chosen": chosen_tail, "rejected": rejected_tail}


def validate_preference(record: Any) -> dict:
    """Check a preference pair (module docstring); returns the record, prompt made explicit."""
    record = _check_object(record)
    if "prompt" not in record and is_conversation(record.get("chosen")) and is_conversation(
            record.get("rejected")):
        record = _complete_implicit_prompt(record)
    prompt = check_text_or_messages(_require(record, "prompt"), "prompt")
    chosen = check_response(_require(record, "chosen"), "chosen", prompt)
    rejected = check_response(_require(record, "rejected"), "rejected", prompt)
    if chosen == rejected:
        raise InputError("is identical to 'chosen' (a pair needs two different responses)", field="rejected")
    check_optional_columns(record)
    return record


def validate_prompt(record: Any) -> dict:
    """Check a generation prompt record: `prompt` (string or message list)."""
    record = _check_object(record)
    check_text_or_messages(_require(record, "prompt"), "prompt")
    check_optional_columns(record)
    return record


VALIDATORS = {"sft": validate_sft, "preference": validate_preference, "prompt": validate_prompt}
