"""The learning-rate swap: while ``optimizer.step()`` runs each group's lr is the lr used, outside it the base.

So a scheduler only ever sees and sets the base lr, and the lr used is ``lr_scheduled * F``. A tensor
lr (capturable optimizers) is filled in place and restored from a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["LearningRateSwap"]


class LearningRateSwap:
    """Sets the lr used for the duration of one step and puts the base lrs back afterwards."""

    def __init__(self) -> None:
        #: The base lrs while a step runs (floats, or copies of tensor lrs); None outside a step.
        self.bases: list[Any] | None = None
        #: The lr each group used in the last step.
        self.used: list[float] = []

    def apply(self, groups: Sequence[dict[str, Any]], lrs: Sequence[float]) -> None:
        bases: list[Any] = []
        for group, lr in zip(groups, lrs, strict=True):
            base = group["lr"]
            if isinstance(base, Tensor):
                saved = base.clone()
                base.fill_(lr)
                bases.append(saved)
            else:
                group["lr"] = lr
                bases.append(base)
        self.bases = bases
        self.used = list(lrs)

    def restore(self, groups: Sequence[dict[str, Any]]) -> None:
        """Put the base lrs back (groups added inside the step keep their own)."""
        if self.bases is None:
            return
        for group, base in zip(groups, self.bases, strict=False):
            if isinstance(base, Tensor):
                group["lr"].copy_(base)
            else:
                group["lr"] = base
        self.bases = None

    def current_bases(self, groups: Sequence[dict[str, Any]]) -> list[Any]:
        """The base lrs: the saved ones inside a step, the groups' outside."""
        return self.bases if self.bases is not None else [group["lr"] for group in groups]
