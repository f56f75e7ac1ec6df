"""Per param group, the reference curves mu_n(t), rebuilt only when what they depend on changed.

Nearly every step nothing changed (same hyper-parameters, same tensors) and a lookup is a tuple
comparison; a scheduler moving a hyper-parameter, or a tensor of a new size, rebuilds the group's
curves (the references themselves are shared process-wide, :func:`~lightning_clara.reference.shared`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.reference.curves import PlainReference, Reference, shared
from lightning_clara.reference.families import ReferenceKeys, reference_for

__all__ = ["GroupReference", "ReferenceCache"]

_SERIALS = itertools.count()


@dataclass
class GroupReference:
    """One group's curves by tensor size, and the key they were built for."""

    key: tuple[Any, ...]
    curves: dict[int, list[float]]
    param_ids: tuple[int, ...] = ()  # the group's tensors when the curves were built
    #: Unique per built reference (an ``id`` could be reused once the old one is freed): sampled
    #: paths rebuild their curve table when it changes.
    serial: int = field(default_factory=lambda: next(_SERIALS))


class ReferenceCache:
    """The :class:`GroupReference` of every param group of ``optimizer``.

    Args:
        optimizer: the optimizer whose groups are referenced.
        c: the path memory the curves are computed for.
        size: the tensor size a parameter's reference uses (the full size when sharded, at most the sample).
        custom: one reference for every group instead of the automatic one.
        plain: a plain random walk for every group, whatever the optimizer (SALeRA).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        c: float,
        size: Callable[[Tensor], int],
        custom: Reference | None = None,
        plain: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.c = c
        self.size = size
        self.custom = custom
        self.plain = plain
        self.keys = ReferenceKeys(optimizer)
        self._groups: list[GroupReference | None] = []

    def sync(self) -> None:
        """Make room for param groups added after attaching."""
        while len(self._groups) < len(self.optimizer.param_groups):
            self._groups.append(None)

    def get(self, j: int) -> GroupReference:
        """The curves of group j, rebuilt when a hyper-parameter it depends on changed."""
        group = self.optimizer.param_groups[j]
        key, hyperparameters = self.keys.observe(j, group)
        cached = self._groups[j]
        param_ids = tuple(map(id, group["params"]))
        if cached is not None and cached.key == key and cached.param_ids == param_ids:
            return cached  # nearly every step: no hyper-parameter and no tensor changed
        sizes = {self.size(p) for p in group["params"]}
        if cached is None or cached.key != key or not sizes <= cached.curves.keys():
            reference = self._reference_for(hyperparameters)
            # a tensor with no entries (a device marker) never moves: its curve is never read
            curves = {n: curve.tolist() for n, curve in reference.curves(sorted(sizes - {0})).items()}
            cached = GroupReference(key, curves | ({0: [1.0]} if 0 in sizes else {}))
            self._groups[j] = cached
        cached.param_ids = param_ids
        return cached

    def _reference_for(self, group: dict[str, Any]) -> Reference:
        if self.custom is not None:
            return self.custom
        if self.plain:
            return shared(PlainReference(self.c))  # SALeRA compares raw gradients with a plain random walk
        return reference_for(self.optimizer, group, self.c)
