"""``CLARACallback`` / ``CLARA`` inside real training loops: accumulation, precision, manual optimization with
several optimizers, gradient clipping, strategies, and long-run numerical stability.

Expectations are derived independently of the library: the optimizer's real steps are counted with our own
step hooks, trajectories are recomputed by the hand-written loop of ``reference_loop`` (fed the very
gradients or batches the run used), and statistical bounds come from quantities measured on the run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import (
    LR,
    STEPS_PER_EPOCH,
    LRRecorder,
    RecordingLogger,
    csv_series,
    make_trainer,
    max_relative_error,
    run_reference,
    sgd,
)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from reference_loop import SimpleAdam, SimpleCLARA, plain_sgd_mu, sgd_step
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from lightning_clara import CLARA, CLARACallback
from lightning_clara.reference import reference_for

C = 0.2
D = 0.4  # normalized (default) rule: F moves by tens of percent within a few dozen steps (paper-rule d = 0.05 for SGD)
# Comparisons with ``reference_loop`` use the default rule on both sides (SimpleCLARA follows the library's default).

MakeModule = Callable[..., LightningModule]


class StepRecorder(Callback):
    """Counts every optimizer's *completed* steps with a step post-hook of our own (registered after CLARA's).

    With ``keep_grads`` it also keeps a copy of each step's gradients (one list per step, in param-group order):
    what the optimizer actually used, after unscaling and clipping.
    """

    def __init__(self, keep_grads: bool = False) -> None:
        self.keep_grads = keep_grads
        self.steps: list[int] = []
        self.grads: list[list[list[Tensor]]] = []
        #: with ``keep_grads``, also the realised steps ``theta_before - theta_after`` (float64)
        self.realised: list[list[list[Tensor]]] = []
        self._before: list[list[Tensor]] = []
        self._handles: list[RemovableHandle] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps = [0] * len(trainer.optimizers)
        self.grads = [[] for _ in trainer.optimizers]
        self.realised = [[] for _ in trainer.optimizers]
        self._before = [[] for _ in trainer.optimizers]
        self._handles = [
            optimizer.register_step_post_hook(partial(self._record, index))
            for index, optimizer in enumerate(trainer.optimizers)
        ]
        if self.keep_grads:
            self._handles += [
                optimizer.register_step_pre_hook(partial(self._snapshot, index))
                for index, optimizer in enumerate(trainer.optimizers)
            ]

    @staticmethod
    def _params(optimizer: Optimizer) -> list[Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _snapshot(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._before[index] = [p.detach().double() for p in self._params(optimizer)]

    def _record(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.steps[index] += 1
        if self.keep_grads:
            params = self._params(optimizer)
            self.grads[index].append([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
            before = self._before[index]
            self.realised[index].append([b - p.detach().double() for b, p in zip(before, params, strict=True)])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def replay_sgd(lrs: list[float], grads: list[list[Tensor]], lr_base: float, **options: Any) -> SimpleCLARA:
    """Feed the simple loop the plain-SGD steps ``lr * grad`` a run took (in float64); check each lr on the way."""
    steps = [[lr * g.double() for g in step_grads] for lr, step_grads in zip(lrs, grads, strict=True)]
    return replay_steps(lrs, steps, lr_base, tolerance=1e-5, **options)


def replay_steps(
    lrs: list[float], steps: list[list[Tensor]], lr_base: float, tolerance: float, **options: Any
) -> SimpleCLARA:
    """Feed the simple loop the steps a run really took; check each lr used against ``lr_base * F`` on the way."""
    clara = SimpleCLARA([s.shape for s in steps[0]], C, D, plain_sgd_mu(C), **options)
    assert len(lrs) == len(steps) > 0
    for t, (lr, step) in enumerate(zip(lrs, steps, strict=True)):
        assert math.isclose(lr, lr_base * clara.factor, rel_tol=tolerance), (t, lr, lr_base * clara.factor)
        clara.update(step)
    return clara


def tensor_counts(controller: CLARA) -> list[int]:
    """How often each parameter's path was updated, in optimizer order (untouched tensors count 0)."""
    rows = controller.state_dict()["tensors"]
    return [0 if entry is None else entry["count"] for row in rows for entry in row]


