"""`noisepo score`: pointwise scores for both responses of every preference pair.

Every row and column of the input is kept; `chosen_score` and `rejected_score` are added (null
where scoring failed, METHODS §4.1: such a pair keeps its default labels downstream). The output is
written atomically at the end; the score cache (on by default) is what makes a rerun after a crash
cheap. Exit status 1 when every item failed (a wrong URL or model name, most likely), else 0.
"""
from __future__ import annotations

from noisepo.judges.config import ScoreConfig


def run_score(config: ScoreConfig) -> int:
    from noisepo.data import load_preferences
    from noisepo.io import write_jsonl_atomic
    from noisepo.judges.base import make_scorer
    from noisepo.judges.cache import CachedScorer

    loaded = load_preferences(config.data, skip_invalid=config.skip_invalid)
    rows = loaded.records
    scorer = make_scorer(config)
    cache_path = config.resolved_cache_path
    if cache_path is not None:
        scorer = CachedScorer(scorer, cache_path)
    scores = scorer.score(pair_items(rows))
    scored = [{**row, "chosen_score": scores[2 * i], "rejected_score": scores[2 * i + 1]}
              for i, row in enumerate(rows)]
    write_jsonl_atomic(config.output, scored)
    failed = sum(s is None for s in scores)
    cached = f", {scorer.hits} from the cache" if isinstance(scorer, CachedScorer) else ""
    print(f"scored {len(rows)} pairs ({len(scores)} responses{cached}): {failed} failed{_why(scorer)}"
          + (f", {loaded.skipped} invalid rows skipped" if loaded.skipped else "")
          + f" -> {config.output}")
    return 1 if scores and failed == len(scores) else 0


def _why(scorer) -> str:
    """' (unparsable 2, http_500 1); 5 retries, 3 unparsable_retries': the failures by reason, and
    how often an API judge asked again."""
    from noisepo.judges.cache import CachedScorer

    judge = scorer.scorer if isinstance(scorer, CachedScorer) else scorer
    reasons = scorer.failures if isinstance(scorer, CachedScorer) else getattr(judge, "failure_reasons", {})
    note = f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()) if v)})" if any(reasons.values()) else ""
    stats = getattr(judge, "stats", None)
    if stats is not None:
        note += f"; {stats['retries']} retries, {stats['unparsable_retries']} unparsable_retries"
    return note


def pair_items(rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, chosen), (prompt, rejected) for each row, in order, as text."""
    from noisepo.data.chat import response_text

    items = []
    for row in rows:
        prompt = prompt_text(row["prompt"])
        items.append((prompt, response_text(row["chosen"])))
        items.append((prompt, response_text(row["rejected"])))
    return items


def prompt_text(prompt) -> str:
    """What the judge reads as the prompt: the string, a lone user message's content, or a
    `role: content` transcript of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
