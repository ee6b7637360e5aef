"""Run the benchmarks: `python benchmarks/run.py [--quick] [--output FILE] [--only NAME]`.

Collects `BENCHMARKS: dict[str, Callable[[bool], dict]]` from every `benchmarks/bench_*.py`
(the argument is `quick`); each returns `{"name", "ours", "baseline", "unit", "ratio", ...extra}`.
Prints a table; `--output` writes the results as a JSON list.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


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


def table(results: list[dict]) -> str:
    rows = [("name", "ours", "baseline", "unit", "ratio")]
    rows += [(r["name"], str(r["ours"]), str(r["baseline"]), r["unit"], str(r["ratio"])) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (the whole suite in < 5 min).")
    parser.add_argument("--output", help="Write the results as a JSON list to this file.")
    parser.add_argument("--only", action="append", help="Run only this benchmark (repeatable).")
    args = parser.parse_args(argv)
    benchmarks = collect()
    unknown = set(args.only or ()) - set(benchmarks)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(benchmarks)}")
    results = []
    for name, fn in benchmarks.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(fn(args.quick))
    print(table(results))
    if args.output:
        sys.path.insert(0, str(HERE.parent / "src"))
        from noisepo.io import write_json_atomic

        write_json_atomic(args.output, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
