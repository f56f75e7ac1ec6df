"""The rule, in paper order, as pure functions on small records (no torch, no hooks, float64 on the host).

One adapted step: the path store gives each scope's sums (:class:`StepStatistics`): ``sum ||p_k||^2``,
``sum mu_k`` (the reference at each path's age) and the tensors that moved. Then

1. ``r = sum ||p||^2 / sum mu`` (the paper's ratio);
2. ``signal = r / target - 1``, divided by its range ``r_max / target - 1`` with ``rule="normalized"``;
3. ``log F += damping(t) * signal``, clamped by :class:`Bounds`; ``damping(t)`` is ``d`` raised
   during the fast start and decayed after ``hold_after`` (:class:`Schedule`): a function of the
   step count only, so log F stays unbiased under the null model.

The lr used is ``lr_scheduled * F``, times :func:`annealed` in the second half of a run of known length
whose scheduled lr stays constant (no scheduler at work): a linear decay to ``ANNEAL_FLOOR``.

:func:`adapt` returns the next :class:`FactorState`; ``tests/reference_loop.py`` is the same rule as
a plain loop, and ``tests/rule/test_rule.py`` holds one against the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "ANNEAL_FLOOR",
    "FAST_START_GAIN",
    "HOLD_DECAY",
    "LOG_FACTOR_LIMIT",
    "Bounds",
    "FactorState",
    "Schedule",
    "StepStatistics",
    "adapt",
    "anneal_start",
    "annealed",
    "bases_by_scope",
    "clamp_log_factor",
    "clamp_to_lr_bounds",
    "damping",
    "factor",
    "lr_for",
    "signal",
]

#: After ``hold_after`` adapted steps the damping decays as ``exp(-(t - hold_after) / tau)`` with
#: ``tau = HOLD_DECAY * hold_after``: by ``2 * hold_after`` it is 5 % of ``d``, later it vanishes.
HOLD_DECAY = 1.0 / 3.0
#: The damping's multiplier at the first step of a fast start; it falls linearly to 1.
FAST_START_GAIN = 20.0
#: |log F| never exceeds this (F in [1e-26, 1e26]): F stays finite and non-zero whatever happens.
LOG_FACTOR_LIMIT = 60.0
#: Where the anneal ends, as a fraction of the lr it starts from (the last steps still move).
ANNEAL_FLOOR = 0.01


@dataclass(frozen=True)
class Schedule:
    """How far log F moves per step: the rule, its damping over time, and the ratio it steers to."""

    rule: Literal["paper", "normalized"]
    d: float
    fast_start: int
    hold_after: int
    target: float
    #: The anneal's window in optimizer steps (``anneal_to == 0``: no anneal): the lr used falls linearly
    #: from ``anneal_from`` to ``ANNEAL_FLOOR`` of it at ``anneal_to``, the run's last step.
    anneal_from: int = 0
    anneal_to: int = 0


@dataclass(frozen=True)
class Bounds:
    """Where F and the lr used (``lr_base * F``) are clamped; None: unbounded."""

    min_factor: float | None = None
    max_factor: float | None = None
    min_lr: float | None = None
    max_lr: float | None = None


@dataclass(frozen=True)
class StepStatistics:
    """One step's sums, per scope, from the path store; ``non_finite``: tensors with a NaN/inf step."""

    squared: Sequence[float]  # sum ||p_k||^2 over the tensors that moved
    expected: Sequence[float]  # sum mu_k(t_k): the random walk's value at each path's age
    moved: Sequence[int]  # tensors that moved (||s|| > 0, finite)
    non_finite: int = 0


