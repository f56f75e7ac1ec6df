"""Helpers shared by the test modules (one module: no test module imports another).

Sections: tiny Lightning set-ups (data, nets, the BoringModel-style module, recorders, a
hand-run reference fit) and the null-model drivers (noise generators, the loop over
``optimizer.step()``, the unit-mean check). ``reference_loop.py`` beside it is the readable
loop implementation of ``docs/ALGORITHM.md`` that the library must match.
"""

from __future__ import annotations

import copy
import csv
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from reference_loop import SimpleCLARA, plain_sgd_mu, sgd_step
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from lightning_clara import CLARA
from lightning_clara.reference import MonteCarloReference, Reference, reference_for, shared

#: The path memory of the tests' fits and null-model runs.
C = 0.2
#: Lightning fits (normalized rule): F moves by tens of percent within a few dozen steps.
CALLBACK_D = 0.4
#: Null-model drift checks (paper rule, log F += d (r - 1)).
NULL_D = 1e-3


# ------------------------------------------------------------------------------------- Lightning set-ups
#: ``configure(module)`` returns whatever ``configure_optimizers`` should return.
ConfigureFn = Callable[[Any], Any]


def make_regression_data(num_samples: int = 64, features: int = 4, seed: int = 0) -> TensorDataset:
    """A fixed-seed float64 linear-regression set (noisy), independent of the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=generator, dtype=torch.float64)
    w = torch.randn(features, 1, generator=generator, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    return TensorDataset(x, y)


def csv_series(path: Path) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` from a CSVLogger ``metrics.csv`` (one row per log call)."""
    out: dict[str, dict[int, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = int(row["step"])
            for key, value in row.items():
                if key == "step" or value in ("", None):
                    continue
                series = out.setdefault(key, {})
                assert step not in series, f"{key} logged twice at step {step}"
                series[step] = float(value)
    return out


def make_net(features: int = 4, hidden: int = 8, seed: int = 0) -> nn.Sequential:
    """A float64 two-layer MLP (four parameter tensors) initialised from ``seed`` without touching global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return net.double()


@functools.cache
def tiny_module_class() -> type:
    """Build (once) the BoringModel-style LightningModule; Lightning is imported only here."""
    import lightning.pytorch as pl

    class TinyRegressionModule(pl.LightningModule):
        """MSE regression with a tiny MLP; optimizers come from ``configure(module)``.

        With ``manual=True`` it uses manual optimization: per batch, every optimizer's
        ``zero_grad``, one backward pass, then optimizer i steps when ``batch_idx % step_every[i] == 0``.
        """

        def __init__(
            self,
            dataset: TensorDataset,
            configure: ConfigureFn,
            *,
            batch_size: int = 8,
            hidden: int = 8,
            seed: int = 0,
            manual: bool = False,
            step_every: Sequence[int] | None = None,
        ) -> None:
            super().__init__()
            self.dataset = dataset
            self.configure = configure
            self.batch_size = batch_size
            self.net = make_net(dataset.tensors[0].shape[1], hidden, seed)
            self.automatic_optimization = not manual
            self.step_every = list(step_every) if step_every is not None else None
            self.configured: Any = None

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            if self.automatic_optimization:
                return loss
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            every = self.step_every or [1] * len(optimizers)
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer, k in zip(optimizers, every, strict=True):
                if batch_idx % k == 0:
                    optimizer.step()
            return None

        def configure_optimizers(self) -> Any:
            self.configured = self.configure(self)
            return self.configured

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    return TinyRegressionModule


LR = 0.05


STEPS_PER_EPOCH = 8  # 64 samples, batch size 8


# ---------------------------------------------------------------------------------------------- helpers
class LRRecorder(Callback):
    """Records the lr of every param group *as the optimizer's step sees it* (a step pre-hook added last).

    The hook is registered in ``on_train_start``, after ``CLARACallback.on_fit_start`` attached its
    controllers, so it runs after CLARA's pre-hook and sees ``lr_base * F``.
    """

    def __init__(self) -> None:
        self.lrs: list[list[list[float]]] = []  # [optimizer][step][group]
        self._handles: list[RemovableHandle] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.lrs = [[] for _ in trainer.optimizers]
        self._handles = [
            optimizer.register_step_pre_hook(partial(self._record, index))
            for index, optimizer in enumerate(trainer.optimizers)
        ]

    def _record(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.lrs[index].append([float(group["lr"]) for group in optimizer.param_groups])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def first_group(self, index: int = 0) -> list[float]:
        """The lr trajectory of optimizer ``index``, first param group."""
        return [step[0] for step in self.lrs[index]]


class RecordingLogger(Logger):
    """An in-memory logger: every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {key: float(value) for key, value in metrics.items()}))

    def keys(self) -> set[str]:
        return {key for _, metrics in self.records for key in metrics}

    def series(self, key: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for step, metrics in self.records:
            if key in metrics:
                assert step is not None
                assert step not in out, f"{key} logged twice at step {step}"
                out[step] = metrics[key]
        return out


@dataclass
class ReferenceRun:
    """Per optimizer step of the simple loop: lr used, then ratio and log F after the step."""

    clara: SimpleCLARA
    net: nn.Module
    lrs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    log_factors: list[float] = field(default_factory=list)

    def log_factor_before(self, step: int) -> float:
        return 0.0 if step == 0 else self.log_factors[step - 1]


def run_reference(
    net: nn.Module,
    dataset: TensorDataset,
    *,
    epochs: int,
    lr_at: Callable[[int], float],
    batch_size: int = 8,
    accumulate: int = 1,
    c: float = C,
    d: float = CALLBACK_D,
    fast_start: int | None = None,
) -> ReferenceRun:
    """Plain SGD + ``SimpleCLARA`` by hand, batch for batch what Lightning's automatic loop does.

    Lightning divides the loss by ``accumulate`` and steps every ``accumulate`` batches (and at the
    end of an epoch); ``lr_at(t)`` is the scheduled lr of optimizer step ``t``.
    """
    net = copy.deepcopy(net)
    params = list(net.parameters())
    clara = SimpleCLARA([p.shape for p in params], c, d, plain_sgd_mu(c), fast_start=fast_start)
    run = ReferenceRun(clara, net)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            loss = nn.functional.mse_loss(net(x), y) / accumulate
            loss.backward()
            if (i + 1) % accumulate == 0 or i + 1 == len(loader):
                lr = lr_at(len(run.lrs)) * clara.factor
                run.lrs.append(lr)
                clara.update(sgd_step(params, lr))
                assert clara.ratio is not None
                run.ratios.append(clara.ratio)
                run.log_factors.append(clara.log_factor)
                for p in params:
                    p.grad = None
    return run


def max_relative_error(actual: Sequence[float], expected: Sequence[float]) -> float:
    assert len(actual) == len(expected), f"{len(actual)} values vs {len(expected)} expected"
    assert len(expected) > 0
    return max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))


