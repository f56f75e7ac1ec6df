"""The pending step: one step's device results on their way to the host, as a value.

On the CPU the results are on the host at once and the step settles in the post-hook. On CUDA they
are copied to pinned host memory with ``non_blocking=True`` behind an event, and the step settles
at the next pre-hook (or when a property is read), by which time the GPU has long finished, so
nothing waits. :meth:`PendingStep.settle` gives the step's :class:`~lightning_clara.rule.StepStatistics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_clara.rule import StepStatistics
from lightning_clara.stores import DeviceStep

__all__ = ["CopiesDone", "PendingStep", "StepListener"]

#: Told ``(lr used per group, ratio per group)`` after each adapted step (the fit summary listens).
StepListener = Callable[[list[float], list[float | None]], None]


class CopiesDone:
    """One CUDA event per device whose results are being copied, each recorded on that device's current
    stream (where its copy runs): a model on another GPU than the current one, or on several, is covered."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._events = []
        for device in devices:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)

    def synchronize(self) -> None:
        for event in self._events:
            event.synchronize()


@dataclass
class PendingStep:
    """A step between the optimizer's update and the rule: its results, and the lr each group used."""

    buffers: list[Tensor]  # the results on the host (pinned buffers filled asynchronously on CUDA)
    ready: Any | None  # the CUDA event the copies wait for; None: on the host already
    finish: Callable[[list[Tensor]], StepStatistics]  # the host part: results -> per-scope sums
    lr_used: list[float]  # per group, the lr the step ran at
    device: torch.device
    skip_flag: Tensor | None = None  # a fused optimizer's device-side skip flag (its host copy), if any
    skip_counted: bool = True  # the flag is CLARA's (a skip counts), not GradScaler's (a routine fp16 skip)
    bases: list[Any] = field(default_factory=list)  # per group, the base lr of the step (the lr bounds' reference)

    @classmethod
    def send(
        cls,
        step: DeviceStep,
        lr_used: Sequence[float],
        skip_flag: Tensor | None = None,
        skip_counted: bool = True,
        bases: Sequence[Any] = (),
    ) -> PendingStep:
        """Start moving ``step``'s results (and the step's device skip flag) to the host: a copy behind an
        event on CUDA, nothing on the CPU. ``bases``: the step's base lrs, kept so that the rule clamps to the
        lr bounds against them whenever it runs (a deferred step settles after ``scheduler.step()``)."""
        results = list(step.results) if skip_flag is None else [*step.results, skip_flag]
        ready = None
        if any(result.device.type == "cuda" for result in results):
            buffers = []
            for result in results:
                if result.device.type == "cuda":
                    buffer = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    buffer.copy_(result, non_blocking=True)
                    buffers.append(buffer)
                else:
                    buffers.append(result.cpu())
            ready = CopiesDone({result.device for result in results if result.device.type == "cuda"})
            results = buffers
        flag = results.pop() if skip_flag is not None else None
        return cls(results, ready, step.finish, list(lr_used), step.device, flag, skip_counted, list(bases))

    @property
    def deferred(self) -> bool:
        """Whether the results are still on their way (CUDA): the step settles at the next pre-hook."""
        return self.ready is not None

    def settle(self) -> StepStatistics:
        """The step's per-scope sums (waiting for the copies first, which have long finished by then)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.finish(self.buffers)

    @property
    def skipped(self) -> bool:
        """Whether a fused optimizer skipped this update on its device flag (read after :meth:`settle`)."""
        return self.skip_flag is not None and float(self.skip_flag) > 0
