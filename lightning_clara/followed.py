"""Which optimizers a Lightning fit steps, and which controllers follow them (the callback's bookkeeping).

Another callback may build the optimizers again mid-fit (``trainer.strategy.setup_optimizers``) or assign
``trainer.optimizers``; a resume matches CLARA's states to optimizers by position. So the controllers are
kept in the trainer's order, new optimizers attached before their first step, and dropped ones let go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch.optim import Optimizer

from lightning_clara.admission import unwrap

if TYPE_CHECKING:
    from lightning_clara.controller import CLARA

__all__ = ["changed", "count_at", "follow", "has_parameters"]


def has_parameters(optimizer: Optimizer) -> bool:
    """False for Lightning's parameter-less stand-in (a fit whose configure_optimizers returned None)."""
    return any(group["params"] for group in optimizer.param_groups)


def count_at(counts: Sequence[int], index: int | None) -> int:
    """A controller's count kept across a reordering (0 for one attached since)."""
    return counts[index] if index is not None and index < len(counts) else 0


def changed(counts: Sequence[int], before: Sequence[int]) -> list[int]:
    """The indices whose count differs from ``before`` (an optimizer attached since counts from 0)."""
    return [index for index, count in enumerate(counts) if count != (before[index] if index < len(before) else 0)]


def follow(
    controllers: list[CLARA], optimizers: Sequence[Optimizer], attach: Callable[[Optimizer], CLARA]
) -> tuple[list[tuple[int | None, CLARA]], list[CLARA]] | None:
    """The controllers of ``optimizers`` in their order, each with its former index (None: attached now), and
    those let go; None when nothing changed (nearly every batch). An optimizer someone else attached CLARA to
    is left alone. ``attach`` makes a controller; each one is appended to ``controllers`` at once, so that if
    a later one is refused, the caller's exception handling finds and detaches it."""
    ours = {id(c.optimizer): (i, c) for i, c in enumerate(controllers)}
    live = [
        o
        for o in map(unwrap, optimizers)
        if has_parameters(o) and (id(o) in ours or getattr(o, "_clara_controller", None) is None)
    ]
    if [id(o) for o in live] == list(ours):
        return None
    kept: list[tuple[int | None, CLARA]] = []
    for optimizer in live:
        index, controller = ours.pop(id(optimizer), (None, None))
        if controller is None:
            controller = attach(optimizer)
            controllers.append(controller)
        kept.append((index, controller))
    return kept, [controller for _, controller in ours.values()]
