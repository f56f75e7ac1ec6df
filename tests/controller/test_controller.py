"""``CLARA`` (hooks, foreach kernels) against the simple loop of ``reference_loop``, and its contracts.

Trajectory comparisons use float64 parameters so that any difference above rounding is a
behavioural difference. Expected learning rates and factors are recomputed independently
(loop implementation, closed-form schedules), never copied from the controller.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from reference_loop import SimpleAdam, SimpleCLARA, SimpleMomentumSGD, plain_sgd_mu, sgd_step
from torch import Tensor

from lightning_clara import CLARA
from lightning_clara.reference import reference_for

FEATURES, HIDDEN, SAMPLES, BATCH = 30, 10, 64, 16
STEPS = 200
C = 0.2
RTOL = 1e-6


StepFn = Callable[[float], list[Tensor]]
"""Hand-written optimizer step bound to its params: lr -> realised steps."""


# ----------------------------------------------------------------------------------------- fixtures


def make_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed-seed non-linear regression set in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    w = torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64)
    y = torch.sin(x @ w / math.sqrt(FEATURES)) + 0.1 * torch.randn(SAMPLES, 1, generator=generator, dtype=torch.float64)
    return x, y


DATA = make_data()


def make_params(seed: int = 1) -> list[Tensor]:
    """A tanh MLP's tensors: sizes 300, 10, 10 and 1, so several reference sizes are exercised."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(HIDDEN, FEATURES), (HIDDEN,), (1, HIDDEN), (1,)]
    scales = [1 / math.sqrt(FEATURES), 0.1, 1 / math.sqrt(HIDDEN), 0.1]
    return [
        (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
        for shape, scale in zip(shapes, scales, strict=True)
    ]


def loss_at(params: list[Tensor], t: int) -> Tensor:
    """MSE of the MLP on minibatch t (minibatches cycle deterministically)."""
    w1, b1, w2, b2 = params[:4]
    start = (t * BATCH) % SAMPLES
    x, y = DATA[0][start : start + BATCH], DATA[1][start : start + BATCH]
    out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    return torch.nn.functional.mse_loss(out, y)


def compute_grads(params: list[Tensor], t: int) -> Tensor:
    """Fresh gradients of minibatch t (old ones dropped, as ``zero_grad(set_to_none=True)`` would)."""
    for p in params:
        p.grad = None
    loss = loss_at(params, t)
    loss.backward()
    return loss


def set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Synthetic gradients, set by hand."""
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def synthetic_params(sizes: tuple[int, ...] = (1, 7, 300), dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Zero parameters of the given sizes for tests that drive CLARA with synthetic gradients."""
    return [torch.zeros(n, dtype=dtype, requires_grad=True) for n in sizes]


def fixed_direction(params: list[Tensor], seed: int = 5) -> list[Tensor]:
    """One random gradient per tensor, to be repeated (constant) or alternated in sign."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def relative_error(a: float, b: float) -> float:
    """|a - b| / |b|: the comparison metric for library vs loop values."""
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------- trajectory vs loop


def run_library(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int, **clara_kwargs: Any
) -> tuple[list[tuple[float, float, float]], list[Tensor], CLARA]:
    """(lr used, ratio, factor after) per step, final params and the controller."""
    params = make_params()
    optimizer = make_optimizer(params)
    clara = CLARA(optimizer, **clara_kwargs)
    records = []
    for t in range(steps):
        compute_grads(params, t)
        optimizer.step()
        assert clara.ratio is not None
        records.append((clara.lr_used[0], clara.ratio, clara.lr_factor))
    return records, params, clara


def run_loop(
    make_step: Callable[[list[Tensor]], StepFn], mu: Callable[[int, int], float], lr: float, d: float, steps: int
) -> tuple[list[tuple[float, float, float]], list[Tensor]]:
    """The same training with the hand-written optimizer and ``SimpleCLARA``."""
    params = make_params()
    step_fn = make_step(params)
    loop = SimpleCLARA([p.shape for p in params], C, d, mu)
    records = []
    for t in range(steps):
        compute_grads(params, t)
        lr_used = lr * loop.factor
        loop.update(step_fn(lr_used))
        assert loop.ratio is not None
        records.append((lr_used, loop.ratio, loop.factor))
    return records, params


def library_mu(optimizer: torch.optim.Optimizer) -> Callable[[int, int], float]:
    """mu(n, t) from the library's reference curves (checked against Monte Carlo in test_reference)."""
    reference = reference_for(optimizer, optimizer.param_groups[0], C)

    def mu(n: int, t: int) -> float:
        curve = reference.curve(n)
        return float(curve[min(t, curve.numel() - 1)])

    return mu


def _sgd(params: list[Tensor]) -> StepFn:
    """Plain SGD written out (reference_loop.sgd_step)."""
    return lambda lr: sgd_step(params, lr)


def _momentum(params: list[Tensor]) -> StepFn:
    """Heavy-ball SGD written out, torch's convention."""
    return SimpleMomentumSGD(params, momentum=0.9).step


def _adam(params: list[Tensor]) -> StepFn:
    """Adam written out (no weight decay)."""
    return SimpleAdam(params).step


TRAJECTORY_CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05), _sgd, 0.05, 0.02),
    "momentum": (lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9), _momentum, 0.005, 0.02),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.003), _adam, 0.003, 0.02),
}


