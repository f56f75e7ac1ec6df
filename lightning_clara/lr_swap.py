"""The step's lifecycle around the optimizer's own update: CLARA's hooks and the learning-rate swap.

While ``optimizer.step()`` runs each group's lr is the lr used, outside it the base, so a scheduler
only ever sees and sets the base lr and the lr used is ``lr_scheduled * F`` (x the anneal). A tensor lr (capturable
optimizers) is filled in place and restored from a copy. :class:`StepHooks` runs CLARA's pre- and
post-step hooks once per outermost step, puts the base lrs back when the step raises, and skips an
update whose gradients are not finite (:mod:`~lightning_clara.finite_guard`).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.finite_guard import SkipUpdate, gradients_finite, non_finite_flag, state_ready, takes_found_inf

__all__ = ["LearningRateSwap", "StepHooks", "check_own_lr_tensors"]

Hook = Callable[[Optimizer, Any, Any], None]
#: A scheduled lr that moves by less than this (relative) counts as constant: a closed-form scheduler
#: recomputing an unchanged lr may round differently.
SCHEDULE_TOLERANCE = 1e-9


def _shared_message(first: int, second: int, lrs: str = "") -> str:
    return (
        f"param groups {first} and {second} share one lr tensor, so they cannot step at different lrs{lrs} "
        "(scope='param_group' gives each group its own F); give each group its own lr tensor, or use "
        "scope='optimizer'"
    )


def check_own_lr_tensors(groups: Sequence[dict[str, Any]]) -> None:
    """Per-group factors need per-group lrs: refuse, at attach, groups that share one lr tensor (torch's
    default for ``lr=torch.tensor(...)``), before their factors part (a group added later: at that step)."""
    first: dict[int, int] = {}
    for j, group in enumerate(groups):
        if isinstance(group["lr"], Tensor) and first.setdefault(id(group["lr"]), j) != j:
            raise ValueError(_shared_message(first[id(group["lr"])], j))


class LearningRateSwap:
    """Sets the lr used for the duration of one step and puts the base lrs back afterwards."""

    def __init__(self) -> None:
        #: The base lrs while a step runs (floats, or copies of tensor lrs); None outside a step.
        self.bases: list[Any] | None = None
        #: The lr each group used in the last step.
        self.used: list[float] = []
        self._scheduled: list[float] = []  # the base lrs of the last step

    def apply(self, groups: Sequence[dict[str, Any]], lrs: Sequence[float], scheduled: Sequence[float]) -> bool:
        """Set the lrs used; True when a group's base lr (``scheduled``, as floats: read once by the caller) changed
        since the last step (a scheduler at work).

        Groups added since are compared from their second step on; a resume compares with the checkpoint's lrs.
        """
        # every base is saved before any is written: torch gives each group the same tensor lr when
        # the constructor was given one, and a copy taken after the first fill would save the lr used
        saved: dict[int, tuple[int, float, Tensor]] = {}  # a tensor lr: the first group to fill it, its lr, a copy
        bases: list[Any] = []
        for j, (group, lr) in enumerate(zip(groups, lrs, strict=True)):
            base = group["lr"]
            if isinstance(base, Tensor):
                if id(base) not in saved:
                    saved[id(base)] = (j, lr, base.clone())
                first, value, base = saved[id(base)]
                if value != lr:  # one tensor cannot hold two lrs: the last write would step every group
                    raise ValueError(_shared_message(first, j, f", here {value:.6g} and {lr:.6g}"))
            bases.append(base)
        for group, lr in zip(groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.bases = bases
        self.used = list(lrs)
        before, self._scheduled = self._scheduled, list(scheduled)
        return any(not math.isclose(a, b, rel_tol=SCHEDULE_TOLERANCE) for a, b in zip(scheduled, before, strict=False))

    @property
    def scheduled(self) -> list[float]:
        """The base lrs of the last step (what the next step's are compared with; checkpointed)."""
        return list(self._scheduled)

    def resume(self, scheduled: Sequence[float]) -> None:
        """Continue from a checkpoint's last scheduled lrs, so that a change at the first step after a resume counts."""
        self._scheduled = [float(lr) for lr in scheduled]

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
    ``optimizer.step`` is wrapped (a method bound to the optimizer, as torch's own step is, so that a
    scheduler made later can wrap it again) to put the base lrs back when the step raises. Where the
    wrapper is bypassed (accelerate swaps in the step it saved before CLARA attached), a pre-hook
    that finds a step still open outside any wrapped call closes it first, as a raised step left it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        before: Hook,
        after: Hook,
        swap: LearningRateSwap,
        skipped: Callable[[Optimizer], None] | None = None,
        on_device: bool = False,
        across_shards: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.depth = 0  # pre-hooks run minus post-hooks run
        self._across_shards = across_shards  # the sharding's sum over its shard group: one skip decision for all
        self._calls = 0  # wrapped optimizer.step() calls running
        self._opened_in = 0  # the wrapped calls running when the open step began
        self._before, self._after, self._swap = before, after, swap
        self._skipped = skipped  # None: no finiteness check; else told of each update skipped
        # a fused torch optimizer skips on a device flag (no host read): the flag of the step running
        self._on_device = on_device and skipped is not None and takes_found_inf(optimizer)
        self.device_flag: Tensor | None = None
        self._own_flag = False  # whether device_flag is CLARA's (counted as a skip) or GradScaler's (not)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
            optimizer.register_state_dict_post_hook(self._saved_with_bases),
        ]
        self._unwrap = self._wrap(optimizer)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def skip_counted(self) -> bool:
        """Whether a skip on :attr:`device_flag` is CLARA's own (counted), not GradScaler's (routine under fp16)."""
        return self._own_flag

    def remove(self) -> None:
        """Remove the hooks and unwrap ``optimizer.step``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unwrap()

    def _saved_with_bases(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state dict taken inside a step (a checkpoint saved from ``training_step``, a SLURM requeue's)
        holds the base lrs, not the lrs used: a resumed run would apply F twice."""
        for group, base in zip(state_dict["param_groups"], self._swap.bases or (), strict=False):
            group["lr"] = base.clone() if isinstance(base, Tensor) else base
        return state_dict

    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # nested only inside the wrapped call that opened the step; otherwise a step that raised
        # outside the wrapper left it open, with its lrs swapped
        if self.depth and not (self._calls and self._calls == self._opened_in):
            self.depth = 0
            self._swap.restore(optimizer.param_groups)
        self.depth += 1
        if self.depth == 1:
            self._opened_in = self._calls
            self._before(optimizer, args, kwargs)

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.depth == 0:
            return  # an inner post-hook already closed this step
        self.depth -= 1
        if self.depth == 0:
            self._after(optimizer, args, kwargs)

    def _checked(self, optimizer: Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """The step's arguments with its closure checked; :class:`SkipUpdate` where the step must not run.

        Without a closure the gradients exist already and are checked here (no hook runs on a skip).
        With one, the first call of the closure is checked as it returns, before a torch optimizer
        reads a gradient (the pre-hook has run by then: the wrapper closes the step).
        """
        positional = bool(args) and callable(args[0])
        closure = args[0] if positional else kwargs.get("closure")
        if closure is None:
            self._check(optimizer, None)
            return args, kwargs
        checked = False

        def checked_closure() -> Any:
            nonlocal checked
            loss = closure()
            if not checked:
                checked = True
                self._check(optimizer, loss)
            return loss

        if positional:
            return (checked_closure, *args[1:]), kwargs
        return args, {**kwargs, "closure": checked_closure}

    def _check(self, optimizer: Optimizer, loss: Any) -> None:
        """Skip now on a host read of the flag, or hand the flag to a fused optimizer's step (no read)."""
        if not (self._on_device and state_ready(optimizer)):
            if not gradients_finite(optimizer, self._across_shards):
                raise SkipUpdate(loss)
            return
        self.device_flag, self._own_flag = non_finite_flag(optimizer, self._across_shards), True
        if self.device_flag is not None:
            optimizer.found_inf = self.device_flag  # type: ignore[attr-defined]

    def _wrap(self, optimizer: Optimizer) -> Callable[[], None]:
        """Wrap ``optimizer.step``; returns the unwrap."""
        own = optimizer.__dict__.get("step")  # an instance attribute: another wrapper (a scheduler's)
        inner = optimizer.step

        # functools.wraps copies the inner function's attributes too: a scheduler's wrapper carries
        # ``_wrapped_by_lr_sched``, without which the scheduler warns that the step was overridden
        @functools.wraps(getattr(inner, "__func__", inner))
        def step(this: Optimizer, *args: Any, **kwargs: Any) -> Any:
            if not self._handles:  # detached, but still inside a scheduler's wrapper made later: pass through
                return inner(*args, **kwargs)
            self._calls += 1
            try:
                if "found_inf" in this.__dict__ and (self._skipped is None or state_ready(this)):
                    # GradScaler drives a fused step: its own flag skips it and says whether the step ran (but
                    # fused SGD's first step, where a skip leaves garbage momentum, is decided on the host below)
                    self.device_flag, self._own_flag = this.__dict__["found_inf"], False
                elif self._skipped is not None:
                    args, kwargs = self._checked(this, args, kwargs)
                return inner(*args, **kwargs)
            except BaseException as error:
                self.depth = 0  # the post-hooks of a step that raised (or was skipped) never run
                self._swap.restore(this.param_groups)
                if not isinstance(error, SkipUpdate) or self._skipped is None:
                    raise
                self._skipped(this)  # nothing changed; the closure's loss returns, as from any step
                return error.loss
            finally:
                self._calls -= 1
                if self.device_flag is not None:
                    if self._own_flag and this.__dict__.get("found_inf") is self.device_flag:
                        del this.found_inf  # type: ignore[attr-defined]  # GradScaler deletes its own
                    self.device_flag = None

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
