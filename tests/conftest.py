"""Shared fixtures: tiny models built offline from a config, no network, one CPU thread."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)  # CI has 2 cores; keep tests predictable


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """A 2-layer, width-64 Llama with a char tokenizer, saved with save_pretrained. Do not modify."""
    from noisepo.models import build_tiny_model

    path = tmp_path_factory.mktemp("micro_model")
    build_tiny_model("micro", path, seed=0)
    return str(path)


@pytest.fixture()
def micro_model_copy(micro_model_dir, tmp_path):
    """A private copy of the micro model folder, for tests that write into it."""
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(micro_model_dir, dest)
    return str(dest)
