"""Load and validate records from JSONL, JSON, Parquet, a datasets folder or the hub.

`load_sft`, `load_preferences` and `load_prompts` read every row and check it (`records.py`)
before any compute starts, so a bad row stops a run in the first second with the file, the line
and the field, not an hour in. Where a row is:

- JSONL (`.jsonl`, `.ndjson`): the 1-based line of the file (`data.jsonl:7: field 'chosen': ...`);
- JSON (a list of objects), Parquet, a `datasets` save_to_disk folder, a hub dataset: the 1-based
  record number (`data.json: record 7: field 'chosen': ...`).

`skip_invalid=True` turns row problems (bad JSON, missing or wrong fields) into a count,
`LoadResult.skipped`, and one warning line naming the first few; problems with the source itself
(missing, empty, not UTF-8, unsupported format) always raise.

A source that is not a local path is a hub dataset, `name` or `org/name`, with an optional
`:split` (default `train`). Something that looks like a path (a `/` at the start, `./`, `~`, more
than one `/`, or a file extension such as `.jsonl`) is never sent to the hub: it is "not found".
`datasets` and `pyarrow` are imported only when a source needs them.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from noisepo.data.records import VALIDATORS, RecordError
from noisepo.errors import InputError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = "a .jsonl, .json or .parquet file, a datasets save_to_disk folder, or a hub dataset name"
SHOWN_PROBLEMS = 3  # how many skipped rows the warning names
ONE_FORMAT_KINDS = ("sft", "preference")  # training data: standard or conversational, not both


class LoadResult(NamedTuple):
    """Valid records, how many rows were skipped (only with skip_invalid), and the source given."""

    records: list[dict]
    skipped: int
    source: str


class Row(NamedTuple):
    """One raw row and where it came from: `line` (JSONL) or `record` (other formats), 1-based."""

    value: Any
    number: int
    is_line: bool
    parse_error: str | None = None  # a JSONL line that is not valid JSON


# --------------------------------------------------------------------------- public API
def load_sft(source, *, skip_invalid: bool = False) -> LoadResult:
    """SFT records: `prompt` + `completion`, or `messages` (which gets `prompt`/`completion` added)."""
    return load_records(source, "sft", skip_invalid=skip_invalid)


def load_preferences(source, *, skip_invalid: bool = False) -> LoadResult:
    """Preference pairs: `prompt`, `chosen`, `rejected` (strings or message lists)."""
    return load_records(source, "preference", skip_invalid=skip_invalid)


def load_prompts(source, *, skip_invalid: bool = False) -> LoadResult:
    """Generation prompts: `prompt` (string or message list); other columns (e.g. `answer`) kept."""
    return load_records(source, "prompt", skip_invalid=skip_invalid)


def load_records(source, kind: str, *, skip_invalid: bool = False) -> LoadResult:
    """Read every row of `source`, validate it as `kind` ("sft", "preference" or "prompt")."""
    validate = VALIDATORS[kind]
    source = str(source)
    path = _resolve_local(source)
    rows = _read_rows(path) if path is not None else _read_hub(source)
    where = str(path) if path is not None else source
    records, problems = validate_rows(rows, validate, where, skip_invalid=skip_invalid,
                                      one_format=kind in ONE_FORMAT_KINDS)
    if problems:
        _warn_skipped(where, problems)
    if not records:
        raise InputError(f"no valid records ({len(problems)} skipped; first: {problems[0]})"
                         if problems else "contains no records", path=where)
    return LoadResult(records, len(problems), source)


def validate_rows(rows: Iterable[Row], validate: Callable[[Any], dict], where: str, *,
                  skip_invalid: bool, one_format: bool = False) -> tuple[list[dict], list[InputError]]:
    """Validate rows; the first problem raises unless `skip_invalid`, then all are collected.

    With `one_format` (training data: SFT and preference files) every row must have the format of
    the first valid one, standard (string prompts) or conversational (message lists): a file mixing
    the two would teach one task under two templates (TRL and `datasets` refuse it too), so it is
    refused at the first row that differs. Prompt files may mix: each prompt is rendered as given.
    """
    records, problems = [], []
    first: tuple[bool, Row] | None = None  # (conversational, where) of the first valid row
    for row in rows:
        try:
            if row.parse_error is not None:
                raise InputError(f"not valid JSON: {row.parse_error}")
            record = validate(row.value)
            conversational = isinstance(record.get("prompt"), list)
            if first is None:
                first = (conversational, row)
            elif one_format and conversational != first[0]:
                raise InputError(_mixed_formats(conversational, first[1]), field="prompt")
            records.append(record)
        except InputError as err:
            located = _locate(err, where, row)
            if not skip_invalid:
                raise located from None
            problems.append(located)
    return records, problems


def _mixed_formats(conversational: bool, first: Row) -> str:
    kinds = ("a string (standard format)", "a list of messages (conversational format)")
    at = f"line {first.number}" if first.is_line else f"record {first.number}"
    return (f"is {kinds[conversational]} but {at} has {kinds[not conversational]}; a file must use one "
            "format for every row")


def _locate(err: InputError, where: str, row: Row) -> InputError:
    if row.is_line:
        return InputError(err.message, path=where, line=row.number, field=err.field)
    return RecordError(err.message, path=where, record=row.number, field=err.field)


def _warn_skipped(where: str, problems: list[InputError]) -> None:
    shown = "; ".join(str(p) for p in problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    logger.warning("%s: skipped %d invalid row(s): %s%s", where, len(problems), shown, more)


# --------------------------------------------------------------------------- where the source is
def looks_like_path(source: str) -> bool:
    """True for something a user means as a local path; such a source is never sent to the hub."""
    name = source.rsplit(":", 1)[0] if re.fullmatch(r"[^:/]+(/[^:/]+)?:[\w.-]+", source) else source
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    suffix = Path(name).suffix
    return bool(suffix) and suffix[1:].isalpha()  # ".jsonl" yes; "v1.2" (a version) no


def _resolve_local(source: str) -> Path | None:
    """The local path of `source`, None for a hub name; InputError for a missing local path."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    base, _, split = source.rpartition(":")
    if base and split and Path(base).expanduser().is_dir():
        return Path(source)  # `folder:split` of a DatasetDict folder; _read_rows splits it off
    if looks_like_path(source):
        raise InputError("file not found", path=source)
    return None


