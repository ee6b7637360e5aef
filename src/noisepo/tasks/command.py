"""`noisepo data make`: a task's SFT data and prompt splits as JSONL files, each written atomically."""
from __future__ import annotations

from pathlib import Path

from noisepo.errors import ConfigError
from noisepo.io import write_json_atomic, write_jsonl_atomic
from noisepo.tasks.base import load_task, task_name
from noisepo.tasks.config import MakeDataConfig

FILES = {"sft": "sft.jsonl", "prompts": "prompts.jsonl", "val": "val.jsonl", "test": "test.jsonl",
         "preferences": "preferences.jsonl"}


def _rekeyed(error: ConfigError, key: str) -> ConfigError:
    """The task names its argument (`n`); the user knows the option (`n_test`)."""
    if error.key in ("n", None):
        error.key = key
    return error


def make_data(config: MakeDataConfig) -> dict:
    """Write the files of `FILES` into `config.output`; return a summary (also manifest.json)."""
    options = {} if config.digits is None else {"digits": config.digits}
    task = load_task(config.task, **options)
    if not callable(getattr(task, "sft_data", None)):
        raise ConfigError(f"task {config.task!r} has no sft_data method, so it cannot make SFT data",
                          key="task")
    try:
        sft = task.sft_data(config.n_train, seed=config.seed, error_rate=config.error_rate,
                            error_kind=config.error_kind)
    except ConfigError as err:
        raise _rekeyed(err, "n_train") from None
    splits = {}
    for split, key in (("val", "n_val"), ("test", "n_test")):
        try:
            splits[split] = task.prompts(getattr(config, key), seed=config.seed, split=split)
        except ConfigError as err:
            raise _rekeyed(err, key) from None
    pairs = None
    if config.n_pairs:
        if not callable(getattr(task, "preference_data", None)):
            raise ConfigError(f"task {config.task!r} has no preference_data method, so it cannot make pairs",
                              key="n_pairs")
        try:
            pairs = task.preference_data(config.n_pairs, seed=config.seed)
        except ConfigError as err:
            raise _rekeyed(err, "n_pairs") from None
    # The train prompts are the SFT prompts: SPIN/DNPO generate a response for each (METHODS §3).
    train_prompts = [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in sft]

    out = Path(config.output)
    write_jsonl_atomic(out / FILES["sft"], sft)
    write_jsonl_atomic(out / FILES["prompts"], train_prompts)
    write_jsonl_atomic(out / FILES["val"], splits["val"])
    write_jsonl_atomic(out / FILES["test"], splits["test"])
    if pairs is not None:
        write_jsonl_atomic(out / FILES["preferences"], pairs)
    wrong = sum(1 for r in sft if not r.get("human_correct", True))
    summary = {
        "task": task_name(task), "seed": config.seed, "error_kind": config.error_kind,
        "counts": {"sft": len(sft), "prompts": len(train_prompts), "val": len(splits["val"]),
                   "test": len(splits["test"]), "preferences": len(pairs or [])},
        "human_errors": wrong, "human_accuracy": 1 - wrong / len(sft) if sft else None,
        "files": FILES if pairs is not None else {k: v for k, v in FILES.items() if k != "preferences"},
    }
    write_json_atomic(out / "manifest.json", summary)
    return summary


def run_make_data(config: MakeDataConfig) -> int:
    summary = make_data(config)
    counts = summary["counts"]
    print(f"wrote {config.output}: {counts['sft']} SFT records ({summary['human_errors']} with a wrong "
          f"human answer, kind {config.error_kind}), {counts['val']} val and {counts['test']} test prompts")
    return 0
