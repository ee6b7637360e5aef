"""The local scorers: reward model, verifier (import path and built-in task), local LM judge."""
from __future__ import annotations

import math
import textwrap

import pytest

from noisepo.errors import ConfigError
from noisepo.judges.base import Scorer


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A randomly initialised 1-label LlamaForSequenceClassification with the char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from noisepo.models import build_char_tokenizer

    path = tmp_path_factory.mktemp("reward_model")
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_scores_are_batch_independent(reward_model_dir):
    from noisepo.judges.reward_model import RewardModelScorer

    items = [("2+2=", "4"), ("What is the capital of France?", "Paris, of course."), ("x", "y" * 300)]
    batched = RewardModelScorer(reward_model_dir, batch_size=3, max_length=64, device="cpu")
    assert isinstance(batched, Scorer)
    scores = batched.score(items)
    one_by_one = RewardModelScorer(reward_model_dir, batch_size=1, max_length=64, device="cpu").score(items)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores == pytest.approx(one_by_one, abs=1e-4)  # padding must not change a score
    assert len(set(scores)) == 3
    assert batched.tokenizer.truncation_side == "right"  # restored after cutting from the left


def test_verifier_by_import_path(tmp_path, monkeypatch):
    from noisepo.judges.verifier import VerifierScorer

    (tmp_path / "my_verifier.py").write_text(textwrap.dedent("""
        def score(prompt, response):
            if response == "raise":
                raise ValueError("cannot judge")
            if response == "nan":
                return float("nan")
            return 1.0 if response.strip() == str(eval(prompt.rstrip("="))) else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = VerifierScorer("my_verifier:score")
    assert scorer.score([("2+3=", "5"), ("2+3=", "6"), ("1+1=", "raise"), ("1+1=", "nan")]) == [
        1.0, 0.0, None, None]
    assert scorer.failures == 2 and scorer.identity == "verifier|my_verifier:score"
    for bad in ("no_such_module_xyz:score", "my_verifier:missing", "not-a-task"):
        with pytest.raises(ConfigError):
            VerifierScorer(bad)


def test_verifier_of_a_built_in_task():
    from noisepo.judges.verifier import VerifierScorer

    scorer = VerifierScorer("addition")
    assert scorer.score([("21+32=", "53"), ("21+32=", "54")]) == [1.0, 0.0]


def test_local_lm_judge_reads_its_reply_strictly(micro_model_dir):
    from noisepo.judges.local_lm import LocalLMJudge

    judge = LocalLMJudge(micro_model_dir, max_new_tokens=4, batch_size=4, device="cpu")
    assert isinstance(judge, Scorer)
    items = [("2+2=", "4"), ("hello", "world")]
    scores = judge.score(items)  # a random model replies noise: failures, but no crash
    assert len(scores) == 2 and all(s is None or 1 <= s <= 100 for s in scores)
    assert len(judge.last_replies) == 2

    class Replies:  # a judge model that answers with these texts
        def __init__(self, replies):
            self.replies = replies
            self.prompts = []

        def generate(self, texts, params):
            self.prompts.extend(texts)
            return [[r] for r in self.replies]

    judge.generator = Replies(["57", " 9\n", "Score: 100", "100."])
    assert judge.score(items * 2) == [57.0, 9.0, None, None]
    assert judge.generator.prompts[0].startswith("<|user|>\n")  # the plain chat template of noisepo.data
    assert "<response>\n4\n</response>" in judge.generator.prompts[0]


def test_scorers_need_their_options():
    from noisepo.judges.local_lm import LocalLMJudge
    from noisepo.judges.reward_model import RewardModelScorer
    from noisepo.judges.verifier import VerifierScorer

    for make in (lambda: RewardModelScorer(None), lambda: LocalLMJudge(None), lambda: VerifierScorer("")):
        with pytest.raises(ConfigError):
            make()


def test_imperfect_verifier_errs_on_a_stable_fraction_of_items():
    from noisepo.judges.verifier import VerifierScorer

    items = [(f"{a}+{b}=", str(a + b + (a % 2))) for a in range(40) for b in range(25)]  # half wrong
    exact = VerifierScorer("addition").score(items)
    noisy = VerifierScorer("addition", error_rate=0.2)
    first, again = noisy.score(items), noisy.score(items)
    assert first == again  # the same item always gets the same verdict
    wrong = [i for i, (x, y) in enumerate(zip(exact, first)) if x != y]
    assert 0.16 < len(wrong) / len(items) < 0.24
    assert all(first[i] == 1.0 - exact[i] for i in wrong)
    assert noisy.identity == "verifier|addition|error_rate=0.2" != VerifierScorer("addition").identity


def test_verifier_error_rate_is_checked_and_reaches_dsl():
    from noisepo.config import from_dict
    from noisepo.errors import ConfigError
    from noisepo.judges.base import make_scorer
    from noisepo.pipelines.dnpo_config import DNPOConfig

    with pytest.raises(ConfigError, match="verifier_error_rate"):
        from_dict(DNPOConfig, {"model": "m", "data": "d", "output": "o",
                               "dsl": {"scorer": "verifier", "verifier": "addition", "verifier_error_rate": 1.5}})
    config = from_dict(DNPOConfig, {"model": "m", "data": "d", "output": "o",
                                    "dsl": {"scorer": "verifier", "verifier": "addition", "verifier_error_rate": 0.3}})
    assert make_scorer(config.dsl).error_rate == 0.3
