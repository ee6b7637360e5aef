"""`noisepo generate`: responses for every prompt of a file, written so that a kill loses little.

Rows are appended to the output JSONL chunk by chunk (`noisepo.io.append_jsonl`, fsynced), each
being the input record + `response` (or `responses`) + `prompt_index`. A rerun reads the complete
rows (`read_jsonl_prefix` drops a torn last line) and generates only the missing prompt indices.
Since a response depends only on its prompt, the seed and the model (`transformers_backend`), the
resumed file equals the one an uninterrupted run writes. `OUTPUT.meta.json` records the options
that decide the responses; resuming with different ones is refused rather than mixing two runs.
"""
from __future__ import annotations

from pathlib import Path

from noisepo.errors import ConfigError, InputError
from noisepo.generation.config import GenerateConfig


def run_generate(config: GenerateConfig) -> int:
    from noisepo.data import load_prompts
    from noisepo.generation.backends import check_backend
    from noisepo.io import append_jsonl

    check_backend(config, config.model)  # vLLM missing / unable: exit 2 before any file is written
    loaded = load_prompts(config.prompts, skip_invalid=config.skip_invalid)
    records = loaded.records
    output = Path(config.output)
    done = finished_indices(output, len(records))
    check_or_write_meta(config, output, resuming=bool(done))
    todo = [i for i in range(len(records)) if i not in done]
    if todo:
        from tqdm.auto import tqdm

        from noisepo.data.chat import render_prompt

        params = config.params
        with open_generator(config, records) as (generator, tokenizer), \
                tqdm(total=len(records), initial=len(done), desc="generate", unit="prompt",
                     disable=not config.progress) as bar:  # one bar over the whole file, resumed rows done
            for start in range(0, len(todo), config.chunk_size):
                chunk = todo[start:start + config.chunk_size]
                texts = [render_prompt(tokenizer, records[i]["prompt"]) for i in chunk]
                responses = generator.generate(texts, params)
                append_jsonl(output, [output_row(records[i], i, r, params.num_samples)
                                      for i, r in zip(chunk, responses, strict=True)])
                bar.update(len(chunk))
    resumed = f" ({len(done)} already done)" if done else ""
    print(f"generated {len(todo)} of {len(records)} prompts{resumed} -> {output}")
    return 0


def output_row(record: dict, index: int, responses: list[str], num_samples: int) -> dict:
    row = dict(record)
    if num_samples == 1:
        row["response"] = responses[0]
    else:
        row["responses"] = list(responses)
    row["prompt_index"] = index
    return row


def finished_indices(output: Path, num_prompts: int) -> set[int]:
    """Prompt indices already in `output` (a torn last line is dropped from the file)."""
    from noisepo.io import read_jsonl_prefix

    done = set()
    for line, row in enumerate(read_jsonl_prefix(output), start=1):
        index = row.get("prompt_index")
        if not isinstance(index, int) or not 0 <= index < num_prompts or index in done:
            raise InputError(f"prompt_index {index!r} does not fit this prompt file ({num_prompts} prompts); "
                             "is the output from another run?", path=output, line=line, field="prompt_index")
        done.add(index)
    return done


MEANINGFUL = ("model", "prompts", "max_new_tokens", "temperature", "top_p", "num_samples", "seed", "stop",
              "backend")


def check_or_write_meta(config: GenerateConfig, output: Path, *, resuming: bool) -> None:
    """Refuse to resume with options that change the responses; record them on a fresh start."""
    import json

    from noisepo.io import write_json_atomic

    meta_path = output.with_name(output.name + ".meta.json")
    wanted = {key: getattr(config, key) for key in MEANINGFUL}
    if resuming and meta_path.exists():
        before = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = [k for k in MEANINGFUL if before.get(k) != wanted[k]]
        if changed:
            raise ConfigError(f"differs from the run that started {output} ({before.get(changed[0])!r}); "
                              "use the same options to resume, or a new output", key=changed[0])
        return
    write_json_atomic(meta_path, wanted)


def open_generator(config: GenerateConfig, records: list[dict]):
    """(generator, tokenizer) for `config.backend`, as a context (vLLM's engine stops at its end);
    a preset model is built next to the output once."""
    from noisepo.generation.backends import open_generator as open_backend
    from noisepo.models import load_model, load_tokenizer, resolve_model

    build_dir = Path(config.output + ".model")
    path = resolve_model(config.model, build_dir, texts=prompt_texts(records), tokenizer=config.tokenizer,
                         trust_remote_code=config.trust_remote_code)

    def load():
        tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
        return load_model(path, dtype=config.dtype, device=config.device,
                          trust_remote_code=config.trust_remote_code), tokenizer

    return open_backend(config, path, load=load, batch_size=config.batch_size, progress=False, dtype=config.dtype,
                        trust_remote_code=config.trust_remote_code)


def prompt_texts(records: list[dict]) -> list[str]:
    """Every text of the prompts (the character vocabulary of a preset's tokenizer is built from it)."""
    texts = []
    for record in records:
        prompt = record["prompt"]
        texts.extend([prompt] if isinstance(prompt, str) else [m["content"] for m in prompt])
    return texts
