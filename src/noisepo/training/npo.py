"""`NPOTrainer`: DPO on a noisy reference, with a trainable noise head (METHODS §4.2).

The trainer is `PreferenceTrainer` with one hook replaced: the reference's rejected side is
noisy. Per step

    policy forward (chosen + rejected)                      -> log π_θ(y_w), log π_θ(y_l)
    reference chosen side: the precomputed column           -> log π_ref(y_w)
    reference forward on the rejected half only (no grad)   -> g (B, T, d)
    noise head + LM head on the response positions, chunked -> log π̃_ref(y_l), mean σ², mean σ
    npo_objective                                           -> policy losses (B,), noise loss

and one backward pass trains both players: the policy minimises ℓ(M) with the noise detached,
the head maximises it with the policy detached, plus α_σ·mean(σ²) (`noisepo.noise.npo_objective`).

The head is NOT part of `self.model`: it is never saved with the policy. It has its own
parameter group in the optimizer (`noise_lr`, no weight decay), is saved into every checkpoint
folder as `noise_head.safetensors` beside the optimizer state and reloaded on resume. A new
trainer starts a fresh head (W = 0, σ = σ₀), which is what DNPO does every iteration.

Cost, against a DPO step with a precomputed reference: one extra no-grad forward of the
reference on the rejected half (about half a policy forward, no backward), plus per rejected
response token two (d × V) matmuls (the LM head and the noise head) in the forward and the head's
weight gradient in the backward; past `noisepo.noise.NOISE_SAVE_BYTES` of kept blocks per step
(256 MiB) the forward's two matmuls are recomputed in the backward instead of kept. The noise is
resampled every step, so the reference cannot be reduced to log-probs; with
`cache_reference_states` its rejected-side hidden states are computed once at the start and kept
per pair (N·d floats per pair), so no reference model is kept and no reference forward runs (only a
frozen copy of the LM head): cheaper for small models and datasets (benchmarks/bench_npo.py). The
default, "auto", caches them when they fit 1 GiB of host memory (`CACHE_STATES_BUDGET_BYTES`).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from noisepo.logprobs import (
    IGNORE_INDEX,
    SequenceLogps,
    has_plain_lm_head,
    logit_softcap,
    response_counts,
    response_states,
    sequence_logps_from_hidden,
)
from noisepo.noise import NoiseHead, noisy_sequence_logps, noisy_token_logps, npo_objective
from noisepo.training.collate import REFERENCE_COLUMNS
from noisepo.training.config import DEFAULT_NOISE_LR, DEFAULT_NOISE_PENALTY, DEFAULT_SIGMA0
from noisepo.training.preference import PreferenceTrainer

NOISE_HEAD_FILE = "noise_head.safetensors"
NOISE_OPTIMIZER_FILE = "noise_head_optimizer.safetensors"  # the head's own AdamW (schedule "alternating")
CONSTRAINTS = ("penalty", "bound", "both")
PENALTY_OVER = ("vocab", "response_tokens")
SCHEDULES = ("joint", "alternating")
RESAMPLE = ("step", "pair_epoch")
# A pair's DPO weight σ(−M) "moves" when the noise changes it by more than this fraction (npo/weight_moved).
WEIGHT_MOVED_FRACTION = 0.1
STATES_COLUMN = "reference_rejected_states"
# `cache_reference_states="auto"` caches when the states take at most this much host memory: the
# cache then replaces a whole reference model and its forward every step with a lookup (small models and
# datasets); past it (a 7B model's states cost 8-16 KiB per token) the reference runs every step.
CACHE_STATES_BUDGET_BYTES = 1 << 30


def reference_states_bytes(pairs, model) -> int | None:
    """Bytes the rejected side's cached reference states of `pairs` would take (one hidden vector in
    the model's dtype per rejected response token), or None when `pairs` are not tokenised pairs."""
    head = model.get_output_embeddings()
    try:
        tokens = sum(len(pair["rejected_ids"]) for pair in pairs)
    except (TypeError, KeyError):
        return None
    return tokens * head.weight.shape[1] * head.weight.element_size()


