"""The loss brake: the trend's z-score, the gate it gives, and how the gate enters the rule and the controller."""

from __future__ import annotations

import math
import random
import statistics
import warnings

import pytest
import torch

from lightning_clara import CLARA
from lightning_clara.loss_trend import FITTED, WARMUP, Z_FALLING, LossTrend
from lightning_clara.rule import Bounds, FactorState, Schedule, StepStatistics, adapt


def fed(losses: list[float], rate: float = 0.02) -> LossTrend:
    trend = LossTrend(rate)
    for loss in losses:
        trend = trend.observed(loss)
    return trend


def noise(steps: int, seed: int, level: float = 2.0, sigma: float = 0.2) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sigma) for _ in range(steps)]


def test_the_trend_z_score_is_in_noise_units_under_white_noise() -> None:
    """Under i.i.d. losses z is a standard score: mean ~0, standard deviation ~1 (k(c) is the exact scale)."""
    for steps in (30, 400):  # young (the bias-corrected weights) and settled
        scores = [fed(noise(steps, seed)).z for seed in range(300)]
        assert abs(statistics.fmean(scores)) < 0.25
        assert 0.75 < statistics.stdev(scores) < 1.3


def test_a_falling_loss_opens_the_gate_and_a_flat_or_rising_one_closes_it() -> None:
    falling = [2.0 - 0.002 * t + x - 2.0 for t, x in enumerate(noise(300, 1))]
    rising = [2.0 + 0.002 * t + x - 2.0 for t, x in enumerate(noise(300, 2))]
    assert fed(falling).gate == 1.0
    assert fed(rising).gate == -1.0
    flat = [fed(noise(300, seed)).gate for seed in range(50)]
    assert statistics.fmean(flat) < -0.5  # a stalled loss turns raises into falls
    assert all(-1.0 <= g <= 1.0 for g in flat)


def test_the_gate_is_open_until_the_variance_has_settled() -> None:
    rising = [0.01 * t for t in range(WARMUP - 1)]
    assert fed(rising).gate == 1.0
    assert fed([*rising, 1.0]).gate == -1.0
    assert fed([float("nan"), math.inf, 1.0]).count == 1  # non-finite losses are no trend


def test_the_gate_scales_only_upward_moves() -> None:
    schedule = Schedule("normalized", 0.1, 0, 0, 0.7)
    state = FactorState.initial(0.0)
    up = StepStatistics([0.9], [1.0], [4])  # r = 0.9 > target: the ratio asks for a raise
    down = StepStatistics([0.3], [1.0], [4])
    raised = adapt(state, up, schedule, Bounds()).log_factors[0]
    assert raised > 0
    assert adapt(state, up, schedule, Bounds(), gate=-1.0).log_factors[0] == pytest.approx(-raised)
    assert adapt(state, up, schedule, Bounds(), gate=0.0).log_factors[0] == 0.0
    lowered = adapt(state, down, schedule, Bounds()).log_factors[0]
    assert adapt(state, down, schedule, Bounds(), gate=-1.0).log_factors[0] == lowered
    assert adapt(state, down, schedule, Bounds(), gate=1.0).log_factors[0] == lowered
    assert Z_FALLING > 0


