"""The Page-Hinkley safeguard: the detector alone, ``CLARA.observe_loss`` and ``CLARACallback(safeguard=True)``.

Detector expectations are derived from the CUSUM it implements: per observation the statistic moves by
``(loss - mean) / scale - delta``, i.e. by about ``-delta`` plus the loss's relative noise, and alarms past
``threshold``. Controller expectations compare with parameter copies taken by the test and with ``log 2``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from test_callback import RecordingLogger, make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clara import CLARA, CLARACallback
from lightning_clara.controller import LOG_FACTOR_LIMIT
from lightning_clara.safeguard import PageHinkley

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
    """Zero alarms over 50 seeds x 2000 steps with the defaults (delta 0.05, threshold 3).

    The CUSUM increments have mean ~ -delta and sd ~ sigma (relative noise, here <= 0.125); Wald's bound puts
    an excursion above h at exp(-2 delta h / sigma^2) = exp(-19) ~ 5e-9, so over ~1e5 excursions the expected
    number of false alarms is < 1e-3. (A decreasing loss only adds negative increments.)
    """
    total = sum(len(alarms_on(make_stream(torch.Generator().manual_seed(seed)).tolist())) for seed in range(SEEDS))
    assert total == 0


def test_alarm_on_the_first_step_of_a_tenfold_jump() -> None:
    """Loss x10 after 300 stationary steps: the first jumped loss alone adds ~(10 - 1.18) / 1.18 - delta ~ 7.4
    (mean and scale have absorbed 1/50 of the jump) > threshold 3, so the alarm comes at once."""
    jump = 300
    for seed in range(10):
        stream = _gaussian(torch.Generator().manual_seed(seed))
        stream[jump:] *= 10.0
        alarms = alarms_on(stream.tolist())
        assert alarms[:1] == [jump], (seed, alarms)


def test_gradual_doubling_is_caught_within_a_few_steps() -> None:
    """Loss x2 (relative noise 0.1): each step adds ~(2 - 1.02) / 1.02 - 0.05 ~ 0.9 and the running mean adapts
    with rate 1/50, so the excess passes 3 on the 4th jumped step (5th at worst with noise)."""
    jump = 300
    for seed in range(10):
        stream = _gaussian(torch.Generator().manual_seed(seed))
        stream[jump:] *= 2.0
        alarms = alarms_on(stream.tolist())
        assert alarms, seed
        assert jump + 2 <= alarms[0] <= jump + 5, (seed, alarms[:3])


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
    rising = [1.0 + 0.004 * i for i in range(60)]  # a slow rise: builds up excess without an alarm
    assert alarms_on(rising, detector) == []
    assert detector.excess > 0.0
    detector.reset()
    assert (detector.count, detector.mean, detector.scale, detector.excess) == (0, 0.0, 0.0, 0.0)
    assert detector.alarms == 1
    fresh = PageHinkley()
    jumped = [*stream[:200], *(10.0 * v for v in stream[200:])]
    assert [detector.update(v) for v in jumped[:201]] == [fresh.update(v) for v in jumped[:201]]
    assert detector.alarms == fresh.alarms + 1 == 2


def test_state_dict_round_trip_continues_identically() -> None:
    """A detector restored from another's state_dict (plain ints/floats) produces identical decisions after."""
    stream = _gaussian(torch.Generator().manual_seed(1)).tolist()
    stream = [*stream[:400], *(5.0 * v for v in stream[400:])]
    original = PageHinkley(delta=0.02, threshold=2.0, memory=20, warmup=5)
    for loss in stream[:397]:
        original.update(loss)
    state = original.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    assert state["count"] == 397
    restored = PageHinkley(delta=0.02, threshold=2.0, memory=20, warmup=5)
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


def train_quietly(clara: CLARA, x: Tensor, y: Tensor, params: list[Tensor], steps: int = 30) -> None:
    """Full-batch steps, each followed by observe_loss of the loss it produced: a decreasing loss, no alarm."""
    for _ in range(steps):
        clara.optimizer.zero_grad()
        loss_of(x, y, params).backward()
        clara.optimizer.step()
        with torch.no_grad():
            assert clara.observe_loss(loss_of(x, y, params)) is False


def blow_up(clara: CLARA, x: Tensor, y: Tensor, params: list[Tensor]) -> tuple[list[Tensor], float, bool, str]:
    """One step with the lr multiplied by 1e4, then observe_loss of the loss it produced.

    Returns the parameters before that step, log F after it, observe_loss's answer, and the warning text.
    """
    clara.optimizer.zero_grad()
    loss_of(x, y, params).backward()
    before = [p.detach().clone() for p in params]
    for group in clara.optimizer.param_groups:
        group["lr"] *= 1e4
    clara.optimizer.step()
    for group in clara.optimizer.param_groups:
        group["lr"] /= 1e4
    log_factor = clara.log_factors[0]  # after the step's own adaptation
    with torch.no_grad():
        loss = loss_of(x, y, params)
    assert float(loss) > 1e3  # the step really blew the loss up
    with pytest.warns(RuntimeWarning, match="safeguard") as record:
        alarm = clara.observe_loss(loss)
    return before, log_factor, alarm, str(record[-1].message)


