import subprocess
import sys

import pytest

from noisepo.config import from_dict
from noisepo.errors import ConfigError
from noisepo.training.config import TrainConfig


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "noisepo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "COMMAND" in out.stdout


def run_cli(cls, argv):
    from noisepo.config import parse_config

    return parse_config(cls, argv)


def test_unknown_yaml_key_is_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d.jsonl\noutput: out\nbetta: 0.2\n")
    with pytest.raises(ConfigError) as info:
        run_cli(TrainConfig, ["--config", str(cfg)])
    assert info.value.key == "betta" and "did you mean 'beta'" in str(info.value)
    assert str(cfg) in str(info.value)


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d.jsonl\noutput: out\nbeta: 0.2\nloss: ipo\n")
    config = run_cli(TrainConfig, ["--config", str(cfg), "--beta", "0.5"])
    assert config.beta == 0.5 and config.loss == "ipo" and config.data == "d.jsonl"


@pytest.mark.parametrize("bad, key", [({"beta": 0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                                      ({"beta": "x"}, "beta"), ({"loss": "nope"}, "loss")])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, {"data": "d", "output": "o", **bad})
    assert info.value.key == key


def test_a_nested_section_given_in_part_keeps_the_parents_defaults():
    """`noisepo spin --dsl.scorer verifier` must keep SPIN's DSL off (a bug seen once)."""
    from noisepo.pipelines.dnpo_config import SPINConfig

    config = run_cli(SPINConfig, ["--model", "m", "--data", "d", "--output", "o", "--dsl.scorer", "verifier",
                                  "--dsl.verifier", "addition", "--training.learning-rate", "0.5"])
    assert not config.dsl.enabled and not config.npo.enabled
    assert config.dsl.verifier == "addition" and config.training.learning_rate == 0.5
    assert config.training.batch_size == 8  # untouched fields keep their defaults
    enabled = run_cli(SPINConfig, ["--model", "m", "--data", "d", "--output", "o", "--dsl.enabled",
                                   "--dsl.scorer", "verifier", "--dsl.verifier", "addition"])
    assert enabled.dsl.enabled


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as the string "1e-5"; users write it that way, as in Python
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d.jsonl\noutput: out\nbeta: 2e-1\nlearning_rate: 1e-5\n")
    config = run_cli(TrainConfig, ["--config", str(cfg)])
    assert config.beta == 0.2 and config.learning_rate == 1e-5
    with pytest.raises(ConfigError) as info:  # other strings stay an error naming the key
        from_dict(TrainConfig, {"data": "d", "output": "o", "beta": "0.2"})
    assert info.value.key == "beta"
