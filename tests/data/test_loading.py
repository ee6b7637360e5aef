"""Loaders: every format and record kind, and every class of bad input named by file, line, field."""
from __future__ import annotations

import json
import logging
import os

import pytest

from noisepo.data import LoadResult, load_preferences, load_prompts, load_sft
from noisepo.data.loading import looks_like_path
from noisepo.errors import InputError

FORMATS = ["jsonl", "json", "parquet", "datasets"]


def pair(i: int = 0, **extra) -> dict:
    return {"id": f"p{i}", "prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2), **extra}


def chat_pair(i: int = 0, **extra) -> dict:
    return {"id": f"c{i}",
            "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i}+1"}],
            "chosen": [{"role": "assistant", "content": str(i + 1)}],
            "rejected": [{"role": "assistant", "content": str(i + 2)}], **extra}


def error_of(load, path, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load(path, **kwargs)
    return info.value


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", FORMATS)
def test_preferences_load_from_every_format_with_extra_columns(write, fmt):
    records = [pair(i, weight=0.5 * i, label_flipped=i == 1, answer=str(i + 1)) for i in range(3)]
    path = write(records, fmt)
    result = load_preferences(path)
    assert isinstance(result, LoadResult)
    assert result.records == records and result.skipped == 0 and result.source == path


@pytest.mark.parametrize("fmt", FORMATS)
def test_conversational_preferences_load_from_every_format(write, fmt):
    records = [chat_pair(i) for i in range(2)]
    assert load_preferences(write(records, fmt)).records == records


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_prompt_completion_and_messages_load(write, fmt):
    plain = [{"prompt": "1+1=", "completion": "2", "human_correct": True}]
    assert load_sft(write(plain, fmt, "plain")).records == plain

    messages = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}]
    (record,) = load_sft(write(messages, fmt, "chat")).records
    # the conversation is kept, and split into prompt (context) + completion (the last reply)
    assert record["messages"] == messages[0]["messages"]
    assert record["prompt"] == [{"role": "user", "content": "1+1"}]
    assert record["completion"] == [{"role": "assistant", "content": "2"}]


def test_sft_conversational_prompt_completion(write):
    records = [{"prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "hello"}]}]
    assert load_sft(write(records)).records == records


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prompts_keep_answer(write, fmt):
    records = [{"id": "a", "prompt": "2+2=", "answer": "4"},
               {"id": "b", "prompt": "3+3=", "answer": "6"}]
    assert load_prompts(write(records, fmt)).records == records


def test_implicit_prompt_is_split_like_trl(write):
    user = {"role": "user", "content": "1+1"}
    record = {"chosen": [user, {"role": "assistant", "content": "2"}],
              "rejected": [user, {"role": "assistant", "content": "3"}]}
    (loaded,) = load_preferences(write([record])).records
    assert loaded["prompt"] == [user]
    assert loaded["chosen"] == [{"role": "assistant", "content": "2"}]
    assert loaded["rejected"] == [{"role": "assistant", "content": "3"}]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(pair(0)) + "\n" + json.dumps(pair(1)) + "\n")
    assert len(load_preferences(path).records) == 2


def test_blank_lines_are_ignored_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(pair(0)) + "\n\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    assert str(error_of(load_preferences, path)) == f"{path}:4: field 'rejected': is missing"


def test_dataset_dict_folder_uses_train_or_the_named_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([pair(0)]),
                          "test": datasets.Dataset.from_list([pair(1), pair(2)])}).save_to_disk(str(folder))
    assert load_preferences(folder).records == [pair(0)]
    assert load_preferences(f"{folder}:test").records == [pair(1), pair(2)]


# --------------------------------------------------------------------------- bad rows (JSONL: line)
GOOD = json.dumps(pair(0))
CHAT_BAD = {
    "not a dict": ({**chat_pair(), "chosen": ["hi"]}, "chosen[0]", "must be a message object"),
    "missing role": ({**chat_pair(), "prompt": [{"content": "x"}]}, "prompt[0]", "missing 'role'"),
    "missing content": ({**chat_pair(), "chosen": [{"role": "assistant"}]}, "chosen[0]", "missing 'content'"),
    "unknown role": ({**chat_pair(), "prompt": [{"role": "human", "content": "x"}]}, "prompt[0].role",
                     "unknown role 'human'"),
    "content not str": ({**chat_pair(), "rejected": [{"role": "assistant", "content": 3}]},
                        "rejected[0].content", "must be a string, got int"),
    "reply not assistant": ({**chat_pair(), "chosen": [{"role": "user", "content": "2"}]}, "chosen[0].role",
                            "the last message must be the assistant's"),
    "mixed formats": ({**chat_pair(), "chosen": "2"}, "chosen", "must be a list of messages"),
}
ROW_BAD = {
    "missing field": ({"prompt": "a", "chosen": "b"}, "rejected", "is missing"),
    "missing prompt": ({"chosen": "b", "rejected": "c"}, "prompt", "is missing"),
    "empty field": (pair(chosen=""), "chosen", "is empty"),
    "null field": (pair(prompt=None), "prompt", "is null"),
    "wrong type": (pair(rejected=5), "rejected", "must be a string, got int"),
    "identical": (pair(chosen="2", rejected="2"), "rejected", "is identical to 'chosen'"),
    "negative weight": (pair(weight=-1), "weight", "must be a finite number >= 0, got -1"),
    "string weight": (pair(weight="1"), "weight", "must be a number >= 0, got str"),
    "nan weight": (pair(weight=float("nan")), "weight", "must be a finite number >= 0, got nan"),
    "label_flipped not bool": (pair(label_flipped=1), "label_flipped", "must be true or false, got int"),
    **CHAT_BAD,
}