def sgd(lr: float = LR) -> Callable[[LightningModule], Optimizer]:
    """``configure`` for one plain SGD (no momentum) over all parameters."""
    return lambda module: torch.optim.SGD(module.parameters(), lr=lr)


def make_trainer(trainer_kwargs: dict[str, Any], callbacks: list[Callback], **overrides: Any) -> Trainer:
    return Trainer(**{**trainer_kwargs, **overrides}, callbacks=callbacks)


def clara_state(checkpoint_path: str) -> dict[str, Any]:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    keys = [key for key in checkpoint["callbacks"] if "CLARACallback" in key]
    assert len(keys) == 1, f"callback states in checkpoint: {list(checkpoint['callbacks'])}"
    return checkpoint["callbacks"][keys[0]]


# ------------------------------------------------------------------------------------- null model
#: A scalar, a small vector, a mid-size vector and a matrix; three copies of each so that the
#: per-tensor noise (largest for the scalar) averages down and the mean of r is tight.
BASE_SHAPES: tuple[tuple[int, ...], ...] = ((1,), (7,), (300,), (20, 30))


NOISE_SHAPES = BASE_SHAPES * 3


#: Gaussian checks accept K_SIGMA combined standard errors ...
K_SIGMA = 4.0


#: ... and never more than this absolute deviation of the mean ratio from 1.
ABSOLUTE_GUARD = 0.03


#: The data's standard error must be small enough for the guard to mean something (typical: 0.5-0.9 %).
MAX_STANDARD_ERROR = 0.0125


