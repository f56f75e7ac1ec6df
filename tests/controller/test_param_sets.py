"""Which tensors CLARA adapts, and the bounds it keeps: frozen / unfrozen tensors, missing gradients,
param groups added after attaching, lr and factor bounds, and non-finite steps.

Expectations: ``reference_loop.SimpleCLARA`` fed the realised steps (parameter snapshots taken by the
test), paths and counts read through the public ``state_dict()``, and learning rates captured by a
step pre-hook registered after CLARA's (so it sees what the optimizer uses). Controllers compared with
SimpleCLARA use ``rule="paper"`` (log F += d (r - 1)), the rule SimpleCLARA implements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import fixed
from reference_loop import SimpleCLARA, plain_sgd_mu
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara import CLARA
from lightning_clara.reference import HeavyBallReference

C = 0.2
RTOL = 1e-6


def make_params(sizes: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    """float64 parameters with fixed-seed random values."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator, dtype=torch.float64).requires_grad_() for n in sizes]


class Noise:
    """Fixed-seed Gaussian gradients for any tensor, on demand."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def like(self, p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=self.generator, dtype=p.dtype)


def snapshot(params: list[Tensor]) -> list[Tensor]:
    """Detached copies of the current values."""
    return [p.detach().clone() for p in params]


def realised(before: list[Tensor], params: list[Tensor], moved: list[bool]) -> list[Tensor | None]:
    """theta(before) - theta(after) for the tensors that had a gradient, None for the others."""
    return [b - p.detach() if m else None for b, p, m in zip(before, params, moved, strict=True)]


def path_entry(clara: CLARA, group: int, index: int) -> dict[str, Any] | None:
    """The public view of one tensor's path: ``{"path", "count"}`` or None when CLARA keeps none."""
    return clara.state_dict()["tensors"][group][index]


def record_lrs(optimizer: Optimizer) -> list[list[float]]:
    """A step pre-hook registered after CLARA's: the lr of every group as the update sees it."""
    seen: list[list[float]] = []

    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        seen.append([float(group["lr"]) for group in opt.param_groups])

    optimizer.register_step_pre_hook(hook)
    return seen


# ---------------------------------------------------------------------------------- frozen tensors


@pytest.mark.parametrize("sample", [4096, None])
def test_frozen_tensor_gets_no_path(sample: int | None) -> None:
    """A tensor with requires_grad=False (so no gradient) is never stepped: CLARA creates no path for it."""
    params = make_params((7, 30, 5))
    params[1].requires_grad_(False)
    clara = CLARA(torch.optim.SGD(params, lr=1e-2, momentum=0.9), c=C, d=0.05, rule="paper", sample=sample)
    noise = Noise(1)
    frozen_value = params[1].detach().clone()
    for _ in range(20):
        for p in (params[0], params[2]):
            p.grad = noise.like(p)
        clara.optimizer.step()
    assert path_entry(clara, 0, 1) is None
    assert [path_entry(clara, 0, k)["count"] for k in (0, 2)] == [20, 20]
    torch.testing.assert_close(params[1].detach(), frozen_value, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("sample", [4096, None])
def test_frozen_tensor_is_left_out_of_the_ratio(sample: int | None) -> None:
    """Plain SGD, one of three tensors frozen: r and F equal SimpleCLARA over the two trainable tensors."""
    d = 0.05
    params = make_params((1, 30, 7))
    params[1].requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=1e-2)
    clara = CLARA(optimizer, c=C, d=d, rule="paper", sample=sample)
    loop = SimpleCLARA([p.shape for p in params], C, d, plain_sgd_mu(C), rule="paper")
    noise = Noise(2)
    for t in range(30):
        for p in (params[0], params[2]):
            p.grad = noise.like(p) + 1.0  # a drift, so F moves
        before = snapshot(params)
        optimizer.step()
        loop.update(realised(before, params, [True, False, True]))
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}"
    assert loop.counts[1] == 0
    assert path_entry(clara, 0, 1) is None
    assert clara.lr_factor > 1.05


