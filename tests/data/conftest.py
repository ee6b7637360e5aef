"""Fixtures of the data tests: real files of every supported format, written into tmp_path."""
from __future__ import annotations

import json

import pytest


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_source(tmp_path, records, fmt: str, name: str = "data") -> str:
    """Write `records` as jsonl / json / parquet / a datasets save_to_disk folder; return the path."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / f"{name}.jsonl", records)
    if fmt == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        return str(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
        return str(path)
    if fmt == "datasets":
        import datasets

        path = tmp_path / name
        datasets.Dataset.from_list(records).save_to_disk(str(path))
        return str(path)
    raise ValueError(fmt)


@pytest.fixture()
def write(tmp_path):
    """`write(records, fmt, name="data") -> path` into this test's tmp_path."""
    return lambda records, fmt="jsonl", name="data": write_source(tmp_path, records, fmt, name)