@pytest.mark.parametrize("sample", [None, 4096])
@pytest.mark.parametrize("case", sorted(TRAJECTORY_CASES))
def test_matches_simple_loop_step_by_step(case: str, sample: int | None) -> None:
    """lr used, ratio and factor agree with the loop at every one of 200 steps (relative error < 1e-6)."""
    make_optimizer, make_step, lr, d = TRAJECTORY_CASES[case]
    mu = plain_sgd_mu(C) if case == "sgd" else library_mu(make_optimizer(make_params()))
    library, library_params, clara = run_library(make_optimizer, STEPS, c=C, d=d, sample=sample)
    loop, loop_params = run_loop(make_step, mu, lr, d, STEPS)
    assert clara.sample == sample
    for t, (got, want) in enumerate(zip(library, loop, strict=True)):
        for name, a, b in zip(("lr used", "ratio", "factor"), got, want, strict=True):
            assert relative_error(a, b) < RTOL, f"step {t}: {name} {a!r} vs loop {b!r}"
    for p, q in zip(library_params, loop_params, strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-9)
    # the comparison is only meaningful if the factor actually moved
    log_factors = [math.log(f) for _, _, f in loop]
    assert max(log_factors) - min(log_factors) > 0.05
    assert clara.num_adapted_steps == STEPS


def test_plain_sgd_loop_uses_closed_form_mu() -> None:
    """The loop's plain-SGD mu is ALGORITHM.md's closed form, and the library's curve equals it."""
    optimizer = torch.optim.SGD(make_params(), lr=0.1)
    from_library = library_mu(optimizer)
    closed_form = plain_sgd_mu(C)
    for n in (1, 10, 300):
        for t in (1, 2, 5, 50, 500):
            assert from_library(n, t) == pytest.approx(closed_form(n, t), rel=1e-12)


# ---------------------------------------------------------------------------------- the lr contract


