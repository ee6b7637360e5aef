import subprocess
import sys

import pytest

from noisepo.cli import main
from noisepo.config import from_dict
from noisepo.errors import ConfigError
from noisepo.training.config import TrainConfig


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "noisepo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "sft" in out.stdout and "train" in out.stdout


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d.jsonl\noutput: out\nbetta: 0.2\n")
    status = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert status == 2
    assert "'betta'" in err and "did you mean 'beta'" in err and "Traceback" not in err


def test_flags_override_yaml(tmp_path):
    from noisepo.cli import build_parser
    from noisepo.config import config_from_namespace

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d.jsonl\noutput: out\nbeta: 0.2\nloss: ipo\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--beta", "0.5"])
    config = config_from_namespace(TrainConfig, args)
    assert config.beta == 0.5 and config.loss == "ipo" and config.data == "d.jsonl"


@pytest.mark.parametrize("bad, key", [({"beta": 0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                                      ({"beta": "x"}, "beta"), ({"loss": "nope"}, "loss")])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, {"data": "d", "output": "o", **bad})
    assert info.value.key == key