@pytest.mark.parametrize("freeze_at", [0, 5], ids=["frozen_from_start", "frozen_mid_training"])
@pytest.mark.parametrize("sample", [4096, None])
def test_frozen_tensor_with_a_stale_zero_gradient_is_skipped(sample: int | None, freeze_at: int) -> None:
    """A frozen tensor (requires_grad False) that still carries a zero gradient -- ``zero_grad(set_to_none=False)``
    after freezing a layer -- is still frozen, so CLARA leaves it out: no error, no path, and r and F follow
    SimpleCLARA over the trainable tensor alone (torch's SGD may still move the frozen one by its momentum)."""
    d, steps = 0.05, 12
    params = make_params((7, 30))
    optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if freeze_at == 0:
        params[1].requires_grad_(False)
        params[1].grad = torch.zeros_like(params[1])
    clara = CLARA(optimizer, c=C, d=d, rule="paper", sample=sample)
    heavy_ball = HeavyBallReference(C, 0.9)

    def mu(n: int, t: int) -> float:
        curve = heavy_ball.curve(n)
        return float(curve[min(t, curve.numel() - 1)])

    loop = SimpleCLARA([p.shape for p in params], C, d, mu, rule="paper")
    noise = Noise(3)
    for t in range(steps):
        if t == freeze_at and freeze_at > 0:
            params[1].requires_grad_(False)
            optimizer.zero_grad(set_to_none=False)  # params[1].grad is now zeros, not None
        assert t < freeze_at or params[1].grad is not None
        for p in params:
            if p.requires_grad:
                p.grad = noise.like(p)
        before = snapshot(params)
        optimizer.step()
        loop.update(realised(before, params, [True, t < freeze_at]))
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}"
    assert path_entry(clara, 0, 1) is None
    assert path_entry(clara, 0, 0)["count"] == steps


@pytest.mark.parametrize("sample", [4096, None])
def test_unfrozen_tensor_starts_a_fresh_path(sample: int | None) -> None:
    """Frozen for a few steps then unfrozen: its path restarts from zero (count 1, ||p|| = c after one step),
    and r follows SimpleCLARA with that tensor's path and count reset."""
    d = 0.05
    params = make_params((7, 30, 1))
    optimizer = torch.optim.SGD(params, lr=1e-2)
    clara = CLARA(optimizer, c=C, d=d, rule="paper", sample=sample)
    loop = SimpleCLARA([p.shape for p in params], C, d, plain_sgd_mu(C), rule="paper")
    noise = Noise(4)
    frozen_steps = range(10, 15)
    for t in range(30):
        if t == frozen_steps.start:
            params[1].requires_grad_(False)
            params[1].grad = None
        if t == frozen_steps.stop:
            params[1].requires_grad_(True)
            loop.paths[1].zero_()  # what the rule says for a fresh path
            loop.counts[1] = 0
        active = [p.requires_grad for p in params]
        for p, a in zip(params, active, strict=True):
            p.grad = noise.like(p) + 0.5 if a else None
        before = snapshot(params)
        optimizer.step()
        loop.update(realised(before, params, active))
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}"
        entry = path_entry(clara, 0, 1)
        if t in frozen_steps:
            assert entry is None, f"step {t}: frozen tensor still has a path"
        elif t == frozen_steps.stop:
            assert entry is not None
            assert entry["count"] == 1
            assert float(entry["path"].norm()) == pytest.approx(C, rel=1e-12)  # p = c u
    assert path_entry(clara, 0, 1)["count"] == 30 - frozen_steps.stop
    assert path_entry(clara, 0, 0)["count"] == 30


# ------------------------------------------------------------------------------ missing gradients


