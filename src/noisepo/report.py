"""`noisepo report`: a Markdown report with tables and PNG plots from finished run folders.

Reads what `noisepo dnpo` / `noisepo spin` (`iter_<k>/metrics.json`) and `noisepo ropo`
(`round_<r>/metrics.json`, `round_<r>/loss_histogram.json`, `reference/pairs.jsonl`) leave behind, plus
every run's `manifest.json` and `summary.json`. Nothing is recomputed, so no torch is imported.

Runs are grouped by method, and within a group by seed (the manifest's `seeds`); runs whose options
differ in anything but the seed, output, data and model paths form separate groups, labelled by the
options that differ, so other hyperparameters are never averaged as if they were seeds:
- DNPO/SPIN runs: `spin`, `dsl`, `npo` or `dnpo` from the manifest's `dsl.enabled` / `npo.enabled`.
- ROPO runs: `ropo[<loss>, filter|no-filter]`, and the label-noise rate: the share of
  `label_flipped: true` pairs in `reference/pairs.jsonl` when every pair carries the flag, else a
  number in the run folder's name after `noise`, `flip` or `rate` (`runs/ropo-noise0.2-s1`), else none.
A run's label is its folder name. Tables give mean ± std (sample std, n − 1) over the finished seeds of
a group and list every seed beside it; a folder without `summary.json` is listed as incomplete (its
finished iterations still appear per seed, but not in the means).

OUTPUT/report.md links the plots, written beside it (matplotlib, the `report` extra, Agg backend):
`accuracy_per_iteration.png` (DNPO runs), `ropo_filter.png` (filter precision/recall per round),
`ropo_histograms_<run>.png` (ℓ_ropo of clean vs flipped pairs per round), and
`accuracy_vs_flip_rate.png` when ROPO runs carry at least two different noise rates.
"""
from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from noisepo.config import check, option
from noisepo.errors import ConfigError, InputError
from noisepo.io import atomic_open


@dataclass
class ReportConfig:
    """Markdown report (tables + PNG plots) from finished `dnpo` / `spin` / `ropo` run folders."""

    run_dirs: list[str] = option(default_factory=list, positional=True, metavar="RUN_DIR",
                                 help="Run folders (`noisepo report runs/dnpo-s* --output report`); each may be "
                                      "a glob. Added to --runs.")
    runs: list[str] = option(default_factory=list, help="Run folders, comma-separated; each may be a glob "
                                                        "(`--runs 'runs/dnpo-*,runs/ropo-s0'`).")
    output: str = option("", "Folder for report.md and its PNG plots (created).")
    title: str = option("noisepo report", "Title of the report.")
    histograms: Literal["all", "first-seed", "none"] = option(
        "all", "ROPO loss histograms to draw: one PNG per run (all), per method and flip rate for the first "
               "run listed only (first-seed: a sweep of many seeds stays readable), or none.")

    def __post_init__(self):
        self.runs = [*self.run_dirs, *self.runs]
        self.run_dirs = []
        check(bool(self.runs), "runs", "give at least one run folder (RUN_DIR ... or --runs A,B,...)")
        check(bool(self.output), "output", "is required (the folder for report.md)")


# --------------------------------------------------------------------------- reading run folders
@dataclass
class Run:
    path: Path
    kind: str  # "dnpo" or "ropo"
    method: str
    seeds: dict
    noise_rate: float | None
    summary: dict | None  # None: incomplete
    steps: list[dict] = field(default_factory=list)  # iter_<k> / round_<r> metrics.json, in order
    histograms: list[tuple[int, dict]] = field(default_factory=list)  # (round, loss_histogram.json)
    config: dict = field(default_factory=dict)  # the manifest's config
    initial: dict = field(default_factory=dict)  # the initial model's accuracy_<subset>, when evaluated

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed_label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.seeds.items())) or "-"

    @property
    def complete(self) -> bool:
        return self.summary is not None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path=path) from None


