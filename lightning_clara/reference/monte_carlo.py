"""The Monte Carlo reference: any element-wise optimizer's own update run on i.i.d. Gaussian gradients.

With a known first-moment ``beta`` (Adam's beta1) the heavy-ball curve serves as a control variate,
which removes most of the Monte Carlo noise and gives the exact heavy-ball tail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_clara.reference.curves import HeavyBallReference, Reference, freeze

__all__ = ["MonteCarloReference", "SpeedUp", "simulation_hyperparameters"]


def simulation_hyperparameters(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's hyper-parameters made safe for a CPU null-model simulation."""
    hyper = {k: v for k, v in defaults.items() if k not in ("params", "name", "initial_lr")}
    overrides = {
        "weight_decay": 0.0,
        "maximize": False,
        "foreach": None,
        "fused": None,
        "capturable": False,
        "differentiable": False,
    }
    for key, value in overrides.items():
        if key in hyper:
            hyper[key] = value
    for key, value in list(hyper.items()):
        if isinstance(value, torch.Tensor):
            hyper[key] = value.item() if value.numel() == 1 else value.tolist()
    lr = hyper.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr == 0:
        # a warm-up from 0 when CLARA attaches: simulated at lr 0 the optimizer never moves, the curve is all
        # zeros, and (lr being no key of the reference) no step of the run would ever adapt
        hyper["lr"] = SIMULATION_LR
    return hyper


#: The lr a Monte Carlo run uses where the group's is 0 (the reference does not depend on the lr's scale).
SIMULATION_LR = 1e-3


#: Sizes the Monte Carlo simulates (log-spaced); other sizes interpolate linearly in log n.
SIZE_GRID: tuple[int, ...] = tuple(sorted({round(2 ** (k / 2)) for k in range(21)}))
#: Longest simulated horizon (slow schedules such as NAdam's momentum decay need ~25k steps).
MAX_SIMULATED_HORIZON = 32768
#: A simulated horizon covers at least this many path memories (1/c): (1-c)^(2t) is below 1e-5 by then.
PATH_SETTLES = 6.0
#: Steps before which a Monte Carlo curve is used raw; later it is smoothed over +-t/16 steps.
_RAW_STEPS = 64


def _grid_neighbours(n: int) -> tuple[int, int]:
    """The grid sizes just below and above n (equal when n is on the grid; sizes beyond share the last)."""
    n = min(n, SIZE_GRID[-1])
    upper = next(g for g in SIZE_GRID if g >= n)
    lower = max(g for g in SIZE_GRID if g <= n)
    return lower, upper


def _smooth(curve: torch.Tensor) -> torch.Tensor:
    """Average each t >= _RAW_STEPS over [t - t/16, t + t/16]: the noise shrinks, slow trends stay."""
    horizon = curve.numel() - 1
    if horizon <= _RAW_STEPS:
        return curve
    cumulative = torch.cat([torch.zeros(1, dtype=curve.dtype), curve.cumsum(0)])
    t = torch.arange(_RAW_STEPS, horizon + 1)
    half = t // 16
    low = (t - half).clamp(min=0)
    high = (t + half).clamp(max=horizon)
    out = curve.clone()
    out[_RAW_STEPS:] = (cumulative[high + 1] - cumulative[low]) / (high - low + 1)
    return out


@dataclass(frozen=True)
class SpeedUp:
    """Run a slow schedule faster after ``at_step`` simulated steps: ``apply(optimizer, factor)``
    makes one simulated step stand for ``factor`` real ones (NAdam: scale ``momentum_decay`` and
    rescale the step counters). The optimizer's statistics are warm by then, so the sped-up
    run sees the slowly varying states of a real run in ``factor`` times fewer steps."""

    at_step: int
    factor: int
    apply: Callable[[Optimizer, int], None]
    name: str


