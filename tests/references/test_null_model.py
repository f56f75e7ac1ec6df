"""ALGORITHM.md's null-model checks, driving ``CLARA`` with synthetic gradients through ``optimizer.step()``.

* i.i.d. Gaussian gradients: E[r_t] = 1 at every t, so log F has no drift;
* constant gradient: ||p||^2 -> 1, r -> sum_k 1 / sum_k mu_k (9 for plain SGD, c = 0.2): F grows;
* alternating +g / -g: ||p||^2 -> (c/(2-c))^2, r -> c/(2-c) for plain SGD: F shrinks.

Expected limits come from ALGORITHM.md's formulas and table; statistical tolerances are
standard errors estimated from the runs themselves (batch means for autocorrelated r_t,
independent seeds for the transient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import fixed, run
from torch import Tensor

from lightning_clara import CLARA

C = 0.2
D = 1e-3
PLAIN = C / (2 - C)
#: ALGORITHM.md's stationary mu for c = 0.2, beta1 = 0.9, compared at its three printed decimals.
TABLE = {1: 0.526, 10: 0.669, 1000: 0.6825}
TABLE_TOLERANCE = 5e-4
#: Gaussian checks accept K_SIGMA standard errors.
K_SIGMA = 4.0
#: Sizes for the noise checks: a scalar, a small and a mid-size tensor (small-n references matter).
NOISE_SIZES = (1, 7, 300)


OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
CONFIGS: dict[str, tuple[OptimizerFactory, bool]] = {
    # name: (optimizer factory, whether the reference is plain SGD's)
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=1e-3), True),
    "sgd_momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), False),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3), False),
    "adamw_no_decay": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0), False),
    # default weight_decay (1e-2) with a small lr: the decay term stays negligible next to the step
    "adamw_default_decay": (lambda ps: torch.optim.AdamW(ps, lr=1e-4), False),
}
NAMES = sorted(CONFIGS)


def build(name: str, sizes: tuple[int, ...], d: float = D) -> tuple[list[Tensor], CLARA]:
    """Zero float64 parameters of the given sizes, the configured optimizer, and CLARA on it."""
    params = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
    factory, _ = CONFIGS[name]
    return params, CLARA(factory(params), c=C, d=d, rule="paper")  # the drift checks use the paper rule's d (r - 1)


def gaussian(params: list[Tensor], seed: int) -> Iterator[list[Tensor]]:
    """I.i.d. standard Gaussian gradients."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]


def stationary_mu(name: str, sizes: tuple[int, ...]) -> tuple[float, float]:
    """sum_k mu_k(infinity) and its rounding tolerance, from ALGORITHM.md (closed form or table)."""
    if CONFIGS[name][1]:
        return len(sizes) * PLAIN, 0.0
    return sum(TABLE[n] for n in sizes), len(sizes) * TABLE_TOLERANCE


# -------------------------------------------------------------------------------------- pure noise


@pytest.mark.parametrize("name", NAMES)
def test_first_ratio_is_exactly_one(name: str) -> None:
    """After one step p_k = c u_k, so ||p_k||^2 = c^2 = mu_k(1) for any optimizer: r_1 = 1."""
    params, clara = build(name, NOISE_SIZES)
    ratios, _ = run(clara, params, gaussian(params, seed=0), 1)
    assert float(ratios[0]) == pytest.approx(1.0, rel=1e-6)  # rel: the reference may be simulated in fp32


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_gradients_give_unit_mean_ratio_and_no_drift(name: str) -> None:
    """Stationary regime: mean r within K standard errors of 1 (batch means), log F without drift.

    r_t is autocorrelated over ~1/c + 1/(1 - beta) steps; batches of 75 steps are much longer,
    so the batch means are nearly independent (checked) and give an honest standard error.
    """
    burn_in, batches, length = 100, 40, 75
    params, clara = build(name, NOISE_SIZES)
    ratios, log_factors = run(clara, params, gaussian(params, seed=1), burn_in + batches * length)
    window = ratios[burn_in:]
    means = window.reshape(batches, length).mean(dim=1)
    se = float(means.std()) / math.sqrt(batches)
    centred = means - means.mean()
    lag1 = float((centred[1:] * centred[:-1]).sum() / centred.pow(2).sum())
    assert abs(lag1) < K_SIGMA / math.sqrt(batches), f"batch means still correlated (lag-1 {lag1:.2f})"
    mean = float(window.mean())
    assert abs(mean - 1.0) <= K_SIGMA * se, f"mean r {mean:.4f} +- {se:.4f}"
    # log F integrates d (r - 1): its change over the window is d * N * (mean r - 1), whose spread is d * N * se
    drift = float(log_factors[-1] - log_factors[burn_in - 1])
    assert drift == pytest.approx(D * float((window - 1.0).sum()), abs=1e-12)
    assert abs(drift) <= K_SIGMA * D * window.numel() * se


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_gradients_unit_mean_ratio_in_the_transient(name: str) -> None:
    """E[r_t] = 1 also for small t, where the reference is in its transient: independent seeds, first 20 steps."""
    seeds, steps = 48, 20
    per_seed = []
    for seed in range(seeds):
        params, clara = build(name, NOISE_SIZES)
        ratios, _ = run(clara, params, gaussian(params, seed=1000 + seed), steps)
        per_seed.append(float(ratios[1:].mean()))  # r_1 is exactly 1, see above
    values = torch.tensor(per_seed, dtype=torch.float64)
    se = float(values.std()) / math.sqrt(seeds)
    assert abs(float(values.mean()) - 1.0) <= K_SIGMA * se, f"{float(values.mean()):.4f} +- {se:.4f}"


# ------------------------------------------------------------------------------ constant, alternating


@pytest.mark.parametrize("name", NAMES)
def test_constant_gradient_ratio_tends_to_inverse_mu_and_factor_grows(name: str) -> None:
    """u_t constant: ||p_k||^2 -> 1, so r -> K / sum_k mu_k (9 for plain SGD); F keeps growing."""
    sizes = tuple(sorted(TABLE))
    params, clara = build(name, sizes)
    ratios, log_factors = run(clara, params, fixed(params, sign_flips=False), 200)
    total, tolerance = stationary_mu(name, sizes)
    expected = len(sizes) / total
    bound = expected * tolerance / (total - tolerance) + 1e-9
    assert abs(float(ratios[-1]) - expected) <= bound, (float(ratios[-1]), expected)
    if CONFIGS[name][1]:
        assert float(ratios[-1]) == pytest.approx(9.0, rel=1e-9)
    assert torch.all(log_factors.diff() > 0)
    assert float(log_factors[-1]) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_alternating_gradient_ratio_tends_to_plain_walk_and_factor_shrinks(name: str) -> None:
    """u_t = +-u: ||p_k||^2 -> (c/(2-c))^2, so r -> K (c/(2-c))^2 / sum_k mu_k (c/(2-c) for plain SGD)."""
    sizes = tuple(sorted(TABLE))
    params, clara = build(name, sizes)
    ratios, log_factors = run(clara, params, fixed(params, sign_flips=True), 200)
    total, tolerance = stationary_mu(name, sizes)
    expected = len(sizes) * PLAIN**2 / total
    bound = expected * tolerance / (total - tolerance) + 1e-9
    assert abs(float(ratios[-1]) - expected) <= bound, (float(ratios[-1]), expected)
    if CONFIGS[name][1]:
        assert float(ratios[-1]) == pytest.approx(C / (2 - C), rel=1e-9)
    assert torch.all(log_factors[10:].diff() < 0)
    assert float(log_factors[-1]) < 0.0
