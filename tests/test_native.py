"""NPO's native CPU kernels (native.py, kernels/npo_cpu.c): PyTorch's numbers, a sound normal stream,
and the PyTorch path whenever they cannot be built or are turned off."""
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noisepo import native
from noisepo.noise import NoiseHead, _epsilon, noisy_sequence_logps

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def kernels():
    loaded = native.npo_cpu_kernels()
    assert loaded is not None, "a C compiler is here but the kernels did not load (see the log)"
    return loaded


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """Build into an empty cache with whatever the test patches; the real kernels load again after."""
    monkeypatch.setenv("NOISEPO_CACHE_DIR", str(tmp_path / "cache"))
    native._load.cache_clear()
    yield tmp_path / "cache"
    native._load.cache_clear()


def _case(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(rows, vocab, generator=g) * 4
    u = torch.randn(rows, vocab, generator=g) * 8
    u.view(-1)[:6] = torch.tensor([35.0, -35.0, 20.5, 19.5, -90.0, 0.0])[: u.numel()]
    bias = torch.randn(vocab, generator=g)
    eps = torch.randn(rows, vocab, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0] = vocab - 1
    return noisy, u, bias, eps, targets


@needs_compiler
@pytest.mark.parametrize("rows,vocab,threads", [(1, 1, 1), (3, 37, 1), (50, 515, 2), (40, 8000, 2)])
def test_forward_and_backward_give_pytorchs_numbers(kernels, rows, vocab, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    noisy, u, bias, eps, targets = _case(rows, vocab)
    expected = native.reference_forward(noisy, u, bias, eps, targets)
    q, p = u.clone(), eps.clone()
    got = dict(zip(("logps", "lse", "sq", "total", "gate_at_target"), kernels.forward(noisy.clone(), q, bias, p, targets)))
    got.update(q=q, p=p)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=2e-5, atol=1e-6), (name, (got[name] - value).abs().max())
    grad = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    du = 0.7 * expected["q"] - grad[:, None] * expected["p"]
    du[torch.arange(rows), targets] += grad * expected["gate_at_target"]
    bias_grad = kernels.backward(q, p, targets, grad, 0.7, got["gate_at_target"])
    assert torch.allclose(q, du, rtol=2e-5, atol=1e-6)
    assert torch.allclose(bias_grad, du.sum(0), rtol=2e-5, atol=1e-5)


@needs_compiler
def test_softplus_keeps_relative_precision_where_sigma_is_tiny(kernels):
    """σ = softplus(u) ≈ e^u for very negative u: the kernel's log1p must not round it to 0."""
    u = torch.tensor([[-30.0], [-60.0], [-87.0], [-15.0], [-1.0], [0.0], [3.0], [25.0]])  # one σ per row
    outputs = kernels.forward(torch.zeros_like(u), u.clone(), torch.zeros(1), torch.zeros_like(u), torch.zeros(8).long())
    total = outputs[3]  # Σσ of each row
    assert torch.allclose(total.double(), torch.nn.functional.softplus(u.double()).squeeze(1), rtol=1e-6, atol=0)


@needs_compiler
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_give_pytorchs_non_finite_outputs(kernels, bad):
    """Built with -ffast-math, the kernel must still let a NaN or infinity through where PyTorch does
    (a diverged run has to reach the training guards), and leave the other rows alone."""
    noisy, u, bias, eps, targets = _case(3, 37)
    targets[1] = 5
    noisy[1, 5] = bad  # at row 1's target
    u[2, 3] = bad
    expected = native.reference_forward(noisy, u, bias, eps, targets)["logps"]
    got = kernels.forward(noisy.clone(), u.clone(), bias, eps.clone(), targets)[0]
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf()), (got, expected)
    finite = expected.isfinite()
    assert torch.allclose(got[finite], expected[finite], rtol=2e-5, atol=1e-6)


@needs_compiler
def test_threads_split_rows_without_changing_the_numbers(kernels, monkeypatch):
    noisy, u, bias, eps, targets = _case(64, 300)
    outputs = {}
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        q, p = u.clone(), eps.clone()
        forward = kernels.forward(noisy.clone(), q, bias, p, targets)
        outputs[threads] = (*forward, q.clone(), p.clone(), kernels.backward(q, p, targets, torch.ones(64), 0.5, forward[4]))
    for threads in (2, 3):
        for a, b in zip(outputs[1][:-1], outputs[threads][:-1]):
            assert torch.equal(a, b)  # each row is computed whole by one thread
        assert torch.allclose(outputs[1][-1], outputs[threads][-1], atol=1e-5)  # column sums: another order


@needs_compiler
def test_out_of_range_targets_raise_instead_of_writing_outside_the_row(kernels):
    noisy, u, bias, eps, targets = _case(3, 10)
    for bad in (10, -1):
        targets[1] = bad
        with pytest.raises(IndexError, match="out of range"):
            kernels.forward(noisy, u, bias, eps, targets)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        kernels.forward(noisy.double(), u, bias, eps, targets.clamp(0, 9))


