"""NPO's noise head under several processes: FSDP2 shards it (its d×V weight split by rows, as FSDP
splits the LM head) and DDP replicates it; either way 2 CPU processes (gloo) train it as 1 process
does on the same pairs.

The whole NPOTrainer cannot run FSDP on CPU: accelerate turns FSDP on only for GPU-like
distributed types (accelerate/state.py: `DistributedType.FSDP` is set from the MULTI_GPU/XPU/...
branch, never from MULTI_CPU), and with `use_cpu` the Trainer silently falls back to DDP. So this
test drives the head through `distribute_noise_head` directly, with real FSDP2 on a CPU mesh.

Each step every rank computes the noisy log-probs of its own tokens, with ε drawn from a seed of
(step, rank); the 1-process run computes both ranks' terms with the same seeds and averages them,
which is what FSDP's reduce-scatter and DDP's all-reduce do to the gradients.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from launched import run_to_success as run

SCRIPT = textwrap.dedent('''
    import sys, torch
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from noisepo.noise import NoiseHead, noisy_token_logps
    from noisepo.training.npo import _NoisyReference, _full, distribute_noise_head

    out, mode = sys.argv[1], sys.argv[2]
    D, V, N, STEPS = 16, 48, 10, 3
    distributed = mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    world, me = (dist.get_world_size(), dist.get_rank()) if distributed else (2, None)


    class Accelerator:
        num_processes = world if distributed else 1
        distributed_type = DistributedType.FSDP if mode == "fsdp" else DistributedType.MULTI_CPU


    def data(step, r):
        g = torch.Generator().manual_seed(100 * step + r)
        return torch.randn(N, D, generator=g), torch.randint(0, V, (N,), generator=g)


    def train(noise_rank):
        torch.manual_seed(0)
        head = NoiseHead(D, V, rank=noise_rank, sigma0=0.5)
        lm_weight = torch.randn(V, D) * 0.3
        module = distribute_noise_head(_NoisyReference(head), Accelerator())
        if mode == "fsdp":  # each rank holds half the rows of every parameter, as FSDP holds the LM head
            assert all(p.to_local().shape[0] == p.shape[0] // world for p in head.parameters())
        elif distributed:
            assert isinstance(module, torch.nn.parallel.DistributedDataParallel)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.05)

        def term(step, r):
            states, targets = data(step, r)
            torch.manual_seed(10_000 + 100 * step + r)  # the call draws its ε seed from the global RNG
            logps, sq_sum, _ = module(noisy_token_logps, states, targets, lm_weight, chunk_size=4)
            return -logps.sum() + sq_sum / (N * V)

        for step in range(STEPS):
            ranks = [me] if distributed else range(world)
            loss = sum(term(step, r) for r in ranks) / len(ranks)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = {k: _full(v).detach().clone() for k, v in head.state_dict().items()}
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, {k: v.sum().item() for k, v in state.items()})
            assert gathered[0] == gathered[1], gathered  # every rank holds the same head
        return state


    states = {str(rank): train(rank) for rank in (None, 4)}  # the paper's full head, a low-rank one
    if not distributed or dist.get_rank() == 0:
        torch.save(states, out)
    if distributed:
        dist.barrier()  # rank 0 has finished writing: tear gloo down together, never under a busy peer
        dist.destroy_process_group()
''')


@pytest.mark.slow
def test_sharded_and_replicated_heads_train_as_one_process(tmp_path):
    script = tmp_path / "head.py"
    script.write_text(SCRIPT)
    single = tmp_path / "single.pt"
    run([sys.executable, str(script), str(single), "single"])
    expected = torch.load(single)
    for heads in expected.values():  # trained: the bias is no longer uniform
        assert heads["bias"].max() - heads["bias"].min() > 1e-3
    for mode in ("fsdp", "ddp"):
        out = tmp_path / f"{mode}.pt"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
             str(out), mode])
        got = torch.load(out)
        for noise_rank, heads in expected.items():
            assert set(got[noise_rank]) == set(heads)
            for name, value in heads.items():
                difference = (got[noise_rank][name] - value).abs().max()
                assert torch.allclose(got[noise_rank][name], value, atol=1e-6), (mode, noise_rank, name, difference)
