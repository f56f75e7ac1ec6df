"""The Page-Hinkley safeguard: the detector alone, ``CLARA.observe_loss`` and ``CLARACallback(safeguard=True)``.

Detector expectations are derived from the CUSUM it implements: per observation the statistic moves by
``z - delta`` with ``z = (loss - mean) / std`` (the loss in units of its own noise, against the running
statistics from *before* that loss), is floored at 0 and alarms past ``threshold`` (defaults: delta 0.5,
threshold 20, memory 50, warmup 10). Controller expectations follow ``observe_loss``'s contract (called after
step t with the loss measured before step t, so a bad loss at step t reflects step t-1) and compare with
parameter copies taken by the test and with ``log 2``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RecordingLogger, make_trainer
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clara import CLARA, CLARACallback
from lightning_clara.rule import LOG_FACTOR_LIMIT
from lightning_clara.safeguard import UNFED_STEPS, PageHinkley

STREAM = 2000
SEEDS = 50
LOG2 = math.log(2.0)


def alarms_on(stream: list[float], detector: PageHinkley | None = None) -> list[int]:
    """Indices at which the detector alarms (reset after each alarm, as CLARA does)."""
    detector = detector or PageHinkley()
    out = []
    for i, loss in enumerate(stream):
        if detector.update(loss):
            out.append(i)
            detector.reset()
    return out


# ---------------------------------------------------------------------------------------------- the detector
def _gaussian(generator: torch.Generator) -> Tensor:
    """Stationary, relative noise 0.1."""
    return 1.0 + 0.1 * torch.randn(STREAM, generator=generator, dtype=torch.float64)


def _batch_mse(generator: torch.Generator) -> Tensor:
    """Stationary mini-batch MSE of 128 Gaussian residuals: skewed (chi-square), relative noise sqrt(2/128)."""
    return torch.randn(STREAM, 128, generator=generator, dtype=torch.float64).pow(2).mean(dim=1)


def _decreasing(generator: torch.Generator) -> Tensor:
    """A training curve: exponential decay to a floor, times the mini-batch MSE noise."""
    t = torch.arange(STREAM, dtype=torch.float64)
    return (0.1 + torch.exp(-t / 300.0)) * _batch_mse(generator)


@pytest.mark.parametrize("make_stream", [_gaussian, _batch_mse, _decreasing], ids=["gauss", "batch-mse", "decreasing"])
def test_no_false_alarm_on_stationary_or_decreasing_losses(make_stream: Callable[[torch.Generator], Tensor]) -> None:
    """Zero alarms over 50 seeds x 2000 steps with the defaults (delta 0.5, threshold 20).

    In noise units the CUSUM increments z - delta have mean ~ -0.5 and sd ~ 1 whatever the loss's scale or
    relative noise; Wald's bound puts an excursion above h at exp(-2 delta h / 1) = exp(-20) ~ 2e-9, so over
    ~1e5 steps the expected number of false alarms is < 1e-3 (the skew of the chi-square losses and the noisy
    running std fatten the tails of z a little; the largest excess over these streams is ~9). A decreasing loss
    lies below its lagging running mean: it only adds negative increments.
    """
    total = sum(len(alarms_on(make_stream(torch.Generator().manual_seed(seed)).tolist())) for seed in range(SEEDS))
    assert total == 0


def test_alarm_on_the_first_step_of_a_tenfold_jump() -> None:
    """Loss x10 after 300 stationary steps (mean ~1, std ~0.1): the first jumped loss is tested against the
    statistics from before it, z ~ (10 - 1) / 0.1 = 90 (+-10 from its own noise), so it alone adds ~89.5 >
    threshold 20 and the alarm comes at once."""
    jump = 300
    for seed in range(10):
        stream = _gaussian(torch.Generator().manual_seed(seed))
        stream[jump:] *= 10.0
        alarms = alarms_on(stream.tolist())
        assert alarms[:1] == [jump], (seed, alarms)


def test_gradual_doubling_is_caught_within_a_few_steps() -> None:
    """Loss x2 after 300 steps with mean 1 and std 0.1. By hand, each jumped loss 2 is tested, then moves the
    statistics with rate 1/50 (m += (2 - m) / 50, v = 0.98 (v + 0.02 (2 - m)^2)):

    ========  =========  =====  ===========  ==============
    jumped    mean       std    z - delta    excess
    ========  =========  =====  ===========  ==============
    1st       1.0        0.1    9.50         9.5
    2nd       1.02       0.171  5.22         14.7
    3rd       1.0396     0.218  3.90         18.6
    4th       1.0588     0.255  3.20         21.8 > 20
    ========  =========  =====  ===========  ==============

    so the alarm comes on the 4th jumped step, ``jump + 3`` (checked exactly on a noise-free stream alternating
    0.9 / 1.1, whose excess before the jump stays <= 0.5). With Gaussian noise the jumped losses scatter by
    0.2 = 2 pre-jump stds, which moves each of the first z by ~+-2: the crossing comes a step earlier or later.
    """
    jump = 300
    alternating = [1.1, 0.9] * (jump // 2) + [2.0] * 10
    assert alarms_on(alternating) == [jump + 3]
    for seed in range(10):
        stream = _gaussian(torch.Generator().manual_seed(seed))
        stream[jump:] *= 2.0
        alarms = alarms_on(stream.tolist())
        assert alarms, seed
        assert jump + 2 <= alarms[0] <= jump + 4, (seed, alarms[:3])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_is_an_immediate_alarm_even_in_warmup(value: float) -> None:
    """A non-finite loss alarms at once, counts as an alarm, and does not poison the statistics."""
    detector = PageHinkley()
    assert detector.update(1.0) is False
    state = detector.state_dict()
    assert detector.update(value) is True
    assert detector.alarms == 1
    assert {k: v for k, v in detector.state_dict().items() if k != "alarms"} == {
        k: v for k, v in state.items() if k != "alarms"
    }
    assert detector.update(1.0) is False  # still warming up, statistics finite


def test_reset_clears_statistics_but_keeps_the_alarm_count() -> None:
    """After reset() the detector behaves exactly like a fresh one (warmup again); ``alarms`` survives."""
    detector = PageHinkley()
    stream = _gaussian(torch.Generator().manual_seed(0)).tolist()
    assert alarms_on([*stream[:100], 10.0], detector) == [100]
    # after the alarm's reset: 10 warm-up losses (running mean and variance are then their exact mean and
    # population variance), then one loss 3 stds above them: it adds 3 - delta = 2.5 to the excess, no alarm
    warm = torch.tensor(stream[200:210], dtype=torch.float64)
    high = float(warm.mean() + 3.0 * warm.std(correction=0))
    assert alarms_on([*warm.tolist(), high], detector) == []
    assert detector.excess == pytest.approx(2.5, abs=1e-9)
    detector.reset()
    assert (detector.count, detector.mean, detector.variance, detector.excess) == (0, 0.0, 0.0, 0.0)
    assert detector.alarms == 1
    fresh = PageHinkley()
    jumped = [*stream[:200], *(10.0 * v for v in stream[200:])]
    assert [detector.update(v) for v in jumped[:201]] == [fresh.update(v) for v in jumped[:201]]
    assert detector.alarms == fresh.alarms + 1 == 2


def test_state_dict_round_trip_continues_identically() -> None:
    """A detector restored from another's state_dict (plain ints/floats) produces identical decisions after."""
    stream = _gaussian(torch.Generator().manual_seed(1)).tolist()
    stream = [*stream[:400], *(5.0 * v for v in stream[400:])]
    options = {"delta": 0.25, "threshold": 8.0, "memory": 20, "warmup": 5}  # none of them the default
    original = PageHinkley(**options)
    for loss in stream[:397]:
        original.update(loss)
    state = original.state_dict()
    assert set(state) == {"count", "mean", "variance", "excess", "alarms"}
    assert all(type(v) in (int, float) for v in state.values())
    assert state["count"] == 397
    restored = PageHinkley(**options)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state
    assert alarms_on(stream[397:], restored) == alarms_on(stream[397:], original) != []
    assert restored.state_dict() == original.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"delta": -0.1}, ValueError, "delta"),
        ({"delta": math.nan}, ValueError, "delta"),
        ({"delta": "0.1"}, TypeError, "delta"),
        ({"threshold": 0.0}, ValueError, "threshold"),
        ({"threshold": math.inf}, ValueError, "threshold"),
        ({"memory": 0}, ValueError, "memory"),
        ({"memory": 2.5}, TypeError, "memory"),
        ({"warmup": 0}, ValueError, "warmup"),
        ({"warmup": True}, TypeError, "warmup"),
    ],
)
def test_invalid_detector_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error, match=rf"\b{argument}\b"):
        PageHinkley(**kwargs)


