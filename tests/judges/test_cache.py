"""The SQLite score cache: a rerun repeats no finished call; failures are retried."""
from __future__ import annotations

import os

import pytest

from noisepo.judges.cache import CachedScorer, cache_key


class CountingScorer:
    """Scores len(response); responses starting with "fail" fail; "boom" raises."""

    def __init__(self, identity="count|v1"):
        self.identity = identity
        self.seen: list[tuple[str, str]] = []

    def score(self, items):
        self.seen.extend(items)
        out = []
        for _, response in items:
            if response == "boom":
                raise RuntimeError("crash")
            out.append(None if response.startswith("fail") else float(len(response)))
        return out


class StreamingScorer(CountingScorer):
    def score_stream(self, items):
        for index, item in enumerate(items):
            yield index, self.score([item])[0]


def test_second_run_is_answered_from_the_cache(tmp_path):
    items = [("p", "a"), ("p", "bb"), ("p", "fail-1"), ("q", "a"), ("p", "a")]
    first = CountingScorer()
    assert CachedScorer(first, tmp_path / "c.sqlite").score(items) == [1.0, 2.0, None, 1.0, 1.0]
    assert len(first.seen) == 4  # the duplicate ("p", "a") was scored once
    again = CountingScorer()
    cached = CachedScorer(again, tmp_path / "c.sqlite")  # a new process would open it the same way
    assert cached.score(items) == [1.0, 2.0, None, 1.0, 1.0]
    assert again.seen == [("p", "fail-1")]  # only the failure is tried again
    assert cached.hits == 4 and cached.misses == 1


def test_identity_is_part_of_the_key(tmp_path):
    CachedScorer(CountingScorer("judge-a"), tmp_path / "c.sqlite").score([("p", "abc")])
    other = CountingScorer("judge-b")
    CachedScorer(other, tmp_path / "c.sqlite").score([("p", "abc")])
    assert other.seen == [("p", "abc")]
    assert cache_key("i", "ab", "c") != cache_key("i", "a", "bc")


@pytest.mark.parametrize("scorer_cls, chunk_size", [(StreamingScorer, 64), (CountingScorer, 2)])
def test_scores_finished_before_a_crash_are_kept(tmp_path, scorer_cls, chunk_size):
    items = [("p", "a"), ("p", "bb"), ("p", "ccc"), ("p", "boom"), ("p", "eeeee")]
    with pytest.raises(RuntimeError):
        CachedScorer(scorer_cls(), tmp_path / "c.sqlite", chunk_size=chunk_size).score(items)
    rerun = scorer_cls()
    fixed = [item if item[1] != "boom" else ("p", "dddd") for item in items]
    assert CachedScorer(rerun, tmp_path / "c.sqlite").score(fixed) == [1.0, 2.0, 3.0, 4.0, 5.0]
    done_before = [("p", "a"), ("p", "bb")] if chunk_size == 2 else [("p", "a"), ("p", "bb"), ("p", "ccc")]
    assert not set(done_before) & set(rerun.seen)


def test_a_restart_sends_no_finished_request_to_the_server(judge_factory, fault_server, tmp_path):
    items = [("q", "ok:10"), ("q", "ok:20"), ("q", "always500"), ("q", "chatter")]
    path = tmp_path / "judge.sqlite"
    assert CachedScorer(judge_factory(max_retries=0), path).score(items) == [10.0, 20.0, None, None]
    hits_before = dict(fault_server.hits)
    assert CachedScorer(judge_factory(max_retries=0), path).score(items) == [10.0, 20.0, None, None]
    assert fault_server.hits["ok:10"] == hits_before["ok:10"] == 1
    assert fault_server.hits["ok:20"] == 1
    assert fault_server.hits["always500"] == 2 and fault_server.hits["chatter"] == 2  # failures retried


