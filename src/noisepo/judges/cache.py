"""A persistent score cache (SQLite) that wraps any scorer (`CachedScorer`) or pairwise judge
(`CachedComparer`).

Key: SHA-256 of (identity, prompt, response) or, pairwise, (identity, prompt, response_a,
response_b): the order in which the two responses were shown is part of the key, so the two
orders of a position swap are two entries. Every successful value is committed in its own
transaction the moment it arrives (WAL journal), so after a crash or a kill a rerun repeats no
request that had succeeded. Failures (None) are never cached: a rerun tries them again, and they
are counted by reason (`summary()`), never dropped. Safe to share between threads of one process
and between processes (SQLite locking).
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from noisepo.judges.common import Item, PairItem

_SCHEMA = """CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    score REAL NOT NULL,
    identity TEXT NOT NULL,
    created REAL NOT NULL
)"""


def cache_key(identity: str, *texts: str) -> str:
    """The key of (identity, prompt, response) or (identity, prompt, response_a, response_b)."""
    # JSON framing keeps ("ab", "c") and ("a", "bc") apart.
    return hashlib.sha256(json.dumps([identity, *texts]).encode("utf-8")).hexdigest()


_TIMEOUT_S = 30.0


def retry_while_locked(statement, timeout: float = _TIMEOUT_S):
    """Run `statement()` again while SQLite says the database is locked, for up to `timeout` s.

    Processes that open a new cache file at once (the ranks of a distributed run) can each hold a
    shared lock and want the exclusive one, to switch the file to WAL or to create the table. SQLite
    breaks that deadlock by failing one of them at once with "database is locked", without waiting
    out its busy timeout. Retrying after the other is done is then the way through.
    """
    deadline, delay = time.monotonic() + timeout, 0.01
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as err:
            message = str(err)
            if ("locked" not in message and "busy" not in message) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


class ScoreCache:
    """key -> score in one SQLite file."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=_TIMEOUT_S, check_same_thread=False,
                                     isolation_level=None)  # autocommit; transactions are explicit
        retry_while_locked(lambda: self._conn.execute("PRAGMA journal_mode=WAL"))
        retry_while_locked(lambda: self._conn.execute(_SCHEMA))

    def get_many(self, keys: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk)
                found.update(rows.fetchall())
        return found

    def put(self, key: str, score: float, identity: str) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                                   (key, float(score), identity, time.time()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Cached:
    """Answer from the cache and send only the misses to the wrapped judge's `method`.

    Identical items within one call are judged once. Judges without `<method>_stream` are called in
    chunks of `chunk_size` misses, committing after each chunk.
    """

    method = "score"

    def __init__(self, scorer, path, *, chunk_size: int = 64):
        self.scorer = scorer
        self.identity = scorer.identity
        self.cache = ScoreCache(path)
        self.chunk_size = chunk_size
        self.hits = 0
        self.misses = 0
        self.scored = 0  # misses that got a value
        self.failures: Counter[str] = Counter()  # misses that failed, by reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scorer!r}, path={str(self.cache.path)!r})"

    def _lookup(self, items: list[tuple[str, ...]]) -> list[float | None]:
        keys = [cache_key(self.identity, *item) for item in items]
        known: dict[str, float | None] = dict(self.cache.get_many(sorted(set(keys))))
        self.hits += sum(1 for k in keys if k in known)
        todo: dict[str, tuple[str, ...]] = {}
        for key, item in zip(keys, items, strict=True):
            if key not in known:
                todo.setdefault(key, item)
        self.misses += len(todo)
        reasons_before = Counter(getattr(self.scorer, "failure_reasons", None) or {})
        failed = 0
        for key, value in self._judge_misses(list(todo.items())):
            if value is not None:
                value = float(value) + 0.0  # -0.0 -> 0.0: SQLite returns it as 0.0, and a resumed
                # run must write the bytes a fresh one writes
            known[key] = value
            if value is not None and math.isfinite(value):
                self.cache.put(key, value, self.identity)
                self.scored += 1
            else:
                failed += 1
        self._count_failures(failed, reasons_before)
        return [known.get(k) for k in keys]

    def _count_failures(self, failed: int, before: Counter) -> None:
        """Add this call's failures by the judge's reasons; any it gave none for are `unreported`,
        so the reasons always add up to the failures."""
        after = Counter(getattr(self.scorer, "failure_reasons", None) or {})
        reasons = after - before
        given = sum(reasons.values())
        self.failures.update(reasons)
        if failed > given:
            self.failures["unreported" if hasattr(self.scorer, "failure_reasons") else "failed"] += failed - given

    def _judge_misses(self, todo: list[tuple[str, tuple[str, ...]]]) -> Iterator[tuple[str, float | None]]:
        if not todo:
            return
        items = [item for _, item in todo]
        stream = getattr(self.scorer, f"{self.method}_stream", None)
        if stream is not None:
            for index, value in stream(items):
                yield todo[index][0], value
            return
        judge = getattr(self.scorer, self.method)
        for start in range(0, len(todo), self.chunk_size):
            values = judge(items[start:start + self.chunk_size])
            for (key, _), value in zip(todo[start:start + self.chunk_size], values, strict=True):
                yield key, value

    def summary(self) -> dict:
        """What this cache and its judge did so far: answered from the cache, newly judged, failed by
        reason, and the judge's retries (API judge: all retries, and those of unparsable replies)."""
        stats = getattr(self.scorer, "stats", None) or {}
        return {"cached": self.hits, "judged": self.misses, "scored": self.scored,
                "failed": sum(self.failures.values()), "failure_reasons": dict(sorted(self.failures.items())),
                "retries": int(stats.get("retries", 0)),
                "unparsable_retries": int(stats.get("unparsable_retries", 0))}

    def close(self) -> None:
        self.cache.close()


class CachedScorer(_Cached):
    """`Scorer` that answers from the cache and sends only the misses to `scorer`."""

    method = "score"

    def score(self, items: list[Item]) -> list[float | None]:
        return self._lookup(items)


class CachedComparer(_Cached):
    """`Comparer` that answers from the cache and sends only the misses to `comparer`; each order of
    a pair is its own entry."""

    method = "compare"

    def compare(self, items: list[PairItem]) -> list[float | None]:
        return self._lookup(items)


def merge_summaries(summaries: list[dict]) -> dict:
    """One summary from several processes' `summary()` (counts add up, reasons by name)."""
    merged: dict = {}
    reasons: Counter[str] = Counter()
    for summary in summaries:
        for key, value in summary.items():
            if key == "failure_reasons":
                reasons.update(value)
            else:
                merged[key] = merged.get(key, 0) + value
    merged["failure_reasons"] = dict(sorted(reasons.items()))
    return merged