@pytest.mark.parametrize("sample", [4096, None])
def test_tensors_without_gradient_are_skipped_that_step(sample: int | None) -> None:
    """A tensor whose .grad is None in a step keeps its path and count (no decay, no update); the others adapt."""
    d = 0.05
    params = make_params((1, 7, 30))
    optimizer = torch.optim.SGD(params, lr=1e-2)
    clara = CLARA(optimizer, c=C, d=d, rule="paper", sample=sample)
    loop = SimpleCLARA([p.shape for p in params], C, d, plain_sgd_mu(C), rule="paper")
    noise = Noise(5)
    pattern = torch.Generator().manual_seed(6)
    for t in range(60):
        active = [bool(x) for x in torch.rand(len(params), generator=pattern) < 0.6]
        if not any(active):
            active[0] = True
        for p, a in zip(params, active, strict=True):
            p.grad = noise.like(p) + 0.5 if a else None
        before = snapshot(params)
        paths_before = [path_entry(clara, 0, k) for k in range(len(params))]
        optimizer.step()
        loop.update(realised(before, params, active))
        assert clara.ratio == pytest.approx(loop.ratio, rel=RTOL), f"step {t}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}"
        for k, a in enumerate(active):
            entry, old = path_entry(clara, 0, k), paths_before[k]
            if not a and old is not None:
                assert entry is not None
                assert entry["count"] == old["count"]
                torch.testing.assert_close(entry["path"], old["path"], rtol=0.0, atol=0.0)
    assert [path_entry(clara, 0, k)["count"] for k in range(len(params))] == loop.counts
    assert clara.num_adapted_steps == 60


def test_step_with_no_gradient_at_all_changes_nothing() -> None:
    """No tensor has a gradient: nothing moves, F and the counters stay as they were."""
    params = make_params((3, 4))
    clara = CLARA(torch.optim.SGD(params, lr=1e-2), c=C, d=0.05)
    for p in params:
        p.grad = torch.ones_like(p)
    clara.optimizer.step()
    factor, adapted = clara.lr_factor, clara.num_adapted_steps
    for p in params:
        p.grad = None
    clara.optimizer.step()
    assert clara.lr_factor == factor
    assert clara.num_adapted_steps == adapted == 1


# ----------------------------------------------------------------------------- add_param_group


@pytest.mark.parametrize("sample", [4096, None])
@pytest.mark.parametrize("scope", ["optimizer", "param_group"])
def test_param_group_added_after_attaching_is_adapted(scope: str, sample: int | None) -> None:
    """``add_param_group`` after CLARA attached: the new group's lr is adapted from its next step on.
    Per-group scope: its own factor, starting at 1. Optimizer scope: it joins the shared ratio."""
    d, added_at, steps = 0.05, 15, 40
    lrs = (1e-2, 3e-2)
    first, second = make_params((7, 1), seed=7), make_params((30,), seed=8)
    optimizer = torch.optim.SGD(first, lr=lrs[0])
    clara = CLARA(optimizer, c=C, d=d, rule="paper", scope=scope, sample=sample)
    seen = record_lrs(optimizer)
    shapes = [p.shape for p in first + second]
    if scope == "optimizer":
        loops = [SimpleCLARA(shapes, C, d, plain_sgd_mu(C), rule="paper")]
    else:
        loops = [
            SimpleCLARA(shapes[:2], C, d, plain_sgd_mu(C), rule="paper"),
            SimpleCLARA(shapes[2:], C, d, plain_sgd_mu(C), rule="paper"),
        ]
    noise = Noise(9)
    for t in range(steps):
        if t == added_at:
            optimizer.add_param_group({"params": second, "lr": lrs[1]})
            assert clara.lr_factors[1] == (1.0 if scope == "param_group" else clara.lr_factors[0])
        groups = len(optimizer.param_groups)
        params = first + (second if groups == 2 else [])
        for p in params:
            p.grad = noise.like(p) + 0.7
        before = snapshot(first + second)
        factors = [loop.factor for loop in loops]
        optimizer.step()
        steps_taken = realised(before, first + second, [True, True, groups == 2])
        if scope == "optimizer":
            loops[0].update(steps_taken)
            expected = [lr * factors[0] for lr in lrs[:groups]]
        else:
            loops[0].update(steps_taken[:2])
            if groups == 2:
                loops[1].update(steps_taken[2:])
            expected = [lrs[j] * factors[j] for j in range(groups)]
        assert seen[-1] == pytest.approx(expected, rel=RTOL), f"step {t}"
        assert clara.lr_factors[:1] == pytest.approx([loops[0].factor], rel=RTOL), f"step {t}"
        if groups == 2:
            assert clara.lr_factors[1] == pytest.approx(loops[-1].factor, rel=RTOL), f"step {t}"
    assert path_entry(clara, 1, 0)["count"] == steps - added_at
    assert clara.lr_factors[1] > 1.05  # the new group really was adapted


