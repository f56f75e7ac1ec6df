"""What :class:`~lightning_clara.callback.CLARACallback` reads from a Lightning fit: its length and each step's loss."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["estimated_steps", "step_loss"]


def estimated_steps(trainer: pl.Trainer) -> int | None:
    """The Trainer's estimate of the fit's optimizer steps, or None where it is unknown or infinite."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # a stand-in trainer, or a loader without a length: the defaults apply
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps < 1:
        return None
    return int(steps)


def step_loss(trainer: pl.Trainer, outputs: Any) -> Any:
    """The loss of the batch the step's gradient came from, as CLARA takes it (None where there is none).

    Under gradient accumulation it is the last micro-batch's, at its own scale (Lightning's ``outputs``
    hold it divided by ``accumulate_grad_batches``, which a scheduler may change). Under DDP each rank
    holds the loss of its own shard of the batch: the mean over ranks (one small all-reduce, which every
    rank runs here) gives every rank the same loss brake and the same alarms, so F and the restored
    parameters stay identical across ranks. The batch's ``outputs`` keep their own loss.
    """
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        return loss
    scale = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
    loss = loss.detach() * scale  # a new tensor: the reduce below runs in place on it, not on the outputs
    if trainer.world_size > 1:
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
    return loss