def _numbered(root: Path, prefix: str) -> list[tuple[int, Path]]:
    found = []
    for child in root.glob(f"{prefix}_*"):
        suffix = child.name[len(prefix) + 1:]
        if child.is_dir() and suffix.isdigit():
            found.append((int(suffix), child))
    return sorted(found)


_RATE_IN_NAME = re.compile(r"(?:noise|flip|rate)[-_=]?(\d*\.?\d+)", re.IGNORECASE)


def _noise_rate(root: Path) -> float | None:
    """Share of flipped pairs in the ROPO reference data when every pair records it, else from the name."""
    pairs = root / "reference" / "pairs.jsonl"
    if pairs.is_file():
        flags = []
        with pairs.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    flag = json.loads(line).get("label_flipped")
                except json.JSONDecodeError:
                    raise InputError("not valid JSON", path=pairs, line=number) from None
                if not isinstance(flag, bool):
                    flags = []
                    break
                flags.append(flag)
        if flags:
            return sum(flags) / len(flags)
    match = _RATE_IN_NAME.search(root.name)
    if match:
        rate = float(match.group(1))
        return rate / 100 if rate > 1 else rate  # "noise20" means 20 %
    return None


def _with_subsets(step: dict, folder: Path) -> dict:
    """A step's metrics plus `accuracy_<subset>` from its eval.json (the evaluation's
    `accuracy_by_subset`, e.g. the built-in tasks' hard/easy problems), when there is one, and
    `lm_eval_<task>` (each lm-eval task's headline metric) from its lm_eval.json."""
    from noisepo.lm_eval_tasks import headline

    if (folder / "eval.json").is_file():
        evaluation = _read_json(folder / "eval.json")
        for name, value in ((evaluation or {}).get("accuracy_by_subset") or {}).items():
            step.setdefault(f"accuracy_{name}", value)
    if (folder / "lm_eval.json").is_file():
        for task, metrics in (_read_json(folder / "lm_eval.json") or {}).items():
            best = headline(metrics) if isinstance(metrics, dict) else None
            if best:
                step.setdefault(f"lm_eval_{task}", best[1])
    return step


def _initial_subsets(root: Path) -> dict:
    """`accuracy_<subset>` and `lm_eval_<task>` of the initial model (dnpo: base/, ropo: reference/)."""
    for name in ("base", "reference"):
        if (root / name / "eval.json").is_file() or (root / name / "lm_eval.json").is_file():
            return {k: v for k, v in _with_subsets({}, root / name).items()}
    return {}


def load_run(path) -> Run:
    """One run folder; InputError naming it when it is not one (no manifest, unknown loop, bad JSON)."""
    root = Path(path)
    if not (root / "manifest.json").is_file():
        raise InputError("not a run folder of noisepo dnpo/spin/ropo (no manifest.json)", path=root)
    manifest = _read_json(root / "manifest.json")
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(config, dict):
        raise InputError("manifest has no 'config' object", path=root / "manifest.json")
    seeds = manifest.get("seeds") or {}
    summary = _read_json(root / "summary.json") if (root / "summary.json").is_file() else None
    if isinstance(config.get("dsl"), dict) and isinstance(config.get("npo"), dict):
        dsl, npo = bool(config["dsl"].get("enabled")), bool(config["npo"].get("enabled"))
        method = {(False, False): "spin", (True, False): "dsl", (False, True): "npo", (True, True): "dnpo"}[dsl, npo]
        steps = [_with_subsets(_read_json(p / "metrics.json"), p) for _, p in _numbered(root, "iter")
                 if (p / "metrics.json").is_file()]
        return Run(root, "dnpo", method, seeds, None, summary, steps, config=config, initial=_initial_subsets(root))
    if "loss" in config and "rho" in config:
        filtering = bool(config.get("filter", True)) and float(config.get("rho", 0)) > 0
        method = f"ropo[{config['loss']}, {'filter' if filtering else 'no-filter'}]"
        steps, histograms = [], []
        for r, folder in _numbered(root, "round"):
            if (folder / "metrics.json").is_file():
                steps.append(_with_subsets(_read_json(folder / "metrics.json"), folder))
            if (folder / "loss_histogram.json").is_file():
                histograms.append((r, _read_json(folder / "loss_histogram.json")))
        return Run(root, "ropo", method, seeds, _noise_rate(root), summary, steps, histograms, config=config,
                   initial=_initial_subsets(root))
    raise InputError("manifest is not of a dnpo/spin/ropo run (no dsl/npo or loss/rho options)",
                     path=root / "manifest.json")