@pytest.mark.parametrize("kind", ["complex", "sparse"])
def test_a_tensor_added_after_attaching_is_checked_like_one_at_attach(kind: str) -> None:
    """A complex or sparse tensor that a group gains later is refused with CLARA's message, as at attach (the
    NaN check read complex gradients with torch's NotImplementedError before); the parameters stay unchanged."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    clara = CLARA(optimizer)
    added = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64) if kind == "complex" else torch.eye(3).to_sparse())
    optimizer.add_param_group({"params": [added]})
    weight.grad, added.grad = torch.ones(3), added.detach().clone()
    with pytest.raises(TypeError, match=f"does not support {kind} parameters \\(param group 1\\)"):
        optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(3))
    assert optimizer.param_groups[0]["lr"] == 0.1  # the base lr, not the lr used
    assert clara.num_adapted_steps == 0


def test_a_frozen_complex_tensor_is_accepted_until_it_is_unfrozen() -> None:
    """CLARA tracks trainable tensors only, at attach as later: a frozen complex tensor is no reason to refuse
    the optimizer; unfrozen, it is refused at the next step."""
    weight = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64), requires_grad=False)
    optimizer = torch.optim.SGD([weight, frozen], lr=0.1)
    clara = CLARA(optimizer)
    weight.grad = torch.ones(3)
    optimizer.step()
    assert clara.num_adapted_steps == 1
    frozen.requires_grad_(True)
    frozen.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"does not support complex parameters \(param group 0\)"):
        optimizer.step()


# ------------------------------------------------------------------------------------------ bounds


def drive(optimizer: Optimizer, params: list[Tensor], gradients: Iterator[list[Tensor]], steps: int) -> None:
    """Feed ``steps`` gradients through ``optimizer.step()``."""
    for _ in range(steps):
        for p, g in zip(params, next(gradients), strict=True):
            p.grad = g.clone()
        optimizer.step()


def test_lr_bounds_hold_exactly_in_every_group() -> None:
    """Two groups (base lr 1e-3 and 4e-3), min_lr 5e-4, max_lr 2e-3: the lr each update sees is always
    clip(base * F), in [min_lr, max_lr]; a constant gradient pins both at max_lr, an alternating one
    both at min_lr (to rounding) -- and F does not wind up behind a binding bound."""
    bases, min_lr, max_lr = (1e-3, 4e-3), 5e-4, 2e-3
    first, second = make_params((7, 1), seed=11), make_params((30,), seed=12)
    params = first + second
    optimizer = torch.optim.SGD([{"params": first, "lr": bases[0]}, {"params": second, "lr": bases[1]}])
    clara = CLARA(optimizer, c=C, d=0.5, rule="paper", min_lr=min_lr, max_lr=max_lr)
    seen = record_lrs(optimizer)
    factors: list[float] = []
    optimizer.register_step_pre_hook(lambda *_: factors.append(clara.lr_factor))

    # "on the bound" to rounding: the group whose base reaches the bound through F is base * exp(log F)
    drive(optimizer, params, fixed(params, sign_flips=False, seed=10), 60)
    assert seen[-1] == pytest.approx([max_lr, max_lr], rel=1e-12, abs=0.0)
    drive(optimizer, params, fixed(params, sign_flips=True, seed=10), 8)  # leaves the top within a few steps
    assert seen[-1][0] < max_lr
    drive(optimizer, params, fixed(params, sign_flips=True, seed=10), 60)
    assert seen[-1] == pytest.approx([min_lr, min_lr], rel=1e-12, abs=0.0)
    drive(optimizer, params, fixed(params, sign_flips=False, seed=10), 8)  # and the bottom
    assert seen[-1][1] > min_lr
    for lrs, factor in zip(seen, factors, strict=True):
        for lr, base in zip(lrs, bases, strict=True):
            assert min_lr <= lr <= max_lr
            assert lr == pytest.approx(min(max(base * factor, min_lr), max_lr), rel=1e-12)
    assert all(math.isfinite(f) and f > 0 for f in factors)
    # no wind-up: F itself stays where the smaller base just reaches max_lr / the larger just reaches min_lr
    assert max(factors) <= max_lr / bases[0] * (1 + 1e-12)
    assert min(factors) >= min_lr / bases[1] * (1 - 1e-12)


@pytest.mark.parametrize(("min_factor", "max_factor"), [(0.25, 4.0), (1.0, 1.0)])
def test_factor_bounds_hold_exactly(min_factor: float, max_factor: float) -> None:
    """F stays in [min_factor, max_factor] at every step, sits on max_factor (to rounding) under a constant gradient
    and on min_factor under an alternating one; equal bounds freeze F at that value."""
    params = make_params((1, 7, 30), seed=13)
    lr = 1e-3
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    clara = CLARA(optimizer, c=C, d=0.5, rule="paper", min_factor=min_factor, max_factor=max_factor)
    seen = record_lrs(optimizer)
    factors: list[float] = []

    def after(*_: Any) -> None:
        factors.append(clara.lr_factor)

    optimizer.register_step_post_hook(after)
    drive(optimizer, params, fixed(params, sign_flips=False, seed=10), 60)
    assert clara.lr_factor == pytest.approx(max_factor, rel=1e-12)
    assert seen[-1][0] == pytest.approx(lr * max_factor, rel=1e-12)
    drive(optimizer, params, fixed(params, sign_flips=True, seed=10), 80)
    assert clara.lr_factor == pytest.approx(min_factor, rel=1e-12)
    assert seen[-1][0] == pytest.approx(lr * min_factor, rel=1e-12)
    # never outside, not even by rounding
    assert all(min_factor <= f <= max_factor for f in factors)
    assert all(lr * min_factor <= s[0] <= lr * max_factor for s in seen)


FactorPattern = Callable[[list[Tensor]], Iterator[list[Tensor]]]


@pytest.mark.parametrize(
    "pattern",
    [lambda ps: fixed(ps, sign_flips=False, seed=10), lambda ps: fixed(ps, sign_flips=True, seed=10)],
    ids=["constant", "alternating"],
)
def test_factor_is_never_nan_inf_or_zero_without_bounds(pattern: FactorPattern) -> None:
    """Huge damping and no bounds: F may go far, but never to inf, 0 or NaN (nor does the lr used)."""
    params = make_params((1, 7, 30), seed=14)
    optimizer = torch.optim.SGD(params, lr=1e-3)
    clara = CLARA(optimizer, c=C, d=1e3)
    seen = record_lrs(optimizer)
    drive(optimizer, params, pattern(params), 50)
    assert all(math.isfinite(s[0]) and s[0] > 0 for s in seen)
    assert math.isfinite(clara.lr_factor)
    assert clara.lr_factor > 0
    assert abs(math.log(clara.lr_factor)) > 10  # it did go far


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("sample", [4096, None])
def test_non_finite_gradient_is_skipped_with_a_warning(bad: float, sample: int | None) -> None:
    """One tensor gets a NaN/inf gradient once: RuntimeWarning, num_skipped_steps == 1, F finite, the other
    tensors still adapt that step, and the bad tensor's path restarts from zero afterwards."""
    params = make_params((7, 30, 1), seed=15)
    optimizer = torch.optim.Adagrad(params, lr=1e-2) if sample is None else torch.optim.SGD(params, lr=1e-2)
    clara = CLARA(optimizer, c=C, d=0.1, rule="paper", sample=sample, skip_nonfinite=False)
    noise = Noise(16)
    for _ in range(5):
        for p in params:
            p.grad = noise.like(p)
        optimizer.step()
    factor = clara.lr_factor
    for p in params:
        p.grad = noise.like(p)
    params[1].grad = torch.full_like(params[1], bad)
    with pytest.warns(RuntimeWarning, match=r"NaN|inf"):
        optimizer.step()
    assert clara.num_skipped_steps == 1
    assert clara.num_adapted_steps == 6
    assert math.isfinite(clara.lr_factor)
    assert clara.lr_factor > 0
    assert clara.lr_factor != factor  # the finite tensors adapted
    assert clara.ratio is not None
    assert math.isfinite(clara.ratio)
    entry = path_entry(clara, 0, 1)
    assert entry is None or entry["count"] == 0
    assert path_entry(clara, 0, 0)["count"] == 6


