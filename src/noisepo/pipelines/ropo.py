"""`noisepo ropo`: ROPO's rounds (METHODS §5) as resumable stages over a run folder.

    OUTPUT/reference/    the initial model's log-probs of every original pair (ROPO's reference in
                         every round), and its greedy evaluation when a task or eval data is given
    OUTPUT/round_<r>/    train -> score -> filter -> refill -> evaluate -> metrics

Round r trains (one epoch by default) on the kept originals of round r−1 plus its refills (round 0:
every pair), starting from round r−1's model; scores EVERY original pair with ℓ_ropo under the new
model (forward only, eval mode, against the stored reference); keeps the (1−ρ)N lowest-loss pairs
(weights w ∈ {0, 1}, the optimum of §5.1 for a fixed model); and refills each discarded prompt by
rejection sampling (§5.2). Filtering is recomputed from the whole original set every round, so a
pair dropped once can come back. Every stage writes its artifacts atomically and a marker last
(`noisepo.pipelines.stages`), so a killed run resumes at the first unfinished stage.

Under `accelerate launch` / `torchrun` every process runs the loop: training, the log-prob passes
(reference, ℓ_ropo scoring, refill rewards) and the refill sampling are shared among them; the
filter, evaluation and metrics run on the main process, which alone writes files and markers.

The baselines (`--loss dpo|cdpo|rdpo|ipo|hinge --no-filter`) run the same stages with every pair
kept and no refills; pairs are still scored with ℓ_ropo, so the loss distributions can be compared.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from noisepo import distributed
from noisepo.errors import NoisepoError
from noisepo.io import atomic_open, read_jsonl, write_json_atomic, write_jsonl_atomic
from noisepo.pipelines.filtering import (
    best_worst_pair,
    filter_margin,
    filter_quality,
    is_misranked,
    select_kept,
)
from noisepo.pipelines.ropo_config import ROPOConfig
from noisepo.pipelines.stages import RunFolder

REFERENCE = "reference"
HISTOGRAM_BINS = 20


def round_folder(r: int) -> str:
    return f"round_{r}"


# --------------------------------------------------------------------------- pure pieces
def ropo_scores(policy: list[dict], records: list[dict], *, beta: float, alpha: float) -> tuple[list[float], list[float]]:
    """(ℓ_ropo, h) per pair from the policy's summed log-probs (`pair_logps` rows: chosen, rejected)
    and the records' `reference_chosen_logps` / `reference_rejected_logps` (METHODS §2, §5.1)."""
    import torch

    from noisepo.losses import loss_function, margin

    def column(rows, key):
        return torch.tensor([float(row[key]) for row in rows], dtype=torch.float64)  # (N,)

    logps = (column(policy, "chosen"), column(policy, "rejected"),
             column(records, "reference_chosen_logps"), column(records, "reference_rejected_logps"))
    losses = loss_function("ropo", beta=beta, alpha=alpha)(*logps)
    return losses.tolist(), (beta * margin(*logps)).tolist()


def loss_distribution(losses: list[float], kept: list[bool], flipped: list[bool] | None,
                      bins: int = HISTOGRAM_BINS) -> dict:
    """Histogram counts of ℓ_ropo over shared bin edges for all/kept/discarded pairs (and clean/flipped
    when the true labels are known), with mean and median per group, and the AUROC of the loss at
    telling flipped from clean pairs (P(loss of a flipped pair > loss of a clean one))."""
    finite = [x for x in losses if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = [lo + (hi - lo) * k / bins for k in range(bins + 1)]
    groups = {"all": losses, "kept": [x for x, k in zip(losses, kept) if k],
              "discarded": [x for x, k in zip(losses, kept) if not k]}
    if flipped is not None:
        groups["clean"] = [x for x, f in zip(losses, flipped) if not f]
        groups["flipped"] = [x for x, f in zip(losses, flipped) if f]

    def counts(values):
        out = [0] * bins
        for x in values:
            if math.isfinite(x):
                out[min(bins - 1, int((x - lo) / (hi - lo) * bins))] += 1
        return out

    def stats(values):
        ordered = sorted(x for x in values if math.isfinite(x))
        if not ordered:
            return {"n": len(values), "mean": None, "median": None}
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        return {"n": len(values), "mean": sum(ordered) / len(ordered), "median": median}

    result = {"bin_edges": edges, "counts": {name: counts(v) for name, v in groups.items()},
              "stats": {name: stats(v) for name, v in groups.items()}, "auroc_flipped": None}
    if flipped is not None and groups["clean"] and groups["flipped"]:
        result["auroc_flipped"] = auroc(groups["flipped"], groups["clean"])
    return result


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U)."""
    ranked = sorted([(x, 1) for x in positive] + [(x, 0) for x in negative])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # 1-based ranks i+1..j share their mean
        rank_sum += average_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def prompt_key(prompt) -> str:
    """A prompt's identity: its text, or its messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def discarded_groups(records: list[dict], kept: list[bool]) -> list[list[int]]:
    """The discarded pairs grouped by prompt, in order of first appearance: one refill per group, so a
    round never refills a prompt twice."""
    groups: dict[str, list[int]] = {}
    for i, keep in enumerate(kept):
        if not keep:
            groups.setdefault(prompt_key(records[i]["prompt"]), []).append(i)
    return list(groups.values())


