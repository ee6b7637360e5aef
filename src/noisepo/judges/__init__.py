"""Pointwise scorers behind one protocol (`Scorer`), used by Dynamic Sample Labeling (METHODS §4.1).

Kinds: `openai` (an LLM judge over an OpenAI-compatible chat API), `reward-model` (a local
`AutoModelForSequenceClassification`), `verifier` (a Python callable or a built-in task's verifier)
and `local-lm` (a local causal LM prompted as a judge). `CachedScorer` wraps any of them with a
persistent SQLite cache. `make_scorer(config)` builds one from a `ScoreConfig`.

Importing this package imports neither torch nor openai; each backend imports what it needs.
"""
from noisepo.judges.base import Scorer, make_scorer
from noisepo.judges.cache import CachedScorer
from noisepo.judges.parsing import parse_score

__all__ = ["CachedScorer", "Scorer", "make_scorer", "parse_score"]
