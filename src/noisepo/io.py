"""Atomic file writes and JSONL helpers shared by every stage.

A stage's artifact is written to a temporary file in the same folder, flushed, fsynced and then
renamed over the target, so a reader never sees a half-written file (rename is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `path`; on clean exit fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" in mode:
        encoding = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path, obj: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")


def write_jsonl_atomic(path, records: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically. Returns the number of records."""
    count = 0
    with atomic_open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def append_jsonl(path, records: Iterable[dict]) -> None:
    """Append records and fsync: for resumable outputs written row by row.

    A kill can leave a torn last line; `read_jsonl_prefix` drops it on resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path) -> list[dict]:
    """Every record of a JSONL file written whole (`write_jsonl_atomic`); blank lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_jsonl_prefix(path) -> list[dict]:
    """Read the complete lines of an append-only JSONL file, truncating a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return [json.loads(line) for line in raw[:good_end].decode("utf-8").splitlines() if line.strip()]