def candidates_of(records: list[dict], group: list[int], samples: list[str]) -> tuple[list[str], list[str]]:
    """(texts, sources) of a discarded prompt's candidates: the original responses first (they win
    ties), then the non-empty samples; duplicate texts appear once."""
    from noisepo.data.chat import response_text

    texts, sources = [], []
    for i in group:
        for side in ("chosen", "rejected"):
            texts.append(response_text(records[i][side]))
            sources.append(f"original_{side}")
    texts += samples
    sources += ["sample"] * len(samples)
    seen, out_texts, out_sources = set(), [], []
    for text, source in zip(texts, sources):
        if text and text not in seen:
            seen.add(text)
            out_texts.append(text)
            out_sources.append(source)
    return out_texts, out_sources


def as_response(text: str, like) -> str | list[dict]:
    """`text` in the format of the original response `like` (a string, or TRL's message list)."""
    return text if isinstance(like, str) else [{"role": "assistant", "content": text}]


def ropo_loss_of_margin(h: float, alpha: float) -> float:
    """ℓ_ropo of one pair whose β-scaled margin is `h` (losses.ropo, without tensors)."""
    from noisepo.losses import ropo_scale

    # −log σ(h) = softplus(−h), computed stably; σ(−h) = 1 / (1 + e^h)
    softplus = max(-h, 0.0) + math.log1p(math.exp(-abs(h)))
    sigmoid = 1.0 / (1.0 + math.exp(h)) if h > -700 else 1.0
    return ropo_scale(alpha) * (softplus + alpha * sigmoid)


def refill_pairs(records: list[dict], groups: list[list[int]], candidates: list[tuple[list[str], list[str]]],
                 rewards: list[float], *, round_index: int, rule: str = "best-worst", alpha: float = 14.0,
                 kept_losses: list[float] | None = None) -> tuple[list[dict], dict]:
    """The refill of each discarded prompt (METHODS §5.2), by `rule`:

    - best-worst: chosen = its highest-reward candidate, rejected = its lowest (the samples and both
      original responses); none when those are the same text (or there are fewer than two).
    - replace-rejected: the discarded pair's own chosen, against the sample the current model finds
      least likely to be preferred (lowest implicit reward); none without a sample unlike the chosen.
    - ranked: best-worst's pair, kept only when its own ℓ_ropo (of its reward margin) ranks among
      the kept set's (≤ the largest kept ℓ_ropo, `kept_losses`); otherwise none (counted).

    `candidates[g]` = (texts, sources) of group g (`candidates_of`); `rewards` = the implicit rewards
    of every candidate, groups concatenated. Returns (refills without reference columns, summary):
    the summary counts the (chosen source > rejected source) kinds, the refills that merely turned
    an original pair around (`reoriented`; `reoriented_flipped` of them undid a known label flip) and
    the pairs a rule declined (`declined`).
    """
    from noisepo.data.chat import response_text

    flipped = _flipped(records)
    threshold = max((x for x in kept_losses or [] if math.isfinite(x)), default=math.inf)
    refills, sources, identical, reoriented, corrected, declined, start = [], Counter(), 0, 0, 0, 0, 0
    for group, (texts, origin) in zip(groups, candidates, strict=True):
        group_rewards = rewards[start:start + len(texts)]
        start += len(texts)
        first = records[group[0]]
        if rule == "replace-rejected":
            chosen_text = response_text(first["chosen"])
            best = texts.index(chosen_text) if chosen_text in texts else None
            samples = [i for i, o in enumerate(origin) if o == "sample" and texts[i] != chosen_text]
            if best is None or not samples:
                identical += 1
                continue
            worst = min(samples, key=lambda i: group_rewards[i])
        else:
            choice = best_worst_pair(texts, group_rewards) if len(texts) >= 2 else None
            if choice is None:
                identical += 1
                continue
            best, worst = choice
            if rule == "ranked" and ropo_loss_of_margin(group_rewards[best] - group_rewards[worst], alpha) > threshold:
                declined += 1
                continue
        sources[f"{origin[best]}>{origin[worst]}"] += 1
        if len(group) == 1 and (origin[best], origin[worst]) == ("original_rejected", "original_chosen"):
            reoriented += 1
            corrected += bool(flipped and flipped[group[0]])
        refills.append({"prompt": first["prompt"], "chosen": as_response(texts[best], first["chosen"]),
                        "rejected": as_response(texts[worst], first["rejected"]),
                        "id": f"refill-{round_index}-{group[0]}", "round": round_index, "refill_of": group,
                        "chosen_source": origin[best], "rejected_source": origin[worst],
                        "chosen_reward": group_rewards[best], "rejected_reward": group_rewards[worst]})
    if start != len(rewards):
        raise ValueError(f"{len(rewards)} rewards for {start} candidates")
    summary = {"rule": rule, "refills": len(refills), "identical_skipped": identical, "declined": declined,
               "sources": dict(sources), "reoriented": reoriented}
    if flipped is not None:
        summary["reoriented_flipped"] = corrected
    return refills, summary


