"""Every shipped accelerate config loads with accelerate's own loader and launcher checks, and says
what docs/distributed.md says it does."""
from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {  # file: (distributed_type, num_processes, mixed_precision, launcher flag set by the config)
    "cpu.yaml": ("MULTI_GPU", 2, "no", "multi_gpu"),
    "ddp.yaml": ("MULTI_GPU", 8, "bf16", "multi_gpu"),
    "fsdp.yaml": ("FSDP", 8, "bf16", "use_fsdp"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, "bf16", "use_deepspeed"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, "bf16", "use_deepspeed"),
}


def test_every_shipped_config_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_passes_the_launchers_checks(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    kind, processes, precision, flag = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))
    assert (str(config.distributed_type).split(".")[-1], config.num_processes, config.mixed_precision) == (
        kind, processes, precision)
    assert config.use_cpu is False  # use_cpu: true would take the single-process launcher
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "noisepo", "dnpo"])
    args, _, _ = _validate_launch_command(args)
    assert getattr(args, flag) is True and args.num_processes == processes


def test_fsdp_is_fsdp2_full_shard_with_full_state_dict():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # stages save plain transformers models
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "-m", "noisepo"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_zero_stage(name, stage):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = load_config_from_file(str(CONFIGS / name))
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.deepspeed_config["offload_optimizer_device"] == "none"
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "noisepo"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
