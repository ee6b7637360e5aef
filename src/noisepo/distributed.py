"""Several processes (`accelerate launch`, `torchrun`): who am I, wait for the others, share results.

Everything here is a no-op in a single process, so library code calls it unconditionally. With a
process group (`torch.distributed`, initialised by `init()` or by accelerate/the Trainer) the loops
run on every rank: work is split by `shard` (whole batches, strided: rank r takes batches r, r+W,
r+2W, ...), results come back to every rank through `gather_indexed`, and only the main process
writes files (`is_main`). A batch is the same batch whatever the number of processes, so results do
not depend on it (generation is also seeded per prompt, `noisepo.generation.base.sample_seed`).

`memory_estimate` is the arithmetic behind docs/distributed.md (per-GPU memory of DNPO/ROPO on 7B).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
# How long a rank waits at a collective: the others wait while the main process alone evaluates
# (greedy generation on the held-out prompts, lm-eval) or writes a 70B checkpoint.
TIMEOUT_SECONDS = 4 * 3600
log = logging.getLogger(__name__)


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE, or MPI's), 1 when none."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def accelerator_available() -> bool:
    """A GPU (or another torch accelerator) is present; without one, processes talk over gloo."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def init() -> None:
    """Join the launcher's process group once (a no-op for one process or when already joined).

    Uses accelerate's `PartialState`, as the Trainer does, so the backend (nccl on GPUs, gloo on
    CPUs) and each rank's device are the ones training will use; the Trainer created later in the
    same process finds the group initialised and reuses it.
    """
    warn_single_cpu_launch()
    if launched_world_size() <= 1:
        return
    if _dist() is None:
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(cpu=not accelerator_available(), timeout=timedelta(seconds=TIMEOUT_SECONDS))
    _destroy_at_exit()


_EXIT_HOOKED = False


def _destroy_at_exit() -> None:
    """Destroy the process group when the interpreter exits: a gloo group left alive can abort the
    process in its C++ destructors ("terminate called without an active exception", exit -6) after
    all the work is done, which a launcher reports as a failed run."""
    global _EXIT_HOOKED
    if _EXIT_HOOKED:
        return
    import atexit

    def destroy() -> None:
        dist = _dist()
        if dist is not None:
            try:
                dist.destroy_process_group()
            except Exception as err:  # exiting anyway: say why, never mask the run's own exit status
                log.debug("destroy_process_group at exit: %s", err)

    atexit.register(destroy)
    _EXIT_HOOKED = True


def accelerate_cpu_processes() -> int:
    """N when this process was started by `accelerate launch --cpu --num_processes N` (N > 1) on one
    machine, else 1. accelerate runs several CPU processes only through mpirun (`--mpirun_hostfile`,
    `accelerate config`); otherwise its simple launcher starts ONE process, setting MASTER_ADDR but
    no WORLD_SIZE or LOCAL_RANK. N is read from the launcher's own command line with accelerate's
    own argument parser."""
    if not (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and os.environ.get("MASTER_ADDR")
            and launched_world_size() == 1 and "LOCAL_RANK" not in os.environ):
        return 1
    try:
        import psutil
        from accelerate.commands.launch import launch_command_parser

        command = psutil.Process(os.getppid()).cmdline()
        at = next(i for i, word in enumerate(command) if word == "launch")
        args, _ = launch_command_parser().parse_known_args(command[at + 1:])
    except Exception:  # not accelerate's launcher after all, or an unreadable parent: leave it be
        return 1
    if args.mpirun_hostfile or (args.num_machines or 1) > 1 or not args.num_processes:
        return 1
    return int(args.num_processes)


def relaunch_accelerate_cpu(argv: list[str]) -> int | None:
    """`accelerate launch --cpu --num_processes N -m noisepo ...` (N > 1): run the command in N
    processes with torch's launcher (`torch.distributed.run --standalone`, gloo), as accelerate does
    for GPUs, and return their exit status; None when there is nothing to relaunch."""
    processes = accelerate_cpu_processes()
    if processes <= 1:
        return None
    import subprocess
    import sys

    log.warning("accelerate launch --cpu starts one process; noisepo starts the %d asked for with "
                "torch.distributed.run --standalone (docs/distributed.md)", processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "noisepo", *argv]
    return subprocess.call(command)


def warn_single_cpu_launch() -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process (accelerate runs several CPU
    processes only through mpirun: `--mpirun_hostfile` / `accelerate config`); it sets MASTER_ADDR
    but no WORLD_SIZE. Say so, instead of silently training on one process."""
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and os.environ.get("MASTER_ADDR")
            and launched_world_size() == 1 and "LOCAL_RANK" not in os.environ):
        log.warning("accelerate launch --cpu started a single process (accelerate starts several CPU processes "
                    "only through mpirun). For N CPU processes run: accelerate launch --config_file "
                    "configs/accelerate/cpu.yaml --num_processes N ..., or torchrun --nproc_per_node N "
                    "-m noisepo ... (docs/distributed.md)")


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def broadcast(value: T) -> T:
    """The main process's `value` on every rank (any picklable object)."""
    dist = _dist()
    if not dist:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    dist = _dist()
    if not dist:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's share of `batches`: rank r of W takes r, r+W, r+2W, ... (deterministic, and each
    batch is exactly the batch one process would form)."""
    return list(batches[rank()::world_size()])


def gather_indexed(local: dict[int, T]) -> dict[int, T]:
    """Merge every rank's {index: result} (disjoint keys) into one dict, on every rank."""
    if world_size() == 1:
        return local
    merged: dict[int, T] = {}
    for part in gather(local):
        merged.update(part)
    return merged


