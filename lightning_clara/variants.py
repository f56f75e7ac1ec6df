"""The paper's variants as add-ons outside the core step: SALeRA's gradient paths and the unit step.

* :class:`GradientBucket` (``variant="salera"``, the 2017 rule): the path follows the raw gradient
  (negated with ``maximize``) on the sample instead of the realised step; the controller pairs it
  with a plain random-walk reference, whatever the optimizer. A group stepped at lr 0 moved
  nothing, so its gradient is not taken.
* :class:`UnitStep` (``unit_step=True``): after the optimizer's step each tensor's realised step
  ``s`` becomes ``lr * s / ||s||``; the path sees the same direction, so the statistic is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.lr_swap import LearningRateSwap, StepHooks
from lightning_clara.safeguard import snapshot
from lightning_clara.sampling import SampleBucket

__all__ = ["GradientBucket", "UnitStep"]


class GradientBucket(SampleBucket):
    """A bucket whose "step" is the gradient on the sample (SALeRA's direction), read after the step."""

    def before_step(self) -> None:
        self._before = self._step  # nothing to gather: the gradient is still there after the step

    def realised_step(self, lr_used: Sequence[float] = ()) -> Tensor:
        if self._step is None:
            raise NotImplementedError("variant='salera' does not support sharded parameters")
        self._before = None
        with torch.no_grad():
            for row, member in enumerate(self.members):
                grad = member.param.grad
                target = self._step[row, : member.length]
                if grad is None or (member.group < len(lr_used) and lr_used[member.group] == 0.0):
                    target.zero_()  # no gradient, or a step at lr 0: nothing moved
                    continue
                values = (grad.to_dense() if grad.is_sparse else grad).detach().reshape(-1)
                source = self._sources[row]
                target.copy_(values if source is None else values.index_select(0, source))
                if member.maximize:
                    target.neg_()
        return self._step


class UnitStep:
    """``unit_step=True``: each tensor's realised step ``s`` becomes ``lr * s / ||s||`` (the paper's variant).

    Hooks of their own, registered before CLARA's, so that the post-hook runs while the lr used is
    still in the group; a zero or non-finite step is left as it was. Costs one parameter snapshot.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._before: dict[Tensor, Tensor] = {}
        self._hooks = StepHooks(optimizer, self._snapshot, self._rescale, LearningRateSwap())

    def remove(self) -> None:
        self._hooks.remove()
        self._before.clear()

    def _snapshot(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._before = {p: self._before[p] for p in params if p in self._before}  # frozen tensors drop out
        snapshot(self._before, params, [p.detach() for p in params])

    def _rescale(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if p in self._before]
                if not params:
                    continue
                # s = theta_before - theta_after (in the snapshot, which the next pre-hook refills), then
                # theta_after + s (1 - lr / ||s||) = theta_before - lr s/||s||
                steps = [self._before[p] for p in params]
                torch._foreach_sub_(steps, [p.detach() for p in params])
                # norms in fp32 at least: a bf16 norm is rounded, an fp16 one can overflow to inf
                wide = [s if s.dtype in (torch.float32, torch.float64) else s.float() for s in steps]
                # one group may span devices (layers on two GPUs): the norms meet on the first one, no host sync
                norms = torch.stack([n.to(wide[0].device) for n in torch._foreach_norm(wide)]).double()
                moved = torch.isfinite(norms) & (norms > 0)
                safe = torch.where(moved, norms, torch.ones_like(norms))
                lr = group["lr"]  # a tensor lr (capturable) stays on its device: no sync
                lr = lr.to(norms.device, torch.float64) if isinstance(lr, Tensor) else float(lr)
                scales = torch.where(moved, 1.0 - lr / safe, torch.zeros_like(norms))
                torch._foreach_addcmul_(
                    [p.detach() for p in params],
                    steps,
                    [s.to(p.device, p.dtype) for s, p in zip(scales.unbind(), params, strict=True)],
                )