def anticorrelated_run(losses: list[float] | None, **options: object) -> CLARA:
    """SGD on slightly anti-correlated noise, fed ``losses`` if given.

    Gradients ``e_t - 0.08 e_(t-1)`` (i.i.d. Gaussian e): over the path's memory the steps cancel a
    little, so r settles near (1 - 0.08)^2 / (1 + 0.08^2) = 0.84: above the target 0.7 (the ratio asks
    for a raise) and below 1 (where the brake acts), as at a far too large lr on a deep network.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(512))
    optimizer = torch.optim.SGD([weight], lr=1e-3)
    clara = CLARA(optimizer, **options)
    previous = torch.zeros(512)
    for step in range(200):
        noise_ = torch.randn(512, generator=generator)
        weight.grad = noise_ - 0.08 * previous
        previous = noise_
        optimizer.step()
        if losses is not None:
            clara.observe_loss(losses[step])
    return clara


def test_the_controller_raises_f_while_the_loss_falls_and_lowers_it_once_it_stalls() -> None:
    falling = [3.0 - 0.01 * t + x - 2.0 for t, x in enumerate(noise(200, 4, sigma=0.05))]
    stalled = noise(200, 5)
    without = anticorrelated_run(None)
    with_falling = anticorrelated_run(falling)
    with_stall = anticorrelated_run(stalled)
    start = math.log(0.1)
    assert 0.7 < without.ratio < 1.0
    assert without.log_factors[0] > start  # the ratio alone raises F
    assert with_falling.log_factors[0] > start  # so does it while the loss keeps falling
    assert with_stall.log_factors[0] < start  # a stalled loss turns the raise into a fall
    assert with_stall.log_factors[0] - start == pytest.approx(start - without.log_factors[0], rel=0.5)


def test_the_paper_rule_has_no_brake_and_ignores_losses() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paper = anticorrelated_run(noise(200, 6), rule="paper")
    plain = anticorrelated_run(None, rule="paper")
    assert paper.loss_brake is False
    assert not paper.wants_loss
    assert paper.log_factors == plain.log_factors
    assert not anticorrelated_run(None, loss_brake=False).wants_loss


def test_the_trend_is_checkpointed_and_bad_values_are_refused() -> None:
    clara = anticorrelated_run(noise(200, 7))
    state = clara.state_dict()
    assert state["loss_trend"]["count"] == 200
    fresh = anticorrelated_run(None)
    fresh.load_state_dict(state)
    assert fresh._losses.trend == clara._losses.trend
    for key, value in (("fast", math.nan), ("count", -1), ("second", "x")):
        bad = {**state, "loss_trend": {**state["loss_trend"], key: value}}
        with pytest.raises(ValueError, match="loss_trend"):
            anticorrelated_run(None).load_state_dict(bad)
    with pytest.raises(TypeError, match="loss_brake"):
        CLARA(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), loss_brake=1)


def test_a_fitted_network_gets_no_raise_whatever_the_ratio() -> None:
    """Once the smoothed loss is below FITTED of the first losses', agreeing steps (margin growth) raise nothing."""
    schedule = Schedule("normalized", 0.1, 0, 0, 0.7)
    state = FactorState.initial(0.0)
    agreeing = StepStatistics([3.0], [1.0], [4])  # r = 3 >= 1: without the fit, never gated
    assert adapt(state, agreeing, schedule, Bounds(), gate=-1.0).log_factors[0] > 0
    assert adapt(state, agreeing, schedule, Bounds(), gate=1.0, fitted=True).log_factors[0] == 0.0
    assert adapt(state, agreeing, schedule, Bounds(), gate=-1.0, fitted=True).log_factors[0] < 0
    down = StepStatistics([0.3], [1.0], [4])
    assert adapt(state, down, schedule, Bounds(), fitted=True) == adapt(state, down, schedule, Bounds())
    assert 0.0 < FITTED < 1.0
    decaying = [2.3 * math.exp(-t / 20) for t in range(200)]
    trend = fed(decaying)
    assert trend.initial == pytest.approx(statistics.fmean(decaying[:WARMUP]))
    assert trend.fitted
    assert not fed(decaying[:40]).fitted
    assert not fed([-1.0 + 0.001 * t for t in range(200)]).fitted  # a loss that can be negative: no fit test


def test_a_loss_that_went_below_zero_is_never_fitted_again() -> None:
    """A negative log-likelihood starts positive and crosses 0: its 5 % of the first losses means nothing."""
    falling = [2.0 - 0.02 * t for t in range(300)]  # 2.0 ... -3.98
    assert fed(falling[:90]).fitted is False  # still far above 5 % of 2.0
    crossed = fed(falling)
    assert crossed.negative
    assert not crossed.fitted
    assert not fed([*falling, *([0.01] * 200)]).fitted  # back near 0 later: still not a loss bounded by 0
    positive = fed([2.0 * math.exp(-t / 20) for t in range(300)])
    assert positive.fitted
    assert not positive.negative
    state = crossed.state_dict()
    assert state["negative"] is True
    assert LossTrend.from_state(0.02, state) == crossed
    older = {key: value for key, value in state.items() if key != "negative"}  # saved before the flag existed
    assert LossTrend.from_state(0.02, older).negative is False
    clara = anticorrelated_run(noise(200, 3))
    bad = clara.state_dict()
    bad["loss_trend"]["negative"] = "yes"
    with pytest.raises(ValueError, match="negative"):
        anticorrelated_run(None).load_state_dict(bad)


def test_a_huge_finite_loss_is_left_out_instead_of_poisoning_the_trend() -> None:
    """A float64 loss near 1e200: its squared deviation overflows; the trend stays finite and saveable."""
    before = fed([1.0 + 0.01 * t for t in range(12)])
    after = before.observed(1e200)
    assert after == before
    later = after.observed(1.0)
    assert all(math.isfinite(v) for v in later.state_dict().values())
    assert later.count == before.count + 1