class MonteCarloReference(Reference):
    """Any element-wise optimizer: run its own update rule on i.i.d. Gaussian gradients.

    All sizes of :data:`SIZE_GRID` that are needed run in one flat parameter (the update is
    element-wise, so every block of n entries is an independent trial); the step is the
    parameter's change, as CLARA's sampled step sees it, with weight decay turned off (the
    null model has no loss). Sizes between grid points interpolate in log n. After :data:`_RAW_STEPS` steps
    the curve is smoothed over a window proportional to t, and the stationary value is the
    mean of the last quarter of the horizon. Seeded, hence deterministic.

    Args:
        c: path memory.
        optimizer_class: the optimizer to simulate.
        hyperparameters: one param group's settings (lr and weight decay are irrelevant).
        control_beta: momentum of the heavy-ball process the optimizer reduces to for large t
            (Adam's beta1). When given, the exact heavy-ball curve of each size serves as a
            control variate and as the tail beyond the simulated horizon.
        horizon: simulated steps (default ``max(64, 6 / (1 - control_beta))`` or 128).
        budget: simulated element-steps (trials x n x steps) per grid size; caps the cost.
        seed: seed of the Gaussian gradients.
    """

    def __init__(
        self,
        c: float,
        optimizer_class: type[Optimizer],
        hyperparameters: Mapping[str, Any],
        *,
        control_beta: float | None = None,
        horizon: int | None = None,
        budget: int = 1 << 19,
        min_trials: int = 16,
        seed: int = 0,
        speed_up: SpeedUp | None = None,
    ) -> None:
        super().__init__(c)
        self.optimizer_class = optimizer_class
        self.hyperparameters = simulation_hyperparameters(hyperparameters)
        self.control_beta = control_beta
        if horizon is None:
            horizon = 128 if control_beta is None else max(64, math.ceil(6.0 / (1.0 - control_beta)))
        if control_beta is None:
            # the path itself settles over ~1/c updates: a horizon shorter than PATH_SETTLES / c ends
            # inside its transient, and the tail taken as stationary is low (r +1.3 % at c = 0.02, 128
            # steps). With a control variate the exact heavy-ball curve carries the path's transient.
            horizon = max(horizon, math.ceil(PATH_SETTLES / c))
        self.horizon = int(min(max(horizon, 8), MAX_SIMULATED_HORIZON))
        self.budget = int(budget)
        self.min_trials = int(min_trials)
        self.seed = int(seed)
        self._control = None if control_beta is None else HeavyBallReference(c, control_beta)
        if speed_up is not None and not 0 < speed_up.at_step < self.horizon:
            raise ValueError("speed_up.at_step must lie inside the horizon")
        self.speed_up = speed_up

    def with_seed(self, seed: int) -> MonteCarloReference:
        """The same simulation with other noise (to measure the Monte Carlo error)."""
        return MonteCarloReference(
            self.c,
            self.optimizer_class,
            self.hyperparameters,
            control_beta=self.control_beta,
            horizon=self.horizon,
            budget=self.budget,
            min_trials=self.min_trials,
            seed=seed,
            speed_up=self.speed_up,
        )

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            "monte_carlo",
            None if self.speed_up is None else (self.speed_up.name, self.speed_up.at_step, self.speed_up.factor),
            self.c,
            # the class itself, not its name: one redefined in a notebook, or made by a factory, is another optimizer
            self.optimizer_class,
            freeze(self.hyperparameters),
            self.control_beta,
            self.horizon,
            self.budget,
            self.min_trials,
            self.seed,
        )

    def _compute(self, sizes: list[int]) -> dict[int, torch.Tensor]:
        grid = sorted({g for n in sizes for g in _grid_neighbours(n)})
        simulated = self._simulate_grid(grid)
        out = {}
        for n in sizes:
            lower, upper = _grid_neighbours(n)
            if lower == upper:
                difference = simulated[lower]
            else:
                weight = (math.log(min(n, SIZE_GRID[-1])) - math.log(lower)) / (math.log(upper) - math.log(lower))
                difference = (1 - weight) * simulated[lower] + weight * simulated[upper]
            if self._control is None:
                tail = difference[-max(1, difference.numel() // 4) :].mean()
                out[n] = torch.cat([difference, tail.reshape(1)])
                continue
            exact = self._control.curve(n)
            length = max(exact.numel(), self.horizon + 1)
            curve = torch.cat([exact, exact[-1].expand(length - exact.numel())])
            curve[: self.horizon + 1] += difference
            out[n] = curve
        return out

    def _simulate_grid(self, grid: list[int]) -> dict[int, torch.Tensor]:
        """Per grid size: the smoothed mean ||p_t||^2 (or its difference to heavy-ball on the same noise)."""
        elements_per_step = max(self.budget // self.horizon, 1)
        trials = {n: max(self.min_trials, elements_per_step // n) for n in grid}
        with _simulation_settings():
            curves = _simulate(
                self.optimizer_class,
                self.hyperparameters,
                trials,
                c=self.c,
                horizon=self.horizon,
                seed=self.seed,
                control_beta=self.control_beta,
                speed_up=self.speed_up,
            )
        if self.speed_up is None:
            return {n: _smooth(curve) for n, curve in curves.items()}
        # simulated step i > at_step stands for real step at_step + factor * (i - at_step); map to
        # real steps first and smooth there, so that no window mixes the two time scales
        at, factor = self.speed_up.at_step, self.speed_up.factor
        real = torch.arange(at + factor * (self.horizon - at) + 1, dtype=torch.float64)
        position = torch.where(real <= at, real, at + (real - at) / factor)
        below = position.floor().long()
        above = (below + 1).clamp(max=self.horizon)
        weight = position - below
        return {n: _smooth((1 - weight) * curve[below] + weight * curve[above]) for n, curve in curves.items()}


@contextmanager
def _simulation_settings() -> Iterator[None]:
    """Tiny tensors: thread start-up costs more than it saves, badly so under load. And fp32 whatever the
    default dtype: torch's optimizers keep their step counters in it, and the curve is cached process-wide
    (simulated under a float64 default it would differ from the other ranks')."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    if dtype != torch.float32:  # process-wide: switched only where it differs, for the simulation's seconds
        torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if dtype != torch.float32:
            torch.set_default_dtype(dtype)


def _simulate(
    optimizer_class: type[Optimizer],
    hyperparameters: Mapping[str, Any],
    trials: Mapping[int, int],
    *,
    c: float,
    horizon: int,
    seed: int,
    control_beta: float | None,
    speed_up: SpeedUp | None = None,
) -> dict[int, torch.Tensor]:
    """Mean ||p_t||^2 for t = 0..horizon per size (minus heavy-ball's on the same noise if asked), from one flat
    parameter holding every trial of every size (one set of kernels per step; a ``(trials, n)`` view per size).
    The step is the fp32 parameter's change: its walk stays near zero, so it keeps >= 5 significant digits."""
    sizes = list(trials)
    # one generator per size, so that a size's curve does not depend on which other sizes were asked for
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + n) for n in sizes]
    lengths = [trials[n] * n for n in sizes]
    total = sum(lengths)
    param = torch.zeros(total, requires_grad=True)
    optimizer = optimizer_class([param], **hyperparameters)
    a = 1.0 - c
    path = torch.zeros(total)
    control_path = torch.zeros(total)
    momentum = torch.zeros(total)
    means = torch.zeros(horizon + 1, len(sizes), dtype=torch.float64)

    def update(path: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One path update per trial; returns the mean ||p||^2 per size."""
        out = torch.empty(len(sizes), dtype=torch.float64)
        for i, (p, s) in enumerate(zip(torch.split(path, lengths), torch.split(step, lengths), strict=True)):
            n = sizes[i]
            p2, s2 = p.view(-1, n), s.view(-1, n)
            norms = torch.linalg.vector_norm(s2, dim=1, keepdim=True)
            moved = norms > 0
            scale = torch.where(moved, c / torch.where(moved, norms, 1.0), 0.0)
            p2.mul_(torch.where(moved, a, 1.0)).add_(s2 * scale)
            out[i] = p2.pow(2).sum(dtype=torch.float64) / trials[n]
        return out

    train = getattr(optimizer, "train", None)
    if callable(train):
        train()  # schedule-free optimizers step only in train mode
    before = torch.zeros(total)
    for t in range(1, horizon + 1):
        gradient = torch.cat([torch.randn(length, generator=g) for g, length in zip(generators, lengths, strict=True)])
        param.grad = gradient
        optimizer.step()
        # the realised step, as CLARA reads it: optimizers whose update reads the parameters
        # (schedule-free's interpolation, Lookahead's pull-back) are simulated as they run
        after = param.detach().clone()
        means[t] = update(path, after - before)
        before = after
        if control_beta is not None:
            momentum.mul_(control_beta).add_(gradient)
            means[t] -= update(control_path, momentum)
        if speed_up is not None and t == speed_up.at_step:
            speed_up.apply(optimizer, speed_up.factor)
    return {n: means[:, i].clone() for i, n in enumerate(sizes)}