# --------------------------------------------------------------------------- models in memory
class Models:
    """At most one model in memory, loaded on first use: consecutive stages share it (score, filter
    and refill use the same policy), and loading another one frees the previous one first."""

    def __init__(self, config: ROPOConfig):
        self.config = config
        self.path: str | None = None
        self.loaded = None

    def get(self, path) -> tuple:
        from noisepo.pipelines.common import load_policy

        if self.path != str(path):
            self.release()
            self.loaded = load_policy(str(path), dtype=self.config.dtype,
                                      trust_remote_code=self.config.trust_remote_code, device="auto")
            self.path = str(path)
        return self.loaded

    def release(self) -> None:
        self.loaded, self.path = None, None


# --------------------------------------------------------------------------- evaluation
def verified(scorer, prompt_text: str, response: str) -> float | None:
    """The verifier's score of a refill response; None when the prompt is not one it can check."""
    try:
        return float(scorer.score(prompt_text, response))
    except NoisepoError:
        return None


# --------------------------------------------------------------------------- the loop
class ROPORun:
    """The stages of one `noisepo ropo` run; `run()` executes (or skips) them in order."""

    def __init__(self, config: ROPOConfig, run: RunFolder, initial_model: str, scorer, eval_records: list[dict]):
        self.config, self.run_folder = config, run
        self.root = run.root
        self.initial = initial_model
        self.scorer, self.eval_records = scorer, eval_records
        self.models = Models(config)

    # ------------------------------------------------------------------ helpers
    def path(self, r: int | str, name: str) -> Path:
        folder = r if isinstance(r, str) else round_folder(r)
        return self.root / folder / name

    def model_of(self, r: int) -> str:
        """The policy after round r's training (r = −1: the initial model)."""
        return self.initial if r < 0 else str(self.path(r, "model"))

    def originals(self) -> list[dict]:
        return read_jsonl(self.path(REFERENCE, "pairs.jsonl"))

    # ------------------------------------------------------------------ stages
    def reference(self, records: list[dict]) -> dict:
        """The initial model's summed log-probs of both sides of every pair: ROPO's fixed reference."""
        from noisepo.pipelines.common import pair_logps

        model, tokenizer = self.models.get(self.initial)
        scored = pair_logps(model, tokenizer, records, max_length=self.config.training.max_length,
                            batch_size=self.config.score_batch_size, progress=self.config.progress, shard=True)
        rows = [{**record, "reference_chosen_logps": s["chosen"], "reference_rejected_logps": s["rejected"]}
                for record, s in zip(records, scored)]
        if distributed.is_main():
            write_jsonl_atomic(self.path(REFERENCE, "pairs.jsonl"), rows)
        return {"pairs": len(rows)}

    def evaluate(self, folder: str, model_dir: str) -> dict:
        from noisepo.pipelines.common import evaluate_task

        self.models.release()
        c = self.config
        result = evaluate_task(model_dir, self.scorer, self.eval_records, max_new_tokens=c.eval_max_new_tokens,
                               dtype=c.dtype, trust_remote_code=c.trust_remote_code, progress=c.progress)
        write_jsonl_atomic(self.root / folder / "eval_predictions.jsonl", result.pop("predictions"))
        write_json_atomic(self.root / folder / "eval.json", result)
        return {k: result.get(k) for k in ("accuracy", "correct", "n", "graded_score") if k in result}

    def training_set(self, r: int, originals: list[dict]) -> tuple[list[dict], dict]:
        """Round r's pairs: all originals in round 0 (and without filtering); later, the originals the
        previous round kept (weight w = 1; w = 0 rows carry no gradient and are dropped) plus its
        refills. A record's own `weight` multiplies w."""
        if r == 0 or not self.config.filtering:
            return originals, {"originals": len(originals), "refills": 0}
        previous = read_jsonl(self.path(r - 1, "pairs.jsonl"))
        kept = [record for record, row in zip(originals, previous, strict=True) if row["weight"] > 0]
        refills = read_jsonl(self.path(r - 1, "refills.jsonl"))
        return kept + refills, {"originals": len(kept), "refills": len(refills)}

    def train(self, r: int) -> dict:
        from noisepo.pipelines.common import LossOptions, train_pairs

        c = self.config
        records, composition = self.training_set(r, self.originals())
        self.models.release()
        metrics = train_pairs(records, init_model=self.model_of(r - 1), output=self.root / round_folder(r),
                              options=c.training, loss=LossOptions(c.loss, beta=c.beta,
                                                                   label_smoothing=c.label_smoothing, alpha=c.alpha),
                              dtype=c.dtype, trust_remote_code=c.trust_remote_code, progress=c.progress)
        if distributed.is_main():
            write_json_atomic(self.path(r, "train.json"), metrics)
        return {"pairs": len(records), **composition, "global_step": metrics.get("global_step"),
                "train_loss": metrics.get("train_loss"), "init_model": self.model_of(r - 1)}

    def score(self, r: int) -> dict:
        """ℓ_ropo of every original pair under round r's policy (forward only, eval mode)."""
        from noisepo.pipelines.common import pair_logps

        originals = self.originals()
        model, tokenizer = self.models.get(self.model_of(r))
        policy = pair_logps(model, tokenizer, originals, max_length=self.config.training.max_length,
                            batch_size=self.config.score_batch_size, progress=self.config.progress, shard=True)
        c = self.config
        losses, margins = ropo_scores(policy, originals, beta=c.beta, alpha=c.alpha)
        rows = []
        for i, (loss, h, p, record) in enumerate(zip(losses, margins, policy, originals)):
            if c.filter_reference_weight == 1:  # the paper's filter: ℓ_ropo itself
                h_filter, filter_loss = h, loss
            else:
                h_filter = filter_margin(p["chosen"], p["rejected"], record["reference_chosen_logps"],
                                         record["reference_rejected_logps"], beta=c.beta,
                                         reference_weight=c.filter_reference_weight)
                filter_loss = ropo_loss_of_margin(h_filter, c.alpha)  # NaN stays NaN (discarded first)
            rows.append({"index": i, "loss": loss, "margin": h, "filter_margin": h_filter, "filter_loss": filter_loss,
                         "policy_chosen_logps": p["chosen"], "policy_rejected_logps": p["rejected"]})
        if distributed.is_main():
            write_jsonl_atomic(self.path(r, "scores.jsonl"), rows)
        finite = [x for x in losses if math.isfinite(x)]
        return {"pairs": len(rows), "mean_loss": sum(finite) / len(finite) if finite else None}

    def filter(self, r: int) -> dict:
        """Keep the (1−ρ)N lowest ℓ_ropo, and with filter_misranked_only every pair the model ranks the
        labelled way round (all pairs without filtering); precision/recall and the loss
        histograms when the data says which labels were flipped."""
        originals = self.originals()
        scores = read_jsonl(self.path(r, "scores.jsonl"))
        # The filter's statistic (h_γ and its ℓ_ropo); runs scored before filter_reference_weight had γ = 1.
        losses = [row.get("filter_loss", row["loss"]) for row in scores]
        filter_margins = [row.get("filter_margin", row["margin"]) for row in scores]
        margins = filter_margins if self.config.filter_misranked_only else None
        kept = select_kept(losses, self.config.rho, margins) if self.config.filtering else [True] * len(losses)
        flipped = _flipped(originals)
        rows = []
        for record, row, loss, h, keep in zip(originals, scores, losses, filter_margins, kept, strict=True):
            out = {"index": row["index"], **({"id": record["id"]} if "id" in record else {}),
                   "loss": row["loss"], "margin": row["margin"], "filter_loss": loss, "filter_margin": h,
                   "kept": keep, "weight": 1.0 if keep else 0.0}
            if flipped is not None:
                out["label_flipped"] = bool(record["label_flipped"])
            rows.append(out)
        write_jsonl_atomic(self.path(r, "pairs.jsonl"), rows)
        distribution = loss_distribution(losses, kept, flipped)
        png = plot_loss_histogram(distribution, self.path(r, "loss_histogram.png"), title=f"round {r}")
        write_json_atomic(self.path(r, "loss_histogram.json"), {**distribution, "png": png})
        summary = {"kept": sum(kept), "discarded": len(kept) - sum(kept), "filtering": self.config.filtering,
                   "misranked": sum(1 for h in filter_margins if is_misranked(h)),
                   "auroc_flipped": distribution["auroc_flipped"],
                   "mean_loss": {k: v["mean"] for k, v in distribution["stats"].items()}}
        if flipped is not None:
            agrees = [r["reference_chosen_logps"] > r["reference_rejected_logps"] for r in originals]
            summary.update(filter_quality(kept, flipped, agrees))
        return summary

    def refill_skipped(self, r: int) -> str | None:
        """Why round r has no refills, or None when it has."""
        if not self.config.filtering:
            return "filtering off"
        if not self.config.refill:
            return "refill off"
        if r == self.config.rounds - 1:
            return "last round (no next round trains on refills)"
        return None

    def refill(self, r: int) -> dict:
        """Rejection sampling (METHODS §5.2) for each discarded prompt: K samples from the current
        policy + the original responses; new pair = (highest, lowest) implicit reward
        β(log π_θ(y|x) − log π_ref(y|x)); skipped when both are the same text."""
        c = self.config
        reason = self.refill_skipped(r)
        if reason:
            if distributed.is_main():
                write_jsonl_atomic(self.path(r, "refills.jsonl"), [])
            return {"prompts": 0, "refills": 0, "skipped": reason}
        from noisepo.data.chat import render_prompt, response_text
        from noisepo.generation.backends import open_generator
        from noisepo.generation.base import GenerationParams
        from noisepo.pipelines.common import pair_logps, response_logps

        originals = self.originals()
        kept = [row["kept"] for row in read_jsonl(self.path(r, "pairs.jsonl"))]
        groups = discarded_groups(originals, kept)
        prompts = [originals[group[0]]["prompt"] for group in groups]
        samples: list[list[str]] = [[] for _ in groups]
        if c.samples > 0 and groups:
            params = GenerationParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                      num_samples=c.samples, seed=c.seed + r)
            if c.generation.backend == "vllm":
                self.models.release()  # vLLM loads the folder itself; the HF copy comes back for the log-probs
            with open_generator(c.generation, str(self.model_of(r)), load=lambda: self.models.get(self.model_of(r)),
                                batch_size=c.generation_batch_size, progress=c.progress, shard=True, dtype=c.dtype,
                                trust_remote_code=c.trust_remote_code) as (generator, tokenizer):
                samples = generator.generate([render_prompt(tokenizer, p) for p in prompts], params)
        model, tokenizer = self.models.get(self.model_of(r))
        prompt_texts = [render_prompt(tokenizer, p) for p in prompts]
        candidates = [candidates_of(originals, group, s) for group, s in zip(groups, samples)]
        flat_prompts = [p for p, (texts, _) in zip(prompts, candidates) for _ in texts]
        flat_texts = [t for texts, _ in candidates for t in texts]
        length, batch = c.training.max_length, c.score_batch_size
        policy = response_logps(model, tokenizer, flat_prompts, flat_texts, max_length=length, batch_size=batch,
                                shard=True)
        model, tokenizer = self.models.get(self.initial)
        reference = response_logps(model, tokenizer, flat_prompts, flat_texts, max_length=length, batch_size=batch,
                                   shard=True)
        rewards = [c.beta * (p - q) for p, q in zip(policy, reference)]

        kept_losses = [row["loss"] for row in read_jsonl(self.path(r, "pairs.jsonl")) if row["kept"]]
        refills, summary = refill_pairs(originals, groups, candidates, rewards, round_index=r, rule=c.refill_rule,
                                        alpha=c.alpha, kept_losses=kept_losses)
        if self.scorer is not None:
            by_index = {group[0]: text for group, text in zip(groups, prompt_texts)}
            for refill in refills:
                for side in ("chosen", "rejected"):
                    refill[f"{side}_score"] = verified(self.scorer, by_index[refill["refill_of"][0]],
                                                       response_text(refill[side]))
        # The reference columns exactly as training encodes the pair (same truncation as pair_logps).
        for refill, s in zip(refills, pair_logps(model, tokenizer, refills, max_length=length, batch_size=batch,
                                                 shard=True)):
            refill["reference_chosen_logps"], refill["reference_rejected_logps"] = s["chosen"], s["rejected"]
        if distributed.is_main():
            write_jsonl_atomic(self.path(r, "refills.jsonl"), refills)
        if self.scorer is not None:
            judged = [x for x in refills if x["chosen_score"] is not None and x["rejected_score"] is not None]
            summary["verified_better"] = sum(x["chosen_score"] > x["rejected_score"] for x in judged)
            summary["verified_judged"] = len(judged)
        return {"prompts": len(groups), "samples_per_prompt": c.samples, "backend": c.generation.backend, **summary}

    def metrics(self, r: int) -> dict:
        """round_<r>/metrics.json: the stage summaries, and the headline numbers at the top level."""
        stages = {name: self.run_folder.stage(round_folder(r), name).summary()
                  for name in ("train", "score", "filter", "refill", "evaluate")}
        stages = {k: {x: y for x, y in v.items() if x not in ("stage", "finished_at")} for k, v in stages.items()}
        metrics = {
            "round": r,
            "trained_pairs": stages["train"].get("pairs"),
            "kept": stages["filter"].get("kept"),
            "discarded": stages["filter"].get("discarded"),
            "refills": stages["refill"].get("refills"),
            "filter_precision": stages["filter"].get("filter_precision"),
            "filter_recall": stages["filter"].get("filter_recall"),
            "harmful_flip_recall": stages["filter"].get("harmful_flip_recall"),
            "auroc_flipped": stages["filter"].get("auroc_flipped"),
            "accuracy": stages["evaluate"].get("accuracy"),
            "seconds": round(sum(v.get("seconds", 0.0) for v in stages.values()), 2),
            **stages,
        }
        write_json_atomic(self.path(r, "metrics.json"), metrics)
        return {k: metrics[k] for k in ("kept", "refills", "seconds")}

    # ------------------------------------------------------------------ driver
    def run(self, records: list[dict]) -> dict:
        stage = self.run_folder.stage
        stage(REFERENCE, "reference").run(lambda: self.reference(records))
        initial_eval = None
        if self.eval_records:
            initial_eval = stage(REFERENCE, "evaluate").run(lambda: self.evaluate(REFERENCE, self.initial),
                                                            collective=False)
        rounds = []
        for r in range(self.config.rounds):
            folder = round_folder(r)
            stage(folder, "train").run(lambda r=r: self.train(r))
            stage(folder, "score").run(lambda r=r: self.score(r))
            stage(folder, "filter").run(lambda r=r: self.filter(r), collective=False)
            stage(folder, "refill").run(lambda r=r: self.refill(r))
            if self.eval_records:
                stage(folder, "evaluate").run(lambda r=r, f=folder: self.evaluate(f, self.model_of(r)),
                                              collective=False)
            stage(folder, "metrics").run(lambda r=r: self.metrics(r), collective=False)
            rounds.append(json.loads(self.path(r, "metrics.json").read_text(encoding="utf-8")))
        summary = {"rounds": [{k: m[k] for k in ("round", "trained_pairs", "kept", "discarded", "refills",
                                                 "filter_precision", "filter_recall", "harmful_flip_recall",
                                                 "auroc_flipped", "accuracy", "seconds")}
                              for m in rounds],
                   "initial_accuracy": (initial_eval or {}).get("accuracy"),
                   "model": self.model_of(self.config.rounds - 1)}
        if distributed.is_main():
            write_json_atomic(self.root / "summary.json", summary)
        return summary


