"""The loss brake: is the training loss still falling? A gate on the rule's upward moves (host floats, no torch).

A path statistic cannot tell consistent progress from a network pushed one way at a far too large
lr: on a 300-step transformer LM the ratio at 10x the tuned Adam lr (0.6-0.66) equals the ratio at
the tuned lr (0.55-0.75), while the loss has stopped falling (benchmarks/RESULTS.md, section 6).
The loss can tell. Two exponential averages of the observed losses, a fast one (memory ``1/c``,
the path's) and a slow one (twice that), lag a falling loss by different amounts: their
difference, in units of its own standard deviation under pure noise, is the trend's z-score

    z = (slow - fast) / (sigma * k(c, t)),    k^2 = Var(fast - slow) / sigma^2 for white noise

(exact at every age t of the bias-corrected averages, so z is a standard score from the start).

The gate maps it to [-1, 1]: ``+1`` when the loss falls clearly (z >= 2 * Z_FALLING), ``0`` at
z = Z_FALLING, ``-1`` when it is flat or rising (z <= 0). The rule multiplies an upward move
(signal > 0) by the gate: raising F is allowed while raising helps, and where the ratio asks for
more but the loss has stalled, F comes down instead, as an online range test backs off. Downward
moves never pass the gate, and neither do raises where the steps agree more than a random walk's
(r >= 1: a too-small lr, whose slow loss decrease the test may not see), unless the network fits
its data: once the smoothed loss is below ``FITTED`` of the first losses' mean, steps agree because
the margins grow, and F is not raised at all. Without losses (``observe_loss`` never called) the
gate is 1: the statistic alone, and the null model's promises, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FITTED", "STATE_KEYS", "WARMUP", "Z_FALLING", "LossTrend"]

#: z-score of the trend at which the gate is 0 (hold F); twice it opens the gate fully.
Z_FALLING = 2.0
#: Losses observed before the gate acts (the variance of the loss settles first).
WARMUP = 10
#: The network fits its training data once the smoothed loss is below this part of its first losses':
#: from there on agreeing steps only grow its margins (r rose to 2.5 at a training loss of 1e-4 on a
#: batch-256 MLP, and the climb broke the network; benchmarks/RESULTS.md, section 6).
FITTED = 0.05


@dataclass(frozen=True)
class LossTrend:
    """Two exponential averages of the loss (rates c and c / 2, bias-corrected on reading) and its variance."""

    rate: float  # the fast average's rate, c; the slow one's is c / 2
    count: int = 0
    fast: float = 0.0  # raw (uncorrected) averages: (1 - a) m + a x from m = 0
    slow: float = 0.0
    second: float = 0.0  # raw fast average of squared deviations from the fast average
    initial: float = 0.0  # the mean of the first WARMUP losses: the untrained network's loss
    negative: bool = False  # a loss below 0 was seen: not bounded below by 0, so never "fitted"

    def observed(self, loss: float) -> LossTrend:
        """With one more loss (a NaN/inf loss is not a trend, nor one whose squared deviation overflows: left out)."""
        if not math.isfinite(loss):
            return self
        a, b = self.rate, self.rate / 2.0
        deviation = loss - self._corrected(self.fast, a) if self.count else 0.0
        initial = self.initial + (loss - self.initial) / (self.count + 1) if self.count < WARMUP else self.initial
        second = self.second + a * (deviation * deviation - self.second)
        if not math.isfinite(second):  # a float64 loss near 1e154: inf - inf would make the trend NaN for good
            return self
        return LossTrend(
            self.rate,
            self.count + 1,
            self.fast + a * (loss - self.fast),
            self.slow + b * (loss - self.slow),
            second,
            initial,
            self.negative or loss < 0.0,
        )

    def _corrected(self, raw: float, rate: float, count: int | None = None) -> float:
        return raw / (1.0 - (1.0 - rate) ** (self.count if count is None else count))

    @property
    def z(self) -> float:
        """How many noise standard deviations the slow average lies above the fast one (> 0: falling)."""
        if self.count < 2:
            return 0.0
        a, b = self.rate, self.rate / 2.0
        variance = self._corrected(self.second, a, self.count - 1)
        if variance <= 0.0:
            return 0.0
        difference = self._corrected(self.slow, b) - self._corrected(self.fast, a)
        return difference / (math.sqrt(variance) * _difference_scale(a, b, self.count))

    @property
    def gate(self) -> float:
        """The factor on an upward move of log F: 1 while the loss falls, down to -1 once it stalls."""
        if self.count < WARMUP:
            return 1.0
        return min(1.0, max(-1.0, self.z / Z_FALLING - 1.0))

    @property
    def fitted(self) -> bool:
        """Whether the smoothed loss has fallen below ``FITTED`` of the untrained network's (a positive loss)."""
        if self.count < WARMUP or self.initial <= 0.0 or self.negative:
            return False
        return self._corrected(self.fast, self.rate) < FITTED * self.initial

    def state_dict(self) -> dict[str, float | int | bool]:
        return {**{key: getattr(self, key) for key in STATE_KEYS}, "negative": self.negative}

    @classmethod
    def from_state(cls, rate: float, state: dict[str, float | int | bool]) -> LossTrend:
        """``negative`` may be missing (a checkpoint of 0.2.0.dev0 before it existed): False."""
        fast, slow, second, initial = (float(state[key]) for key in STATE_KEYS[1:])
        return cls(rate, int(state["count"]), fast, slow, second, initial, bool(state.get("negative", False)))


#: The numbers a checkpoint keeps of a :class:`LossTrend` (its rate is the controller's c), in field order;
#: beside them the flag ``negative``.
STATE_KEYS = ("count", "fast", "slow", "second", "initial")


def _difference_scale(a: float, b: float, count: int) -> float:
    """Standard deviation of (fast - slow) over that of the loss, for white noise, after ``count`` losses.

    The bias-corrected averages weigh the j-th last loss by ``a (1-a)^j / (1 - (1-a)^count)`` (and
    likewise with b); the variance of the difference is the sum of squared weight differences.
    """

    def geometric(p: float) -> float:  # sum_{j < count} p^j
        return (1.0 - p**count) / (1.0 - p)

    norm_a, norm_b = 1.0 - (1.0 - a) ** count, 1.0 - (1.0 - b) ** count
    squares_a = a * a * geometric((1.0 - a) ** 2) / norm_a**2
    squares_b = b * b * geometric((1.0 - b) ** 2) / norm_b**2
    cross = a * b * geometric((1.0 - a) * (1.0 - b)) / (norm_a * norm_b)
    return math.sqrt(max(squares_a + squares_b - 2.0 * cross, 1e-18))
