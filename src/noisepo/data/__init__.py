"""Validated data: TRL-style records, loading with line-exact errors, one chat template, label noise.

- `loading`: `load_sft`, `load_preferences`, `load_prompts` -> `LoadResult(records, skipped, source)`.
- `records`: the per-record checks and the column conventions.
- `chat`: `render_prompt`, `response_text`, `encode_example` (training and generation share them).
- `noise`: `corrupt` (symmetric / longer-wins label noise with `label_flipped`), `run_corrupt`.
- `config`: `CorruptConfig` of `noisepo data corrupt`.

Importing this package is cheap: nothing here imports torch, and datasets/pyarrow are imported
only by the loaders that need them.
"""
from noisepo.data.loading import LoadResult, load_preferences, load_prompts, load_records, load_sft
from noisepo.data.noise import corrupt

__all__ = ["LoadResult", "corrupt", "load_preferences", "load_prompts", "load_records", "load_sft"]
