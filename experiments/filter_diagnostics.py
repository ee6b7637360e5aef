"""How well the robust arm's filter separates wrongly from rightly labelled pairs, per iteration and subset.

    python experiments/filter_diagnostics.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a DNPO run with `--robust.rho > 0` (experiment C's `robust` arm). For every iteration k >= 1 it
reads the iteration's `filter.jsonl` (each training pair's ℓ_ropo and whether it was kept, in training
order) and the pairs of iteration k and k-1 (`pairs.jsonl`; the training set is this iteration's
trainable pairs plus, with history 1, the previous one's), and prints the AUROC of ℓ_ropo for wrongly
against rightly labelled pairs (1.0: every wrong pair scores above every right one; 0.5: chance) overall,
for this iteration's pairs and the history's, and per subset, with how many wrong pairs were discarded.
A pair is wrongly labelled when its rejected response is the ground-truth answer and its chosen is not
(the `answer` field the built-in tasks write).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from noisepo.io import read_jsonl
from noisepo.pipelines.ropo import auroc


def training_records(run: Path, k: int, filtered: list[dict]) -> tuple[list[dict], list[bool]]:
    """The iteration's training pairs in filter order, and for each whether it is from iteration k."""
    def trainable(folder: Path) -> list[dict]:
        path = folder / "pairs.jsonl"
        return [r for r in read_jsonl(path) if r["chosen"] != r["rejected"]] if path.exists() else []

    current = trainable(run / f"iter_{k}")
    previous = trainable(run / f"iter_{k - 1}") if k > 0 else []
    ids = [x["id"] for x in filtered]
    for first, second, first_is_current in ((current, previous, True), (previous, current, False),
                                            (current, [], True)):
        records = first + second
        if [r["id"] for r in records] == ids:
            return records, [first_is_current] * len(first) + [not first_is_current] * len(second)
    raise SystemExit(f"{run / f'iter_{k}' / 'filter.jsonl'}: its pairs do not match iteration {k}'s "
                     f"({len(current)}) and {k - 1}'s ({len(previous)}) trainable pairs")


def rows(run: Path) -> list[tuple]:
    out = []
    for folder in sorted(run.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])):
        k = int(folder.name.split("_")[1])
        if not (folder / "filter.jsonl").exists():
            continue
        filtered = read_jsonl(folder / "filter.jsonl")
        records, is_current = training_records(run, k, filtered)
        wrong = [r["chosen"] != r["answer"] and r["rejected"] == r["answer"] for r in records]
        groups = {"all": [True] * len(records), "this iteration": is_current,
                  "history": [not x for x in is_current]}
        for subset in sorted({r.get("subset") for r in records if r.get("subset")}):
            groups[subset] = [r.get("subset") == subset for r in records]
        for name, member in groups.items():
            idx = [i for i in range(len(records)) if member[i]]
            if not idx:
                continue
            losses = [filtered[i]["ropo_loss"] for i in idx]
            wrong_here = [wrong[i] for i in idx]
            positives = [x for x, w in zip(losses, wrong_here) if w]
            negatives = [x for x, w in zip(losses, wrong_here) if not w]
            score = auroc(positives, negatives) if positives and negatives else None
            discarded_wrong = sum(1 for i in idx if wrong[i] and not filtered[i]["kept"])
            out.append((run.name, k, name, len(idx), sum(wrong_here), discarded_wrong,
                        "-" if score is None else f"{score:.2f}"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="robust-arm run folders")
    args = parser.parse_args(argv)
    print("| run | iteration | pairs | n | wrong | wrong discarded | AUROC |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        for row in rows(run):
            print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
