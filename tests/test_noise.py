"""NPO noise head and objective (METHODS §4.2)."""
import pytest
import torch
import torch.nn.functional as F

from noisepo import native
from noisepo.noise import NoiseHead, inverse_softplus, noisy_sequence_logps, npo_objective


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def cpu_path(request, monkeypatch):
    """Every test runs on both CPU paths: the compiled kernels (native.py) and PyTorch's ops."""
    if request.param == "pytorch":
        monkeypatch.setenv("NOISEPO_NATIVE", "0")
    elif native._compiler() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    else:
        assert native.npo_cpu_kernels() is not None
    return request.param


def _setup(B=3, T=7, d=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g)
    lm_weight = torch.randn(V, d, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[0, -2:] = -100  # padding
    return hidden, labels, lm_weight


def _clean_logps(hidden, labels, lm_weight):
    logp = torch.log_softmax(hidden @ lm_weight.T, -1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * mask).sum(-1)


def test_fresh_head_outputs_sigma0_everywhere():
    assert abs(F.softplus(torch.tensor(inverse_softplus(0.01))).item() - 0.01) < 1e-8
    for rank in (None, 4):
        head = NoiseHead(16, 50, rank=rank, sigma0=0.01)
        sigma = head(torch.randn(5, 16))
        assert sigma.shape == (5, 50) and torch.allclose(sigma, torch.full_like(sigma, 0.01), atol=1e-7)
    full, low = NoiseHead(4096, 32000), NoiseHead(4096, 32000, rank=64)
    assert sum(p.numel() for p in full.parameters()) == 4096 * 32000 + 32000
    assert sum(p.numel() for p in low.parameters()) == 64 * (4096 + 32000) + 32000


def test_zero_noise_gives_clean_reference_logps():
    hidden, labels, lm_weight = _setup()
    head = NoiseHead(16, 50)
    with torch.no_grad():
        head.bias.fill_(-1e4)  # softplus(-1e4) == 0 exactly: σ ≡ 0
    for fused in (True, False):
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, use_checkpoint=fused)
        assert torch.allclose(logps, _clean_logps(hidden, labels, lm_weight), atol=1e-5)
        assert sq.item() == 0.0


def test_npo_with_clean_reference_equals_dpo_exactly():
    pc, pr, rc, rr = (torch.randn(6) for _ in range(4))
    policy_losses, _ = npo_objective(pc, pr, rc, rr, torch.tensor(0.0), beta=0.1)
    dpo = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    assert torch.equal(policy_losses, dpo)


def test_chunking_and_checkpointing_do_not_change_values_or_gradients():
    hidden, labels, lm_weight = _setup()
    results = []
    for chunk, ckpt in ((1000, False), (3, False), (3, True)):
        head = NoiseHead(16, 50, sigma0=0.5)
        torch.manual_seed(123)
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=chunk, use_checkpoint=ckpt)
        (logps.sum() + sq).backward()
        results.append((logps.detach(), head.bias.grad.clone(), head.weight.grad.clone()))
    # chunk boundaries change how ε is drawn, so compare the fused function with plain autograd at
    # the same chunking
    assert torch.allclose(results[1][0], results[2][0], atol=1e-5)
    assert torch.allclose(results[1][1], results[2][1], atol=1e-6)
    assert torch.allclose(results[1][2], results[2][2], atol=1e-6)


@pytest.mark.parametrize("save_bytes", [0, None, 5 * 2 * 40 * 4], ids=["recompute", "saved", "first-chunk-saved"])
def test_fused_backward_matches_autograd_for_every_head_and_upstream_gradient(save_bytes):
    """Low rank, an LM bias, non-uniform upstream gradients on the log-probs and on Σσ²; chunks
    recomputed in the backward, kept from the forward, or the first kept and the rest recomputed."""
    hidden, labels, lm_weight = _setup(B=4, T=9, d=16, V=40, seed=3)
    lm_bias = torch.randn(40)
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0])
    grads = []
    for fused in (True, False):
        for rank in (None, 3):
            torch.manual_seed(11)
            head = NoiseHead(16, 40, rank=rank, sigma0=0.4)
            with torch.no_grad():
                for p in head.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            torch.manual_seed(5)
            logps, sq, mean = noisy_sequence_logps(hidden, labels, lm_weight, head, lm_bias=lm_bias, chunk_size=5,
                                                   use_checkpoint=fused, save_bytes=save_bytes)
            ((logps * upstream).sum() + 3.0 * sq).backward()
            grads.append([logps.detach(), sq.detach(), mean] + [p.grad.clone() for p in head.parameters()])
    for a, b in zip(grads[:2], grads[2:]):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-5), (x, y)


