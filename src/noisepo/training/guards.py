"""Stop training at the first NaN or inf loss, before it reaches the weights or a checkpoint.

A non-finite loss gives non-finite gradients, and one optimizer step with them turns every weight
into NaN; every checkpoint saved after that is useless, and a long run would go on for hours
writing them. `FiniteLossGuard` is mixed into the trainers (`PreferenceTrainer`, hence NPO, and
SFT's `SFTTrainer`): it checks the loss of every micro-batch right after its backward pass and,
when it is not finite, raises `NonFiniteLossError` naming the step. The optimizer step of that
batch has not run and the Trainer saves no checkpoint on the way out, so the checkpoint folders
already in OUTPUT (`checkpoint-N`, written every `--save-steps`) hold the last good state and
`--resume` continues from the newest of them.

The check costs one device sync per micro-batch (a 0-d tensor read back), nothing else.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from noisepo.errors import NoisepoError


class NonFiniteLossError(NoisepoError):
    """Training produced a NaN or inf loss; nothing from that step was applied or saved."""

    exit_code = 3  # not bad input (2): the run itself diverged


def last_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir`, or None."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return str(max(folders, key=lambda p: int(p.name.split("-")[-1]))) if folders else None


def non_finite_loss_error(value: float, step: int, output_dir) -> NonFiniteLossError:
    checkpoint = last_checkpoint(output_dir) if output_dir else None
    kept = (f"the last good checkpoint is {checkpoint} (rerun with --resume to continue from it)"
            if checkpoint else "no checkpoint was written before it")
    return NonFiniteLossError(f"training stopped at step {step}: the loss is {value} (not finite); nothing "
                              f"of this step was applied or saved, {kept}. Lower the learning rate or β, "
                              "or check the data")


class FiniteLossGuard:
    """Trainer mixin: `training_step` raises `NonFiniteLossError` on a NaN or inf loss.

    Place it before `transformers.Trainer` in the bases: `class T(FiniteLossGuard, Trainer)`.
    """

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not bool(torch.isfinite(loss.detach()).all()):
            step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
            raise non_finite_loss_error(float(loss.detach().float().mean()), step, self.args.output_dir)
        return loss


class GuardedTrainer(FiniteLossGuard, Trainer):
    """`transformers.Trainer` with the finite-loss check (what `noisepo sft` trains with)."""