def _lr_probe(optimizer: torch.optim.Optimizer, seen: list[list[float]]) -> Any:
    """A step pre-hook registered after CLARA's: it sees what the optimizer's update will use."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen.append([float(group["lr"]) for group in opt.param_groups])

    return optimizer.register_step_pre_hook(hook)


def test_lr_inside_step_is_base_times_factor_and_base_outside() -> None:
    """Inside optimizer.step the group holds lr_base * F (seen by a later pre-hook and by the closure)."""
    params = make_params()
    optimizer = torch.optim.SGD(
        [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}], lr=0.1, momentum=0.5
    )
    clara = CLARA(optimizer, c=C, d=0.05)
    hooked: list[list[float]] = []
    _lr_probe(optimizer, hooked)
    for t in range(30):
        factor = clara.lr_factor
        closure_saw: list[list[float]] = []

        def closure(t: int = t, seen: list[list[float]] = closure_saw) -> Tensor:
            seen.append([float(group["lr"]) for group in optimizer.param_groups])
            return compute_grads(params, t)

        optimizer.step(closure)
        expected = [0.05 * factor, 0.02 * factor]
        assert hooked[-1] == pytest.approx(expected, rel=1e-12)
        assert closure_saw[-1] == pytest.approx(expected, rel=1e-12)
        assert clara.lr_used == pytest.approx(expected, rel=1e-12)
        assert [group["lr"] for group in optimizer.param_groups] == [0.05, 0.02]
    assert abs(math.log(clara.lr_factor)) > 0.01


def test_tensor_lr_is_restored_in_place() -> None:
    """A tensor learning rate stays the same tensor object, holds lr_base * F inside the step, lr_base outside."""
    params = make_params()
    base = torch.tensor(0.01, dtype=torch.float64)
    optimizer = torch.optim.Adam(params, lr=base)
    clara = CLARA(optimizer, c=C, d=0.05)
    seen: list[list[float]] = []
    _lr_probe(optimizer, seen)
    for t in range(20):
        factor = clara.lr_factor
        compute_grads(params, t)
        optimizer.step()
        assert seen[-1][0] == pytest.approx(0.01 * factor, rel=1e-12)
        assert optimizer.param_groups[0]["lr"] is base
        assert float(base) == 0.01
    assert clara.lr_factor != 1.0


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_scheduler_composes_without_compounding(kind: str) -> None:
    """lr_used = lr_scheduled * F at every step; the scheduler never sees (and so never compounds) F."""
    params = make_params()
    base_lr = 0.05
    optimizer = torch.optim.SGD(params, lr=base_lr)
    clara = CLARA(optimizer, c=C, d=0.05)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if kind == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=15, gamma=0.5)

        def scheduled(t: int) -> float:
            return base_lr * 0.5 ** (t // 15)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + 0.1 * t))

        def scheduled(t: int) -> float:
            return base_lr / (1.0 + 0.1 * t)

    seen: list[list[float]] = []
    _lr_probe(optimizer, seen)
    for t in range(60):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduled(t), rel=1e-12)
        factor = clara.lr_factor
        compute_grads(params, t)
        optimizer.step()
        assert seen[-1][0] == pytest.approx(scheduled(t) * factor, rel=1e-12)
        scheduler.step()
    assert abs(math.log(clara.lr_factor)) > 0.05


def test_step_that_never_runs_changes_nothing() -> None:
    """Backward passes without optimizer.step (accumulation, a skipped step) leave CLARA untouched."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    clara = CLARA(optimizer, c=C, d=0.05)
    for t in range(5):
        compute_grads(params, t)
        optimizer.step()
    before = copy.deepcopy(clara.state_dict())
    lr_before = optimizer.param_groups[0]["lr"]
    for t in range(5, 9):
        loss_at(params, t).backward()  # accumulate, never step
    after = clara.state_dict()
    assert after["log_factors"] == before["log_factors"]
    assert after["ratios"] == before["ratios"]
    assert after["num_adapted_steps"] == before["num_adapted_steps"] == 5
    for row_before, row_after in zip(before["tensors"], after["tensors"], strict=True):
        for a, b in zip(row_before, row_after, strict=True):
            assert a is not None
            assert b is not None
            assert torch.equal(a["path"], b["path"])
            assert a["count"] == b["count"]
    assert optimizer.param_groups[0]["lr"] == lr_before


