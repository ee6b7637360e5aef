"""The `Task` protocol and how a task or a verifier is found by name or import path.

A task is data with a known answer plus a programmatic verifier (nanochat's "task = data +
evaluate + reward"). Built-in tasks are named (`addition`); a user's own task is named by import
path, `mypkg.mytask:MyTask`, where the attribute is a class, a factory function or an instance.
Torch-free: configs and the CLI import this module.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, runtime_checkable

from noisepo.errors import ConfigError

Verifier = Callable[[str, str], float]

# Built-in tasks by name -> import path, so importing this module loads none of them.
BUILTIN_TASKS: dict[str, str] = {
    "addition": "noisepo.tasks.addition:AdditionTask",
    "reverse": "noisepo.tasks.reverse:ReverseTask",
}

# Methods every task must have; `graded_score` and `sft_data` are optional (see `Task`).
REQUIRED_METHODS = ("prompts", "score")


@runtime_checkable
class Task(Protocol):
    """A verifiable task.

    - `prompts(n, *, seed, split)`: `n` distinct records `{"id", "prompt", "answer"}` of one split
      (`train`, `val`, `test`; splits are disjoint).
    - `score(prompt, response)`: 1.0 if the response is the right answer, else 0.0.
    - `graded_score(prompt, response)`: partial credit in [0, 1] (optional; defaults to `score`).
    - `sft_data(n, *, seed, error_rate, error_kind)`: imperfect "human" SFT records
      `{"id", "prompt", "completion", "answer", "human_correct"}` from the train split (optional;
      needed by `noisepo data make`).
    - `preference_data(n, *, seed)`: clean pairs `{"id", "prompt", "chosen", "rejected", "answer",
      "label_flipped": False}` from the train split (optional; `noisepo data make --n-pairs`).
    """

    name: str

    def prompts(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict]: ...

    def score(self, prompt: str, response: str) -> float: ...

    def graded_score(self, prompt: str, response: str) -> float: ...

    def sft_data(self, n: int, *, seed: int = 0, error_rate: float = 0.0,
                 error_kind: str = "random") -> list[dict]: ...


def import_object(path: str, *, key: str = "task") -> Any:
    """The object named by `module.sub:attribute`; ConfigError naming the path when it is not there.

    Only a missing module or attribute becomes a ConfigError: an exception raised while the
    user's module runs is their bug and keeps its traceback.
    """
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{path!r} is not an import path of the form 'package.module:name'", key=key)
    _current_folder_importable()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"cannot import {path!r}: no module named {err.name!r}", key=key) from None
        raise
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"cannot import {path!r}: module {module_name!r} has no attribute "
                          f"{attribute!r}", key=key) from None
    return obj


def _current_folder_importable() -> None:
    """A user's `--task mymod:Task` names a module in the folder they run from: make it importable
    from the installed `noisepo` script too, as `python -m noisepo` already does."""
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # appended: a user module never shadows an installed package


def _has_task_methods(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in REQUIRED_METHODS)


def load_task(spec: str, **options: Any) -> Task:
    """A task by built-in name (`addition`) or import path (`mypkg.mod:Task`).

    The attribute may be a class or factory (called with `options`, e.g. `digits=3`) or a ready
    instance (then `options` must be empty). The result must have `prompts` and `score`.
    """
    if not spec:
        raise ConfigError("is empty: give a built-in task name or an import path", key="task")
    if spec in BUILTIN_TASKS:
        target = import_object(BUILTIN_TASKS[spec])
    elif ":" in spec:
        target = import_object(spec)
    else:
        raise ConfigError(f"unknown task {spec!r}; built-in: {', '.join(BUILTIN_TASKS)}, or an import "
                          "path 'package.module:Name'", key="task")
    if isinstance(target, type) or (callable(target) and not _has_task_methods(target)):
        try:
            task = target(**options)
        except TypeError as err:
            raise ConfigError(f"cannot build task {spec!r} with options {options}: {err}", key="task") from None
    elif options:
        raise ConfigError(f"task {spec!r} is an instance; it takes no options (got {sorted(options)})",
                          key="task")
    else:
        task = target
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(f"{spec!r} is not a task: it has no {', '.join(missing)} method "
                          "(see noisepo.tasks.Task)", key="task")
    return task


def task_name(task: Any) -> str:
    """The task's `name`, or its class name when it declares none."""
    return str(getattr(task, "name", type(task).__name__))


def graded_score(task: Any, prompt: str, response: str) -> float:
    """The task's partial credit, falling back to its exact score when it has no `graded_score`."""
    grade = getattr(task, "graded_score", None)
    return float(grade(prompt, response) if callable(grade) else task.score(prompt, response))


def load_verifier(spec: str) -> Verifier:
    """A function `(prompt, response) -> float`.

    `spec` is a task (built-in name or import path of a task; its `score` is used) or the import
    path of a plain function, `mypkg.mod:score`.
    """
    if spec in BUILTIN_TASKS:
        return load_task(spec).score
    target = import_object(spec, key="verifier")
    if _has_task_methods(target) and not isinstance(target, type):
        return target.score
    if isinstance(target, type) and _has_task_methods(target):
        return load_task(spec).score
    if not callable(target):
        raise ConfigError(f"{spec!r} is not callable: a verifier is a function (prompt, response) -> float",
                          key="verifier")
    return target
