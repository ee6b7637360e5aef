"""Crash safety of the loops: `noisepo dnpo` and `noisepo ropo` SIGKILLed at many moments, then rerun.

One run folder is killed again and again, each time at a later moment (inside evaluation,
generation, scoring and training, while an artifact or a model is being written, between stages,
and once from outside at a polled moment), and each rerun resumes it; the last rerun completes.
The data artifacts must then be byte-identical to an uninterrupted run with the same seed (one
baseline per loop, shared by every test of the module) and the weights allclose; no half-written
file may ever be read as complete.

Most kills are placed deterministically: the child process (`python -c`, the real CLI) patches one
function to SIGKILL itself at that moment. A self-sent SIGKILL is as abrupt as an external one
(no handler, no cleanup, no flush) and does not race the run. One kill per loop comes from
outside, when a marker file appears.

Also here: two real processes on one run folder (the second is refused by the lock while the
first runs, and the first completes with the baseline's artifacts).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from killed_runs import child_env, run_killed_at_marker
from noisepo.cli import main

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- children
PRELUDE = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_killed(patch: str, argv: list[str], extra_path: Path) -> None:
    """The CLI in a child process with `patch` applied; it must die by SIGKILL."""
    code = PRELUDE + textwrap.dedent(patch) + "from noisepo.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", code, *argv], env=child_env(extra_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


# Kill patches. Each one fires at the first matching moment of its process.
KILL_IN_GENERATION_OF_EVALUATION = """
import noisepo.generation.transformers_backend as backend
backend.TransformersGenerator._generate_batch = lambda *a, **k: die()
"""

KILL_WHILE_WRITING = """
import noisepo.io as io
import noisepo.pipelines.{loop} as loop
real = loop.write_jsonl_atomic
def write_jsonl_atomic(path, records):
    path = Path(path)
    if path.name == "{name}" and path.parent.name == "{folder}":
        rows = list(records)
        with io.atomic_open(path) as handle:  # half the rows reach the disk, then the process dies
            handle.write("".join(json.dumps(r) + "\\n" for r in rows[: len(rows) // 2]))
            handle.flush()
            os.fsync(handle.fileno())
            die()
    return real(path, records)
loop.write_jsonl_atomic = write_jsonl_atomic
"""

KILL_AFTER_MARKER = """
import noisepo.pipelines.stages as stages
real = stages.Stage.complete
def complete(self, summary=None):
    real(self, summary)
    if self.name == "{stage}" and Path(self.folder).name == "{folder}":
        die()
stages.Stage.complete = complete
"""

KILL_IN_TRAINING = """
import noisepo.training.{module} as module
real = module.{cls}.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == 1:
        die()
    return real(self, *args, **kwargs)
module.{cls}.training_step = training_step
"""

KILL_WHILE_SAVING_MODEL = """
import noisepo.pipelines.common as common
def save_model_atomically(model, tokenizer, folder):
    model.save_pretrained(Path(folder).with_name(Path(folder).name + ".partial"))  # weights half-saved
    die()
common.save_model_atomically = save_model_atomically
"""

KILL_IN_SCORING_AFTER_SOME_SCORES = """
import noisepo.judges.cache as cache
real = cache.ScoreCache.put
calls = []
def put(self, *args):
    real(self, *args)
    calls.append(1)
    if len(calls) == 5:  # five scores committed, the rest not asked yet
        die()
cache.ScoreCache.put = put
"""

KILL_IN_REFERENCE_LOGPS = """
import noisepo.pipelines.common as common
common.pair_logps = lambda *a, **k: die()
"""

KILL_IN_ROPO_SCORE = """
import noisepo.pipelines.ropo as ropo
ropo.ropo_scores = lambda *a, **k: die()
"""

KILL_IN_REFILL_SAMPLING = """
import noisepo.generation.transformers_backend as backend
real = backend.TransformersGenerator._generate_batch
def generate_batch(self, ids, texts, params, copies):
    if params.temperature > 0:  # the refill's candidates, not a greedy evaluation
        die()
    return real(self, ids, texts, params, copies)
backend.TransformersGenerator._generate_batch = generate_batch
"""


def stray_files(out: Path) -> list[str]:
    """Leftovers of killed writes: temporary files of atomic writes, half-saved model folders."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".partial")))


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa), (a, b)


# --------------------------------------------------------------------------- DNPO
N_PROMPTS = 16
DNPO_FAST = ["--iterations", "2", "--no-progress", "--beta", "0.5", "--generation.max-new-tokens", "4",
             "--training.learning-rate", "5e-3", "--training.batch-size", "8", "--training.report-to", "none",
             "--training.max-length", "32", "--training.warmup-ratio", "0", "--training.max-steps", "2",
             "--training.logging-steps", "1", "--task", "addition", "--eval-limit", "6", "--eval-max-new-tokens", "4",
             "--dsl.scorer", "verifier", "--dsl.verifier", "crash_test_verifier:about_three_characters"]
VERIFIER = '''
def about_three_characters(prompt, response):
    if "x" in response:
        raise ValueError("unscorable")
    return -abs(len(response.strip()) - 3.0)
'''


@pytest.fixture(scope="module")
def dnpo_setup(micro_model_dir, tmp_path_factory):
    """(folder, argv builder, baseline run folder): the SFT data, the verifier, one uninterrupted run."""
    from noisepo.tasks import load_task

    folder = tmp_path_factory.mktemp("dnpo_crash")
    (folder / "crash_test_verifier.py").write_text(VERIFIER)
    rows = load_task("addition").sft_data(N_PROMPTS, seed=0, error_rate=0.25)
    rows[0]["completion"] = "x"
    rows[1]["completion"], rows[2]["completion"] = "123456", "99999"
    data = folder / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def argv(out: Path) -> list[str]:
        return ["dnpo", "--model", micro_model_dir, "--data", str(data), "--output", str(out), *DNPO_FAST]

    sys.path.insert(0, str(folder))
    try:
        baseline = folder / "baseline"
        assert main(argv(baseline)) == 0
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("crash_test_verifier", None)
    return folder, argv, baseline


def dnpo_artifacts(out: Path) -> dict[str, bytes]:
    names = ["base/eval_predictions.jsonl", "iter_1/scores.jsonl"]
    names += [f"iter_{k}/{name}" for k in (0, 1) for name in ("generations.jsonl", "pairs.jsonl",
                                                               "eval_predictions.jsonl")]
    return {name: (out / name).read_bytes() for name in names}


def dnpo_numbers(out: Path) -> list[dict]:
    keys = ("prompts", "flipped", "ties", "identical", "trainable_pairs", "trained_pairs", "scorer_failures",
            "accuracy")
    return [{k: json.loads((out / f"iter_{i}" / "metrics.json").read_text())[k] for k in keys} for i in (0, 1)]


def test_dnpo_killed_at_eight_moments_resumes_to_the_uninterrupted_run(dnpo_setup):
    folder, argv, baseline = dnpo_setup
    out = folder / "killed"
    args = argv(out)

    def stage_done(path: str) -> bool:
        return (out / path).exists()

    # 1. inside generation, in the SFT model's evaluation (the first stage)
    run_killed(KILL_IN_GENERATION_OF_EVALUATION, args, folder)
    assert not stage_done("base/.evaluate.done")
    # 2. while iteration 0's generations.jsonl is being written: half of it on disk, under a temporary name
    run_killed(KILL_WHILE_WRITING.format(loop="dnpo", name="generations.jsonl", folder="iter_0"), args, folder)
    assert stage_done("base/.evaluate.done") and not stage_done("iter_0/generations.jsonl")
    assert [p.name for p in (out / "iter_0").glob(".generations.jsonl.*.tmp")] and not stage_done("iter_0/.generate.done")
    # 3. between stages: right after the pairs marker
    run_killed(KILL_AFTER_MARKER.format(stage="pairs", folder="iter_0"), args, folder)
    assert stage_done("iter_0/.pairs.done") and not stage_done("iter_0/.train.done")
    # 4. inside training (iteration 0, SPIN: PreferenceTrainer), at the second optimizer step
    run_killed(KILL_IN_TRAINING.format(module="preference", cls="PreferenceTrainer"), args, folder)
    assert not stage_done("iter_0/.train.done") and not stage_done("iter_0/model")
    # 5. while the trained model is being saved: model.partial half-written
    run_killed(KILL_WHILE_SAVING_MODEL, args, folder)
    assert stage_done("iter_0/model.partial") and not stage_done("iter_0/.train.done")
    # 6. inside scoring (iteration 1, DSL): five scores committed to the cache, the rest not
    run_killed(KILL_IN_SCORING_AFTER_SOME_SCORES, args, folder)
    assert stage_done("iter_0/.metrics.done") and stage_done("iter_1/scores.cache.sqlite")
    assert not stage_done("iter_1/.score.done")
    # 7. inside NPO training (iteration 1)
    run_killed(KILL_IN_TRAINING.format(module="npo", cls="NPOTrainer"), args, folder)
    assert stage_done("iter_1/.pairs.done") and not stage_done("iter_1/.train.done")
    # 8. from outside, the moment iteration 1's training marker appears (evaluation starts)
    run_killed_at_marker(args, out / "iter_1" / ".train.done", folder)

    sys.path.insert(0, str(folder))
    try:
        assert main(args) == 0
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("crash_test_verifier", None)
    assert dnpo_artifacts(out) == dnpo_artifacts(baseline)
    assert dnpo_numbers(out) == dnpo_numbers(baseline)
    for k in (0, 1):
        assert_same_weights(out / f"iter_{k}" / "model", baseline / f"iter_{k}" / "model")
    # The one leftover is kill 2's temporary file: never renamed, so never read as generations.jsonl.
    assert [s for s in stray_files(out) if not s.startswith("iter_0/.generations.jsonl.")] == []


def test_a_second_process_on_the_same_run_folder_is_refused_and_the_first_completes(dnpo_setup):
    folder, argv, baseline = dnpo_setup
    out = folder / "locked"
    log = (folder / "first.stderr").open("w")  # a file, not a pipe: a full pipe would block the run
    first = subprocess.Popen([sys.executable, "-m", "noisepo", *argv(out)], env=child_env(folder),
                             stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not (out / "manifest.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, (folder / "first.stderr").read_text()
        first.send_signal(signal.SIGSTOP)  # hold the first run inside its lock while the second tries
        try:
            second = subprocess.run([sys.executable, "-m", "noisepo", *argv(out)], env=child_env(folder),
                                    capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        (line,) = second.stderr.strip().splitlines()[-1:]
        assert line == (f"noisepo dnpo: error: {out} is in use by another noisepo run (pid {first.pid}); wait for it "
                        "to finish or choose another --output"), second.stderr
        assert first.wait(timeout=300) == 0, (folder / "first.stderr").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert dnpo_artifacts(out) == dnpo_artifacts(baseline)
    for k in (0, 1):
        assert_same_weights(out / f"iter_{k}" / "model", baseline / f"iter_{k}" / "model")


# --------------------------------------------------------------------------- ROPO
def rule_pairs(n: int = 16, seed: int = 0) -> list[dict]:
    """chosen = a run of 'a', rejected = as many 'b'; a quarter flipped; prompts Q0..Q11, four repeated."""
    import random

    rng = random.Random(seed)
    flipped = {0, n - 4} | set(rng.sample(range(1, n - 4), n // 4 - 2))
    rows = []
    for i in range(n):
        length = rng.randint(3, 6)
        good, bad = "a" * length, "b" * length
        chosen, rejected = (bad, good) if i in flipped else (good, bad)
        rows.append({"id": i, "prompt": f"Q{i % (n - 4)}:", "chosen": chosen, "rejected": rejected,
                     "label_flipped": i in flipped})
    return rows


ROPO_FAST = ["--samples", "2", "--max-new-tokens", "6", "--no-progress", "--beta", "0.5", "--rounds", "2",
             "--rho", "0.25", "--training.learning-rate", "5e-3", "--training.batch-size", "4",
             "--training.report-to", "none", "--training.max-length", "64", "--training.warmup-ratio", "0"]


def ropo_artifacts(out: Path) -> dict[str, bytes]:
    names = ["reference/pairs.jsonl"]
    names += [f"round_{r}/{name}" for r in (0, 1) for name in ("scores.jsonl", "pairs.jsonl", "refills.jsonl",
                                                               "loss_histogram.json")]
    return {name: (out / name).read_bytes() for name in names}


def test_ropo_killed_at_eight_moments_resumes_to_the_uninterrupted_run(micro_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rule_pairs()))

    def argv(out: Path) -> list[str]:
        return ["ropo", "--model", micro_model_dir, "--data", str(data), "--output", str(out), *ROPO_FAST]

    baseline = tmp_path / "baseline"
    assert main(argv(baseline)) == 0
    out = tmp_path / "killed"
    args = argv(out)

    def done(path: str) -> bool:
        return (out / path).exists()

    # 1. inside the reference log-probs (the first stage)
    run_killed(KILL_IN_REFERENCE_LOGPS, args, tmp_path)
    assert not done("reference/.reference.done")
    # 2. while reference/pairs.jsonl is being written
    run_killed(KILL_WHILE_WRITING.format(loop="ropo", name="pairs.jsonl", folder="reference"), args, tmp_path)
    assert not done("reference/pairs.jsonl") and [p.name for p in (out / "reference").glob(".pairs.jsonl.*.tmp")]
    # 3. inside training (round 0), at the second optimizer step
    run_killed(KILL_IN_TRAINING.format(module="preference", cls="PreferenceTrainer"), args, tmp_path)
    assert done("reference/.reference.done") and not done("round_0/.train.done")
    # 4. inside scoring (round 0), after its training finished
    run_killed(KILL_IN_ROPO_SCORE, args, tmp_path)
    assert done("round_0/.train.done") and not done("round_0/.score.done")
    # 5. between stages: right after the filter marker of round 0
    run_killed(KILL_AFTER_MARKER.format(stage="filter", folder="round_0"), args, tmp_path)
    assert done("round_0/.filter.done") and not done("round_0/.refill.done")
    # 6. inside generation: the refill's sampling of candidates
    run_killed(KILL_IN_REFILL_SAMPLING, args, tmp_path)
    assert not done("round_0/.refill.done") and not done("round_0/refills.jsonl")
    # 7. while round 1's model is being saved
    run_killed(KILL_WHILE_SAVING_MODEL, args, tmp_path)
    assert done("round_0/.metrics.done") and done("round_1/model.partial") and not done("round_1/.train.done")
    # 8. from outside, the moment round 1's score marker appears
    run_killed_at_marker(args, out / "round_1" / ".score.done", tmp_path)

    assert main(args) == 0
    assert ropo_artifacts(out) == ropo_artifacts(baseline)
    for r in (0, 1):
        assert_same_weights(out / f"round_{r}" / "model", baseline / f"round_{r}" / "model")
    assert [s for s in stray_files(out) if not s.startswith("reference/.pairs.jsonl.")] == []