@pytest.mark.parametrize("case", list(ROW_BAD))
def test_bad_jsonl_row_names_file_line_field(tmp_path, case):
    record, field, message = ROW_BAD[case]
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    err = error_of(load_preferences, path)
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: field '{field}': {message}")


@pytest.mark.parametrize("fmt", ["json", "datasets"])
def test_bad_row_in_other_formats_names_the_record(write, fmt):
    path = write([pair(0), pair(1, chosen="")], fmt)
    err = error_of(load_preferences, path)
    assert str(err) == f"{path}: record 2: field 'chosen': is empty"
    assert (err.line, err.field) == (2, "chosen")


def test_parquet_null_and_wrong_type_name_the_record(write):
    path = write([pair(0), {**pair(1), "prompt": None}], "parquet")
    assert str(error_of(load_preferences, path)) == f"{path}: record 2: field 'prompt': is null"


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + '{"prompt": "a", "chosen": \n')
    err = error_of(load_preferences, path)
    assert err.line == 2 and str(err).startswith(f"{path}:2: not valid JSON")


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[1, 2]\n")
    assert str(error_of(load_preferences, path)) == f"{path}:1: a record must be a JSON object, got list"


def test_bad_sft_and_prompt_rows(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert str(error_of(load_sft, path)) == (f"{path}:1: field 'messages[0].role': the last message must be "
                                             "the assistant's, got role 'user'")
    path.write_text(json.dumps({"prompt": "hi", "completion": None}) + "\n")
    assert str(error_of(load_sft, path)) == f"{path}:1: field 'completion': is null"
    path.write_text(json.dumps({"answer": "4"}) + "\n")
    assert str(error_of(load_prompts, path)) == f"{path}:1: field 'prompt': is missing"


# --------------------------------------------------------------------------- bad files
def test_missing_file_is_not_found_not_a_hub_attempt(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "data/train.jsonl", "./data", "nope.parquet"):
        err = error_of(load_preferences, missing)
        assert str(err) == f"{missing}: file not found"


def test_hub_names_are_told_apart_from_paths():
    assert not looks_like_path("trl-lib/ultrafeedback_binarized")
    assert not looks_like_path("imdb:test")
    assert not looks_like_path("org/data-v1.2")
    assert looks_like_path("runs/x/pairs.jsonl") and looks_like_path("a/b/c") and looks_like_path("/abs")


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    assert str(error_of(load_preferences, path)) == f"{path}: is empty"
    path.write_text("\n  \n")
    assert str(error_of(load_preferences, path)) == f"{path}: is empty (only whitespace)"
    empty_list = tmp_path / "e.json"
    empty_list.write_text("[]")
    assert str(error_of(load_preferences, empty_list)) == f"{empty_list}: contains no records"


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    err = error_of(load_preferences, path)
    assert err.line == 2 and "is not UTF-8 text" in str(err) and str(err).startswith(f"{path}:2:")


def test_unsupported_format_and_plain_folder(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n")
    assert str(error_of(load_preferences, path)).startswith(f"{path}: unsupported format '.csv'")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "not a datasets save_to_disk folder" in str(error_of(load_preferences, folder))


def test_invalid_json_document_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a",\n}\n]')
    err = error_of(load_preferences, path)
    assert err.line == 3 and str(err).startswith(f"{path}:3: not valid JSON")
    path.write_text('{"prompt": "a"}')
    assert "must hold a JSON list" in str(error_of(load_preferences, path))


def test_broken_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    assert str(error_of(load_preferences, path)).startswith(f"{path}: not a readable Parquet file")


# --------------------------------------------------------------------------- skip_invalid
def test_skip_invalid_counts_and_warns(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    lines = [GOOD, "{broken", json.dumps(pair(1, chosen="")), json.dumps(pair(2)), json.dumps(pair(3, weight=-2)),
             json.dumps({"prompt": "x"}), json.dumps(pair(4))]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="noisepo.data.loading"):
        result = load_preferences(path, skip_invalid=True)
    assert [r["id"] for r in result.records] == ["p0", "p2", "p4"]
    assert result.skipped == 4
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and f"skipped 4 invalid row(s): {path}:2: not valid JSON" in warning
    assert f"{path}:3: field 'chosen': is empty" in warning and "and 1 more" in warning


def test_skip_invalid_does_not_hide_file_problems_or_an_all_bad_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_preferences(tmp_path / "missing.jsonl", skip_invalid=True)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(pair(0, chosen="")) + "\n")
    assert "no valid records (1 skipped" in str(error_of(load_preferences, path, skip_invalid=True))


@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="would reach the network")
def test_a_hub_name_that_cannot_be_loaded_is_an_input_error():
    err = error_of(load_preferences, "no-such-org/no-such-dataset:train")
    assert err.path == "no-such-org/no-such-dataset:train" and "hub dataset failed" in str(err)
