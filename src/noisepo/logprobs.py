"""Sequence log-probs of responses (METHODS §1), without materialising float32 logits.

`log π(y|x) = Σ_t log π(y_t | x, y_<t)` over the response tokens only: the labels are the input
ids with prompt and padding set to -100 (the Hugging Face convention: position t of the hidden
states predicts label t+1). One pass returns the sum and the token count, so both the summed
value (DPO & co.) and the length-averaged one (IPO) come from the same forward.

Memory: the naive `log_softmax(logits.float())` holds a (B, T, V) float32 tensor (and its
gradient). Here only response positions are projected through the LM head, in chunks of
`chunk_size` positions (default: about 128 MiB of float32 logits), by an autograd function that
keeps just the per-token logsumexp and recomputes each chunk's logits in the backward pass; peak
extra memory is one (chunk, V) block.
The logits of a chunk are computed in the weights' dtype and then upcast, which is exactly what
`model(...).logits.float()` would give. Gemma-2's final soft-capping, logits = c·tanh(h Wᵀ / c), is
applied to each chunk in float32 (`softcap`): such models keep this path too (the model's own
logits would be the (B, T, V) tensor this module avoids).

`sequence_logps_from_hidden(hidden, lm_head_weight, labels)` is the building block; NPO
(METHODS §4.2) reuses `response_states` to read the reference's hidden states of the rejected side.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
IGNORE_INDEX = -100
# Positions per LM-head chunk when not given: about 128 MiB of float32 logits per chunk.
CHUNK_BYTES = 2**27
DEFAULT_CHUNK_SIZE = None

# Config attributes of models whose logits are not `hidden @ lm_head.T` up to a final soft-cap
# (Cohere's and Granite's scaling...): those go through the model's own logits, chunked.
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
# logits = c·tanh(hidden @ lm_head.T / c) (Gemma-2): applied by this module (`softcap`).
SOFTCAP_ATTRIBUTE = "final_logit_softcapping"


@dataclass
class SequenceLogps:
    """Per-sequence response log-probs: `sum` (N,) and the response token `count` (N,)."""

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        """Length-averaged log-prob, (N,); 0 for a sequence without response tokens."""
        return self.sum / self.count.clamp(min=1)

    def reduce(self, kind: str) -> Tensor:
        """`"sum"` or `"mean"` (what `noisepo.losses.LOSS_INPUTS` asks for)."""
        return getattr(self, kind)

    def split(self) -> tuple[SequenceLogps, SequenceLogps]:
        """The first and second halves (chosen, rejected of a concatenated batch)."""
        (s1, s2), (c1, c2) = self.sum.chunk(2), self.count.chunk(2)
        return SequenceLogps(s1, c1), SequenceLogps(s2, c2)

    def detach(self) -> SequenceLogps:
        return SequenceLogps(self.sum.detach(), self.count)


def response_states(hidden: Tensor, labels: Tensor, sequence_ids: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The hidden states that predict a response token.

    hidden (R, T, d), labels (R, T) -> states (N, d), targets (N,), sequences (N,): N response
    tokens, `states[k]` predicts `targets[k]`, which belongs to sequence `sequences[k]`. A
    sequence is a row, or with packed rows (`sequence_ids` (R, T), see
    `noisepo.training.collate.PackedPreferenceCollator`) the id given per token.
    """
    shifted = labels[:, 1:]  # (R, T-1): label t+1 is predicted at position t
    mask = shifted != IGNORE_INDEX
    if sequence_ids is None:
        sequences = torch.nonzero(mask, as_tuple=True)[0]
    else:
        sequences = sequence_ids[:, 1:][mask]
    return hidden[:, :-1][mask], shifted[mask], sequences


def number_of_sequences(labels: Tensor, sequence_ids: Tensor | None = None) -> int:
    return labels.shape[0] if sequence_ids is None else int(sequence_ids.max()) + 1