def expand_runs(patterns: list[str]) -> list[Path]:
    """Each entry as a glob (sorted) when it has glob characters, else as it is; duplicates once."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{pattern!r} matches no folder", key="runs")
        for match in matches:
            if Path(match) not in out:
                out.append(Path(match))
    return out


# --------------------------------------------------------------------------- numbers
def mean_std(values: list[float]) -> tuple[float, float | None] | None:
    """(mean, sample std) of the finite values; std None for a single value; None for none."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def fmt(value, spec: str = ".3f") -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def fmt_mean_std(values: list, spec: str = ".3f") -> str:
    stats = mean_std(values)
    if stats is None:
        return "-"
    mean, std = stats
    n = sum(1 for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    return f"{format(mean, spec)} ± {'-' if std is None else format(std, spec)} (n={n})"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}" if abs(rate * 100 - round(rate * 100)) < 1e-9 else f"{rate:.1%}"


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _final(run: Run, key: str):
    """The last iteration's / round's value of `key` (from the summary when finished)."""
    steps = run.summary.get("iterations" if run.kind == "dnpo" else "rounds", []) if run.summary else run.steps
    if not steps:
        return None
    value = steps[-1].get(key)
    if value is None and len(run.steps) == len(steps):  # per-subset accuracy lives in the step folders
        value = run.steps[-1].get(key)
    return value


# --------------------------------------------------------------------------- plots
def _figure_tools():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the plots need matplotlib: pip install 'noisepo[report]'", key="report") from None
    return Figure, FigureCanvasAgg


def _save(figure, path: Path) -> str:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with atomic_open(path, "wb", encoding=None) as handle:
        handle.write(buffer.getvalue())
    return path.name