@dataclass(frozen=True)
class FactorState:
    """Everything the rule carries from step to step, per scope."""

    log_factors: tuple[float, ...]
    ratios: tuple[float | None, ...]
    adapted_steps: int = 0
    skipped_steps: int = 0
    #: The optimizer step at which a scheduled lr first changed (a scheduler at work): the anneal stops there.
    anneal_stopped: int | None = None

    @classmethod
    def initial(cls, log_factor: float, scopes: int = 1) -> FactorState:
        return cls((log_factor,) * scopes, (None,) * scopes)

    def grown(self, scopes: int, log_factor: float) -> FactorState:
        """With scopes added (param groups added after attaching) at ``log_factor``."""
        extra = scopes - len(self.log_factors)
        if extra <= 0:
            return self
        return replace(self, log_factors=self.log_factors + (log_factor,) * extra, ratios=self.ratios + (None,) * extra)

    def with_log_factors(self, log_factors: Sequence[float]) -> FactorState:
        return replace(self, log_factors=tuple(log_factors))

    def with_anneal_stopped(self, step: int) -> FactorState:
        """The user's schedule moved the lr at optimizer step ``step``: the anneal keeps the value it has now (the
        first time only)."""
        return self if self.anneal_stopped is not None else replace(self, anneal_stopped=step)


def damping(schedule: Schedule, adapted_steps: int) -> float:
    """``d`` x the fast start's gain x the hold's decay, after ``adapted_steps`` adapted steps."""
    remaining = 1.0 - adapted_steps / schedule.fast_start if schedule.fast_start else 0.0
    value = schedule.d * (1.0 + (FAST_START_GAIN - 1.0) * max(0.0, remaining))
    if schedule.hold_after and adapted_steps > schedule.hold_after:
        value *= math.exp(-(adapted_steps - schedule.hold_after) / (HOLD_DECAY * schedule.hold_after))
    return value


