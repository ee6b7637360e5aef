"""A ROPO run SIGKILLed mid-run resumes at the first unfinished stage and ends with the same artifacts.

The kills are placed deterministically (rather than by polling for a marker and racing the run):
the child process patches one function to SIGKILL itself at that moment, (1) in round 0's score
stage, after its training finished, and (2) in round 1's training, after the model's weights were
half-saved (`model.partial` on disk). Both children use one thread, like the in-process runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from noisepo.cli import main

from .test_ropo import FAST, rule_pairs, write_jsonl

KILL_IN_SCORE = """
import noisepo.pipelines.ropo as ropo
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
ropo.ropo_scores = killed
"""

KILL_WHILE_SAVING_ROUND_1 = """
import noisepo.pipelines.common as common
real = common.save_model_atomically
def killed(model, tokenizer, folder):
    if Path(folder).parent.name == "round_1":
        model.save_pretrained(Path(folder).with_name(Path(folder).name + ".partial"))
        os.kill(os.getpid(), signal.SIGKILL)
    real(model, tokenizer, folder)
common.save_model_atomically = killed
"""


def run_killed(patch: str, argv: list[str]) -> int:
    code = "import os, signal, sys\nfrom pathlib import Path\n" + textwrap.dedent(patch) + \
           "from noisepo.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, timeout=300).returncode


def artifacts(out: Path) -> dict[str, bytes]:
    names = ["reference/pairs.jsonl"] + [f"round_{r}/{name}" for r in (0, 1)
                                         for name in ("scores.jsonl", "pairs.jsonl", "refills.jsonl",
                                                      "loss_histogram.json")]
    return {name: (out / name).read_bytes() for name in names}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_after_sigkill_gives_the_same_artifacts(micro_model_dir, tmp_path):
    import torch

    data = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(16))

    def argv(out):
        return ["ropo", "--model", micro_model_dir, "--data", data, "--output", str(out), *FAST,
                "--rounds", "2", "--rho", "0.25"]

    assert main(argv(tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    assert run_killed(KILL_IN_SCORE, argv(killed)) == -signal.SIGKILL
    assert (killed / "round_0" / ".train.done").exists() and not (killed / "round_0" / ".score.done").exists()
    assert run_killed(KILL_WHILE_SAVING_ROUND_1, argv(killed)) == -signal.SIGKILL
    assert (killed / "round_0" / ".metrics.done").exists() and (killed / "round_1" / "model.partial").exists()
    assert not (killed / "round_1" / ".train.done").exists()
    assert main(argv(killed)) == 0

    assert artifacts(killed) == artifacts(tmp_path / "straight")
    assert not (killed / "round_1" / "model.partial").exists()
    for r in (0, 1):
        a, b = weights(killed / f"round_{r}" / "model"), weights(tmp_path / "straight" / f"round_{r}" / "model")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
