"""The host transfer: a step's device results reach the host without stalling the GPU.

On the CPU the host part runs at once. On CUDA the results are copied to pinned host memory with
``non_blocking=True`` and an event is recorded; the host part runs at the next pre-hook (or when a
property is read), by which time the GPU has long finished, so nothing waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostTransfer"]

#: The host part of a step: given the results on the host and whether collectives may run now.
Finish = Callable[[list[Tensor], bool], None]


@dataclass
class _Pending:
    """A step whose results are still on their way to the host (CUDA)."""

    host_buffers: list[Tensor]
    ready: Any  # torch.cuda.Event
    finish: Finish


class HostTransfer:
    """Runs each step's host part on its results: at once on the CPU, deferred on CUDA."""

    def __init__(self) -> None:
        self._pending: _Pending | None = None

    @property
    def pending(self) -> bool:
        """Whether a step's host part is still to run."""
        return self._pending is not None

    def send(self, results: list[Tensor], finish: Finish) -> None:
        """Hand ``results`` over to ``finish``: now on the CPU, at the next :meth:`settle` on CUDA."""
        if not any(result.device.type == "cuda" for result in results):
            finish([result.cpu() for result in results], True)
            return
        host_buffers = []
        for result in results:
            if result.device.type == "cuda":
                buffer = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                buffer.copy_(result, non_blocking=True)
                host_buffers.append(buffer)
            else:
                host_buffers.append(result.cpu())
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self.defer(host_buffers, event, finish)

    def defer(self, host_buffers: list[Tensor], ready: Any, finish: Finish) -> None:
        """Keep a step for later: ``ready.synchronize()`` waits for its copies."""
        self._pending = _Pending(host_buffers, ready, finish)

    def settle(self, collectives: bool) -> None:
        """Run the deferred host part, if any; ``collectives``: whether every rank runs this call."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.ready.synchronize()
            pending.finish(pending.host_buffers, collectives)
