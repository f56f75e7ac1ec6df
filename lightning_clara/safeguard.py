"""SALeRA's "safe" part: a Page-Hinkley test that detects a blow-up of the training loss.

The test accumulates how far each loss lies above its running mean (in units of the
running mean absolute loss, so it is scale-free), minus a tolerated drift ``delta``, and
raises an alarm once the accumulated excess passes ``threshold``. A NaN or infinite loss is
an alarm at once. Framework-free: feed it one float per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_clara._validation import check_in_range, check_positive_int

__all__ = ["PageHinkley"]


class PageHinkley:
    """One-sided Page-Hinkley test for an increase of the mean of a stream of losses.

    Args:
        delta: tolerated increase per step, relative to the running mean absolute loss.
        threshold: accumulated relative excess that raises the alarm.
        memory: the running mean is an exponential average over about this many steps.
        warmup: observations before an alarm can be raised (the running mean settles first).
    """

    def __init__(self, delta: float = 0.05, threshold: float = 3.0, memory: int = 50, warmup: int = 10) -> None:
        self.delta = check_in_range("delta", delta, 0.0, math.inf, high_open=True)
        self.threshold = check_in_range("threshold", threshold, 0.0, math.inf, low_open=True, high_open=True)
        self.memory = check_positive_int("memory", memory)
        self.warmup = check_positive_int("warmup", warmup)
        self.reset()
        self.alarms = 0

    def reset(self) -> None:
        """Forget the statistics (after an alarm, or when the lr changed on purpose)."""
        self.count = 0
        self.mean = 0.0
        self.scale = 0.0
        self.excess = 0.0

    def update(self, loss: float) -> bool:
        """Feed one loss; return True when the test raises an alarm (the caller then resets it)."""
        if not math.isfinite(loss):
            self.alarms += 1
            return True
        self.count += 1
        rate = max(1.0 / self.count, 1.0 / self.memory)
        self.mean += rate * (loss - self.mean)
        self.scale += rate * (abs(loss) - self.scale)
        if self.count <= self.warmup or self.scale == 0.0:
            return False
        self.excess = max(0.0, self.excess + (loss - self.mean) / self.scale - self.delta)
        if self.excess > self.threshold:
            self.alarms += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean,
            "scale": self.scale,
            "excess": self.excess,
            "alarms": self.alarms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.scale = float(state["scale"])
        self.excess = float(state["excess"])
        self.alarms = int(state["alarms"])
