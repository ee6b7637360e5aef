"""Fixtures of the architecture matrix: one micro model per architecture (built once per session, read
only), data files in both TRL formats, a verifier module for DNPO's DSL."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from architectures.micro_archs import QUESTIONS, build_model


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """arch -> the folder of its micro model (built on first use, then shared; do not write into it)."""
    built: dict[str, str] = {}
    root = tmp_path_factory.mktemp("archs")

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = str(build_model(arch, root / arch, texts=[q for q, _ in QUESTIONS]))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, str]:
    """`{kind}_{sft,pairs,prompts}` files, kind "standard" (strings) or "conversational" (TRL message lists:
    SFT as `messages`, pairs as prompt/chosen/rejected message lists)."""
    folder = tmp_path_factory.mktemp("arch_data")
    files = {}
    rows = {
        "standard": {
            "sft": [{"prompt": q, "completion": f"The answer is {a}."} for q, a in QUESTIONS],
            "pairs": [{"prompt": q, "chosen": f"The answer is {a}.", "rejected": f"maybe {a}9 no"}
                      for q, a in QUESTIONS],
            "prompts": [{"prompt": q, "answer": a} for q, a in QUESTIONS[:3]],
        },
        "conversational": {
            "sft": [{"messages": user(q) + assistant(f"The answer is {a}.")} for q, a in QUESTIONS],
            "pairs": [{"prompt": user(q), "chosen": assistant(f"The answer is {a}."),
                       "rejected": assistant(f"maybe {a}9 no")} for q, a in QUESTIONS],
            "prompts": [{"prompt": user(q), "answer": a} for q, a in QUESTIONS[:3]],
        },
    }
    for kind, sets in rows.items():
        for name, records in sets.items():
            files[f"{kind}_{name}"] = write_jsonl(folder / f"{kind}_{name}.jsonl", records)
    return files


VERIFIER = '''
def about_three_words(prompt, response):
    """Higher the closer the reply is to three words: DSL flips some pairs of a random model."""
    return -abs(len(response.split()) - 3.0)
'''


@pytest.fixture(scope="session")
def verifier(tmp_path_factory) -> str:
    """An importable `module:function` verifier for DNPO's DSL."""
    folder = tmp_path_factory.mktemp("arch_verifier")
    (folder / "arch_matrix_verifier.py").write_text(VERIFIER)
    sys.path.insert(0, str(folder))
    yield "arch_matrix_verifier:about_three_words"
    sys.path.remove(str(folder))

