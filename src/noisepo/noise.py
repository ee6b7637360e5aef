"""Noise Preference Optimization (NPO): a trainable noise head on the reference (METHODS §4.2).

For the rejected response, at each response position j the reference's logits z_j (V,) and last
hidden state g_j (d,) give

    σ_j = softplus(W_σ g_j + b_σ)          (V,)   the noise head
    z̃_j = z_j + σ_j ⊙ ε_j,  ε_j ~ N(0, I)         resampled every step (reparameterisation)
    log π̃_ref(y_l|x) = Σ_j log softmax(z̃_j)[y_l,j]

(z_j as the model gives them: for Gemma-2, soft-capped, c·tanh(g_j Wᵀ / c), the `softcap` option.)

The policy minimises ℓ(M) with the noise detached; the noise head maximises ℓ(M) with the policy
detached, under a penalty α_σ·mean(σ²). `npo_objective` returns both parts so one backward pass
trains both, each receiving gradient only from its own part.

Memory: z̃ is (positions × V). We never hold it for the whole batch: positions are processed in
chunks by `_NoisyTokenLogps`, an autograd function that keeps only each chunk's logsumexp and
recomputes its (n, V) blocks in the backward pass, drawing ε again from the chunk's own seed;
the backward is written out (dσ = g ⊙ ε + 2·g_sq·σ, du = dσ ⊙ sigmoid(u)) and works in place, so a
chunk holds a handful of (n, V) blocks. `use_checkpoint=False` is the plain-autograd reference
implementation of the same numbers (tests compare the two).

Time: recomputing a chunk in the backward costs two more (n, d, V) matmuls, a second draw of ε
and a second softplus and softmax, which on CPU at small widths is most of NPO's overhead. So the
first chunks of a call, up to `save_bytes` (default NOISE_SAVE_BYTES, 256 MiB), instead finish
their elementwise work in the forward and keep two (n, V) blocks for the backward: with the upstream
gradients g (per position) and g_sq (of Σσ²),

    du = g · (ε ⊙ sigmoid(u) ⊙ (onehot(y) − softmax(z̃))) + g_sq · (2 σ ⊙ sigmoid(u))

so the forward keeps P = ε ⊙ sigmoid(u) ⊙ softmax(z̃), Q = 2 σ ⊙ sigmoid(u) and the (n,) values of
ε ⊙ sigmoid(u) at the targets, and the backward is one pass and the head's weight-gradient matmul.
Chunks past the budget recompute as above; both give the same numbers (ε comes from the same seed).

On CPU with a float32 head, the elementwise work between the matmuls (both paths) and the draw of ε
run in compiled C (native.py: three passes a row instead of ~15, and a vectorised normal generator);
without a C compiler, or with NOISEPO_NATIVE=0, the PyTorch ops here run instead. GPUs use PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from noisepo.training.config import DEFAULT_SIGMA0

IGNORE_INDEX = -100
# Positions per chunk when not given: (chunk, V) float32 blocks of about 16 MiB. A chunk holds about
# four such blocks at once (u, σ, ε, the noisy logits or their softmax), so the extra peak is ~64 MiB
# whatever B, T and V are (V = 32k: 131 positions per chunk).
NOISE_CHUNK_BYTES = 2**24
# Bytes of (n, V) blocks a call may keep from its forward for its backward (two per saved chunk)
# instead of recomputing them: a time/memory trade, bounded whatever B, T and V are.
NOISE_SAVE_BYTES = 2**28


def noise_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    return chunk_size if chunk_size else max(16, NOISE_CHUNK_BYTES // (4 * vocab_size))


def inverse_softplus(value: float) -> float:
    """x with softplus(x) = value (> 0): log(e^value − 1), computed stably."""
    if value <= 0:
        raise ValueError(f"sigma0 must be > 0, got {value}")
    return value + math.log(-math.expm1(-value))


def inverse_bounded(value: float, sigma_max: float) -> float:
    """x with sigma_max·sigmoid(x) = value, for 0 < value < sigma_max."""
    if not 0 < value < sigma_max:
        raise ValueError(f"sigma0 must be in (0, sigma_max = {sigma_max}), got {value}")
    return math.log(value) - math.log(sigma_max - value)


class NoiseHead(nn.Module):
    """σ(g) = softplus(W g + b) ∈ R^V, with W full (V × d) or low rank (V × r)(r × d); with
    `sigma_max` the bounded (squashed) σ(g) = σ_max·sigmoid(W g + b) ∈ (0, σ_max)^V instead: the
    paper's constraint σ² < ε as a parametrisation (METHODS §4.2), so no penalty is needed to bound σ.

    Initialised so σ = σ₀ everywhere: W = 0 (for low rank the up-projection is 0 and the
    down-projection random, so gradients reach both) and b = softplus⁻¹(σ₀) (bounded: logit(σ₀/σ_max)).
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, rank: int | None = None,
                 sigma0: float = DEFAULT_SIGMA0, sigma_max: float | None = None):
        super().__init__()
        self.hidden_size, self.vocab_size, self.rank, self.sigma0 = hidden_size, vocab_size, rank, sigma0
        self.sigma_max = sigma_max
        if sigma_max is not None:
            inverse_bounded(sigma0, sigma_max)  # refuses sigma0 outside (0, sigma_max)
        if rank is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        else:
            self.down = nn.Parameter(torch.empty(rank, hidden_size))
            self.up = nn.Parameter(torch.empty(vocab_size, rank))
        self.bias = nn.Parameter(torch.empty(vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W = 0, b = softplus⁻¹(σ₀): a fresh head (DNPO starts one per iteration)."""
        with torch.no_grad():
            if self.rank is None:
                self.weight.zero_()
            else:
                nn.init.normal_(self.down, std=1.0 / math.sqrt(self.hidden_size))
                self.up.zero_()
            self.bias.fill_(inverse_softplus(self.sigma0) if self.sigma_max is None
                            else inverse_bounded(self.sigma0, self.sigma_max))

    def factors(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (..., k), U (V, k)) with W g = U a: full rank a = g, U = W; low rank a = D g, U = up."""
        hidden = hidden.to(self.bias.dtype)
        if self.rank is None:
            return hidden, self.weight
        return F.linear(hidden, self.down), self.up

    def sigma_of(self, u: torch.Tensor) -> torch.Tensor:
        """σ from the pre-activation u = W g + b: softplus, or σ_max·sigmoid when bounded."""
        return F.softplus(u) if self.sigma_max is None else self.sigma_max * torch.sigmoid(u)

    @property
    def bound(self) -> float:
        """σ_max as the kernels take it: 0.0 for the unbounded (softplus) head."""
        return 0.0 if self.sigma_max is None else float(self.sigma_max)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> σ (..., V), float32."""
        a, up = self.factors(hidden)
        return self.sigma_of(F.linear(a, up, self.bias))

    def target_sigma(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """σ at each position's own target token only: hidden (n, d), targets (n,) -> (n,), with
        gradients (n × k work, no V-wide block): what `penalty_over="response_tokens"` penalises."""
        a, up = self.factors(hidden)
        return self.sigma_of((a * up[targets]).sum(-1) + self.bias[targets])

    def extra_repr(self) -> str:
        bound = "" if self.sigma_max is None else f", sigma_max={self.sigma_max}"
        return (f"hidden={self.hidden_size}, vocab={self.vocab_size}, rank={self.rank or 'full'}, "
                f"sigma0={self.sigma0}{bound}")


def _epsilon(seed, like: torch.Tensor) -> torch.Tensor:
    """ε ~ N(0, I) shaped like `like`, from a generator seeded with `seed` (redrawn in the backward):
    on CPU in float32 the native kernels' stream when they load (native.py), else torch.randn.
    `seed` is an int (one stream for the chunk), or per-pair segments ((seed, first, count, rows), ...) in
    the chunk's row order: rows first..first+count of that pair's own (rows, V) draw (noise fixed per pair;
    the whole draw is made, since neither generator's values are a prefix of a longer draw's)."""
    if isinstance(seed, tuple):
        vocab = like.shape[-1]
        return torch.cat([_draw(pair_seed, (rows, vocab), like)[first:first + count]
                          for pair_seed, first, count, rows in seed])
    return _draw(seed, like.shape, like)


def _draw(seed: int, shape, like: torch.Tensor) -> torch.Tensor:
    kernels = _cpu_kernels(like, like, like)
    if kernels is not None:
        return kernels.normal(seed, shape)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _sigma_in_place(u: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """σ(u) written over u: softplus (sigma_max 0) or sigma_max·sigmoid(u)."""
    if sigma_max > 0:
        return u.sigmoid_().mul_(sigma_max)
    return torch.ops.aten.softplus.out(u, 1, 20, out=u)


def _sigma_and_gate(u: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ(u), dσ/du), each a new (n, V) block: softplus and sigmoid, or σ_max·s and σ·(1 − s)."""
    gate = torch.sigmoid(u)
    if sigma_max > 0:
        sigma = gate * sigma_max
        return sigma, gate.neg_().add_(1).mul_(sigma)
    return F.softplus(u), gate


def _reference_logits(states, lm_weight, lm_bias, dtype: torch.dtype, softcap: float | None = None) -> torch.Tensor:
    """(n, d) -> (n, V) in `dtype` (the noise head's, float32), computed in the weights' dtype first (as
    the model's LM head): the whole noisy path then has one dtype whatever the reference's is. With
    `softcap` c, Gemma-2's final soft-capping c·tanh(z / c): z are the reference's logits as the model
    gives them (frozen, so no gradient passes through the cap)."""
    logits = F.linear(states.to(lm_weight.dtype), lm_weight, lm_bias).to(dtype)
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def _noisy_chunk(states, targets, lm_weight, lm_bias, head: NoiseHead, seed: int, softcap: float | None = None):
    """Plain autograd: (n, d), (n,) -> noisy log-prob per position (n,), Σσ², Σσ over the chunk."""
    logits = _reference_logits(states, lm_weight, lm_bias, head.bias.dtype, softcap)  # (n, V), no gradient (frozen)
    sigma = head(states)  # (n, V)
    noisy = logits + sigma * _epsilon(seed, logits)
    target = noisy.gather(-1, targets[:, None]).squeeze(-1)
    return target - torch.logsumexp(noisy, dim=-1), sigma.pow(2).sum(), sigma.detach().sum()


class _NoisyTokenLogps(torch.autograd.Function):
    """The same numbers as `_noisy_chunk`, keeping only (n,)-sized tensors between the passes, or
    with `save` two (n, V) blocks that spare the backward its recomputation (module docstring).

    Inputs: states (n, d) and targets (n,) of the reference; lm_weight (V, d), lm_bias (V,) or
    None (frozen); the head's factors a (n, k), up (V, k) and bias (V,) (u = a upᵀ + bias,
    σ = softplus(u)); the chunk's seed; the reference's final logit soft-capping or None. Gradients go
    to a, up and bias only.
    """

    @staticmethod
    def forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed, save=False, sigma_max=0.0,
                softcap=None):
        # Autocast off in both passes: the backward must recompute exactly the forward's numbers.
        ctx.sigma_max, ctx.softcap = sigma_max, softcap
        with torch.autocast(device_type=states.device.type, enabled=False):
            if save:
                return _NoisyTokenLogps._forward_saving(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed)
            return _NoisyTokenLogps._forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed)

    @staticmethod
    def _forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed):
        kernels = _cpu_kernels(states, up, bias)
        ctx.seed, ctx.saved_blocks, ctx.native = seed, False, kernels is not None
        if kernels is not None:
            noisy, u, eps = _native_inputs(states, lm_weight, lm_bias, a, up, seed, ctx.softcap)
            logps, lse, sq, total, _ = kernels.forward(noisy, u, bias, eps, targets, ctx.sigma_max)
            del noisy, u, eps
            sq, total = sq.sum(), total.sum()
            ctx.save_for_backward(states, targets, lm_weight, lm_bias, a, up, bias, lse)
            ctx.mark_non_differentiable(total)
            return logps, sq, total
        noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype, ctx.softcap)  # (n, V)
        sigma = _sigma_in_place(F.linear(a.to(up.dtype), up, bias), ctx.sigma_max)  # σ(u), in u's storage
        eps = _epsilon(seed, noisy)
        noisy.addcmul_(sigma, eps)  # z̃ = z + σ ⊙ ε, in z's storage
        lse = _logsumexp_given_softmax(noisy, torch.softmax(noisy, dim=-1, out=eps))  # (n,)
        del eps
        logps = noisy.gather(1, targets[:, None]).squeeze(1) - lse
        sq = torch.linalg.vector_norm(sigma).square()
        total = sigma.sum()
        ctx.save_for_backward(states, targets, lm_weight, lm_bias, a, up, bias, lse)
        ctx.mark_non_differentiable(total)
        return logps, sq, total

    @staticmethod
    def _forward_saving(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed):
        """The forward, finishing the backward's elementwise work now: keeps P, Q (n, V) and the
        (n,) target values of ε ⊙ sigmoid(u) (module docstring). Four (n, V) blocks live at most, and
        every step after the matmuls and the draw of ε works in place in them."""
        kernels = _cpu_kernels(states, up, bias)
        ctx.saved_blocks, ctx.native = True, kernels is not None
        if kernels is not None:
            noisy, keep_q, keep_p = _native_inputs(states, lm_weight, lm_bias, a, up, seed, ctx.softcap)
            logps, _, sq, total, gate_at_target = kernels.forward(noisy, keep_q, bias, keep_p, targets, ctx.sigma_max)
            del noisy
            total = total.sum()
            ctx.save_for_backward(a, up, keep_p, keep_q, targets, gate_at_target)
            ctx.mark_non_differentiable(total)
            return logps, sq.sum(), total
        noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype, ctx.softcap)  # (n, V)
        sigma = F.linear(a.to(up.dtype), up, bias)  # u, (n, V)
        gate = torch.sigmoid(sigma)  # sigmoid(u)
        if ctx.sigma_max > 0:  # bounded: σ = σ_max·sigmoid(u), the gate dσ/du = σ·(1 − sigmoid(u))
            sigma.copy_(gate).mul_(ctx.sigma_max)
            gate.neg_().add_(1).mul_(sigma)
        else:
            torch.ops.aten.softplus.out(sigma, 1, 20, out=sigma)  # σ = softplus(u), in u's storage
        eps = _epsilon(seed, noisy)
        noisy.addcmul_(sigma, eps)  # z̃ = z + σ ⊙ ε, in z's storage
        sq = torch.linalg.vector_norm(sigma).square()
        total = sigma.sum()
        keep_q = sigma.mul_(gate)  # Q/2 = σ ⊙ sigmoid(u)
        keep_p = eps.mul_(gate)  # ε ⊙ sigmoid(u) for now
        column = targets[:, None]
        gate_at_target = keep_p.gather(1, column).squeeze(1)  # (n,)
        probs = torch.softmax(noisy, dim=-1, out=gate)  # softmax(z̃), in the gate's storage
        logps = noisy.gather(1, column).squeeze(1) - _logsumexp_given_softmax(noisy, probs)
        del noisy
        keep_p.mul_(probs)  # P = ε ⊙ sigmoid(u) ⊙ softmax(z̃)
        del probs, gate
        ctx.save_for_backward(a, up, keep_p, keep_q, targets, gate_at_target)
        ctx.mark_non_differentiable(total)
        return logps, sq, total

    @staticmethod
    def backward(ctx, grad_logps, grad_sq, _grad_total):
        states = ctx.saved_tensors[0]
        with torch.autocast(device_type=states.device.type, enabled=False):
            if ctx.saved_blocks:
                return _NoisyTokenLogps._backward_saved(ctx, grad_logps.float(), grad_sq.float())
            return _NoisyTokenLogps._backward(ctx, grad_logps.float(), grad_sq.float())

    @staticmethod
    def _backward(ctx, grad_logps, grad_sq):
        states, targets, lm_weight, lm_bias, a, up, bias, lse = ctx.saved_tensors
        if ctx.native:  # recompute the kept blocks exactly as the saving forward does, then its backward
            noisy, keep_q, keep_p = _native_inputs(states, lm_weight, lm_bias, a, up, ctx.seed, ctx.softcap)
            _, _, _, _, gate_at_target = _kernels_of_forward().forward(noisy, keep_q, bias, keep_p, targets,
                                                                       ctx.sigma_max)
            del noisy
            return _NoisyTokenLogps._backward_native(ctx, grad_logps, grad_sq, a, up, keep_p, keep_q, targets,
                                                     gate_at_target)
        a_dtype, a = a.dtype, a.to(up.dtype)
        sigma, gate = _sigma_and_gate(F.linear(a, up, bias), ctx.sigma_max)  # (n, V) each
        eps = _epsilon(ctx.seed, sigma)
        probs = _reference_logits(states, lm_weight, lm_bias, up.dtype, ctx.softcap).addcmul_(sigma, eps)
        probs.sub_(lse[:, None]).exp_()  # softmax(z̃)
        # d logp / d z̃ = onehot(target) − softmax, times the upstream gradient of each position
        grad_noisy = probs.mul_(-grad_logps[:, None])
        grad_noisy.scatter_add_(1, targets[:, None], grad_logps[:, None])
        # dσ = g ⊙ ε + 2·g_sq·σ;  du = dσ ⊙ dσ/du (sigmoid(u) for softplus)
        grad_u = eps.mul_(grad_noisy).add_(sigma.mul_(2 * grad_sq)).mul_(gate)
        grad_a = (grad_u @ up).to(a_dtype) if ctx.needs_input_grad[4] else None
        grad_up = grad_u.T @ a if ctx.needs_input_grad[5] else None
        grad_bias = grad_u.sum(0) if ctx.needs_input_grad[6] else None
        return None, None, None, None, grad_a, grad_up, grad_bias, None, None, None, None

    @staticmethod
    def _backward_saved(ctx, grad_logps, grad_sq):
        """du = 2·g_sq·Q/2 − g ⊙ P, plus g · (ε ⊙ sigmoid(u)) at each target; then the matmuls.
        Works in the saved blocks' storage: a second backward through the same graph raises
        (autograd's version check) instead of reading overwritten blocks."""
        a, up, keep_p, keep_q, targets, gate_at_target = ctx.saved_tensors
        if ctx.native:
            return _NoisyTokenLogps._backward_native(ctx, grad_logps, grad_sq, a, up, keep_p, keep_q, targets,
                                                     gate_at_target)
        a_dtype, a = a.dtype, a.to(up.dtype)
        grad_u = keep_q.mul_(2 * grad_sq).addcmul_(keep_p, grad_logps[:, None], value=-1)
        grad_u.scatter_add_(1, targets[:, None], (grad_logps * gate_at_target)[:, None])
        grad_a = (grad_u @ up).to(a_dtype) if ctx.needs_input_grad[4] else None
        grad_up = grad_u.T @ a if ctx.needs_input_grad[5] else None
        grad_bias = grad_u.sum(0) if ctx.needs_input_grad[6] else None
        return None, None, None, None, grad_a, grad_up, grad_bias, None, None, None, None

    @staticmethod
    def _backward_native(ctx, grad_logps, grad_sq, a, up, keep_p, keep_q, targets, gate_at_target):
        """The saved-blocks backward in one fused pass (native.py): du written over Q/2, and the
        bias's gradient as its column sums; then the matmuls."""
        grad_bias = _kernels_of_forward().backward(keep_q, keep_p, targets, grad_logps.contiguous(), 2 * float(grad_sq),
                                     gate_at_target)
        grad_u, a_dtype, a = keep_q, a.dtype, a.to(up.dtype)
        grad_a = (grad_u @ up).to(a_dtype) if ctx.needs_input_grad[4] else None
        grad_up = grad_u.T @ a if ctx.needs_input_grad[5] else None
        grad_bias = grad_bias if ctx.needs_input_grad[6] else None
        return None, None, None, None, grad_a, grad_up, grad_bias, None, None, None, None