def test_step_with_no_gradients_does_not_adapt() -> None:
    """optimizer.step() with every grad None moves nothing, so neither the factor nor the step count changes."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.05)
    clara = CLARA(optimizer, c=C, d=0.05)
    compute_grads(params, 0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    factor, ratio = clara.lr_factor, clara.ratio
    optimizer.step()
    assert (clara.lr_factor, clara.ratio, clara.num_adapted_steps) == (factor, ratio, 1)


def test_params_without_grad_are_skipped() -> None:
    """Frozen, unused and zero-gradient tensors take no step, so they are left out of paths and reference sums."""
    params = make_params()
    unused = torch.zeros(7, dtype=torch.float64, requires_grad=True)  # never in the loss: grad stays None
    frozen = torch.ones(3, dtype=torch.float64, requires_grad=False)
    zero = torch.zeros(5, dtype=torch.float64, requires_grad=True)  # gets an all-zero gradient
    optimizer = torch.optim.SGD([*params, unused, frozen, zero], lr=0.05)
    clara = CLARA(optimizer, c=C, d=0.05)
    loop = SimpleCLARA([p.shape for p in params], C, 0.05, plain_sgd_mu(C))
    for t in range(40):
        compute_grads(params, t)
        zero.grad = torch.zeros_like(zero)
        lr = 0.05 * loop.factor
        optimizer.step()
        loop.update([lr * p.grad for p in params])  # plain SGD's realised step
        assert relative_error(clara.lr_factor, loop.factor) < RTOL
        assert clara.ratio is not None
        assert loop.ratio is not None
        assert relative_error(clara.ratio, loop.ratio) < RTOL
    assert torch.equal(unused, torch.zeros(7, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros(5, dtype=torch.float64))


def test_detach_restores_behaviour_and_removes_hooks() -> None:
    """After detach() the optimizer runs at lr_base, CLARA stops adapting, and a new controller may attach."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.05)
    pre_hooks, post_hooks = len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)
    clara = CLARA(optimizer, c=C, d=0.05)
    assert len(optimizer._optimizer_step_pre_hooks) == pre_hooks + 1
    for t in range(20):
        compute_grads(params, t)
        optimizer.step()
    assert clara.lr_factor != 1.0
    clara.detach()
    assert not clara.attached
    assert len(optimizer._optimizer_step_pre_hooks) == pre_hooks
    assert len(optimizer._optimizer_step_post_hooks) == post_hooks
    factor, steps = clara.lr_factor, clara.num_adapted_steps
    seen: list[list[float]] = []
    _lr_probe(optimizer, seen)
    for t in range(20, 25):
        compute_grads(params, t)
        optimizer.step()
        assert seen[-1] == [0.05]
    assert (clara.lr_factor, clara.num_adapted_steps) == (factor, steps)
    again = CLARA(optimizer)
    assert again.attached


def test_attaching_twice_raises() -> None:
    """Two controllers on one optimizer would multiply their factors: refused."""
    optimizer = torch.optim.SGD(make_params(), lr=0.05)
    CLARA(optimizer)
    with pytest.raises(RuntimeError, match="already"):
        CLARA(optimizer)