def _new_axes(Figure, Canvas, ncols: int = 1, size=(6, 3.5)):
    figure = Figure(figsize=(size[0] * ncols, size[1]))
    Canvas(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, axes


def _per_step(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (0 for one seed) of `key` over the finished runs of a group."""
    finished = [r for r in runs if r.complete]
    length = max((len(r.steps) for r in finished), default=0)
    xs, means, stds = [], [], []
    initial = mean_std([_initial(r, key) for r in finished])
    if initial is not None and length:  # the starting model, drawn at step -1
        xs.append(-1)
        means.append(initial[0])
        stds.append(initial[1] or 0.0)
    for k in range(length):
        stats = mean_std([r.steps[k].get(key) for r in finished if k < len(r.steps)])
        if stats is not None:
            xs.append(k)
            means.append(stats[0])
            stds.append(stats[1] or 0.0)
    return xs, means, stds


def _label(group: tuple) -> str:
    method, rate, variant = group
    name = method if not variant else f"{method} ({variant})"
    return name if rate is None else f"{name} @ {_rate(rate)} flipped"


# Options that may differ between the seeds of one group: everything else must match, so runs with
# other hyperparameters are never averaged together as if they were seeds.
SEED_LIKE = {"output", "seed", "training.seed", "progress", "data", "eval_data", "model"}  # data: per-seed splits


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_SEED_SUFFIX = re.compile(r"-s\d+$")


def _rate_key(run: Run):
    """What makes runs the same noise setting: the rate in the folder name (`dpo-noise0.1-s2`: the nominal
    η; each seed's draw realises its own share of flips), else the folder name without its seed suffix
    (`dpo-flagged0.4-s2`: a rule-based setting), else the realised share itself."""
    if run.noise_rate is None:
        return None
    named = _RATE_IN_NAME.search(run.path.name)
    if named:
        return ("nominal", float(named.group(1)))
    stem = _SEED_SUFFIX.sub("", run.path.name)
    return ("setting", stem) if stem != run.path.name else ("realised", run.noise_rate)


def _group_rate(key, members: list[Run]) -> float | None:
    """A group's flip rate: the nominal η when the folders name one, else the mean realised share."""
    if key is None:
        return None
    if key[0] == "nominal":
        return key[1]
    return sum(r.noise_rate for r in members) / len(members)


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    """(method, flip rate, variant) -> runs. Runs of one method whose configs differ beyond SEED_LIKE
    options are separate groups, labelled by the options that differ (`training.learning_rate=3e-05`).
    Seeds of one noise setting are one group even though each realises its own share of flips."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    groups: dict[tuple, list[Run]] = {}
    for method, members in by_method.items():
        # the variant: the options that differ among all this method's runs (beyond seeds and the noise)
        flats = [{k: v for k, v in _flat(r.config).items() if k not in SEED_LIKE} for r in members]
        differing = sorted({k for f in flats for k in f if len({repr(g.get(k)) for g in flats}) > 1})
        by_setting: dict[tuple, list[Run]] = {}
        for run, flat in zip(members, flats):
            variant = ", ".join(f"{k}={flat.get(k)}" for k in differing)
            by_setting.setdefault((_rate_key(run), variant), []).append(run)
        for (key, variant), runs_of_setting in by_setting.items():
            groups.setdefault((method, _group_rate(key, runs_of_setting), variant), []).extend(runs_of_setting)
    return groups


def plot_lines(groups: dict, keys: list[tuple[str, str]], path: Path, *, xlabel: str, title: str) -> str | None:
    """One panel per (key, label): the per-step mean ± std of every group; None when nothing to draw."""
    Figure, Canvas = _figure_tools()
    figure, axes = _new_axes(Figure, Canvas, len(keys))
    drawn = False
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
    for ax, (key, ylabel) in zip(axes, keys):
        low, high = 1.0, 0.0
        for index, (group, runs) in enumerate(groups.items()):
            xs, means, stds = _per_step(runs, key)
            if xs:
                marker, line = styles[index % len(styles)]
                # Offset each group a little along x, so groups with equal values stay visible.
                shift = 0.04 * (index - (len(groups) - 1) / 2)
                ax.errorbar([x + shift for x in xs], means, yerr=stds, marker=marker, linestyle=line, capsize=3,
                            label=_label(group))
                low = min(low, *(m - e for m, e in zip(means, stds)))
                high = max(high, *(m + e for m, e in zip(means, stds)))
                drawn = True
        ax.set_xlabel(f"{xlabel} (-1: the initial model)" if drawn else xlabel)
        ax.set_ylabel(ylabel)
        if drawn:  # every plotted metric is a rate in [0, 1]: zoom on the data, stay inside [0, 1]
            pad = max(0.02, 0.1 * (high - low))
            ax.set_ylim(max(-0.02, low - pad), min(1.02, high + pad))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(figure, path) if drawn else None


def plot_histograms(run: Run, path: Path) -> str | None:
    """ℓ_ropo histograms per round: clean vs flipped when the data says, else kept vs discarded."""
    if not run.histograms:
        return None
    Figure, Canvas = _figure_tools()
    figure, axes = _new_axes(Figure, Canvas, len(run.histograms), size=(4.5, 3.2))
    for ax, (r, hist) in zip(axes, run.histograms):
        counts = hist.get("counts", {})
        for name in (("clean", "flipped") if "flipped" in counts else ("kept", "discarded")):
            if name in counts:
                ax.stairs(counts[name], hist["bin_edges"], label=f"{name} ({sum(counts[name])})")
        ax.set_title(f"{run.name}: round {r}")
        ax.set_xlabel("ℓ_ropo")
        ax.set_ylabel("pairs")
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_accuracy_vs_rate(groups: dict[tuple, list[Run]], path: Path) -> str | None:
    """Final accuracy (mean ± std over seeds) against the flip rate, one line per method (and variant)."""
    Figure, Canvas = _figure_tools()
    figure, axes = _new_axes(Figure, Canvas)
    ax = axes[0]
    for method, variant in dict.fromkeys((g[0], g[2]) for g in groups):
        points = []
        for rate in sorted(g[1] for g in groups if (g[0], g[2]) == (method, variant)):
            members = groups[(method, rate, variant)]
            stats = mean_std([_final(r, "accuracy") for r in members if r.complete])
            if stats is not None:
                points.append((rate, stats[0], stats[1] or 0.0))
        if points:
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", capsize=3, label=_label((method, None, variant)))
    if not ax.get_legend_handles_labels()[0]:
        return None
    ax.set_xlabel("flip rate")
    ax.set_ylabel("final accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small")
    return _save(figure, path)


# --------------------------------------------------------------------------- the report
DNPO_METRICS = [("accuracy", "accuracy", ".3f"), ("win_rate", "win rate", ".3f"),
                ("flipped", "DSL flipped pairs", ".1f"), ("sigma_mean", "mean σ (NPO)", ".4f"),
                ("filter_precision", "filter precision (robust arm)", ".3f"),
                ("filter_recall", "filter recall (robust arm)", ".3f")]
ROPO_METRICS = [("accuracy", "accuracy", ".3f"), ("filter_precision", "filter precision", ".3f"),
                ("filter_recall", "filter recall", ".3f"),
                ("harmful_flip_recall", "recall of harmful flips (the initial model agrees)", ".3f"),
                ("auroc_flipped", "AUROC (flipped vs clean)", ".3f")]


def _initial(run: Run, key: str):
    """The initial model's value of `key` (accuracy from the summary, a subset's from its eval.json)."""
    return (run.summary or {}).get("initial_accuracy") if key == "accuracy" else run.initial.get(key)


def _group_section(group, runs: list[Run]) -> list[str]:
    kind = runs[0].kind
    step_name = "iteration" if kind == "dnpo" else "round"
    metrics = list(DNPO_METRICS if kind == "dnpo" else ROPO_METRICS)
    subsets = sorted({k for r in runs for s in r.steps for k in s if k.startswith("accuracy_")})
    metrics[1:1] = [(k, f"accuracy on the {k[len('accuracy_'):]} problems", ".3f") for k in subsets]
    metrics += [(k, f"lm-eval: {k[len('lm_eval_'):]}", ".3f")
                for k in sorted({k for r in runs for s in r.steps for k in s if k.startswith("lm_eval_")})]
    finished = [r for r in runs if r.complete]
    lines = [f"### {_label(group)}", "",
             f"{len(runs)} run(s), {len(finished)} finished; mean ± std over the finished seeds.", ""]
    length = max((len(r.steps) for r in runs), default=0)
    for key, title, spec in metrics:
        if not any(s.get(key) is not None for r in runs for s in r.steps):
            continue
        head = [step_name, "mean ± std"] + [f"{r.name} ({r.seed_label})" + ("" if r.complete else " — incomplete")
                                            for r in runs]
        rows = [head]
        initial = [_initial(r, key) for r in finished]
        if any(v is not None for v in initial):
            rows.append(["initial", fmt_mean_std(initial, spec)]
                        + [fmt(_initial(r, key), spec) if r.complete else "-" for r in runs])
        for k in range(length):
            values = [r.steps[k].get(key) if k < len(r.steps) else None for r in runs]
            done = [v for r, v in zip(runs, values) if r.complete]
            rows.append([str(k), fmt_mean_std(done, spec)] + [fmt(v, spec) for v in values])
        lines += [f"**{title}**", "", _table(rows), ""]
    return lines


def results_record(run: Run) -> dict:
    """One run's numbers for results.json: what the tables are made of, per step, in plain JSON."""
    keys = ("accuracy", "filter_precision", "filter_recall", "harmful_flip_recall", "auroc_flipped", "flipped",
            "trainable_pairs", "kept", "discarded", "refills", "sigma_mean")
    return {"run": run.name, "loop": run.kind, "method": run.method, "noise_rate": run.noise_rate,
            "seeds": run.seeds, "complete": run.complete,
            "initial_accuracy": (run.summary or {}).get("initial_accuracy"),
            "initial": run.initial,
            "steps": [{k: v for k, v in step.items() if k in keys or k.startswith("accuracy_")} for step in run.steps]}


def write_report(runs: list[Run], output: Path, title: str = "noisepo report", histograms: str = "all") -> Path:
    output.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    with atomic_open(output / "results.json", "w") as handle:
        json.dump([results_record(run) for run in runs], handle, indent=1)
    lines = [f"# {title}", "", "## Runs", ""]
    rows = [["run", "loop", "method", "flip rate", "seeds", "status", "iterations/rounds with metrics"]]
    for run in runs:
        rows.append([str(run.path), run.kind, run.method, _rate(run.noise_rate), run.seed_label,
                     "finished" if run.complete else "incomplete (no summary.json)", str(len(run.steps))])
    lines += [_table(rows), ""]

    lines += ["## Final numbers", "", "The last iteration's / round's value; mean ± std over the finished "
              "seeds, then every seed.", ""]
    subsets = sorted({k for r in runs for s in r.steps for k in s if k.startswith("accuracy_")})
    rows = [["method", "flip rate", "realised", "seeds", "final accuracy"]
            + [f"final {k.replace('_', ' ')}" for k in subsets] + ["per seed"]]
    for group, members in groups.items():
        finished = [r for r in members if r.complete]
        per_seed = "; ".join(f"{r.seed_label}: {fmt(_final(r, 'accuracy'))}" if r.complete
                             else f"{r.seed_label}: incomplete" for r in members)
        realised = [r.noise_rate for r in members if r.noise_rate is not None]
        rows.append([_label((group[0], None, group[2])), _rate(group[1]),
                     _rate(sum(realised) / len(realised)) if realised else "-", str(len(members)),
                     fmt_mean_std([_final(r, "accuracy") for r in finished])]
                    + [fmt_mean_std([_final(r, k) for r in finished]) for k in subsets] + [per_seed])
    lines += [_table(rows), ""]

    lines += ["## Per iteration / round", ""]
    for group, members in groups.items():
        lines += _group_section(group, members)

    plots = []
    dnpo_groups = {g: m for g, m in groups.items() if m[0].kind == "dnpo"}
    ropo_groups = {g: m for g, m in groups.items() if m[0].kind == "ropo"}
    if dnpo_groups:
        plots.append(("Accuracy per iteration (DNPO/SPIN)", plot_lines(
            dnpo_groups, [("accuracy", "accuracy")], output / "accuracy_per_iteration.png",
            xlabel="iteration", title="accuracy per iteration")))
    if ropo_groups:
        plots.append(("ROPO filter precision and recall per round", plot_lines(
            ropo_groups, [("filter_precision", "precision"), ("filter_recall", "recall")],
            output / "ropo_filter.png", xlabel="round", title="noise filter")))
        drawn_runs = [] if histograms == "none" else [r for m in ropo_groups.values()
                                                      for r in (m[:1] if histograms == "first-seed" else m)]
        for run in drawn_runs:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name)
            plots.append((f"ℓ_ropo histograms: {run.name}", plot_histograms(run, output / f"ropo_histograms_{slug}.png")))
        rated = {g: m for g, m in ropo_groups.items() if g[1] is not None}
        if len({g[1] for g in rated}) >= 2:
            plots.append(("Final accuracy against flip rate", plot_accuracy_vs_rate(
                rated, output / "accuracy_vs_flip_rate.png")))
    drawn = [(caption, name) for caption, name in plots if name]
    if drawn:
        lines += ["## Plots", ""]
        for caption, name in drawn:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    report = output / "report.md"
    with atomic_open(report, "w") as handle:
        handle.write("\n".join(lines))
    return report


def run_report(config: ReportConfig) -> int:
    _figure_tools()  # a missing extra fails before anything is read
    runs = [load_run(path) for path in expand_runs(config.runs)]
    report = write_report(runs, Path(config.output), config.title, config.histograms)
    incomplete = sum(not r.complete for r in runs)
    print(f"report: {report} ({len(runs)} runs, {incomplete} incomplete)")
    return 0
