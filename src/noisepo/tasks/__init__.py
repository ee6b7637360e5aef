"""Built-in verifiable tasks (prompts + ground truth + a programmatic verifier) and task plugins.

`load_task("addition")` or `load_task("mypkg.mod:MyTask")`; `load_verifier("mypkg.mod:score")`.
Torch-free.
"""
from noisepo.tasks.base import (
    BUILTIN_TASKS,
    Task,
    Verifier,
    graded_score,
    load_task,
    load_verifier,
    task_name,
)

__all__ = ["BUILTIN_TASKS", "Task", "Verifier", "graded_score", "load_task", "load_verifier", "task_name"]