def test_step_that_raises_does_not_compound_the_factor() -> None:
    """A closure that raises skips the post-hook: the next step and detach() still see lr_base, not lr_base * F."""
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.05)
    clara = CLARA(optimizer, d=0.05, initial_factor=2.0)

    def failing_closure() -> Tensor:
        raise ArithmeticError("boom")

    with pytest.raises(ArithmeticError):
        optimizer.step(failing_closure)
    seen: list[list[float]] = []
    _lr_probe(optimizer, seen)
    factor = clara.lr_factor
    compute_grads(params, 0)
    optimizer.step()
    assert seen[-1][0] == pytest.approx(0.05 * factor, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == 0.05
    with pytest.raises(ArithmeticError):
        optimizer.step(failing_closure)
    clara.detach()
    assert optimizer.param_groups[0]["lr"] == 0.05


# --------------------------------------------------------------------------------------- checkpoints


CHECKPOINT_CASES: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.003),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_state_dict_round_trip_continues_exactly(case: str) -> None:
    """Save after 50 steps, load into fresh objects, continue 50: bit-identical to the uninterrupted run."""
    make_optimizer = CHECKPOINT_CASES[case]
    params = make_params()
    optimizer = make_optimizer(params)
    clara = CLARA(optimizer, c=C, d=0.05)
    for t in range(50):
        compute_grads(params, t)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(
        {"params": [p.detach() for p in params], "optimizer": optimizer.state_dict(), "clara": clara.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain values and tensors only

    resumed_params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed_optimizer = make_optimizer(resumed_params)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = CLARA(resumed_optimizer, c=C, d=0.05)
    resumed.load_state_dict(checkpoint["clara"])
    assert resumed.lr_factor == clara.lr_factor

    for t in range(50, 100):
        compute_grads(params, t)
        optimizer.step()
        compute_grads(resumed_params, t)
        resumed_optimizer.step()
        assert resumed.lr_factor == clara.lr_factor
        assert resumed.ratio == clara.ratio
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)
    assert resumed.num_adapted_steps == clara.num_adapted_steps == 100


def _trained(params: list[Tensor], **kwargs: Any) -> CLARA:
    """A controller with a few steps behind it, so its state dict has paths."""
    optimizer = torch.optim.SGD(params, lr=0.01)
    clara = CLARA(optimizer, **kwargs)
    for t in range(3):
        compute_grads(params, t)
        optimizer.step()
    return clara


def test_load_state_dict_rejects_mismatches() -> None:
    """Wrong shapes, a different tensor count or another scope are refused rather than silently misapplied."""
    state = _trained(make_params(), sample=None).state_dict()

    transposed = [p.detach().T.clone().requires_grad_() if p.dim() == 2 else p for p in make_params()]
    with pytest.raises(ValueError, match="shape"):
        CLARA(torch.optim.SGD(transposed, lr=0.01), sample=None).load_state_dict(copy.deepcopy(state))
    sampled = _trained(make_params()).state_dict()  # the same size, another shape: the sample means other entries
    with pytest.raises(ValueError, match="shape"):
        CLARA(torch.optim.SGD(transposed, lr=0.01)).load_state_dict(copy.deepcopy(sampled))
    with pytest.raises(ValueError, match="param groups"):
        CLARA(torch.optim.SGD(make_params()[:3], lr=0.01)).load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="scope"):
        CLARA(torch.optim.SGD(make_params(), lr=0.01), scope="param_group").load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="format"):
        CLARA(torch.optim.SGD(make_params(), lr=0.01)).load_state_dict({})


# -------------------------------------------------------------------------------- argument checking


INVALID_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"c": 0.0}, ValueError, "c"),
    ({"c": -0.2}, ValueError, "c"),
    ({"c": 1.5}, ValueError, "c"),
    ({"c": math.nan}, ValueError, "c"),
    ({"c": "x"}, TypeError, "c"),
    ({"c": True}, TypeError, "c"),
    ({"c": [0.2]}, TypeError, "c"),  # None is the rule's default (0.02, or 0.2 with rule="paper")
    ({"d": 0.0}, ValueError, "d"),
    ({"d": -1e-3}, ValueError, "d"),
    ({"d": math.nan}, ValueError, "d"),
    ({"d": math.inf}, ValueError, "d"),
    ({"d": "1e-3"}, TypeError, "d"),
    ({"d": False}, TypeError, "d"),
    ({"scope": "layer"}, ValueError, "scope"),
    ({"scope": 1}, TypeError, "scope"),
    ({"direction": "delta"}, TypeError, "direction"),  # removed in 0.3: the step is always the realised one
    ({"min_factor": 2.0, "max_factor": 1.0}, ValueError, "min_factor"),
    ({"min_lr": 1e-2, "max_lr": 1e-3}, ValueError, "min_lr"),
    ({"min_factor": -1.0}, ValueError, "min_factor"),
    ({"max_factor": 0.0}, ValueError, "max_factor"),
    ({"min_lr": -1e-3}, ValueError, "min_lr"),
    ({"max_lr": -1.0}, ValueError, "max_lr"),
    ({"max_lr": math.nan}, ValueError, "max_lr"),
    ({"max_factor": "2"}, TypeError, "max_factor"),
    ({"initial_factor": 0.0}, ValueError, "initial_factor"),
    ({"fast_start": -1}, ValueError, "fast_start"),
    ({"fast_start": 2.5}, TypeError, "fast_start"),
    ({"fast_start": True}, TypeError, "fast_start"),
    ({"hold_after": -1}, ValueError, "hold_after"),
    ({"hold_after": 10.0}, TypeError, "hold_after"),
    ({"target": 0.0}, ValueError, "target"),
    ({"target": math.inf}, ValueError, "target"),
    ({"target": "0.7"}, TypeError, "target"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), INVALID_ARGUMENTS, ids=[repr(k) for k, _, _ in INVALID_ARGUMENTS])
