import json

import pytest
import torch

from noisepo.errors import ConfigError
from noisepo.models import (
    PRESETS,
    build_char_tokenizer,
    build_tiny_model,
    is_preset,
    load_model,
    load_tokenizer,
    resolve_model,
)


def test_char_tokenizer_round_trips_text_and_data_characters():
    tok = build_char_tokenizer(["héllo wörld"])
    for text in ["47+85=132", "line one\nline two\ttab", "héllo"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    # a character never seen maps to <unk> instead of failing
    assert tok("€", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert {tok.pad_token, tok.eos_token, tok.bos_token} == {"<pad>", "</s>", "<s>"}


def test_tiny_model_save_load_round_trip(tmp_path):
    model, tok = build_tiny_model("micro", tmp_path / "m", seed=3)
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    loaded_tok = load_tokenizer(str(tmp_path / "m"))
    assert loaded.config._name_or_path == str(tmp_path / "m")  # a real path, not ""
    assert loaded_tok.get_vocab() == tok.get_vocab()
    ids = torch.tensor([loaded_tok("12+34=46")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    preset = json.loads((tmp_path / "m" / "noisepo_preset.json").read_text())
    assert preset["preset"] == "micro" and preset["seed"] == 3
    assert not any("noise" in name for name, _ in loaded.named_parameters())


def test_same_seed_same_weights_and_presets_grow(tmp_path):
    a, _ = build_tiny_model("micro", seed=1)
    b, _ = build_tiny_model("micro", seed=1)
    c, _ = build_tiny_model("micro", seed=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    sizes = [PRESETS[name].hidden_size * PRESETS[name].num_hidden_layers for name in ("micro", "tiny", "small")]
    assert sizes == sorted(sizes)


def test_resolve_model_builds_a_preset_once(tmp_path):
    path = resolve_model("micro", tmp_path / "base", texts=["ab"], seed=0)
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("micro", tmp_path / "base") == path
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model("some-org/some-model", tmp_path / "x") == "some-org/some-model"
    assert not (tmp_path / "x").exists()
    assert is_preset("tiny") and not is_preset(str(tmp_path))


def test_bad_model_and_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        build_tiny_model("huge")
    with pytest.raises(ConfigError, match="cannot load a causal LM"):
        load_model(str(tmp_path / "missing-folder"))
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")
