"""ALGORITHM.md's null-model checks for every optimizer CLARA supports, driven through ``optimizer.step()``.

* i.i.d. N(0, 1) gradients: E[r_t] = 1, checked on the mean of r after a burn-in. Its standard
  error is derived from the run itself (batch means over blocks far longer than r's
  autocorrelation), plus, where the reference is a Monte Carlo simulation, an allowance for
  that simulation's own sampling error, measured by recomputing the reference with another
  seed (:func:`calibration_allowance`). An absolute guard (3 %) keeps a noisy run from passing.
* constant gradient: F grows; alternating gradient: F shrinks (short runs, every optimizer).
* foreach / fused implementations: the same null-model run gives the same r sequence as the
  default implementation (so they pass exactly when it does, without paying twice for statistics).
* unsupported optimizers and objects are refused with a ``TypeError`` that says why.
* NAdam over 6000 steps, where its reference comes from the simulation with the momentum ramp sped up,
  and early in the ramp (steps 130-300), where a stitched reference once jumped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    ABSOLUTE_GUARD,
    BASE_SHAPES,
    K_SIGMA,
    NOISE_SHAPES,
    assert_unit_mean,
    calibration_allowance,
    fixed,
    make_params,
    run,
)
from helpers import gaussian_split as gaussian
from torch import Tensor

from lightning_clara import CLARA

C = 0.2
D = 1e-3
#: The torch optimizers CLARA documents as supported (written out here, not read from the package).
SUPPORTED = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta", "ASGD")


class SignMomentum(torch.optim.Optimizer):
    """A user-defined, element-wise optimizer the library has never seen: ``m = beta m + g; p -= lr sign(m)``."""

    def __init__(self, params: Any, lr: float = 1e-3, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                momentum = state["momentum"]
                momentum.mul_(group["beta"]).add_(p.grad)
                p.add_(torch.sign(momentum), alpha=-group["lr"])
        return None


OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

#: Every distinct update rule (and hyper-parameter that changes the reference or the reader). Learning
#: rates are small enough that weight decay stays a negligible part of the step (the null model has none).
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "sgd_momentum_weight_decay": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-2),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, dampening=0.5),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-3),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-3),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "rmsprop_momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=1e-2),
    "sign_momentum": lambda ps: SignMomentum(ps, lr=1e-3, beta=0.9),
}

#: foreach / fused implementations (those torch runs on CPU), each with the default one it must equal.
IMPLEMENTATIONS: dict[str, tuple[str, OptimizerFactory]] = {
    "sgd_foreach": ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2, foreach=True)),
    "sgd_fused": ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2, fused=True)),
    "sgd_momentum_foreach": ("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
    "sgd_momentum_fused": ("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
    "sgd_nesterov_fused": (
        "sgd_nesterov",
        lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True, fused=True),
    ),
    "adam_foreach": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    "adam_fused": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "adam_amsgrad_fused": ("adam_amsgrad", lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True, fused=True)),
    "adamw_foreach": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "adamw_fused": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    "nadam_foreach": ("nadam", lambda ps: torch.optim.NAdam(ps, lr=1e-3, foreach=True)),
    "radam_foreach": ("radam", lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True)),
    "adamax_foreach": ("adamax", lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=True)),
    "rmsprop_momentum_foreach": (
        "rmsprop_momentum",
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, foreach=True),
    ),
    "adagrad_foreach": ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True)),
    "adagrad_fused": ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)),
    "adadelta_foreach": ("adadelta", lambda ps: torch.optim.Adadelta(ps, foreach=True)),
    "asgd_foreach": ("asgd", lambda ps: torch.optim.ASGD(ps, lr=1e-2, foreach=True)),
}

ALL_FACTORIES: dict[str, OptimizerFactory] = {**OPTIMIZERS, **{k: f for k, (_, f) in IMPLEMENTATIONS.items()}}


# ----------------------------------------------------------------------------------------- helpers


# ------------------------------------------------------------------------------------ pure noise


#: Optimizers without (or, NAdam early on, with weak) momentum: the scalar tensor's ||p||^2 weighs as much
#: as a matrix's but is far noisier, so r is about twice as noisy (measured); they get 30 blocks, the others 20.
NOISY = frozenset({"sgd", "rmsprop", "rmsprop_centered", "adagrad", "adadelta", "asgd", "nadam"})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gaussian_gradients_give_unit_mean_ratio(name: str) -> None:
    """E[r] = 1 for every update rule: 100 burn-in steps, then blocks of 100 steps (r decorrelates in ~20)."""
    burn_in, block = 100, 100
    blocks = 30 if name in NOISY else 20
    steps = burn_in + blocks * block
    params = make_params(NOISE_SHAPES)
    clara = CLARA(OPTIMIZERS[name](params), c=C, d=D, rule="paper")
    seed = 1000 + sorted(OPTIMIZERS).index(name)  # independent noise per optimizer
    ratios, log_factors = run(clara, params, gaussian(params, seed=seed), steps)
    assert float(ratios[0]) == pytest.approx(1.0, rel=1e-6)  # p = c u after one step: ||p||^2 = c^2 = mu(1)
    allowance = calibration_allowance(clara.optimizer, [p.numel() for p in params], slice(burn_in, None), steps)
    assert_unit_mean(ratios, burn_in, block, allowance, name)
    # log F integrates d (r - 1) exactly: no drift beyond what the ratios say
    assert float(log_factors[-1]) == pytest.approx(D * float((ratios - 1.0).sum()), abs=1e-10)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_foreach_and_fused_give_the_same_null_model_run(name: str) -> None:
    """The same Gaussian gradients give the same r sequence as the default implementation (which passes above).

    fused variants are read by parameter delta (state lives in fused kernels), the default one
    possibly from state: this also checks that both readers see the same steps.
    """
    default_name, factory = IMPLEMENTATIONS[name]
    runs = []
    for make in (OPTIMIZERS[default_name], factory):
        params = make_params(BASE_SHAPES)
        clara = CLARA(make(params), c=C, d=0.05)  # a moving F checks the lr handling of each kernel too
        runs.append(run(clara, params, gaussian(params, seed=5), 200))
    (ratios, log_factors), (variant_ratios, variant_log_factors) = runs
    torch.testing.assert_close(variant_ratios, ratios, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(variant_log_factors, log_factors, rtol=1e-9, atol=1e-12)
    assert float(log_factors.abs().max()) > 1e-3  # F actually moved


NADAM_LONG_STEPS = 6000
#: Windows of the long NAdam run: every 1000 steps, and 3000-6000 (mid-ramp, far beyond the first steps).
NADAM_WINDOWS = ((100, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 5000), (5000, 6000), (3000, 6000))


@pytest.fixture(scope="module")
def nadam_long_run() -> tuple[Tensor, CLARA, list[int]]:
    """One 6000-step NAdam run on Gaussian gradients (two tensors, 300 and 20x30 entries), shared by the windows."""
    params = make_params(((300,), (20, 30)))
    clara = CLARA(torch.optim.NAdam(params, lr=1e-3), c=C, d=D)
    ratios, _ = run(clara, params, gaussian(params, seed=23), NADAM_LONG_STEPS)
    return ratios, clara, [p.numel() for p in params]


@pytest.mark.parametrize("window", NADAM_WINDOWS, ids=[f"{a}-{b}" for a, b in NADAM_WINDOWS])
def test_nadam_long_run_has_unit_mean_ratio_in_every_window(
    window: tuple[int, int], nadam_long_run: tuple[Tensor, CLARA, list[int]]
) -> None:
    """NAdam's momentum ramps over ~25k steps, so its reference is not simulated step by step all the way
    (the library speeds the ramp up at some point). E[r_t] = 1 must hold at every t all the same: the mean r
    of each 1000-step window (10 blocks of 100) and of steps 3000-6000 (30 blocks) is 1."""
    start, stop = window
    ratios, clara, numels = nadam_long_run
    allowance = calibration_allowance(clara.optimizer, numels, slice(start, stop), NADAM_LONG_STEPS)
    assert_unit_mean(ratios[:stop], start, 100, allowance, f"nadam steps {start}-{stop}")


def test_nadam_reference_is_unbiased_early_in_the_ramp() -> None:
    """E[r_t] = 1 early in NAdam's ramp, where the reference is simulated step by step:
    steps 130-300, 8 independent seeds, standard error from their spread."""
    steps, window = 300, slice(130, 300)
    shapes = ((300,), (20, 30))
    means = []
    for seed in range(8):
        params = make_params(shapes)
        clara = CLARA(torch.optim.NAdam(params, lr=1e-3), c=C, d=D)
        ratios, _ = run(clara, params, gaussian(params, seed=500 + seed), steps)
        means.append(float(ratios[window].mean()))
    allowance = calibration_allowance(clara.optimizer, [p.numel() for p in params], window, steps)
    values = torch.tensor(means, dtype=torch.float64)
    se = float(values.std()) / math.sqrt(values.numel())
    mean = float(values.mean())
    assert abs(mean - 1.0) <= K_SIGMA * math.hypot(se, allowance), f"mean r {mean:.4f}, se {se:.4f}, {allowance=:.4f}"
    assert abs(mean - 1.0) <= ABSOLUTE_GUARD, f"mean r {mean:.4f} over steps 130-300"


# ------------------------------------------------------------------------------ constant, alternating


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_constant_gradient_grows_and_alternating_gradient_shrinks_the_factor(name: str) -> None:
    """Constant g: steps agree, r > 1 and F grows at every step from the second on (r_1 = 1 exactly).

    +g/-g: steps cancel, r < 1 and F shrinks at every step once the optimizer's own transient is over
    (a dampened or RMS-normalised momentum buffer keeps the first sign for ~15 steps; we allow 30).
    """
    d = 1e-2
    params = make_params(BASE_SHAPES)
    clara = CLARA(ALL_FACTORIES[name](params), c=C, d=d, rule="paper")
    ratios, log_factors = run(clara, params, fixed(params, sign_flips=False), 100)
    assert torch.all(log_factors[1:].diff() > 0), name
    assert torch.all(ratios[1:] > 1.0), name
    assert float(log_factors[-1]) > 0.3, name

    params = make_params(BASE_SHAPES)
    clara = CLARA(ALL_FACTORIES[name](params), c=C, d=d, rule="paper")
    ratios, log_factors = run(clara, params, fixed(params, sign_flips=True), 100)
    assert torch.all(log_factors[30:].diff() < 0), name
    assert torch.all(ratios[30:] < 0.5), name
    assert float(log_factors[-1]) < -0.3, name


# ------------------------------------------------------------------------------------ unsupported


def _unsupported() -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """Constructors of the torch optimizers CLARA must refuse (those this torch has)."""
    matrix = [torch.zeros(4, 4, requires_grad=True)]
    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "LBFGS": lambda: torch.optim.LBFGS(matrix),
        "SparseAdam": lambda: torch.optim.SparseAdam(matrix),
        "Rprop": lambda: torch.optim.Rprop(matrix),
    }
    if hasattr(torch.optim, "Adafactor"):
        makers["Adafactor"] = lambda: torch.optim.Adafactor(matrix)
    if hasattr(torch.optim, "Muon"):
        makers["Muon"] = lambda: torch.optim.Muon(matrix)
    return makers


#: Per unsupported optimizer, a word its reason must contain (what makes CLARA inapplicable).
REASONS = {
    "LBFGS": r"closure|line search",
    "SparseAdam": r"sparse",
    "Rprop": r"learning rate|step size",
    "Adafactor": r"element-wise|factored",
    "Muon": r"element-wise|orthogonal",
}


@pytest.mark.parametrize("name", sorted(_unsupported()))
def test_unsupported_optimizer_raises_type_error_saying_why(name: str) -> None:
    """TypeError naming the optimizer, the reason, and every supported optimizer; nothing stays hooked."""
    optimizer = _unsupported()[name]()
    with pytest.raises(TypeError) as excinfo:
        CLARA(optimizer)
    message = str(excinfo.value)
    assert re.search(rf"\b{name}\b", message), message
    assert re.search(REASONS[name], message, flags=re.IGNORECASE), message
    for supported in SUPPORTED:
        assert re.search(rf"\b{supported}\b", message), f"{supported} missing from: {message}"
    assert getattr(optimizer, "_clara_controller", None) is None


def test_unsupported_optimizers_include_those_this_torch_has() -> None:
    """Muon and Adafactor exist in this torch: the list above must cover them (else they would go untested)."""
    names = set(_unsupported())
    assert {"LBFGS", "SparseAdam", "Rprop"} <= names
    for optional in ("Adafactor", "Muon"):
        assert (optional in names) == hasattr(torch.optim, optional)


@pytest.mark.parametrize("thing", [object(), "SGD", torch.zeros(3)], ids=["object", "str", "tensor"])
def test_non_optimizer_raises_type_error(thing: Any) -> None:
    """Anything that is not a torch Optimizer is refused with a TypeError that says what was expected."""
    with pytest.raises(TypeError, match=r"Optimizer"):
        CLARA(thing)


def test_subclass_of_unsupported_optimizer_is_refused() -> None:
    """A user subclass of LBFGS still runs LBFGS's line search: refused too."""

    class MyLBFGS(torch.optim.LBFGS):
        pass

    with pytest.raises(TypeError, match=r"LBFGS"):
        CLARA(MyLBFGS([torch.zeros(2, requires_grad=True)]))


def test_optimizer_without_base_init_is_refused() -> None:
    """An Optimizer subclass that skips ``Optimizer.__init__`` has no step hooks: CLARA could never run."""

    class NoBaseInit(torch.optim.Optimizer):
        def __init__(self, params: list[Tensor]) -> None:  # deliberately no super().__init__
            self.defaults = {"lr": 0.1}
            self.param_groups = [{"params": list(params), "lr": 0.1}]
            self.state = {}

        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            """Plain SGD."""
            with torch.no_grad():
                for p in self.param_groups[0]["params"]:
                    p.sub_(0.1 * p.grad)

    with pytest.raises(TypeError, match=r"__init__"):
        CLARA(NoBaseInit([torch.zeros(2, requires_grad=True)]))
