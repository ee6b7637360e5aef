"""Load any Hugging Face causal LM; build tiny models and tokenizers offline.

`--model` anywhere in noisepo takes a local folder, a hub name, a preset name (`PRESETS`), or the
run folder of a noisepo command (its final model is used; `final_model_of_run`). A preset is a fresh
Llama-architecture model built from a config, with a character-level tokenizer made from printable
ASCII plus the data's own characters, saved with `save_pretrained` so that transformers, lm-eval and
vLLM load it like any other model (and `config._name_or_path` is a real path: TRL-style reloading of
a reference by name works).

What users bring is checked before transformers sees it (issue 22): a path that looks local but is
missing is an error at once, never a hub lookup; a folder without tokenizer files is an error unless
`--tokenizer` names one; a folder with its own modeling code needs `--trust-remote-code`. A folder's
tokenizer is the one its tokenizer.json holds (`_as_saved`), and a vocabulary far wider than the
tokenizer is said on stderr (`_note_unused_vocabulary`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
import sys
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


def resolve_model(spec: str, build_dir, *, texts: Iterable[str] = (), seed: int = 0,
                  tokenizer: str | None = None, trust_remote_code: bool = False) -> str:
    """Turn `--model` (and `--tokenizer`) into something `from_pretrained` loads.

    A preset name builds a fresh model into `build_dir` (once: an existing build is reused, so a
    resumed run keeps the same initial weights). A noisepo run folder becomes the final model it
    holds (said on stderr). A local folder is checked here, before any data is tokenised: it must
    hold tokenizer files unless `tokenizer` names them elsewhere, in which case `build_dir` gets the
    model's files linked and that tokenizer saved beside them (`attach_tokenizer`). A hub name is
    returned unchanged (local-looking paths that do not exist are refused, not looked up).
    """
    if is_preset(spec):
        if tokenizer:
            raise ConfigError(f"a preset ({spec}) builds its own tokenizer; --tokenizer is for a model folder "
                              "without one", key="tokenizer")
        return _build_preset(spec, Path(build_dir), texts=texts, seed=seed)
    folder = local_path(spec, key="model")
    if folder is None:  # a hub name: transformers finds it in the cache or downloads it
        if tokenizer:
            raise ConfigError(f"--tokenizer needs --model to be a local folder, not the hub name {spec!r}: "
                              f"download it first (`hf download {spec} --local-dir DIR`) and pass DIR",
                              key="tokenizer")
        return spec
    folder = run_folder_model(folder, spec=spec, option="model")
    if not folder.is_dir():
        return spec if folder == Path(spec) else str(folder)
    check_remote_code(folder, trust_remote_code)
    if tokenizer:
        return attach_tokenizer(folder, tokenizer, Path(build_dir), trust_remote_code=trust_remote_code)
    if not has_tokenizer_files(folder):
        if not _is_model_folder(folder):
            raise ConfigError(f"{folder} is neither a model folder (no config.json) nor a noisepo run folder",
                              key="model")
        raise ConfigError(_no_tokenizer(folder) + "; give the model's tokenizer with --tokenizer PATH (a folder "
                          "or hub name)", key="model")
    return spec if folder == Path(spec) else str(folder)


def _build_preset(spec: str, build_dir: Path, *, texts: Iterable[str], seed: int) -> str:
    if not (build_dir / "config.json").exists() or not (build_dir / "tokenizer.json").exists():
        tmp = build_dir.with_name(build_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(spec, tmp, texts=texts, seed=seed)
        shutil.rmtree(build_dir, ignore_errors=True)
        tmp.rename(build_dir)
    return str(build_dir)


# --------------------------------------------------------------------------- local paths
def looks_local(spec: str) -> bool:
    """Whether `spec` means a local path rather than a hub name (`name` or `org/name`).

    Local: starts with ./ ../ / or ~, holds a backslash or more than one '/', or its first component
    exists here (`runs/sft` when ./runs exists). Such a path that is missing must not go to the hub,
    which would wait for the network and answer about repo ids (issue 22).
    """
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~", ".\\", "..\\")) or os.path.isabs(spec):
        return True
    if "\\" in spec or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec.split("/", 1)[0]).is_dir()


def local_path(spec: str, *, key: str = "model") -> Path | None:
    """The existing file or folder `spec` names; None for a hub name; ConfigError naming the path
    when it looks local (`looks_local`) but does not exist."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_local(spec):
        where = "" if str(path.resolve()) == spec else f" ({path.resolve()})"
        raise ConfigError(f"no such folder: {spec}{where}; a local path, so the hub was not asked (a hub "
                          "name looks like org/name)", key=key)
    return None