def _cpu_kernels(states, up, bias):
    """The compiled CPU kernels (native.py) when this chunk can use them: on CPU with a float32 head;
    else None, and the PyTorch ops run."""
    if (states.device.type != "cpu" or up.dtype != torch.float32 or bias.dtype != torch.float32
            or not bias.is_contiguous() or not all(_plain(t) for t in (states, up, bias))):
        return None
    from noisepo import native

    return native.npo_cpu_kernels()


def _plain(tensor: torch.Tensor) -> bool:
    """A tensor whose data_ptr is its whole data (not a DTensor or another subclass): the C code reads it."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _kernels_of_forward():
    """The kernels again in the backward of a chunk whose forward used them (loaded once per process)."""
    from noisepo import native

    kernels = native.loaded_kernels()
    if kernels is None:
        raise RuntimeError("NPO: the native kernel used in the forward is no longer loaded")
    return kernels


def _native_inputs(states, lm_weight, lm_bias, a, up, seed, softcap=None):
    """The kernel's three (n, V) inputs: the reference logits, u = a upᵀ without the bias (the
    kernel adds it), and ε; each a fresh contiguous float32 block the kernel may overwrite."""
    noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype, softcap).contiguous()
    u = F.linear(a.to(up.dtype), up)
    return noisy, u, _epsilon(seed, noisy)


def _logsumexp_given_softmax(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, (n,), given probs = softmax(logits), without another pass of
    exp: it is max logit − log(max prob), and the largest probability is at least 1/V, so this holds
    where a target's own probability underflows (one softmax costs about half of torch.logsumexp)."""
    return logits.amax(dim=-1) - probs.amax(dim=-1).log()


