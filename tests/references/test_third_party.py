"""Optimizers users bring from other libraries: calibrated once, unbiased on noise, or refused with the reason.

* pytorch-optimizer keeps an integer ``group["step"]`` (and Prodigy ``d``) that its own step changes:
  the reference key must ignore it (0.1.0 ran a new Monte Carlo per step: Lion 0.27 -> 79 ms per step).
* The null model per accepted optimizer (E[r] = 1 on i.i.d. Gaussian gradients), with the harness of
  ``test_optimizers``; 0.1.0 was biased for Lion and Adan (a horizon cut inside the momentum transient).
* Optimizers CLARA cannot steer are refused at attach, by name or by probing their own update.

Each test fails on 0.1.0 (issue 12, points 6-9).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer as po
import schedulefree
import torch
from helpers import NOISE_SHAPES, C, assert_unit_mean, calibration_allowance, make_params
from helpers import NULL_D as D
from helpers import gaussian_split as gaussian
from torch import Tensor, nn

from lightning_clara import CLARA
from lightning_clara.admission import ProbeError
from lightning_clara.reference import curves as curves_module
from lightning_clara.reference import monte_carlo as monte_carlo_module

Factory = Callable[[list[Tensor]], torch.optim.Optimizer]

#: The element-wise optimizers of pytorch-optimizer that users pick most, and a wrapper.
ACCEPTED: dict[str, Factory] = {
    "Lion": lambda ps: po.Lion(ps, lr=1e-4),
    "Adan": lambda ps: po.Adan(ps, lr=1e-3),
    "AdaBelief": lambda ps: po.AdaBelief(ps, lr=1e-3),
    "ADOPT": lambda ps: po.ADOPT(ps, lr=1e-3),
    "Lamb": lambda ps: po.Lamb(ps, lr=1e-3),
    "LaProp": lambda ps: po.LaProp(ps, lr=1e-3),
    "AdEMAMix": lambda ps: po.AdEMAMix(ps, lr=1e-3),
    "Yogi": lambda ps: po.Yogi(ps, lr=1e-3),
    "Tiger": lambda ps: po.Tiger(ps, lr=1e-3, weight_decay=0.0),
    "SignSGD": lambda ps: po.SignSGD(ps, lr=1e-3),
    "Lookahead(Adam)": lambda ps: po.Lookahead(torch.optim.Adam(ps, lr=1e-3)),
}


def count_calibrations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every Monte Carlo calibration (the expensive part of a reference) from now on."""
    calls: list[str] = []
    simulate = monte_carlo_module._simulate

    def recording(optimizer_class: type, *args: Any, **kwargs: Any) -> Any:
        calls.append(optimizer_class.__name__)
        return simulate(optimizer_class, *args, **kwargs)

    monkeypatch.setattr(monte_carlo_module, "_simulate", recording)
    return calls


@pytest.mark.parametrize("name", ["Lion", "Adan", "AdaBelief", "ADOPT", "Lamb", "Prodigy"])
def test_a_step_counter_in_the_group_does_not_recalibrate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytorch-optimizer's step counter (and Prodigy's d) change inside step(): not a key of the reference."""
    calls = count_calibrations(monkeypatch)
    monkeypatch.setattr(curves_module, "_SHARED", OrderedDict())  # a fresh cache, this test only
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    factory = {**ACCEPTED, "Prodigy": lambda ps: po.Prodigy(ps, lr=1.0)}[name]
    optimizer = factory(list(model.parameters()))
    CLARA(optimizer)
    assert len(calls) >= 1
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    counts = []
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        counts.append(len(calls))
    # the first steps reveal the keys the optimizer changes itself (one recalibration each, at most
    # three); then none: 0.1.0 calibrated again at every step
    assert counts[-1] - counts[0] <= 3, calls
    assert counts[-1] == counts[19], calls


def test_the_process_wide_reference_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curves_module, "_SHARED", OrderedDict())
    for k in range(curves_module.SHARED_CAPACITY + 50):
        curves_module.shared(curves_module.PlainReference(0.5 + k * 1e-4))
    assert len(curves_module._SHARED) == curves_module.SHARED_CAPACITY


def test_a_scheduler_moving_a_hyper_parameter_between_steps_still_recalibrates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the key fix: a key changed outside step() (a scheduler) is followed."""
    calls = count_calibrations(monkeypatch)
    monkeypatch.setattr(curves_module, "_SHARED", OrderedDict())  # a fresh cache, this test only
    params = make_params(((5,),))
    optimizer = po.Lion(params, lr=1e-4, betas=(0.9, 0.99))
    CLARA(optimizer)
    for t in range(12):
        params[0].grad = torch.randn(5, dtype=torch.float64)
        optimizer.step()
        if t == 5:
            optimizer.param_groups[0]["betas"] = (0.8, 0.99)
    assert calls.count("Lion") == 2


