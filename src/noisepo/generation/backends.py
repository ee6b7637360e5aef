"""One way for every command to get a generator for `BackendOptions.backend` (and let it go).

`open_generator` yields `(generator, tokenizer)`: the transformers backend over a model the caller
loads (or has loaded: a loop reuses its policy), or a vLLM engine on the model folder, shut down when
the block ends so that the training stage after it gets the memory back. `check_backend` refuses,
before any file is written, what vLLM cannot do here (see `vllm_backend.check_vllm`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable


def check_backend(options, model: str, *, key_prefix: str = "") -> None:
    """ConfigError now, before a run folder exists, when `options.backend` cannot run `model`."""
    if options.backend != "vllm":
        return
    from noisepo.generation.vllm_backend import check_vllm

    check_vllm(_model_folder(model), tensor_parallel_size=options.tensor_parallel_size, key_prefix=key_prefix)


def _model_folder(model: str) -> str:
    """A run folder given as --model is checked as the model it holds."""
    path = Path(model)
    if path.is_dir() and not (path / "config.json").exists():
        from noisepo.errors import ConfigError
        from noisepo.models import final_model_of_run

        try:
            final = final_model_of_run(path)
        except ConfigError:
            return model  # the model loader says what is wrong with it, by name
        if final is not None:
            return str(final[0])
    return model


@contextlib.contextmanager
def open_generator(options, model_path: str, *, load: Callable[[], tuple], batch_size: int, progress: bool,
                   shard: bool = False, dtype: str = "auto", trust_remote_code: bool = False):
    """(generator, tokenizer) for `options.backend`. `load()` returns the transformers (model,
    tokenizer) and is called for that backend only."""
    if options.backend == "vllm":
        from noisepo.generation.vllm_backend import VLLMGenerator

        generator = VLLMGenerator(model_path, tensor_parallel_size=options.tensor_parallel_size, dtype=dtype,
                                  gpu_memory_utilization=options.gpu_memory_utilization,
                                  trust_remote_code=trust_remote_code, progress=progress)
        try:
            yield generator, generator.tokenizer
        finally:
            generator.close()
        return
    from noisepo.generation.transformers_backend import TransformersGenerator

    model, tokenizer = load()
    yield TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=progress, shard=shard), tokenizer