def noisy_sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor,
                         head: NoiseHead, *, lm_bias: torch.Tensor | None = None, chunk_size: int | None = None,
                         use_checkpoint: bool = True, save_bytes: int | None = None,
                         pair_seeds: list[int] | None = None, with_target_sigma: bool = False,
                         softcap: float | None = None):
    """Noisy reference log-probs of whole sequences.

    hidden: (B, T, d) reference last hidden states, already aligned so `hidden[:, t]` predicts
        `labels[:, t]` (i.e. shifted by one against the input ids).
    labels: (B, T) target token ids, IGNORE_INDEX (-100) on prompt and padding.
    lm_weight: (V, d) the reference's output embedding (frozen); lm_bias: (V,) or None.
    chunk_size: positions per chunk (None: `noise_chunk_rows`, blocks of about 8 MiB).
    use_checkpoint: True (default): the memory-bounded `_NoisyTokenLogps`; False: plain autograd,
        which stores every chunk's (n, V) blocks (for tests and tiny vocabularies).
    save_bytes: how many bytes of (n, V) blocks the fused path may keep for its backward instead of
        recomputing them (None: NOISE_SAVE_BYTES; 0: recompute every chunk).
    pair_seeds: None (ε drawn afresh each call) or one seed per sequence (B,): ε of a sequence's j-th
        response position is the j-th row of that seed's stream (the noise fixed per pair).
    softcap: the reference's final logit soft-capping c (Gemma-2), z = c·tanh(g Wᵀ / c); None: z = g Wᵀ.
    Returns (logps (B,) summed over response tokens, mean σ² (scalar), mean σ (scalar)), and with
    `with_target_sigma` a fourth item, σ at each response position's own target token (N,); only the
    noise head receives gradients (hidden and lm_weight are detached here).
    """
    batch = hidden.shape[0]
    mask = labels != IGNORE_INDEX  # (B, T)
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) batch index of each response position
    # only response positions cost a V-wide matmul
    out = noisy_token_logps(hidden[mask], labels[mask], lm_weight, head, lm_bias=lm_bias, chunk_size=chunk_size,
                            use_checkpoint=use_checkpoint, save_bytes=save_bytes,
                            noise_keys=None if pair_seeds is None else (pair_seeds, rows),
                            with_target_sigma=with_target_sigma, softcap=softcap)
    token_logps, sq_sum, sigma_sum = out[:3]
    logps = token_logps.new_zeros(batch).index_add(0, rows, token_logps)
    count = max(int(rows.shape[0]) * head.vocab_size, 1)
    return (logps, sq_sum / count, sigma_sum / count, *out[3:])