@pytest.mark.parametrize("save_bytes", [0, None], ids=["recompute", "saved"])
def test_soft_capped_reference_logits_get_the_noise(save_bytes):
    """Gemma-2: z = c·tanh(g Wᵀ / c). With σ ≡ 0 the noisy log-probs are the capped clean ones (not the
    uncapped); with noise, both fused paths equal plain autograd, values and head gradients."""
    hidden, labels, lm_weight = _setup(seed=4)
    lm_weight = lm_weight * 5  # logits of size ~5-10 against c = 2: the cap changes them a lot
    capped = lambda h, w: torch.tanh(h @ w.T / 2.0) * 2.0  # noqa: E731
    head = NoiseHead(16, 50)
    with torch.no_grad():
        head.bias.fill_(-1e4)  # σ ≡ 0
    clean = torch.log_softmax(capped(hidden, lm_weight), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    clean = (clean * (labels != -100)).sum(-1)
    logps, _, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, softcap=2.0)
    assert torch.allclose(logps, clean, atol=1e-5)
    assert not torch.allclose(logps, _clean_logps(hidden, labels, lm_weight), atol=1e-1)
    results = []
    for fused in (True, False):
        torch.manual_seed(2)
        head = NoiseHead(16, 50, sigma0=0.7)
        with torch.no_grad():
            head.weight.add_(0.05 * torch.randn_like(head.weight))
        torch.manual_seed(9)
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, softcap=2.0,
                                            use_checkpoint=fused, save_bytes=save_bytes)
        (logps.sum() + sq).backward()
        results.append([logps.detach(), head.weight.grad.clone(), head.bias.grad.clone()])
    for x, y in zip(*results):
        assert torch.allclose(x, y, atol=1e-5)


def _saved_numels(hidden, labels, lm_weight, head, **options) -> list[int]:
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=16, **options)
    return saved


def test_fused_path_holds_no_vocabulary_sized_tensor_between_passes():
    """With nothing to save, what autograd keeps for the backward is O(N·d), not O(N·V)."""
    hidden, labels, lm_weight = _setup(B=2, T=64, d=8, V=4096)
    head = NoiseHead(8, 4096, rank=2)
    saved = _saved_numels(hidden, labels, lm_weight, head, save_bytes=0)
    assert saved and max(saved) < 4096 * 16


def test_blocks_kept_for_the_backward_stay_within_the_budget():
    """Each kept chunk holds two (16, V) float32 blocks; the budget decides how many chunks keep them."""
    hidden, labels, lm_weight = _setup(B=2, T=64, d=8, V=4096)
    head = NoiseHead(8, 4096, rank=2)
    block = 16 * 4096
    for chunks in (0, 1, 3):
        saved = _saved_numels(hidden, labels, lm_weight, head, save_bytes=chunks * 2 * block * 4 + 100)
        assert sum(n for n in saved if n >= block) == 2 * chunks * block
    with torch.no_grad():  # no graph: nothing is kept whatever the budget
        assert _saved_numels(hidden, labels, lm_weight, head) == []


def test_each_side_gets_only_its_own_gradient():
    hidden, labels, lm_weight = _setup()
    head = NoiseHead(16, 50, sigma0=0.3)
    policy_rejected = torch.randn(3, requires_grad=True)
    policy_chosen = torch.randn(3, requires_grad=True)
    ref_chosen = torch.randn(3)
    torch.manual_seed(0)
    noisy, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head)
    policy_losses, noise_loss = npo_objective(policy_chosen, policy_rejected, ref_chosen, noisy, sq, beta=0.1)

    head.zero_grad()
    policy_losses.mean().backward(retain_graph=True)
    assert head.bias.grad is None or torch.count_nonzero(head.bias.grad) == 0
    assert policy_rejected.grad.abs().sum() > 0

    policy_rejected.grad = None
    policy_chosen.grad = None
    noise_loss.backward()
    assert policy_rejected.grad is None and policy_chosen.grad is None
    assert head.bias.grad.abs().sum() > 0


