"""The step's lifecycle around the optimizer's own update: CLARA's hooks and the learning-rate swap.

While ``optimizer.step()`` runs each group's lr is the lr used, outside it the base, so a scheduler
only ever sees and sets the base lr and the lr used is ``lr_scheduled * F``. A tensor lr (capturable
optimizers) is filled in place and restored from a copy. :class:`StepHooks` runs CLARA's pre- and
post-step hooks once per outermost step and puts the base lrs back when the step raises.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LearningRateSwap", "StepHooks", "restore_on_error"]

Hook = Callable[[Optimizer, Any, Any], None]


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


class StepHooks:
    """``before`` and ``after`` around each outermost ``optimizer.step()``, and the lrs restored on an error.

    torch runs an optimizer's step hooks in every ``step`` it has wrapped: a subclass whose ``step``
    calls ``super().step()`` runs them twice per step once the parent class was wrapped too (any
    instance of it made in the process). Counting the depth keeps one pre- and one post-hook per step.
    """

    def __init__(self, optimizer: Optimizer, before: Hook, after: Hook, swap: LearningRateSwap) -> None:
        self.depth = 0
        self._before, self._after, self._swap = before, after, swap
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        self._unwrap = restore_on_error(optimizer, self._on_error)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks and unwrap ``optimizer.step``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unwrap()

    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.depth += 1
        if self.depth == 1:
            self._before(optimizer, args, kwargs)

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self._after(optimizer, args, kwargs)

    def _on_error(self, groups: Sequence[dict[str, Any]]) -> None:
        self.depth = 0  # the post-hooks of a step that raised never run
        self._swap.restore(groups)


def restore_on_error(optimizer: Optimizer, on_error: Callable[[Sequence[dict[str, Any]]], None]) -> Callable[[], None]:
    """Wrap ``optimizer.step`` so that ``on_error(param_groups)`` runs when the step raises; returns the unwrap.

    Step post-hooks do not run when the step raises, and the lr would stay ``lr_scheduled * F``.
    The wrapper is a method bound to the optimizer, as torch's own step is, so that a scheduler
    created later can wrap it again (it reads ``step.__func__``).
    """
    own = optimizer.__dict__.get("step")  # an instance attribute: another wrapper (a scheduler's)
    inner = optimizer.step

    # functools.wraps copies the inner function's attributes too: a scheduler's wrapper carries
    # ``_wrapped_by_lr_sched``, without which the scheduler warns that the step was overridden
    @functools.wraps(getattr(inner, "__func__", inner))
    def step(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        except BaseException:
            on_error(self.param_groups)
            raise

    wrapper = types.MethodType(step, optimizer)
    optimizer.step = wrapper  # type: ignore[method-assign]

    def unwrap() -> None:
        if optimizer.__dict__.get("step") is not wrapper:
            return  # wrapped again since (a scheduler made later): ours stays, harmless once restored
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own  # type: ignore[method-assign]

    return unwrap
