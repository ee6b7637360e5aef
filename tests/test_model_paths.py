"""`--model` as users give it (issue 22, items 2 and 4): run folders, missing local paths, folders
without a tokenizer, `--tokenizer`, a local Hugging Face cache, models shipping their own code.

Each failure is reproduced through the real CLI (`noisepo.cli.main`, or a subprocess where the
environment must differ: HF_HOME is read when huggingface_hub is imported) on the micro model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noisepo.cli import main
from noisepo.models import TOKENIZER_FILES, looks_local

FAST_TRAIN = ["--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--report-to", "none",
              "--save-steps", "1000", "--warmup-ratio", "0"]
FAST_LOOP = ["--no-progress", "--training.max-steps", "1", "--training.batch-size", "4",
             "--training.max-length", "32", "--training.report-to", "none", "--training.warmup-ratio", "0"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """SFT records, preference pairs and prompts, four of each (a few characters long)."""
    folder = tmp_path_factory.mktemp("data")
    sft = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x" * (i + 1)} for i in range(4)]
    prompts = [{"prompt": f"{i}+2="} for i in range(2)]
    return {"sft": write_jsonl(folder / "sft.jsonl", sft), "pairs": write_jsonl(folder / "pairs.jsonl", pairs),
            "prompts": write_jsonl(folder / "prompts.jsonl", prompts)}


def train_argv(model: str, data: dict, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", data["pairs"], "--output", str(output), *FAST_TRAIN, *extra]


def generate_argv(model: str, data: dict, output: Path, *extra: str) -> list[str]:
    return ["generate", "--model", model, "--prompts", data["prompts"], "--output", str(output),
            "--max-new-tokens", "2", "--no-progress", "--device", "cpu", *extra]


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def without_tokenizer(source: str, dest: Path) -> Path:
    """A copy of a model folder with its weights and config but no tokenizer file."""
    shutil.copytree(source, dest)
    for name in TOKENIZER_FILES:
        (dest / name).unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------- run folders as --model
@pytest.fixture(scope="module")
def sft_run(micro_model_dir, data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "sft"
    assert main(["sft", "--model", micro_model_dir, "--data", data["sft"], "--output", str(output), *FAST_TRAIN]) == 0
    return output


def test_an_sft_run_folder_as_model_trains_its_final_model(sft_run, data, tmp_path, capsys):
    """The user's step: `noisepo train --model <output of noisepo sft>` (it used to die on the
    tokenizer with a sentencepiece message)."""
    capsys.readouterr()
    output = tmp_path / "train"
    assert main(train_argv(str(sft_run), data, output)) == 0
    err = capsys.readouterr().err
    assert f"--model {sft_run} is a run folder; using the final model named by metrics.json: {sft_run / 'model'}" in err
    assert (output / "model" / "config.json").exists()


def test_a_run_folder_as_reference_model_uses_its_final_model(sft_run, micro_model_dir, data, tmp_path, capsys):
    """`noisepo train --reference-model <output of noisepo sft>`: resolved like --model (it used to be refused)."""
    capsys.readouterr()
    assert main(train_argv(micro_model_dir, data, tmp_path / "train", "--reference-model", str(sft_run))) == 0
    err = capsys.readouterr().err
    assert f"--reference-model {sft_run} is a run folder; using the final model named by metrics.json" in err
    assert (tmp_path / "train" / "model" / "config.json").exists()


def test_a_train_run_folder_as_model_generates_with_its_final_model(sft_run, data, tmp_path, capsys):
    train_run = tmp_path / "train"
    assert main(train_argv(str(sft_run), data, train_run)) == 0
    capsys.readouterr()
    assert main(generate_argv(str(train_run), data, tmp_path / "out.jsonl")) == 0
    assert f"using its final model: {train_run / 'model'}" in capsys.readouterr().err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_a_moved_run_folder_still_finds_its_model(sft_run, data, tmp_path, capsys):
    """metrics.json names the model as the run wrote it; the copy inside the given folder is used."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(sft_run, moved)
    capsys.readouterr()
    assert main(generate_argv(str(moved), data, tmp_path / "out.jsonl")) == 0
    assert f"metrics.json: {moved / 'model'}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def spin_run(micro_model_dir, data, tmp_path_factory) -> Path:
    """A finished one-iteration SPIN run (dnpo writes the same layout: one DNPORun driver)."""
    output = tmp_path_factory.mktemp("runs") / "spin"
    assert main(["spin", "--model", micro_model_dir, "--data", data["sft"], "--output", str(output),
                 "--iterations", "1", "--generation.max-new-tokens", "2", *FAST_LOOP]) == 0
    return output


def test_a_spin_run_folder_as_model_uses_the_model_its_summary_names(spin_run, data, tmp_path, capsys):
    capsys.readouterr()
    assert main(train_argv(str(spin_run), data, tmp_path / "train")) == 0
    assert f"summary.json: {spin_run / 'iter_0' / 'model'}" in capsys.readouterr().err