def test_wal_mode(tmp_path):
    cached = CachedScorer(CountingScorer(), tmp_path / "c.sqlite")
    mode = cached.cache._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_cached_score_is_the_fresh_one_bit_for_bit(tmp_path):
    """SQLite gives -0.0 back as 0.0: a resumed run must still write what a fresh one writes."""
    import math

    class Signed:
        identity = "signed|v1"

        def score(self, items):
            return [-0.0, 2.5][: len(items)]

    items = [("p", "a"), ("p", "b")]
    fresh = CachedScorer(Signed(), tmp_path / "c.sqlite").score(items)
    cached = CachedScorer(Signed(), tmp_path / "c.sqlite").score(items)
    assert [math.copysign(1, x) for x in fresh] == [math.copysign(1, x) for x in cached] == [1, 1]
    assert repr(fresh) == repr(cached) == "[0.0, 2.5]"


def _open_and_put(path, barrier, results):
    from noisepo.judges.cache import ScoreCache

    barrier.wait()  # every process opens the new file at the same moment
    try:
        cache = ScoreCache(path)
        cache.put(f"key-{os.getpid()}", 1.0, "test")
        cache.close()
        results.put(None)
    except Exception as err:  # reported to the parent: a child's traceback would be lost
        results.put(repr(err))


def test_processes_opening_a_new_cache_at_once_all_get_in(tmp_path):
    """The ranks of a distributed run open the shared cache together. Two of them can deadlock on
    SQLite's locks while switching the new file to WAL, and SQLite then fails one at once with
    "database is locked" (seen in CI: ~1 trial in 20 of 4 processes before the retry)."""
    import multiprocessing

    from noisepo.judges.cache import ScoreCache

    context = multiprocessing.get_context("fork")
    processes = 4
    for trial in range(60):
        path = tmp_path / f"{trial}.sqlite"
        barrier, results = context.Barrier(processes), context.Queue()
        children = [context.Process(target=_open_and_put, args=(path, barrier, results)) for _ in range(processes)]
        for child in children:
            child.start()
        errors = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join()
        assert errors == [None] * processes, (trial, errors)
        assert len(ScoreCache(path)) == processes


def test_retry_while_locked_retries_only_lock_errors_and_gives_up_at_the_timeout():
    import sqlite3

    from noisepo.judges.cache import retry_while_locked

    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert retry_while_locked(locked_twice) == "done" and len(calls) == 3

    def broken():
        calls.append(1)
        raise sqlite3.OperationalError("no such table: scores")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_while_locked(broken)
    assert len(calls) == 1  # not a lock: raised at once

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_while_locked(always_locked, timeout=0.05)


def test_failures_are_counted_by_reason_and_add_up(tmp_path):
    from collections import Counter

    from noisepo.judges.cache import merge_summaries

    class Reasoned(CountingScorer):
        def __init__(self):
            super().__init__("reasoned|v1")
            self.failure_reasons = Counter()

        def score(self, items):
            out = super().score(items)
            self.failure_reasons["too_short"] += sum(v is None and r == "fail-a" for v, (_, r) in zip(out, items))
            return out  # "fail-b" fails without a reason given

    items = [("p", "a"), ("p", "fail-a"), ("p", "fail-b"), ("p", "fail-a")]
    cached = CachedScorer(Reasoned(), tmp_path / "r.sqlite")
    assert cached.score(items) == [1.0, None, None, None]
    summary = cached.summary()
    assert summary["failure_reasons"] == {"too_short": 1, "unreported": 1}  # the duplicate is asked once
    assert (summary["scored"], summary["failed"], summary["judged"]) == (1, 2, 3)
    plain = CachedScorer(CountingScorer(), tmp_path / "c.sqlite")  # a scorer that gives no reasons
    plain.score(items)
    assert plain.summary()["failure_reasons"] == {"failed": 2}
    merged = merge_summaries([summary, plain.summary()])
    assert merged["failure_reasons"] == {"failed": 2, "too_short": 1, "unreported": 1} and merged["failed"] == 4