def test_noise_ascends_the_loss_it_shrinks_the_margin():
    """One step of gradient descent on noise_loss (no penalty) must raise the policy's DPO loss."""
    hidden, labels, lm_weight = _setup()
    head = NoiseHead(16, 50, sigma0=0.5)
    opt = torch.optim.SGD(head.parameters(), lr=5.0)
    pc, pr, rc = torch.zeros(3), torch.full((3,), -5.0), torch.zeros(3)

    def mean_loss():
        torch.manual_seed(7)
        noisy, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head)
        return npo_objective(pc, pr, rc, noisy, sq, beta=0.5, noise_penalty=0.0)

    before = mean_loss()[0].mean().item()
    opt.zero_grad()
    mean_loss()[1].backward()
    opt.step()
    assert mean_loss()[0].mean().item() > before


def test_logsumexp_from_the_softmax_holds_where_the_target_probability_underflows():
    from noisepo.noise import _logsumexp_given_softmax

    logits = torch.tensor([[0.0, 1.0, 2.0, -3.0], [0.0, 300.0, -200.0, 5.0], [10.0, 10.0, 10.0, 10.0]])
    got = _logsumexp_given_softmax(logits, torch.softmax(logits, -1))
    assert torch.allclose(got, torch.logsumexp(logits, -1), atol=1e-5), got
    # row 1's logit -200 has probability e^-500, 0 in float32: its log-prob is still exact
    assert torch.allclose(logits[1, 2] - got[1], torch.tensor(-500.0), atol=1e-4)


def test_saved_path_matches_autograd_when_targets_are_far_in_the_tail():
    """Logits spread over hundreds of nats: some targets' noisy probabilities underflow float32."""
    hidden, labels, lm_weight = _setup(B=3, T=7, d=16, V=50, seed=4)
    lm_weight = lm_weight * 80.0
    results = []
    for fused in (True, False):
        torch.manual_seed(2)
        head = NoiseHead(16, 50, sigma0=0.3)
        torch.manual_seed(9)
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, use_checkpoint=fused)
        (logps.sum() * 0.01 + sq).backward()
        results.append((logps.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    assert results[1][0].min() < -100  # the case is really in the tail
    for x, y in zip(*results):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-4), (x, y)


def test_a_second_backward_through_kept_blocks_raises_instead_of_reusing_them():
    hidden, labels, lm_weight = _setup()
    head = NoiseHead(16, 50, sigma0=0.5)
    logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head)
    loss = logps.sum() + sq
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_kept_and_recomputed_paths_agree_for_a_reference_in_another_dtype(dtype):
    """The head is float32; the reference's states and LM head may be wider or narrower."""
    hidden, labels, lm_weight = _setup(seed=6)
    hidden, lm_weight = hidden.to(dtype), lm_weight.to(dtype)
    results = []
    for save_bytes in (None, 0):
        head = NoiseHead(16, 50, sigma0=0.3)
        torch.manual_seed(4)
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, save_bytes=save_bytes)
        (logps.sum() + sq).backward()
        results.append((logps.detach().float(), head.bias.grad.clone(), head.weight.grad.clone()))
    assert torch.isfinite(results[0][0]).all()
    for x, y in zip(*results):
        assert torch.allclose(x, y, atol=1e-5), (x, y)


# ---------------------------------------------------------------- issue 20: the bound, fixed noise, Eq. 10
@pytest.mark.parametrize("save_bytes", [0, None])
def test_bounded_head_fused_paths_match_autograd(save_bytes):
    """σ = σ_max·sigmoid(u): kernels (both the kept-blocks and the recomputing path) and plain autograd
    give the same values and gradients, and σ never exceeds σ_max however large u grows."""
    hidden, labels, lm_weight = _setup(B=4, T=9, d=16, V=40, seed=4)
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0])
    grads = []
    for fused in (True, False):
        torch.manual_seed(11)
        head = NoiseHead(16, 40, sigma0=0.7, sigma_max=2.0)
        with torch.no_grad():
            head.weight.add_(0.5 * torch.randn_like(head.weight))
        torch.manual_seed(5)
        logps, sq, mean = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=5, use_checkpoint=fused,
                                               save_bytes=save_bytes)
        ((logps * upstream).sum() + 3.0 * sq).backward()
        grads.append([logps.detach(), sq.detach(), mean, head.weight.grad.clone(), head.bias.grad.clone()])
    for x, y in zip(*grads):
        assert torch.allclose(x, y, atol=1e-5), (x, y)
    head = NoiseHead(16, 40, sigma0=0.7, sigma_max=2.0)
    assert torch.allclose(head(torch.randn(3, 16)), torch.full((3, 40), 0.7), atol=1e-6)
    with torch.no_grad():
        head.bias.fill_(50.0)
    assert head(torch.randn(3, 16)).max() <= 2.0


