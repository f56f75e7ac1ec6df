"""CLARA's variants and options beyond the default: ``unit_step``, ``variant="salera"``, ``scope="param_group"``
and a custom ``reference``.

Expectations are computed independently of the controller: realised steps are measured from
parameter snapshots taken by the test, the rule is ``reference_loop.SimpleCLARA``, optimizer
steps come from twin optimizers (or ``reference_loop.SimpleAdam``) without CLARA. Controllers compared
with SimpleCLARA use ``rule="paper"`` (log F += d (r - 1)), the rule SimpleCLARA implements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from reference_loop import SimpleAdam, SimpleCLARA, plain_sgd_mu
from torch import Tensor

from lightning_clara import CLARA
from lightning_clara.reference import HeavyBallReference, PlainReference, Reference

C = 0.2
RTOL = 1e-6
SHAPES: tuple[tuple[int, ...], ...] = ((1,), (7,), (300,), (20, 30))

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def make_params(shapes: tuple[tuple[int, ...], ...] = SHAPES, seed: int = 0) -> list[Tensor]:
    """float64 parameters with random (fixed-seed) starting values."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]


def clone_params(params: list[Tensor]) -> list[Tensor]:
    """An independent copy (same values) for a twin optimizer."""
    return [p.detach().clone().requires_grad_() for p in params]


def gaussian(shapes: list[torch.Size], seed: int) -> Iterator[list[Tensor]]:
    """i.i.d. N(0, 1) gradients, independent of the parameters (so twin optimizers see the same ones)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def drift(shapes: list[torch.Size], seed: int) -> Iterator[list[Tensor]]:
    """A fixed direction plus noise: successive steps agree, so F moves (and the lr with it)."""
    generator = torch.Generator().manual_seed(seed)
    base = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    while True:
        yield [b + 0.5 * torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in base]


def set_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """Install gradients by hand (copies, so an optimizer cannot alias them)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def snapshot(params: list[Tensor]) -> list[Tensor]:
    """Detached copies of the current values."""
    return [p.detach().clone() for p in params]


