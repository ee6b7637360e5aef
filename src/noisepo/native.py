"""Native CPU kernels, compiled at first use with the machine's C compiler (NPO's noisy log-softmax).

On CPU, eager PyTorch makes ~15 passes over each (positions × V) block of NPO's noisy reference
(`noise.py`); `kernels/npo_cpu.c` makes three, a row at a time in cache, with one exp shared by the
sigmoid and the softplus, and draws ε ~ N(0, 1) from a counter-based generator (SplitMix64 and
Box–Muller, vectorised) ~4× faster than torch's serial CPU generator. With the kernels, ε is that
stream (seeded from torch's global generator, so `torch.manual_seed` still fixes a run); without
them, torch.randn: a run's noise differs between the two, its distribution does not. It is plain C (no PyTorch headers): compiling takes about a second, and
the library is loaded through ctypes, which releases the GIL, so rows are split over
`torch.get_num_threads()` threads.

Optional by design: with no compiler, a failed build, a self-check that disagrees with PyTorch, or
`NOISEPO_NATIVE=0`, `npo_cpu_kernels()` returns None and `noise.py` runs its PyTorch ops (the same
numbers to float rounding). GPUs never use it. The library is cached under `NOISEPO_CACHE_DIR`
(default `~/.cache/noisepo`), keyed by the source, the compiler and the CPU (it is built with
`-march=native`); concurrent processes (DDP ranks) each build to a temporary file and rename it.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "npo_cpu.c"
# -ffast-math lets GCC call glibc's vectorised exp and log1p; the second set is for compilers that
# reject -march=native. The kernel is checked against PyTorch after loading (`_self_check`).
FLAG_SETS = (["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], ["-O3", "-ffast-math"])
# Rows per thread below which splitting a call over threads costs more than it saves.
MIN_ROWS_PER_THREAD = 16
MIN_BLOCKS_PER_THREAD = 64


def enabled() -> bool:
    return os.environ.get("NOISEPO_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("NOISEPO_CACHE_DIR"):
        return Path(os.environ["NOISEPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "noisepo"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its instruction-set flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(dict.fromkeys(lines))


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU: cached, or compiled now (atomically)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, repr(FLAG_SETS),
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    folder = cache_dir() / "native"
    target = folder / f"npo_cpu-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(prefix=".npo_cpu-", suffix=".so", dir=folder)
        os.close(fd)
        obj = tmp[:-3] + ".o"
        # Compile and link apart: GCC < 13 links crtfastmath.o into a -ffast-math shared library, whose
        # loading would set flush-to-zero for the whole process (every PyTorch op after it).
        steps = ([compiler, *flags, "-fPIC", "-c", str(SOURCE), "-o", obj], [compiler, "-shared", obj, "-o", tmp, "-lm"])
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if result.returncode:
                break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(obj)
        if result.returncode == 0:
            os.replace(tmp, target)  # a concurrent build of the same key writes the same bytes
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("; ".join(errors))


class NPOKernels:
    """Typed wrappers over the compiled library; every array is checked to be CPU float32 (int64
    targets) and contiguous before its pointer is passed."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._forward = library.npo_forward
        self._forward.argtypes = [size, size] + [pointer] * 10 + [ctypes.c_float]
        self._forward.restype = None
        self._backward = library.npo_backward
        self._backward.argtypes = [size, size, pointer, pointer, pointer, pointer, ctypes.c_float, pointer, pointer]
        self._backward.restype = None
        self._normal = library.normal_fill
        self._normal.argtypes = [ctypes.c_uint64, size, size, pointer]
        self._normal.restype = None
        library.normal_block_size.restype = size
        self.normal_block = library.normal_block_size()

    @staticmethod
    def _parts(rows: int) -> list[slice]:
        threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
        step = -(-rows // threads) if rows else 1
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]

    @staticmethod
    def _run(calls) -> None:
        if len(calls) == 1:
            calls[0]()
            return
        futures = [_pool().submit(call) for call in calls[1:]]
        calls[0]()
        for future in futures:
            future.result()

    def normal(self, seed: int, shape) -> torch.Tensor:
        """A float32 CPU tensor of N(0, 1) values: the stream of `seed` (0 <= seed < 2**64), in order."""
        out = torch.empty(shape, dtype=torch.float32)
        flat, count = out.view(-1), out.numel()
        if count == 0:
            return out
        blocks = -(-count // self.normal_block)
        threads = max(1, min(torch.get_num_threads(), blocks // MIN_BLOCKS_PER_THREAD))
        step = -(-blocks // threads) * self.normal_block
        self._run([functools.partial(self._normal, seed, start, min(step, count - start), flat[start:].data_ptr())
                   for start in range(0, count, step)])
        return out

    def forward(self, noisy: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, eps: torch.Tensor,
                targets: torch.Tensor, sigma_max: float = 0.0):
        """noisy (n, V) reference logits, u (n, V) = W_σ g without the bias, bias (V,), eps (n, V),
        targets (n,). Overwrites noisy with scratch, u with Q/2 = σ ⊙ sigmoid(u + b) and eps with
        P = ε ⊙ sigmoid(u + b) ⊙ softmax(z̃). Returns per row: target log-prob, logsumexp of z̃, Σσ²,
        Σσ, and ε ⊙ sigmoid at the target (each (n,) float32). `sigma_max` > 0: the bounded head
        σ = sigma_max·sigmoid(u + b), whose dσ/du replaces sigmoid(u + b) ("the gate") above."""
        rows, vocab = noisy.shape
        _check(noisy, u, eps, shape=(rows, vocab))
        _check(bias, shape=(vocab,))
        _check_targets(targets, rows, vocab)
        outputs = [noisy.new_empty(rows) for _ in range(5)]
        calls = [functools.partial(self._forward, part.stop - part.start, vocab, noisy[part].data_ptr(),
                                   u[part].data_ptr(), bias.data_ptr(), eps[part].data_ptr(),
                                   targets[part].data_ptr(), *(out[part].data_ptr() for out in outputs),
                                   float(sigma_max))
                 for part in self._parts(rows)]
        self._run(calls)
        _written(noisy, u, eps)
        return tuple(outputs)

    def backward(self, q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, scale: float,
                 gate_at_target: torch.Tensor) -> torch.Tensor:
        """du = scale · q − grad ⊙ p (+ grad · gate_at_target at each target), written over q.
        Returns du's column sums (V,), the bias's gradient."""
        rows, vocab = q.shape
        _check(q, p, shape=(rows, vocab))
        _check(grad, gate_at_target, shape=(rows,))
        _check_targets(targets, rows, vocab)
        parts = self._parts(rows)
        sums = q.new_zeros(len(parts), vocab)
        calls = [functools.partial(self._backward, part.stop - part.start, vocab, q[part].data_ptr(),
                                   p[part].data_ptr(), targets[part].data_ptr(), grad[part].data_ptr(), scale,
                                   gate_at_target[part].data_ptr(), sums[index].data_ptr())
                 for index, part in enumerate(parts)]
        self._run(calls)
        _written(q)
        return sums.sum(0) if len(parts) > 1 else sums[0]


def _written(*tensors: torch.Tensor) -> None:
    """Bump autograd's version counters as an in-place op would: the C code wrote through pointers,
    and a second backward through blocks it overwrote must raise, not read them."""
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)


def _check(*tensors: torch.Tensor, shape: tuple) -> None:
    for tensor in tensors:
        if (type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu"
                or tensor.dtype != torch.float32 or not tensor.is_contiguous() or tuple(tensor.shape) != shape):
            raise ValueError(f"native NPO kernel: expected a contiguous CPU float32 tensor of shape {shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")


def _check_targets(targets: torch.Tensor, rows: int, vocab: int) -> None:
    if targets.dtype != torch.int64 or not targets.is_contiguous() or tuple(targets.shape) != (rows,):
        raise ValueError(f"native NPO kernel: targets must be contiguous int64 of shape ({rows},)")
    # the C code indexes with them: out of range would read and write outside the row
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise IndexError(f"target token id out of range [0, {vocab})")


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="noisepo-native")


@functools.lru_cache(maxsize=1)
def _load() -> NPOKernels | None:
    compiler = _compiler()
    if compiler is None:
        log.info("NPO: no C compiler found (set CC); using PyTorch ops on CPU")
        return None
    try:
        path = _build(compiler)
        kernels = NPOKernels(ctypes.CDLL(str(path)), path)
        _self_check(kernels)
    except Exception as error:  # any failure leaves the PyTorch path, which gives the same numbers
        log.warning("NPO: native CPU kernel unavailable (%s); using PyTorch ops", error)
        return None
    return kernels


def npo_cpu_kernels() -> NPOKernels | None:
    """The compiled NPO kernels, or None (disabled, no compiler, build or self-check failed)."""
    return _load() if enabled() else None


def loaded_kernels() -> NPOKernels | None:
    """The kernels if a call already loaded them (whatever NOISEPO_NATIVE says now)."""
    return _load() if _load.cache_info().currsize else None


def reference_forward(noisy, u, bias, eps, targets, sigma_max: float = 0.0):
    """What `NPOKernels.forward` computes, in PyTorch ops (the self-check and the tests)."""
    pre = u + bias
    gate, sigma = torch.sigmoid(pre), torch.nn.functional.softplus(pre)
    if sigma_max > 0:  # the bounded head: σ = σ_max·sigmoid, dσ/du = σ·(1 − sigmoid)
        sigma = sigma_max * gate
        gate = sigma * (1 - gate)
    z = noisy + sigma * eps
    lse = torch.logsumexp(z, -1)
    column = targets[:, None]
    p = eps * gate
    return {"logps": z.gather(1, column).squeeze(1) - lse, "lse": lse, "sq": sigma.square().sum(-1),
            "total": sigma.sum(-1), "gate_at_target": p.gather(1, column).squeeze(1),
            "q": sigma * gate, "p": p * torch.softmax(z, -1)}


def _self_check(kernels: NPOKernels) -> None:
    """Run the kernels once against PyTorch on a small case with saturated and tiny entries."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 5, 37  # 37: not a multiple of any vector width
    noisy = torch.randn(rows, vocab, generator=generator) * 5
    u = torch.randn(rows, vocab, generator=generator) * 10
    u[0, :4] = torch.tensor([30.0, -30.0, 19.9, -80.0])
    bias = torch.randn(vocab, generator=generator)
    eps = torch.randn(rows, vocab, generator=generator)
    targets = torch.tensor([0, 36, 5, 17, 3])
    for sigma_max in (2.5, 0.0):  # the bounded head, then softplus (whose q, p the backward checks)
        expected = reference_forward(noisy, u, bias, eps, targets, sigma_max)
        q, p = u.clone(), eps.clone()
        got = dict(zip(("logps", "lse", "sq", "total", "gate_at_target"),
                       kernels.forward(noisy.clone(), q, bias, p, targets, sigma_max)))
        got.update(q=q, p=p)
        for name, value in expected.items():
            if not torch.allclose(got[name], value, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"self-check: {name} differs from PyTorch by {(got[name] - value).abs().max():.3g}"
                                   f" (sigma_max {sigma_max})")
    grad = torch.randn(rows, generator=generator)
    du = 0.3 * expected["q"] - grad[:, None] * expected["p"]
    du[torch.arange(rows), targets] += grad * expected["gate_at_target"]
    bias_grad = kernels.backward(q, p, targets, grad, 0.3, got["gate_at_target"])
    if not (torch.allclose(q, du, rtol=1e-4, atol=1e-5) and torch.allclose(bias_grad, du.sum(0), rtol=1e-4, atol=1e-5)):
        raise RuntimeError("self-check: the backward differs from PyTorch")
    normals = kernels.normal(2**63 + 5, (3, 12_345)).double()  # odd sizes: a partial block and a lone cosine
    if not torch.equal(kernels.normal(2**63 + 5, (3, 12_345)), normals.float()) or torch.equal(
            kernels.normal(2**63 + 6, (3, 12_345)), normals.float()):
        raise RuntimeError("self-check: the normal stream is not a function of its seed")
    if not (abs(normals.mean()) < 0.05 and abs(normals.var() - 1) < 0.05 and normals.abs().max() < 6):
        raise RuntimeError(f"self-check: normal draws with mean {normals.mean():.3g}, variance {normals.var():.3g}")
