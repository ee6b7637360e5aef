"""Load any Hugging Face causal LM; build tiny models and tokenizers offline.

`--model` anywhere in noisepo takes a local folder, a hub name, or a preset name (`PRESETS`). A
preset is a fresh Llama-architecture model built from a config, with a character-level tokenizer
made from printable ASCII plus the data's own characters, saved with `save_pretrained` so that
transformers, lm-eval and vLLM load it like any other model (and `config._name_or_path` is a real
path: TRL-style reloading of a reference by name works).
"""
from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Iterable

from noisepo.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# A documented plain template used when the tokenizer has none (see noisepo.data.chat).
BASE_CHARS = string.printable  # digits, letters, punctuation, whitespace incl. "\n"


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    description: str = ""


PRESETS: dict[str, Preset] = {
    # For tests: builds and trains in a second.
    "micro": Preset(64, 2, 4, 2, 128, 256, "2 layers, width 64 (~0.1M parameters): tests"),
    # The default of the demo: ~1M parameters, learns 2-digit addition in about a minute on 2 cores.
    "tiny": Preset(128, 4, 4, 4, 512, 512, "4 layers, width 128 (~0.8M parameters): demo"),
    # A larger named preset for experiments that need more capacity.
    "small": Preset(256, 6, 8, 4, 768, 1024, "6 layers, width 256 (~5M parameters): experiments"),
}


def is_preset(name: str) -> bool:
    return name in PRESETS and not Path(name).exists()


# --------------------------------------------------------------------------- tokenizer
def build_char_tokenizer(texts: Iterable[str] = (), *, model_max_length: int = 512):
    """A character-level fast tokenizer: printable ASCII + every character of `texts`.

    One token per character makes arithmetic tasks learnable by tiny models; unknown characters
    map to `<unk>`. Returns a `PreTrainedTokenizerFast` with pad/bos/eos/unk set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = set(BASE_CHARS)
    for text in texts:
        chars.update(text)
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(chars):
        if ch not in vocab:
            vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=model_max_length,
    )
    tokenizer.padding_side = "right"
    return tokenizer


# --------------------------------------------------------------------------- models
def build_tiny_model(preset: str = "tiny", output_dir=None, *, texts: Iterable[str] = (), seed: int = 0):
    """Build a fresh Llama from `PRESETS[preset]` and a char tokenizer; save both if `output_dir`.

    Returns (model, tokenizer). The model is float32 and randomly initialised under `seed`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}", key="model")
    spec = PRESETS[preset]
    tokenizer = build_char_tokenizer(texts, model_max_length=spec.max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "noisepo_preset.json").write_text(
            json.dumps({"preset": preset, "seed": seed, **dataclasses.asdict(spec)}, indent=2) + "\n")
        model.config._name_or_path = str(output_dir)
    return model, tokenizer


def resolve_model(spec: str, build_dir, *, texts: Iterable[str] = (), seed: int = 0) -> str:
    """Turn `--model` into something `from_pretrained` loads.

    A preset name builds a fresh model into `build_dir` (once: an existing build is reused, so a
    resumed run keeps the same initial weights); anything else is returned unchanged (a local
    folder or a hub name).
    """
    if not is_preset(spec):
        return spec
    build_dir = Path(build_dir)
    if not (build_dir / "config.json").exists() or not (build_dir / "tokenizer.json").exists():
        tmp = build_dir.with_name(build_dir.name + ".partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(spec, tmp, texts=texts, seed=seed)
        shutil.rmtree(build_dir, ignore_errors=True)
        tmp.rename(build_dir)
    return str(build_dir)


_DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; one of {', '.join(_DTYPES)}", key="dtype")
    return getattr(torch, name)


def default_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right"):
    """AutoTokenizer with a pad token guaranteed (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {err}", key="model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False):
    """AutoModelForCausalLM from a folder or hub name; `trust_remote_code` stays off unless asked."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a causal LM from {name_or_path!r}: {err}", key="model") from None
    return model.to(default_device(device))
