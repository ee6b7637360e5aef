"""A disk that fills up: one line, exit status 2, nothing half-written left as if complete, and the
stages finished before it kept, so a rerun with space resumes.

A full disk is simulated for real in a child process with a file-size limit (RLIMIT_FSIZE, SIGXFSZ
ignored): the kernel then fails a write past the limit with EFBIG, the same way (an OSError from
write/flush/fsync) that it fails one with ENOSPC on a full disk. `/dev/full` gives the real ENOSPC.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noisepo.cli import STORAGE_ERRORS, main

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from noisepo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_with_file_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit), *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"noisepo {command}: error: ") and "File too large (errno EFBIG)" in line, line
    return line


def test_a_full_disk_while_writing_an_artifact(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x" * 200})
                             + "\n" for i in range(500)))  # ~120 KB out
    out = tmp_path / "noisy.jsonl"
    assert_one_line(run_with_file_limit(["data", "corrupt", str(pairs), str(out)], limit=32 * 1024), "data corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no output, no temporary file


@pytest.mark.slow  # two loop runs (~10 s on 2 cores)
def test_a_full_disk_mid_loop_keeps_the_finished_stages_and_a_rerun_resumes(micro_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": "a" * 4, "rejected": "b" * 4, "id": i})
                             + "\n" for i in range(8)))
    out = tmp_path / "run"
    argv = ["ropo", "--model", micro_model_dir, "--data", str(pairs), "--output", str(out), "--rounds", "1",
            "--no-progress", "--samples", "2", "--max-new-tokens", "2", "--training.max-steps", "1",
            "--training.report-to", "none", "--training.max-length", "32"]
    assert_one_line(run_with_file_limit(argv, limit=64 * 1024), "ropo")  # the model (weights) does not fit
    reference = (out / "reference" / "pairs.jsonl").read_bytes()
    assert (out / "reference" / ".reference.done").exists() and not (out / "round_0" / ".train.done").exists()
    assert not (out / "round_0" / "model").exists()

    assert main(argv) == 0  # space again: the run resumes at round 0's training
    assert (out / "reference" / "pairs.jsonl").read_bytes() == reference
    assert (out / "round_0" / ".metrics.done").exists() and not list(out.rglob("*.partial"))


def test_dev_full_gives_enospc_which_the_cli_reports_in_one_line(tmp_path):
    from noisepo.io import append_jsonl

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as info:
        append_jsonl("/dev/full", [{"x": "y" * 10_000}])
    assert info.value.errno == errno.ENOSPC and info.value.errno in STORAGE_ERRORS
