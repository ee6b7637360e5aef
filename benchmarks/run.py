"""Run the benchmarks: `python benchmarks/run.py [--quick] [--output FILE] [--only NAME] [--no-readme]`.

Collects `BENCHMARKS: dict[str, Callable[[bool], dict]]` from every `benchmarks/bench_*.py`
(the argument is `quick`); each times ours and its baseline side by side in one run, alternating
after a warm-up, and reports the median of at least 5 rounds as
`{"name", "ours", "baseline", "unit", "ratio", ...extra}` (extra: `target`, e.g. "<= 1.3", `notes`: a
line for the README table).

Prints a table with each target met or not; `--output` writes the results as a JSON list (each
with the machine's description under `machine`). A run of the whole suite (no `--only`) appends a
dated table, headed by the machine's description (CPU model, cores, torch version, device), to
benchmarks/README.md (`--no-readme`: don't; `--readme FILE`: elsewhere). On a CPU the README table
quotes ratios (and memory), not absolute times: those are only quoted from a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TIME_UNITS = ("tokens/s", "s/step", "s per")  # units of absolute speed: not quoted from a CPU


def collect() -> dict:
    """name -> callable, from every bench_*.py beside this file (sorted by module name)."""
    sys.path.insert(0, str(HERE))
    found = {}
    for path in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        for name, fn in getattr(module, "BENCHMARKS", {}).items():
            if name in found:
                raise SystemExit(f"benchmark {name!r} defined twice ({path.name})")
            found[name] = fn
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def describe(info: dict) -> str:
    device = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    load = f", load average {info['load_average']} at the start" if "load_average" in info else ""
    return (f"{info['cpu']}, {info['cores']} cores, {device}, torch {info['torch']}, "
            f"Python {info['python']}{load}")


def target_met(result: dict) -> bool | None:
    """Whether `ratio` meets `target` ("<= 1.3", ">= 8"); None without a target."""
    match = re.fullmatch(r"\s*(<=|>=)\s*([0-9.]+)\s*", str(result.get("target", "")))
    if not match:
        return None
    bound, ratio = float(match.group(2)), float(result["ratio"])
    ok = ratio <= bound if match.group(1) == "<=" else ratio >= bound
    if "memory_ok" in result:  # a second condition (e.g. peak memory no higher than the baseline's)
        ok = ok and bool(result["memory_ok"])
    return ok


def _verdict(result: dict) -> str:
    return {True: "met", False: "NOT met", None: "—"}[target_met(result)]


def table(results: list[dict]) -> str:
    rows = [("name", "ours", "baseline", "unit", "ratio", "target", "")]
    rows += [(r["name"], str(r["ours"]), str(r["baseline"]), r["unit"], str(r["ratio"]),
              str(r.get("target", "")), _verdict(r)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def markdown(results: list[dict], info: dict, *, quick: bool, seconds: float, command: str) -> str:
    """The README section: machine, command, one row per benchmark."""
    absolute = bool(info.get("gpu"))
    lines = [f"### {'`--quick`' if quick else 'Full'} run, {info['date']}", "",
             f"`{command}` on {describe(info)}; {seconds / 60:.1f} min in all.", "",
             "| benchmark | ours | baseline | unit | ratio | target | | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        hide = not absolute and any(unit in r["unit"] for unit in TIME_UNITS)
        ours, baseline = ("—", "—") if hide else (r["ours"], r["baseline"])
        lines.append(f"| `{r['name']}` | {ours} | {baseline} | {r['unit']} | **{r['ratio']}** | "
                     f"{r.get('target', '—')} | {_verdict(r)} | {r.get('notes', '')} |")
    if not absolute:
        lines += ["", "Absolute times are left out (CPU, shared cores): the ratios are what the alternation "
                      "makes meaningful."]
    return "\n".join(lines) + "\n"


def append_readme(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(text.rstrip("\n") + "\n\n" + section)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (the whole suite in < 5 min).")
    parser.add_argument("--output", help="Write the results as a JSON list to this file.")
    parser.add_argument("--only", action="append", help="Run only this benchmark (repeatable).")
    parser.add_argument("--readme", default=str(README), help="Where a whole-suite run appends its table.")
    parser.add_argument("--no-readme", action="store_true", help="Append no table.")
    args = parser.parse_args(argv)
    benchmarks = collect()
    unknown = set(args.only or ()) - set(benchmarks)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(benchmarks)}")
    info = machine()
    print(f"machine: {describe(info)}", file=sys.stderr, flush=True)
    results = []
    start = time.perf_counter()
    for name, fn in benchmarks.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        result = fn(args.quick)
        result["seconds"] = round(time.perf_counter() - began, 1)
        result["machine"] = describe(info)
        results.append(result)
    seconds = time.perf_counter() - start
    print(table(results))
    print(f"{len(results)} benchmark(s) in {seconds:.0f} s")
    if args.output:
        sys.path.insert(0, str(HERE.parent / "src"))
        from noisepo.io import write_json_atomic

        write_json_atomic(args.output, results)
    if not args.only and not args.no_readme:
        command = "python benchmarks/run.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
        append_readme(Path(args.readme), markdown(results, info, quick=args.quick, seconds=seconds,
                                                  command=command))
        print(f"appended the table to {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