#: Sign-based updates give a scalar tensor a step of +-lr: its unit step is +-1 whatever the momentum,
#: so its path is as noisy as plain SGD's while r stays correlated. They are checked on the vectors
#: and matrices of the harness (a scalar's reference is plain SGD's closed form anyway).
SIGN_BASED = frozenset({"Lion", "Tiger", "SignSGD"})


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_gaussian_gradients_give_unit_mean_ratio(name: str) -> None:
    """E[r] = 1 for each accepted third-party optimizer (the harness and tolerances of test_optimizers)."""
    burn_in, block, blocks = 100, 100, 20
    steps = burn_in + blocks * block
    shapes = tuple(shape for shape in NOISE_SHAPES if shape != (1,)) if name in SIGN_BASED else NOISE_SHAPES
    params = make_params(shapes)
    optimizer = ACCEPTED[name](params)
    clara = CLARA(optimizer, c=C, d=D, rule="paper")
    seed = 2000 + sorted(ACCEPTED).index(name)
    gradients = gaussian(params, seed=seed)
    ratios = []
    for _ in range(steps):
        for p, g in zip(params, next(gradients), strict=True):
            p.grad = g
        optimizer.step()
        ratios.append(clara.ratio)
    assert all(r is not None for r in ratios[burn_in:])  # ADOPT's first step does not move
    ratios = torch.tensor(ratios[burn_in - 1 :], dtype=torch.float64)
    burn_in = 1
    allowance = calibration_allowance(clara.optimizer, [p.numel() for p in params], slice(burn_in, None), steps)
    assert_unit_mean(ratios, burn_in, block, allowance, name)


def test_lookahead_is_steered_through_the_optimizer_it_wraps() -> None:
    """The lr CLARA sets is the inner optimizer's; Lookahead's pull-back stays outside the path."""
    params = make_params(((6,),))
    inner = torch.optim.Adam(params, lr=1e-2)
    clara = CLARA(po.Lookahead(inner, k=3), c=0.2, d=0.5, fast_start=0, initial_factor=1.0)
    assert clara.optimizer is inner
    for _ in range(9):
        params[0].grad = torch.ones(6, dtype=torch.float64)  # steps agree: F rises
        clara.optimizer.step()
    assert clara.lr_used[0] > 1e-2


# ------------------------------------------------------------------------------------------ refused
def matrix() -> list[Tensor]:
    return [nn.Parameter(torch.randn(4, 4))]