def test_invalid_safeguard_option_is_a_type_error() -> None:
    """Controller takes a bool or a PageHinkley, the callback a bool."""
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"\bsafeguard\b"):
        CLARA(optimizer, safeguard="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\bsafeguard\b"):
        CLARACallback(safeguard=1)  # type: ignore[arg-type]
    detector = PageHinkley(threshold=1.0)
    assert CLARA(optimizer, safeguard=detector).safeguard is detector


def test_one_detector_watches_one_controller() -> None:
    """Two controllers fed by one PageHinkley would each see half its stream, and an alarm's reset would blind
    the other: the second is refused until the first detaches."""
    detector = PageHinkley()
    first = CLARA(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), safeguard=detector)
    other = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="PageHinkley already watches"):
        CLARA(other, safeguard=detector)
    assert getattr(other, "_clara_controller", None) is None  # refused before anything was attached
    first.detach()
    second = CLARA(other, safeguard=detector)
    assert second.safeguard is detector
    first.detach()  # again: must not free the detector the second controller holds
    third = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="PageHinkley already watches"):
        CLARA(third, safeguard=detector)
    second.detach()
    CLARA(first.optimizer)  # attached again, without a safeguard
    with pytest.raises(RuntimeError, match="already has a CLARA controller"):
        CLARA(first.optimizer, safeguard=detector)
    assert not detector.in_use  # a construction that failed claims nothing
    fresh = [CLARA(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), safeguard=True) for _ in range(2)]
    assert fresh[0].safeguard is not fresh[1].safeguard  # safeguard=True: a detector each


