"""Security promises: no pickle load of a file the user did not make, no remote code unless asked.

(The API key, adversarial judged text and `noisepo serve` are tested where their fixtures live:
tests/judges/test_openai_judge.py, tests/judges/test_judge_in_loop.py, tests/test_serve.py.)
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import noisepo
from noisepo.cli import COMMANDS, _load, main

SRC = Path(noisepo.__file__).parent

# Each pattern is a way to unpickle (run code from) a file; `torch.load` is fine with weights_only=True.
UNSAFE = {
    "pickle module": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b"),
    "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "pandas read_pickle": re.compile(r"read_pickle"),
}


def test_no_source_file_can_unpickle_a_file():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for name, pattern in UNSAFE.items():
            found += [f"{path.relative_to(SRC)}:{text.count(chr(10), 0, m.start()) + 1}: {name}"
                      for m in pattern.finditer(text)]
    assert not found, found


def config_classes():
    def walk(table):
        for entry in table.values():
            if isinstance(entry, dict):
                yield from walk(entry)
            else:
                yield _load(entry.config)

    seen, stack = [], list(walk(COMMANDS))
    while stack:  # every command's config and the sections nested in it (dsl, training, ...)
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(value := f.default_factory()):
                stack.append(type(value))
    return seen


def test_trust_remote_code_is_off_by_default_everywhere():
    import inspect

    from noisepo.models import load_model, load_tokenizer
    from noisepo.pipelines.common import load_policy

    with_option = [cls for cls in config_classes() if "trust_remote_code" in {f.name for f in dataclasses.fields(cls)}]
    assert len(with_option) >= 7, with_option  # sft/train, generate, score + dsl, dnpo/spin, ropo, serve
    for cls in with_option:
        (field,) = [f for f in dataclasses.fields(cls) if f.name == "trust_remote_code"]
        assert field.default is False, cls
    for fn in (load_model, load_tokenizer, load_policy):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def test_a_model_folder_shipping_code_does_not_run_it(micro_model_dir, tmp_path, capsys):
    """A folder whose config maps the model to its own Python file: the file is never imported."""
    folder = tmp_path / "model"
    shutil.copytree(micro_model_dir, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    status = main(["generate", "--model", str(folder), "--prompts", str(prompts), "--output",
                   str(tmp_path / "out.jsonl"), "--max-new-tokens", "2", "--no-progress", "--device", "cpu"])
    assert not marker.exists()
    assert status in (0, 2) and "Traceback" not in capsys.readouterr().err  # loaded as plain Llama, or refused


class Payload:
    """Unpickling this runs `Path(marker).write_text(...)`: what a malicious checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pickle payload ran",))


def test_a_malicious_pickle_in_a_checkpoint_folder_is_never_executed(micro_model_dir, tmp_path, capsys):
    """`noisepo train --resume` reads the checkpoint's optimizer, scheduler and RNG state: all with
    `weights_only=True` (transformers), so a planted pickle is refused in one line, not run."""
    import pickle

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x" * (1 + i)}) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    argv = ["train", "--model", micro_model_dir, "--data", str(data), "--output", str(out), "--batch-size", "4",
            "--save-steps", "1", "--report-to", "none", "--max-length", "32"]
    assert main([*argv, "--max-steps", "1"]) == 0
    checkpoint = out / "checkpoint-1"
    marker = tmp_path / "payload-ran"
    planted = [p for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth", ".bin")]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in planted}
    for path in planted:
        path.write_bytes(pickle.dumps(Payload(str(marker))))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes the pickle protocol before refusing the file
        assert main([*argv, "--max-steps", "2", "--resume"]) == 2  # refused by torch's weights_only unpickler
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "noisepo train: error: refused to load a file that holds Python objects, not only tensors (Weights only")


def test_npo_checkpoints_hold_safetensors_only():
    from noisepo.training import npo

    assert npo.NOISE_HEAD_FILE.endswith(".safetensors")
