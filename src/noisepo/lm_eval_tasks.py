"""lm-evaluation-harness on a model folder, with noisepo's own tasks shipped as local lm-eval tasks.

`noisepo:<task>` (a built-in name, `noisepo:addition`, or an import path, `noisepo:mypkg.mod:Task`)
becomes an lm-eval task written into a folder at run time: a YAML (generate_until, greedy, stop at a
newline) and a JSONL of the task's test split, scored by the task's own verifier through a
`process_results` hook, so lm-eval's number is the one our own evaluation computes, through
lm-eval's model wrapper and generation instead of ours. Every other name is an lm-eval task
(`hellaswag`, ...), or one of the user's own under `include_path`.

Torch-free at import; lm-eval (extra 'eval') is imported when a run asks for it.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from noisepo.errors import ConfigError

PREFIX = "noisepo:"
UTILS_MODULE = "noisepo_lm_eval_utils"

_UTILS = '''"""Written by noisepo: lm-eval's process_results hook for noisepo's tasks (their own verifier)."""
from functools import lru_cache


@lru_cache(maxsize=None)
def _task(name):
    from noisepo.tasks import load_task

    return load_task(name)


def process_results(doc, results):
    # results: the one generation of a generate_until request, cut at the stop sequence
    return {"exact_match": float(_task(doc["noisepo_task"]).score(doc["prompt"], results[0]))}
'''


def check_lm_eval(tasks: list[str], include_path: str | None = None) -> None:
    """ConfigError naming `lm_eval_tasks` when lm-eval is missing or a noisepo task is unknown."""
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("needs lm-evaluation-harness: pip install 'noisepo[eval]'", key="lm_eval_tasks")
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"{include_path!r} is not a folder", key="lm_eval_include")
    from noisepo.tasks import load_task

    for name in tasks:
        if name.startswith(PREFIX):
            load_task(name[len(PREFIX):])  # ConfigError naming the task when it does not exist
    others = [name for name in tasks if not name.startswith(PREFIX)]
    if others:  # lm-eval's own index (a few seconds): asked only when such a task is named
        from lm_eval.tasks import TaskManager

        known = TaskManager(include_path=include_path, verbosity="ERROR").all_tasks
        unknown = [name for name in others if name not in known]
        if unknown:
            raise ConfigError(f"lm-eval knows no task {', '.join(map(repr, unknown))} (see `lm_eval ls tasks`, "
                              "or --lm-eval-include for a folder of your own)", key="lm_eval_tasks")


def lm_eval_name(task: str) -> str:
    """The lm-eval task name of `noisepo:<task>`: noisepo_<task>, import paths made identifier-safe."""
    return "noisepo_" + re.sub(r"[^0-9A-Za-z_]+", "_", task)


def write_task(task: str, folder: Path, *, n: int, seed: int = 0, max_new_tokens: int = 32) -> str:
    """Write `noisepo:<task>` as an lm-eval task into `folder` (YAML, JSONL of the test split, the
    scoring hook); return its lm-eval name."""
    from noisepo.tasks import load_task

    folder.mkdir(parents=True, exist_ok=True)
    name = lm_eval_name(task)
    records = load_task(task).prompts(n, seed=seed, split="test")
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "noisepo_task": task}) + "\n"
                            for r in records))
    (folder / f"{UTILS_MODULE}.py").write_text(_UTILS)
    # JSON is YAML: every value below is quoted exactly once; only the !function tag is YAML's own.
    lines = [
        f"task: {json.dumps(name)}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data.resolve()))}}}}}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{answer}}"',
        f'generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: {int(max_new_tokens)}}}',
        f"process_results: !function {UTILS_MODULE}.process_results",
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]",
        "metadata: {version: 1.0}",
    ]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def run_lm_eval(model_dir: str, tasks: list[str], folder: Path, *, limit: int | None = None,
                include_path: str | None = None, n: int = 200, seed: int = 0, max_new_tokens: int = 32,
                batch_size: int = 16, device: str | None = None, dtype: str = "auto",
                trust_remote_code: bool = False) -> dict:
    """lm-eval's results for `model_dir` on `tasks`: (`{task: {metric: value, ...}}`, the samples
    `[{task, prompt, response, target, metrics...}]`), for the caller to write. `noisepo:` tasks are
    written into `folder`/lm_eval_tasks first (`n` test prompts)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_folder = folder / "lm_eval_tasks"
    names = [write_task(t[len(PREFIX):], task_folder, n=n, seed=seed, max_new_tokens=max_new_tokens)
             if t.startswith(PREFIX) else t for t in tasks]
    include = [str(task_folder)] + ([include_path] if include_path else [])
    manager = TaskManager(include_path=include, verbosity="ERROR")
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {', '.join(map(repr, unknown))} (see `lm_eval ls tasks`, or "
                          "--lm-eval-include for a folder of your own)", key="lm_eval_tasks")
    model_args = {"pretrained": model_dir, "dtype": dtype, "trust_remote_code": trust_remote_code}
    results = simple_evaluate(model="hf", model_args=model_args, tasks=names, limit=limit, batch_size=batch_size,
                              device=device or _device(), task_manager=manager, log_samples=True,
                              bootstrap_iters=0, random_seed=seed)
    table = {}
    for name, values in ((results or {}).get("results") or {}).items():
        # lm-eval's keys are "metric,filter" (exact_match,none); keep the metric's name where unambiguous
        table[name] = {key.split(",")[0] if key.endswith(",none") else key: value
                       for key, value in values.items() if key != "alias" and not key.endswith("_stderr,none")}
    samples = []
    for name, rows in ((results or {}).get("samples") or {}).items():
        for row in rows:
            response = row.get("filtered_resps") or row.get("resps") or [None]
            response = response[0][0] if isinstance(response[0], list) else response[0]
            samples.append({"task": name, "doc_id": row.get("doc_id"), "prompt": row["arguments"][0][0],
                            "response": response, "target": row.get("target"),
                            **{m: row[m] for m in row.get("metrics", []) if m in row}})
    return table, samples


def headline(metrics: dict) -> tuple[str, float] | None:
    """A task's headline metric from lm-eval's results: exact_match, acc_norm or acc, else the first
    number (sample_len is a count, not a metric)."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k != "sample_len"}
    key = next((k for k in ("exact_match", "acc_norm", "acc") if k in numbers), next(iter(numbers), None))
    return None if key is None else (key, numbers[key])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