def _flipped(records: list[dict]) -> list[bool] | None:
    """The true-label flags when every pair carries `label_flipped`, else None."""
    if records and all(isinstance(r.get("label_flipped"), bool) for r in records):
        return [r["label_flipped"] for r in records]
    return None


def plot_loss_histogram(distribution: dict, path: Path, *, title: str = "") -> str | None:
    """A PNG of the ℓ_ropo histograms (clean vs flipped when known, else kept vs discarded), written
    atomically; None when matplotlib (the `report` extra) is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    counts = distribution["counts"]
    groups = ("clean", "flipped") if "flipped" in counts else ("kept", "discarded")
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name in groups:
        axes.stairs(counts[name], distribution["bin_edges"], label=f"{name} ({sum(counts[name])})", fill=False)
    axes.set_xlabel("ℓ_ropo")
    axes.set_ylabel("pairs")
    axes.set_title(title)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path.name


def summary_table(summary: dict) -> str:
    """The per-round table printed at the end of a run."""
    from noisepo.pipelines.common import cell, format_table

    rows = [("round", "trained", "kept", "refills", "precision", "recall", "auroc", "accuracy", "seconds")]
    if summary.get("initial_accuracy") is not None:
        rows.append(("initial", "-", "-", "-", "-", "-", "-", cell(summary["initial_accuracy"], ".1%"), "-"))
    for m in summary["rounds"]:
        rows.append((str(m["round"]), cell(m["trained_pairs"]), cell(m["kept"]), cell(m["refills"]),
                     cell(m["filter_precision"], ".3f"), cell(m["filter_recall"], ".3f"),
                     cell(m["auroc_flipped"], ".3f"), cell(m["accuracy"], ".1%"), cell(m["seconds"])))
    return "\n".join([format_table(rows), *summary_warnings(summary)])


def summary_warnings(summary: dict) -> list[str]:
    """Lines that say when a run went backwards: a round's accuracy below the initial model's, or the
    filter's AUROC (flipped vs clean) below round 0's (the filter degrading, e.g. scoring with a model
    the refills broke). A user who sees neither can trust the table's direction."""
    lines = []
    start = summary.get("initial_accuracy")
    rounds = summary.get("rounds") or []
    first_auroc = rounds[0].get("auroc_flipped") if rounds else None
    for m in rounds:
        if start is not None and m.get("accuracy") is not None and m["accuracy"] < start:
            lines.append(f"warning: round {m['round']}'s accuracy {m['accuracy']:.1%} is below the initial model's "
                         f"{start:.1%}")
        auroc = m.get("auroc_flipped")
        if m["round"] > 0 and first_auroc is not None and auroc is not None and auroc < first_auroc:
            lines.append(f"warning: round {m['round']}'s filter AUROC {auroc:.3f} is below round 0's {first_auroc:.3f}"
                         + (" (below chance)" if auroc < 0.5 else ""))
    return lines


def ropo(config: ROPOConfig) -> dict:
    """Run (or resume) every round; return the summary (also OUTPUT/summary.json)."""
    from noisepo.data import load_preferences
    from noisepo.data.chat import response_text
    from noisepo.pipelines.common import load_evaluation, open_run

    loaded = load_preferences(config.data, skip_invalid=config.skip_invalid)
    scorer, eval_records = load_evaluation(config)  # found before any training
    from noisepo.generation.backends import check_backend

    check_backend(config.generation, config.model, key_prefix="generation.")  # before the run folder exists
    records = loaded.records
    texts = [response_text(r[k]) for r in records for k in ("prompt", "chosen", "rejected")]
    texts += [response_text(r["prompt"]) for r in eval_records]
    with open_run(config, texts) as (run, initial):
        return ROPORun(config, run, initial, scorer, eval_records).run(records)


def run_ropo(config: ROPOConfig) -> int:
    summary = ropo(config)
    if not distributed.is_main():
        return 0
    print(summary_table(summary))
    print(f"ropo: final model in {summary['model']}; per-round metrics in {Path(config.output)}/round_<r>/metrics.json")
    return 0