class NPOTrainer(PreferenceTrainer):
    """PreferenceTrainer with NPO's noisy reference on the rejected side (loss must be "dpo").

    Extra args: `noise_rank` (None: the full d × V head of the paper; r: a low-rank head),
    `sigma0` (σ at the start, 0.5), `noise_penalty` (α_σ, 0.01), `noise_lr` (the head's learning
    rate, 1e-2; None: the policy's), `noise_chunk_size` (response positions per chunk of the noisy
    log-softmax; None: blocks of about 16 MiB, `noisepo.noise.noise_chunk_rows`).
    `cache_reference_states` (True: compute the rejected side's reference hidden states once, keep
    them per pair, drop the reference model; False: run the reference on the rejected half every
    step; "auto", the default: cache when no `ref_model` is given, the reference is precomputed and
    the states fit `CACHE_STATES_BUDGET_BYTES`). The reference is the initial policy (a frozen copy
    kept here), the `ref_model` given, or PEFT's base model.
    """

    def __init__(self, model, args, train_dataset, *, noise_rank: int | None = None,
                 sigma0: float = DEFAULT_SIGMA0, noise_penalty: float = DEFAULT_NOISE_PENALTY,
                 noise_lr: float | None = DEFAULT_NOISE_LR, noise_chunk_size: int | None = None,
                 cache_reference_states: bool | str = "auto", constraint: str = "penalty",
                 sigma_max: float | None = None, penalty_over: str = "vocab", schedule: str = "joint",
                 head_steps: int = 1, resample: str = "step", objective: str = "minmax",
                 grad_norm_every: int | None = None, **kwargs):
        if kwargs.get("loss", "dpo") != "dpo":
            raise ValueError(f"NPO is defined on the DPO loss (METHODS §4.2), got loss={kwargs['loss']!r}")
        from noisepo.noise import OBJECTIVES

        for name, value, allowed in (("constraint", constraint, CONSTRAINTS), ("penalty_over", penalty_over, PENALTY_OVER),
                                     ("schedule", schedule, SCHEDULES), ("resample", resample, RESAMPLE),
                                     ("objective", objective, OBJECTIVES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if constraint in ("bound", "both") and (sigma_max is None or sigma_max <= sigma0):
            raise ValueError(f"constraint {constraint!r} needs sigma_max > sigma0 ({sigma0}), got {sigma_max}")
        if head_steps < 1:
            raise ValueError(f"head_steps must be >= 1, got {head_steps}")
        if objective == "eq10" and schedule != "joint":
            raise ValueError("objective 'eq10' is one joint minimisation: it needs schedule 'joint'")
        # The penalty weight acts only where the constraint includes the penalty.
        self.constraint, self.penalty_over, self.schedule = constraint, penalty_over, schedule
        self.head_steps, self.resample, self.objective = head_steps, resample, objective
        self.grad_norm_every = grad_norm_every  # None: every logging step
        self.head_optimizer = None
        self._step_effects: list = []  # (mean |M_noisy − M_clean|, max) per micro-batch, for npo_summary
        if cache_reference_states == "auto":
            # The cached states are the initial policy's, so a separate `ref_model` is never cached.
            size = reference_states_bytes(train_dataset, model)
            cache_reference_states = (kwargs.get("ref_model") is None and size is not None
                                      and kwargs.get("reference", "precompute") == "precompute"
                                      and not kwargs.get("padding_free") and size <= CACHE_STATES_BUDGET_BYTES)
        elif cache_reference_states not in (True, False):
            raise ValueError(f"cache_reference_states must be True, False or 'auto', got {cache_reference_states!r}")
        if cache_reference_states and kwargs.get("reference", "precompute") != "precompute":
            raise ValueError("cache_reference_states needs reference='precompute' (the chosen side's column)")
        if kwargs.get("padding_free"):
            raise ValueError("NPO needs padded rows (its reference forward reads the rejected half of the batch)")
        self.noise_penalty = 0.0 if constraint == "bound" else noise_penalty
        self.noise_lr = noise_lr
        self.noise_chunk_size = noise_chunk_size
        self.cache_reference_states = cache_reference_states
        if not has_plain_lm_head(model):
            raise ValueError("NPO needs a model whose logits are hidden @ lm_head.T, soft-capped or not (no scaling)")
        # Gemma-2: the reference's logits z are soft-capped, c·tanh(g Wᵀ / c); the noise is added to them.
        self.logit_softcap = logit_softcap(model)
        # The reference before training is the initial policy. Either keep a frozen copy of it for
        # the rejected side's hidden states (every step), or compute those states once now and keep
        # them per pair, with a frozen copy of the LM head only (`cache_reference_states`).
        ref_model = kwargs.pop("ref_model", None)
        peft = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
        if ref_model is None and not peft and not cache_reference_states:
            import copy

            ref_model = copy.deepcopy(model)
        super().__init__(model, args, train_dataset, ref_model=ref_model, **kwargs)
        if self.ref_model is None and ref_model is not None:  # reference="precompute" dropped it
            self.ref_model = self._frozen(ref_model)
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = unwrapped.config.get_text_config() if hasattr(unwrapped.config, "get_text_config") else unwrapped.config
        head = unwrapped.get_output_embeddings()
        self.reference_lm_head = None
        if cache_reference_states:
            self.train_dataset = self.with_rejected_states(self.train_dataset)
            self.reference_lm_head = (head.weight.detach().clone(),
                                      None if head.bias is None else head.bias.detach().clone())
            self.data_collator = _WithStates(self.data_collator)
        self.noise_head = NoiseHead(config.hidden_size, head.weight.shape[0], rank=noise_rank, sigma0=sigma0,
                                    sigma_max=sigma_max if constraint in ("bound", "both") else None)
        self.noise_head.to(self.args.device)
        self.noisy_reference = distribute_noise_head(_NoisyReference(self.noise_head), self.accelerator)
        self.add_callback(_ZeroNoiseGrad(self.noise_head))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the clean DPO loss against the clean reference
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        policy_chosen, policy_rejected = self.policy_logps(model, inputs)  # (B,) each
        if self.schedule == "alternating":  # k head steps against the policy as it is, then its step
            for _ in range(self.head_steps):
                self._head_step(inputs, policy_chosen, policy_rejected)
            with torch.no_grad():
                noisy = self.noisy_reference_logps(inputs)
        else:
            noisy = self.noisy_reference_logps(inputs)
        policy_losses, noise_loss = self._objective(policy_chosen, policy_rejected, noisy)
        weights = inputs["weight"]
        loss = self.weighted_loss(policy_losses, weights, num_items_in_batch)
        if self.schedule == "joint":
            # The noise loss is a mean over this micro-batch: give it this micro-batch's share of the
            # step, so gradient accumulation sums it to the step's mean (as `weighted_loss` does).
            share = 1.0 if num_items_in_batch is None else (
                weights.sum() * self.accelerator.num_processes / num_items_in_batch.clamp(min=1e-12))
            # The returned value is the policy's loss (what `loss` in the logs means, as for DPO); the
            # noise loss only adds its gradient here and is logged on its own as npo/noise_loss.
            noise_term = noise_loss - noise_loss.detach()  # value 0, gradient of noise_loss
            loss = loss + share * noise_term
        self.store_metrics(policy_chosen, policy_rejected, noisy.chosen, noisy.rejected_logps.detach())
        self.store_noise_metrics(policy_chosen, policy_rejected, noisy, noise_loss)
        return (loss, {"losses": policy_losses.detach()}) if return_outputs else loss

    def _objective(self, policy_chosen, policy_rejected, noisy: NoisyReference):
        return npo_objective(policy_chosen.sum, policy_rejected.sum, noisy.chosen.sum, noisy.rejected,
                             noisy.penalised_sq, beta=self.beta, noise_penalty=self.noise_penalty,
                             objective=self.objective, clean_reference_rejected_logps=noisy.clean_rejected.sum)

    def _head_step(self, inputs, policy_chosen, policy_rejected) -> None:
        """One update of the noise head alone (schedule "alternating"), against the policy detached."""
        if self.head_optimizer is None:
            self.head_optimizer = torch.optim.AdamW(self.noise_head.parameters(), lr=self._head_lr(), weight_decay=0.0)
        for group in self.head_optimizer.param_groups:  # the policy's schedule, at the head's rate
            group["lr"] = self._head_lr() * self._schedule_factor()
        noisy = self.noisy_reference_logps(inputs)
        detached = [SequenceLogps(x.sum.detach(), x.count) for x in (policy_chosen, policy_rejected)]
        _, noise_loss = self._objective(*detached, noisy)
        self.head_optimizer.zero_grad(set_to_none=True)
        noise_loss.backward()
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)

    def _head_lr(self) -> float:
        return self.noise_lr or self.args.learning_rate

    def _schedule_factor(self) -> float:
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is None or not self.args.learning_rate:
            return 1.0
        return scheduler.get_last_lr()[0] / self.args.learning_rate

    def store_noise_metrics(self, policy_chosen, policy_rejected, noisy: NoisyReference, noise_loss) -> None:
        """What the noise does to this micro-batch (issue 20): how far it moves the margin and the DPO
        weights, σ at the rejected tokens beside σ over V, and (every logging step) the gradient norms
        of the head's two terms."""
        effect = (self.beta * (noisy.rejected.detach() - noisy.clean_rejected.sum)).float()  # M_noisy − M_clean
        noisy_margin = self.beta * ((policy_chosen.sum - noisy.chosen.sum) - (policy_rejected.sum - noisy.rejected)).detach()
        weight_noisy, weight_clean = torch.sigmoid(-noisy_margin), torch.sigmoid(-(noisy_margin - effect))
        moved = ((weight_noisy - weight_clean).abs() > WEIGHT_MOVED_FRACTION * weight_clean).float()
        # The same against each side's batch mean: a noise that scales every pair's weight alike only
        # rescales the step's gradient, which Adam's normalisation undoes; this counts what it reorders.
        relative_noisy, relative_clean = weight_noisy / weight_noisy.mean(), weight_clean / weight_clean.mean()
        relative_moved = ((relative_noisy - relative_clean).abs() > WEIGHT_MOVED_FRACTION * relative_clean).float()
        metrics = self._metrics["train"]
        metrics["npo/margin_effect"].append(effect.abs().mean())
        metrics["npo/margin_effect_max"].append(effect.abs().max() if effect.numel() else effect.new_zeros(()))
        metrics["npo/weight_moved"].append(moved.mean())
        metrics["npo/relative_weight_moved"].append(relative_moved.mean())
        metrics["npo/weight_ratio"].append((weight_noisy.mean() / weight_clean.mean()).float())
        metrics["npo/sigma_mean"].append(noisy.sigma_mean.detach().float())
        metrics["npo/sigma_target"].append(noisy.target_sigma.detach().float().mean()
                                           if noisy.target_sigma.numel() else noisy.sigma_mean.new_zeros(()))
        metrics["npo/noise_loss"].append(noise_loss.detach().float())
        self._step_effects.append(torch.stack([effect.abs().mean(), metrics["npo/margin_effect_max"][-1],
                                               moved.mean(), relative_moved.mean()]).detach())
        every = self.grad_norm_every or self.args.logging_steps
        if every and self.state.global_step % every == 0 and noisy.replay is not None:
            loss_norm, penalty_norm = self.head_term_grad_norms(policy_chosen, policy_rejected, noisy)
            metrics["npo/grad_norm_loss"].append(loss_norm)
            metrics["npo/grad_norm_penalty"].append(penalty_norm)

    def head_term_grad_norms(self, policy_chosen, policy_rejected, noisy: NoisyReference):
        """Gradient norms over the head's parameters of its two terms, the −ℓ(M) part (eq10: the
        ℓ(M_noisy) part) and the α_σ·penalty part, from a separate pass on the bare head (recomputing
        chunks, on an independent draw of ε; the global RNG is left as it was)."""
        fn, args, kwargs = noisy.replay
        params = [p for p in self.noise_head.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            out = fn(*args, self.noise_head, **{**kwargs, "save_bytes": 0, "with_target_sigma": True})
            rejected, sq_sum_or_mean, target = out[0], out[1], out[3]
            if noisy.per_token:  # token logps from cached states: sum per pair and take means
                rejected = rejected.new_zeros(noisy.rows_count).index_add(0, noisy.rows, rejected)
                sq_mean = sq_sum_or_mean / max(int(noisy.rows.shape[0]) * self.noise_head.vocab_size, 1)
            else:
                sq_mean = sq_sum_or_mean
            penalised = sq_mean if self.penalty_over == "vocab" else target.square().mean()
            ratio = policy_chosen.sum.detach() - noisy.chosen.sum
            margin = self.beta * (ratio - (policy_rejected.sum.detach() - rejected))
            loss_term = F.logsigmoid(margin).mean() if self.objective == "minmax" else -F.logsigmoid(margin).mean()
            norms = []
            for term in (loss_term, self.noise_penalty * penalised):
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) \
                    if term.requires_grad else [None] * len(params)
                norms.append(torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None),
                                            torch.zeros((), device=margin.device))))
        return norms[0].detach(), norms[1].detach()

    def npo_summary(self) -> dict:
        """Over every training micro-batch: mean and max of |M_noisy − M_clean| (the issue's bar: the
        noise acts when the mean is clearly non-zero), and the shares of pairs whose DPO weight moved
        by > 10 %, absolutely and relative to the batch's mean weight."""
        if not self._step_effects:
            return {}
        effects = torch.stack(self._step_effects).float()
        return {"margin_effect": float(effects[:, 0].mean()), "margin_effect_max": float(effects[:, 1].max()),
                "weight_moved": float(effects[:, 2].mean()), "relative_weight_moved": float(effects[:, 3].mean()),
                "micro_batches": int(effects.shape[0])}

    def reference_logps(self, inputs) -> tuple[SequenceLogps, SequenceLogps]:
        """The hook of PreferenceTrainer: (clean chosen, noisy rejected) in training, clean otherwise."""
        if not self.model.training:
            return super().reference_logps(inputs)
        noisy = self.noisy_reference_logps(inputs)
        return noisy.chosen, noisy.rejected_logps

    def pair_seeds(self, inputs) -> list[int] | None:
        """resample "pair_epoch": one ε seed per pair, from its rejected tokens, the run's seed and the
        epoch, so a pair sees the same noise at every step of an epoch (None: ε afresh each step)."""
        if self.resample != "pair_epoch":
            return None
        half = inputs["input_ids"].shape[0] // 2
        epoch = int(self.state.epoch or 0)
        ids, mask = inputs["input_ids"][half:].cpu(), inputs["attention_mask"][half:].cpu().bool()
        salt = (self.args.seed * 0x9E3779B1) & 0xFFFFFFFF
        return [((zlib.crc32(row[keep].numpy().tobytes()) ^ salt) << 20) | (epoch & 0xFFFFF)
                for row, keep in zip(ids, mask)]

    def noisy_reference_logps(self, inputs) -> NoisyReference:
        """The reference's side of an NPO step: clean chosen, noisy rejected (with a graph to the noise
        head only), clean rejected, and σ's statistics. One no-grad reference forward on the rejected
        half (on both halves when the reference columns are not precomputed)."""
        labels = inputs["labels"]  # (2B, T)
        half = labels.shape[0] // 2
        precomputed = all(column in inputs for column in REFERENCE_COLUMNS)
        if STATES_COLUMN in inputs and precomputed:
            return self._noisy_from_cached_states(inputs)
        rows = slice(half, None) if precomputed else slice(None)
        with torch.no_grad(), self.reference_context() as reference:
            unwrapped = self.accelerator.unwrap_model(reference)
            model_inputs = {k: inputs[k][rows] for k in ("input_ids", "attention_mask") if k in inputs}
            outputs = reference(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            hidden = outputs.hidden_states[-1]  # (r, T, d), after the final norm
            lm_head = unwrapped.get_output_embeddings()
            weight, bias = lm_head.weight, lm_head.bias
            if precomputed:
                counts = response_counts(labels[:half])
                chosen = SequenceLogps(inputs["reference_chosen_logps"], counts)
                clean_rejected = SequenceLogps(inputs["reference_rejected_logps"], response_counts(labels[half:]))
            else:
                chosen = sequence_logps_from_hidden(hidden[:half], weight, labels[:half], bias=bias,
                                                    chunk_size=self.chunk_size, softcap=self.logit_softcap)
                hidden = hidden[half:]
                clean_rejected = sequence_logps_from_hidden(hidden, weight, labels[half:], bias=bias,
                                                            chunk_size=self.chunk_size, softcap=self.logit_softcap)
        rejected_labels = labels[half:]
        # hidden[:, t] predicts label t+1: align them as noisy_sequence_logps expects.
        args = (hidden[:, :-1], rejected_labels[:, 1:], weight)
        kwargs = dict(lm_bias=bias, chunk_size=self.noise_chunk_size, pair_seeds=self.pair_seeds(inputs),
                      softcap=self.logit_softcap)
        logps, sigma_sq, sigma_mean, target_sigma = self.noisy_reference(
            noisy_sequence_logps, *args, with_target_sigma=True, **kwargs)
        return NoisyReference(chosen, logps, SequenceLogps(logps, response_counts(rejected_labels)), clean_rejected,
                              self._penalised(sigma_sq, target_sigma), sigma_mean, target_sigma,
                              replay=(noisy_sequence_logps, args, kwargs))

    def _penalised(self, vocab_sq_mean, target_sigma):
        """The mean of σ² the penalty weighs: over all of V (the paper's mean σ²), or over the
        rejected response's own tokens."""
        if self.penalty_over == "vocab":
            return vocab_sq_mean
        return target_sigma.square().mean() if target_sigma.numel() else vocab_sq_mean

    def _noisy_from_cached_states(self, inputs):
        """`noisy_reference_logps` from the states cached per pair: no reference forward."""
        labels = inputs["labels"]
        half = labels.shape[0] // 2
        rejected_labels = labels[half:]
        shifted = rejected_labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        rows = mask.nonzero(as_tuple=True)[0]  # (N,)
        states = inputs[STATES_COLUMN]  # (N, d): concatenated per pair, in the batch's order
        if states.shape[0] != rows.shape[0]:
            raise RuntimeError(f"{states.shape[0]} cached reference states for {rows.shape[0]} rejected tokens")
        weight, bias = (t if t is None else t.to(states.device) for t in self.reference_lm_head)
        seeds = self.pair_seeds(inputs)
        args = (states, shifted[mask], weight)
        kwargs = dict(lm_bias=bias, chunk_size=self.noise_chunk_size, softcap=self.logit_softcap,
                      noise_keys=None if seeds is None else (seeds, rows))
        token_logps, sq_sum, sigma_sum, target_sigma = self.noisy_reference(
            noisy_token_logps, *args, with_target_sigma=True, **kwargs)
        logps = token_logps.new_zeros(half).index_add(0, rows, token_logps)
        count = max(int(rows.shape[0]) * self.noise_head.vocab_size, 1)
        chosen = SequenceLogps(inputs["reference_chosen_logps"], response_counts(labels[:half]))
        clean_rejected = SequenceLogps(inputs["reference_rejected_logps"], response_counts(rejected_labels))
        return NoisyReference(chosen, logps, SequenceLogps(logps, response_counts(rejected_labels)), clean_rejected,
                              self._penalised(sq_sum / count, target_sigma), sigma_sum / count, target_sigma,
                              replay=(noisy_token_logps, args, kwargs), per_token=True, rows=rows, rows_count=half)

    @torch.no_grad()
    def with_rejected_states(self, pairs: list[dict]) -> list[dict]:
        """Copies of `pairs` with `reference_rejected_states` (n, d): the reference's (= the initial
        policy's) last hidden states that predict each rejected response token, in the model's dtype."""
        batch_size = self.args.per_device_eval_batch_size
        out = [dict(pair) for pair in pairs]
        was_training = self.model.training
        self.model.eval()
        with self.reference_context(policy_is_reference=True) as reference:
            device = next(self.accelerator.unwrap_model(reference).parameters()).device
            for start in range(0, len(pairs), batch_size):
                batch = {k: v.to(device) for k, v in self.data_collator(pairs[start:start + batch_size]).items()}
                half = batch["labels"].shape[0] // 2
                outputs = reference(input_ids=batch["input_ids"][half:], attention_mask=batch["attention_mask"][half:],
                                    use_cache=False, output_hidden_states=True, logits_to_keep=1)
                states, _, sequences = response_states(outputs.hidden_states[-1], batch["labels"][half:])
                counts = torch.bincount(sequences, minlength=half).tolist()
                for offset, part in enumerate(states.split(counts)):
                    out[start + offset][STATES_COLUMN] = part.cpu().clone()
        self.model.train(was_training)
        return out

    # ------------------------------------------------------------------ optimizer and checkpoints
    def create_optimizer(self, model=None):
        """The Trainer's optimizer plus one param group for the noise head (its own lr, no decay)."""
        optimizer = super().create_optimizer(model)
        # "alternating" steps the head with its own optimizer (`_head_step`); "joint" in this one.
        if self.schedule == "joint" and not any(group.get("noise_head") for group in optimizer.param_groups):
            optimizer.add_param_group({"params": list(self.noise_head.parameters()), "weight_decay": 0.0,
                                       "lr": self.noise_lr or self.args.learning_rate, "noise_head": True})
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {k: _full(v).detach().cpu().contiguous() for k, v in self.noise_head.state_dict().items()}
        if self.args.should_save:
            from safetensors.torch import save_file

            save_file(state, os.path.join(output_dir, NOISE_HEAD_FILE))
            if self.head_optimizer is not None:
                save_file(_optimizer_tensors(self.head_optimizer, self.noise_head),
                          os.path.join(output_dir, NOISE_OPTIMIZER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, NOISE_HEAD_FILE) if checkpoint else None
        if path and os.path.exists(path):
            from safetensors.torch import load_file

            state = load_file(path, device=str(_local(next(self.noise_head.parameters())).device))
            with torch.no_grad():
                for name, tensor in self.noise_head.state_dict().items():
                    _copy_full_into(tensor, state[name])  # in place: the optimizer holds these tensors
        path = os.path.join(checkpoint, NOISE_OPTIMIZER_FILE) if checkpoint else None
        if path and os.path.exists(path) and self.schedule == "alternating":
            from safetensors.torch import load_file

            self.head_optimizer = torch.optim.AdamW(self.noise_head.parameters(), lr=self._head_lr(), weight_decay=0.0)
            _load_optimizer_tensors(self.head_optimizer, self.noise_head, load_file(path))


@dataclass
class NoisyReference:
    """The reference's side of one NPO micro-batch (`NPOTrainer.noisy_reference_logps`)."""

    chosen: SequenceLogps  # clean reference, chosen side (B,)
    rejected: torch.Tensor  # noisy reference log π̃_ref(y_l) (B,), graph to the head
    rejected_logps: SequenceLogps  # the same with its token counts
    clean_rejected: SequenceLogps  # clean reference log π_ref(y_l) (B,)
    penalised_sq: torch.Tensor  # the mean σ² the penalty weighs (over V or over the target tokens)
    sigma_mean: torch.Tensor  # mean σ over the N × V entries
    target_sigma: torch.Tensor  # σ at each rejected response token's own id (N,)
    replay: tuple | None = None  # (fn, args, kwargs) to recompute the noisy pass (gradient diagnostics)
    per_token: bool = False  # replay returns token log-probs (cached states) rather than sequences
    rows: torch.Tensor | None = None  # the pair of each token (per_token)
    rows_count: int = 0


def _optimizer_tensors(optimizer: torch.optim.Optimizer, head: torch.nn.Module) -> dict:
    """AdamW's state of the head as flat tensors (safetensors, so loading runs no code)."""
    names = {id(p): n for n, p in head.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}.{key}"] = _full(torch.as_tensor(value)).detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, head: torch.nn.Module, tensors: dict) -> None:
    for name, param in head.named_parameters():
        state = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == name}
        if state:
            optimizer.state[param] = {k: v.to(_local(param).device) if v.dim() else v for k, v in state.items()}


class _NoisyReference(torch.nn.Module):
    """The noise head's part of a step as one module call, `module(fn, states, targets, lm_weight,
    **kw) = fn(states, targets, lm_weight, head, **kw)`, so that a data-parallel wrapper sees the
    head used in its forward: DDP then averages its gradients over the processes (it is not part of
    the policy, which accelerate wraps), FSDP gathers its shards before and reduce-scatters its
    gradients after (`distribute_noise_head`)."""

    def __init__(self, head: NoiseHead):
        super().__init__()
        self.head = head

    def forward(self, fn, states, targets, lm_weight, **kwargs):
        return fn(states, targets, lm_weight, self.head, **kwargs)


def distribute_noise_head(module: _NoisyReference, accelerator):
    """The noise head wrapped like the policy: one process -> as is; FSDP -> sharded with FSDP2
    `fully_shard` over all processes (its d×V weight split by rows, as FSDP splits the LM head);
    other multi-process setups (DDP, DeepSpeed) -> DistributedDataParallel, so every rank applies
    the same averaged update (without it each rank would train its own head on its own pairs)."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes <= 1:
        return module
    if accelerator.distributed_type == DistributedType.FSDP:
        return shard_noise_head(module)
    device = next(module.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def shard_noise_head(module: _NoisyReference) -> _NoisyReference:
    """FSDP2 over every process of the default group, on the module's device type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = next(module.parameters()).device.type
    fully_shard(module, mesh=init_device_mesh(device_type, (dist.get_world_size(),)))
    return module


def _local(tensor):
    """The local shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor):
    """The whole tensor of an FSDP2 (DTensor) parameter (a collective), the tensor itself otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _copy_full_into(tensor, full) -> None:
    """Copy a whole tensor into a parameter, sharded the way the parameter is when it is a DTensor."""
    if hasattr(tensor, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(_local(tensor).device), tensor.device_mesh, tensor.placements).to_local()
        tensor = tensor.to_local()
    tensor.copy_(full)


class _ZeroNoiseGrad(TrainerCallback):
    """The Trainer zeroes the model's gradients after each optimizer step, not the optimizer's:
    without this the head's gradients would accumulate across steps."""

    def __init__(self, head: NoiseHead):
        self.head = head

    def on_step_end(self, args, state, control, **kwargs):
        self.head.zero_grad(set_to_none=True)


class _WithStates:
    """The pair collator, plus the cached reference states of the batch's rejected responses
    concatenated in batch order (N, d): the order of `response_states` over the rejected rows."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        if all(STATES_COLUMN in f for f in features):
            batch[STATES_COLUMN] = torch.cat([f[STATES_COLUMN] for f in features])
        return batch
