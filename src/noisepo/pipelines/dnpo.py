"""`noisepo dnpo` and `noisepo spin`: self-improvement iterations (METHODS §3, §4) as resumable stages.

    OUTPUT/base/          the SFT model's greedy evaluation (when there is something to evaluate on)
    OUTPUT/iter_<k>/      generate -> score -> pairs -> train -> evaluate -> metrics

Iteration k starts from policy_k (policy_0 = the SFT model, policy_k = iter_<k-1>/model):
1. generate: policy_k's response to every SFT prompt (greedy by default)     -> generations.jsonl
2. score (DSL, k >= 1): the scorer on the human and the model response      -> scores.jsonl
3. pairs: chosen = human, rejected = model; with DSL the pair flips when the model's response
   scores strictly higher; pairs with two identical texts carry no gradient and are dropped
   (counted)                                                                  -> pairs.jsonl
4. train: on the pairs of iterations k, k-1, ..., k-history, from policy_k with policy_k as the
   (precomputed) reference; with NPO (k >= 1) the rejected side's reference is noisy
   (`noisepo.training.npo.NPOTrainer`, a fresh noise head per iteration)    -> model/, train.json
5. evaluate: task accuracy of the new model, its win rate against policy_k's responses on the
   same prompts, optionally lm-evaluation-harness                            -> eval.json, ...
6. metrics                                                                   -> metrics.json
Iteration 0 is SPIN whatever the switches say (METHODS §4). `noisepo spin` is this loop with
DSL and NPO off; DSL-only and NPO-only are the ablations, each differing from DNPO in one switch.

Under `accelerate launch` / `torchrun` every process runs the loop: generation, scoring and
training are shared among them, files and markers are written by the main process alone
(`noisepo.distributed`, docs/distributed.md).

Every stage writes its artifacts atomically and its marker last (`noisepo.pipelines.stages`): a
rerun resumes at the first unfinished stage, after a clean stop or a SIGKILL, and gives what an
uninterrupted run gives (greedy generation is deterministic; a killed training stage restarts
from policy_k with the same seed; scores are cached in SQLite as they arrive).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from noisepo import distributed
from noisepo.errors import ConfigError
from noisepo.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from noisepo.pipelines.dnpo_config import DNPOConfig, SPINConfig
from noisepo.pipelines.stages import RunFolder

BASE = "base"
STAGES = ("generate", "score", "pairs", "train", "evaluate")


def iteration_folder(k: int) -> str:
    return f"iter_{k}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def last_logged(history: list[dict], key: str):
    """The last value of `key` in a Trainer's log history (None when never logged)."""
    return next((h[key] for h in reversed(history) if key in h), None)