def response_counts(labels: Tensor, sequence_ids: Tensor | None = None) -> Tensor:
    """Response tokens per sequence, (S,)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    sequences = torch.nonzero(mask, as_tuple=True)[0] if sequence_ids is None else sequence_ids[:, 1:][mask]
    return torch.bincount(sequences, minlength=number_of_sequences(labels, sequence_ids))


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(cap(states @ weight.T + bias))[target] per row, in chunks of rows; (N,) float32.
    cap is the identity, or with `softcap` c, x -> c·tanh(x / c).

    Saves only the per-row logsumexp; the backward recomputes a chunk's logits and uses
    d logp / d logits = onehot(target) − softmax (times cap' = 1 − tanh² when capped).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, states, weight, bias, targets, chunk_size, softcap=None):
        logps = torch.empty(states.shape[0], dtype=_accumulation_dtype(weight), device=states.device)
        lse = torch.empty_like(logps)
        for start in range(0, states.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _capped(_chunk_logits(states[rows], weight, bias), softcap)  # (n, V) float32
            lse[rows] = torch.logsumexp(logits, dim=-1)
            logps[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return logps

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_logps):
        states, weight, bias, targets, lse = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_states = torch.zeros_like(states) if need_states else None
        acc = _accumulation_dtype(weight)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        for start in range(0, states.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            capped = _capped(_chunk_logits(states[rows], weight, bias), ctx.softcap)  # (n, V)
            slope = None if ctx.softcap is None else 1 - (capped / ctx.softcap).square()  # d cap / d logits
            probs = capped.sub_(lse[rows, None]).exp_()
            grad_logits = probs.mul_(-grad_logps[rows, None])
            grad_logits.scatter_add_(1, targets[rows, None], grad_logps[rows, None])
            if slope is not None:
                grad_logits.mul_(slope)
            if need_states:
                grad_states[rows] = (grad_logits.to(weight.dtype) @ weight).to(states.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, states[rows].to(acc))
            if need_bias:
                grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_states, grad_weight, grad_bias, None, None, None


def _capped(logits: Tensor, softcap: float | None) -> Tensor:
    """c·tanh(logits / c) (Gemma-2's final soft-capping, in place), or `logits` when `softcap` is None."""
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def _accumulation_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 in gradient checks


def _chunk_logits(states: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(n, d) @ (V, d).T in the weights' dtype (as the model's LM head), then float32: (n, V)."""
    logits = states.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(_accumulation_dtype(weight))


def chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Positions per chunk: `chunk_size`, or as many as fit CHUNK_BYTES of float32 logits."""
    return chunk_size if chunk_size else max(16, CHUNK_BYTES // (4 * vocab_size))


def token_logps_from_hidden(states: Tensor, lm_head_weight: Tensor, targets: Tensor, *,
                            bias: Tensor | None = None, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                            softcap: float | None = None) -> Tensor:
    """log softmax(cap(states @ W.T + b))[targets]: states (N, d), W (V, d), targets (N,) -> (N,) float32;
    cap(x) = softcap·tanh(x / softcap), or x when `softcap` is None."""
    return _ChunkedTokenLogps.apply(states, lm_head_weight, bias, targets,
                                    chunk_rows(lm_head_weight.shape[0], chunk_size), softcap)


def sequence_logps_from_hidden(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *,
                               bias: Tensor | None = None, sequence_ids: Tensor | None = None,
                               chunk_size: int | None = DEFAULT_CHUNK_SIZE, softcap: float | None = None
                               ) -> SequenceLogps:
    """Response log-probs from the last hidden states and the LM head weight.

    hidden (R, T, d) (after the final norm), lm_head_weight (V, d), labels (R, T) with -100 on
    prompt and padding -> SequenceLogps(sum (S,) float32, count (S,)), S = R sequences, or with
    packed rows the number of `sequence_ids`. Only response positions are projected,
    `chunk_size` at a time; the (R, T, V) logits never exist. `softcap`: Gemma-2's final logit
    soft-capping c (`logit_softcap(model)`), logits = c·tanh(hidden @ W.T / c).
    """
    states, targets, sequences = response_states(hidden, labels, sequence_ids)
    token_logps = token_logps_from_hidden(states, lm_head_weight, targets, bias=bias, chunk_size=chunk_size,
                                          softcap=softcap)
    return _per_sequence(token_logps, sequences, number_of_sequences(labels, sequence_ids))


def sequence_logps(logits: Tensor, labels: Tensor, *, sequence_ids: Tensor | None = None,
                   chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> SequenceLogps:
    """Response log-probs from full logits (R, T, V) of any dtype and labels (R, T).

    Upcasts one chunk of response positions at a time; used for models whose logits are not a
    plain projection of the hidden states. -> SequenceLogps(sum (S,) float32, count (S,)).
    """
    response_logits, targets, sequences = response_states(logits, labels, sequence_ids)  # (N, V), (N,)
    parts = []
    chunk_size = chunk_rows(logits.shape[-1], chunk_size)
    for start in range(0, targets.shape[0], chunk_size):
        chunk = response_logits[start:start + chunk_size]
        chunk = chunk.to(torch.promote_types(chunk.dtype, torch.float32))
        target = targets[start:start + chunk_size, None]
        parts.append(chunk.gather(1, target).squeeze(1) - torch.logsumexp(chunk, dim=-1))
    token_logps = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    return _per_sequence(token_logps, sequences, number_of_sequences(labels, sequence_ids))


def _per_sequence(token_logps: Tensor, sequences: Tensor, size: int) -> SequenceLogps:
    total = token_logps.new_zeros(size).index_add(0, sequences, token_logps)  # (S,)
    count = torch.bincount(sequences, minlength=size)  # (S,)
    return SequenceLogps(total, count)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def logit_softcap(model) -> float | None:
    """c of a final logit soft-capping, logits = c·tanh(hidden @ W.T / c) (Gemma-2's 30), else None."""
    cap = getattr(_text_config(model), SOFTCAP_ATTRIBUTE, None)
    return float(cap) if cap else None


def has_plain_lm_head(model) -> bool:
    """Whether `logits == cap(last_hidden @ lm_head.weight.T (+ bias))`, so the hidden path is exact;
    cap is the identity or the final soft-capping (`logit_softcap`), which the hidden path applies."""
    config = _text_config(model)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False  # e.g. a PEFT adapter on the LM head: its weight alone is not the projection
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def model_sequence_logps(model, inputs: dict, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE, unwrapped=None,
                         return_hidden: bool = False):
    """Forward `model` once on a batch and return the response SequenceLogps (S,).

    `inputs`: `input_ids`, `labels` (R, T) and either `attention_mask` (padded rows) or
    `position_ids` + `sequence_ids` (packed rows: transformers builds the block-diagonal causal
    mask from position ids that restart at 0). `model` is called as is (so DDP/accelerate
    wrappers see the forward); `unwrapped` is the bare model, used to reach the LM head. With a
    plain LM head (soft-capped or not) the model computes logits for one position only
    (`logits_to_keep=1`) and the log-probs come from the final hidden states; otherwise from the
    model's logits, chunked.
    With `return_hidden`, returns (SequenceLogps, hidden (R, T, d)), e.g. for NPO.
    """
    unwrapped = model if unwrapped is None else unwrapped
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    labels, sequence_ids = inputs["labels"], inputs.get("sequence_ids")
    if has_plain_lm_head(unwrapped):
        outputs = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1]  # (R, T, d), after the final norm
        head = unwrapped.get_output_embeddings()
        result = sequence_logps_from_hidden(hidden, head.weight, labels, bias=head.bias, sequence_ids=sequence_ids,
                                            chunk_size=chunk_size, softcap=logit_softcap(unwrapped))
    else:
        outputs = model(**model_inputs, use_cache=False, output_hidden_states=return_hidden)
        hidden = outputs.hidden_states[-1] if return_hidden else None
        result = sequence_logps(outputs.logits, labels, sequence_ids=sequence_ids, chunk_size=chunk_size)
    return (result, hidden) if return_hidden else result