@pytest.mark.parametrize("sample", [None, 4096])
def test_param_group_added_inside_the_step_closure(sample: int | None) -> None:
    """Lightning runs ``training_step`` inside ``optimizer.step(closure)``: a group added there, after
    CLARA's pre-hook, steps at its own lr, is reported with it, and is adapted from the next step.

    The pre-hook gathered nothing of the new group (sampled or full paths), so its path starts with the
    next step."""
    first, second = make_params((5,), seed=3), make_params((4,), seed=4)
    optimizer = torch.optim.SGD(first, lr=1e-2)
    clara = CLARA(optimizer, c=C, d=0.05, scope="param_group", sample=sample)
    seen_first = 0
    noise = Noise(5)

    def closure(add: bool) -> None:
        if add:
            optimizer.add_param_group({"params": second, "lr": 3e-2})
        for p in first + (second if len(optimizer.param_groups) == 2 else []):
            p.grad = noise.like(p) + 0.5

    optimizer.step(lambda: closure(False))
    expected_first = 1e-2 * clara.lr_factors[0]
    optimizer.step(lambda: closure(True))
    assert clara.lr_used == pytest.approx([expected_first, 3e-2], rel=1e-12)  # the new group: its own lr
    assert clara.num_adapted_steps == 2
    entry = path_entry(clara, 1, 0)
    assert (0 if entry is None else entry["count"]) == seen_first  # r = 1 at a first step
    for _ in range(5):
        expected = [1e-2 * clara.lr_factors[0], 3e-2 * clara.lr_factors[1]]
        optimizer.step(lambda: closure(False))
        assert clara.lr_used == pytest.approx(expected, rel=1e-12)
    assert path_entry(clara, 1, 0)["count"] == 5 + seen_first
    assert clara.lr_factors[1] != 1.0


def test_a_tensor_listed_twice_in_a_group_is_refused() -> None:
    """torch accepts SGD([p, p]) with a deprecation warning; CLARA kept two rows sampled at different entries but
    saved them under one key, so a resume loaded the second row's path into both."""
    param = torch.nn.Parameter(torch.randn(10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own deprecation of duplicates
        twice = torch.optim.SGD([param, param], lr=0.1)
        with pytest.raises(ValueError, match="more than once"):
            CLARA(twice)
        other = torch.nn.Parameter(torch.randn(3))
        optimizer = torch.optim.SGD([other], lr=0.1)
        CLARA(optimizer)
        optimizer.add_param_group({"params": [param, param]})
    param.grad, other.grad = torch.randn(10), torch.randn(3)
    with pytest.raises(ValueError, match="param group 1 lists a tensor more than once"):
        optimizer.step()