# ---------------------------------------------------------------------------------------------- controller
def regression() -> tuple[Tensor, Tensor, list[Tensor]]:
    """A float64 linear regression (fixed seed) and zero-initialised weight and bias."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(5, 1, generator=generator, dtype=torch.float64) + 0.5
    weight = torch.zeros(5, 1, dtype=torch.float64, requires_grad=True)
    return x, y, [weight, torch.zeros(1, dtype=torch.float64, requires_grad=True)]


def loss_of(x: Tensor, y: Tensor, params: list[Tensor]) -> Tensor:
    return nn.functional.mse_loss(x @ params[0] + params[1], y)


def step(clara: CLARA, x: Tensor, y: Tensor, params: list[Tensor], lr_scale: float = 1.0) -> Tensor:
    """One full-batch optimizer step (the lr times ``lr_scale`` for it); returns the loss its gradient came
    from, measured before the step: what ``observe_loss`` takes after the step."""
    clara.optimizer.zero_grad()
    loss = loss_of(x, y, params)
    loss.backward()
    for group in clara.optimizer.param_groups:
        group["lr"] *= lr_scale
    clara.optimizer.step()
    for group in clara.optimizer.param_groups:
        group["lr"] /= lr_scale
    return loss.detach()


def train_quietly(clara: CLARA, x: Tensor, y: Tensor, params: list[Tensor], steps: int = 30) -> None:
    """Steps, each followed by observe_loss of the loss it came from: a decreasing loss, no alarm."""
    for _ in range(steps):
        assert clara.observe_loss(step(clara, x, y, params)) is False


@dataclass
class BlowUp:
    before: list[Tensor]  # the parameters before the blown-up step t-1
    after: list[Tensor]  # the parameters after step t, when observe_loss is called
    log_factor: float  # log F after step t's own adaptation
    alarm: bool  # observe_loss's answer
    message: str  # the warning's text


def blow_up(clara: CLARA, x: Tensor, y: Tensor, params: list[Tensor]) -> BlowUp:
    """Step t-1 with the lr multiplied by 1e4 (its own loss, measured before it, is normal: no alarm), then an
    ordinary step t, whose loss reflects the blown-up step: observe_loss of that loss."""
    before = [p.detach().clone() for p in params]
    assert clara.observe_loss(step(clara, x, y, params, lr_scale=1e4)) is False
    loss = step(clara, x, y, params)
    assert float(loss) > 1e3  # step t-1 really blew the loss up
    after = [p.detach().clone() for p in params]
    log_factor = clara.log_factors[0]
    with pytest.warns(RuntimeWarning, match="safeguard") as record:
        alarm = clara.observe_loss(loss)
    return BlowUp(before, after, log_factor, alarm, str(record[-1].message))


def make_clara(
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: Any
) -> tuple[CLARA, Tensor, Tensor, list[Tensor]]:
    """CLARA with the default safeguard on the regression above (lr 0.02 is stable for it)."""
    x, y, params = regression()
    clara = CLARA(optimizer_class(params, lr=0.02), c=0.2, d=0.01, safeguard=True, **kwargs)
    return clara, x, y, params


def assert_params_equal(params: list[Tensor], expected: list[Tensor]) -> None:
    """Bitwise equal (NaN nowhere expected)."""
    for old, param in zip(expected, params, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0.0, atol=0.0)


RESTORED_TWO = "; parameters restored from before the last 2 step(s)"
ALREADY_RESTORED = "; parameters already restored by the previous alarm (no step since)"


@pytest.mark.parametrize(
    ("optimizer_class", "sample"),
    [(torch.optim.SGD, None), (torch.optim.SGD, 4096), (torch.optim.Adam, 4096)],
    ids=["sgd-full", "sgd-sample", "adam-sample"],
)
def test_alarm_halves_factor_and_restores_the_parameters_from_before_the_blown_up_step(
    optimizer_class: type[torch.optim.Optimizer], sample: int | None
) -> None:
    """The safeguard keeps its restore point whatever the paths (a sample or every coordinate). The loss
    observed after step t reflects the blown-up step t-1: alarm, RuntimeWarning, log F down by exactly log 2,
    one alarm, the test restarted, and the parameters bitwise those from before step t-1. The optimizer's own
    state is not rolled back. Training then goes on past the warm-up without a new alarm."""
    clara, x, y, params = make_clara(optimizer_class, sample=sample)
    assert clara.sample == sample
    train_quietly(clara, x, y, params)
    assert clara.lr_factor != 1.0
    optimizer_state = copy.deepcopy(clara.optimizer.state_dict()["state"])  # before the two steps of blow_up
    result = blow_up(clara, x, y, params)
    assert result.alarm is True
    assert result.message.endswith(RESTORED_TWO)
    assert f"F halved to {math.exp(result.log_factor - LOG2):.4g};" in result.message
    assert clara.num_safeguard_alarms == 1
    assert clara.log_factors[0] == result.log_factor - LOG2
    assert clara.safeguard is not None
    assert clara.safeguard.count == 0  # the test restarted
    assert_params_equal(params, result.before)
    assert not all(torch.equal(a, b) for a, b in zip(result.after, result.before, strict=True))
    if optimizer_class is torch.optim.Adam:
        # not rolled back: two more steps counted, the moments still hold the blown-up gradient
        state = clara.optimizer.state_dict()["state"]
        assert [int(s["step"]) for s in state.values()] == [int(s["step"]) + 2 for s in optimizer_state.values()]
        assert float(state[0]["exp_avg_sq"].max()) > 1e3 * float(optimizer_state[0]["exp_avg_sq"].max())
    train_quietly(clara, x, y, params, steps=20)  # beyond the warm-up of 10: training goes on normally
    assert clara.num_safeguard_alarms == 1


def test_a_loss_without_a_step_since_the_alarm_is_ignored() -> None:
    """A NaN loss right after an alarm, with no step in between (the same poisoned state seen again, or a
    step GradScaler skipped) neither halves F again nor warns; the parameters stay restored (issue 21)."""
    clara, x, y, params = make_clara()
    train_quietly(clara, x, y, params)
    result = blow_up(clara, x, y, params)
    assert result.message.endswith(RESTORED_TWO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clara.observe_loss(float("nan")) is False
        assert clara.observe_loss(float("inf")) is False
    assert clara.log_factors[0] == pytest.approx(result.log_factor - LOG2, abs=1e-12)
    assert clara.num_safeguard_alarms == 1
    assert_params_equal(params, result.before)


def test_undo_restores_the_pre_step_parameters_exactly_after_unit_steps() -> None:
    """The applied steps are CLARA's unit steps rather than the optimizer's: the parameters from before the
    blown-up step come back all the same, bitwise."""
    clara, x, y, params = make_clara(unit_step=True)
    train_quietly(clara, x, y, params)
    result = blow_up(clara, x, y, params)
    assert result.alarm is True
    assert result.message.endswith(RESTORED_TWO)
    assert_params_equal(params, result.before)


def test_alarm_right_after_attaching_restores_from_before_the_only_step() -> None:
    """One step after attaching there is a single snapshot: the parameters from before that step come back,
    and the warning says one step."""
    clara, x, y, params = make_clara()
    before = [p.detach().clone() for p in params]
    step(clara, x, y, params)
    assert not torch.equal(params[0].detach(), before[0])
    log_factor = clara.log_factors[0]
    with pytest.warns(RuntimeWarning, match="safeguard") as record:
        assert clara.observe_loss(math.nan) is True
    assert str(record[-1].message).endswith("; parameters restored from before the last 1 step(s)")
    assert clara.log_factors[0] == log_factor - LOG2
    assert_params_equal(params, before)


def test_undo_after_a_nan_step_restores_finite_parameters() -> None:
    """A NaN gradient makes SGD write NaN into a weight (step t-1, whose own loss was finite: no alarm); the loss
    of step t, measured at those weights, is NaN and alarms at once: the finite parameters from before step t-1
    come back bitwise, although both snapshots were taken around NaN steps. F stays finite and is halved."""
    clara, x, y, params = make_clara(skip_nonfinite=False)
    train_quietly(clara, x, y, params, steps=5)
    before = [p.detach().clone() for p in params]
    clara.optimizer.zero_grad()
    loss = loss_of(x, y, params)
    loss.backward()
    params[0].grad[0, 0] = math.nan  # type: ignore[index]
    with pytest.warns(RuntimeWarning, match="NaN/inf step"):
        clara.optimizer.step()
    assert not torch.isfinite(params[0]).all()
    assert clara.observe_loss(loss.detach()) is False
    with pytest.warns(RuntimeWarning, match="NaN/inf step"):
        nan_loss = step(clara, x, y, params)
    assert math.isnan(float(nan_loss))
    log_factor = clara.log_factors[0]
    with pytest.warns(RuntimeWarning, match="safeguard") as record:
        assert clara.observe_loss(nan_loss) is True
    assert str(record[-1].message).endswith(RESTORED_TWO)
    assert math.isfinite(clara.lr_factor)
    assert clara.log_factors[0] == log_factor - LOG2
    assert_params_equal(params, before)


def test_observe_loss_without_safeguard_is_a_no_op() -> None:
    """No safeguard: observe_loss returns False for any loss, warns nothing and changes nothing."""
    x, y, params = regression()
    clara = CLARA(torch.optim.SGD(params[:1], lr=0.02))
    assert clara.safeguard is None
    clara.optimizer.zero_grad()
    loss_of(x, y, params).backward()
    clara.optimizer.step()
    state = clara.state_dict()
    weights = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loss in (1e30, math.nan, math.inf, torch.tensor(math.nan)):
            assert clara.observe_loss(loss) is False
    assert clara.num_safeguard_alarms == 0
    assert clara.log_factors == state["log_factors"]
    assert clara.num_adapted_steps == state["num_adapted_steps"] == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(weights, params, strict=True))


# ---------------------------------------------------------------------------------------------- callback
class LinearRegressionModule(LightningModule):
    """A float64 linear model on ill-conditioned data (feature scales 3, 1, 0.3, 0.1), plain SGD.

    The largest Hessian eigenvalue of the MSE is ~2 * 9 = 18 (8-sample batches scatter it), so lr = 0.3 gives
    |1 - lr * 18| ~ 4: the loss grows by an order of magnitude per step until something lowers the lr.
    ``nan_from`` turns the loss into NaN from that optimizer step on.
    """

    def __init__(self, lr: float = 0.3, nan_from: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.1])
        y = x @ torch.randn(4, 1, generator=generator, dtype=torch.float64)
        self.data = TensorDataset(x, y)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 1).double()
        self.lr = lr
        self.nan_from = nan_from
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.linear(x), y)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * math.nan
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8, shuffle=False)


def _fit(
    module: LightningModule,
    trainer_kwargs: dict[str, Any],
    safeguard: bool,
    epochs: int,
    skip_nonfinite: bool = False,
    **overrides: Any,
) -> tuple[Any, ...]:
    """A fit; NaN steps are stepped as given unless ``skip_nonfinite`` (what the safeguard alone does)."""
    callback = CLARACallback(d=1e-3, safeguard=safeguard, initial_factor=1.0, skip_nonfinite=skip_nonfinite)
    logger = RecordingLogger()
    trainer: Trainer = make_trainer(
        trainer_kwargs, [callback], max_epochs=epochs, logger=logger, log_every_n_steps=1, **overrides
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the alarms' and NaN steps' warnings
        trainer.fit(module)
    return callback.controllers[0], logger


def test_callback_safeguard_catches_a_diverging_run(trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Too large an lr: with the safeguard the alarm is logged, F ends far lower than without it, and the
    blow-up stops; without it the loss explodes (CLARA's own d = 1e-3 moves F far too slowly to stop it)."""
    epochs = 5
    unguarded = LinearRegressionModule()
    plain_controller, plain_logger = _fit(unguarded, trainer_kwargs, safeguard=False, epochs=epochs)
    plain_keys = plain_logger.keys()
    assert not any(key.startswith("clara/safeguard_alarms") for key in plain_keys)
    assert not unguarded.losses[-1] < 1e6 * unguarded.losses[0]  # diverged (or NaN)

    guarded = LinearRegressionModule()
    controller, logger = _fit(guarded, trainer_kwargs, safeguard=True, epochs=epochs)
    alarms = logger.series("clara/safeguard_alarms-SGD")
    assert max(alarms.values()) >= 1
    assert controller.num_safeguard_alarms == max(alarms.values())
    assert controller.lr_factor < 0.6 < plain_controller.lr_factor
    assert guarded.losses[-1] < 1e-3 * max(guarded.losses)  # the blow-up stopped ...
    assert guarded.losses[-1] < 1e-6 * unguarded.losses[-1]  # ... where the unguarded run went on exploding