class DNPORun:
    """The stages of one run; `run()` executes (or skips) them in order."""

    def __init__(self, config: DNPOConfig, run: RunFolder, initial_model: str, records: list[dict], task,
                 eval_records: list[dict]):
        self.config, self.run_folder, self.root = config, run, run.root
        self.initial, self.records = initial_model, records
        self.task, self.eval_records = task, eval_records

    # ------------------------------------------------------------------ helpers
    def path(self, k: int | str, name: str) -> Path:
        folder = k if isinstance(k, str) else iteration_folder(k)
        return self.root / folder / name

    def policy(self, k: int) -> str:
        """policy_k: the model iteration k starts from (and its reference)."""
        return self.initial if k == 0 else str(self.path(k - 1, "model"))

    def load(self, model_dir: str):
        from noisepo.pipelines.common import load_policy

        c = self.config
        model, tokenizer = load_policy(model_dir, dtype=c.dtype, trust_remote_code=c.trust_remote_code, device="auto")
        return model.eval(), tokenizer

    def scorer(self, cache: Path):
        """The dsl scorer behind its cache: a `CachedComparer` (`.compare`) with `dsl.mode: pairwise`,
        else a `CachedScorer` (`.score`)."""
        from noisepo.judges.base import make_comparer, make_scorer
        from noisepo.judges.cache import CachedComparer, CachedScorer

        if self.config.dsl.mode == "pairwise":
            return CachedComparer(make_comparer(self.config.dsl), cache)
        return CachedScorer(make_scorer(self.config.dsl), cache)

    def judge_both(self, scorer, prompts: list[str], first: list[str], second: list[str]) -> tuple[list, list]:
        """Pointwise: the scores of `first` and of `second`. Pairwise: P(first beats second) with
        `first` shown as A, and P(second beats first) with `second` shown as A (the position swap).
        One contiguous slice of the items per process (an API judge keeps its full concurrency)."""
        if self.config.dsl.mode == "pairwise":
            items, judge = [*zip(prompts, first, second), *zip(prompts, second, first)], scorer.compare
        else:
            items, judge = [*zip(prompts, first), *zip(prompts, second)], scorer.score
        values = distributed.map_sharded(items, judge,
                                         chunk_size=max(1, -(-len(items) // distributed.world_size())))
        return values[:len(prompts)], values[len(prompts):]

    @staticmethod
    def judge_summary(scorer) -> dict:
        """The cache's and judge's counts over every process: failures by reason, retries."""
        from noisepo.judges.cache import merge_summaries

        summary = merge_summaries(distributed.gather(scorer.summary()))
        return {"failure_reasons": summary["failure_reasons"], "retries": summary["retries"],
                "unparsable_retries": summary["unparsable_retries"], "cached": summary["cached"],
                "judged": summary["judged"]}

    # ------------------------------------------------------------------ stages
    def generate(self, k: int) -> dict:
        """policy_k's response to every SFT prompt, with the chat template training uses."""
        from noisepo.data.chat import render_prompt, response_text
        from noisepo.generation.backends import open_generator
        from noisepo.generation.base import GenerationParams

        g, policy = self.config.generation, self.policy(k)
        params = GenerationParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                  seed=self.config.seed + k)
        with open_generator(g, policy, load=lambda: self.load(policy), batch_size=g.batch_size,
                            progress=self.config.progress, shard=True, dtype=self.config.dtype,
                            trust_remote_code=self.config.trust_remote_code) as (generator, tokenizer):
            prompt_texts = [render_prompt(tokenizer, r["prompt"]) for r in self.records]
            responses = generator.generate(prompt_texts, params)
        rows = [{**record, "index": i, "prompt_text": text, "completion": response_text(record["completion"]),
                 "response": samples[0]}
                for i, (record, text, samples) in enumerate(zip(self.records, prompt_texts, responses))]
        if distributed.is_main():
            write_jsonl_atomic(self.path(k, "generations.jsonl"), rows)
        return {"prompts": len(rows), "policy": self.policy(k), "backend": g.backend,
                "identical_to_human": sum(r["response"] == r["completion"] for r in rows)}

    def score(self, k: int) -> dict:
        """DSL's judgements of every prompt's human and model response (cached as they arrive):
        both scores (pointwise), or the verdicts of both orders (pairwise)."""
        from noisepo.judges.command import prompt_text

        rows = read_jsonl(self.path(k, "generations.jsonl"))
        prompts = [prompt_text(r["prompt"]) for r in rows]  # what `noisepo score` shows a judge
        scorer = self.scorer(self.path(k, "scores.cache.sqlite"))  # one SQLite file, shared by the ranks
        try:
            human, model = self.judge_both(scorer, prompts, [r["completion"] for r in rows],
                                           [r["response"] for r in rows])
            counts = self.judge_summary(scorer)
        finally:
            scorer.close()
        names = ("human_wins_as_a", "model_wins_as_a") if self.config.dsl.mode == "pairwise" else \
            ("human_score", "model_score")
        if distributed.is_main():
            write_jsonl_atomic(self.path(k, "scores.jsonl"),
                               [{"index": r["index"], names[0]: h, names[1]: m} for r, h, m in zip(rows, human, model)])
        return {"scored": len(rows), "failures": sum(h is None or m is None for h, m in zip(human, model)),
                "mode": self.config.dsl.mode, **counts, "scorer": scorer.identity}

    def pairs(self, k: int) -> dict:
        """SPIN pairs (chosen = human), relabelled by DSL from iteration 1 on; identical pairs dropped."""
        from noisepo.pipelines.dsl import label_pairs

        rows = read_jsonl(self.path(k, "generations.jsonl"))
        judged = {}
        if self.config.uses_dsl(k):
            scores = read_jsonl(self.path(k, "scores.jsonl"))
            if self.config.dsl.mode == "pairwise":
                judged = {"human_wins_as_a": [s["human_wins_as_a"] for s in scores],
                          "model_wins_as_a": [s["model_wins_as_a"] for s in scores]}
            else:
                judged = {"human_scores": [s["human_score"] for s in scores],
                          "model_scores": [s["model_score"] for s in scores]}
        pairs, stats = label_pairs(rows, **judged)
        pairs = [{**p, "iteration": k} for p in pairs]
        write_jsonl_atomic(self.path(k, "pairs.jsonl"), pairs)
        return {"dsl": self.config.uses_dsl(k), **stats.as_dict()}

    def training_set(self, k: int) -> list[dict]:
        """The pairs of iterations k, k-1, ..., k-history (SPIN trains on t and t-1)."""
        records = []
        for j in range(max(0, k - self.config.history), k + 1):
            records += read_jsonl(self.path(j, "pairs.jsonl"))
        return records

    def train(self, k: int) -> dict:
        from noisepo.pipelines.common import LossOptions, save_model_atomically, train_pairs

        c = self.config
        records = self.training_set(k)
        output = self.root / iteration_folder(k)
        if not records:  # every pair identical: nothing carries a gradient, the policy stays
            def keep_policy():
                model, tokenizer = self.load(self.policy(k))
                save_model_atomically(model, tokenizer, output / "model")
                write_json_atomic(output / "train.json", {"pairs": 0, "skipped": "no trainable pairs"})

            distributed.run_on_main(keep_policy)
            return {"pairs": 0, "npo": False, "skipped": True}
        trainer_cls, trainer_kwargs = None, None
        if c.uses_npo(k):
            from noisepo.training.npo import NPOTrainer

            trainer_cls = NPOTrainer
            trainer_kwargs = dict(noise_rank=c.npo.rank, sigma0=c.npo.sigma0, noise_penalty=c.npo.noise_penalty,
                                  noise_lr=c.npo.learning_rate, noise_chunk_size=c.npo.chunk_size,
                                  cache_reference_states={"cache": True, "forward": False}.get(c.npo.reference_states, "auto"),
                                  constraint=c.npo.constraint, sigma_max=c.npo.sigma_max, penalty_over=c.npo.penalty_over,
                                  schedule=c.npo.schedule, head_steps=c.npo.head_steps, resample=c.npo.resample,
                                  objective=c.npo.objective)
        if distributed.is_main():
            shutil.rmtree(output / "model.partial", ignore_errors=True)
        loss = LossOptions(c.loss_of(k), beta=c.beta, alpha=c.robust.alpha)

        def fit(pairs: list[dict], folder: Path) -> dict:
            return train_pairs(pairs, init_model=self.policy(k), output=folder, options=c.training, loss=loss,
                               trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs, dtype=c.dtype,
                               trust_remote_code=c.trust_remote_code, progress=c.progress)

        filtered = None
        if c.uses_filter(k):
            records, filtered = self.filter_pairs(k, records, fit)
        metrics = fit(records, output)
        if filtered is not None:
            metrics["filter"] = filtered
        if distributed.is_main():
            write_json_atomic(output / "train.json", metrics)
        history = metrics.get("log_history", [])
        return {"pairs": len(records), "npo": c.uses_npo(k), "global_step": metrics.get("global_step"),
                "loss": loss.loss, **({"filter": filtered} if filtered is not None else {}),
                "train_loss": metrics.get("train_loss"), "rewards/margins": metrics.get("rewards/margins"),
                "sigma_mean": last_logged(history, "npo/sigma_mean"),
                "sigma_target": last_logged(history, "npo/sigma_target"),
                "noise_loss": last_logged(history, "npo/noise_loss"),
                **{f"npo/{key}": value for key, value in metrics.get("npo", {}).items()},
                "init_model": self.policy(k)}

    def filter_pairs(self, k: int, records: list[dict], fit) -> tuple[list[dict], dict]:
        """ROPO's filter on iteration k's pairs (METHODS §5.1 steps 1-3, `--robust.rho`): train on every
        pair (OUTPUT/iter_k/probe), score each pair with ℓ_ropo under that model against
        `robust.filter_reference` (default the SFT model, fixed: against policy_k the reference moved
        with the pairs it judged), keep the (1−ρ)N lowest; with `robust.filter_misranked_only` (default)
        only misranked pairs (h < 0) may go. With a task, a pair whose chosen response scores
        lower under the task's own verifier than its rejected one is counted as wrongly labelled, so the
        filter's precision and recall are known."""
        from noisepo.judges.command import prompt_text
        from noisepo.models import model_of_run_folder
        from noisepo.pipelines.common import load_policy, pair_logps
        from noisepo.pipelines.filtering import filter_quality, is_misranked, select_kept
        from noisepo.pipelines.ropo import ropo_scores

        c = self.config
        probe = self.root / iteration_folder(k) / "probe"
        fit(records, probe)
        scored = {}
        reference = {"initial": self.initial, "previous": self.policy(k)}.get(c.robust.filter_reference) or \
            model_of_run_folder(c.robust.filter_reference, option="robust.filter-reference")
        for name, model_dir in (("reference", reference), ("probe", str(probe / "model"))):
            model, tokenizer = load_policy(model_dir, dtype=c.dtype, trust_remote_code=c.trust_remote_code)
            scored[name] = pair_logps(model.eval(), tokenizer, records, max_length=c.training.max_length,
                                      progress=c.progress, shard=True)
            del model
        with_reference = [{"reference_chosen_logps": s["chosen"], "reference_rejected_logps": s["rejected"]}
                          for s in scored["reference"]]
        losses, margins = ropo_scores(scored["probe"], with_reference, beta=c.beta, alpha=c.robust.alpha)
        kept = select_kept(losses, c.robust.rho, margins if c.robust.filter_misranked_only else None)
        summary = {"pairs": len(records), "kept": sum(kept), "discarded": len(kept) - sum(kept),
                   "misranked": sum(1 for h in margins if is_misranked(h)),
                   "filter_reference": reference,
                   "mean_loss_kept": _mean([x for x, keep in zip(losses, kept) if keep]),
                   "mean_loss_discarded": _mean([x for x, keep in zip(losses, kept) if not keep])}
        if self.task is not None and callable(getattr(self.task, "score", None)):
            from noisepo.data.chat import response_text

            def wrong(r: dict) -> bool:
                prompt = prompt_text(r["prompt"])
                return self.task.score(prompt, response_text(r["chosen"])) < \
                    self.task.score(prompt, response_text(r["rejected"]))

            summary.update(filter_quality(kept, [wrong(r) for r in records]))
        if distributed.is_main():
            write_jsonl_atomic(probe.parent / "filter.jsonl",
                               [{"id": r.get("id"), "ropo_loss": x, "margin": h, "kept": keep}
                                for r, x, h, keep in zip(records, losses, margins, kept)])
            shutil.rmtree(probe / "model", ignore_errors=True)  # the probe's weights are not needed again
        return [r for r, keep in zip(records, kept) if keep], summary

    def evaluate(self, folder: str, model_dir: str, previous: str | None) -> dict:
        """Task accuracy of `model_dir`; its win rate against the `previous` folder's responses; lm-eval."""
        summary: dict = {}
        if self.eval_records:
            from noisepo.pipelines.common import evaluate_task

            c = self.config
            result = evaluate_task(model_dir, self.task, self.eval_records, max_new_tokens=c.eval_max_new_tokens,
                                   dtype=c.dtype, trust_remote_code=c.trust_remote_code, progress=c.progress)
            predictions = result.pop("predictions")
            write_jsonl_atomic(self.root / folder / "eval_predictions.jsonl", predictions)
            write_json_atomic(self.root / folder / "eval.json", result)
            summary.update({k: result.get(k) for k in ("accuracy", "correct", "n", "graded_score") if k in result})
            if self.config.win_rate and previous is not None:
                summary["win_rate"] = self.win_rate(folder, predictions, previous)
        if self.config.lm_eval_tasks:
            summary["lm_eval"] = self.lm_eval(folder, model_dir)
        return summary

    def win_rate(self, folder: str, predictions: list[dict], previous: str) -> dict:
        """The new model's greedy responses against the previous iterate's, judged by the dsl scorer."""
        from noisepo.judges.command import prompt_text
        from noisepo.pipelines.dsl import pairwise_win_rate, win_rate

        old = read_jsonl(self.root / previous / "eval_predictions.jsonl")
        prompts = [prompt_text(r["prompt"]) for r in self.eval_records]  # predictions keep their order
        if len(old) != len(predictions) or len(prompts) != len(predictions):
            raise ValueError("the win rate needs one old and one new response per evaluation prompt")
        scorer = self.scorer(self.root / folder / "win_rate.cache.sqlite")
        try:
            new, older = self.judge_both(scorer, prompts, [p["response"] for p in predictions],
                                         [p["response"] for p in old])
        finally:
            scorer.close()
        result = (pairwise_win_rate if self.config.dsl.mode == "pairwise" else win_rate)(new, older)
        write_json_atomic(self.root / folder / "win_rate.json", {**result, "against": previous,
                                                                "scorer": scorer.identity})
        return result

    def lm_eval(self, folder: str, model_dir: str) -> dict:
        """lm-evaluation-harness on `model_dir` (extra 'eval'): lm_eval.json (per task, its metrics)
        and lm_eval_samples.jsonl (every prompt, response and score); `noisepo:<task>` tasks are
        the task's test prompts, scored by its own verifier (noisepo/lm_eval_tasks.py)."""
        from noisepo.lm_eval_tasks import run_lm_eval

        c = self.config
        table, samples = run_lm_eval(model_dir, list(c.lm_eval_tasks), self.root / folder, limit=c.lm_eval_limit,
                                     # seed 0: the test prompts load_evaluation gives --task
                                     include_path=c.lm_eval_include, n=c.eval_limit, seed=0,
                                     max_new_tokens=c.eval_max_new_tokens, dtype=c.dtype,
                                     trust_remote_code=c.trust_remote_code)
        write_jsonl_atomic(self.root / folder / "lm_eval_samples.jsonl", samples)
        write_json_atomic(self.root / folder / "lm_eval.json", table)
        evaluation = self.root / folder / "eval.json"
        if evaluation.is_file():  # the task evaluation's file carries lm-eval's numbers beside its own
            write_json_atomic(evaluation, {**json.loads(evaluation.read_text(encoding="utf-8")), "lm_eval": table})
        return table

    def metrics(self, k: int) -> dict:
        """iter_<k>/metrics.json: the headline numbers at the top level, every stage's summary below."""
        stages = {name: self.run_folder.stage(iteration_folder(k), name).summary() for name in STAGES}
        stages = {n: {x: y for x, y in s.items() if x not in ("stage", "finished_at")} for n, s in stages.items()}
        pairs, train, evaluation = stages["pairs"], stages["train"], stages["evaluate"]
        metrics = {
            "iteration": k,
            "dsl": self.config.uses_dsl(k),
            "npo": self.config.uses_npo(k),
            "prompts": pairs.get("pairs"),
            "trainable_pairs": pairs.get("trainable"),
            "flipped": pairs.get("flipped"),
            "ties": pairs.get("ties"),
            "scorer_failures": pairs.get("scorer_failures"),
            "failure_reasons": stages["score"].get("failure_reasons"),
            "unparsable_retries": stages["score"].get("unparsable_retries"),
            "identical": pairs.get("identical"),
            "mean_human_score": pairs.get("mean_human_score"),
            "mean_model_score": pairs.get("mean_model_score"),
            "trained_pairs": train.get("pairs"),
            "sigma_mean": train.get("sigma_mean"),
            "sigma_target": train.get("sigma_target"),
            "npo/margin_effect": train.get("npo/margin_effect"),
            "npo/margin_effect_max": train.get("npo/margin_effect_max"),
            "npo/weight_moved": train.get("npo/weight_moved"),
            "npo/relative_weight_moved": train.get("npo/relative_weight_moved"),
            "noise_loss": train.get("noise_loss"),
            "loss": train.get("loss"),
            "filter": train.get("filter"),
            "filter_precision": (train.get("filter") or {}).get("filter_precision"),
            "filter_recall": (train.get("filter") or {}).get("filter_recall"),
            "accuracy": evaluation.get("accuracy"),
            "win_rate": (evaluation.get("win_rate") or {}).get("win_rate"),
            "lm_eval": evaluation.get("lm_eval"),
            "seconds": round(sum(s.get("seconds", 0.0) for s in stages.values()), 2),
            "stages": stages,
        }
        write_json_atomic(self.path(k, "metrics.json"), metrics)
        return {"seconds": metrics["seconds"]}

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        stage = self.run_folder.stage
        evaluating = bool(self.eval_records or self.config.lm_eval_tasks)
        initial_eval = None
        # Evaluation (greedy on held-out prompts, win rate, lm-eval), pairs and metrics run on the
        # main process alone (collective=False); generation, scoring and training on every rank.
        if evaluating:  # the SFT model's numbers: the baseline, and iteration 0's win-rate opponent
            initial_eval = stage(BASE, "evaluate").run(lambda: self.evaluate(BASE, self.initial, None),
                                                       collective=False)
        iterations = []
        for k in range(self.config.iterations):
            folder = iteration_folder(k)
            stage(folder, "generate").run(lambda k=k: self.generate(k))
            if self.config.uses_dsl(k):
                stage(folder, "score").run(lambda k=k: self.score(k))
            stage(folder, "pairs").run(lambda k=k: self.pairs(k), collective=False)
            stage(folder, "train").run(lambda k=k: self.train(k))
            if evaluating:
                previous = BASE if k == 0 else iteration_folder(k - 1)
                stage(folder, "evaluate").run(
                    lambda k=k, f=folder, p=previous: self.evaluate(f, str(self.path(k, "model")), p),
                    collective=False)
            stage(folder, "metrics").run(lambda k=k: self.metrics(k), collective=False)
            iterations.append(json.loads(self.path(k, "metrics.json").read_text(encoding="utf-8")))
        summary = {"iterations": [{key: m[key] for key in SUMMARY_KEYS} for m in iterations],
                   "initial_accuracy": (initial_eval or {}).get("accuracy"),
                   "initial_lm_eval": (initial_eval or {}).get("lm_eval"),
                   "model": str(self.path(self.config.iterations - 1, "model"))}
        if distributed.is_main():
            write_json_atomic(self.root / "summary.json", summary)
        return summary


SUMMARY_KEYS = ("iteration", "dsl", "npo", "prompts", "trainable_pairs", "flipped", "ties", "scorer_failures",
                "unparsable_retries", "identical", "mean_human_score", "mean_model_score", "sigma_mean", "accuracy", "win_rate",
                "lm_eval", "seconds")


def lm_eval_cell(results: dict | None) -> str:
    """One table cell for lm-eval's results: each task's headline metric, e.g. `noisepo_addition 81.0%`."""
    from noisepo.lm_eval_tasks import headline

    if not results:
        return "-"
    parts = []
    for task, metrics in results.items():
        best = headline(metrics)
        parts.append(f"{task} {best[1]:.1%}" if best else task)
    return "; ".join(parts)


def summary_table(summary: dict) -> str:
    """The per-iteration table printed at the end of a run."""
    from noisepo.pipelines.common import cell, format_table

    rows = [("iter", "method", "pairs", "flipped", "ties", "judge failed", "unparsable retries", "identical",
             "mean σ", "accuracy", "win rate", "lm-eval", "seconds")]
    if summary.get("initial_accuracy") is not None or summary.get("initial_lm_eval"):
        rows.append(("sft", "-", "-", "-", "-", "-", "-", "-", "-", cell(summary.get("initial_accuracy"), ".1%"),
                     "-", lm_eval_cell(summary.get("initial_lm_eval")), "-"))
    for m in summary["iterations"]:
        method = {(False, False): "spin", (True, False): "dsl", (False, True): "npo", (True, True): "dnpo"}[
            (m["dsl"], m["npo"])]
        rows.append((str(m["iteration"]), method, cell(m["trainable_pairs"]), cell(m["flipped"]),
                     cell(m.get("ties") if m["dsl"] else None), cell(m.get("scorer_failures") if m["dsl"] else None),
                     cell(m.get("unparsable_retries")), cell(m["identical"]), cell(m["sigma_mean"], ".4f"), cell(m["accuracy"], ".1%"),
                     cell(m["win_rate"], ".1%"), lm_eval_cell(m.get("lm_eval")), cell(m["seconds"])))
    return format_table(rows)


def dnpo(config: DNPOConfig) -> dict:
    """Run (or resume) every iteration; return the summary (also OUTPUT/summary.json)."""
    from noisepo.data import load_sft
    from noisepo.data.chat import response_text
    from noisepo.pipelines.common import load_evaluation, open_run

    loaded = load_sft(config.data, skip_invalid=config.skip_invalid)
    records = loaded.records[: config.limit] if config.limit else loaded.records
    if not records:
        raise ConfigError("holds no SFT records", key="data")
    task, eval_records = load_evaluation(config)  # found before any training
    from noisepo.generation.backends import check_backend

    check_backend(config.generation, config.model, key_prefix="generation.")  # before the run folder exists
    if config.win_rate and not eval_records:
        raise ConfigError("needs evaluation prompts: give --task or --eval-data", key="win_rate")
    texts = [response_text(r[key]) for r in records for key in ("prompt", "completion")]
    texts += [response_text(r["prompt"]) for r in eval_records]
    with open_run(config, texts) as (run, initial):
        return DNPORun(config, run, initial, records, task, eval_records).run()


def run_dnpo(config: DNPOConfig) -> int:
    summary = dnpo(config)
    if not distributed.is_main():
        return 0
    print(summary_table(summary))
    print(f"dnpo: final model in {summary['model']}; per-iteration metrics in "
          f"{Path(config.output)}/iter_<k>/metrics.json")
    return 0


def run_spin(config: SPINConfig) -> int:
    return run_dnpo(config)
