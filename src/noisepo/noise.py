"""Noise Preference Optimization (NPO): a trainable noise head on the reference (METHODS §4.2).

For the rejected response, at each response position j the reference's logits z_j (V,) and last
hidden state g_j (d,) give

    σ_j = softplus(W_σ g_j + b_σ)          (V,)   the noise head
    z̃_j = z_j + σ_j ⊙ ε_j,  ε_j ~ N(0, I)         resampled every step (reparameterisation)
    log π̃_ref(y_l|x) = Σ_j log softmax(z̃_j)[y_l,j]

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


class NoiseHead(nn.Module):
    """σ(g) = softplus(W g + b) ∈ R^V, with W full (V × d) or low rank (V × r)(r × d).

    Initialised so σ = σ₀ everywhere: W = 0 (for low rank the up-projection is 0 and the
    down-projection random, so gradients reach both) and b = softplus⁻¹(σ₀).
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, rank: int | None = None, sigma0: float = 0.01):
        super().__init__()
        self.hidden_size, self.vocab_size, self.rank, self.sigma0 = hidden_size, vocab_size, rank, sigma0
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
            self.bias.fill_(inverse_softplus(self.sigma0))

    def factors(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (..., k), U (V, k)) with W g = U a: full rank a = g, U = W; low rank a = D g, U = up."""
        hidden = hidden.to(self.bias.dtype)
        if self.rank is None:
            return hidden, self.weight
        return F.linear(hidden, self.down), self.up

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> σ (..., V), float32."""
        a, up = self.factors(hidden)
        return F.softplus(F.linear(a, up, self.bias))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, vocab={self.vocab_size}, rank={self.rank or 'full'}, sigma0={self.sigma0}"


def _epsilon(seed: int, like: torch.Tensor) -> torch.Tensor:
    """ε ~ N(0, I) shaped like `like`, from a generator seeded with `seed` (redrawn in the backward):
    on CPU in float32 the native kernels' stream when they load (native.py), else torch.randn."""
    kernels = _cpu_kernels(like, like, like)
    if kernels is not None:
        return kernels.normal(seed, like.shape)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _reference_logits(states, lm_weight, lm_bias, dtype: torch.dtype) -> torch.Tensor:
    """(n, d) -> (n, V) in `dtype` (the noise head's, float32), computed in the weights' dtype first (as
    the model's LM head): the whole noisy path then has one dtype whatever the reference's is."""
    return F.linear(states.to(lm_weight.dtype), lm_weight, lm_bias).to(dtype)


def _noisy_chunk(states, targets, lm_weight, lm_bias, head: NoiseHead, seed: int):
    """Plain autograd: (n, d), (n,) -> noisy log-prob per position (n,), Σσ², Σσ over the chunk."""
    logits = _reference_logits(states, lm_weight, lm_bias, head.bias.dtype)  # (n, V), no gradient (frozen)
    sigma = head(states)  # (n, V)
    noisy = logits + sigma * _epsilon(seed, logits)
    target = noisy.gather(-1, targets[:, None]).squeeze(-1)
    return target - torch.logsumexp(noisy, dim=-1), sigma.pow(2).sum(), sigma.detach().sum()


