"""What the loggers get from CLARA, and under which names: one name per optimizer and param group as
Lightning's ``LearningRateMonitor`` gives it, and one controller's ``clara/*`` values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_clara.controller import CLARA

__all__ = ["controller_metrics", "optimizer_names", "show_in_progress_bar"]


def optimizer_names(optimizers: Sequence[Optimizer], lr_scheduler_configs: Sequence[Any] = ()) -> list[list[str]]:
    """Per optimizer, per param group, the name Lightning's ``LearningRateMonitor`` would use (without ``lr-``).

    Like the monitor, optimizers with a scheduler are named first, in the order of
    ``lr_scheduler_configs`` (``trainer.lr_scheduler_configs``), then the others: the scheduler
    config's ``name`` if it has one, else the optimizer's class name with ``-1``, ``-2`` ... for
    repeated classes; ``/pg1``, ``/pg2`` (or the group's ``name``) when there are several groups,
    ``/name`` for a single named group.
    """
    classes_seen: Counter[type] = Counter()
    bases: dict[int, str] = {}

    def name(optimizer: Optimizer, given: str | None) -> None:
        cls = type(optimizer)
        if given is None:
            classes_seen[cls] += 1  # counted again for a second scheduler on it, as the monitor does
        base = cls.__name__ if given is None else given.removeprefix("lr-")
        count = classes_seen[cls]
        bases.setdefault(id(optimizer), base if count <= 1 else f"{base}-{count - 1}")

    for config in lr_scheduler_configs:
        scheduler_optimizer = getattr(config.scheduler, "optimizer", None)
        if scheduler_optimizer is not None and any(scheduler_optimizer is optimizer for optimizer in optimizers):
            name(scheduler_optimizer, config.name)
    for optimizer in optimizers:
        if id(optimizer) not in bases:
            name(optimizer, None)
    out = []
    for optimizer in optimizers:
        base, groups = bases[id(optimizer)], optimizer.param_groups
        if len(groups) == 1:
            group_name = groups[0].get("name")
            out.append([f"{base}/{group_name}" if group_name else base])
        else:
            out.append([f"{base}/{group.get('name', f'pg{j + 1}')}" for j, group in enumerate(groups)])
    return out


def controller_metrics(controller: CLARA, names: Sequence[str]) -> dict[str, float]:
    """One controller's ``clara/*`` values per param group (none before its first adapted step)."""
    out: dict[str, float] = {}
    if controller.num_adapted_steps == 0:
        return out
    for name, lr, ratio, log_factor in zip(
        names, controller.lr_used, controller.ratios, controller.log_factors, strict=True
    ):
        out[f"clara/lr-{name}"] = lr
        out[f"clara/log_factor-{name}"] = log_factor
        if ratio is not None:
            out[f"clara/ratio-{name}"] = ratio
        if controller.safeguard is not None:
            out[f"clara/safeguard_alarms-{name}"] = float(controller.num_safeguard_alarms)
        if controller.num_skipped_updates:
            out[f"clara/skipped_updates-{name}"] = float(controller.num_skipped_updates)
    return out


def show_in_progress_bar(
    pl_module: Any, controllers: Sequence[CLARA], names: Sequence[Sequence[str]], stepped: Sequence[int]
) -> None:
    """Log the lr the ``stepped`` controllers used to the progress bar only (``clara_lr`` when the fit has a single
    param group, else ``clara_lr-{name}``). ``lr_used`` is a host float, logged as a CPU tensor: Lightning's
    result entry stays on the CPU, no copy to the device when it is logged nor back when the bar reads it."""
    single = sum(len(group_names) for group_names in names) == 1
    for index in stepped:
        for name, lr in zip(names[index], controllers[index].lr_used, strict=True):
            key = "clara_lr" if single else f"clara_lr-{name}"
            value = torch.tensor(lr, dtype=torch.float64)
            pl_module.log(key, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)


def log_to_loggers(trainer: Any, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger of the fit, on LearningRateMonitor's step axis (the steps that stepped)."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
