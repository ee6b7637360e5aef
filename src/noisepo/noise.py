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
chunks under activation checkpointing, so the backward pass recomputes a chunk's (n, V) tensors
(the RNG state is restored, so ε is the same in the recomputation) instead of storing them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> σ (..., V), float32."""
        hidden = hidden.to(self.bias.dtype)
        if self.rank is None:
            pre = F.linear(hidden, self.weight, self.bias)
        else:
            pre = F.linear(F.linear(hidden, self.down), self.up, self.bias)
        return F.softplus(pre)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, vocab={self.vocab_size}, rank={self.rank or 'full'}, sigma0={self.sigma0}"


def _noisy_chunk(hidden, targets, lm_weight, lm_bias, head: NoiseHead):
    """(n, d), (n,) -> per-position noisy log-prob (n,), Σσ² and Σσ over the chunk."""
    logits = F.linear(hidden, lm_weight, lm_bias).float()  # (n, V)
    sigma = head(hidden)  # (n, V)
    noisy = logits + sigma * torch.randn_like(logits)
    target = noisy.gather(-1, targets[:, None]).squeeze(-1)
    return target - torch.logsumexp(noisy, dim=-1), sigma.pow(2).sum(), sigma.sum()


def noisy_sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor,
                         head: NoiseHead, *, lm_bias: torch.Tensor | None = None, chunk_size: int = 512,
                         use_checkpoint: bool = True):
    """Noisy reference log-probs of whole sequences.

    hidden: (B, T, d) reference last hidden states, already aligned so `hidden[:, t]` predicts
        `labels[:, t]` (i.e. shifted by one against the input ids).
    labels: (B, T) target token ids, IGNORE_INDEX (-100) on prompt and padding.
    lm_weight: (V, d) the reference's output embedding (frozen); lm_bias: (V,) or None.
    Returns (logps (B,) summed over response tokens, mean σ² (scalar), mean σ (scalar)); only the
    noise head receives gradients (hidden and lm_weight are detached here).
    """
    batch = hidden.shape[0]
    mask = labels != IGNORE_INDEX  # (B, T)
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) batch index of each response position
    flat_hidden = hidden.detach()[mask]  # (N, d): only response positions cost a V-wide matmul
    flat_targets = labels[mask]
    lm_weight = lm_weight.detach()
    lm_bias = None if lm_bias is None else lm_bias.detach()
    logps = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
    sq_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    sigma_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (flat_hidden[part], flat_targets[part], lm_weight, lm_bias, head)
        if use_checkpoint and torch.is_grad_enabled():
            token_logps, sq, s = checkpoint(_noisy_chunk, *args, use_reentrant=False, preserve_rng_state=True)
        else:
            token_logps, sq, s = _noisy_chunk(*args)
        logps = logps.index_add(0, rows[part], token_logps)
        sq_sum = sq_sum + sq
        sigma_sum = sigma_sum + s
    count = max(int(flat_hidden.shape[0]) * head.vocab_size, 1)
    return logps, sq_sum / count, sigma_sum / count


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