@pytest.mark.parametrize("safeguard", [True, False], ids=["safeguard", "plain"])
def test_nan_loss_never_makes_the_factor_nan(safeguard: bool, trainer_kwargs: dict[str, Any]) -> None:
    """From batch 5 on the loss is NaN (so are gradients and, through SGD, the weights) for ~90 batches:
    F stays finite and positive, bounded by the log-factor clamp, and every logged clara value is finite."""
    epochs, nan_from = 12, 5
    module = LinearRegressionModule(lr=0.01, nan_from=nan_from)
    controller, logger = _fit(module, trainer_kwargs, safeguard=safeguard, epochs=epochs)
    assert math.isnan(module.losses[-1])
    assert all(math.isfinite(v) for v in controller.log_factors)
    assert -LOG_FACTOR_LIMIT <= controller.log_factors[0] <= LOG_FACTOR_LIMIT
    assert 0.0 < controller.lr_factor < math.inf
    assert all(math.isfinite(v) for _, metrics in logger.records for v in metrics.values())
    if safeguard:
        # every NaN loss is an alarm (immediate, no warm-up needed)
        assert controller.num_safeguard_alarms == len(module.losses) - nan_from


@pytest.mark.parametrize("safeguard", [True, False], ids=["safeguard", "plain"])
def test_nan_losses_are_skipped_with_the_default_guard(safeguard: bool, trainer_kwargs: dict[str, Any]) -> None:
    """The same NaN storm with skip_nonfinite (the default): no NaN step runs, so the weights stay finite, no
    alarm fires and F is where the last good step left it."""
    epochs, nan_from = 3, 5
    module = LinearRegressionModule(lr=0.01, nan_from=nan_from)
    controller, _ = _fit(module, trainer_kwargs, safeguard=safeguard, epochs=epochs, skip_nonfinite=True)
    assert controller.num_optimizer_steps == nan_from
    assert controller.num_skipped_updates == len(module.losses) - nan_from == 8 * epochs - nan_from
    assert controller.num_safeguard_alarms == 0
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_under_accumulation_only_the_stepping_batches_feed_the_safeguard(trainer_kwargs: dict[str, Any]) -> None:
    """accumulate_grad_batches=3 over 8 batches: 3 optimizer steps per epoch (after batches 3, 6 and 8), 12 in
    4 epochs. From optimizer step 5 on every batch loss is NaN, so the steps 5..11 each alarm once (the loss of
    the stepping batch), while the NaN losses of the accumulation micro-batches in between are not fed: 7 alarms,
    not one per NaN batch."""
    epochs, accumulate, nan_from = 4, 3, 5
    module = LinearRegressionModule(lr=0.01, nan_from=nan_from)
    controller, logger = _fit(module, trainer_kwargs, safeguard=True, epochs=epochs, accumulate_grad_batches=accumulate)
    steps = epochs * 3
    assert controller.num_optimizer_steps == steps
    # NaN from the batch where global_step is 5: epoch 1's last group (batches 7, 8) and all 16 of epochs 2, 3
    assert sum(math.isnan(loss) for loss in module.losses) == 18
    assert controller.num_safeguard_alarms == steps - nan_from
    alarms = logger.series("clara/safeguard_alarms-SGD")
    assert sorted(alarms) == list(range(steps))  # logged once per optimizer step, on the optimizer-step axis
    assert [alarms[s] for s in range(steps)] == [float(max(0, s - nan_from + 1)) for s in range(steps)]


