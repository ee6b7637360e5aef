"""Two data-parallel processes (gloo, CPU) take the same step as one process with the same pairs.

Per process: batch 2 × accumulation 2; in total 8 pairs per step, as one process with batch 8.
With non-uniform weights this checks that the step loss is Σwℓ/Σw over both processes and every
micro-batch (the weight total is gathered; DDP's gradient averaging is undone).
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from launched import run_to_success as run

SCRIPT = textwrap.dedent('''
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from noisepo.training.preference import PreferenceTrainer

    model_dir, out, batch, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    weights = [1.0, 0.5, 2.0, 0.0, 1.5, 1.0, 3.0, 0.25]
    pairs = [{"prompt_ids": tokenizer.encode(f"{i}+{i * 3}="), "chosen_ids": tokenizer.encode(str(4 * i)) + [eos],
              "rejected_ids": tokenizer.encode("x" * (1 + i % 4)) + [eos], "weight": weights[i]} for i in range(8)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             max_steps=1, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = PreferenceTrainer(model, args, pairs, loss="dpo", beta=0.5, processing_class=tokenizer,
                                group_by_length=False)
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(trainer.model.state_dict(), out + "/params.pt")
    # A gloo group left alive can abort the process in its destructors at exit ("terminate called
    # without an active exception", -6) after the work is done; noisepo's own commands destroy it at
    # exit (noisepo.distributed), this bare script must do it itself.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


@pytest.mark.slow
def test_two_processes_equal_one(micro_model_dir, tmp_path):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run([sys.executable, str(script), micro_model_dir, str(one), "8", "1"])
    # torchrun, not `accelerate launch --cpu`, which starts a single process; the Trainer's accelerator
    # picks the process group up from the environment either way. --standalone: a free local port
    # for the rendezvous, so a busy 29500 (another job) cannot fail the test.
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         micro_model_dir, str(two), "2", "2"])
    single, distributed = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    for name, value in single.items():
        assert torch.allclose(value, distributed[name], atol=1e-6), name
