"""Response generation behind one small protocol (`Generator`).

`GenerationParams` says how to decode; a backend turns rendered prompt texts into responses:
`TransformersGenerator` (batched `model.generate`, always available) and `VLLMGenerator` (vLLM,
optional, imported lazily). `noisepo generate` (`command.run_generate`) writes a resumable JSONL.

Importing this package imports no torch; the backends are imported from their modules.
"""
from noisepo.generation.base import GenerationParams, Generator

__all__ = ["GenerationParams", "Generator"]