def test_bounded_head_refuses_sigma0_outside_the_bound():
    for sigma0 in (2.0, 3.0, -1.0):
        with pytest.raises(ValueError, match="sigma0"):
            NoiseHead(4, 10, sigma0=sigma0, sigma_max=2.0)


def test_noise_fixed_per_pair_is_the_same_at_every_call_and_differs_between_pairs():
    hidden, labels, lm_weight = _setup(B=3, T=7, d=16, V=50, seed=1)
    head = NoiseHead(16, 50, sigma0=1.0)
    first = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, pair_seeds=[7, 8, 9])[0]
    again = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=3, pair_seeds=[7, 8, 9])[0]
    assert torch.allclose(first, again, atol=1e-6)  # the chunking does not change a pair's ε
    # a pair's noise depends on its own seed only: the same rows under another seed of the others
    other = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, pair_seeds=[7, 1, 2])[0]
    assert torch.allclose(first[0], other[0], atol=1e-6) and not torch.allclose(first[1:], other[1:])
    fresh = [noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4)[0] for _ in range(2)]
    assert not torch.allclose(fresh[0], fresh[1])  # resampled at each call without seeds
    # gradients of the fixed-noise path equal plain autograd's with the same seeds
    grads = []
    for fused in (True, False):
        head.zero_grad()
        logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, chunk_size=4, pair_seeds=[7, 8, 9],
                                            use_checkpoint=fused, save_bytes=0)
        (logps.sum() + sq).backward()
        grads.append(head.bias.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_target_sigma_is_sigma_at_each_target_entry():
    hidden, labels, lm_weight = _setup(B=2, T=6, d=16, V=30, seed=2)
    for sigma_max in (None, 3.0):
        head = NoiseHead(16, 30, sigma0=0.5, sigma_max=sigma_max)
        with torch.no_grad():
            head.weight.normal_(0, 0.3)
        logps, sq, mean, target = noisy_sequence_logps(hidden, labels, lm_weight, head, with_target_sigma=True)
        mask = labels != -100
        full = head(hidden[mask])
        assert torch.allclose(target, full.gather(1, labels[mask][:, None]).squeeze(1), atol=1e-6)
        assert torch.allclose(mean, full.mean(), atol=1e-6) and torch.allclose(sq, full.square().mean(), atol=1e-6)


def test_eq10_objective_is_the_noisy_minus_clean_loss_plus_the_penalty_by_hand():
    """Hand-worked: β = 0.5, chosen ratio 1.0, policy rejected −3, noisy reference −2, clean −2.5."""
    pc, pr, rc = torch.tensor([-1.0]), torch.tensor([-3.0], requires_grad=True), torch.tensor([-2.0])
    noisy, clean = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.5])
    losses, noise = npo_objective(pc, pr, rc, noisy, torch.tensor(0.2), beta=0.5, noise_penalty=0.1,
                                  objective="eq10", clean_reference_rejected_logps=clean)
    # M_noisy = 0.5·(1 − (−3 + 2)) = 1.0; M_clean = 0.5·(1 − (−3 + 2.5)) = 0.75
    expected = F.softplus(torch.tensor(-1.0)) - F.softplus(torch.tensor(-0.75))
    assert torch.allclose(losses, expected.reshape(1), atol=1e-6) and noise.item() == pytest.approx(0.02)
    losses.sum().backward()
    assert noisy.grad.item() != 0 and pr.grad.item() != 0  # one joint minimisation: both sides get gradient
    with pytest.raises(ValueError, match="objective"):
        npo_objective(pc, pr, rc, noisy, torch.tensor(0.0), beta=0.5, objective="maxmin")
