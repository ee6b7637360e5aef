"""The OpenAI-compatible judge under load: 2,000 items, 30 % of them faulty, 16 requests in flight.

Every item ends scored or counted as failed, nothing crashes, memory stays bounded, the server never
sees more than 16 requests at once, and a rerun over the same cache sends no request for an item
already scored (the server's per-text hit counts do not move). Backoff sleeps are recorded, not
slept (judge_factory), and timeouts are short, so the whole test takes seconds.
"""
from __future__ import annotations

import random
from collections import Counter

N_ITEMS = 2000
# behaviour -> (share of the items, the score it should end with: "value", or None = counted failed)
MIX = {
    "ok": (0.70, "value"),
    "flaky500": (0.07, "value"),  # 500 once, then the answer
    "limit429": (0.06, "value"),  # 429 twice (Retry-After: 0), then the answer
    "drop": (0.05, "value"),  # the connection closed without an answer once
    "stall": (0.01, "value"),  # the first answer comes after the client's timeout
    "garbage": (0.04, None),  # HTTP 200 with a body that is not JSON: not retried
    "always500": (0.04, None),  # retries spent, then failed
    "chatter": (0.02, None),  # an answer that is not a bare score
    "stallforever": (0.01, None),  # every attempt times out
}


def memory_kib() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of this process, in KiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def count_in_flight(judge) -> dict:
    """Wrap the judge's client call to count the requests it has open at once."""
    import threading

    state, lock = {"now": 0, "max": 0}, threading.Lock()
    completions = judge._client.chat.completions
    real = completions.create

    def create(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    completions.create = create
    return state


def make_items(seed: int = 0) -> tuple[list[tuple[str, str]], list[float | None]]:
    rng = random.Random(seed)
    names = list(MIX)
    behaviours = rng.choices(names, weights=[MIX[n][0] for n in names], k=N_ITEMS)
    items, expected = [], []
    for i, behaviour in enumerate(behaviours):
        value = rng.randint(1, 100)
        suffix = "" if behaviour in ("garbage", "always500", "chatter", "stallforever") else f":{value}"
        items.append((f"question {i}", f"{behaviour}{suffix}@{i}"))  # '@i' makes every text unique
        expected.append(float(value) if MIX[behaviour][1] == "value" else None)
    return items, expected


def test_2000_items_with_30_percent_faults_and_16_in_flight(judge_factory, fault_server, tmp_path):
    from noisepo.judges.cache import CachedScorer

    items, expected = make_items()
    faulty = sum(not response.startswith("ok:") for _, response in items)
    assert 0.25 * N_ITEMS < faulty < 0.35 * N_ITEMS
    before = memory_kib()

    judge = judge_factory(max_concurrency=16, timeout=0.75, max_retries=2)
    in_flight = count_in_flight(judge)
    cached = CachedScorer(judge, tmp_path / "cache.sqlite")
    scores = cached.score(items)
    cached.close()

    assert len(scores) == N_ITEMS and scores == expected  # each item: its score, or None (counted failed)
    stats = judge.stats
    failed = sum(s is None for s in scores)
    assert stats["scored"] == N_ITEMS - failed
    # each failed item counted once, under the reason of its last attempt; none lost
    behaviours = Counter(response.split(":")[0].split("@")[0] for _, response in items)
    assert judge.failure_reasons == {"bad_response": behaviours["garbage"], "http_500": behaviours["always500"],
                                     "unparsable": behaviours["chatter"],
                                     "APITimeoutError": behaviours["stallforever"]}
    assert cached.summary()["failure_reasons"] == judge.failure_reasons and cached.summary()["failed"] == failed
    # garbage and chatter answer every request badly: asked 1 + max_retries times, at once
    assert stats["unparsable_retries"] == 2 * (behaviours["garbage"] + behaviours["chatter"])
    # the pool was used, and bounded (counted by the client: the server still holds stalled requests
    # after the client has given up on them)
    assert 8 <= in_flight["max"] <= 16
    after = memory_kib()
    grown_mib = (after["VmRSS"] - before["VmRSS"]) / 1024
    peak_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    assert grown_mib < 200 and peak_mib < 400, (grown_mib, peak_mib)

    # A rerun over the same cache: no request for an item already scored; the failures are tried again.
    hits = dict(fault_server.hits)
    rerun_judge = judge_factory(max_concurrency=16, timeout=0.75, max_retries=0)
    rerun = CachedScorer(rerun_judge, tmp_path / "cache.sqlite")
    again = rerun.score(items)
    rerun.close()
    for (_, response), first, second in zip(items, scores, again, strict=True):
        if first is not None:
            assert fault_server.hits[response] == hits[response] and second == first, response
        else:
            assert fault_server.hits[response] == hits[response] + 1, response
    assert rerun.hits == N_ITEMS - failed and rerun.misses == failed
