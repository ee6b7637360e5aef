"""A NaN or inf loss stops training at once with one clear line, saves nothing of that step, and
keeps the last good checkpoint, from which `--resume` finishes the run (`noisepo.training.guards`).

The NaN is injected by patching the trainer's `compute_loss` in-process from a given step on: a
real divergence would need many steps, and what is tested is what happens after it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noisepo.cli import main
from noisepo.training.guards import NonFiniteLossError


def poison(monkeypatch, cls, from_step: int, value: float = float("nan")) -> None:
    """`cls.compute_loss` returns `value` (times the real loss) from optimizer step `from_step` (1-based) on."""
    real = cls.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        if self.model.training and self.state.global_step + 1 >= from_step:
            return (out[0] * value, out[1]) if isinstance(out, tuple) else out * value
        return out

    monkeypatch.setattr(cls, "compute_loss", compute_loss)


def write_pairs(path: Path, n: int = 12) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": "no" * (1 + i % 3)})
                            + "\n" for i in range(n)))
    return str(path)


def finite_weights(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def test_nan_loss_stops_train_keeps_the_last_checkpoint_and_resume_finishes(micro_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from noisepo.training.preference import PreferenceTrainer

    out = tmp_path / "run"
    argv = ["train", "--model", micro_model_dir, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output",
            str(out), "--max-steps", "4", "--batch-size", "4", "--save-steps", "1", "--save-total-limit", "10",
            "--logging-steps", "1", "--learning-rate", "1e-3", "--report-to", "none"]
    poison(monkeypatch, PreferenceTrainer, from_step=3)
    assert main(argv) == NonFiniteLossError.exit_code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("noisepo train: error: ")
    assert "training stopped at step 3: the loss is nan" in err and f"{out / 'checkpoint-2'}" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # no NaN state
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert finite_weights(out / "checkpoint-2")

    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and finite_weights(out / "model")
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 4


def test_inf_loss_stops_sft_and_keeps_its_checkpoint(micro_model_dir, tmp_path, monkeypatch, capsys):
    from noisepo.training.guards import GuardedTrainer

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "sft"
    poison(monkeypatch, GuardedTrainer, from_step=2, value=float("inf"))
    assert main(["sft", "--model", micro_model_dir, "--data", str(data), "--output", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--save-steps", "1", "--report-to", "none", "--max-length", "32"]) == 3
    err = capsys.readouterr().err
    assert "training stopped at step 2: the loss is inf" in err and "checkpoint-1" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"] and not (out / "model").exists()


def test_npo_trainer_is_guarded_too(micro_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from noisepo.training.npo import NPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    eos = tokenizer.eos_token_id
    pairs = [{"prompt_ids": tokenizer.encode(f"{i}+1="), "chosen_ids": tokenizer.encode(str(i + 1)) + [eos],
              "rejected_ids": tokenizer.encode("x" * (1 + i % 3)) + [eos], "weight": 1.0} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "npo"), per_device_train_batch_size=4, max_steps=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)
    trainer = NPOTrainer(model, args, pairs, beta=0.5, processing_class=tokenizer)
    poison(monkeypatch, NPOTrainer, from_step=1)
    with pytest.raises(NonFiniteLossError, match="step 1: the loss is nan.*no checkpoint was written"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was never applied


def test_a_nan_loss_in_a_loop_stops_it_keeping_the_finished_stages(micro_model_dir, tmp_path, monkeypatch, capsys):
    from noisepo.training.preference import PreferenceTrainer

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": "a" * 4, "rejected": "b" * 4}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    argv = ["ropo", "--model", micro_model_dir, "--data", str(data), "--output", str(out), "--rounds", "1",
            "--no-progress", "--samples", "2", "--max-new-tokens", "2", "--training.max-steps", "2",
            "--training.batch-size", "4", "--training.report-to", "none", "--training.max-length", "32"]
    poison(monkeypatch, PreferenceTrainer, from_step=2)
    assert main(argv) == 3
    assert "training stopped at step 2: the loss is nan" in capsys.readouterr().err
    reference = (out / "reference" / "pairs.jsonl").read_bytes()
    assert (out / "reference" / ".reference.done").exists() and not (out / "round_0" / ".train.done").exists()
    assert not (out / "round_0" / "model").exists()  # the NaN state was not saved

    monkeypatch.undo()
    assert main(argv) == 0  # the rerun resumes at the training stage
    assert (out / "reference" / "pairs.jsonl").read_bytes() == reference and finite_weights(out / "round_0" / "model")
