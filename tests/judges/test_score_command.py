"""`noisepo score`: every row and column kept, two scores added, failures counted, cache reused."""
from __future__ import annotations

import json
import textwrap

import pytest

from noisepo.cli import main
from noisepo.config import from_dict
from noisepo.errors import ConfigError
from noisepo.judges.config import ScoreConfig

PAIRS = [
    {"prompt": [{"role": "user", "content": "21+32="}], "chosen": [{"role": "assistant", "content": "53"}],
     "rejected": [{"role": "assistant", "content": "54"}], "id": "a", "extra": [1, 2]},
    {"prompt": [{"role": "user", "content": "0+97="}], "chosen": [{"role": "assistant", "content": "97"}],
     "rejected": [{"role": "assistant", "content": "raise"}], "id": "b"},
]


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def verifier_module(tmp_path, monkeypatch):
    (tmp_path / "calls_verifier.py").write_text(textwrap.dedent("""
        CALLS = []
        def score(prompt, response):
            CALLS.append((prompt, response))
            if response == "raise":
                raise ValueError("no")
            return 1.0 if str(eval(prompt.rstrip("="))) == response else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import calls_verifier

    calls_verifier.CALLS.clear()
    return calls_verifier


def test_score_keeps_rows_and_columns_and_counts_failures(tmp_path, verifier_module, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "scored.jsonl"
    argv = ["score", "--scorer", "verifier", "--verifier", "calls_verifier:score", "--data", data,
            "--output", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["extra"] == [1, 2]
    assert rows[1]["prompt"] == PAIRS[1]["prompt"]  # conversational columns kept as they were
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(1.0, 0.0), (1.0, None)]
    assert "1 failed" in capsys.readouterr().out
    assert (tmp_path / "scored.jsonl.cache.sqlite").exists()
    assert len(verifier_module.CALLS) == 4

    verifier_module.CALLS.clear()
    assert main(argv) == 0  # the rerun answers from the cache; only the failure is tried again
    assert verifier_module.CALLS == [("0+97=", "raise")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_no_cache_option(tmp_path, verifier_module):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:1])
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--scorer", "verifier", "--verifier", "calls_verifier:score", "--data", data,
                 "--output", str(out), "--no-cache"]) == 0
    assert not list(tmp_path.glob("*.sqlite"))


def test_all_failed_exits_1(tmp_path, judge_factory, fault_server, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "chatter", "rejected": "bad400"}])
    out = tmp_path / "scored.jsonl"
    status = main(["score", "--scorer", "openai", "--base-url", fault_server.url, "--judge-model", "judge",
                   "--api-key-env", "NOISEPO_TEST_KEY", "--max-retries", "0", "--data", data,
                   "--output", str(out)])
    assert status == 1
    row = json.loads(out.read_text())
    assert row["chosen_score"] is None and row["rejected_score"] is None
    assert "2 failed" in capsys.readouterr().out


@pytest.mark.parametrize("options, key", [
    ({"scorer": "reward-model"}, "model"), ({"scorer": "local-lm"}, "model"),
    ({"scorer": "verifier"}, "verifier"), ({"max_concurrency": 0}, "max_concurrency"),
    ({"timeout": 0}, "timeout"), ({"scorer": "nope"}, "scorer"), ({"output": ""}, "output"),
])
def test_config_validation(options, key):
    with pytest.raises(ConfigError) as err:
        from_dict(ScoreConfig, {"data": "d.jsonl", "output": "o.jsonl", **options})
    assert err.value.key == key
