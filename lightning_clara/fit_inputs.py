"""What :class:`~lightning_clara.callback.CLARACallback` reads from a Lightning fit: its length, each step's loss,
and the options its controllers run with."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, GradientAccumulationScheduler, StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clara.distributed import Sharding
from lightning_clara.options import CLARAOptions

__all__ = ["estimated_steps", "fit_options", "step_loss"]


def fit_options(trainer: pl.Trainer, options: CLARAOptions, sharding: Sharding | None) -> CLARAOptions:
    """The options of this fit's controllers: the strategy's sharding, and the anneal left at None turned off in
    a fit with an lr scheduler, or a callback that schedules the lr later (SWA's SWALR, BackboneFinetuning), where
    the anneal would stack on a late first change, or with manual optimization (the fit's estimate counts batches,
    not each optimizer's steps)."""
    changes: dict[str, Any] = {} if sharding is None else {"sharding": sharding}
    callbacks = getattr(trainer, "callbacks", ())  # absent on stand-ins
    scheduling = any(isinstance(c, (StochasticWeightAveraging, BaseFinetuning)) for c in callbacks)
    scheduled = scheduling or bool(getattr(trainer, "lr_scheduler_configs", ()))
    manual = not getattr(getattr(trainer, "lightning_module", None), "automatic_optimization", True)
    if options.anneal is None and (scheduled or manual):
        changes["anneal"] = False
    return dataclasses.replace(options, **changes) if changes else options


def estimated_steps(trainer: pl.Trainer) -> int | None:
    """Each optimizer's number of steps in the fit, or None where it is unknown or infinite.

    The Trainer's estimate, corrected where it is not each optimizer's count: a
    :class:`~lightning.pytorch.callbacks.GradientAccumulationScheduler` sets ``accumulate_grad_batches`` only
    as each epoch starts (the estimate would use 1), and under manual optimization with several optimizers
    ``max_steps`` bounds their steps together, in shares only the user's ``training_step`` knows.
    """
    try:
        if not trainer.lightning_module.automatic_optimization and len(trainer.optimizers) > 1:
            return None
        steps = trainer.estimated_stepping_batches
        callbacks = getattr(trainer, "callbacks", ())  # a property Lightning sets, not declared on the class
        schedule = next((c for c in callbacks if isinstance(c, GradientAccumulationScheduler)), None)
        if schedule is not None and math.isfinite(steps) and trainer.max_epochs not in (None, -1):
            steps = _scheduled_accumulation_steps(trainer, schedule, steps)
    except Exception:  # a stand-in trainer, or a loader without a length: the defaults apply
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps < 1:
        return None
    return int(steps)


def _scheduled_accumulation_steps(trainer: pl.Trainer, schedule: GradientAccumulationScheduler, steps: float) -> float:
    """The fit's optimizer steps with the accumulation each epoch will have (``steps``: where batches are unknown)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or trainer.max_epochs is None:
        return steps
    epochs = range(max(trainer.max_epochs, 1))
    total = sum(math.ceil(batches / schedule.get_accumulate_grad_batches(e)) for e in epochs)
    return total if trainer.max_steps == -1 else min(total, trainer.max_steps)


def step_loss(trainer: pl.Trainer, outputs: Any) -> Any:
    """The loss of the batch the step's gradient came from, as CLARA takes it (None where there is none).

    Under gradient accumulation it is the last micro-batch's, at its own scale (Lightning's ``outputs``
    hold it divided by ``accumulate_grad_batches``, which a scheduler may change). Under DDP each rank
    holds the loss of its own shard of the batch: the mean over ranks (one all-reduce, which every rank
    runs here, without the barrier Lightning's ``reduce`` puts before it: that one blocks the host on the
    GPU) gives every rank the same loss brake and the same alarms, so F and the restored parameters stay
    identical across ranks. The batch's ``outputs`` keep their own loss. A manual ``training_step`` may
    return a loss that is not a 0-dim tensor (per-sample losses): it is not CLARA's, and is left out (decided
    by its shape, which is the same on every rank, so every rank joins the all-reduce or none does).
    """
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        return loss
    automatic = trainer.lightning_module.automatic_optimization
    if loss.numel() != 1 or (not automatic and loss.dim() != 0):  # by shape alone: every rank decides alike
        rank_zero_warn(
            "CLARACallback: training_step returned a 'loss' that is not a 0-dim tensor (per-sample losses?); the "
            "loss brake gets none from it (return the scalar loss under 'loss', or call observe_loss yourself)"
        )
        return None
    scale = trainer.accumulate_grad_batches if automatic else 1
    loss = loss.detach() * scale  # a new tensor: the reduce below runs in place on it, not on the outputs
    if trainer.world_size > 1:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
            loss /= trainer.world_size
        else:  # a strategy that reduces without torch.distributed (XLA)
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
    return loss
