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

import torch
from transformers import TrainerCallback

from noisepo.logprobs import (
    IGNORE_INDEX,
    SequenceLogps,
    has_plain_lm_head,
    response_counts,
    response_states,
    sequence_logps_from_hidden,
)
from noisepo.noise import NoiseHead, noisy_sequence_logps, noisy_token_logps, npo_objective
from noisepo.training.collate import REFERENCE_COLUMNS
from noisepo.training.preference import PreferenceTrainer

NOISE_HEAD_FILE = "noise_head.safetensors"
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
    `sigma0` (σ at the start, 0.01), `noise_penalty` (α_σ, 1.0), `noise_lr` (the head's learning
    rate; default the policy's), `noise_chunk_size` (response positions per chunk of the noisy
    log-softmax; None: blocks of about 16 MiB, `noisepo.noise.noise_chunk_rows`).
    `cache_reference_states` (True: compute the rejected side's reference hidden states once, keep
    them per pair, drop the reference model; False: run the reference on the rejected half every
    step; "auto", the default: cache when no `ref_model` is given, the reference is precomputed and
    the states fit `CACHE_STATES_BUDGET_BYTES`). The reference is the initial policy (a frozen copy
    kept here), the `ref_model` given, or PEFT's base model.
    """

    def __init__(self, model, args, train_dataset, *, noise_rank: int | None = None, sigma0: float = 0.01,
                 noise_penalty: float = 1.0, noise_lr: float | None = None, noise_chunk_size: int | None = None,
                 cache_reference_states: bool | str = "auto", **kwargs):
        if kwargs.get("loss", "dpo") != "dpo":
            raise ValueError(f"NPO is defined on the DPO loss (METHODS §4.2), got loss={kwargs['loss']!r}")
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
        self.noise_penalty = noise_penalty
        self.noise_lr = noise_lr
        self.noise_chunk_size = noise_chunk_size
        self.cache_reference_states = cache_reference_states
        if not has_plain_lm_head(model):
            raise ValueError("NPO needs a model whose logits are hidden @ lm_head.T (no softcap or scaling)")
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
        self.noise_head = NoiseHead(config.hidden_size, head.weight.shape[0], rank=noise_rank, sigma0=sigma0)
        self.noise_head.to(self.args.device)
        self.noisy_reference = distribute_noise_head(_NoisyReference(self.noise_head), self.accelerator)
        self.add_callback(_ZeroNoiseGrad(self.noise_head))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the clean DPO loss against the clean reference
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        policy_chosen, policy_rejected = self.policy_logps(model, inputs)  # (B,) each
        reference_chosen, noisy_rejected, sigma_sq, sigma_mean = self.noisy_reference_logps(inputs)
        policy_losses, noise_loss = npo_objective(
            policy_chosen.sum, policy_rejected.sum, reference_chosen.sum, noisy_rejected.sum, sigma_sq,
            beta=self.beta, noise_penalty=self.noise_penalty)
        weights = inputs["weight"]
        # The noise loss is a mean over this micro-batch: give it this micro-batch's share of the
        # step, so gradient accumulation sums it to the step's mean (as `weighted_loss` does).
        share = 1.0 if num_items_in_batch is None else (
            weights.sum() * self.accelerator.num_processes / num_items_in_batch.clamp(min=1e-12))
        # The returned value is the policy's loss (what `loss` in the logs means, as for DPO); the
        # noise loss only adds its gradient here and is logged on its own as npo/noise_loss.
        noise_term = noise_loss - noise_loss.detach()  # value 0, gradient of noise_loss
        loss = self.weighted_loss(policy_losses, weights, num_items_in_batch) + share * noise_term
        self.store_metrics(policy_chosen, policy_rejected, reference_chosen, noisy_rejected.detach())
        self._metrics["train"]["npo/sigma_mean"].append(sigma_mean.detach().float())
        self._metrics["train"]["npo/noise_loss"].append(noise_loss.detach().float())
        return (loss, {"losses": policy_losses.detach()}) if return_outputs else loss

    def reference_logps(self, inputs) -> tuple[SequenceLogps, SequenceLogps]:
        """The hook of PreferenceTrainer: (clean chosen, noisy rejected) in training, clean otherwise."""
        if not self.model.training:
            return super().reference_logps(inputs)
        chosen, rejected, _, _ = self.noisy_reference_logps(inputs)
        return chosen, rejected

    def noisy_reference_logps(self, inputs):
        """-> (reference chosen SequenceLogps (B,), noisy reference rejected SequenceLogps (B,) with a
        graph to the noise head only, mean σ², mean σ). One no-grad reference forward on the rejected
        half (on both halves when the chosen column is not precomputed)."""
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
            else:
                chosen = sequence_logps_from_hidden(hidden[:half], weight, labels[:half], bias=bias,
                                                    chunk_size=self.chunk_size)
                hidden = hidden[half:]
        rejected_labels = labels[half:]
        # hidden[:, t] predicts label t+1: align them as noisy_sequence_logps expects.
        logps, sigma_sq, sigma_mean = self.noisy_reference(
            noisy_sequence_logps, hidden[:, :-1], rejected_labels[:, 1:], weight, lm_bias=bias,
            chunk_size=self.noise_chunk_size)
        return chosen, SequenceLogps(logps, response_counts(rejected_labels)), sigma_sq, sigma_mean

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
        token_logps, sq_sum, sigma_sum = self.noisy_reference(noisy_token_logps, states, shifted[mask], weight,
                                                           lm_bias=bias, chunk_size=self.noise_chunk_size)
        logps = token_logps.new_zeros(half).index_add(0, rows, token_logps)
        count = max(int(rows.shape[0]) * self.noise_head.vocab_size, 1)
        chosen = SequenceLogps(inputs["reference_chosen_logps"], response_counts(labels[:half]))
        return chosen, SequenceLogps(logps, response_counts(rejected_labels)), sq_sum / count, sigma_sum / count

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
        if not any(group.get("noise_head") for group in optimizer.param_groups):
            optimizer.add_param_group({"params": list(self.noise_head.parameters()), "weight_decay": 0.0,
                                       "lr": self.noise_lr or self.args.learning_rate, "noise_head": True})
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {k: _full(v).detach().cpu().contiguous() for k, v in self.noise_head.state_dict().items()}
        if self.args.should_save:
            from safetensors.torch import save_file

            save_file(state, os.path.join(output_dir, NOISE_HEAD_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, NOISE_HEAD_FILE) if checkpoint else None
        if path and os.path.exists(path):
            from safetensors.torch import load_file

            state = load_file(path, device=str(_local(next(self.noise_head.parameters())).device))
            with torch.no_grad():
                for name, tensor in self.noise_head.state_dict().items():
                    _copy_full_into(tensor, state[name])  # in place: the optimizer holds these tensors


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
