"""ROPO benchmark: the per-round scoring pass against one training epoch on the same pairs.

`BENCHMARKS[name](quick) -> {"name", "ours", "baseline", "unit", "ratio", ...}` (see run.py).

ropo_scoring_vs_epoch: ROPO scores every original pair with ℓ_ropo each round (METHODS §5.1 step
2), on top of the round's training epoch; the question is what that costs. Same tiny Llama (preset
`tiny`, char tokenizer), same pairs of varied lengths (`bench_training.synthetic_records`), float32,
one CPU thread, the reference log-probs precomputed once and carried in the records (as the loop
does: the reference is the initial model in every round).
- ours: the scoring pass exactly as the loop runs it, `noisepo.pipelines.ropo_scores` over
  `pipelines.common.pair_logps` (tokenise; each side of a pair is its own sequence, in longest-first
  batches of 2 × `--score-batch-size` sequences, the command's default 16 pairs; forward only, eval
  mode, no grad), loss computed from the stored reference columns;
- baseline: one epoch of `PreferenceTrainer` with loss `ropo` on the same pairs (its dataloader
  and collator, `training_step` = forward + backward, the optimizer step), batch size 8 (the
  default), reference columns given so it does no reference pass either.
Alternating after a warm-up, median of the rounds; ratio = scoring seconds ÷ epoch seconds (lower
is better; target <= 0.35). On one CPU thread larger scoring batches are slower per token (64 pairs,
quick: ratio 0.29 at 8 and 16 pairs per batch, 0.43 at 32), hence the command's default of 16.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import Stepper, build_model, synthetic_records  # noqa: E402

BETA, ALPHA = 0.1, 14.0
TRAIN_BATCH, MAX_LENGTH = 8, 512


def default_score_batch() -> int:
    from noisepo.pipelines.ropo_config import ROPOConfig

    return ROPOConfig.__dataclass_fields__["score_batch_size"].default


SCORE_BATCH = default_score_batch()


def with_reference(model, tokenizer, records: list[dict]) -> list[dict]:
    from noisepo.pipelines.common import pair_logps

    scored = pair_logps(model, tokenizer, records, max_length=MAX_LENGTH, batch_size=SCORE_BATCH)
    return [{**r, "reference_chosen_logps": s["chosen"], "reference_rejected_logps": s["rejected"]}
            for r, s in zip(records, scored)]


def ropo_scoring_vs_epoch(quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from noisepo.pipelines.common import pair_logps
    from noisepo.pipelines.ropo import ropo_scores
    from noisepo.training.collate import encode_pair
    from noisepo.training.preference import PreferenceTrainer

    torch.set_num_threads(1)
    n_pairs, rounds = (64, 5) if quick else (256, 7)
    records = synthetic_records(n_pairs)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", records)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
        records = with_reference(model, tokenizer, records)
        steps = -(-n_pairs // TRAIN_BATCH)  # one epoch
        args = TrainingArguments(output_dir=str(Path(tmp) / "train"), per_device_train_batch_size=TRAIN_BATCH,
                                 max_steps=steps * (rounds + 1), learning_rate=1e-6, report_to="none",
                                 save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 dataloader_pin_memory=False, seed=0)
        pairs = [encode_pair(tokenizer, r, max_length=MAX_LENGTH) for r in records]
        trainer = PreferenceTrainer(model, args, pairs, loss="ropo", beta=BETA, alpha=ALPHA,
                                    reference="precompute", processing_class=tokenizer)
        stepper = Stepper(trainer)

        def score() -> float:
            start = time.perf_counter()
            policy = pair_logps(trainer.model, tokenizer, records, max_length=MAX_LENGTH, batch_size=SCORE_BATCH)
            ropo_scores(policy, records, beta=BETA, alpha=ALPHA)
            return time.perf_counter() - start

        def epoch() -> float:
            seconds, _ = stepper.run(steps)
            return seconds

        score(), stepper.run(2)  # warm-up
        times: dict[str, list[float]] = {"score": [], "epoch": []}
        for round_ in range(rounds):
            order = (("score", score), ("epoch", epoch))
            for name, fn in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(fn())
    ours, baseline = statistics.median(times["score"]), statistics.median(times["epoch"])
    return {"name": "ropo_scoring_vs_epoch", "ours": round(ours, 3), "baseline": round(baseline, 3),
            "unit": "s per pass over the set", "ratio": round(ours / baseline, 3), "target": "<= 0.35",
            "pairs": n_pairs, "rounds": rounds, "score_batch_size": SCORE_BATCH, "train_batch_size": TRAIN_BATCH,
            "model": "tiny preset (4 layers, width 128, char vocab), float32, 1 thread",
            "note": "ratio = scoring ÷ epoch: lower is better",
            "notes": f"{n_pairs} pairs, scoring batch {SCORE_BATCH}, training batch {TRAIN_BATCH}"}


BENCHMARKS = {"ropo_scoring_vs_epoch": ropo_scoring_vs_epoch}