def make_params(shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
    """Zero float64 parameters of the given shapes."""
    return [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]


def gaussian_split(params: list[Tensor], seed: int) -> Iterator[list[Tensor]]:
    """Fresh i.i.d. N(0, 1) gradients every step (one draw per step, split into the tensors)."""
    generator = torch.Generator().manual_seed(seed)
    numels = [p.numel() for p in params]
    total = sum(numels)
    while True:
        flat = torch.randn(total, generator=generator, dtype=torch.float64)
        yield [g.view(p.shape) for g, p in zip(flat.split(numels), params, strict=True)]


def reseeded(reference: Reference, seed: int) -> Reference | None:
    """The same Monte Carlo simulation with other noise (None if nothing in it is simulated)."""
    if isinstance(reference, MonteCarloReference):
        return shared(reference.with_seed(seed))
    return None


def summed_curve(reference: Reference, numels: list[int], steps: int) -> Tensor:
    """M(t) = sum_k mu_k(t) for t = 1..steps (the curve's last value holds beyond its length)."""
    curves = reference.curves(sorted(set(numels)))
    t = torch.arange(1, steps + 1)
    total = torch.zeros(steps, dtype=torch.float64)
    for n in numels:
        curve = curves[n]
        total += curve[t.clamp(max=curve.numel() - 1)]
    return total


def calibration_allowance(optimizer: torch.optim.Optimizer, numels: list[int], window: slice, steps: int) -> float:
    """Bound on the bias of mean r that the Monte Carlo reference's own sampling error can cause.

    If the reference sum M(t) is off by a relative e(t), E[r_t] = 1 + e(t), so the window's mean r
    is shifted by mean e(t). The library's curve (seed 0) and the same simulation with seed 1 have
    independent errors, so their relative difference delta = mean_t(M1/M0 - 1) has variance 2
    sigma_cal^2. We return |delta| (not |delta|/sqrt(2)): a deliberately generous single-draw
    estimate of sigma_cal. Closed-form references (plain, heavy-ball) and the heavy-ball tails of
    control-variate references are exact, which this measures as 0.
    """
    reference = reference_for(optimizer, optimizer.param_groups[0], C)
    other = reseeded(reference, seed=1)
    if other is None:
        return 0.0
    ours = summed_curve(reference, numels, steps)[window]
    theirs = summed_curve(other, numels, steps)[window]
    return abs(float((theirs / ours).mean()) - 1.0)


def batch_standard_error(window: Tensor, length: int) -> tuple[float, float]:
    """Standard error of the window's mean from the means of consecutive blocks, and their lag-1 correlation."""
    blocks = window.numel() // length
    means = window[: blocks * length].reshape(blocks, length).mean(dim=1)
    centred = means - means.mean()
    lag1 = float((centred[1:] * centred[:-1]).sum() / centred.pow(2).sum())
    return float(means.std()) / math.sqrt(blocks), lag1


def assert_unit_mean(ratios: Tensor, burn_in: int, block: int, allowance: float, label: str) -> None:
    """mean r after burn-in within K_SIGMA * sqrt(SE^2 + allowance^2) of 1, and within the absolute guard."""
    window = ratios[burn_in:]
    se, lag1 = batch_standard_error(window, block)
    blocks = window.numel() // block
    mean = float(window.mean())
    detail = f"{label}: mean r {mean:.4f}, se {se:.4f}, Monte Carlo allowance {allowance:.4f}"
    assert abs(mean - 1.0) <= K_SIGMA * math.hypot(se, allowance), detail
    assert abs(mean - 1.0) <= ABSOLUTE_GUARD, detail
    assert abs(lag1) < K_SIGMA / math.sqrt(blocks), f"{label}: blocks too short (lag-1 {lag1:.2f})"
    assert se < MAX_STANDARD_ERROR, f"{detail}: standard error too large for the guard to bind"


def run(clara: CLARA, params: list[Tensor], gradients: Iterator[list[Tensor]], steps: int) -> tuple[Tensor, Tensor]:
    """Feed ``steps`` gradients; returns r_t and log F after each step (float64 tensors)."""
    ratios, log_factors = [], []
    for _ in range(steps):
        for p, g in zip(params, next(gradients), strict=True):
            p.grad = g
        clara.optimizer.step()
        assert clara.ratio is not None
        ratios.append(clara.ratio)
        log_factors.append(clara.log_factors[0])
    return torch.tensor(ratios, dtype=torch.float64), torch.tensor(log_factors, dtype=torch.float64)


def fixed(params: list[Tensor], sign_flips: bool, seed: int = 3) -> Iterator[list[Tensor]]:
    """One random gradient (in each parameter's dtype), repeated (steps agree) or with alternating
    sign (+g, -g, ...: steps cancel)."""
    generator = torch.Generator().manual_seed(seed)
    g = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    sign = 1.0
    while True:
        yield [sign * x for x in g]
        if sign_flips:
            sign = -sign


def defer_pending_steps(monkeypatch: Any, on_wait: Callable[[], None] = lambda: None) -> None:
    """Emulate CUDA's deferred host part on the CPU: every ``PendingStep`` keeps copies of its results (and
    skip flag) behind a stand-in event whose ``synchronize`` calls ``on_wait``, so it settles only when
    CLARA settles a deferred step (the next pre-hook, or a property that waits)."""
    import dataclasses

    from lightning_clara.transfer import PendingStep

    class Ready:
        def synchronize(self) -> None:
            on_wait()

    send = PendingStep.send

    def deferred(
        step: Any,
        lr_used: Sequence[float],
        skip_flag: Tensor | None = None,
        skip_counted: bool = True,
        bases: Sequence[Any] = (),
    ) -> PendingStep:
        pending = send(step, lr_used, skip_flag, skip_counted, bases)
        flag = None if pending.skip_flag is None else pending.skip_flag.clone()
        buffers = [b.clone() for b in pending.buffers]
        return dataclasses.replace(pending, buffers=buffers, ready=Ready(), skip_flag=flag)

    monkeypatch.setattr(PendingStep, "send", deferred)