def test_an_unfinished_loop_uses_its_last_trained_model_or_exits_2(spin_run, data, tmp_path, capsys):
    """No summary.json: the last iteration whose train stage is marked done; none: exit 2 saying so."""
    run = tmp_path / "spin"
    shutil.copytree(spin_run, run)
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(generate_argv(str(run), data, tmp_path / "a.jsonl")) == 0
    assert f"unfinished run: no summary.json): {run / 'iter_0' / 'model'}" in capsys.readouterr().err

    (run / "iter_0" / ".train.done").unlink()  # killed while training iteration 0
    started = time.perf_counter()
    assert main(generate_argv(str(run), data, tmp_path / "b.jsonl")) == 2
    assert f"{run} is the folder of an unfinished run with no final model yet" in last_error(capsys)
    assert time.perf_counter() - started < 10 and not (tmp_path / "b.jsonl").exists()


def test_a_ropo_run_folder_as_model_uses_its_last_round(micro_model_dir, data, tmp_path, capsys):
    run = tmp_path / "ropo"
    assert main(["ropo", "--model", micro_model_dir, "--data", data["pairs"], "--output", str(run), "--rounds", "1",
                 "--no-refill", "--rho", "0.25", *FAST_LOOP]) == 0
    capsys.readouterr()
    assert main(generate_argv(str(run), data, tmp_path / "out.jsonl")) == 0
    assert f"summary.json: {run / 'round_0' / 'model'}" in capsys.readouterr().err


# --------------------------------------------------------------------------- local paths that do not exist
@pytest.mark.parametrize("spec", ["./no/such/dir", "../no-such-model", "no/such/dir", "~/no-such-noisepo-model",
                                  "runs/missing", "ABSOLUTE"])
def test_a_missing_local_path_exits_2_at_once_naming_it(spec, data, tmp_path, monkeypatch, capsys):
    """It used to ask the hub (52 s waiting for the network) and answer about repo ids."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/missing`: its first component exists here, so it is local
    spec = str(tmp_path / "gone") if spec == "ABSOLUTE" else spec
    started = time.perf_counter()
    assert main(train_argv(spec, data, tmp_path / "out")) == 2
    assert last_error(capsys).startswith(f"noisepo train: error: 'model': no such folder: {spec}")
    assert time.perf_counter() - started < 10 and not (tmp_path / "out" / "model").exists()


def test_hub_names_are_not_taken_for_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "org/name", "Qwen/Qwen2.5-0.5B-Instruct"):
        assert not looks_local(name)
    for path in ("./m", "../m", "/m", "~/m", "a/b/c", "a\\b", ".", ".."):
        assert looks_local(path)


def test_a_hub_name_goes_to_the_hub_not_to_the_missing_path_error(data, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE (conftest) and nothing cached: transformers' own offline answer, not ours."""
    monkeypatch.chdir(tmp_path)
    assert main(train_argv("noisepo-test-org/not-cached", data, tmp_path / "out")) == 2
    err = capsys.readouterr().err  # transformers' message spans several lines
    assert "noisepo train: error: 'model': cannot load a tokenizer from 'noisepo-test-org/not-cached'" in err
    assert "no such folder:" not in err


# --------------------------------------------------------------------------- no tokenizer / --tokenizer
def qwen2_weights_only(folder: Path) -> Path:
    """A random 1-layer Qwen2 saved without a tokenizer: where transformers 5 silently builds an empty
    Qwen2Tokenizer (one token, eos_token_id 0) and training used to run on it, exit 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, eos_token_id=2, bos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_a_model_folder_without_tokenizer_exits_2_naming_the_option(architecture, micro_model_dir, data, tmp_path,
                                                                     capsys):
    if architecture == "qwen2":
        folder = qwen2_weights_only(tmp_path / "weights-only")
    else:
        folder = without_tokenizer(micro_model_dir, tmp_path / "weights-only")
    assert main(train_argv(str(folder), data, tmp_path / "out")) == 2
    message = last_error(capsys)
    assert f"{folder} holds a model but no tokenizer files" in message and "--tokenizer PATH" in message
    assert not (tmp_path / "out" / "model").exists()


def test_tokenizer_option_loads_the_tokenizer_from_elsewhere(micro_model_dir, data, tmp_path):
    from transformers import AutoTokenizer

    folder = without_tokenizer(micro_model_dir, tmp_path / "weights-only")
    output = tmp_path / "out"
    assert main(train_argv(str(folder), data, output, "--tokenizer", micro_model_dir)) == 0
    original = AutoTokenizer.from_pretrained(micro_model_dir)
    trained = AutoTokenizer.from_pretrained(output / "model")
    assert trained.get_vocab() == original.get_vocab() and trained.eos_token_id == original.eos_token_id
    base = output / "base_model"  # the model's files linked, the tokenizer saved beside them
    assert (base / "model.safetensors").is_symlink() and (base / "tokenizer.json").exists()
    assert json.loads((base / "noisepo_tokenizer.json").read_text())["tokenizer"] == micro_model_dir


def test_a_tokenizer_larger_than_the_model_is_refused(micro_model_dir, data, tmp_path, capsys):
    from noisepo.models import build_char_tokenizer

    other = tmp_path / "big-tokenizer"
    build_char_tokenizer(["αβγδεζηθικλμνξοπρστυφχψω"]).save_pretrained(other)
    folder = without_tokenizer(micro_model_dir, tmp_path / "weights-only")
    assert main(train_argv(str(folder), data, tmp_path / "out", "--tokenizer", str(other))) == 2
    assert "it is not this model's tokenizer" in last_error(capsys)


@pytest.mark.parametrize("command", ["sft", "train", "generate", "spin", "dnpo", "ropo", "serve"])
def test_every_command_that_loads_a_model_takes_tokenizer(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--tokenizer" in capsys.readouterr().out


# --------------------------------------------------------------------------- HF cache, remote code
CUSTOM_CONFIG = """
from transformers import LlamaConfig


