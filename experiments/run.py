"""Run one experiment of issue 8 from its YAML file: every seed, every arm, through the `noisepo` CLI.

    python experiments/run.py experiments/a_self_improvement.yaml [--quick] [--task T] [--seeds 0,1,2]
                              [--runs experiments/runs] [--only ARM,ARM] [--jobs 2] [--dry-run]
    python experiments/run.py SPEC.yaml --search-lr 1e-5,3e-5,1e-4 [--search-eta 0.2] [--seeds 0]

What it does, per seed (each step is a `noisepo` command a user could type; each resumes, so a rerun
of this script after a crash or Ctrl-C continues where it stopped):
1. `noisepo data make --task T --seed S ...`      -> RUNS/<task>/s<S>/data/ (skipped when present)
2. `noisepo sft --model <preset> ...`             -> RUNS/<task>/s<S>/sft/   (skipped when finished)
   Both are shared by every experiment of the same task, seed and data/SFT options.
3. per arm: `noisepo <command> --config <arm>.yaml` -> RUNS/<task>/<experiment>/<arm>[-noise<η>]-s<S>/
   For experiment B each arm runs on the pairs corrupted symmetrically at every rate of `noise.rates`
   and by each rule of `noise.practical` (name -> `noisepo data corrupt` options).
Then `noisepo report` over every run folder -> RUNS/<task>/<experiment>/report/.

The task comes from the YAML or `--task` (a built-in name or an import path `pkg.mod:Task`: the same
plug-in path a user would use; nothing here knows a task). `--quick` applies the YAML's `quick:`
overrides (fewer seeds, prompts and steps) for a run of minutes; `per_task:` holds each task's own
hyperparameters (learning rates chosen on its validation split, experiments/LOG.md). Every command and its wall time is
appended to RUNS/<task>/<experiment>/commands.log. `--jobs N` runs N arms at once (default: one per CPU
core, one thread each; with N > 1 an arm's output goes to RUNS/<task>/<experiment>/logs/<run>.log).

`--search-lr` is the learning-rate search (issue 8: the same grid for every method): every arm at every
rate of the grid, evaluated on the *validation* split (never the test split), for experiment B at the one
flip rate `--search-eta`; the runs go to RUNS/<task>/<experiment>-search/ and the table of final
validation accuracy (arm x rate) to its search.md.

`--search-npo GRID.yaml` is NPO's search (issue 20): the `npo-only` arm at its own learning rate, once per
named configuration of the grid file (`name: {npo option: value, ...}`), on the validation split, seed 0;
runs in RUNS/<task>/<experiment>-npo-search/, and the table (configuration, final validation accuracy,
mean |M_noisy − M_clean| over the NPO iterations, σ) in its search.md and search.json.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def deep_merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`; dotted keys (`sft.max_steps`) address nested sections."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        target, *rest = key.split(".", 1)
        if rest:
            value = {rest[0]: value}
        if isinstance(value, dict) and isinstance(merged.get(target), dict):
            merged[target] = deep_merge(merged[target], value)
        else:
            merged[target] = copy.deepcopy(value)
    return merged


def flags(options: dict) -> list[str]:
    """`{"n_train": 10, "progress": False}` -> `--n-train 10 --no-progress`."""
    out: list[str] = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            out += [f"--{flag}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def with_task_overrides(spec: dict) -> dict:
    """`spec` with its `per_task: {<task name>: {dotted.key: value}}` overrides for the task applied
    (hyperparameters chosen on each task's validation split); the task is named by its `name`."""
    from noisepo.tasks import load_task, task_name

    overrides = (spec.get("per_task") or {}).get(task_name(load_task(spec["task"])))
    return deep_merge(spec, overrides) if overrides else spec


def short_float(value: float) -> str:
    """1e-4 -> "1e-4", 3e-05 -> "3e-5", 2.5e-6 -> "2.5e-6": a learning rate as a folder name would write it."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


class Runner:
    def __init__(self, spec: dict, runs: Path, *, dry_run: bool = False, jobs: int = 1,
                 search_lrs: list[float] | None = None, npo_grid: dict | None = None):
        self.spec, self.dry_run, self.jobs = spec, dry_run, jobs
        self.search_lrs = search_lrs  # the learning-rate search: every arm at every rate, on validation
        self.npo_grid = npo_grid  # NPO's search: npo-only once per named configuration, on validation
        self.pending: list[tuple[Path, list[str]]] = []  # arm runs queued for the parallel phase
        self.lock = threading.Lock()
        self.task = spec["task"]
        task_folder = self.task.replace(":", "-").replace(".", "_")
        self.root = runs / task_folder
        self.experiment_root = self.root / (spec["name"] + ("-search" if search_lrs else "")
                                            + ("-npo-search" if npo_grid else ""))
        self.log = self.experiment_root / "commands.log"
        self.configs: list[tuple[str, dict]] = []  # (command, options) of every arm run, for checks
        self.practical: dict[str, list[Path]] = {}  # rule-based noise setting -> its run folders

    def noisepo(self, *args: str, output: Path | None = None) -> None:
        """Run one `noisepo` command (its output to `output` when given), logging it and its wall time."""
        command = [sys.executable, "-m", "noisepo", *args]
        text = " ".join(shlex.quote(a) for a in command[2:])
        print(f"$ {text}" + (f"   > {output}" if output else ""), flush=True)
        if self.dry_run:
            return
        start = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if output is None:
            subprocess.run(command, check=True, env=env)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            with output.open("w", encoding="utf-8") as sink:
                subprocess.run(command, check=True, env=env, stdout=sink, stderr=subprocess.STDOUT)
        with self.lock:
            self.experiment_root.mkdir(parents=True, exist_ok=True)
            with self.log.open("a", encoding="utf-8") as log:
                log.write(f"{time.time() - start:8.1f} s  {text}\n")

    # ------------------------------------------------------------------ shared per seed
    def data(self, seed: int) -> Path:
        options = {"task": self.task, "seed": seed, **self.spec["data"]}
        folder = self.root / f"data-{short_hash(options)}-s{seed}"
        if not (folder / "manifest.json").exists():
            self.noisepo("data", "make", "--output", str(folder), *flags(options))
        return folder

    def sft(self, seed: int, data: Path) -> Path:
        options = {"task": self.task, "seed": seed, "data": str(data / "sft.jsonl"),
                   "eval_data": str(data / "val.jsonl"), **self.spec["sft"]}
        # Keyed by what decides the SFT data and training (not n_pairs): experiments and their --quick
        # variants that differ only in the pairs share one SFT model per seed.
        sft_data = {k: v for k, v in self.spec["data"].items() if k != "n_pairs"}
        key = {**options, "data": sft_data, "eval_data": None}
        folder = self.root / f"sft-{short_hash(key)}-s{seed}"
        if not (folder / "metrics.json").exists():
            self.noisepo("sft", "--output", str(folder), "--resume", *flags(options))
        return folder / "model"

    def noisy_data(self, data: Path, name: str, corruption: dict, seed: int) -> Path:
        """The preference pairs corrupted by `corruption` (`noisepo data corrupt` options), cached."""
        path = data / f"preferences-{name}.jsonl"
        if not path.exists():
            self.noisepo("data", "corrupt", str(data / "preferences.jsonl"), str(path), "--seed", str(seed),
                         *flags(corruption))
        return path

    # ------------------------------------------------------------------ arms
    def arm(self, name: str, seed: int, model: Path, data_file: Path, eval_file: Path, suffix: str = "",
            learning_rate: float | None = None, queue: bool = True, extra: dict | None = None) -> Path | None:
        """The arm's run folder, its run queued unless finished; with `queue=False` (an arm left out by
        `--only`) the folder only when it is finished, else None, so reports still cover it."""
        arm = self.spec["arms"][name]
        command = arm.get("command", "dnpo")
        options = deep_merge(self.spec.get("loop", {}).get(command, {}), arm.get("options", {}))
        if learning_rate is not None:
            options = deep_merge(options, {"training.learning_rate": learning_rate})
            suffix += f"-lr{short_float(learning_rate)}"
        if extra:
            options = deep_merge(options, extra)
        options = deep_merge(options, {"model": str(model), "data": str(data_file), "task": self.task,
                                       "eval_data": str(eval_file), "seed": seed, "progress": False,
                                       "training.seed": seed})
        if options.get("dsl", {}).get("scorer") == "verifier" and not options["dsl"].get("verifier"):
            options["dsl"]["verifier"] = self.task  # DSL judges with the task's own verifier
        folder = self.experiment_root / f"{name}{suffix}-s{seed}"
        if (folder / "summary.json").exists():
            return folder
        if not queue:
            return None
        config = self.experiment_root / "configs" / f"{folder.name}.yaml"
        options["output"] = str(folder)
        self.configs.append((command, options))
        if not self.dry_run:
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(options, sort_keys=False))
        self.pending.append((folder, [command, "--config", str(config)]))
        return folder

    def run_pending(self) -> None:
        """The queued arm runs, `jobs` at a time; the first failure stops the experiment."""
        pending, self.pending = self.pending, []
        if self.jobs <= 1:
            for _, args in pending:
                self.noisepo(*args)
            return
        logs = self.experiment_root / "logs"
        with ThreadPoolExecutor(self.jobs) as pool:
            for future in [pool.submit(self.noisepo, *args, output=logs / f"{folder.name}.log")
                           for folder, args in pending]:
                future.result()

    def run(self, seeds: list[int], only: list[str] | None, *, prepare_only: bool = False) -> list[Path]:
        folders = []
        # Arms outside `--only` are not run, but their finished folders still go into the report, so
        # running one more arm does not shrink the experiment's report to that arm.
        queued = {a: not only or a in only for a in self.spec["arms"]}
        # The search evaluates on validation; the experiment itself on the test split, read once.
        split = "val.jsonl" if self.search_lrs or self.npo_grid else "test.jsonl"
        for seed in seeds:
            data = self.data(seed)
            model = self.sft(seed, data)
            if prepare_only:
                continue
            if self.npo_grid:
                for config_name, npo_options in self.npo_grid.items():
                    folder = self.arm("npo-only", seed, model, data / "sft.jsonl", data / split, f"-{config_name}",
                                      extra={f"npo.{k}": v for k, v in npo_options.items()})
                    folders.append(folder)
                continue
            noise = self.spec.get("noise")
            for learning_rate in self.search_lrs or [None]:
                for arm, queue in queued.items():
                    if noise is None:  # experiment A: SFT data, one run per arm
                        folder = self.arm(arm, seed, model, data / "sft.jsonl", data / split,
                                          learning_rate=learning_rate, queue=queue)
                        if folder is not None:
                            folders.append(folder)
                        continue
                    settings = {f"noise{rate:g}": {"kind": "symmetric", "eta": rate} for rate in noise.get("rates", [])}
                    settings.update(noise.get("practical") or {})
                    for name, corruption in settings.items():
                        pairs = self.noisy_data(data, name, corruption, seed)
                        folder = self.arm(arm, seed, model, pairs, data / split, f"-{name}", learning_rate, queue)
                        if folder is None:
                            continue
                        folders.append(folder)
                        if corruption.get("kind") != "symmetric":  # its own report: not a point of the rate sweep
                            self.practical.setdefault(name, []).append(folder)
        self.run_pending()
        return folders

    def npo_search_rows(self, folders: list[Path]) -> list[dict]:
        """Per configuration: its options, final validation accuracy, and what the noise did (mean over the
        NPO iterations of the mean |M_noisy − M_clean|, its largest value, the last σ means)."""
        rows = []
        for folder in folders:
            name = folder.name.rsplit("-s", 1)[0].removeprefix("npo-only-")
            steps = [json.loads(p.read_text()) for p in sorted(folder.glob("iter_*/metrics.json"),
                                                                key=lambda p: int(p.parent.name.split("_")[1]))]
            npo_steps = [m for m in steps if m.get("npo")]
            effects = [m["npo/margin_effect"] for m in npo_steps if m.get("npo/margin_effect") is not None]
            rows.append({"config": name, "options": self.npo_grid.get(name, {}),
                         "accuracy": steps[-1].get("accuracy") if steps else None,
                         "accuracy_per_iteration": [m.get("accuracy") for m in steps],
                         "margin_effect": sum(effects) / len(effects) if effects else None,
                         "margin_effect_max": max((m.get("npo/margin_effect_max") or 0 for m in npo_steps), default=None),
                         "sigma_mean": npo_steps[-1].get("sigma_mean") if npo_steps else None,
                         "sigma_target": npo_steps[-1].get("sigma_target") if npo_steps else None})
        return rows

    @staticmethod
    def npo_search_table(rows: list[dict]) -> str:
        def number(value, scale=1.0, digits=3):
            return "-" if value is None else f"{scale * value:.{digits}f}"

        lines = ["| configuration | options | val. accuracy (%) | per iteration | mean margin effect | max | σ mean | "
                 "σ at targets |", "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
            per_iteration = " → ".join(number(a, 100, 1) for a in row["accuracy_per_iteration"])
            lines.append(f"| {row['config']} | {options} | {number(row['accuracy'], 100, 1)} | {per_iteration} | "
                         f"{number(row['margin_effect'])} | {number(row['margin_effect_max'])} | "
                         f"{number(row['sigma_mean'], digits=4)} | {number(row['sigma_target'], digits=4)} |")
        return "\n".join(lines) + "\n"

    def search_table(self, folders: list[Path]) -> str:
        """Markdown: final validation accuracy of every searched run, arm x learning rate (per seed)."""
        cells: dict[tuple[str, str], list[str]] = {}
        for folder in folders:
            summary = json.loads((folder / "summary.json").read_text())
            steps = summary.get("rounds") or summary.get("iterations") or []  # ropo / dnpo, spin
            final = steps[-1].get("accuracy") if steps else None
            stem = folder.name.rsplit("-s", 1)[0]
            arm, _, rate = stem.rpartition("-lr")
            cells.setdefault((arm, rate), []).append("-" if final is None else f"{100 * final:.1f}")
        arms = list(dict.fromkeys(a for a, _ in cells))
        rates = sorted({r for _, r in cells}, key=float)
        lines = ["| lr | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for rate in rates:
            lines.append(f"| {rate} | " + " | ".join(" / ".join(cells.get((a, rate), ["-"])) for a in arms) + " |")
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the experiment's YAML file")
    parser.add_argument("--quick", action="store_true", help="apply the YAML's quick: overrides")
    parser.add_argument("--task", help="override the task (built-in name or import path pkg.mod:Task)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the YAML's)")
    parser.add_argument("--only", help="comma-separated arms to run (default: all)")
    parser.add_argument("--runs", default=str(HERE / "runs"), help="where run folders go (default: experiments/runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--prepare-only", action="store_true", help="make the data and SFT models only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="arm runs at once, one CPU thread each (default: one per CPU core)")
    parser.add_argument("--search-lr", help="comma-separated learning rates: run the search on validation instead")
    parser.add_argument("--search-npo", metavar="GRID.yaml",
                        help="NPO's search on validation: npo-only once per named configuration of the grid file")
    parser.add_argument("--search-eta", default="0.2",
                        help="experiment B's flip rate(s) for the search, comma-separated (default 0.2, as in LOG.md)")
    parser.add_argument("--etas", help="experiment B: run only these flip rates (comma-separated; the rule-based "
                                       "noise settings are left out), e.g. when time allows part of the sweep")
    args = parser.parse_args(argv)

    spec = yaml.safe_load(Path(args.spec).read_text(encoding="utf-8"))
    if args.quick:
        spec = deep_merge(spec, spec.get("quick", {}))
        spec["name"] = spec["name"] + "-quick"
    if args.task:
        spec["task"] = args.task
    spec = with_task_overrides(spec)
    search_lrs = [float(rate) for rate in args.search_lr.split(",")] if args.search_lr else None
    if search_lrs and spec.get("noise"):
        spec["noise"] = {"rates": [float(rate) for rate in args.search_eta.split(",")]}
    elif args.etas and spec.get("noise"):
        spec["noise"] = {"rates": [float(rate) for rate in args.etas.split(",")]}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec["seeds"])
    npo_grid = yaml.safe_load(Path(args.search_npo).read_text(encoding="utf-8")) if args.search_npo else None
    if (search_lrs or npo_grid) and not args.seeds:
        seeds = seeds[:1]
    runner = Runner(spec, Path(args.runs), dry_run=args.dry_run, jobs=args.jobs, search_lrs=search_lrs,
                    npo_grid=npo_grid)
    start = time.time()
    folders = runner.run(seeds, args.only.split(",") if args.only else None, prepare_only=args.prepare_only)
    if npo_grid and folders and not args.dry_run:
        rows = runner.npo_search_rows(folders)
        table = runner.npo_search_table(rows)
        (runner.experiment_root / "search.md").write_text(
            f"# {spec['title']} ({spec['task']}): NPO search (npo-only), validation split, seed {seeds[0]}\n\n{table}")
        (runner.experiment_root / "search.json").write_text(json.dumps(rows, indent=1))
        print(table)
    elif search_lrs and folders and not args.dry_run:
        table = runner.search_table(folders)
        (runner.experiment_root / "search.md").write_text(
            f"# {spec['title']} ({spec['task']}): learning-rate search, final validation accuracy (%)\n\n{table}")
        print(table)
    elif folders and not args.dry_run:
        practical = {f for group in runner.practical.values() for f in group}
        runner.noisepo("report", "--runs", ",".join(str(f) for f in folders if f not in practical),
                       "--output", str(runner.experiment_root / "report"), "--title", f"{spec['title']} ({spec['task']})",
                       "--histograms", "first-seed")
        for name, group in runner.practical.items():
            runner.noisepo("report", "--runs", ",".join(map(str, group)),
                           "--output", str(runner.experiment_root / f"report-{name}"),
                           "--title", f"{spec['title']}: rule-based noise {name} ({spec['task']})",
                           "--histograms", "first-seed")
    print(f"done in {time.time() - start:.0f} s: {runner.experiment_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
