"""The resolved options as typed, read-only attributes (``clara.c``, ``clara.sample`` ...), and the run's length.

One attribute per :class:`~lightning_clara.options.Settings` field, each a descriptor that reads
``self.settings``: a type checker and an IDE see every name and its type, and nothing is looked up
by string at run time. ``tests/controller/test_api.py`` keeps the list equal to ``Settings``' fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar, overload

from lightning_clara.distributed import Sharding
from lightning_clara.options import CLARAOptions, Rule, Scope, Settings, Variant
from lightning_clara.reference.curves import Reference
from lightning_clara.safeguard import PageHinkley

__all__ = ["ResolvedOptions"]

T = TypeVar("T")


class _Setting(Generic[T]):
    """A read-only attribute that returns the owner's ``settings.<name>``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> _Setting[T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> T: ...
    def __get__(self, instance: Any, owner: type) -> Any:
        return self if instance is None else getattr(instance.settings, self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is a resolved option (read-only); make a new controller to change it")


class ResolvedOptions:
    """Every resolved option of ``self.settings`` as an attribute of its own type, and the run's length."""

    options: CLARAOptions
    settings: Settings
    rule: _Setting[Rule] = _Setting()
    c: _Setting[float] = _Setting()
    d: _Setting[float] = _Setting()
    fast_start: _Setting[int] = _Setting()
    hold_after: _Setting[int] = _Setting()
    initial_factor: _Setting[float] = _Setting()
    target: _Setting[float] = _Setting()
    loss_brake: _Setting[bool] = _Setting()
    anneal: _Setting[bool] = _Setting()
    skip_nonfinite: _Setting[bool] = _Setting()
    total_steps: _Setting[int | None] = _Setting()
    scope: _Setting[Scope] = _Setting()
    variant: _Setting[Variant] = _Setting()
    unit_step: _Setting[bool] = _Setting()
    reference: _Setting[Reference | None] = _Setting()
    safeguard: _Setting[PageHinkley | None] = _Setting()
    sharding: _Setting[Sharding | None] = _Setting()
    consistency_check_every: _Setting[int | None] = _Setting()
    sample: _Setting[int | None] = _Setting()
    min_factor: _Setting[float | None] = _Setting()
    max_factor: _Setting[float | None] = _Setting()
    min_lr: _Setting[float | None] = _Setting()
    max_lr: _Setting[float | None] = _Setting()
    run_offset: _Setting[int] = _Setting()

    def set_total_steps(self, total_steps: int | None, run_offset: int = 0) -> None:
        """Give the run's length once known (``CLARACallback`` does, in ``on_train_start``): ``d`` and ``hold_after``
        left unset take :func:`~lightning_clara.options.run_length_defaults`, and the anneal its window.

        ``run_offset``: the run's steps taken before this controller attached, where ``total_steps`` is what was
        left of the run then (a callback's controller made mid-run); its state keeps it for a resume.
        """
        self.options = dataclasses.replace(self.options, total_steps=total_steps)
        new = self.options.resolve()  # only the schedule moves: the safeguard's detector and the paths stay
        fields = {k: getattr(new, k) for k in _RUN_LENGTH_FIELDS}
        self.settings = dataclasses.replace(self.settings, **fields, run_offset=run_offset)


#: The settings the run's length decides (``set_total_steps``).
_RUN_LENGTH_FIELDS = ("total_steps", "d", "hold_after")
