"""Scorers behind two protocols, used by Dynamic Sample Labeling (METHODS §4.1).

Pointwise (`Scorer`, a value per (prompt, response)): `openai` (an LLM judge over an
OpenAI-compatible chat API), `reward-model` (a local `AutoModelForSequenceClassification`),
`verifier` (a Python callable or a built-in task's verifier) and `local-lm` (a local causal LM
prompted as a judge). Pairwise (`Comparer`, P(response A beats response B) per (prompt, A, B)):
`openai`, `local-lm` and `pairwise-rm` (a PairRM-style object by import path). `CachedScorer` and
`CachedComparer` wrap them with a persistent SQLite cache; `make_scorer(config)` and
`make_comparer(config)` build them from a config.

Importing this package imports neither torch nor openai; each backend imports what it needs.
"""
from noisepo.judges.base import Comparer, Scorer, make_comparer, make_scorer
from noisepo.judges.cache import CachedComparer, CachedScorer
from noisepo.judges.parsing import parse_choice, parse_score

__all__ = ["CachedComparer", "CachedScorer", "Comparer", "Scorer", "make_comparer", "make_scorer",
           "parse_choice", "parse_score"]