def test_an_undo_goes_back_two_steps_that_ran_across_a_step_that_raised() -> None:
    """A step that raises (an out-of-memory in its closure) changes nothing: the restore point must not count it,
    or an alarm that says "before the last 2 steps" would undo only one."""
    p = torch.nn.Parameter(torch.zeros(5))
    optimizer = torch.optim.SGD([p], lr=1.0)
    clara = CLARA(optimizer, safeguard=True, initial_factor=1.0)
    values = []
    for i in range(12):
        p.grad = torch.full((5,), -1.0)
        optimizer.step()
        values.append(float(p[0]))
        clara.observe_loss(1.0 + 0.01 * (i % 2))

    def raising() -> torch.Tensor:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        optimizer.step(raising)
    p.grad = torch.full((5,), -1.0)
    optimizer.step()
    with pytest.warns(RuntimeWarning, match=r"before the last 2 step\(s\)"):
        assert clara.observe_loss(math.nan) is True
    assert float(p[0]) == values[-2]  # before the last two steps that ran


def test_loading_a_state_drops_the_restore_point_of_before_the_load() -> None:
    """A rollback by hand (model, optimizer and CLARA loaded into the same objects): an alarm right after must
    not bring back parameters of the abandoned steps, only undo what ran since the load."""
    clara, x, y, params = make_clara()
    train_quietly(clara, x, y, params, steps=20)
    saved = ([p.detach().clone() for p in params], copy.deepcopy(clara.optimizer.state_dict()), clara.state_dict())
    train_quietly(clara, x, y, params, steps=10)
    with torch.no_grad():
        for param, value in zip(params, saved[0], strict=True):
            param.copy_(value)
    clara.optimizer.load_state_dict(saved[1])
    clara.load_state_dict(saved[2])
    step(clara, x, y, params)
    with pytest.warns(RuntimeWarning, match="safeguard") as record:
        assert clara.observe_loss(math.nan) is True
    assert str(record[-1].message).endswith("; parameters restored from before the last 1 step(s)")
    assert_params_equal(params, saved[0])


def test_a_safeguard_fed_no_loss_warns_once() -> None:
    """safeguard=True promises to watch the loss; a loop that never calls observe_loss left it watching
    nothing, silently."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    def run(feed: bool) -> list[str]:
        optimizer = torch.optim.Adam(model.parameters())
        clara = CLARA(optimizer, safeguard=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(UNFED_STEPS + 20):
                optimizer.zero_grad()
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                optimizer.step()
                if feed:
                    clara.observe_loss(loss)
        clara.detach()
        return [str(w.message) for w in caught if "watches nothing" in str(w.message)]

    assert len(run(feed=False)) == 1
    assert run(feed=True) == []
