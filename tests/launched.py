"""Shared by the tests that start several processes with torchrun: run a command and require success.

Importable from any test as `launched` (pyproject's pytest `pythonpath = ["tests"]`).
"""
from __future__ import annotations

import subprocess

# torch 2.13's gloo can abort a process in its C++ teardown after all the work is done and the process
# group destroyed ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489 and
# #179291): a race at interpreter exit, not a wrong result. Such a run is repeated once; every
# assertion on what it wrote still applies to the repeat.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_to_success(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or attempt == 2 or TEARDOWN_ABORT not in done.stderr:
            break
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done
