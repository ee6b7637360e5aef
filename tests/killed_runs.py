"""Shared by the kill-and-resume tests: run the CLI in a child process and SIGKILL it from outside.

Importable from any test as `killed_runs` (pyproject's pytest `pythonpath = ["tests"]`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def child_env(extra_path: Path) -> dict:
    """The environment of a child CLI: one thread, offline, quiet, `extra_path` importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join([str(extra_path), os.environ.get("PYTHONPATH", "")])}


def run_killed_at_marker(argv: list[str], marker: Path, extra_path: Path) -> None:
    """`python -m noisepo ...`, SIGKILLed from outside as soon as `marker` exists."""
    child = subprocess.Popen([sys.executable, "-m", "noisepo", *argv], env=child_env(extra_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
