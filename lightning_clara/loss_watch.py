"""What CLARA does with the losses it is given: the brake's trend and the safeguard's detector, in one place."""

from __future__ import annotations

import math
from typing import Any

from lightning_clara.loss_trend import STATE_KEYS, LossTrend
from lightning_clara.options import Settings

__all__ = ["LossWatch"]


class LossWatch:
    """The loss brake's :class:`LossTrend` (with ``loss_brake``) and the safeguard's test (with ``safeguard``)."""

    def __init__(self, settings: Settings) -> None:
        self.brake = settings.loss_brake
        self.safeguard = settings.safeguard
        self.trend = LossTrend(settings.c)

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

    def observe(self, loss: float) -> bool:
        """Feed one step's loss; True when the safeguard raises an alarm."""
        if self.brake:
            self.trend = self.trend.observed(loss)
        return self.safeguard is not None and self.safeguard.update(loss)

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
        return LossTrend.from_state(self.trend.rate, state)