def map_sharded(items: Sequence[T], fn: Callable[[list[T]], list], *, chunk_size: int) -> list:
    """`fn` over `items` in chunks of `chunk_size`, the chunks shared among the ranks; returns every
    result in the order of `items`, on every rank (`fn(chunk)` gives one result per item)."""
    chunks = [list(range(s, min(s + chunk_size, len(items)))) for s in range(0, len(items), chunk_size)]
    local: dict[int, Any] = {}
    for indices in shard(chunks):
        results = fn([items[i] for i in indices])
        if len(results) != len(indices):
            raise ValueError(f"{len(results)} results for {len(indices)} items")
        local.update(zip(indices, results))
    merged = gather_indexed(local)
    return [merged[i] for i in range(len(items))]


def run_on_main(fn: Callable[[], T]) -> T:
    """`fn()` on the main process only; its result on every rank. An error on the main process is
    raised on every rank (the others would otherwise wait for it forever)."""
    if world_size() == 1:
        return fn()
    from noisepo.errors import NoisepoError

    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as err:  # re-raised below, on every rank
            error = err
    failure = None if error is None else (isinstance(error, NoisepoError), str(error))
    result, failure = broadcast((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        user_error, message = failure
        raise (NoisepoError if user_error else RuntimeError)(message)
    return result


# ---------------------------------------------------------------------- memory estimate
GIB = 2**30


def memory_estimate(*, params: float, hidden: int, vocab: int, gpus: int, strategy: str,
                    noise_rank: int | None = None, npo: bool = True, reference_model: bool = True,
                    reference_bytes: int = 2, activations_gib: float = 0.0) -> dict[str, float]:
    """Per-GPU memory (GiB) of one training stage, as noisepo runs it; `total` sums the parts.

    strategy: "ddp" (everything replicated), "zero2" (gradients and optimizer state sharded over
    `gpus`, weights replicated), "zero3" / "fsdp" (weights, gradients and optimizer state sharded).
    Trained policy: 16 bytes per parameter in mixed precision: bf16 weight (2) + bf16 gradient (2) +
    fp32 master weight (4) + AdamW m and v (8); FSDP2 with fp32 sharded parameters and bf16 compute
    comes to the same 4 + 4 + 8.
    Frozen reference (`reference_model`: NPO keeps it for the rejected side's hidden states; DPO with
    precomputed log-probs, SPIN and ROPO do not): a copy of the policy as loaded, `reference_bytes` per
    parameter (2: `--dtype bfloat16`; 4: float32), on every GPU whatever the strategy (the Trainer
    does not hand the reference to accelerate, so it is not sharded).
    NPO noise head: d×V (rank r: r×d + V×r) plus a V bias, trained in fp32: weight (4) + gradient (4)
    + AdamW m and v (8) = 16 bytes per parameter; sharded under "fsdp" (`distribute_noise_head`),
    replicated under DDP and DeepSpeed (it is outside the DeepSpeed engine).
    `activations_gib` is added as given (an assumption: see `checkpointed_activations_gib`).
    """
    if strategy not in ("ddp", "zero2", "zero3", "fsdp"):
        raise ValueError(f"unknown strategy {strategy!r}")
    sharded_weights = strategy in ("zero3", "fsdp")
    weight = 2 * params / (gpus if sharded_weights else 1)
    gradient = 2 * params / (1 if strategy == "ddp" else gpus)
    optimizer = 12 * params / (1 if strategy == "ddp" else gpus)  # fp32 master + AdamW m and v
    reference = reference_bytes * params if reference_model else 0.0
    head_params = 0.0
    if npo:
        head_params = (hidden * vocab if noise_rank is None else noise_rank * (hidden + vocab)) + vocab
    head = 16 * head_params / (gpus if strategy == "fsdp" else 1)
    parts = {"policy_weights": weight, "policy_gradients": gradient, "optimizer_state": optimizer,
             "reference_weights": reference, "noise_head": head}
    out = {name: value / GIB for name, value in parts.items()}
    out["activations"] = activations_gib
    out["total"] = sum(out.values())
    out["noise_head_params"] = head_params
    return out


def checkpointed_activations_gib(*, sequences: int, tokens: int, hidden: int, layers: int) -> float:
    """Activation memory (GiB) of one micro-batch with gradient checkpointing, in bf16: every layer's
    input is kept (2·s·b·h bytes per layer) and one layer at a time is recomputed with its
    intermediates (about 34·s·b·h bytes with flash attention: Korthikanti et al. 2022, table 2).
    `sequences` counts rows: a preference pair is two (chosen and rejected). The LM head's log-probs
    are chunked (`noisepo.logprobs`), so no (tokens × V) tensor is added."""
    return sequences * tokens * hidden * (2 * layers + 34) / GIB
