"""Recall of the *harmful* flips per ROPO round, recomputed from run folders (issue 23).

A flip is harmful when the initial model agrees with the wrong label (its reference log-prob of the response
wrongly labelled chosen is the higher), so training on the pair reinforces the model's own error. Runs made
since stop 27 carry it in metrics.json (`harmful_flip_recall`); this reads older ones from
reference/pairs.jsonl and round_<r>/pairs.jsonl.

    python experiments/harmful_flips.py experiments/runs/addition/b_testbed
"""
from __future__ import annotations

import glob
import os
import sys
from collections import defaultdict
from statistics import mean

from noisepo.io import read_jsonl


def main(root: str) -> None:
    by_arm = defaultdict(list)
    for run in sorted(glob.glob(os.path.join(root, "*", "reference", "pairs.jsonl"))):
        folder = os.path.dirname(os.path.dirname(run))
        agrees = [r["reference_chosen_logps"] > r["reference_rejected_logps"] for r in read_jsonl(run)]
        rounds = []
        for r in range(100):
            path = os.path.join(folder, f"round_{r}", "pairs.jsonl")
            if not os.path.exists(path):
                break
            rows = read_jsonl(path)
            flipped = [bool(row.get("label_flipped")) for row in rows]
            harmful = [f and a for f, a in zip(flipped, agrees, strict=True)]
            other = [f and not a for f, a in zip(flipped, agrees, strict=True)]
            gone = [not row["kept"] for row in rows]
            rounds.append((sum(harmful), sum(h and g for h, g in zip(harmful, gone)),
                           sum(other), sum(o and g for o, g in zip(other, gone))))
        if rounds and rounds[0][0]:
            by_arm[os.path.basename(folder).rsplit("-s", 1)[0]].append(rounds)
    for arm, runs in by_arm.items():
        n = min(len(r) for r in runs)
        harmful = " / ".join(f"{mean(r[k][1] / r[k][0] for r in runs):.2f}" for k in range(n))
        other = " / ".join(f"{mean(r[k][3] / r[k][2] for r in runs):.2f}" for k in range(n))
        print(f"{arm:40s} runs {len(runs)}  harmful flips {mean(r[0][0] for r in runs):.0f}  "
              f"recall of harmful {harmful}  of the other flips {other}")


if __name__ == "__main__":
    main(sys.argv[1])