def anneal_start(hold_after: int, total_steps: int) -> int:
    """The optimizer step after which a run of ``total_steps`` anneals: its second half, never during the find."""
    return max(hold_after, total_steps // 2)


def annealed(schedule: Schedule, step: int, stopped: int | None = None) -> float:
    """The anneal's multiplier of the lr used at optimizer step ``step``: 1 until ``anneal_from``, then linear
    to ``ANNEAL_FLOOR`` at ``anneal_to``; ``stopped`` (a scheduler moved the lr there) holds its value from then on.

    A constant lr found by the rule and held is what the user's constant lr asks for until the end, where a
    decay gains what a tuned schedule's does (benchmarks/RESULTS.md, section 6). A step count alone sets it:
    the run's optimizer steps, skipped updates included, as ``total_steps`` counts them (the rule's damping
    counts adapted steps).
    """
    t = step if stopped is None else min(step, stopped)
    if schedule.anneal_to <= schedule.anneal_from or t <= schedule.anneal_from:
        return 1.0
    return max(ANNEAL_FLOOR, (schedule.anneal_to - t) / (schedule.anneal_to - schedule.anneal_from))


def signal(schedule: Schedule, ratio: float, r_max: float) -> float:
    """The step of log F per unit of damping: ``r / target - 1``, normalized by its range.

    With ``rule="normalized"``: ||p_k|| <= 1, so r <= r_max = moved / expected; dividing by
    ``r_max / target - 1`` (known before the step's noise, so still unbiased) makes d the change of
    log F per step when all steps agree, whatever the optimizer. While young paths fill
    (t_k < ~1/c) the bound is loose, so the signal is damped until the path has its memory: the
    tight bound ``(1 - (1-c)^t_k)^2`` climbed 10x faster and ran away on broken networks
    (benchmarks/RESULTS.md). ``target=1`` is the paper's random walk.
    """
    value = ratio / schedule.target - 1.0
    if schedule.rule == "normalized":
        headroom = r_max / schedule.target - 1.0
        value = value / headroom if headroom > 1e-12 else 0.0
    return value


def clamp_log_factor(bounds: Bounds, value: float) -> float:
    """log F within ``LOG_FACTOR_LIMIT`` and the factor bounds (so F cannot wind up past them)."""
    value = min(max(value, -LOG_FACTOR_LIMIT), LOG_FACTOR_LIMIT)
    if bounds.min_factor is not None:
        value = max(value, math.log(bounds.min_factor))
    if bounds.max_factor is not None:
        value = min(value, math.log(bounds.max_factor))
    return value


def factor(bounds: Bounds, log_factor: float) -> float:
    """F = exp(log F), clamped again after exp so that rounding cannot cross the bounds."""
    value = math.exp(log_factor)
    if bounds.min_factor is not None:
        value = max(value, bounds.min_factor)
    if bounds.max_factor is not None:
        value = min(value, bounds.max_factor)
    return value


def lr_for(bounds: Bounds, base: float, log_factor: float, anneal: float = 1.0) -> float:
    """The lr used, ``lr_base * F`` capped at ``max_lr``, times the anneal's multiplier, at least ``min_lr``.

    The anneal decays the lr held within the bounds: a group held at ``max_lr`` decays from it (capping after
    the decay kept it at ``max_lr`` until the multiplier fell below ``max_lr / (lr_base * F)``). A group whose
    base lr is 0 stays at 0.
    """
    if base == 0:
        return 0.0  # frozen by its lr (or a warm-up's first step): the bounds are for groups that move
    if not base > 0:  # min_lr would flip a negative lr's sign; NaN would poison the step
        raise ValueError(f"CLARA scales a positive learning rate; a param group's scheduled lr is {base!r}")
    lr = base * anneal * factor(bounds, log_factor)
    if bounds.max_lr is not None:
        lr = min(lr, bounds.max_lr * anneal)
    if bounds.min_lr is not None:
        lr = max(lr, bounds.min_lr)
    return lr


def bases_by_scope(
    bounds: Bounds, bases: list[Any], scopes: int, scope_of: Callable[[int], int]
) -> list[list[float]] | None:
    """Per scope, the positive base lrs of its groups, where lr bounds bind (None: no lr bound)."""
    if bounds.min_lr is None and bounds.max_lr is None:
        return None
    floats = [float(b) for b in bases]
    return [[b for j, b in enumerate(floats) if scope_of(j) == k and b > 0] for k in range(scopes)]


def clamp_to_lr_bounds(bounds: Bounds, log_factors: Sequence[float], bases: Sequence[Sequence[float]]) -> list[float]:
    """Keep each scope's log F where the lr bounds still bind (``bases[scope]``: its positive base lrs)."""
    out = list(log_factors)
    for scope, members in enumerate(bases):
        if not members:
            continue
        value = out[scope]
        if bounds.max_lr is not None:
            value = min(value, math.log(bounds.max_lr / min(members)))
        if bounds.min_lr is not None:
            value = max(value, math.log(bounds.min_lr / max(members)))
        out[scope] = value
    return out


def adapt(
    state: FactorState,
    stats: StepStatistics,
    schedule: Schedule,
    bounds: Bounds,
    bases: Sequence[Sequence[float]] | None = None,
    gate: float = 1.0,
    fitted: bool = False,
) -> FactorState:
    """The next state: every scope with a reference (``expected > 0``) takes the rule's step.

    ``bases`` (each scope's positive base lrs) applies the lr bounds to log F; None when there are
    no lr bounds. ``gate`` (in [-1, 1], :class:`~lightning_clara.loss_trend.LossTrend`) multiplies
    an upward move while the ratio is below 1: 1 lets the ratio raise F, -1 turns the raise into a
    fall. A step counts as adapted when at least one scope moved, as skipped when a tensor took a
    NaN/inf step.
    """
    step_damping = damping(schedule, state.adapted_steps)
    log_factors = list(state.log_factors)
    ratios = list(state.ratios)
    adapted = False
    for scope, (squared, expected, moved) in enumerate(zip(stats.squared, stats.expected, stats.moved, strict=True)):
        if expected > 0.0:
            ratio = squared / expected
            ratios[scope] = ratio
            value = signal(schedule, ratio, moved / expected)
            if value > 0.0 and fitted:  # the network fits its data: agreeing steps grow its margins
                value *= min(gate, 0.0)
            elif value > 0.0 and ratio < 1.0:  # r >= 1 (steps agree more than noise's): the lr is too small
                value *= gate
            step = step_damping * value
            log_factors[scope] = clamp_log_factor(bounds, log_factors[scope] + step)
            adapted = True
    if bases is not None:  # the lr bounds win over the factor bounds; log F stays within both for the log
        log_factors = [clamp_log_factor(bounds, v) for v in clamp_to_lr_bounds(bounds, log_factors, bases)]
    return FactorState(
        tuple(log_factors),
        tuple(ratios),
        state.adapted_steps + int(adapted),
        state.skipped_steps + int(stats.non_finite > 0),
        state.anneal_stopped,
    )