def test_invalid_arguments_raise_naming_the_argument(kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
    """Every bad option fails at construction with a message that names it."""
    optimizer = torch.optim.SGD(make_params(), lr=0.01)
    with pytest.raises(error) as excinfo:
        CLARA(optimizer, **kwargs)
    assert re.search(rf"\b{name}\b", str(excinfo.value)), str(excinfo.value)
    CLARA(optimizer)  # a failed construction must not leave the optimizer hooked


def test_fast_start_damping_schedule() -> None:
    """The damping starts at 20 d and falls linearly to d over ``fast_start`` adapted steps; the paper's
    preset and ``fast_start=0`` keep d from the first step, and the setting is saved with the state."""
    data = iter(range(10**6))

    def stepped(clara: CLARA, steps: int) -> None:
        for _ in range(steps):
            for p in clara.optimizer.param_groups[0]["params"]:
                p.grad = torch.randn_like(p, generator=torch.Generator().manual_seed(next(data)))
            clara.optimizer.step()

    clara = CLARA(torch.optim.SGD(make_params(), lr=0.01), d=0.01)
    assert clara.fast_start == 50
    damping = [clara.damping]
    for _ in range(60):
        stepped(clara, 1)
        damping.append(clara.damping)
    expected = [0.01 * (1 + 19 * max(0.0, 1 - t / 50)) for t in range(61)]
    assert damping == pytest.approx(expected, rel=1e-12)
    assert damping[0] == pytest.approx(0.2)
    assert damping[25] == pytest.approx(0.105)
    assert damping[50] == 0.01
    assert clara.state_dict()["config"]["fast_start"] == 50
    assert CLARA.paper(torch.optim.SGD(make_params(), lr=0.01)).damping == 1e-3
    off = CLARA(torch.optim.SGD(make_params(), lr=0.01), d=0.01, fast_start=0)
    stepped(off, 3)
    assert off.damping == 0.01


def test_resume_continues_the_fast_start() -> None:
    """The schedule counts adapted steps, which the state dict restores: a resumed controller is
    half-way through its fast start like the original."""
    optimizer = torch.optim.SGD(make_params(), lr=0.01)
    clara = CLARA(optimizer, d=0.01, fast_start=10)
    for t in range(4):
        compute_grads(optimizer.param_groups[0]["params"], t)
        optimizer.step()
    state = clara.state_dict()
    clara.detach()
    resumed = CLARA(torch.optim.SGD(make_params(), lr=0.01), d=0.01, fast_start=10)
    resumed.load_state_dict(state)
    assert resumed.damping == pytest.approx(0.01 * (1 + 19 * 0.6)) == clara.damping


def test_boundary_values_are_accepted() -> None:
    """c = 1 (no memory) and equal bounds are valid."""
    CLARA(torch.optim.SGD(make_params(), lr=0.01), c=1.0, min_factor=1.0, max_factor=1.0, min_lr=0.01, max_lr=0.01)


def test_unsupported_optimizer_raises_type_error_naming_supported_ones() -> None:
    """LBFGS (closure-driven line search) has no random-walk reference: TypeError listing what works."""
    optimizer = torch.optim.LBFGS(make_params())
    with pytest.raises(TypeError) as excinfo:
        CLARA(optimizer)
    message = str(excinfo.value)
    assert "LBFGS" in message
    assert re.search(r"\bSGD\b", message), message
    assert re.search(r"\bAdam\b", message), message
    with pytest.raises(TypeError, match="optimizer"):
        CLARA(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- counters and bounds


def drive(clara: CLARA, params: list[Tensor], grads: Iterator[list[Tensor | None]], steps: int) -> list[float]:
    """Feed ``steps`` synthetic gradients through optimizer.step(); returns the lr used at each step."""
    used = []
    for _ in range(steps):
        set_grads(params, next(grads))
        clara.optimizer.step()
        used.append(clara.lr_used[0])
    return used


def constant(direction: list[Tensor]) -> Iterator[list[Tensor | None]]:
    """The same gradient forever: u_t constant, r -> 1/mu, F grows."""
    while True:
        yield list(direction)


def alternating(direction: list[Tensor]) -> Iterator[list[Tensor | None]]:
    """+g, -g, +g, ...: r -> c/(2-c) for plain SGD, F shrinks."""
    sign = 1.0
    while True:
        yield [sign * g for g in direction]
        sign = -sign


def test_num_adapted_steps_counts_real_steps() -> None:
    """One count per optimizer step that moved something."""
    params = synthetic_params()
    clara = CLARA(torch.optim.SGD(params, lr=1e-3))
    direction = fixed_direction(params)
    for k in range(1, 8):
        drive(clara, params, constant(direction), 1)
        assert clara.num_adapted_steps == k
    assert clara.num_skipped_steps == 0


@pytest.mark.parametrize(("min_factor", "max_factor"), [(0.5, 2.0), (0.1, 3.0), (0.2, 10.0)])
def test_factor_bounds_hold_exactly_without_wind_up(min_factor: float, max_factor: float) -> None:
    """F never leaves [min_factor, max_factor] (not even by rounding), and leaves a bound as soon as r crosses 1."""
    params = synthetic_params()
    lr = 1e-3
    clara = CLARA(torch.optim.SGD(params, lr=lr), d=0.5, min_factor=min_factor, max_factor=max_factor, rule="paper")
    direction = fixed_direction(params)
    used = drive(clara, params, constant(direction), 60)  # r -> 9: F pinned at the top
    assert clara.lr_factor <= max_factor
    assert clara.lr_factor == pytest.approx(max_factor, rel=1e-12)
    assert all(u <= lr * max_factor for u in used)
    used = drive(clara, params, alternating(direction), 10)  # r < 1 after a few steps: F must drop at once
    assert used[-1] < lr * max_factor * (1 - 1e-3)
    used = drive(clara, params, alternating(direction), 60)  # r -> c/(2-c): F pinned at the bottom
    assert clara.lr_factor >= min_factor
    assert clara.lr_factor == pytest.approx(min_factor, rel=1e-12)
    assert all(lr * min_factor <= u <= lr * max_factor for u in used)
    used = drive(clara, params, constant(direction), 6)
    assert used[-1] > lr * min_factor * (1 + 1e-3)


def test_lr_bounds_hold_exactly_without_wind_up() -> None:
    """lr used stays in [min_lr, max_lr] exactly, and F does not keep growing behind a binding bound."""
    params = synthetic_params()
    lr, min_lr, max_lr = 1e-3, 3e-4, 3e-3
    seen: list[list[float]] = []
    optimizer = torch.optim.SGD(params, lr=lr)
    clara = CLARA(optimizer, c=C, d=0.5, min_lr=min_lr, max_lr=max_lr, target=1.0, initial_factor=1.0)
    _lr_probe(optimizer, seen)
    direction = fixed_direction(params)
    used = drive(clara, params, constant(direction), 60)
    assert used[-1] == max_lr
    assert seen[-1][0] == max_lr
    used = drive(clara, params, alternating(direction), 10)
    assert used[-1] < max_lr * (1 - 1e-3)
    used = drive(clara, params, alternating(direction), 60)
    assert used[-1] == min_lr
    assert seen[-1][0] == min_lr
    used = drive(clara, params, constant(direction), 6)
    assert used[-1] > min_lr * (1 + 1e-3)
    assert all(min_lr <= s[0] <= max_lr for s in seen)


def test_nan_gradient_warns_and_keeps_factor_finite() -> None:
    """A NaN step is excluded with a RuntimeWarning and counted; F stays finite and the others still adapt."""
    params = synthetic_params()
    clara = CLARA(torch.optim.SGD(params, lr=1e-3), d=0.1, skip_nonfinite=False)  # the step runs
    direction = fixed_direction(params)
    drive(clara, params, constant(direction), 5)
    poisoned = [direction[0], torch.full_like(direction[1], math.nan), direction[2]]
    with pytest.warns(RuntimeWarning, match="NaN"):
        drive(clara, params, constant(poisoned), 1)
    assert clara.num_skipped_steps == 1
    assert clara.num_adapted_steps == 6  # the two finite tensors adapted
    assert clara.ratio is not None
    assert math.isfinite(clara.ratio)
    assert math.isfinite(clara.lr_factor)
    assert clara.lr_factor > 0
    all_nan = [torch.full_like(g, math.nan) for g in direction]
    factor = clara.lr_factor
    with pytest.warns(RuntimeWarning):
        drive(clara, params, constant(all_nan), 1)
    assert clara.num_skipped_steps == 2
    assert clara.lr_factor == factor


@pytest.mark.parametrize("pattern", [constant, alternating])
def test_extreme_damping_keeps_factor_finite_and_positive(
    pattern: Callable[[list[Tensor]], Iterator[list[Tensor | None]]],
) -> None:
    """Even d = 100 cannot drive F to inf or 0 (nor the lr used to NaN)."""
    params = synthetic_params()
    clara = CLARA(torch.optim.SGD(params, lr=1e-3), d=100.0)
    used = drive(clara, params, pattern(fixed_direction(params)), 100)
    assert all(math.isfinite(u) and u > 0 for u in used)
    assert math.isfinite(clara.lr_factor)
    assert clara.lr_factor > 0


def test_param_group_scope_gives_independent_factors() -> None:
    """Per-group scope: each group's factor follows the loop run on that group alone."""
    first, second = synthetic_params((1, 7)), synthetic_params((300, 10))
    optimizer = torch.optim.SGD([{"params": first, "lr": 1e-3}, {"params": second, "lr": 2e-3}])
    clara = CLARA(optimizer, c=C, d=0.05, scope="param_group")
    loops = [SimpleCLARA([p.shape for p in group], C, 0.05, plain_sgd_mu(C)) for group in (first, second)]
    up, down = fixed_direction(first), fixed_direction(second)
    sign = 1.0
    for _ in range(80):
        set_grads(first, up)  # constant: this group's F grows
        set_grads(second, [sign * g for g in down])  # alternating: this one's shrinks
        sign = -sign
        lrs = [1e-3 * loops[0].factor, 2e-3 * loops[1].factor]
        optimizer.step()
        assert clara.lr_used == pytest.approx(lrs, rel=RTOL)
        loops[0].update([lrs[0] * p.grad for p in first])
        loops[1].update([lrs[1] * p.grad for p in second])
        for got, loop in zip(clara.lr_factors, loops, strict=True):
            assert relative_error(got, loop.factor) < RTOL
    assert clara.lr_factors[0] > 1.0 > clara.lr_factors[1]


def test_optimizer_scope_shares_one_factor() -> None:
    """Default scope: one factor over all groups, fed by the sums over all their tensors."""
    first, second = synthetic_params((1, 7)), synthetic_params((300, 10))
    optimizer = torch.optim.SGD([{"params": first, "lr": 1e-3}, {"params": second, "lr": 2e-3}])
    clara = CLARA(optimizer, c=C, d=0.05)
    loop = SimpleCLARA([p.shape for p in first + second], C, 0.05, plain_sgd_mu(C))
    grads = fixed_direction(first + second)
    for _ in range(30):
        set_grads(first + second, grads)
        lr = loop.factor
        optimizer.step()
        loop.update([lr * p.grad for p in first + second])
        assert clara.lr_factors[0] == clara.lr_factors[1]
        assert relative_error(clara.lr_factor, loop.factor) < RTOL