class _NoisyTokenLogps(torch.autograd.Function):
    """The same numbers as `_noisy_chunk`, keeping only (n,)-sized tensors between the passes, or
    with `save` two (n, V) blocks that spare the backward its recomputation (module docstring).

    Inputs: states (n, d) and targets (n,) of the reference; lm_weight (V, d), lm_bias (V,) or
    None (frozen); the head's factors a (n, k), up (V, k) and bias (V,) (u = a upᵀ + bias,
    σ = softplus(u)); the chunk's seed. Gradients go to a, up and bias only.
    """

    @staticmethod
    def forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed, save=False):
        # Autocast off in both passes: the backward must recompute exactly the forward's numbers.
        with torch.autocast(device_type=states.device.type, enabled=False):
            if save:
                return _NoisyTokenLogps._forward_saving(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed)
            return _NoisyTokenLogps._forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed)

    @staticmethod
    def _forward(ctx, states, targets, lm_weight, lm_bias, a, up, bias, seed):
        kernels = _cpu_kernels(states, up, bias)
        ctx.seed, ctx.saved_blocks, ctx.native = seed, False, kernels is not None
        if kernels is not None:
            noisy, u, eps = _native_inputs(states, lm_weight, lm_bias, a, up, seed)
            logps, lse, sq, total, _ = kernels.forward(noisy, u, bias, eps, targets)
            del noisy, u, eps
            sq, total = sq.sum(), total.sum()
            ctx.save_for_backward(states, targets, lm_weight, lm_bias, a, up, bias, lse)
            ctx.mark_non_differentiable(total)
            return logps, sq, total
        noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype)  # (n, V)
        sigma = F.linear(a.to(up.dtype), up, bias)  # u, (n, V)
        torch.ops.aten.softplus.out(sigma, 1, 20, out=sigma)  # σ = softplus(u), in u's storage
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
            noisy, keep_q, keep_p = _native_inputs(states, lm_weight, lm_bias, a, up, seed)
            logps, _, sq, total, gate_at_target = kernels.forward(noisy, keep_q, bias, keep_p, targets)
            del noisy
            total = total.sum()
            ctx.save_for_backward(a, up, keep_p, keep_q, targets, gate_at_target)
            ctx.mark_non_differentiable(total)
            return logps, sq.sum(), total
        noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype)  # (n, V)
        sigma = F.linear(a.to(up.dtype), up, bias)  # u, (n, V)
        gate = torch.sigmoid(sigma)  # sigmoid(u)
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
            noisy, keep_q, keep_p = _native_inputs(states, lm_weight, lm_bias, a, up, ctx.seed)
            _, _, _, _, gate_at_target = _kernels_of_forward().forward(noisy, keep_q, bias, keep_p, targets)
            del noisy
            return _NoisyTokenLogps._backward_native(ctx, grad_logps, grad_sq, a, up, keep_p, keep_q, targets,
                                                     gate_at_target)
        a_dtype, a = a.dtype, a.to(up.dtype)
        u = F.linear(a, up, bias)  # (n, V)
        sigma = F.softplus(u)
        eps = _epsilon(ctx.seed, sigma)
        probs = _reference_logits(states, lm_weight, lm_bias, up.dtype).addcmul_(sigma, eps)
        probs.sub_(lse[:, None]).exp_()  # softmax(z̃)
        # d logp / d z̃ = onehot(target) − softmax, times the upstream gradient of each position
        grad_noisy = probs.mul_(-grad_logps[:, None])
        grad_noisy.scatter_add_(1, targets[:, None], grad_logps[:, None])
        # dσ = g ⊙ ε + 2·g_sq·σ;  du = dσ ⊙ sigmoid(u)
        grad_u = eps.mul_(grad_noisy).add_(sigma.mul_(2 * grad_sq)).mul_(u.sigmoid_())
        grad_a = (grad_u @ up).to(a_dtype) if ctx.needs_input_grad[4] else None
        grad_up = grad_u.T @ a if ctx.needs_input_grad[5] else None
        grad_bias = grad_u.sum(0) if ctx.needs_input_grad[6] else None
        return None, None, None, None, grad_a, grad_up, grad_bias, None, None

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
        return None, None, None, None, grad_a, grad_up, grad_bias, None, None

    @staticmethod
    def _backward_native(ctx, grad_logps, grad_sq, a, up, keep_p, keep_q, targets, gate_at_target):
        """The saved-blocks backward in one fused pass (native.py): du written over Q/2, and the
        bias's gradient as its column sums; then the matmuls."""
        grad_bias = _kernels_of_forward().backward(keep_q, keep_p, targets, grad_logps.contiguous(), 2 * float(grad_sq),
                                     gate_at_target)
        grad_u, a_dtype, a = keep_q, a.dtype, a.to(up.dtype)
        grad_a = (grad_u @ up).to(a_dtype) if ctx.needs_input_grad[4] else None
        grad_up = grad_u.T @ a if ctx.needs_input_grad[5] else None
        return None, None, None, None, grad_a, grad_up, grad_bias if ctx.needs_input_grad[6] else None, None, None


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


