"""``CLARACallback`` with Lightning's LR schedulers in real ``Trainer.fit`` runs.

The contract: while the optimizer steps, its lr is ``lr_scheduled * F``; the scheduler only ever
sees ``lr_scheduled``, and F only ever changes in CLARA's post-step hook. Checked at every step:

* the lr the step sees is captured by a step pre-hook registered after CLARA's (in
  ``on_train_start``, which runs after ``CLARACallback.on_fit_start``), together with
  ``controller.lr_factor`` at that moment (F before the step);
* ``lr_scheduled`` comes from running the same scheduler alone on a dummy optimizer over the
  same steps and epochs (ReduceLROnPlateau replays the metrics the real one received).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.utils.hooks import RemovableHandle

from lightning_clara import CLARA, CLARACallback
from lightning_clara.reference import HeavyBallReference

C = 0.2
D = 0.05  # F moves by several percent within a few steps
LR = 0.05
EPOCHS = 3
STEPS_PER_EPOCH = 8  # conftest's regression data: 64 samples, batches of 8
STEPS = EPOCHS * STEPS_PER_EPOCH
REL = 1e-12

MakeOptimizer = Callable[[Any], Optimizer]
MakeScheduler = Callable[[Optimizer], Any]


class RecordingPlateau(ReduceLROnPlateau):
    """ReduceLROnPlateau that remembers the metric values it was given (to replay them on a dummy)."""

    def __init__(self, optimizer: Optimizer, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.seen: list[float] = []

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record, then behave exactly as ReduceLROnPlateau."""
        self.seen.append(float(metrics))
        super().step(metrics)


@dataclass(frozen=True)
class Case:
    """One optimizer + scheduler configuration, as ``configure_optimizers`` would return it."""

    make_optimizer: MakeOptimizer
    make_scheduler: MakeScheduler
    interval: str
    monitor: str | None = None


def _sgd(params: Any) -> Optimizer:
    return torch.optim.SGD(params, lr=LR)


def _sgd_momentum(params: Any) -> Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


CASES: dict[str, Case] = {
    "LambdaLR_warmup": Case(_sgd, lambda o: LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)), "step"),
    # cycles SGD's momentum between 0.85 and 0.95 as well: the heavy-ball reference is rebuilt as it moves
    "OneCycleLR": Case(_sgd_momentum, lambda o: OneCycleLR(o, max_lr=0.1, total_steps=STEPS), "step"),
    "CosineAnnealingLR": Case(_sgd, lambda o: CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-3), "step"),
    "StepLR": Case(_sgd_momentum, lambda o: StepLR(o, step_size=1, gamma=0.5), "epoch"),
    "ExponentialLR": Case(_sgd, lambda o: ExponentialLR(o, gamma=0.95), "step"),
    # mode="max" on a falling loss: no improvement after the first epoch, so the lr halves each epoch
    "ReduceLROnPlateau": Case(
        _sgd, lambda o: RecordingPlateau(o, mode="max", factor=0.5, patience=0), "epoch", monitor="train_loss"
    ),
}