def steps_since(before: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Realised steps theta(before) - theta(after)."""
    return [b - p.detach() for b, p in zip(before, params, strict=True)]


# ------------------------------------------------------------------------------------------ unit_step

#: Optimizers whose state depends on the gradients only (no weight decay): a twin without CLARA,
#: fed the same gradients, has the same state at every step, so its step gives the direction.
GRADIENT_STATE_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_STATE_OPTIMIZERS))
def test_unit_step_moves_each_tensor_by_exactly_lr_along_the_optimizers_step(name: str) -> None:
    """Every tensor moves by exactly lr_base * F (F read before the step) along the twin optimizer's step.

    The twin (no CLARA, same gradients) runs with lr = 1: its step direction equals the one the
    CLARA-driven optimizer would have taken, since neither state nor direction depends on lr here.
    """
    factory = GRADIENT_STATE_OPTIMIZERS[name]
    lr = 1e-2
    params = make_params()
    twin_params = clone_params(params)
    optimizer, twin = factory(params), factory(twin_params)
    for group in twin.param_groups:
        group["lr"] = 1.0
    clara = CLARA(optimizer, c=C, d=0.05, unit_step=True)
    gradients = drift([p.shape for p in params], seed=1)
    factors = []
    for t in range(60):
        grads = next(gradients)
        set_grads(params, grads)
        set_grads(twin_params, grads)
        before, twin_before = snapshot(params), snapshot(twin_params)
        factor = clara.lr_factor
        factors.append(factor)
        optimizer.step()
        twin.step()
        expected_length = lr * factor
        assert clara.lr_used[0] == pytest.approx(expected_length, rel=1e-12)
        for k, (step, twin_step) in enumerate(
            zip(steps_since(before, params), steps_since(twin_before, twin_params), strict=True)
        ):
            length = float(step.norm())
            assert length == pytest.approx(expected_length, rel=1e-10), f"step {t}, tensor {k}"
            torch.testing.assert_close(step / length, twin_step / twin_step.norm(), rtol=1e-8, atol=1e-10)
    assert max(factors) / min(factors) > 1.2  # F moved, so "length == lr * F" is not "length == lr"


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.5),
        lambda ps: torch.optim.Adadelta(ps, lr=0.5, weight_decay=0.5),
    ],
    ids=["adamw_decay", "sgd_momentum_decay", "adadelta_decay"],
)
def test_unit_step_first_step_follows_the_optimizer_with_weight_decay(factory: OptimizerFactory) -> None:
    """With weight decay the state depends on the parameters, so the twins part after one step: compare the
    first step's direction (decay included), and the length lr at every one of 20 steps."""
    lr = factory([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]
    params = make_params()
    twin_params = clone_params(params)
    optimizer, twin = factory(params), factory(twin_params)
    clara = CLARA(optimizer, c=C, d=0.05, unit_step=True)
    gradients = drift([p.shape for p in params], seed=2)
    for t in range(20):
        grads = next(gradients)
        set_grads(params, grads)
        before, factor = snapshot(params), clara.lr_factor
        optimizer.step()
        steps = steps_since(before, params)
        for step in steps:
            assert float(step.norm()) == pytest.approx(lr * factor, rel=1e-10)
        if t == 0:
            set_grads(twin_params, grads)
            twin_before = snapshot(twin_params)
            twin.step()
            for step, twin_step in zip(steps, steps_since(twin_before, twin_params), strict=True):
                torch.testing.assert_close(step / step.norm(), twin_step / twin_step.norm(), rtol=1e-8, atol=1e-10)


def test_unit_step_respects_lr_bounds() -> None:
    """The unit step's length is the clipped lr: it sits on max_lr once F has grown past it."""
    lr, max_lr = 1e-2, 1.5e-2
    params = make_params()
    clara = CLARA(torch.optim.SGD(params, lr=lr), c=C, d=0.2, unit_step=True, max_lr=max_lr)
    gradients = drift([p.shape for p in params], seed=3)
    lengths = []
    for _ in range(40):
        set_grads(params, next(gradients))
        before, factor = snapshot(params), clara.lr_factor
        clara.optimizer.step()
        expected = min(lr * factor, max_lr)
        for step in steps_since(before, params):
            assert float(step.norm()) == pytest.approx(expected, rel=1e-10)
        lengths.append(expected)
    assert lengths[-1] == max_lr
    assert lengths[0] < max_lr


def test_unit_step_leaves_a_tensor_without_step_in_place() -> None:
    """A tensor whose step is zero (zero gradient, plain SGD) has no direction: it must not move (no NaN)."""
    params = make_params(((5,), (3,)))
    clara = CLARA(torch.optim.SGD(params, lr=0.1), c=C, unit_step=True, initial_factor=1.0)
    set_grads(params, [torch.ones(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])
    before = snapshot(params)
    clara.optimizer.step()
    torch.testing.assert_close(params[1].detach(), before[1], rtol=0.0, atol=0.0)
    assert float((before[0] - params[0].detach()).norm()) == pytest.approx(0.1, rel=1e-12)


def test_unit_step_ends_with_detach() -> None:
    """The unit step is an add-on with hooks of its own: detach() removes them, and the optimizer's own step
    (of length lr * ||g||, here 0.1 * 2) is taken again."""
    params = make_params(((4,),))
    clara = CLARA(torch.optim.SGD(params, lr=0.1), c=C, unit_step=True, initial_factor=1.0)
    set_grads(params, [torch.full((4,), 1.0, dtype=torch.float64)])
    before = snapshot(params)
    clara.optimizer.step()
    assert float((before[0] - params[0].detach()).norm()) == pytest.approx(0.1, rel=1e-12)
    clara.detach()
    before = snapshot(params)
    clara.optimizer.step()
    assert float((before[0] - params[0].detach()).norm()) == pytest.approx(0.2, rel=1e-12)


# ------------------------------------------------------------------------------------------ SALeRA


def test_salera_accumulates_normalised_raw_gradients_with_the_plain_reference() -> None:
    """With Adam, SALeRA's path is built from g/||g|| (not Adam's steps) against c/(2-c)(1-(1-c)^2t).

    The loop: SimpleCLARA fed the raw gradients, SimpleAdam stepping with lr_base * F. Gradients
    depend on the parameters (a noisy quadratic with very uneven curvature, so Adam's steps point
    elsewhere than the gradients), so any difference in the lr would also show in the trajectory.
    """
    lr, d, steps = 2e-2, 0.05, 150
    params = make_params(seed=4)
    loop_params = clone_params(params)
    shapes = [p.shape for p in params]
    generator = torch.Generator().manual_seed(5)
    curvature = [torch.logspace(-2, 1, p.numel(), dtype=torch.float64).reshape(p.shape) for p in params]
    noise = [torch.randn((steps, *s), generator=generator, dtype=torch.float64) for s in shapes]

    def gradients(values: list[Tensor], t: int) -> list[Tensor]:
        return [h * v.detach() + 0.3 * e[t] for h, v, e in zip(curvature, values, noise, strict=True)]

    clara = CLARA(torch.optim.Adam(params, lr=lr), c=C, d=d, rule="paper", variant="salera")
    loop = SimpleCLARA(shapes, C, d, plain_sgd_mu(C), rule="paper")
    own_steps = SimpleCLARA(shapes, C, d, plain_sgd_mu(C), rule="paper")  # the same rule fed Adam's steps: must differ
    adam = SimpleAdam(loop_params)
    largest_gap = 0.0
    for t in range(steps):
        grads = gradients(params, t)
        set_grads(params, grads)
        set_grads(loop_params, gradients(loop_params, t))
        lr_used = lr * loop.factor
        clara.optimizer.step()
        realised = adam.step(lr_used)
        loop.update([p.grad for p in loop_params])
        own_steps.update(realised)
        assert clara.lr_used[0] == pytest.approx(lr_used, rel=RTOL), f"step {t}"
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}"
        assert own_steps.ratio is not None
        largest_gap = max(largest_gap, abs(own_steps.ratio - loop.ratio))
    for p, q in zip(params, loop_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=1e-9)
    assert largest_gap > 0.1  # Adam's own steps give other ratios: the comparison can tell them apart
    assert abs(math.log(loop.factor)) > 0.05


def test_salera_refuses_unit_step() -> None:
    """SALeRA reads raw gradients: a unit step makes no sense with it."""
    with pytest.raises(ValueError, match=r"salera"):
        CLARA(torch.optim.Adam(make_params()), variant="salera", unit_step=True)


# --------------------------------------------------------------------------------- per-group scope


def test_param_group_scope_matches_one_loop_per_group() -> None:
    """Two groups (plain SGD / heavy-ball momentum, different lrs, different gradient patterns): each factor
    equals a SimpleCLARA run on that group's tensors alone, with that group's reference."""
    d, steps = 0.05, 120
    first, second = make_params(((1,), (300,)), seed=6), make_params(((7,), (20, 30)), seed=7)
    lrs = (1e-2, 1e-3)
    optimizer = torch.optim.SGD(
        [{"params": first, "lr": lrs[0]}, {"params": second, "lr": lrs[1], "momentum": 0.9}],
    )
    clara = CLARA(optimizer, c=C, d=d, rule="paper", scope="param_group")
    heavy_ball = HeavyBallReference(C, 0.9)

    def heavy_ball_mu(n: int, t: int) -> float:
        curve = heavy_ball.curve(n)
        return float(curve[min(t, curve.numel() - 1)])

    loops = [
        SimpleCLARA([p.shape for p in first], C, d, plain_sgd_mu(C), rule="paper"),
        SimpleCLARA([p.shape for p in second], C, d, heavy_ball_mu, rule="paper"),
    ]
    agreeing = drift([p.shape for p in first], seed=8)  # this group's F grows
    noise = gaussian([p.shape for p in second], seed=9)  # this one's wanders near 1
    for t in range(steps):
        set_grads(first, next(agreeing))
        set_grads(second, next(noise))
        expected_lrs = [lr * loop.factor for lr, loop in zip(lrs, loops, strict=True)]
        before = [snapshot(first), snapshot(second)]
        optimizer.step()
        assert clara.lr_used == pytest.approx(expected_lrs, rel=RTOL), f"step {t}"
        for loop, group_before, group in zip(loops, before, (first, second), strict=True):
            loop.update(steps_since(group_before, group))
        assert clara.lr_factors == pytest.approx([loop.factor for loop in loops], rel=RTOL), f"step {t}"
        assert clara.ratios == pytest.approx([loop.ratio for loop in loops], rel=RTOL), f"step {t}"
    assert clara.lr_factors[0] > 1.5
    assert abs(math.log(clara.lr_factors[1])) < 0.5 * math.log(clara.lr_factors[0])


# ------------------------------------------------------------------------------- custom reference


class ConstantReference(Reference):
    """A user-supplied reference: mu(t) = value for every t >= 1 and every size."""

    def __init__(self, c: float, value: float) -> None:
        super().__init__(c)
        self.value = value

    @property
    def key(self) -> tuple[Any, ...]:
        return ("constant", self.c, self.value)

    def _compute(self, sizes: list[int]) -> dict[int, Tensor]:
        return dict.fromkeys(sizes, torch.tensor([0.0, self.value], dtype=torch.float64))


@pytest.mark.parametrize(
    ("reference", "mu"),
    [
        (PlainReference(C), plain_sgd_mu(C)),
        (ConstantReference(C, 0.3), lambda n, t: 0.3),
    ],
    ids=["plain", "user_defined"],
)
def test_custom_reference_is_used_for_every_group(reference: Reference, mu: Callable[[int, int], float]) -> None:
    """Adam in two groups with different betas (whose own references would differ), scope per group:
    each group follows SimpleCLARA with the given mu on its realised steps -- also after its betas change."""
    d, steps = 0.05, 80
    first, second = make_params(((1,), (7,)), seed=10), make_params(((300,), (20, 30)), seed=11)
    optimizer = torch.optim.Adam(
        [{"params": first, "lr": 1e-2, "betas": (0.9, 0.999)}, {"params": second, "lr": 2e-2, "betas": (0.5, 0.99)}]
    )
    clara = CLARA(optimizer, c=C, d=d, rule="paper", scope="param_group", reference=reference)
    loops = [SimpleCLARA([p.shape for p in group], C, d, mu, rule="paper") for group in (first, second)]
    gradients = drift([p.shape for p in first + second], seed=12)
    for t in range(steps):
        if t == steps // 2:
            optimizer.param_groups[1]["betas"] = (0.0, 0.9)  # a change that would rebuild the built-in reference
        set_grads(first + second, next(gradients))
        before = [snapshot(first), snapshot(second)]
        optimizer.step()
        for loop, group_before, group in zip(loops, before, (first, second), strict=True):
            loop.update(steps_since(group_before, group))
        assert clara.ratios == pytest.approx([loop.ratio for loop in loops], rel=RTOL), f"step {t}"
        assert clara.lr_factors == pytest.approx([loop.factor for loop in loops], rel=RTOL), f"step {t}"
    assert all(abs(math.log(f)) > 0.05 for f in clara.lr_factors)


def test_custom_reference_with_optimizer_scope_sums_over_all_tensors() -> None:
    """One scope over two groups: r = sum_k ||p_k||^2 / sum_k mu_k with the user's mu for all of them."""
    d = 0.05
    first, second = make_params(((1,), (7,)), seed=13), make_params(((300,),), seed=14)
    optimizer = torch.optim.RMSprop([{"params": first}, {"params": second, "momentum": 0.9}], lr=1e-2)
    clara = CLARA(optimizer, c=C, d=d, rule="paper", reference=ConstantReference(C, 0.25))
    params = first + second
    loop = SimpleCLARA([p.shape for p in params], C, d, lambda n, t: 0.25, rule="paper")
    gradients = gaussian([p.shape for p in params], seed=15)
    for t in range(60):
        set_grads(params, next(gradients))
        before = snapshot(params)
        optimizer.step()
        loop.update(steps_since(before, params))
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factors == pytest.approx([loop.factor, loop.factor], rel=RTOL), f"step {t}"


def test_salera_does_not_adapt_on_a_step_at_lr_zero() -> None:
    """A warm-up from zero: the gradient is there, but the step at lr 0 moved nothing, so SALeRA takes no step
    either; once the lr is positive it adapts."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.0)
    clara = CLARA(optimizer, c=C, variant="salera")
    set_grads(params, [torch.ones_like(p) for p in params])
    optimizer.step()
    assert clara.num_adapted_steps == 0
    optimizer.param_groups[0]["lr"] = 0.1
    optimizer.step()
    assert clara.num_adapted_steps == 1


def test_salera_follows_maximize_switched_mid_run() -> None:
    """SALeRA's bucket reads the gradient with the group's sign: switching ``maximize`` lays the buckets out again."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    clara = CLARA(optimizer, c=C, variant="salera")
    set_grads(params, [torch.ones_like(p) for p in params])
    optimizer.step()
    assert not any(m.maximize for b in clara.paths.sampled.buckets for m in b.members)
    optimizer.param_groups[0]["maximize"] = True
    optimizer.step()
    assert all(m.maximize for b in clara.paths.sampled.buckets for m in b.members)
    assert clara.num_adapted_steps == 2
