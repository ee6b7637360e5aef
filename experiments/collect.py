"""Copy what is committed of the finished experiments: each report (report.md, results.json, PNGs), its
commands.log and the learning-rate search tables, from RUNS/<task>/ to experiments/results/<task>/.

    python experiments/collect.py [--runs experiments/runs]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(HERE / "runs"))
    runs = Path(parser.parse_args().runs)
    for experiment in sorted(runs.glob("*/*")):
        if not experiment.is_dir() or experiment.name.startswith(("data-", "sft-")):
            continue
        target = HERE / "results" / experiment.parent.name / experiment.name
        copied = []
        for report in sorted(experiment.glob("report*")):
            if report.is_dir():
                shutil.copytree(report, target / report.name if report.name != "report" else target,
                                dirs_exist_ok=True)
                copied.append(report.name)
        for name in ("commands.log", "search.md", "search.json"):
            if (experiment / name).is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(experiment / name, target / name)
                copied.append(name)
        if copied:
            print(f"{experiment} -> {target}: {', '.join(copied)}")


if __name__ == "__main__":
    main()