def make_clara(
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: Any
) -> tuple[CLARA, Tensor, Tensor, list[Tensor]]:
    """CLARA with the default safeguard on the regression above (lr 0.02 is stable for it)."""
    x, y, params = regression()
    clara = CLARA(optimizer_class(params, lr=0.02), c=0.2, d=0.01, safeguard=True, **kwargs)
    return clara, x, y, params


def test_alarm_halves_factor_and_undoes_the_step_with_the_delta_reader() -> None:
    """Blow-up with direction="delta": alarm, RuntimeWarning, log F down by exactly log 2, one alarm, the test
    restarted, and the parameters back at their pre-step values (to rounding; exactness is tested below)."""
    clara, x, y, params = make_clara(direction="delta")
    train_quietly(clara, x, y, params)
    assert clara.lr_factor != 1.0
    before, log_factor, alarm, message = blow_up(clara, x, y, params)
    assert alarm is True
    assert "undone" in message
    assert clara.num_safeguard_alarms == 1
    assert clara.log_factors[0] == pytest.approx(log_factor - LOG2, abs=1e-12)
    assert clara.safeguard is not None
    assert clara.safeguard.count == 0  # the test restarted
    for old, param in zip(before, params, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0.0, atol=1e-9)
    train_quietly(clara, x, y, params, steps=5)  # training goes on normally, no new alarm
    assert clara.num_safeguard_alarms == 1


@pytest.mark.parametrize("unit_step", [False, True], ids=["delta", "unit-step"])
def test_undo_restores_the_pre_step_parameters_exactly(unit_step: bool) -> None:
    """The undo puts back exactly the parameters from before the blown-up step (bitwise), also when the applied
    step was CLARA's unit step rather than the optimizer's."""
    clara, x, y, params = make_clara(direction="delta", unit_step=unit_step)
    train_quietly(clara, x, y, params)
    before, _, alarm, message = blow_up(clara, x, y, params)
    assert alarm is True
    assert "undone" in message
    for old, param in zip(before, params, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0.0, atol=0.0)


def test_undo_after_a_nan_step_restores_finite_parameters() -> None:
    """A NaN gradient makes SGD write NaN into a weight; the NaN loss alarms and, since the warning says
    "last step undone", the parameters are the finite pre-step ones again. F stays finite and is halved."""
    clara, x, y, params = make_clara(direction="delta")
    train_quietly(clara, x, y, params, steps=5)
    clara.optimizer.zero_grad()
    loss_of(x, y, params).backward()
    before = [p.detach().clone() for p in params]
    params[0].grad[0, 0] = math.nan  # type: ignore[index]
    with pytest.warns(RuntimeWarning, match="NaN/inf step"):
        clara.optimizer.step()
    log_factor = clara.log_factors[0]
    assert not torch.isfinite(params[0]).all()
    with pytest.warns(RuntimeWarning, match="undone"):
        assert clara.observe_loss(loss_of(x, y, params).detach()) is True
    assert math.isfinite(clara.lr_factor)
    assert clara.log_factors[0] == pytest.approx(log_factor - LOG2, abs=1e-12)
    for old, param in zip(before, params, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0.0, atol=0.0)


def test_alarm_with_the_adam_state_reader_halves_but_cannot_undo() -> None:
    """Adam with direction="auto" reads its state (no snapshot): F halves, the warning says nothing was undone,
    and the parameters keep their post-step values."""
    clara, x, y, params = make_clara(torch.optim.Adam)
    assert clara.reader_name == "state"
    train_quietly(clara, x, y, params)
    clara.optimizer.zero_grad()
    loss_of(x, y, params).backward()
    clara.optimizer.param_groups[0]["lr"] *= 1e4
    clara.optimizer.step()
    clara.optimizer.param_groups[0]["lr"] /= 1e4
    log_factor = clara.log_factors[0]
    after = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="no snapshot to undo"):
        assert clara.observe_loss(loss_of(x, y, params).detach()) is True
    assert clara.num_safeguard_alarms == 1
    assert clara.log_factors[0] == pytest.approx(log_factor - LOG2, abs=1e-12)
    for old, param in zip(after, params, strict=True):
        assert torch.equal(param.detach(), old)


def test_observe_loss_without_safeguard_is_a_no_op() -> None:
    """No safeguard: observe_loss returns False for any loss, warns nothing and changes nothing."""
    x, y, params = regression()
    clara = CLARA(torch.optim.SGD(params[:1], lr=0.02), direction="delta")
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


def _fit(module: LightningModule, trainer_kwargs: dict[str, Any], safeguard: bool, epochs: int) -> tuple[Any, ...]:
    callback, logger = CLARACallback(d=1e-3, safeguard=safeguard), RecordingLogger()
    trainer: Trainer = make_trainer(trainer_kwargs, [callback], max_epochs=epochs, logger=logger, log_every_n_steps=1)
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