class StepRecorder(Callback):
    """At every optimizer step: the lr the step sees and F before it (pre-hook), F after it (post-hook).

    Both hooks are registered in ``on_train_start``, after CLARA attached its own in ``on_fit_start``,
    so they run after CLARA's: the pre-hook sees ``lr_base * F``, the post-hook the updated F.
    """

    def __init__(self, clara_callback: CLARACallback) -> None:
        self.clara_callback = clara_callback
        self.lr_seen: list[float] = []
        self.factor_before: list[float] = []
        self.factor_after: list[float] = []
        self.momentum_seen: list[float] = []
        self._handles: list[RemovableHandle] = []

    @property
    def controller(self) -> CLARA:
        (controller,) = self.clara_callback.controllers
        return controller

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        (optimizer,) = trainer.optimizers
        assert optimizer._clara_controller is self.controller  # CLARA is attached already  # type: ignore[attr-defined]
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def _before(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        group = optimizer.param_groups[0]
        self.lr_seen.append(float(group["lr"]))
        self.momentum_seen.append(float(group.get("momentum", 0.0)))
        self.factor_before.append(self.controller.lr_factor)

    def _after(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.factor_after.append(self.controller.lr_factor)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        pl_module.log("train_loss", loss.detach(), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def scheduler_alone(case: Case, metrics: list[float] | None) -> tuple[list[float], float]:
    """The scheduled lr at each of the STEPS steps, and after the last one, for the scheduler on its own."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = case.make_optimizer([param])
    scheduler = case.make_scheduler(optimizer)
    lrs = []
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            param.grad = torch.zeros(1)
            optimizer.step()
            if case.interval == "step":
                scheduler.step()
        if case.interval == "epoch":
            if metrics is None:
                scheduler.step()
            else:
                scheduler.step(metrics[epoch])
    return lrs, float(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_lr_used_is_scheduled_lr_times_factor_at_every_step(
    name: str, make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """lr seen by the step == lr_scheduled * F (F before the step), F changes only in the post-hook, and after
    fit the optimizer holds the scheduler-only lr while F stays what the last post-hook left."""
    case = CASES[name]

    def configure(module: LightningModule) -> dict[str, Any]:
        optimizer = case.make_optimizer(module.parameters())
        scheduler: dict[str, Any] = {"scheduler": case.make_scheduler(optimizer), "interval": case.interval}
        if case.monitor is not None:
            scheduler["monitor"] = case.monitor
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    module = make_module(configure)
    clara_callback = CLARACallback(c=C, d=D, safeguard=False, initial_factor=1.0)
    recorder = StepRecorder(clara_callback)
    trainer = Trainer(**{**trainer_kwargs, "max_epochs": EPOCHS, "callbacks": [clara_callback, recorder]})
    trainer.fit(module)

    real_scheduler = module.configured["lr_scheduler"]["scheduler"]
    metrics = real_scheduler.seen if isinstance(real_scheduler, RecordingPlateau) else None
    if metrics is not None:
        assert len(metrics) == EPOCHS
    scheduled, final_scheduled = scheduler_alone(case, metrics)

    assert len(recorder.lr_seen) == len(recorder.factor_after) == STEPS
    assert recorder.factor_before[0] == 1.0
    for t in range(STEPS):
        expected = scheduled[t] * recorder.factor_before[t]
        assert recorder.lr_seen[t] == pytest.approx(expected, rel=REL), f"step {t}"
        if t > 0:  # nothing but CLARA's post-hook changes F
            assert recorder.factor_before[t] == recorder.factor_after[t - 1], f"step {t}"
    # both sides of the product actually moved, so the check could tell them apart
    assert max(scheduled) / min(scheduled) > 1.2
    assert max(recorder.factor_after) / min(recorder.factor_after) > 1.02

    optimizer = module.configured["optimizer"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(final_scheduled, rel=REL)
    controller = clara_callback.controllers[0]
    assert controller.lr_factor == recorder.factor_after[-1]  # F never resets at the end of fit
    assert controller.num_adapted_steps == STEPS
    assert not controller.attached


def rounded_momentum(beta: float) -> float:
    """The library's documented rounding of a momentum in (0.5, 1) for its reference key: 1 - beta to 2
    significant digits (so that a cycling scheduler does not trigger a recalibration at every step)."""
    return 1.0 - float(f"{1.0 - beta:.2g}")


@functools.cache
def heavy_ball(beta: float) -> HeavyBallReference:
    """One reference object per momentum (its curves are cached inside)."""
    return HeavyBallReference(C, beta)


def heavy_ball_ratio(beta: float, sizes: list[int], t: int) -> float:
    """r_t for a constant gradient: every step points along g, so ||p_k||^2 = (1 - (1-c)^t)^2 exactly."""
    reference = heavy_ball(beta)
    curves = reference.curves(sizes)
    expected = sum(float(curves[n][min(t, curves[n].numel() - 1)]) for n in sizes)
    return len(sizes) * (1 - (1 - C) ** t) ** 2 / expected


def test_one_cycle_momentum_cycles_and_the_reference_follows() -> None:
    """OneCycleLR moves SGD's momentum (0.95 -> 0.85 -> 0.95) every step: CLARA must rebuild its heavy-ball
    reference as it goes. With a constant gradient r_t = sum_k (1 - (1-c)^t)^2 / sum_k mu_k(beta_t, t), which
    the library must match for the (rounded) momentum in force at each step; the rounding itself may move r
    by at most 2 % from the unrounded momentum's value. 160 steps: the cycle takes about 60 distinct momenta,
    revisited on the way back (a cap of 32 calibrations once froze the reference half-way)."""
    steps = 160
    sizes = [7, 30]
    params = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    scheduler = OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    clara = CLARA(optimizer, c=C, d=D)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=0.9)
    alone = OneCycleLR(probe, max_lr=0.1, total_steps=steps)
    momenta = []
    for t in range(1, steps + 1):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        beta = float(optimizer.param_groups[0]["momentum"])
        momenta.append(beta)
        # the scheduler only ever sees its own values: the base lr is the scheduler-only lr
        assert optimizer.param_groups[0]["lr"] == pytest.approx(probe.param_groups[0]["lr"], rel=REL)
        optimizer.step()
        assert clara.ratio == pytest.approx(heavy_ball_ratio(rounded_momentum(beta), sizes, t), rel=1e-9), t
        assert clara.ratio == pytest.approx(heavy_ball_ratio(beta, sizes, t), rel=0.02), f"step {t}, beta {beta}"
        scheduler.step()
        probe.step()
        alone.step()
    assert max(momenta) - min(momenta) > 0.09
    assert len({rounded_momentum(beta) for beta in momenta}) > 5  # the reference really changed along the way
    assert clara.num_adapted_steps == steps
