"""`noisepo dnpo --dsl.mode pairwise` end to end on the micro model, with a pairwise reward model by
import path: both orders of every pair are asked, the pair flips when the model's response wins
both, ties are counted, and the per-iteration table shows ties, judge failures and unparsable
retries. The reward model (written into the test's folder) prefers the longer response, with
P(A beats B) = len(A) / (len(A) + len(B)): equal lengths give 0.5 in both orders, a tie.
"""
from __future__ import annotations

import json
import sys
import textwrap

from noisepo.cli import main

LONGER = '''
CALLS = []

class Longer:
    identity = "longer-v1"
    def compare(self, prompt, a, b):
        CALLS.append((prompt, a, b))
        return len(a) / (len(a) + len(b)) if a or b else 0.5
'''


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dnpo_pairwise_flips_when_the_model_wins_both_orders(micro_model_dir, tmp_path, monkeypatch, capsys):
    from noisepo.judges.command import prompt_text
    from noisepo.tasks import load_task

    (tmp_path / "longer_rm.py").write_text(textwrap.dedent(LONGER))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("longer_rm", None)
    rows = load_task("addition").sft_data(8, seed=0)
    rows[0]["completion"], rows[1]["completion"] = "1234567890", "===="  # longer than the model's; its twin
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["dnpo", "--model", micro_model_dir, "--data", str(data), "--output", str(out), "--iterations", "2",
            "--no-progress", "--generation.max-new-tokens", "4", "--training.max-steps", "1",
            "--training.batch-size", "8", "--training.report-to", "none", "--training.max-length", "32",
            "--task", "addition", "--eval-limit", "3", "--eval-max-new-tokens", "3", "--win-rate",
            "--dsl.mode", "pairwise", "--dsl.scorer", "pairwise-rm", "--dsl.pairwise-model", "longer_rm:Longer"]
    assert main(argv) == 0
    import longer_rm

    generations = read_jsonl(out / "iter_1" / "generations.jsonl")
    scores = read_jsonl(out / "iter_1" / "scores.jsonl")
    assert set(scores[0]) == {"index", "human_wins_as_a", "model_wins_as_a"}
    for g, s in zip(generations, scores, strict=True):
        human, model, prompt = g["completion"], g["response"], prompt_text(g["prompt"])
        assert (prompt, human, model) in longer_rm.CALLS and (prompt, model, human) in longer_rm.CALLS
        assert s["human_wins_as_a"] == len(human) / (len(human) + len(model))
        assert s["model_wins_as_a"] == len(model) / (len(model) + len(human))
    longer = sum(len(g["response"]) > len(g["completion"]) for g in generations)
    equal = sum(len(g["response"]) == len(g["completion"]) for g in generations)
    metrics = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert metrics["flipped"] == longer >= 1 and metrics["ties"] == equal >= 1
    assert metrics["scorer_failures"] == 0 and metrics["unparsable_retries"] == 0
    assert metrics["stages"]["score"]["mode"] == "pairwise"
    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
    assert all((p["verdict"] == "model") == p["flipped"] for p in pairs)
    assert all(len(p["chosen"]) >= len(p["rejected"]) for p in pairs)  # the longer one wins, or a tie
    win_rate = json.loads((out / "iter_1" / "win_rate.json").read_text())
    assert win_rate["wins"] + win_rate["ties"] + win_rate["losses"] + win_rate["failures"] == 3
    table = capsys.readouterr().out
    assert "ties" in table and "judge failed" in table and "unparsable retries" in table

    calls = len(longer_rm.CALLS)
    assert main(argv) == 0  # a rerun: every stage done, nothing judged again
    assert len(longer_rm.CALLS) == calls
