"""What CLARA does with the losses it is given: the brake's trend and the safeguard's detector, in one place.

A CUDA loss reaches the brake without a host synchronisation: it is copied to pinned memory with
``non_blocking=True`` and taken at the next :meth:`LossWatch.settle` (the next step's pre-hook),
one step late, as the step statistics are. The safeguard, which must judge the step at once,
still reads its loss when it is given.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_clara.loss_trend import STATE_KEYS, LossTrend
from lightning_clara.options import Settings
from lightning_clara.safeguard import Safeguard

__all__ = ["LossWatch", "check_loss"]


def check_loss(loss: Any) -> None:
    """A loss is one number: a one-element tensor, or anything ``float()`` takes but text (a Python or numpy
    scalar, a 0-dim array); checked before anything takes it."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"observe_loss: loss must be one number, got a tensor of shape {tuple(loss.shape)}")
        return
    try:
        number = not isinstance(loss, (str, bytes)) and isinstance(float(loss), float)
    except (TypeError, ValueError):
        number = False
    if not number:
        raise TypeError(f"observe_loss: loss must be a float or a one-element tensor, got {type(loss).__name__}")


class LossWatch:
    """The loss brake's :class:`LossTrend` (with ``loss_brake``) and the safeguard's test (with ``safeguard``)."""

    def __init__(self, settings: Settings, safeguard: Safeguard | None) -> None:
        self.brake = settings.loss_brake
        self.safeguard = safeguard
        self.trend = LossTrend(settings.c)
        #: The optimizer step count at the last loss taken; a loss is taken once per step that ran.
        self.steps_at_last_loss = 0
        #: The last loss taken (host float), for the safeguard's message.
        self.last_loss = math.nan
        self._pending: tuple[Tensor, Any] | None = None  # a CUDA loss on its way: (pinned buffer, event)

    def accepts(self, loss: Any) -> bool:
        """Whether ``loss`` is wanted (:attr:`wanted`); raises unless it is one number, wanted or not."""
        check_loss(loss)
        return self.wanted

    @property
    def wanted(self) -> bool:
        """Whether a loss changes anything (a brake or a safeguard is on)."""
        return self.brake or self.safeguard is not None

    @property
    def gate(self) -> float:
        """The factor on the rule's upward moves (1 without the brake or before it has seen enough losses)."""
        return self.trend.gate if self.brake else 1.0

    @property
    def fitted(self) -> bool:
        """Whether the brake sees a network that fits its training data (no raise, whatever the ratio)."""
        return self.brake and self.trend.fitted

    def observe(self, loss: float | Tensor, steps_seen: int, skipped: bool = False) -> bool:
        """Feed one step's loss; True when the safeguard raises an alarm.

        A loss with no optimizer step since the last one taken (``steps_seen`` unchanged: a step that
        GradScaler skipped for inf/NaN gradients, or a repeated call) is ignored: the parameters did not
        move, so there is nothing to judge or undo; nor is one whose update a fused optimizer skipped
        (``skipped``). A CUDA loss without a safeguard is queued (no sync).
        """
        if steps_seen <= self.steps_at_last_loss:
            return False
        self.steps_at_last_loss = steps_seen
        if skipped:
            return False
        self.settle()  # a queued loss first: the trend sees the losses in order
        if self.queues(loss):
            buffer = torch.empty((), dtype=torch.float32, pin_memory=True)
            buffer.copy_(loss.detach().float().reshape(()), non_blocking=True)  # type: ignore[union-attr]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(loss.device))  # type: ignore[union-attr]  # where it copies
            self._pending = (buffer, event)
            return False
        return self._take(float(loss.detach().float().item()) if isinstance(loss, Tensor) else float(loss))

    def queues(self, loss: float | Tensor) -> bool:
        """Whether ``loss`` is taken later, without a sync (a CUDA tensor, and no safeguard to judge it now)."""
        return isinstance(loss, Tensor) and loss.device.type == "cuda" and self.safeguard is None

    def settle(self, drop: bool = False) -> None:
        """Take a queued CUDA loss (its copy has long finished by the next step's pre-hook); ``drop``: the
        update it followed was skipped (a fused optimizer's device-side skip), so it is not taken."""
        pending, self._pending = self._pending, None
        if pending is not None and not drop:
            buffer, event = pending
            event.synchronize()
            self._take(float(buffer))

    def _take(self, loss: float) -> bool:
        self.last_loss = loss
        if self.brake:
            self.trend = self.trend.observed(loss)
        return self.safeguard is not None and self.safeguard.judge(loss)

    def state_dict(self) -> dict[str, Any] | None:
        return self.trend.state_dict() if self.brake else None

    def checked(self, state: Any) -> LossTrend | None:
        """The trend a checkpoint holds, checked (ValueError naming the field); None: keep the fresh one."""
        if state is None or not self.brake:
            return None
        if not isinstance(state, dict):
            raise ValueError(f"loss_trend must be a dict or None, got {type(state).__name__}")
        for key in STATE_KEYS:
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"loss_trend[{key!r}] must be a finite number, got {value!r}")
        if state["count"] < 0 or state["second"] < 0:
            raise ValueError("loss_trend['count'] and loss_trend['second'] must be >= 0")
        if not isinstance(state.get("negative", False), bool):
            raise ValueError(f"loss_trend['negative'] must be a bool, got {state['negative']!r}")
        return LossTrend.from_state(self.trend.rate, state)