def _native_inputs(states, lm_weight, lm_bias, a, up, seed):
    """The kernel's three (n, V) inputs: the reference logits, u = a upᵀ without the bias (the
    kernel adds it), and ε; each a fresh contiguous float32 block the kernel may overwrite."""
    noisy = _reference_logits(states, lm_weight, lm_bias, up.dtype).contiguous()
    u = F.linear(a.to(up.dtype), up)
    return noisy, u, _epsilon(seed, noisy)


def _logsumexp_given_softmax(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, (n,), given probs = softmax(logits), without another pass of
    exp: it is max logit − log(max prob), and the largest probability is at least 1/V, so this holds
    where a target's own probability underflows (one softmax costs about half of torch.logsumexp)."""
    return logits.amax(dim=-1) - probs.amax(dim=-1).log()


def noisy_sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor,
                         head: NoiseHead, *, lm_bias: torch.Tensor | None = None, chunk_size: int | None = None,
                         use_checkpoint: bool = True, save_bytes: int | None = None):
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
    Returns (logps (B,) summed over response tokens, mean σ² (scalar), mean σ (scalar)); only the
    noise head receives gradients (hidden and lm_weight are detached here).
    """
    batch = hidden.shape[0]
    mask = labels != IGNORE_INDEX  # (B, T)
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) batch index of each response position
    # only response positions cost a V-wide matmul
    token_logps, sq_sum, sigma_sum = noisy_token_logps(hidden[mask], labels[mask], lm_weight, head, lm_bias=lm_bias,
                                                       chunk_size=chunk_size, use_checkpoint=use_checkpoint,
                                                       save_bytes=save_bytes)
    logps = token_logps.new_zeros(batch).index_add(0, rows, token_logps)
    count = max(int(rows.shape[0]) * head.vocab_size, 1)
    return logps, sq_sum / count, sigma_sum / count


def noisy_token_logps(states: torch.Tensor, targets: torch.Tensor, lm_weight: torch.Tensor, head: NoiseHead, *,
                      lm_bias: torch.Tensor | None = None, chunk_size: int | None = None, use_checkpoint: bool = True,
                      save_bytes: int | None = None):
    """Noisy reference log-probs of single tokens: states (N, d) predicting targets (N,).

    Returns (token logps (N,) float32, Σσ² and Σσ over the N × V entries); only the head gets
    gradients. `noisy_sequence_logps` sums these per sequence (and documents the options).
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
    for index, start in enumerate(range(0, states.shape[0], chunk_size)):
        part = slice(start, start + chunk_size)
        chunk, chunk_targets = states[part], targets[part]
        if use_checkpoint:
            a, up = head.factors(chunk)
            save = torch.is_grad_enabled() and chunk.shape[0] * block_bytes <= budget
            budget -= chunk.shape[0] * block_bytes if save else 0
            token_logps, sq, s = _NoisyTokenLogps.apply(chunk, chunk_targets, lm_weight, lm_bias, a, up, head.bias,
                                                        seed + index, save)
        else:
            token_logps, sq, s = _noisy_chunk(chunk, chunk_targets, lm_weight, lm_bias, head, seed + index)
        parts.append(token_logps)
        sq_sum = sq_sum + sq
        sigma_sum = sigma_sum + s
    token_logps = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
    return token_logps, sq_sum, sigma_sum


def npo_objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  noisy_reference_rejected_logps, sigma_sq_mean, *, beta: float, noise_penalty: float = 1.0):
    """The two halves of NPO's min–max, as one scalar-per-pair policy loss and one noise loss.

    M = β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π̃_ref(y_l))], ℓ(t) = −log σ(t).
    policy_losses (B,): ℓ(M) with the noisy reference detached (noise held fixed);
    noise_loss (scalar): −mean ℓ(M) with the policy detached, + noise_penalty · mean(σ²).
    Summing the two and calling backward gives each side exactly its own gradient.
    """
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    noisy_rejected = noisy_reference_rejected_logps
    margin_for_policy = beta * (chosen_ratio - (policy_rejected_logps - noisy_rejected.detach()))
    margin_for_noise = beta * (chosen_ratio.detach() - (policy_rejected_logps.detach() - noisy_rejected))
    policy_losses = -F.logsigmoid(margin_for_policy)
    noise_loss = F.logsigmoid(margin_for_noise).mean() + noise_penalty * sigma_sq_mean
    return policy_losses, noise_loss