REFUSED: dict[str, tuple[Callable[[], torch.optim.Optimizer], str]] = {
    # name: (constructor, a phrase the reason must contain)
    "AdaFactor relative step": (lambda: po.AdaFactor(matrix()), "does not scale with the learning rate"),
    "AdaFactor with an lr": (lambda: po.AdaFactor(matrix(), lr=1e-3, relative_step=False), "not element-wise"),
    "Muon": (lambda: po.Muon([{"params": matrix(), "use_muon": True}]), "element-wise|orthogonal"),
    "SophiaH": (lambda: po.SophiaH(matrix()), "Hessian"),
    "AdamP": (lambda: po.AdamP(matrix()), "not element-wise"),
    "MADGRAD": (lambda: po.MADGRAD(matrix()), "does not scale with the learning rate"),
    "ScheduleFreeAdamW (pytorch-optimizer)": (lambda: po.ScheduleFreeAdamW(matrix()), "not stationary"),
    "AdamWScheduleFree (schedulefree)": (lambda: schedulefree.AdamWScheduleFree(matrix()), "not stationary"),
    "SGDScheduleFree (schedulefree)": (lambda: schedulefree.SGDScheduleFree(matrix()), "not stationary"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_optimizers_clara_cannot_steer_are_refused_at_attach_with_the_reason(name: str) -> None:
    make, reason = REFUSED[name]
    optimizer = make()
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # schedule-free: refused even in train mode, for its own reason
    with pytest.raises(TypeError, match=reason):
        CLARA(optimizer)


def test_transformers_adafactor_without_lr_is_refused_not_crashed() -> None:
    transformers = pytest.importorskip("transformers")
    optimizer = transformers.Adafactor(matrix(), lr=None)
    with pytest.raises(TypeError, match="Adafactor"):
        CLARA(optimizer)


class GradientStep(torch.optim.Optimizer):
    """A user optimizer ``p -= lr * update(grad)``; subclasses choose the update."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    def update(self, grad: Tensor, lr: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(self.update(p.grad, group["lr"]))


class LrFree(GradientStep):
    """Ignores the lr: a sign step of fixed size."""

    def update(self, grad: Tensor, lr: float) -> Tensor:
        return 1e-3 * torch.sign(grad)


class RowNormalised(GradientStep):
    """Normalises each row of a matrix's gradient: not element-wise."""

    def update(self, grad: Tensor, lr: float) -> Tensor:
        return lr * (grad if grad.dim() < 2 else grad / grad.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize(
    ("optimizer_class", "reason"),
    [(LrFree, "does not scale with the learning rate"), (RowNormalised, "not element-wise")],
)
def test_a_user_optimizer_is_probed_too(optimizer_class: type, reason: str) -> None:
    with pytest.raises(ProbeError, match=reason):
        CLARA(optimizer_class(matrix()))


# ---------------------------------------------------------------------------------- reference horizon
def test_the_monte_carlo_horizon_covers_the_paths_own_transient() -> None:
    """At c = 0.02 the path settles over ~300 updates: 0.1.0's 128-step horizon took a tail still 1.3 %
    low for the stationary value (r biased up). Independent steps have the closed form c / (2 - c)."""
    from lightning_clara.reference import MonteCarloReference, PlainReference

    c = 0.02
    simulated = MonteCarloReference(c, torch.optim.SGD, {"lr": 1.0}, budget=1 << 22)
    exact = PlainReference(c).stationary(300)
    assert simulated.stationary(300) == pytest.approx(exact, rel=4e-3)


@pytest.mark.parametrize(
    ("group", "beta"),
    [
        ({"betas": (0.9, 0.999)}, 0.9),  # Adam-like: 0.999 is a second moment
        ({"betas": (0.9, 0.99)}, 0.99),  # Lion: its momentum is the second beta
        ({"betas": (0.98, 0.92, 0.99)}, 0.99),  # Adan
        ({"betas": (0.9, 0.9999)}, 0.9),  # ADOPT
        ({"momentum": 0.9}, 0.9),
        ({"beta": 0.965}, 0.965),  # Tiger
        ({}, 0.0),
    ],
)
def test_the_simulated_momentum_is_the_slowest_first_moment_beta(group: dict[str, Any], beta: float) -> None:
    from lightning_clara.reference.families import _momentum_beta

    assert _momentum_beta(group) == beta


class PlainWithDictSetting(GradientStep):
    """An element-wise optimizer with an unhashable setting: probed (not cached), then accepted."""

    def __init__(self, params: Any, lr: float = 1e-3, options: dict[str, float] | None = None) -> None:
        torch.optim.Optimizer.__init__(self, params, {"lr": lr, "options": options or {"scale": 1.0}})

    def update(self, grad: Tensor, lr: float) -> Tensor:
        return lr * grad


def test_an_unhashable_setting_is_probed_without_a_cache() -> None:
    clara = CLARA(PlainWithDictSetting(matrix()))
    assert clara.optimizer.param_groups[0]["options"] == {"scale": 1.0}


@pytest.mark.parametrize("optimizer_class", [torch.optim.RAdam, torch.optim.Adamax])
def test_a_warm_up_from_lr_zero_still_gets_a_reference(optimizer_class: type[torch.optim.Optimizer]) -> None:
    """A scheduler that starts at lr 0 when CLARA attaches: simulated at lr 0 the reference was all zeros, and no
    step of the run ever adapted (F stayed at initial_factor, silently)."""
    model = nn.Linear(8, 1)
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 10))
    assert optimizer.param_groups[0]["lr"] == 0.0
    clara = CLARA(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        scheduler.step()
    assert clara.num_adapted_steps == 19  # every step but the first, taken at lr 0 (nothing moved)
    assert clara.ratio is not None


def test_two_classes_of_one_name_get_their_own_simulated_reference() -> None:
    """The process-wide cache keyed a simulated reference by the class's name: a class redefined in a notebook,
    or made by a factory, got the first one's curves (heavy ball 0.9 read plain SGD's 0.111, against 0.68)."""

    def make(beta: float) -> type[torch.optim.Optimizer]:
        class HeavyBall(torch.optim.Optimizer):
            def __init__(self, params: Any, lr: float = 0.1) -> None:
                super().__init__(params, {"lr": lr})

            @torch.no_grad()
            def step(self, closure: Any = None) -> None:
                for group in self.param_groups:
                    for p in group["params"]:
                        buffer = self.state[p].setdefault("buffer", torch.zeros_like(p))
                        p.add_(buffer.mul_(beta).add_(p.grad), alpha=-group["lr"])

        return HeavyBall

    stationary = []
    for beta in (0.0, 0.9):
        clara = CLARA.paper(make(beta)([torch.nn.Parameter(torch.randn(100))]))
        stationary.append(clara.references.get(0).curves[100][-1])
        clara.detach()
    assert stationary[0] == pytest.approx(1 / 9, rel=0.05)  # plain: c / (2 - c) at c = 0.2
    assert stationary[1] > 0.5  # heavy ball 0.9 (the closed form: 0.68)