# ---------------------------------------------------------------------------------------------- a. accumulation
@pytest.mark.parametrize("log_every", [1, 2])
def test_accumulation_adapts_and_logs_on_the_optimizer_step_axis(
    log_every: int,
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
    tmp_path: Path,
) -> None:
    """accumulate_grad_batches=3 over 8 batches: steps after batches 3, 6 and 8 (the epoch's last, a partial group).

    CLARA adapts on exactly those steps (trajectory = the simple loop's), and each ``clara/*`` key is
    logged once per logged optimizer step, at that step's index, with that step's values.
    """
    epochs, accumulate = 2, 3
    assert STEPS_PER_EPOCH % accumulate != 0  # the partial last group is part of the test
    total = epochs * math.ceil(STEPS_PER_EPOCH / accumulate)
    module = make_module(sgd())
    initial_net = copy.deepcopy(module.net)
    callback, recorder, counter = CLARACallback(c=C, d=D, safeguard=False), LRRecorder(), StepRecorder()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(
        trainer_kwargs,
        [callback, recorder, counter],
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=logger,
        log_every_n_steps=log_every,
    )
    trainer.fit(module)

    (controller,) = callback.controllers
    assert counter.steps == [total] == [6]
    assert trainer.global_step == controller.num_adapted_steps == total
    assert tensor_counts(controller) == [total] * 4
    reference = run_reference(
        initial_net, regression_data, epochs=epochs, lr_at=lambda t: LR, accumulate=accumulate, c=C, d=D
    )
    assert max_relative_error(recorder.first_group(), reference.lrs) < 1e-9
    assert abs(reference.log_factors[-1]) > 0.1  # F moved: a per-batch adaptation would give another trajectory

    assert logger.log_dir is not None
    logged = csv_series(Path(logger.log_dir) / "metrics.csv")  # fails if a key is logged twice at one step
    expected_steps = {s for s in range(total) if (s + 1) % log_every == 0}
    for key in ("clara/lr-SGD", "clara/log_factor-SGD", "clara/ratio-SGD"):
        assert set(logged.get(key, {})) == expected_steps, key
    for s in expected_steps:
        assert math.isclose(logged["clara/lr-SGD"][s], reference.lrs[s], rel_tol=1e-9), s
        assert math.isclose(logged["clara/log_factor-SGD"][s], reference.log_factors[s], rel_tol=1e-9), s
        assert math.isclose(logged["clara/ratio-SGD"][s], reference.ratios[s], rel_tol=1e-9), s


# ---------------------------------------------------------------------------------------------- b. precision
def _float32(dataset: TensorDataset) -> TensorDataset:
    return TensorDataset(*(t.float() for t in dataset.tensors))