class NoisepoCustomConfig(LlamaConfig):
    model_type = "noisepo-custom"
"""
CUSTOM_MODELING = """
from transformers import LlamaForCausalLM

from .configuration_custom import NoisepoCustomConfig


class NoisepoCustomForCausalLM(LlamaForCausalLM):
    config_class = NoisepoCustomConfig
"""


def with_custom_code(micro_model_dir: str, folder: Path) -> Path:
    """The micro model under a model_type transformers does not know, mapped to two files of its own."""
    shutil.copytree(micro_model_dir, folder)
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="noisepo-custom", architectures=["NoisepoCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.NoisepoCustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.NoisepoCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# Runs several CLI commands in one fresh process (one import of torch): prints their exit statuses.
CLI_RUNS = "import json, sys\nfrom noisepo.cli import main\nprint(json.dumps([main(a) for a in json.loads(sys.argv[1])]))"


def run_noisepo(argvs: list[list[str]], cwd: Path, hf_home: Path) -> tuple[list[int], str]:
    """The exit statuses and stderr of `noisepo ARGV` for each of `argvs`, offline, in a subprocess with
    its own HF_HOME (hub cache and modules cache: both are read when huggingface_hub is imported)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_MODULES_CACHE", None)
    result = subprocess.run([sys.executable, "-c", CLI_RUNS, json.dumps(argvs)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def cache_repo(hf_home: Path, repo_id: str, folder: Path) -> None:
    """`folder` as huggingface_hub caches a download: hub/models--ORG--NAME/{refs/main, snapshots/<hash>/}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_a_model_in_the_local_hf_cache_loads_by_hub_name_offline(micro_model_dir, data, tmp_path):
    """A hub name found in the user's cache, offline; one with code of its own is refused by name."""
    hf_home = tmp_path / "hf"
    cache_repo(hf_home, "noisepo-test/micro", Path(micro_model_dir))
    cache_repo(hf_home, "noisepo-test/custom", with_custom_code(micro_model_dir, tmp_path / "custom"))
    statuses, err = run_noisepo([generate_argv("noisepo-test/micro", data, tmp_path / "out.jsonl"),
                                 generate_argv("noisepo-test/custom", data, tmp_path / "custom.jsonl")],
                                tmp_path, hf_home)
    assert statuses == [0, 2], err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert "noisepo-test/custom needs its own code to load" in err and "--trust-remote-code" in err
    assert not (tmp_path / "custom.jsonl").exists()


def test_a_model_with_its_own_code_is_refused_without_the_flag(micro_model_dir, data, tmp_path, capsys):
    folder = with_custom_code(micro_model_dir, tmp_path / "custom")
    assert main(train_argv(str(folder), data, tmp_path / "out")) == 2
    message = last_error(capsys)
    assert "'trust_remote_code'" in message and "--trust-remote-code" in message
    assert "configuration_custom.py, modeling_custom.py" in message
    assert not (tmp_path / "out" / "model").exists()


def test_a_model_with_its_own_code_trains_with_the_flag(micro_model_dir, data, tmp_path):
    folder = with_custom_code(micro_model_dir, tmp_path / "custom")
    output = tmp_path / "out"
    statuses, err = run_noisepo([train_argv(str(folder), data, output, "--trust-remote-code")], tmp_path,
                                tmp_path / "hf")
    assert statuses == [0], err
    saved = json.loads((output / "model" / "config.json").read_text())
    assert saved["architectures"] == ["NoisepoCustomForCausalLM"]  # the folder's own class was trained
    assert list((tmp_path / "hf" / "modules").rglob("modeling_custom.py"))  # imported from this HF_HOME only
