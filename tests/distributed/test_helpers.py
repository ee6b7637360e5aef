"""`noisepo.distributed` in one process (every helper is a no-op) and the memory arithmetic of
docs/distributed.md, worked by hand."""
from __future__ import annotations

import pytest

from noisepo import distributed
from noisepo.distributed import GIB, checkpointed_activations_gib, memory_estimate


def test_one_process_helpers_are_no_ops():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.gather(3) == [3]
    assert distributed.shard([[0, 1], [2, 3], [4]]) == [[0, 1], [2, 3], [4]]
    assert distributed.gather_indexed({2: "c", 0: "a"}) == {2: "c", 0: "a"}
    assert distributed.run_on_main(lambda: 7) == 7
    distributed.barrier()


def test_map_sharded_keeps_the_order_and_checks_the_count():
    calls = []

    def fn(chunk):
        calls.append(chunk)
        return [x * 10 for x in chunk]

    assert distributed.map_sharded([1, 2, 3, 4, 5], fn, chunk_size=2) == [10, 20, 30, 40, 50]
    assert calls == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="1 results for 2 items"):
        distributed.map_sharded([1, 2], lambda chunk: [0], chunk_size=2)


def test_shard_is_strided_by_rank(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(list(range(8))) == [1, 4, 7]


def test_no_relaunch_outside_accelerates_cpu_launcher(monkeypatch):
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.accelerate_cpu_processes() == 1
    assert distributed.relaunch_accelerate_cpu(["train"]) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of several processes (torchrun, mpirun)
    assert distributed.accelerate_cpu_processes() == 1


def test_the_cpu_process_count_is_read_from_accelerates_command_line(monkeypatch):
    import psutil

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    command = ["python", "accelerate", "launch", "--cpu", "--num_processes", "3", "-m", "noisepo", "train"]
    monkeypatch.setattr(psutil, "Process", lambda pid: type("P", (), {"cmdline": lambda self: command})())
    assert distributed.accelerate_cpu_processes() == 3
    command[5] = "1"
    assert distributed.accelerate_cpu_processes() == 1


P, D, V = 6.74e9, 4096, 32000  # Llama-2-7B


def test_memory_of_the_policy_by_strategy():
    """16 bytes per trained parameter: bf16 weight 2 + bf16 grad 2 + fp32 master 4 + Adam 8."""
    ddp = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="ddp", npo=False, reference_model=False)
    assert ddp["total"] == pytest.approx(16 * P / GIB)  # 100.4 GiB: 7B full fine-tuning does not fit DDP
    zero2 = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="zero2", npo=False, reference_model=False)
    assert zero2["total"] == pytest.approx((2 * P + 14 * P / 8) / GIB)  # 25.1 GiB
    for strategy in ("zero3", "fsdp"):
        full = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy=strategy, npo=False,
                               reference_model=False)
        assert full["total"] == pytest.approx(16 * P / 8 / GIB)  # 12.6 GiB


def test_memory_of_npo_reference_and_noise_head():
    """The d×V head: 4096·32000 + 32000 = 131,104,000 parameters, 16 bytes each in fp32 + AdamW
    (1.95 GiB), sharded only under FSDP; rank 64: 64·(4096 + 32000) + 32000 = 2,342,144."""
    full = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="zero3")
    assert full["noise_head_params"] == 131_104_000
    assert full["noise_head"] == pytest.approx(16 * 131_104_000 / GIB)
    assert full["reference_weights"] == pytest.approx(2 * P / GIB)  # bf16, on every GPU
    fp32 = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="zero3", reference_bytes=4)
    assert fp32["total"] - full["total"] == pytest.approx(2 * P / GIB)
    fsdp = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="fsdp")
    assert fsdp["noise_head"] == pytest.approx(full["noise_head"] / 8)
    low = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="ddp", noise_rank=64)
    assert low["noise_head_params"] == 2_342_144
    assert low["total"] == pytest.approx((16 * P + 2 * P + 16 * 2_342_144) / GIB)


def test_activation_assumption():
    """2 pairs (4 rows) × 1024 tokens × 4096 × (2·32 + 34) bytes = 1.53 GiB."""
    assert checkpointed_activations_gib(sequences=4, tokens=1024, hidden=4096, layers=32) == pytest.approx(
        4 * 1024 * 4096 * 98 / GIB)
    estimate = memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="fsdp", activations_gib=1.5)
    assert estimate["activations"] == 1.5
    with pytest.raises(ValueError, match="unknown strategy"):
        memory_estimate(params=P, hidden=D, vocab=V, gpus=8, strategy="zero1")