def _pair_segments(noise_keys, length: int):
    """Per-chunk ε seeds for noise fixed per pair: a function start, stop -> ((seed, first, count, rows), ...)
    from (pair seeds (B,), the pair of each of the N positions (N,), sorted as `nonzero` gives them)."""
    pair_seeds, rows = noise_keys
    rows = rows.tolist()
    local = []  # each position's index within its own pair's response
    for i, row in enumerate(rows):
        local.append(local[-1] + 1 if i and rows[i - 1] == row else 0)
    sizes: dict[int, int] = {}
    for row in rows:
        sizes[row] = sizes.get(row, 0) + 1

    def segments(start: int, stop: int):
        out, i = [], start
        while i < min(stop, length):
            j = i
            while j + 1 < min(stop, length) and rows[j + 1] == rows[i]:
                j += 1
            out.append((int(pair_seeds[rows[i]]), local[i], j - i + 1, sizes[rows[i]]))
            i = j + 1
        return tuple(out)

    return segments


def noisy_token_logps(states: torch.Tensor, targets: torch.Tensor, lm_weight: torch.Tensor, head: NoiseHead, *,
                      lm_bias: torch.Tensor | None = None, chunk_size: int | None = None, use_checkpoint: bool = True,
                      save_bytes: int | None = None, noise_keys=None, with_target_sigma: bool = False,
                      softcap: float | None = None):
    """Noisy reference log-probs of single tokens: states (N, d) predicting targets (N,).

    Returns (token logps (N,) float32, Σσ² and Σσ over the N × V entries), plus σ at each target (N,)
    with `with_target_sigma`; only the head gets gradients. `noise_keys`: None, or (one seed per pair,
    the pair of each position (N,)) to fix ε per pair. `noisy_sequence_logps` sums these per sequence
    (and documents the options).
    """
    states, lm_weight, targets = states.detach(), lm_weight.detach(), targets.long()
    lm_bias = None if lm_bias is None else lm_bias.detach()
    parts = []
    sq_sum = torch.zeros((), dtype=torch.float32, device=states.device)
    sigma_sum = torch.zeros((), dtype=torch.float32, device=states.device)
    chunk_size = noise_chunk_rows(head.vocab_size, chunk_size)
    budget = NOISE_SAVE_BYTES if save_bytes is None else save_bytes
    block_bytes = 2 * head.vocab_size * torch.finfo(head.bias.dtype).bits // 8  # P and Q, per position
    # One draw from the global generator per call (so a seeded run is reproducible), then one
    # seed per chunk: the backward redraws a chunk's ε from it.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    segments = None if noise_keys is None else _pair_segments(noise_keys, states.shape[0])
    for index, start in enumerate(range(0, states.shape[0], chunk_size)):
        part = slice(start, start + chunk_size)
        chunk, chunk_targets = states[part], targets[part]
        chunk_seed = seed + index if segments is None else segments(start, start + chunk_size)
        if use_checkpoint:
            a, up = head.factors(chunk)
            save = torch.is_grad_enabled() and chunk.shape[0] * block_bytes <= budget
            budget -= chunk.shape[0] * block_bytes if save else 0
            token_logps, sq, s = _NoisyTokenLogps.apply(chunk, chunk_targets, lm_weight, lm_bias, a, up, head.bias,
                                                        chunk_seed, save, head.bound, softcap)
        else:
            token_logps, sq, s = _noisy_chunk(chunk, chunk_targets, lm_weight, lm_bias, head, chunk_seed, softcap)
        parts.append(token_logps)
        sq_sum = sq_sum + sq
        sigma_sum = sigma_sum + s
    token_logps = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
    if with_target_sigma:
        return token_logps, sq_sum, sigma_sum, head.target_sigma(states, targets)
    return token_logps, sq_sum, sigma_sum