@pytest.mark.parametrize(("precision", "param_dtype"), [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_bf16_precision_keeps_fp32_paths(
    precision: str,
    param_dtype: torch.dtype,
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
) -> None:
    """The forward runs in bf16, the paths stay fp32 (also for bf16 parameters), and F follows the simple
    loop fed the steps really taken: lr x the very gradients each step used for fp32 parameters, the
    rounded parameter changes for bf16 ones (which CLARA reads by delta)."""
    epochs = 2
    module = make_module(sgd(), dataset=_float32(regression_data)).float()
    output_dtypes: list[torch.dtype] = []
    module.net[0].register_forward_hook(lambda m, args, out: output_dtypes.append(out.dtype))
    # target 1 and F from 1: F moves but the lr stays where bf16 rounding cannot make the run chaotic
    options = {"target": 1.0, "initial_factor": 1.0}
    callback = CLARACallback(c=C, d=D, safeguard=False, **options)
    recorder, counter = LRRecorder(), StepRecorder(keep_grads=True)
    trainer = make_trainer(trainer_kwargs, [callback, recorder, counter], max_epochs=epochs, precision=precision)
    trainer.fit(module)

    assert set(output_dtypes) == {torch.bfloat16}  # the precision plugin was really in effect
    params = list(module.parameters())
    assert {p.dtype for p in params} == {param_dtype}
    (controller,) = callback.controllers
    paths = [entry["path"] for row in controller.state_dict()["tensors"] for entry in row]
    assert [path.dtype for path in paths] == [torch.float32] * len(params)
    total = epochs * STEPS_PER_EPOCH
    assert counter.steps == [total]
    assert controller.num_adapted_steps == trainer.global_step == total
    factors = [lr / LR for lr in recorder.first_group()]
    assert all(math.isfinite(f) for f in [*factors, controller.lr_factor])
    assert max(factors) / min(factors) > 1.05  # F changed
    if param_dtype == torch.float32:
        reference = replay_sgd(recorder.first_group(), counter.grads[0], LR, **options)
        tolerance = 1e-5
    else:
        assert controller.sample is not None
        # the sampled step is the exact fp32 difference of the bf16 values, but the parameters (and so
        # the steps) of a bf16 run differ from the float64 replay's rounding: hence the looser tolerance
        tolerance = 2e-3
        reference = replay_steps(recorder.first_group(), counter.realised[0], LR, tolerance=tolerance, **options)
    assert math.isclose(controller.log_factors[0], reference.log_factor, rel_tol=tolerance, abs_tol=1e-6)


def test_fp16_mixed_on_cpu_runs_as_bf16_mixed(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any]
) -> None:
    """Lightning does not raise for precision="16-mixed" on CPU: it warns and uses bf16-mixed (no scaler)."""
    module = make_module(sgd(), dataset=_float32(regression_data)).float()
    callback, counter = CLARACallback(c=C, d=D, safeguard=False), StepRecorder()
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = make_trainer(trainer_kwargs, [callback, counter], precision="16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert isinstance(trainer.precision_plugin, MixedPrecision)
    assert trainer.precision_plugin.scaler is None
    trainer.fit(module)
    (controller,) = callback.controllers
    assert counter.steps == [STEPS_PER_EPOCH] == [controller.num_adapted_steps]
    assert math.isfinite(controller.log_factors[0])
    assert abs(controller.log_factors[0]) > 0.01


def test_fp16_grad_scaler_skips_are_not_adapted_in_lightning(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any]
) -> None:
    """Real fp16 autocast with a GradScaler on CPU (the plugin passed explicitly): a huge initial scale
    overflows the fp16 backward, so the scaler skips steps until it has backed off. CLARA adapts on exactly
    the steps the optimizer ran, each with its unscaled gradient."""
    epochs, init_scale = 2, 2.0**22  # the fp16 backward of this model overflows above ~2**17
    module = make_module(sgd(), dataset=_float32(regression_data)).float()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    callback, recorder, counter = CLARACallback(c=C, d=D, safeguard=False), LRRecorder(), StepRecorder(keep_grads=True)
    trainer = make_trainer(trainer_kwargs, [callback, recorder, counter], max_epochs=epochs, plugins=[plugin])
    trainer.fit(module)

    batches = epochs * STEPS_PER_EPOCH
    (real_steps,) = counter.steps
    skipped = round(math.log2(init_scale / scaler.get_scale()))  # each skip halves the scale (no growth this short)
    assert skipped > 0
    assert real_steps == batches - skipped > 2
    (controller,) = callback.controllers
    assert controller.num_adapted_steps == real_steps == len(recorder.first_group())
    assert tensor_counts(controller) == [real_steps] * 4
    assert controller.num_skipped_steps == 0  # the optimizer never saw a non-finite step
    reference = replay_sgd(recorder.first_group(), counter.grads[0], LR)
    assert math.isclose(controller.log_factors[0], reference.log_factor, rel_tol=1e-5, abs_tol=1e-6)


def _assert_states_equal(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two ``CLARA.state_dict()`` results are identical (tensors bitwise)."""
    assert before.keys() == after.keys()
    for key in before:
        if key == "tensors":
            for row_before, row_after in zip(before[key], after[key], strict=True):
                for a, b in zip(row_before, row_after, strict=True):
                    assert a["count"] == b["count"]
                    assert torch.equal(a["path"], b["path"])
        else:
            assert before[key] == after[key], key


def test_plain_controller_with_grad_scaler_ignores_skipped_steps() -> None:
    """An inf gradient makes ``GradScaler.step`` skip ``optimizer.step()``: CLARA's state is untouched, and the
    next finite step adapts as if the skipped one never happened (simple loop fed only the finite steps)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator)
    w = torch.zeros(4, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    params = [w, b]
    optimizer = torch.optim.SGD(params, lr=LR)
    # no fast start: its 20x damping takes this toy problem's lr to ~6 in 12 steps, where fp32 paths
    # against the float64 loop no longer hold the 1e-6 tolerance that checks the skip
    clara = CLARA(optimizer, c=C, d=D, fast_start=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    reference = SimpleCLARA([p.shape for p in params], C, D, plain_sgd_mu(C), fast_start=0)
    steps, poisoned = 12, 6
    for t in range(steps):
        optimizer.zero_grad()
        scaler.scale(nn.functional.mse_loss(x @ w + b, y)).backward()
        if t == poisoned:
            w.grad[0, 0] = math.inf  # type: ignore[index]
            state = clara.state_dict()
            weights = [p.detach().clone() for p in params]
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            assert scaler.get_scale() == scale / 2  # the scaler did skip
            _assert_states_equal(state, clara.state_dict())
            assert all(torch.equal(a, p.detach()) for a, p in zip(weights, params, strict=True))
            assert clara.num_adapted_steps == poisoned
            continue
        lr = LR * reference.factor
        log_factor_before = clara.log_factors[0]
        scaler.step(optimizer)
        scaler.update()
        assert math.isclose(clara.lr_used[0], lr, rel_tol=1e-6)
        reference.update([lr * p.grad.double() for p in params])  # type: ignore[union-attr]  # unscaled in place
        assert math.isclose(clara.log_factors[0], reference.log_factor, rel_tol=1e-5, abs_tol=1e-7)
        if t > 0:
            assert clara.log_factors[0] != log_factor_before  # every finite step adapts
    assert clara.num_adapted_steps == steps - 1
    assert tensor_counts(clara) == [steps - 1] * 2
    assert clara.num_skipped_steps == 0


# ---------------------------------------------------------------------------------------------- c. manual, GAN
G_LR, D_LR = 0.02, 0.1
GAN_SAMPLES, GAN_BATCH = 64, 8


def make_gan_data() -> TensorDataset:
    """Noise ``z`` and "real" samples from a shifted, stretched Gaussian (float64, fixed seed)."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(GAN_SAMPLES, 2, generator=generator, dtype=torch.float64)
    real = torch.randn(GAN_SAMPLES, 2, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 0.5])
    return TensorDataset(z, real + torch.tensor([1.0, -1.0]))


def discriminator_loss(generator: nn.Module, discriminator: nn.Module, z: Tensor, real: Tensor) -> Tensor:
    fake = generator(z).detach()
    bce = nn.functional.binary_cross_entropy_with_logits
    real_logits, fake_logits = discriminator(real), discriminator(fake)
    return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(generator: nn.Module, discriminator: nn.Module, z: Tensor) -> Tensor:
    logits = discriminator(generator(z))
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class TinyGAN(LightningModule):
    """GAN-style manual optimization: Adam for the generator every batch, SGD for the discriminator every
    ``d_every``-th batch, each on its own loss."""

    def __init__(self, d_every: int = 2) -> None:
        super().__init__()
        self.automatic_optimization = False
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.generator = nn.Linear(2, 2)
            self.discriminator = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        self.double()
        self.d_every = d_every

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        z, real = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        if batch_idx % self.d_every == 0:
            opt_d.zero_grad()
            self.manual_backward(discriminator_loss(self.generator, self.discriminator, z, real))
            opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(generator_loss(self.generator, self.discriminator, z))
        opt_g.step()

    def configure_optimizers(self) -> list[Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=G_LR),
            torch.optim.SGD(self.discriminator.parameters(), lr=D_LR),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_gan_data(), batch_size=GAN_BATCH, shuffle=False)


def test_manual_gan_adapts_each_optimizer_on_its_own_steps(trainer_kwargs: dict[str, Any]) -> None:
    """Generator (Adam, every batch) and discriminator (SGD, every second batch) get independent factors
    that match a hand-written GAN loop with one simple CLARA per optimizer; keys ``clara/*-Adam`` and
    ``clara/*-SGD`` are logged only at the batches where that optimizer stepped."""
    epochs, d_every = 2, 2
    module = TinyGAN(d_every)
    gen, disc = copy.deepcopy(module.generator), copy.deepcopy(module.discriminator)
    logger = RecordingLogger()
    callback, recorder, counter = CLARACallback(c=C, d=D, safeguard=False), LRRecorder(), StepRecorder()
    trainer = make_trainer(
        trainer_kwargs, [callback, recorder, counter], max_epochs=epochs, logger=logger, log_every_n_steps=1
    )
    trainer.fit(module)

    # the same loop by hand: Adam written out, the Adam null-model reference curves (tested elsewhere) for mu
    g_params, d_params = list(gen.parameters()), list(disc.parameters())
    probe = torch.optim.Adam(copy.deepcopy(g_params), lr=G_LR)
    curves = reference_for(probe, probe.param_groups[0], C).curves(sorted({p.numel() for p in g_params}))
    adam_mu = lambda n, t: float(curves[n][min(t, len(curves[n]) - 1)])  # noqa: E731
    adam, g_clara = SimpleAdam(g_params), SimpleCLARA([p.shape for p in g_params], C, D, adam_mu)
    d_clara = SimpleCLARA([p.shape for p in d_params], C, D, plain_sgd_mu(C))
    g_lrs: list[float] = []
    d_lrs: list[float] = []
    d_batches: list[int] = []
    batches_per_epoch = GAN_SAMPLES // GAN_BATCH
    for epoch in range(epochs):
        for batch_idx, (z, real) in enumerate(DataLoader(make_gan_data(), batch_size=GAN_BATCH, shuffle=False)):
            if batch_idx % d_every == 0:
                disc.zero_grad(set_to_none=True)
                discriminator_loss(gen, disc, z, real).backward()
                d_lrs.append(D_LR * d_clara.factor)
                d_clara.update(sgd_step(d_params, d_lrs[-1]))
                d_batches.append(epoch * batches_per_epoch + batch_idx)
            gen.zero_grad(set_to_none=True)
            generator_loss(gen, disc, z).backward()
            g_lrs.append(G_LR * g_clara.factor)
            g_clara.update(adam.step(g_lrs[-1]))

    g_controller, d_controller = callback.controllers
    assert counter.steps == [len(g_lrs), len(d_lrs)] == [16, 8]
    assert [g_controller.num_adapted_steps, d_controller.num_adapted_steps] == [16, 8]
    assert tensor_counts(d_controller) == [8] * 4
    assert max_relative_error(recorder.first_group(0), g_lrs) < 1e-8
    assert max_relative_error(recorder.first_group(1), d_lrs) < 1e-8
    assert math.isclose(g_controller.log_factors[0], g_clara.log_factor, rel_tol=1e-8)
    assert math.isclose(d_controller.log_factors[0], d_clara.log_factor, rel_tol=1e-8)
    assert abs(g_controller.log_factors[0] - d_controller.log_factors[0]) > 0.02

    logged_keys = logger.keys()
    assert {key for key in logged_keys if key.startswith("clara/lr-")} == {"clara/lr-Adam", "clara/lr-SGD"}
    g_series, d_series = logger.series("clara/lr-Adam"), logger.series("clara/lr-SGD")
    assert sorted(g_series) == list(range(epochs * batches_per_epoch))
    assert sorted(d_series) == d_batches == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [g_series[s] for s in sorted(g_series)] == pytest.approx(g_lrs, rel=1e-8)
    assert [d_series[s] for s in d_batches] == pytest.approx(d_lrs, rel=1e-8)


class AlternatingGAN(TinyGAN):
    """The discriminator on even batches, the generator on odd ones: each optimizer steps every other batch."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        z, real = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        if batch_idx % 2 == 0:
            opt_d.zero_grad()
            self.manual_backward(discriminator_loss(self.generator, self.discriminator, z, real))
            opt_d.step()
        else:
            opt_g.zero_grad()
            self.manual_backward(generator_loss(self.generator, self.discriminator, z))
            opt_g.step()


@pytest.mark.parametrize("log_every", [2, 4])
def test_alternating_optimizers_both_reach_the_logger_with_an_even_interval(
    trainer_kwargs: dict[str, Any], log_every: int
) -> None:
    """Every log step lands on the same parity of batch, where only one optimizer stepped; the other's latest
    values are logged there too (issue 21), each value once."""
    logger, callback = RecordingLogger(), CLARACallback(c=C, d=D)
    trainer = make_trainer(trainer_kwargs, [callback], max_epochs=2, logger=logger, log_every_n_steps=log_every)
    trainer.fit(AlternatingGAN())
    batches = 2 * GAN_SAMPLES // GAN_BATCH
    for name in ("Adam", "SGD"):
        series = logger.series(f"clara/lr-{name}")
        assert len(series) == batches // log_every, name
    g_controller, _ = callback.controllers
    last_step = max(logger.series("clara/lr-Adam"))
    assert logger.series("clara/lr-Adam")[last_step] == pytest.approx(g_controller.lr_used[0])


# ---------------------------------------------------------------------------------------------- d. clipping
#: The clipping check compares two float64 trajectories to 1e-9: at a target (0.7) whose lr climbs less within the
#: run, rounding differences between Lightning's clip and the hand loop's are not amplified past that.
TARGET = 0.7


@pytest.mark.parametrize(("algorithm", "clip_val"), [("norm", 0.5), ("value", 0.1)])
def test_clipped_step_is_the_adapted_direction(
    algorithm: str,
    clip_val: float,
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
) -> None:
    """With gradient clipping CLARA sees the clipped step: sampled and full paths give the same F to 1e-9, and
    both equal a hand loop that clips the same way, which differs clearly from the unclipped trajectory."""
    epochs = 2
    lrs: dict[str, list[float]] = {}
    log_factors: dict[str, float] = {}
    initial_net = copy.deepcopy(make_module(sgd()).net)
    for name, sample in (("full", None), ("sample", 4096)):
        module = make_module(sgd())
        options = {"c": C, "d": D, "safeguard": False, "loss_brake": False, "sample": sample, "target": TARGET}
        callback, recorder = CLARACallback(**options), LRRecorder()
        trainer = make_trainer(
            trainer_kwargs,
            [callback, recorder],
            max_epochs=epochs,
            gradient_clip_val=clip_val,
            gradient_clip_algorithm=algorithm,
        )
        trainer.fit(module)
        assert callback.controllers[0].sample == sample
        lrs[name] = recorder.first_group()
        log_factors[name] = callback.controllers[0].log_factors[0]
    assert max_relative_error(lrs["sample"], lrs["full"]) < 1e-9
    assert math.isclose(log_factors["sample"], log_factors["full"], rel_tol=1e-9, abs_tol=1e-12)

    def hand_loop(clip: bool) -> tuple[list[float], float, int]:
        net = copy.deepcopy(initial_net)
        params = list(net.parameters())
        clara = SimpleCLARA([p.shape for p in params], C, D, plain_sgd_mu(C), target=TARGET)
        used, clipped = [], 0
        for _ in range(epochs):
            for x, y in DataLoader(regression_data, batch_size=8, shuffle=False):
                net.zero_grad(set_to_none=True)
                nn.functional.mse_loss(net(x), y).backward()
                raw = [p.grad.clone() for p in params]  # type: ignore[union-attr]
                if clip and algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(params, clip_val)
                elif clip:
                    torch.nn.utils.clip_grad_value_(params, clip_val)
                clipped += any(not torch.equal(r, p.grad) for r, p in zip(raw, params, strict=True))
                used.append(LR * clara.factor)
                clara.update(sgd_step(params, used[-1]))
        return used, clara.log_factor, clipped

    expected, expected_log_factor, clipped = hand_loop(clip=True)
    assert clipped >= epochs * STEPS_PER_EPOCH // 2  # clipping was active in most steps
    assert max_relative_error(lrs["full"], expected) < 1e-9
    assert math.isclose(log_factors["full"], expected_log_factor, rel_tol=1e-9)
    unclipped, _, _ = hand_loop(clip=False)
    assert max_relative_error(unclipped, expected) > 1e-3  # so the agreement above is about clipping


# ---------------------------------------------------------------------------------------------- e. strategies
class PlainCPUStrategy(Strategy):
    """A minimal single-process strategy that is neither SingleDeviceStrategy nor DDP (e.g. a user's own)."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def is_global_zero(self) -> bool:
        return True

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return tensor


def _assert_names_supported(message: str) -> None:
    assert "single device" in message
    assert "DDP" in message


def test_fsdp_strategy_is_refused_before_anything_attaches(make_module: MakeModule) -> None:
    """FSDP cannot run on CPU, so on_fit_start gets a stand-in trainer whose strategy is a real FSDPStrategy.

    The stand-in has no ``optimizers``: the error must come from the strategy check, before they are read.
    """
    callback = CLARACallback()
    fake_trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(NotImplementedError, match="FSDPStrategy") as info:
        callback.on_fit_start(fake_trainer, make_module(sgd()))  # type: ignore[arg-type]
    _assert_names_supported(str(info.value))
    assert callback.controllers == []


def test_unsupported_strategy_raises_at_fit_start(make_module: MakeModule, trainer_kwargs: dict[str, Any]) -> None:
    """A real Trainer with a custom Strategy subclass: NotImplementedError before the first optimizer step."""
    module = make_module(sgd())
    counter = StepRecorder()
    trainer = make_trainer(trainer_kwargs, [CLARACallback(), counter], strategy=PlainCPUStrategy())
    with pytest.raises(NotImplementedError, match="PlainCPUStrategy") as info:
        trainer.fit(module)
    _assert_names_supported(str(info.value))
    assert trainer.global_step == 0
    assert counter.steps == []  # on_train_start never ran
    assert getattr(module.configured, "_clara_controller", None) is None


def test_supported_strategies_are_accepted_by_inheritance(
    make_module: MakeModule, trainer_kwargs: dict[str, Any]
) -> None:
    """A SingleDeviceStrategy subclass trains normally; a DDPStrategy passes the check (stand-in trainer)."""

    class MySingleDevice(SingleDeviceStrategy):
        pass

    module = make_module(sgd())
    callback = CLARACallback(c=C, d=D, safeguard=False)
    trainer = make_trainer(trainer_kwargs, [callback], strategy=MySingleDevice(device=torch.device("cpu")))
    trainer.fit(module)
    assert callback.controllers[0].num_adapted_steps == STEPS_PER_EPOCH

    optimizer = torch.optim.SGD(make_module(sgd()).parameters(), lr=LR)
    ddp_callback = CLARACallback()
    ddp_callback.on_fit_start(SimpleNamespace(strategy=DDPStrategy(), optimizers=[optimizer]), module)  # type: ignore[arg-type]
    assert [c.optimizer for c in ddp_callback.controllers] == [optimizer]
    ddp_callback.on_fit_end(None, module)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- f. long runs
NULL_SIZES = (1, 5, 20)
NULL_D = 1e-3


def null_run(seed: int, steps: int, tail: int = 0) -> tuple[CLARA, list[Tensor], list[float], list[float]]:
    """Plain SGD on float32 tensors fed i.i.d. standard Gaussian gradients; log F and r after every step, and per
    tensor the realised steps of the last ``tail`` steps (fp32 parameters before minus after, as CLARA reads them)."""
    generator = torch.Generator().manual_seed(seed)
    gradients = torch.randn(steps, sum(NULL_SIZES), generator=generator).split(NULL_SIZES, dim=1)
    params = [torch.zeros(n, requires_grad=True) for n in NULL_SIZES]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    clara = CLARA(optimizer, c=C, d=NULL_D, rule="paper")  # log F += d (r - 1), as ALGORITHM.md states it
    log_factors: list[float] = []
    ratios: list[float] = []
    realised: list[list[Tensor]] = [[] for _ in NULL_SIZES]
    for t in range(steps):
        for param, grads in zip(params, gradients, strict=True):
            param.grad = grads[t]
        before = [param.detach().clone() for param in params] if t >= steps - tail else None
        optimizer.step()
        if before is not None:
            for rows, param, old in zip(realised, params, before, strict=True):
                rows.append(old - param.detach())  # theta before - theta after, CLARA's realised step
        log_factors.append(clara._state.log_factors[0])
        ratios.append(clara._state.ratios[0])  # type: ignore[arg-type]
    return clara, [torch.stack(rows) if rows else torch.empty(0) for rows in realised], log_factors, ratios


def test_null_model_long_run_stays_within_random_walk_bound() -> None:
    """N null-model steps: log F is a driftless random walk, so max_t |log F_t| <= K sqrt(N s2), where s2 is the
    long-run variance of its increments (batch means over blocks much longer than the ~1/c correlation time).

    Reflection principle: P(max |W| > K sqrt(N s2)) <= 4 (1 - Phi(K)) ~ 1e-6 for K = 5. The bound (~0.9 here)
    is below the 1.5 that a 5 % bias of r (drift 5e-5 per step) adds over the run. Also: the fp32 paths are not
    degraded by 3e4 updates: recomputed in float64 from the last 300 realised steps (the unit steps of the
    fp32 parameters' differences; the gradients' own unit vectors differ from them by the parameters' rounding,
    ~ulp(|theta|) / |s|, which grows with the run), within the fp32 EMA's own error bound: each update rounds
    by at most ~3 eps (|p|, |u| <= 1), and the path forgets at rate c, so |error| <= 3 eps / c ~ 9e-7. About
    0.2-0.4 ms per step.
    """
    steps, block, k_sigma, tail = 30_000, 500, 5.0, 300
    clara, realised, log_factors, ratios = null_run(seed=0, steps=steps, tail=tail)

    increments = torch.diff(torch.tensor([0.0, *log_factors], dtype=torch.float64))
    torch.testing.assert_close(increments, NULL_D * (torch.tensor(ratios, dtype=torch.float64) - 1.0))
    block_sums = increments.view(-1, block).sum(dim=1)
    long_run_variance = float(block_sums.var()) / block
    bound = k_sigma * math.sqrt(steps * long_run_variance)
    walk = torch.tensor(log_factors, dtype=torch.float64).abs()
    assert float(walk.max()) < bound, (float(walk.max()), bound)
    assert bound < 0.05 * NULL_D * steps  # informative: a 5 % bias of r (drift 5e-5 per step) would break it
    assert clara.num_adapted_steps == steps
    assert clara.num_skipped_steps == 0
    assert tensor_counts(clara) == [steps] * len(NULL_SIZES)

    # fp32 path after 3e4 EMA updates == float64 EMA of the last 300 realised unit steps ((1 - c)^300 ~ 1e-29)
    (row,) = clara.state_dict()["tensors"]
    bound = 3 * torch.finfo(torch.float32).eps / C
    for entry, steps_taken in zip(row, realised, strict=True):
        expected = torch.zeros(steps_taken.shape[1], dtype=torch.float64)
        for s in steps_taken.double():
            expected = (1 - C) * expected + C * s / s.norm()
        path = entry["path"]
        assert path.dtype == torch.float32
        torch.testing.assert_close(path.double(), expected, rtol=0.0, atol=bound)


def test_null_model_runs_are_bitwise_deterministic() -> None:
    """Same seed: identical log F and r sequences (bitwise); another seed: a different trajectory."""
    steps = 1500
    _, _, first, first_ratios = null_run(seed=7, steps=steps)
    _, _, again, again_ratios = null_run(seed=7, steps=steps)
    _, _, other, _ = null_run(seed=8, steps=steps)
    assert first == again
    assert first_ratios == again_ratios
    assert len(set(first)) > steps // 2  # the trajectory really moves
    assert sum(a != b for a, b in zip(first, other, strict=True)) > steps // 2


def test_fabric_optimizer_is_unwrapped_and_adapts_on_every_step() -> None:
    """``CLARA(fabric_optimizer)`` hooks the optimizer inside Fabric's wrapper, whose ``step()`` ends in it:
    every wrapped step adapts, the lr used is lr * F, and the inner optimizer counts as attached."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    raw = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, raw)
    assert optimizer is not raw
    clara = CLARA(optimizer, c=C, d=D)
    assert clara.optimizer is raw
    with pytest.raises(RuntimeError, match="already has a CLARA controller"):
        CLARA(raw)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(5):
        factor = clara.lr_factor
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        assert clara.num_adapted_steps == step + 1
        assert math.isclose(clara.lr_used[0], 1e-3 * factor, rel_tol=1e-12)
    assert raw.param_groups[0]["lr"] == 1e-3  # the scheduled lr is back outside the step
    clara.detach()
