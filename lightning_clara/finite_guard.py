"""Skip an optimizer update whose gradients are not finite: parameters and optimizer state stay as they were.

A NaN or inf gradient entry, stepped, poisons the optimizer's state (Adam's moments stay NaN from then
on) and with it every later step. GradScaler users know the cure from mixed precision: look at the
gradients first and skip the update. :func:`gradients_finite` is that look, with the fused kernel
GradScaler uses to find overflows, run with scale 1 (the gradients keep their values): one kernel per
device that reads every gradient once, about 0.05-0.09 of an Adam step on a CPU (measured in
``benchmarks/overhead.py``). The decision needs the flag on the host: free on a CPU, one
synchronisation per step on CUDA (GradScaler makes the same one for optimizers that are not fused).
torch's fused optimizers (``fused=True``) decide on the device instead, as under GradScaler: the flag
goes to the step as ``optimizer.found_inf`` and the host reads it with the step's statistics (one
step late on CUDA), only to count the skip (:func:`takes_found_inf`, :func:`state_ready`).

Gradients exist only once the step's closure has run (Lightning runs ``training_step`` and
``backward`` inside ``optimizer.step(closure)``), so the check runs right after the closure returns,
before a torch optimizer touches anything, and :class:`SkipUpdate` carries the closure's loss out of
the optimizer's step. Under sharding every rank holds a part, so the flag is summed with the
sharding's own sum over its shard group (FSDP2's, or a manual one): they all skip, or none does.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.distributed import local_shard

__all__ = ["SkipCounter", "SkipUpdate", "gradients_finite", "non_finite_flag", "state_ready", "takes_found_inf"]

#: torch's optimizers whose fused step honours ``found_inf`` (checked: parameters and state untouched).
_FUSED_SKIPPERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


class SkipUpdate(Exception):
    """Raised from the step's closure when its gradients are not finite; carries the closure's result."""

    def __init__(self, loss: Any) -> None:
        super().__init__("the gradients of this step are not finite")
        self.loss = loss


class SkipCounter:
    """Counts the updates skipped; the first one warns, later ones are only counted (no flood of lines)."""

    def __init__(self) -> None:
        self.count = 0
        self.on_host = 0  # the skips decided on the host: no step hook ran for them (the run's clock counts them)
        self.last = False  # whether the last settled step was a fused optimizer's skip on a device flag

    def settled(self, optimizer: Optimizer, skipped: bool, counted: bool = True) -> None:
        """A step settled on the host: count it if a fused optimizer skipped it on CLARA's device flag (not
        ``counted``: on GradScaler's, a routine fp16 skip; its loss is ignored all the same)."""
        self.last = skipped
        if skipped and counted:  # counted where the step settles, inside the library: the warning says which
            self._count(optimizer, stacklevel=2)

    def __call__(self, optimizer: Optimizer) -> None:
        """An update skipped on the host, before the step hooks: the warning points at the optimizer.step() call."""
        self.on_host += 1
        self._count(optimizer, _first_frame_outside(("lightning_clara.", "torch.optim.")))

    def _count(self, optimizer: Optimizer, stacklevel: int) -> None:
        self.count += 1
        if self.count == 1:
            warnings.warn(
                f"CLARA: skipped an update of {type(optimizer).__name__} whose gradients hold NaN/inf; its "
                "parameters and state are as they were. Later skips are counted without a warning "
                "(num_skipped_updates, the summary table); skip_nonfinite=False steps them as given",
                RuntimeWarning,
                stacklevel=stacklevel,
            )


def _first_frame_outside(packages: tuple[str, ...]) -> int:
    """The ``stacklevel``, for a ``warnings.warn`` one call below our caller, of the first frame whose module is
    not in ``packages``: the user's ``optimizer.step()`` line, whatever wrappers (CLARA's, a scheduler's) lie
    between."""
    frame: FrameType | None = sys._getframe(2)  # our caller's caller: stacklevel 3 from the warn below us
    level = 3
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


def gradients_finite(optimizer: Optimizer, across_shards: Callable[[Tensor], None] | None = None) -> bool:
    """Whether every gradient of ``optimizer``'s parameters is finite (True where none exists): the host decision."""
    flag = non_finite_flag(optimizer, across_shards)
    return flag is None or not bool(flag.item())


def non_finite_flag(optimizer: Optimizer, across_shards: Callable[[Tensor], None] | None = None) -> Tensor | None:
    """A 0-dim tensor, > 0 if any gradient entry of ``optimizer`` is NaN or inf (None: no gradient), left on
    the device: summed over the devices, and under sharding over the ranks, without a host read.

    ``across_shards``: the controller's sharding's in-place sum over its shard group (FSDP2's for DTensor
    parameters, or a manual :class:`~lightning_clara.distributed.Sharding`'s); without it the flag is this
    rank's alone (a rank that alone saw a NaN would skip while the others step, and their collectives part)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for whole in _gradients(optimizer):
        grad = local_shard(whole)
        if grad.is_sparse:
            grad = grad._values()  # an uncoalesced duplicate sums to non-finite too
        by_device.setdefault(grad.device, []).append(grad)
    found = [_non_finite_flag(device, grads) for device, grads in by_device.items()]
    if not found:
        return None
    flag = found[0] if len(found) == 1 else torch.stack([f.to(found[0].device) for f in found]).sum()
    if across_shards is not None:
        across_shards(flag)  # each rank saw its shard: one decision for all
    if len(found) > 1 or across_shards is not None:
        flag.clamp_(max=1.0)  # a fused kernel skips on exactly 1 (and subtracts the flag from its step counts)
    return flag


def takes_found_inf(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` skips its own update on a device flag: torch's fused Adam, AdamW, SGD and Adagrad
    read ``optimizer.found_inf`` (GradScaler's protocol) and leave parameters and state as they were."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and type(optimizer) in _FUSED_SKIPPERS


def state_ready(optimizer: Optimizer) -> bool:
    """Whether a skip on the device flag leaves the state as it was this step: fused SGD with momentum makes
    its momentum buffers with ``empty_like`` before its kernel skips, so until every buffer exists it must not
    step at all (the host decides); the others' first-step state is what a fresh one would be."""
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    return all(
        "momentum_buffer" in optimizer.state.get(param, {})
        for group in optimizer.param_groups
        if group.get("momentum", 0)
        for param in group["params"]
        if param.grad is not None
    )


def _gradients(optimizer: Optimizer) -> Iterator[Tensor]:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:  # a complex one as its real pairs (the pre-hook then refuses its tensor)
                yield torch.view_as_real(param.grad.detach()) if param.grad.is_complex() else param.grad.detach()


def _non_finite_flag(device: torch.device, grads: list[Tensor]) -> Tensor:
    """1.0 on ``device`` if any entry of ``grads`` is NaN or inf: GradScaler's fused check, at scale 1."""
    # float32 whatever the default dtype (the check needs it); 0-dim: a fused optimizer subtracts it from its steps
    flag = torch.zeros((), dtype=torch.float32, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, _unit_scale(device))
    return flag


@functools.cache
def _unit_scale(device: torch.device) -> Tensor:
    """The check's inverse scale, 1 (it unscales in place: a scale of 1 leaves the gradients as they are)."""
    return torch.ones((), dtype=torch.float32, device=device)
