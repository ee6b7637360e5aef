"""`noisepo dnpo` and `noisepo ropo` under 2 CPU processes (torchrun, gloo) write what 1 process
writes with the same global batch: the same generations, scores and pairs (byte for byte), the same
ROPO reference, kept set and refills, and training losses that agree to float rounding (NPO's: to
the spread of its random ε, which each process draws for its own rows). (Equal
steps need full global batches: on a ragged last batch accelerate repeats pairs to give every rank
one, so ROPO here stops after 5 steps of 4 pairs.) A rerun of
the 2-process command resumes: every rank agrees that every stage is done, nothing is rewritten.

One launch runs both loops (in one process per rank, so the second loop also checks that a loop
joins the process group the first one left initialised); that keeps the cost to three launches.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = textwrap.dedent('''
    import sys
    from noisepo.cli import main

    model, sft, pairs, out, batch = sys.argv[1:6]
    common = ["--model", model, "--no-progress", "--beta", "0.5", "--training.report-to", "none",
              "--training.learning-rate", "5e-3", "--training.warmup-ratio", "0", "--training.logging-steps", "1",
              "--training.batch-size", batch]
    dnpo = ["dnpo", "--data", sft, "--output", out + "/dnpo", "--iterations", "2", "--generation.max-new-tokens", "4",
            "--training.max-length", "32", "--training.max-steps", "2", "--dsl.scorer", "verifier",
            "--dsl.verifier", "addition", "--task", "addition", "--eval-limit", "4", "--eval-max-new-tokens", "4",
            # sigma0 pinned small: the losses below are compared to the spread of the ε draw, which
            # grows with σ (the default 0.5 gave 0.662 against 0.752 on 4 pairs a step)
            "--npo.sigma0", "0.01"]
    ropo = ["ropo", "--data", pairs, "--output", out + "/ropo", "--rounds", "2", "--samples", "2",
            "--no-filter-misranked-only", "--refill-rule", "best-worst",  # exactly ρN discarded, ρN refilled
            "--max-new-tokens", "6", "--training.max-length", "64",
            "--training.max-steps", "5"]  # full steps only: round 1 trains on 23 pairs, 4 per step
    assert main(dnpo + common) == 0
    assert main(ropo + common) == 0
''')


def rule_pairs(n: int = 24) -> list[dict]:
    """chosen = a run of 'a', rejected = as many 'b' (as tests/pipelines/test_ropo.py); every 4th pair
    flipped; prompts Q0..Q3 appear twice, so a round can discard two pairs of one prompt."""
    out = []
    for i in range(n):
        good, bad = "a" * (3 + i % 4), "b" * (3 + i % 4)
        flipped = i % 4 == 0
        out.append({"id": i, "prompt": f"Q{i % (n - 4)}:", "chosen": bad if flipped else good,
                    "rejected": good if flipped else bad, "label_flipped": flipped})
    return out


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markers(root: Path) -> dict[str, str]:
    """Every stage marker, without its timing fields."""
    out = {}
    for marker in sorted(root.rglob(".*.done")):
        summary = json.loads(marker.read_text())
        out[str(marker.relative_to(root))] = {k: v for k, v in summary.items() if k not in ("finished_at", "seconds")}
    return out


def close(a, b, rel=1e-4) -> bool:
    return a is None and b is None or math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_model_dir):
    from noisepo.tasks import load_task

    tmp = tmp_path_factory.mktemp("loops")
    sft = tmp / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in load_task("addition").sft_data(16, seed=0, error_rate=0.25)))
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rule_pairs()))  # 24 pairs, 6 of them flipped
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    one, two = tmp / "one", tmp / "two"
    run([sys.executable, str(driver), micro_model_dir, str(sft), str(pairs), str(one), "4"])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
              micro_model_dir, str(sft), str(pairs), str(two), "2"]
    run(launch)
    def written():  # summary.json is the loop's printout, rewritten (the same) by every run
        return {p: p.stat().st_mtime_ns for p in two.rglob("*")
                if p.is_file() and p.name not in (".lock", "summary.json")}

    before = written()
    resumed = run(launch)  # every stage done: both ranks skip them all
    after = written()
    return one, two, before, after, resumed


@pytest.mark.slow
def test_dnpo_two_processes_write_what_one_writes(runs):
    one, two, *_ = runs
    for k in (0, 1):
        for name in ("generations.jsonl", "pairs.jsonl") + (("scores.jsonl",) if k else ()):
            assert (two / "dnpo" / f"iter_{k}" / name).read_bytes() == (one / "dnpo" / f"iter_{k}" / name).read_bytes(), \
                (k, name)
        trained = [json.loads((run / "dnpo" / f"iter_{k}" / "train.json").read_text()) for run in (one, two)]
        assert trained[0]["global_step"] == trained[1]["global_step"] == 2
        # Iteration 1 trains with NPO: each process draws the ε of its own rows (one seed per call
        # from its RNG), so the loss agrees in distribution, not to float rounding. Its spread is the
        # ε draw's: with σ0 = 0.01 and 4 pairs a step, four draws (1 and 2 processes, the compiled and
        # the PyTorch generator) gave train losses 0.49239-0.49359 (2.4e-3 relative) and step-1
        # losses 0.6896-0.6929; 2e-2 is several times that spread (the noise head's DDP training is
        # checked to 1e-6, with its ε fixed, in test_noise_head_sharded.py).
        tolerance = 1e-5 if k == 0 else 2e-2
        assert close(trained[0]["train_loss"], trained[1]["train_loss"], tolerance), (
            k, trained[0]["train_loss"], trained[1]["train_loss"])
    npo = json.loads((two / "dnpo" / "iter_1" / "metrics.json").read_text())
    assert npo["npo"] and npo["sigma_mean"] is not None  # iteration 1 trained with the noise head (DDP)
    assert markers(one / "dnpo").keys() == markers(two / "dnpo").keys()


@pytest.mark.slow
def test_ropo_two_processes_keep_and_refill_what_one_does(runs):
    one, two, *_ = runs
    reference = "reference/pairs.jsonl"
    assert (two / "ropo" / reference).read_bytes() == (one / "ropo" / reference).read_bytes()
    for r in (0, 1):
        kept = [[row["kept"] for row in rows(run / "ropo" / f"round_{r}" / "pairs.jsonl")] for run in (one, two)]
        assert kept[0] == kept[1], r
        losses = [[row["loss"] for row in rows(run / "ropo" / f"round_{r}" / "scores.jsonl")] for run in (one, two)]
        assert all(close(a, b) for a, b in zip(*losses, strict=True)), r
    refills = [rows(run / "ropo" / "round_0" / "refills.jsonl") for run in (one, two)]
    assert refills[0], "round 0 discarded pairs, so it refilled some"
    assert [(x["chosen"], x["rejected"], x["refill_of"]) for x in refills[0]] == \
        [(x["chosen"], x["rejected"], x["refill_of"]) for x in refills[1]]
    assert markers(one / "ropo").keys() == markers(two / "ropo").keys()


@pytest.mark.slow
def test_a_two_process_rerun_resumes_without_writing(runs):
    _, two, before, after, resumed = runs
    assert after == before  # no artifact, marker or model rewritten by either rank
    assert "Traceback" not in resumed.stderr