# --------------------------------------------------------------------------- readers
def _read_rows(path: Path) -> Iterable[Row]:
    if not path.exists():  # `folder:split`
        base, _, split = str(path).rpartition(":")
        return _read_datasets_folder(Path(base), split)
    if path.is_dir():
        return _read_datasets_folder(path, None)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES:
        raise InputError(f"unsupported format {suffix or '(no extension)'!r}; use {SUPPORTED}", path=path)
    if path.stat().st_size == 0:
        raise InputError("is empty", path=path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    text = _read_utf8(path)
    if not text.strip():
        raise InputError("is empty (only whitespace)", path=path)
    if suffix in JSON_SUFFIXES:
        return _read_json(text, path)
    return _read_jsonl(text)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is harmless
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"is not UTF-8 text (byte {err.start} cannot be decoded)", path=path,
                         line=line) from None


def _read_jsonl(text: str) -> Iterator[Row]:
    """One row per non-blank line; a line that is not JSON becomes a row problem (skippable)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Row(json.loads(line), number, True)
        except json.JSONDecodeError as err:
            yield Row(None, number, True, parse_error=f"{err.msg} (column {err.colno})")


def _read_json(text: str, path: Path) -> list[Row]:
    """A JSON list of objects; a `.json` file that holds JSON lines is read as JSONL (as datasets does)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _first_line_is_object(text):
            return list(_read_jsonl(text))
        raise InputError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", path=path,
                         line=err.lineno) from None
    if not isinstance(data, list):
        raise InputError(f"must hold a JSON list of records (or JSON lines), got a {type(data).__name__}",
                         path=path)
    return [Row(value, i + 1, False) for i, value in enumerate(data)]


def _first_line_is_object(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"not a readable Parquet file: {err}", path=path) from None
    return [Row(value, i + 1, False) for i, value in enumerate(table.to_pylist())]


def _read_datasets_folder(path: Path, split: str | None) -> Iterator[Row]:
    import datasets

    if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise InputError(f"is a folder but not a datasets save_to_disk folder; use {SUPPORTED}", path=path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(f"cannot load the datasets folder: {err}", path=path) from None
    return _dataset_rows(_pick_split(loaded, split, path))


def _read_hub(source: str) -> Iterator[Row]:
    """A hub dataset `name[:split]` (needs internet; never used by the tests)."""
    import datasets

    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, bad split: all the user's to fix
        raise InputError(f"not a local file or folder, and loading it as a hub dataset failed: "
                         f"{type(err).__name__}: {err}", path=source) from None
    return _dataset_rows(dataset)


def _pick_split(loaded, split: str | None, path: Path):
    """A Dataset as is; from a DatasetDict the named split, else `train`, else its only split."""
    if not hasattr(loaded, "keys"):
        if split:
            raise InputError(f"holds a single dataset, not splits; drop ':{split}'", path=path)
        return loaded
    names = list(loaded.keys())
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise InputError(f"has splits {', '.join(names)}; name one as FOLDER:SPLIT", path=path)
    return loaded[chosen]


def _dataset_rows(dataset) -> Iterator[Row]:
    for i, value in enumerate(dataset):
        yield Row(dict(value), i + 1, False)