# Files that hold a tokenizer's vocabulary. Without one, transformers 5 builds an EMPTY tokenizer of
# the config's class without a word (GPT-2, Qwen2: eos_token_id 0, one token) and training runs on
# garbage (issue 22), so a folder with none of them is refused before AutoTokenizer sees it.
TOKENIZER_VOCAB_FILES = frozenset({"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                                   "sentencepiece.bpe.model"})
# Written by `save_pretrained` of a tokenizer; never linked from a model folder given a --tokenizer.
TOKENIZER_FILES = TOKENIZER_VOCAB_FILES | {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                           "merges.txt", "chat_template.jinja", "chat_template.json"}


def has_tokenizer_files(folder: Path) -> bool:
    """A vocabulary file (or tokenizer code of its own, which knows its files) in `folder`."""
    names = {p.name for p in Path(folder).iterdir() if p.is_file()}
    if names & TOKENIZER_VOCAB_FILES or any(n.endswith((".tiktoken", ".model")) for n in names):
        return True
    return "auto_map" in _read_json(Path(folder) / "tokenizer_config.json")


def _no_tokenizer(folder: Path) -> str:
    return f"{folder} holds a model but no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_folder_model(folder: Path, *, spec: str, option: str) -> Path:
    """`folder`, or the final model it holds when it is a noisepo run folder (said on stderr as `--option spec`)."""
    final = final_model_of_run(folder) if folder.is_dir() else None
    if final is None:
        return folder
    model, note = final
    print(f"noisepo: --{option} {spec} is a run folder; using {note}: {model}", file=sys.stderr)
    return model


def model_of_run_folder(spec: str, *, option: str) -> str:
    """`spec` itself, or the final model of the run folder it names: for options naming a second model
    (`--reference-model`, `--robust.filter-reference`), as `resolve_model` does for `--model`."""
    folder = Path(spec).expanduser()
    resolved = run_folder_model(folder, spec=spec, option=option)
    return spec if resolved == folder else str(resolved)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


# --------------------------------------------------------------------------- run folders
def final_model_of_run(folder: Path) -> tuple[Path, str] | None:
    """(model folder, which one in words) of a noisepo run folder; None when `folder` is no run folder.

    Read from what the run writes, newest evidence first: summary.json's `model` (dnpo, spin, ropo
    when finished); metrics.json (sft names `model`; train writes it after OUTPUT/model); else the
    last iteration (iter_K) or round (round_K) whose train stage is marked done, for a loop that
    stopped early. ConfigError when it is a run folder with no model yet (an unfinished run).
    """
    folder = Path(folder)
    if _is_model_folder(folder):
        return None
    for name in ("summary.json", "metrics.json"):
        named = _read_json(folder / name).get("model")
        if isinstance(named, str):
            model = _inside_run(folder, named)
            if model is None:
                raise ConfigError(f"{folder / name} names the model {named}, which is no longer there", key="model")
            return model, f"the final model named by {name}"
    if (folder / "metrics.json").exists() and _is_model_folder(folder / "model"):
        return folder / "model", "its final model"
    if _is_model_folder(folder / "model"):
        # OUTPUT/model is saved before metrics.json: a run stopped in its evaluation has both.
        return folder / "model", "its model (the run wrote no metrics.json: it may have stopped early)"
    trained = [(int(d.name.split("_")[1]), d) for d in [*folder.glob("iter_*"), *folder.glob("round_*")]
               if d.name.split("_")[1].isdigit() and (d / ".train.done").exists() and _is_model_folder(d / "model")]
    if trained:
        _, last = max(trained)
        return last / "model", f"the model of {last.name}, its last trained one (unfinished run: no summary.json)"
    markers = ["manifest.json", "trainer_state.json", "base_model", "iter_0", "round_0", "reference"]
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    if not checkpoints and not any((folder / m).exists() for m in markers):
        return None
    hint = f", or give one of its checkpoints: {checkpoints[-1]}" if checkpoints else ""
    raise ConfigError(f"{folder} is the folder of an unfinished run with no final model yet; rerun its command "
                      f"to finish it{hint}", key="model")


def _inside_run(folder: Path, named: str) -> Path | None:
    """The model `named` (as written when the run started, maybe relative to another working
    directory) found inside `folder`: the longest tail of its path that exists there; else the
    path as written, if it still exists."""
    path = Path(named)
    parts = path.parts
    for start in range(1 if path.is_absolute() else 0, len(parts)):
        candidate = folder.joinpath(*parts[start:])
        if _is_model_folder(candidate):
            return candidate
    return path if _is_model_folder(path) else None


# --------------------------------------------------------------------------- --tokenizer
def attach_tokenizer(model_dir: Path, tokenizer: str, build_dir: Path, *, trust_remote_code: bool = False) -> str:
    """`build_dir`: the files of `model_dir` linked (not copied) and the tokenizer of `tokenizer`
    saved beside them; returns its path. One folder holding both means every later load (the
    policy, a loop's reference and iterations, generation) sees the same pair without being told.
    Reused when built from the same two before; refused when the tokenizer has more tokens than the
    model's embedding (not this model's tokenizer)."""
    model_dir = Path(model_dir)
    stamp = {"model": str(model_dir.resolve()), "tokenizer": tokenizer}
    if _read_json(build_dir / "noisepo_tokenizer.json") == stamp and (build_dir / "config.json").exists():
        return str(build_dir)
    if model_dir.resolve() == build_dir.resolve():
        raise ConfigError(f"--model {model_dir} is the folder this run builds; give the original model",
                          key="model")
    source = local_path(tokenizer, key="tokenizer")
    final = final_model_of_run(source) if source is not None and source.is_dir() else None
    loaded = load_tokenizer(str(final[0]) if final else tokenizer, trust_remote_code=trust_remote_code,
                            key="tokenizer")
    config = _read_json(model_dir / "config.json")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and len(loaded) > vocab:
        raise ConfigError(f"{tokenizer} has {len(loaded)} tokens but the model in {model_dir} only {vocab}: "
                          "it is not this model's tokenizer", key="tokenizer")
    tmp = build_dir.with_name(build_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for source in sorted(model_dir.iterdir()):
        if source.is_file() and source.name not in TOKENIZER_FILES:
            try:
                (tmp / source.name).symlink_to(source.resolve())
            except OSError:  # no symlinks here (some filesystems, Windows without the privilege)
                shutil.copy2(source, tmp / source.name)
    loaded.save_pretrained(tmp)
    (tmp / "noisepo_tokenizer.json").write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(build_dir, ignore_errors=True)
    tmp.rename(build_dir)
    return str(build_dir)


# --------------------------------------------------------------------------- remote code
def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose config.json maps the model to code of its own (`auto_map`) for a
    model_type transformers does not know, unless `trust_remote_code`: that code would run on load.
    (A known model_type loads transformers' own class, as transformers does without the flag.)"""
    if trust_remote_code:
        return
    config = _read_json(Path(folder) / "config.json")
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    files = sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})
    raise ConfigError(_remote_code_message(f"{folder} holds its own model code ({', '.join(files)}, named by "
                                           "config.json's auto_map)"), key="trust_remote_code")


def _remote_code_message(what: str) -> str:
    return f"{what}, which runs when the model loads: read it, then rerun with --trust-remote-code to allow it"


def _load_error(what: str, name_or_path: str, err: Exception) -> tuple[str, str]:
    """(message, key) of a failed from_pretrained; transformers' own refusal of custom code names a
    Python argument, so it is reworded to name the flag."""
    if "trust_remote_code=True" in str(err):
        return _remote_code_message(f"{name_or_path} needs its own code to load"), "trust_remote_code"
    return f"cannot load {what} from {name_or_path!r}: {err}", "model"


def _checked_local(name_or_path: str, *, trust_remote_code: bool, key: str) -> Path | None:
    """What every load checks of a local path: it exists, it is not a run folder (whose model is
    named), its code is allowed. None for a hub name."""
    folder = local_path(name_or_path, key=key)
    if folder is None or not folder.is_dir():
        return folder
    if not _is_model_folder(folder) and not has_tokenizer_files(folder):
        final = final_model_of_run(folder)
        if final is not None:
            raise ConfigError(f"{folder} is a run folder, not a model folder; its model is {final[0]}", key=key)
    check_remote_code(folder, trust_remote_code)
    return folder


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


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right",
                   key: str = "model"):
    """AutoTokenizer with a pad token guaranteed (eos when the tokenizer has none). A local folder
    must hold tokenizer files (see `TOKENIZER_VOCAB_FILES`); `key` names the option in errors."""
    from transformers import AutoTokenizer

    folder = _checked_local(name_or_path, trust_remote_code=trust_remote_code, key=key)
    if folder is not None and folder.is_dir() and not has_tokenizer_files(folder):
        raise ConfigError(_no_tokenizer(folder) + "; copy the model's tokenizer into it, or pass --tokenizer PATH",
                          key=key)
    name_or_path = name_or_path if folder is None else str(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        message, err_key = _load_error("a tokenizer", name_or_path, err)
        raise ConfigError(message, key=key if err_key == "model" else err_key) from None
    if folder is not None and folder.is_dir():
        tokenizer = _as_saved(tokenizer, folder)
        _note_unused_vocabulary(tokenizer, folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# A model with this many times the tokenizer's tokens as vocabulary rows was built from a config default
# (GemmaConfig's vocab_size is 256 000), not for this tokenizer: hub checkpoints pad a few rows at most.
UNUSED_VOCABULARY_FACTOR = 2
_NOTED_VOCABULARY: set[str] = set()


def _note_unused_vocabulary(tokenizer, folder: Path) -> None:
    """One line on stderr (once per folder) when the model's vocabulary dwarfs the tokenizer's: every
    log-prob's softmax runs over all V rows, so the step costs as V does. The "Gemma cliff" of issue 22:
    a micro Gemma kept GemmaConfig's 256 000 rows for a 400-token BPE, and its DPO step took 60× Mistral's."""
    config = _read_json(folder / "config.json")
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int) or rows <= UNUSED_VOCABULARY_FACTOR * len(tokenizer):
        return
    if str(folder) in _NOTED_VOCABULARY:
        return
    _NOTED_VOCABULARY.add(str(folder))
    print(f"noisepo: the model in {folder} has {rows} vocabulary rows for {len(tokenizer)} tokenizer tokens; "
          f"each step's softmax still runs over all {rows} (its time grows with them): build the model with "
          "vocab_size=len(tokenizer)", file=sys.stderr)


# The parts of tokenizer.json that decide how text is split before the vocabulary applies.
_SPLITTING = ("normalizer", "pre_tokenizer")


def _as_saved(tokenizer, folder: Path):
    """`tokenizer`, or when it splits text otherwise than `folder`'s tokenizer.json, that file as saved.

    For some model types (Qwen2, Phi-3, ...: `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`) transformers 5
    loads its own tokenizer class whatever tokenizer_config.json names, and that class rebuilds the
    normalizer and pre-tokenizer: a user's own BPE saved with a Qwen2 model then encodes to other ids
    than it was trained with (Qwen2's regex splits digits), silently (issue 22). Hub checkpoints,
    whose tokenizer.json already splits as their class does, are left as loaded.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    saved = _read_json(folder / "tokenizer.json")
    if backend is None or not saved:
        return tokenizer
    loaded = json.loads(backend.to_str())
    if all(saved.get(part) == loaded.get(part) for part in _SPLITTING):
        return tokenizer
    from transformers import PreTrainedTokenizerFast  # tokenizer.json taken as it is

    print(f"noisepo: transformers loads {folder}'s tokenizer as {type(tokenizer).__name__}, which splits text "
          "unlike its tokenizer.json; using tokenizer.json as saved", file=sys.stderr)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False):
    """AutoModelForCausalLM from a folder or hub name; `trust_remote_code` stays off unless asked."""
    from transformers import AutoModelForCausalLM

    try:
        folder = _checked_local(name_or_path, trust_remote_code=trust_remote_code, key="model")
    except ConfigError as err:
        if err.key == "trust_remote_code":
            raise
        raise ConfigError(f"cannot load a causal LM from {name_or_path!r}: {err.message}", key="model") from None
    name_or_path = name_or_path if folder is None else str(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        message, key = _load_error("a causal LM", name_or_path, err)
        raise ConfigError(message, key=key) from None
    return model.to(default_device(device))
