"""`noisepo sft` on the micro model: response-only loss, saving, metrics, evaluation, CLI, resume."""
from __future__ import annotations

import json

import pytest

from noisepo.cli import main
from noisepo.errors import ConfigError
from noisepo.io import write_jsonl_atomic
from noisepo.tasks.addition import AdditionTask
from noisepo.training.config import SFTConfig
from noisepo.training.sft import IGNORE_INDEX, SFTCollator, answer_scorer, tokenize_sft, train_sft


@pytest.fixture(scope="module")
def addition_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("addition")
    task = AdditionTask()
    write_jsonl_atomic(folder / "sft.jsonl", task.sft_data(64, seed=0))
    write_jsonl_atomic(folder / "test.jsonl", task.prompts(12, seed=0, split="test"))
    return folder


@pytest.fixture(scope="module")
def tokenizer(micro_model_dir):
    from noisepo.models import load_tokenizer

    return load_tokenizer(micro_model_dir)


def sft_config(micro_model_dir, data_folder, output, **overrides) -> SFTConfig:
    options = dict(model=micro_model_dir, data=str(data_folder / "sft.jsonl"), output=str(output),
                   max_steps=4, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1,
                   save_steps=1000, max_length=32, report_to=["none"])
    return SFTConfig(**{**options, **overrides})


def test_labels_cover_the_response_and_eos_only(tokenizer):
    (example,), dropped = tokenize_sft([{"prompt": "47+85=", "completion": "132"}], tokenizer, max_length=32)
    assert dropped == 0
    prompt_len = len("47+85=")  # one token per character
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert tokenizer.decode(example["input_ids"][prompt_len:-1]) == "132"
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_collator_pads_each_batch_to_its_longest(tokenizer):
    examples, _ = tokenize_sft([{"prompt": "1+2=", "completion": "3"}, {"prompt": "47+85=", "completion": "132"}],
                               tokenizer, max_length=32)
    batch = SFTCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape == (2, 10)  # "47+85=132" + EOS
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 4
    assert batch["labels"][0, 6:].tolist() == [IGNORE_INDEX] * 4
    assert batch["input_ids"][0, 6:].tolist() == [tokenizer.pad_token_id] * 4


def test_sft_lowers_the_loss_and_saves_a_loadable_model(micro_model_dir, addition_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "run"
    metrics = train_sft(sft_config(micro_model_dir, addition_files, output, max_steps=30,
                                   eval_data=str(addition_files / "test.jsonl"), task="addition",
                                   eval_max_new_tokens=4))
    curve = metrics["train"]["loss_curve"]
    assert metrics["train"]["steps"] == 30 and len(curve) == 30
    assert sum(p["loss"] for p in curve[-5:]) / 5 < curve[0]["loss"] - 0.5
    on_disk = json.loads((output / "metrics.json").read_text())
    assert on_disk["train"]["final_loss"] == curve[-1]["loss"]
    assert on_disk["eval"]["n"] == 12 and 0.0 <= on_disk["eval"]["accuracy"] <= 1.0
    assert len((output / "eval_predictions.jsonl").read_text().splitlines()) == 12
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    assert model.config.vocab_size == len(tokenizer)


def test_exact_match_without_a_task_uses_the_answer_column():
    score = answer_scorer(None)
    assert score("1+2=", " 3\n", {"answer": "3"}) == 1.0
    assert score("1+2=", "4", {"answer": "3"}) == 0.0
    with pytest.raises(ConfigError) as info:
        score("1+2=", "3", {})
    assert info.value.key == "eval_data"


def test_cli_builds_a_preset_writes_tensorboard_logs_and_resumes(addition_files, tmp_path, capsys):
    output = tmp_path / "cli"
    argv = ["sft", "--model", "micro", "--data", str(addition_files / "sft.jsonl"), "--output", str(output),
            "--batch-size", "8", "--logging-steps", "1", "--save-steps", "2", "--max-length", "32",
            "--eval-data", str(addition_files / "test.jsonl"), "--eval-max-new-tokens", "4"]
    assert main([*argv, "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "greedy exact match on 12 held-out prompts" in printed
    assert (output / "base_model" / "config.json").exists()  # the preset, built once
    assert list((output / "logs").glob("events.out.tfevents.*"))
    assert (output / "checkpoint-2").is_dir()

    assert main([*argv, "--max-steps", "4", "--resume"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-2") and metrics["train"]["steps"] == 4
    assert [p["step"] for p in metrics["train"]["loss_curve"]] == [1, 2, 3, 4]


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2="}\n')
    status = main(["sft", "--model", "micro", "--data", str(bad), "--output", str(tmp_path / "o")])
    assert status == 2
    assert "completion" in capsys.readouterr().err


def test_eval_prompts_without_answers_need_a_task(micro_model_dir, addition_files, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n')
    with pytest.raises(ConfigError) as info:
        train_sft(sft_config(micro_model_dir, addition_files, tmp_path / "o", eval_data=str(prompts)))
    assert info.value.key == "eval_data"
    assert not (tmp_path / "o" / "model").exists()  # refused before training


def test_lora_saves_adapters_and_a_merged_model(micro_model_dir, addition_files, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs the 'peft' extra")
    from transformers import AutoModelForCausalLM

    output = tmp_path / "lora"
    train_sft(sft_config(micro_model_dir, addition_files, output, max_steps=2, lora=True, lora_r=4,
                         lora_alpha=8))
    assert (output / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())
