"""A DNPO run SIGKILLed between stages, inside a training stage and at a polled moment resumes at
the first unfinished stage and ends with the artifacts of an uninterrupted run.

Two kills are placed deterministically by a patch in the child process: (1) right after the
marker of iteration 0's `pairs` stage is written (between stages); (2) at the second optimizer
step of iteration 1's NPO training (inside a stage). A third child runs `python -m noisepo dnpo`
unpatched and is killed as soon as the poll sees iteration 0's training marker.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from killed_runs import child_env, run_killed_at_marker
from noisepo.cli import main

from .test_dnpo import dnpo_argv, sft_data, verifier  # noqa: F401  (fixtures)

KILL_AFTER_PAIRS_MARKER = """
import noisepo.pipelines.stages as stages
real = stages.Stage.complete
def complete(self, summary=None):
    real(self, summary)
    if self.name == "pairs" and Path(self.folder).name == "iter_0":
        os.kill(os.getpid(), signal.SIGKILL)
stages.Stage.complete = complete
"""

KILL_INSIDE_NPO_TRAINING = """
import noisepo.training.npo as npo
real = npo.NPOTrainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
npo.NPOTrainer.training_step = training_step
"""


def run_killed(patch: str, argv: list[str], tmp_path: Path) -> int:
    code = ("import os, signal, sys\nfrom pathlib import Path\nimport torch\ntorch.set_num_threads(1)\n"
            + textwrap.dedent(patch) + "from noisepo.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *argv], env=child_env(tmp_path), capture_output=True,
                          timeout=300).returncode


def artifacts(out: Path) -> dict[str, bytes]:
    names = [f"iter_{k}/{name}" for k in (0, 1) for name in ("generations.jsonl", "pairs.jsonl", "eval_predictions.jsonl")]
    names += ["iter_1/scores.jsonl", "base/eval_predictions.jsonl"]
    return {name: (out / name).read_bytes() for name in names}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    import json

    import torch

    assert artifacts(a) == artifacts(b)
    for k in (0, 1):
        wa, wb = weights(a / f"iter_{k}" / "model"), weights(b / f"iter_{k}" / "model")
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa), k
        ma, mb = (json.loads((x / f"iter_{k}" / "metrics.json").read_text()) for x in (a, b))
        for key in ("flipped", "ties", "identical", "trainable_pairs", "trained_pairs", "accuracy"):
            assert ma[key] == mb[key], (k, key)
        if ma["sigma_mean"] is not None:
            assert abs(ma["sigma_mean"] - mb["sigma_mean"]) < 1e-6


def test_resume_after_sigkill_gives_the_same_run(micro_model_dir, sft_data, verifier, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    assert main(dnpo_argv(micro_model_dir, sft_data, straight, verifier)) == 0

    killed = tmp_path / "killed"
    argv = dnpo_argv(micro_model_dir, sft_data, killed, verifier)
    assert run_killed(KILL_AFTER_PAIRS_MARKER, argv, tmp_path) == -signal.SIGKILL
    assert (killed / "iter_0" / ".pairs.done").exists() and not (killed / "iter_0" / ".train.done").exists()
    assert run_killed(KILL_INSIDE_NPO_TRAINING, argv, tmp_path) == -signal.SIGKILL
    assert (killed / "iter_1" / ".pairs.done").exists() and not (killed / "iter_1" / ".train.done").exists()
    assert main(argv) == 0
    assert_same_run(killed, straight)
    assert not (killed / "iter_1" / "model.partial").exists() and not (killed / "iter_1" / "trainer").exists()


def test_resume_after_a_kill_at_a_polled_moment(micro_model_dir, sft_data, verifier, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    assert main(dnpo_argv(micro_model_dir, sft_data, straight, verifier)) == 0
    polled = tmp_path / "polled"
    argv = dnpo_argv(micro_model_dir, sft_data, polled, verifier)
    run_killed_at_marker(argv, polled / "iter_0" / ".train.done", tmp_path)
    assert not (polled / "summary.json").exists()
    assert main(argv) == 0
    assert_same_run(polled, straight)