@needs_compiler
def test_normal_stream_is_a_function_of_its_seed_whatever_the_threads(kernels, monkeypatch):
    draws = {}
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        draws[threads] = kernels.normal(2**62 + 17, (301, 1001))
    assert torch.equal(draws[1], draws[2]) and torch.equal(draws[1], draws[3])
    assert not torch.equal(kernels.normal(2**62 + 18, (301, 1001)), draws[1])
    assert kernels.normal(5, (0, 7)).shape == (0, 7) and kernels.normal(5, (1,)).shape == (1,)


@needs_compiler
def test_normal_stream_is_standard_normal(kernels):
    """Moments, tails, the Kolmogorov–Smirnov distance and correlations on 2M draws (fixed seeds:
    the test is deterministic; each bound is several standard errors wide)."""
    n = 2_000_000
    x = kernels.normal(12345, (n,)).double()
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x**3).mean()) < 5 * math.sqrt(15 / n)  # skewness
    assert abs((x**4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    for k, tail in ((1, 0.31731), (2, 0.04550), (3, 0.0026998), (4, 6.334e-5)):
        frequency = (x.abs() > k).double().mean().item()
        assert abs(frequency - tail) < 5 * math.sqrt(tail / n), (k, frequency)
    sorted_x = x.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_x / math.sqrt(2)))
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1 % critical value
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1]) < 5 / math.sqrt(n)  # neighbours
    assert abs(torch.corrcoef(torch.stack([x[:-256], x[256:]]))[0, 1]) < 5 / math.sqrt(n)  # cosine vs sine half
    other = kernels.normal(12346, (n,)).double()  # the next chunk's seed
    assert abs(torch.corrcoef(torch.stack([x, other]))[0, 1]) < 5 / math.sqrt(n)


@needs_compiler
def test_epsilon_comes_from_the_kernels_on_cpu_and_from_torch_when_turned_off(kernels, monkeypatch):
    like = torch.empty(4, 9)
    assert torch.equal(_epsilon(7, like), kernels.normal(7, (4, 9)))
    assert torch.equal(_epsilon(7, like.double()), torch.randn(4, 9, generator=torch.Generator().manual_seed(7),
                                                                dtype=torch.float64))
    monkeypatch.setenv("NOISEPO_NATIVE", "0")
    assert native.npo_cpu_kernels() is None
    assert torch.equal(_epsilon(7, like), torch.randn(4, 9, generator=torch.Generator().manual_seed(7)))


@needs_compiler
def test_loading_the_kernels_leaves_denormals_alone():
    """GCC < 13 links crtfastmath.o into -ffast-math libraries, which sets flush-to-zero process-wide:
    the build links apart. Checked in a fresh process (this one may have loaded them already)."""
    code = ("import torch; from noisepo import native; x = torch.tensor([1e-40]);"
            "assert native.npo_cpu_kernels() is not None; assert (x * 1).item() != 0, 'flushed'")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_compiler
def test_concurrent_builds_share_one_library(fresh_load):
    """Ranks starting together each build to a temporary file and rename it: all load, one file left."""
    code = "from noisepo import native; assert native.npo_cpu_kernels() is not None"
    env = {**os.environ, "NOISEPO_CACHE_DIR": str(fresh_load)}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [process.wait(timeout=120) for process in processes] == [0, 0, 0]
    assert [path.suffix for path in (fresh_load / "native").iterdir()] == [".so"]
    built = next((fresh_load / "native").iterdir()).stat().st_mtime_ns
    native._load.cache_clear()
    assert native.npo_cpu_kernels() is not None  # from the cache, not rebuilt
    assert next((fresh_load / "native").iterdir()).stat().st_mtime_ns == built


def _noisy_logps_run():
    torch.manual_seed(0)
    hidden, lm_weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 5))
    head = NoiseHead(8, 20, sigma0=0.3)
    logps, sq, _ = noisy_sequence_logps(hidden, labels, lm_weight, head, save_bytes=0)
    (logps.sum() + sq).backward()
    return logps, head.weight.grad


@needs_compiler
def test_a_broken_build_falls_back_to_pytorch(fresh_load, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "npo_cpu.c"
    broken.write_text(native.SOURCE.read_text() + "\nthis is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="noisepo.native"):
        assert native.npo_cpu_kernels() is None
    assert "native CPU kernel unavailable" in caplog.text
    logps, grad = _noisy_logps_run()
    assert torch.isfinite(logps).all() and grad.abs().sum() > 0


@needs_compiler
def test_a_kernel_that_disagrees_with_pytorch_is_not_used(fresh_load, monkeypatch, tmp_path, caplog):
    source = native.SOURCE.read_text()
    assert "er[j] *= gate;" in source
    wrong = tmp_path / "npo_cpu.c"
    wrong.write_text(source.replace("er[j] *= gate;", "er[j] *= 1.001f * gate;"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    with caplog.at_level(logging.WARNING, logger="noisepo.native"):
        assert native.npo_cpu_kernels() is None
    assert "self-check: gate_at_target differs" in caplog.text


def test_no_compiler_means_pytorch_ops(fresh_load, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.npo_cpu_kernels() is None
    logps, grad = _noisy_logps_run()
    assert torch.isfinite(logps).all() and grad.abs().sum() > 0


def test_the_source_ships_with_the_package():
    assert native.SOURCE.is_file() and native.SOURCE.parent.name == "kernels"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"kernels/*.c"' in pyproject  # package data: wheels carry the C file
