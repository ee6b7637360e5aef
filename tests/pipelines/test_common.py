import math

import pytest

from noisepo.pipelines.common import LossOptions, load_policy, pair_logps, response_logps, train_pairs
from noisepo.training.config import OptimOptions


def _records(n=8):
    return [{"id": i, "prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(n)]


def test_pair_logps_match_response_logps_and_are_order_independent(micro_model_dir):
    model, tok = load_policy(micro_model_dir)
    records = _records(5) + [{"prompt": "123456+654321=", "chosen": "777777", "rejected": "7"}]
    scored = pair_logps(model, tok, records, max_length=64, batch_size=4)
    singles = response_logps(model, tok, [r["prompt"] for r in records], [r["rejected"] for r in records],
                             max_length=64, batch_size=3)
    for s, single, r in zip(scored, singles, records):
        assert math.isclose(s["rejected"], single, rel_tol=1e-4, abs_tol=1e-4)
        assert s["chosen_count"] == len(r["chosen"]) + 1  # + EOS
    reversed_scores = pair_logps(model, tok, records[::-1], max_length=64, batch_size=2)[::-1]
    assert all(math.isclose(a["chosen"], b["chosen"], rel_tol=1e-4, abs_tol=1e-4)
               for a, b in zip(scored, reversed_scores))


def test_pair_logps_batch_each_side_with_sequences_of_its_length(micro_model_dir):
    """The long sides of two pairs share a batch and the short sides another, instead of each pair's
    short side being padded to its long one; the numbers are those of one sequence at a time."""
    model, tok = load_policy(micro_model_dir)
    records = [{"prompt": "1+1=", "chosen": "2" * 30, "rejected": "2"}, {"prompt": "2+2=", "chosen": "4", "rejected": "4" * 30}]
    widths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    scored = pair_logps(model, tok, records, max_length=64, batch_size=1)
    hook.remove()
    assert len(widths) == 2 and widths[0][0] == widths[1][0] == 2 and widths[0][1] > 2 * widths[1][1]
    one_at_a_time = [response_logps(model, tok, [r["prompt"]], [r[side]], max_length=64, batch_size=1)[0]
                     for r in records for side in ("chosen", "rejected")]
    together = [s[side] for s in scored for side in ("chosen", "rejected")]
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) for a, b in zip(together, one_at_a_time))


@pytest.mark.parametrize("given_reference", [False, True])
def test_train_pairs_saves_a_model_and_raises_the_margin(micro_model_dir, tmp_path, given_reference):
    records = _records()
    model, tok = load_policy(micro_model_dir)
    before = pair_logps(model, tok, records, max_length=64)
    if given_reference:
        records = [{**r, "reference_chosen_logps": s["chosen"], "reference_rejected_logps": s["rejected"]}
                   for r, s in zip(records, before)]
    options = OptimOptions(learning_rate=5e-3, max_steps=8, batch_size=4, warmup_ratio=0.0, report_to=["none"],
                           lr_scheduler="constant", logging_steps=1)
    metrics = train_pairs(records, init_model=micro_model_dir, output=tmp_path / "out", options=options,
                          loss=LossOptions("dpo", beta=0.5))
    assert metrics["global_step"] == 8 and (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / "trainer").exists()
    trained, tok2 = load_policy(str(tmp_path / "out" / "model"))
    after = pair_logps(trained, tok2, records, max_length=64)
    margin = lambda s: sum(x["chosen"] - x["rejected"] for x in s)  # noqa: E731
    assert margin(after) > margin(before) + 1.0


def test_no_progress_silences_loading_training_and_evaluation(micro_model_dir, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from noisepo.pipelines.common import evaluate_task, transformers_progress

    records = [{"prompt": "1+1=", "answer": "2"}]
    options = OptimOptions(max_steps=1, batch_size=2, report_to=["none"])
    evaluate_task(micro_model_dir, None, records, max_new_tokens=2, progress=True)
    shown = capfd.readouterr().err  # the bars exist, so their absence below means something
    assert "generate" in shown and "Loading weights" in shown
    with transformers_progress(False):
        result = evaluate_task(micro_model_dir, None, records, max_new_tokens=2, progress=False)
        train_pairs(_records(2), init_model=micro_model_dir, output=tmp_path / "out", options=options,
                    loss=LossOptions(), progress=False)
    err = capfd.readouterr().err
    assert result["n"] == 1 and "Loading weights" not in err and "generate" not in err and "%|" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored after the block
