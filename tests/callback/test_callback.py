"""Lightning integration of ``CLARACallback``: real ``Trainer.fit`` runs checked against independent expectations.

Expectations come from the simple loop in ``reference_loop.py`` (run by hand on an identical
copy of the model and the identical batches), from Lightning's own ``LearningRateMonitor``, and
from the schedulers' own math -- never from numbers the implementation printed.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    LR,
    STEPS_PER_EPOCH,
    LRRecorder,
    RecordingLogger,
    clara_state,
    csv_series,
    make_trainer,
    max_relative_error,
    run_reference,
    sgd,
)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from reference_loop import SimpleCLARA, plain_sgd_mu, sgd_step
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_clara import CLARA, CLARACallback

C = 0.2
D = 0.4  # normalized rule: F moves by tens of percent within a few dozen steps (paper-rule d = 0.05 for SGD)
PAPER_D = 0.05  # for tests that spell out the paper rule, log F += d (r - 1)

MakeModule = Callable[..., LightningModule]


def tensorboard_series(log_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` read back from the tfevents files with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        series: dict[int, float] = {}
        for event in accumulator.Scalars(tag):
            assert event.step not in series, f"{tag} logged twice at step {event.step}"
            series[event.step] = event.value
        out[tag] = series
    return out


def assert_series_close(actual: dict[int, float], expected: dict[int, float], rtol: float, what: str) -> None:
    """Same steps, and values within ``rtol`` at each; the message lists every mismatching step."""
    assert set(actual) == set(expected), f"{what}: steps {sorted(actual)} vs {sorted(expected)}"
    bad = {
        s: (actual[s], expected[s]) for s in sorted(expected) if not math.isclose(actual[s], expected[s], rel_tol=rtol)
    }
    assert not bad, f"{what}: (logged, expected) by step: {bad}"


# ---------------------------------------------------------------------------------------------- 1. acceptance
@pytest.mark.parametrize("sample", [4096, None])
def test_lr_trajectory_matches_reference_loop(
    sample: int | None, make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any]
) -> None:
    """The key acceptance test: Trainer.fit + CLARACallback reproduces the simple loop step by step.

    The default sample (every entry of these small tensors) and ``sample=None`` (every coordinate) must agree.
    """
    epochs = 3
    module = make_module(sgd())
    initial_net = copy.deepcopy(module.net)
    callback, recorder = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False, sample=sample), LRRecorder()
    trainer = make_trainer(trainer_kwargs, [callback, recorder], max_epochs=epochs)
    trainer.fit(module)

    assert callback.controllers[0].sample == sample
    reference = run_reference(initial_net, regression_data, epochs=epochs, lr_at=lambda t: LR)
    used = recorder.first_group()
    assert trainer.global_step == epochs * STEPS_PER_EPOCH == len(used)
    assert max_relative_error(used, reference.lrs) < 1e-6
    # F really moved, so the agreement is not the trivial lr == lr_base
    assert max(used) / min(used) > 1.2
    assert abs(reference.log_factors[-1]) > 0.1
    controller = callback.controllers[0]
    assert controller.num_adapted_steps == trainer.global_step
    assert math.isclose(controller.log_factors[0], reference.log_factors[-1], rel_tol=1e-6)
    assert controller.ratio is not None
    assert math.isclose(controller.ratio, reference.ratios[-1], rel_tol=1e-6)
    # the model itself followed the same trajectory
    for trained, expected in zip(module.net.parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- 2. logging
@pytest.mark.parametrize("logger_kind", ["csv", "tensorboard"])
def test_logged_values_and_step_axis_match_lr_monitor(
    logger_kind: str,
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
    tmp_path: Path,
) -> None:
    """clara/* keys land every log_every_n_steps on LearningRateMonitor's step axis, with lr = lr_base * F."""
    epochs, every, lr0, gamma, step_size = 2, 3, 0.1, 0.5, 5

    def configure(module: LightningModule) -> dict[str, Any]:
        optimizer = torch.optim.SGD(module.parameters(), lr=lr0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def scheduled(t: int) -> float:
        return lr0 * gamma ** (t // step_size)

    module = make_module(configure)
    initial_net = copy.deepcopy(module.net)
    if logger_kind == "csv":
        logger: Logger = CSVLogger(tmp_path, name="logs")
    else:
        logger = TensorBoardLogger(tmp_path, name="logs")
    recorder = LRRecorder()
    callbacks = [
        LearningRateMonitor(logging_interval="step"),
        CLARACallback(c=C, d=D, safeguard=False, loss_brake=False),
        recorder,
    ]
    trainer = make_trainer(trainer_kwargs, callbacks, max_epochs=epochs, logger=logger, log_every_n_steps=every)
    trainer.fit(module)

    assert logger.log_dir is not None
    if logger_kind == "csv":
        logged = csv_series(Path(logger.log_dir) / "metrics.csv")
        rtol = 1e-12
    else:
        logged = tensorboard_series(logger.log_dir)
        rtol = 1e-6  # tfevents store float32
    total = epochs * STEPS_PER_EPOCH
    expected_steps = {s for s in range(total) if (s + 1) % every == 0}
    assert expected_steps == {2, 5, 8, 11, 14}
    monitor = logged["lr-SGD"]
    assert set(monitor) == expected_steps
    for key in ("clara/lr-SGD", "clara/ratio-SGD", "clara/log_factor-SGD"):
        assert key in logged, f"{key} missing; logged keys: {sorted(logged)}"
        assert set(logged[key]) == set(monitor), key

    reference = run_reference(initial_net, regression_data, epochs=epochs, lr_at=scheduled)
    steps = sorted(expected_steps)
    tol = max(rtol, 1e-6)
    # LearningRateMonitor logs the scheduled base lr (the scheduler never sees F)
    assert_series_close(monitor, {s: scheduled(s) for s in steps}, rtol, "lr-SGD vs StepLR math")
    assert_series_close(logged["clara/ratio-SGD"], {s: reference.ratios[s] for s in steps}, tol, "ratio")
    assert_series_close(logged["clara/log_factor-SGD"], {s: reference.log_factors[s] for s in steps}, tol, "log F")
    # CLARA logs the lr actually used in that step: lr_base * F(before the step) ...
    used = recorder.first_group()
    expected_lr = {s: monitor[s] * math.exp(reference.log_factor_before(s)) for s in steps}
    assert_series_close(logged["clara/lr-SGD"], expected_lr, tol, "clara/lr vs lr-SGD * F")
    # ... which is what the optimizer's step saw
    assert_series_close(logged["clara/lr-SGD"], {s: used[s] for s in steps}, rtol, "clara/lr vs lr in step")
    assert max(abs(logged["clara/log_factor-SGD"][s]) for s in expected_steps) > 0.1


def _two_sgds(module: LightningModule) -> list[Optimizer]:
    net = module.net
    return [torch.optim.SGD(net[0].parameters(), lr=LR), torch.optim.SGD(net[2].parameters(), lr=0.01)]


def _two_sgds_second_scheduled(module: LightningModule) -> tuple[list[Optimizer], list[Any]]:
    """LearningRateMonitor names scheduled optimizers first: here the second is "SGD", the first "SGD-1"."""
    first, second = _two_sgds(module)
    return [first, second], [torch.optim.lr_scheduler.LambdaLR(second, lambda step: 1.0)]


def _two_sgds_named_scheduler(module: LightningModule) -> tuple[list[Optimizer], list[Any]]:
    """A scheduler config's ``name`` replaces the class name (and is not counted among the classes)."""
    first, second = _two_sgds(module)
    scheduler = torch.optim.lr_scheduler.LambdaLR(second, lambda step: 1.0)
    return [first, second], [{"scheduler": scheduler, "name": "lr-head"}]


def _sgd_two_groups(module: LightningModule) -> Optimizer:
    net = module.net
    return torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.01}], lr=LR)


def _sgd_one_named_group(module: LightningModule) -> Optimizer:
    net = module.net
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.01, "name": "head"}]
    return torch.optim.SGD(groups, lr=LR)


def _sgd_single_named_group(module: LightningModule) -> Optimizer:
    return torch.optim.SGD([{"params": module.parameters(), "name": "body"}], lr=LR)


# SGD rather than Adam: the naming rule does not depend on the class, and Adam's reference is a
# Monte Carlo calibration that costs tens of seconds on first use.
@pytest.mark.parametrize(
    ("configure", "manual", "expected_names"),
    [
        pytest.param(_two_sgds, True, {"SGD", "SGD-1"}, id="same-class-twice"),
        pytest.param(_two_sgds_second_scheduled, True, {"SGD", "SGD-1"}, id="scheduled-first"),
        pytest.param(_two_sgds_named_scheduler, True, {"SGD", "head"}, id="named-scheduler"),
        pytest.param(_sgd_two_groups, False, {"SGD/pg1", "SGD/pg2"}, id="param-groups"),
        pytest.param(_sgd_one_named_group, False, {"SGD/pg1", "SGD/head"}, id="named-param-group"),
        pytest.param(_sgd_single_named_group, False, {"SGD/body"}, id="single-named-group"),
    ],
)
def test_names_follow_lr_monitor(
    configure: Callable[[LightningModule], Any],
    manual: bool,
    expected_names: set[str],
    make_module: MakeModule,
    trainer_kwargs: dict[str, Any],
) -> None:
    """Key suffixes are exactly LearningRateMonitor's; every group's logged lr is its monitored lr times its F."""
    module = make_module(configure, manual=manual)
    logger = RecordingLogger()
    callback = CLARACallback(c=C, d=PAPER_D, safeguard=False, rule="paper")  # the check below spells out the paper rule
    callbacks = [LearningRateMonitor(logging_interval="step"), callback]
    trainer = make_trainer(trainer_kwargs, callbacks, logger=logger, log_every_n_steps=1, limit_train_batches=4)
    trainer.fit(module)

    keys = logger.keys()
    monitor_names = {key.removeprefix("lr-") for key in keys if key.startswith("lr-") and "momentum" not in key}
    assert monitor_names == expected_names
    for kind in ("lr", "ratio", "log_factor"):
        assert {key.removeprefix(f"clara/{kind}-") for key in keys if key.startswith(f"clara/{kind}-")} == (
            expected_names
        ), kind
    steps = [0, 1, 2, 3]
    for name in expected_names:
        clara_lr, monitor_lr = logger.series(f"clara/lr-{name}"), logger.series(f"lr-{name}")
        log_factor, ratio = logger.series(f"clara/log_factor-{name}"), logger.series(f"clara/ratio-{name}")
        assert set(clara_lr) == set(monitor_lr) == set(log_factor) == set(ratio) == set(steps), name
        # the rule: log F moves by d (r - 1) per step, starting from log F = 0
        before = {s: log_factor[s - 1] if s > 0 else 0.0 for s in steps}
        assert_series_close(log_factor, {s: before[s] + PAPER_D * (ratio[s] - 1) for s in steps}, 1e-9, f"log F {name}")
        assert log_factor[3] != 0.0
        # lr logged at step s is the monitored lr_base times F before that step: the lr the step used
        expected_lr = {s: monitor_lr[s] * math.exp(before[s]) for s in steps}
        assert_series_close(clara_lr, expected_lr, 1e-12, f"clara/lr-{name} vs lr-{name} * F")


# ---------------------------------------------------------------------------------------------- 3. checkpoints
def _fit_with_checkpoint(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], tmp_path: Path, epochs: int, ckpt_path: str | None = None
) -> tuple[CLARACallback, LRRecorder, ModelCheckpoint, Trainer]:
    module = make_module(sgd())
    # no fast start: with it the toy net's lr grows until a ReLU dies, and the checks below
    # (every tensor stepped every step) are about the checkpoint, not about that
    callback, recorder = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False, fast_start=0), LRRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        trainer_kwargs, [callback, recorder, checkpoint], max_epochs=epochs, enable_checkpointing=True
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return callback, recorder, checkpoint, trainer


def test_checkpoint_holds_clara_state(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """The checkpoint's callback state holds the paths, counts and log F of the simple loop at that step."""
    epochs = 2
    initial_net = copy.deepcopy(make_module(sgd()).net)  # same seed -> same init as the trained module
    _, _, checkpoint, _ = _fit_with_checkpoint(make_module, trainer_kwargs, tmp_path, epochs)
    state = clara_state(checkpoint.last_model_path)

    reference = run_reference(initial_net, regression_data, epochs=epochs, lr_at=lambda t: LR, fast_start=0)
    (saved,) = state["controllers"]
    assert math.isclose(saved["log_factors"][0], reference.clara.log_factor, rel_tol=1e-6)
    assert abs(saved["log_factors"][0]) > 0.1
    assert saved["num_adapted_steps"] == epochs * STEPS_PER_EPOCH
    (tensors,) = saved["tensors"]  # one param group
    assert len(tensors) == len(reference.clara.paths) == 4
    for entry, path, count in zip(tensors, reference.clara.paths, reference.clara.counts, strict=True):
        assert entry["count"] == count == epochs * STEPS_PER_EPOCH
        # the default sample keeps every entry of these small tensors, flattened in row-major order
        torch.testing.assert_close(entry["path"].to(torch.float64).reshape(path.shape), path, rtol=1e-6, atol=1e-9)


def test_resume_continues_factor_and_matches_uninterrupted_run(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """N/2 epochs + resume to N from the end-of-epoch checkpoint == N epochs in one go (F not reset to 1)."""
    total, half = 4, 2
    callback_a, recorder_a, _, trainer_a = _fit_with_checkpoint(make_module, trainer_kwargs, tmp_path / "a", total)
    _, recorder_b1, checkpoint, _ = _fit_with_checkpoint(make_module, trainer_kwargs, tmp_path / "b", half)
    saved_log_factor = clara_state(checkpoint.last_model_path)["controllers"][0]["log_factors"][0]
    assert abs(saved_log_factor) > 0.1  # a reset to F = 1 would be visible
    callback_b, recorder_b2, _, trainer_b = _fit_with_checkpoint(
        make_module, trainer_kwargs, tmp_path / "b", total, ckpt_path=checkpoint.last_model_path
    )

    resumed = recorder_b2.first_group()
    assert len(resumed) == (total - half) * STEPS_PER_EPOCH
    # the first step after resuming uses the saved factor
    assert math.isclose(resumed[0], LR * math.exp(saved_log_factor), rel_tol=1e-12)
    # the whole trajectory matches the uninterrupted run
    uninterrupted = recorder_a.first_group()
    assert trainer_a.global_step == trainer_b.global_step == total * STEPS_PER_EPOCH
    assert max_relative_error(recorder_b1.first_group() + resumed, uninterrupted) < 1e-10
    assert callback_b.controllers[0].num_adapted_steps == callback_a.controllers[0].num_adapted_steps
    assert math.isclose(
        callback_b.controllers[0].log_factors[0], callback_a.controllers[0].log_factors[0], rel_tol=1e-10
    )


# ---------------------------------------------------------------------------------------------- 4. errors
class ClippedRprop(torch.optim.Rprop):
    """A user's own optimizer built on Rprop, which reads the lr only as its initial step size: unsupported."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, lr=lr, step_sizes=(1e-6, 1.0))
        self.num_steps = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self.num_steps += 1
        return super().step(closure)


def test_unsupported_optimizer_raises_at_fit_start(make_module: MakeModule, trainer_kwargs: dict[str, Any]) -> None:
    """A TypeError naming the supported optimizers, before any training step ran."""
    module = make_module(lambda m: ClippedRprop(m.parameters()))
    trainer = make_trainer(trainer_kwargs, [CLARACallback()], max_epochs=1)
    with pytest.raises(TypeError, match="Rprop") as info:
        trainer.fit(module)
    message = str(info.value)
    for name in ("SGD", "Adam", "AdamW"):
        assert re.search(rf"\b{name}\b", message), (name, message)
    assert module.configured.num_steps == 0
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"c": 0}, ValueError, "c"),
        ({"c": 1.5}, ValueError, "c"),
        ({"c": "0.2"}, TypeError, "c"),
        ({"d": 0}, ValueError, "d"),
        ({"d": -1e-3}, ValueError, "d"),
        ({"d": float("nan")}, ValueError, "d"),
        ({"scope": "x"}, ValueError, "scope"),
        ({"direction": "delta"}, TypeError, "direction"),
        ({"min_lr": 1.0, "max_lr": 0.1}, ValueError, "min_lr"),
        ({"max_lr": 0.0}, ValueError, "max_lr"),
        ({"min_factor": 2.0, "max_factor": 0.5}, ValueError, "min_factor"),
        ({"initial_factor": 2.0, "max_factor": 1.0}, ValueError, "initial_factor"),
        ({"initial_factor": 0.01, "min_factor": 0.1}, ValueError, "initial_factor"),
        ({"fast_start": 100, "hold_after": 50}, ValueError, "fast_start"),
        ({"log": "yes"}, TypeError, "log"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], error: type[Exception], argument: str) -> None:
    """Bad options fail at construction, with the argument's name in the message."""
    with pytest.raises(error, match=rf"\b{argument}\b"):
        CLARACallback(**kwargs)


def test_boundary_arguments_are_accepted() -> None:
    """c = 1 is inside (0, 1]; equal lr bounds are allowed."""
    callback = CLARACallback(c=1.0, d=1e-5, min_lr=0.1, max_lr=0.1, scope="param_group", sample=None, log=False)
    assert callback.log is False
    # a default initial_factor (0.1) outside the bounds is clamped into them; a hold shorter than the default
    # fast start (50) is the user's choice of hold; an initial_factor on a bound is inside
    for options in ({"max_factor": 0.05}, {"hold_after": 20}, {"initial_factor": 1.0, "max_factor": 1.0}):
        assert CLARACallback(**options).options.resolve().initial_factor == options.get("initial_factor", 0.1)
    assert callback.controllers == []  # nothing attaches before fit


# ---------------------------------------------------------------------------------------------- 5. accumulation
def test_gradient_accumulation_adapts_once_per_optimizer_step(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any]
) -> None:
    """With accumulate_grad_batches=4 CLARA adapts on the 8 optimizer steps, not on the 32 batches."""
    epochs, batch_size, accumulate = 2, 4, 4
    module = make_module(sgd(), batch_size=batch_size)
    initial_net = copy.deepcopy(module.net)
    callback, recorder = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False), LRRecorder()
    trainer = make_trainer(trainer_kwargs, [callback, recorder], max_epochs=epochs, accumulate_grad_batches=accumulate)
    trainer.fit(module)

    batches = epochs * len(regression_data) // batch_size
    assert batches == 32
    assert trainer.global_step == batches // accumulate == 8
    assert callback.controllers[0].num_adapted_steps == trainer.global_step
    reference = run_reference(
        initial_net, regression_data, epochs=epochs, lr_at=lambda t: LR, batch_size=batch_size, accumulate=accumulate
    )
    assert len(reference.lrs) == trainer.global_step
    assert max_relative_error(recorder.first_group(), reference.lrs) < 1e-6
    assert math.isclose(callback.controllers[0].log_factors[0], reference.log_factors[-1], rel_tol=1e-6)
    assert abs(reference.log_factors[-1]) > 0.05


# ---------------------------------------------------------------------------------------------- 6. schedulers
def _step_lr(optimizer: Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


def _lambda_lr(optimizer: Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + 0.2 * t))


@pytest.mark.parametrize(
    ("make_scheduler", "scheduled"),
    [
        pytest.param(_step_lr, lambda t: 0.1 * 0.5 ** (t // 3), id="StepLR"),
        pytest.param(_lambda_lr, lambda t: 0.1 / (1.0 + 0.2 * t), id="LambdaLR"),
    ],
)
def test_scheduler_composes_multiplicatively(
    make_scheduler: Callable[[Optimizer], torch.optim.lr_scheduler.LRScheduler],
    scheduled: Callable[[int], float],
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
) -> None:
    """lr_used = lr_scheduled * F at every step, and the scheduler alone decides lr_base (it never sees F)."""
    epochs, lr0 = 2, 0.1

    def configure(module: LightningModule) -> dict[str, Any]:
        optimizer = torch.optim.SGD(module.parameters(), lr=lr0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make_scheduler(optimizer), "interval": "step"}}

    module = make_module(configure)
    initial_net = copy.deepcopy(module.net)
    callback, recorder = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False), LRRecorder()
    trainer = make_trainer(trainer_kwargs, [callback, recorder], max_epochs=epochs)
    trainer.fit(module)

    used = recorder.first_group()
    reference = run_reference(initial_net, regression_data, epochs=epochs, lr_at=scheduled)
    assert max_relative_error(used, reference.lrs) < 1e-6
    factors = [u / scheduled(t) for t, u in enumerate(used)]
    assert max(factors) / min(factors) > 1.1  # F moved, independently of the schedule
    # after fit the optimizer holds what the scheduler alone gives after the same number of steps
    steps = trainer.global_step
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    alone = make_scheduler(probe)
    for _ in range(steps):
        probe.step()
        alone.step()
    optimizer = module.configured["optimizer"]
    assert optimizer.param_groups[0]["lr"] == probe.param_groups[0]["lr"]
    assert math.isclose(optimizer.param_groups[0]["lr"], scheduled(steps), rel_tol=1e-12)
    assert module.configured["lr_scheduler"]["scheduler"].get_last_lr() == alone.get_last_lr()


# ---------------------------------------------------------------------------------------------- 7. detach, manual
def test_controllers_detach_after_fit(make_module: MakeModule, trainer_kwargs: dict[str, Any]) -> None:
    """After fit the optimizer is plain again: base lr, no CLARA hooks, a step changes nothing in CLARA."""
    module = make_module(sgd())
    callback = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False)
    trainer = make_trainer(trainer_kwargs, [callback], max_epochs=1)
    trainer.fit(module)

    optimizer = module.configured
    (controller,) = callback.controllers
    assert controller.optimizer is optimizer
    assert not controller.attached
    assert getattr(optimizer, "_clara_controller", None) is None
    assert abs(controller.log_factors[0]) > 0.05  # F != 1, so a leaked factor would show in the lr
    assert optimizer.param_groups[0]["lr"] == LR
    for hooks in (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks):
        assert not [hook for hook in hooks.values() if isinstance(getattr(hook, "__self__", None), CLARA)]
    # a step after fit uses the base lr and leaves CLARA's state alone
    steps_before, factor_before = controller.num_adapted_steps, controller.log_factors[0]
    params = list(module.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    for p, old in zip(params, before, strict=True):
        torch.testing.assert_close(old - p.detach(), torch.full_like(p, LR), rtol=1e-12, atol=0.0)
    assert controller.num_adapted_steps == steps_before
    assert controller.log_factors[0] == factor_before


def test_manual_optimization_adapts_each_optimizer_independently(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any]
) -> None:
    """Two SGD optimizers (first layer / last layer) stepping at different rates get their own factors."""
    epochs, lrs, every = 2, (0.05, 0.2), (1, 2)

    def configure(module: LightningModule) -> list[Optimizer]:
        net = module.net
        return [torch.optim.SGD(net[0].parameters(), lr=lrs[0]), torch.optim.SGD(net[2].parameters(), lr=lrs[1])]

    module = make_module(configure, manual=True, step_every=every)
    net = copy.deepcopy(module.net)
    callback, recorder = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False), LRRecorder()
    trainer = make_trainer(trainer_kwargs, [callback, recorder], max_epochs=epochs)
    trainer.fit(module)

    # the same manual loop by hand, one SimpleCLARA per optimizer
    groups = [list(net[0].parameters()), list(net[2].parameters())]
    claras = [SimpleCLARA([p.shape for p in params], C, D, plain_sgd_mu(C)) for params in groups]
    expected: list[list[float]] = [[], []]
    loader = DataLoader(regression_data, batch_size=8, shuffle=False)
    for _ in range(epochs):
        for batch_idx, (x, y) in enumerate(loader):
            net.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            for i in range(2):
                if batch_idx % every[i] == 0:
                    lr = lrs[i] * claras[i].factor
                    expected[i].append(lr)
                    claras[i].update(sgd_step(groups[i], lr))

    controllers = callback.controllers
    assert [c.num_adapted_steps for c in controllers] == [len(e) for e in expected] == [16, 8]
    for i in range(2):
        assert max_relative_error(recorder.first_group(i), expected[i]) < 1e-6
        assert math.isclose(controllers[i].log_factors[0], claras[i].log_factor, rel_tol=1e-6)
        assert not controllers[i].attached
    assert abs(controllers[0].log_factors[0] - controllers[1].log_factors[0]) > 0.02


class _GrowingModule(LightningModule):
    """Adds a second param group (a bias it uses from the start) to its optimizer at batch 3."""

    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.net = nn.Linear(4, 1, bias=False).double()
        self.offset = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 3:
            self.optimizers().optimizer.add_param_group({"params": [self.offset], "lr": LR})
        x, y = batch
        return nn.functional.mse_loss(self.net(x) + self.offset, y)

    def configure_optimizers(self) -> Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=8, shuffle=False)


def test_param_group_added_mid_fit_is_logged_and_shown(
    regression_data: TensorDataset, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """A group added after fit start gets its own names in the logs, the progress bar and the summary."""
    callback = CLARACallback(c=C, d=D, safeguard=False, loss_brake=False, prog_bar=True)
    logger = CSVLogger(tmp_path, name="growing")
    trainer = make_trainer(trainer_kwargs, [callback], logger=logger, log_every_n_steps=1)
    trainer.fit(_GrowingModule(regression_data))

    assert callback.names == [["SGD/pg1", "SGD/pg2"]]
    assert {"clara_lr-SGD/pg1", "clara_lr-SGD/pg2"} <= set(trainer.progress_bar_metrics)
    logged = csv_series(Path(logger.log_dir) / "metrics.csv")
    assert set(logged["clara/lr-SGD"]) == {0, 1, 2}  # one group, named like LearningRateMonitor does
    assert set(logged["clara/lr-SGD/pg1"]) == set(logged["clara/lr-SGD/pg2"]) == {3, 4, 5, 6, 7}
    assert [row.name for row in callback.summary_rows or []] == ["SGD/pg1", "SGD/pg2"]


def _monitor_names(optimizers: list[Optimizer], configs: list[Any]) -> dict[int, list[str]]:
    """LearningRateMonitor's own names (its private helpers, as in its on_train_start), per optimizer."""
    monitor = LearningRateMonitor()
    names, seen_optimizers, seen_types = monitor._find_names_from_schedulers(configs)
    optimizer_names_, without = monitor._find_names_from_optimizers(optimizers, seen_optimizers, seen_types)
    out: dict[int, list[str]] = {}
    for optimizer, group_names in [
        *zip([config.scheduler.optimizer for config in configs], names, strict=True),
        *zip(without, optimizer_names_, strict=True),
    ]:
        out.setdefault(id(optimizer), [n.removeprefix("lr-") for n in group_names])
    return out


@pytest.mark.parametrize(
    "layout",
    [
        [("SGD", None), ("SGD", None), ("Adam", None)],
        [("SGD", None), ("SGD", "sched"), ("SGD", None)],
        [("SGD", "sched"), ("SGD", "sched"), ("SGD", None)],
        [("SGD", "sched-twice"), ("SGD", None)],
        [("SGD", "named"), ("SGD", "sched"), ("SGD", "named")],
        [("Adam", None), ("SGD", "named"), ("Adam", "sched")],
    ],
    ids=lambda layout: "+".join(f"{c}:{s}" for c, s in layout),
)
def test_optimizer_names_equal_lr_monitor(layout: list[tuple[str, str | None]]) -> None:
    """For any mix of classes, schedulers (several on one optimizer, named or not) and param groups,
    ``optimizer_names`` gives LearningRateMonitor's names."""
    from types import SimpleNamespace

    from lightning_clara.callback import optimizer_names

    optimizers: list[Optimizer] = []
    configs: list[Any] = []
    for k, (cls_name, scheduler) in enumerate(layout):
        params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))]
        groups = [{"params": params[:1]}, {"params": params[1:], "name": "head"}] if k % 2 else params
        optimizer = getattr(torch.optim, cls_name)(groups, lr=0.1)
        optimizers.append(optimizer)
        if scheduler is None:
            continue
        name = f"lr-custom{k}" if scheduler == "named" else None
        for _ in range(2 if scheduler == "sched-twice" else 1):
            configs.append(SimpleNamespace(scheduler=SimpleNamespace(optimizer=optimizer), name=name))
    expected = _monitor_names(optimizers, configs)
    assert optimizer_names(optimizers, configs) == [expected[id(o)] for o in optimizers]
