"""The rule as pure functions (``lightning_clara.rule``), held against the loop reference with no hooks.

``tests/reference_loop.py`` keeps paths and takes the rule's step in one plain loop; here its per-step
sums are handed to :func:`~lightning_clara.rule.adapt` and log F must agree step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_loop import SimpleCLARA, damping_gain, plain_sgd_mu

from lightning_clara.options import CLARAOptions
from lightning_clara.rule import (
    LOG_FACTOR_LIMIT,
    Bounds,
    FactorState,
    Schedule,
    StepStatistics,
    adapt,
    clamp_log_factor,
    clamp_to_lr_bounds,
    damping,
    factor,
    lr_for,
    signal,
)

SHAPES = [torch.Size((5, 4)), torch.Size((7,)), torch.Size((1,))]


def _loop_sums(loop: SimpleCLARA, moved: list[bool]) -> StepStatistics:
    """The sums the loop's last update used: its paths and counts after the update."""
    squared = sum(float(loop.paths[k].pow(2).sum()) for k in range(len(SHAPES)) if moved[k])
    expected = sum(loop.mu(SHAPES[k].numel(), loop.counts[k]) for k in range(len(SHAPES)) if moved[k])
    return StepStatistics([squared], [expected], [sum(moved)])


@pytest.mark.parametrize("rule", ["paper", "normalized"])
def test_adapt_follows_the_loop_reference(rule: str) -> None:
    """200 steps of drifting noise (some tensors idle): adapt() on the loop's sums gives the loop's log F."""
    c, d = 0.1, 0.05
    settings = CLARAOptions(rule=rule, c=c, d=d, fast_start=20, hold_after=90).resolve()
    loop = SimpleCLARA(SHAPES, c=c, d=d, mu=plain_sgd_mu(c), rule=rule, fast_start=20, hold_after=90)
    state = FactorState.initial(math.log(settings.initial_factor))
    generator = torch.Generator().manual_seed(3)
    moved_any = 0
    for step in range(200):
        moved = [bool((step + k) % 5) for k in range(len(SHAPES))]
        steps = [
            0.3 + torch.randn(shape, generator=generator, dtype=torch.float64) if m else None
            for shape, m in zip(SHAPES, moved, strict=True)
        ]
        loop.update(steps)
        state = adapt(state, _loop_sums(loop, moved), settings.schedule, settings.bounds)
        moved_any += any(moved)
        assert state.log_factors[0] == pytest.approx(loop.log_factor, rel=1e-12, abs=1e-12), step
        assert state.ratios[0] == pytest.approx(loop.ratio, rel=1e-12)
    assert state.adapted_steps == loop.adapted == moved_any
    assert abs(state.log_factors[0] - math.log(settings.initial_factor)) > 0.05  # the factor moved


def test_damping_is_the_fast_start_then_the_hold() -> None:
    schedule = Schedule("normalized", d=0.03, fast_start=50, hold_after=600, target=0.7)
    for t in (0, 1, 25, 49, 50, 51, 600, 601, 900, 1800):
        assert damping(schedule, t) == pytest.approx(0.03 * damping_gain(t, 50, 600), rel=1e-12), t
    assert damping(Schedule("paper", 1e-3, 0, 0, 1.0), 10**6) == 1e-3  # no fast start, no hold


def test_signal_paper_and_normalized() -> None:
    paper = Schedule("paper", 1e-3, 0, 0, target=1.0)
    assert signal(paper, 1.5, 99.0) == pytest.approx(0.5)
    normalized = Schedule("normalized", 0.03, 0, 0, target=0.5)
    assert signal(normalized, 1.0, 3.0) == pytest.approx((1.0 / 0.5 - 1) / (3.0 / 0.5 - 1))
    assert signal(normalized, 3.0, 3.0) == pytest.approx(1.0)  # all steps agree: one unit of damping
    assert signal(normalized, 0.4, 0.5) == 0.0  # no headroom (r_max at the target): no move


def test_clamps_and_bounds() -> None:
    free = Bounds()
    assert clamp_log_factor(free, 1e9) == LOG_FACTOR_LIMIT
    assert clamp_log_factor(free, -1e9) == -LOG_FACTOR_LIMIT
    bounded = Bounds(min_factor=0.5, max_factor=4.0, min_lr=1e-3, max_lr=0.1)
    assert clamp_log_factor(bounded, 10.0) == pytest.approx(math.log(4.0))
    assert clamp_log_factor(bounded, -10.0) == pytest.approx(math.log(0.5))
    assert factor(bounded, math.log(4.0) + 1e-15) <= 4.0  # exp's rounding cannot cross the bound
    assert lr_for(bounded, 1.0, 0.0) == 0.1  # lr 1 x F 1 is capped at max_lr
    assert lr_for(bounded, 1e-6, 0.0) == 1e-3
    # the anneal decays the lr held within the bounds: from max_lr, and never below min_lr
    assert lr_for(bounded, 1.0, 0.0, anneal=0.5) == pytest.approx(0.05)
    assert lr_for(bounded, 1e-2, 0.0, anneal=0.01) == 1e-3
    # scope 0: bases 0.01 and 0.05 -> log F at most log(0.1 / 0.01), at least log(1e-3 / 0.05)
    clamped = clamp_to_lr_bounds(bounded, [5.0, -5.0, 0.3], [[0.01, 0.05], [0.01, 0.05], []])
    assert clamped[0] == pytest.approx(math.log(10.0))
    assert clamped[1] == pytest.approx(math.log(1e-3 / 0.05))
    assert clamped[2] == 0.3  # a scope without positive bases is left alone


def test_adapt_moves_only_scopes_with_a_reference_and_counts_skips() -> None:
    schedule = Schedule("paper", d=0.1, fast_start=0, hold_after=0, target=1.0)
    state = FactorState.initial(0.0, scopes=2)
    nothing = adapt(state, StepStatistics([0.0, 0.0], [0.0, 0.0], [0, 0], non_finite=1), schedule, Bounds())
    assert nothing == FactorState((0.0, 0.0), (None, None), adapted_steps=0, skipped_steps=1)
    one = adapt(nothing, StepStatistics([2.0, 0.0], [1.0, 0.0], [1, 0]), schedule, Bounds())
    assert one.log_factors == (pytest.approx(0.1), 0.0)  # d * (r - 1) with r = 2
    assert one.ratios == (2.0, None)
    assert (one.adapted_steps, one.skipped_steps) == (1, 1)
    assert state.log_factors == (0.0, 0.0)  # pure: the input record is unchanged


def test_factor_state_grows_for_added_groups() -> None:
    state = FactorState((0.5,), (1.0,), adapted_steps=3)
    grown = state.grown(3, -1.0)
    assert grown.log_factors == (0.5, -1.0, -1.0)
    assert grown.ratios == (1.0, None, None)
    assert grown.adapted_steps == 3
    assert state.grown(1, -1.0) is state