OBJECTIVES = ("minmax", "eq10")


def npo_objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  noisy_reference_rejected_logps, sigma_sq_mean, *, beta: float, noise_penalty: float = 1.0,
                  objective: str = "minmax", clean_reference_rejected_logps=None):
    """The two halves of NPO's objective, as one scalar-per-pair policy loss and one noise loss.

    M = β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π̃_ref(y_l))], ℓ(t) = −log σ(t);
    `sigma_sq_mean` is the penalised mean of σ² (over all of V, or over the target tokens).
    objective "minmax" (METHODS §4.2, the default):
      policy_losses (B,): ℓ(M) with the noisy reference detached (noise held fixed);
      noise_loss (scalar): −mean ℓ(M) with the policy detached, + noise_penalty · mean(σ²).
      Summing the two and calling backward gives each side exactly its own gradient.
    objective "eq10" (the paper's Eq. 10 read literally: one joint minimisation over θ and θ_σ):
      policy_losses (B,): ℓ(M_noisy) − ℓ(M_clean), nothing detached (both players get its gradient);
      noise_loss (scalar): noise_penalty · mean(σ²). Needs `clean_reference_rejected_logps`.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    noisy_rejected = noisy_reference_rejected_logps
    if objective == "eq10":
        if clean_reference_rejected_logps is None:
            raise ValueError("objective 'eq10' needs the clean reference's rejected log-probs")
        noisy_margin = beta * (chosen_ratio - (policy_rejected_logps - noisy_rejected))
        clean_margin = beta * (chosen_ratio - (policy_rejected_logps - clean_reference_rejected_logps))
        return -F.logsigmoid(noisy_margin) + F.logsigmoid(clean_margin), noise_penalty * sigma_sq_mean
    margin_for_policy = beta * (chosen_ratio - (policy_rejected_logps - noisy_rejected.detach()))
    margin_for_noise = beta * (chosen_ratio.detach() - (policy_rejected_logps.detach() - noisy_rejected))
    policy_losses = -F.logsigmoid(margin_for_policy)
    noise_loss = F.logsigmoid(margin_for_noise).mean() + noise_penalty * sigma_sq_mean
    return policy_losses, noise_loss
