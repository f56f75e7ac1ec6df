"""Edge cases of the step's lifecycle found in review: each test failed on the code before its fix."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_clara import CLARA
from tests.helpers import defer_pending_steps


def _two_groups(**defaults: object) -> tuple[torch.nn.Parameter, torch.nn.Parameter, list[dict[str, object]]]:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    return a, b, [{"params": [a]}, {"params": [b], **defaults}]


def test_a_tensor_lr_shared_by_groups_keeps_its_base() -> None:
    """torch gives every group the same tensor when the constructor gets a tensor lr: the swap must save every
    base before it writes any, or the second group saves the lr used and F compounds each step."""
    a, b, groups = _two_groups()
    optimizer = torch.optim.Adam(groups, lr=torch.tensor(1e-2))
    assert optimizer.param_groups[0]["lr"] is optimizer.param_groups[1]["lr"]
    clara = CLARA(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        (a.sum() + b.sum()).backward()
        optimizer.step()
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2)
        assert clara.lr_used[0] == pytest.approx(1e-2 * clara.lr_factor, rel=0.05)  # F of the step before


def test_a_tensor_lr_shared_by_groups_with_their_own_factors_is_refused() -> None:
    """Per-group factors (``scope="param_group"``) cannot share one tensor lr: the last group's write stepped
    every group while ``lr_used`` reported each group's own lr. Refused at attach; a group added later with
    the same tensor, at the first step whose lrs differ, before any lr is written (the tensor keeps its base)."""
    a, b, groups = _two_groups()
    shared = torch.optim.Adam(groups, lr=torch.tensor(1e-2))
    with pytest.raises(ValueError, match=r"param groups 0 and 1 share one lr tensor"):
        CLARA(shared, scope="param_group")
    assert getattr(shared, "_clara_controller", None) is None
    optimizer = torch.optim.Adam([a], lr=torch.tensor(1e-2))
    clara = CLARA(optimizer, scope="param_group")
    optimizer.add_param_group({"params": [b], "lr": optimizer.param_groups[0]["lr"]})
    for _ in range(2):  # the first ratio is 1 in every scope, so both groups step at one lr twice
        a.grad, b.grad = torch.ones(50), torch.randn(50)
        optimizer.step()
    assert clara.lr_factors[0] != clara.lr_factors[1]  # a's and b's gradients parted them
    with pytest.raises(ValueError, match=r"param groups 0 and 1 share one lr tensor.*, here 0\.001"):
        optimizer.step()
    assert clara.num_adapted_steps == 2
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2)


def test_a_group_at_lr_zero_stays_frozen_under_min_lr() -> None:
    """``min_lr`` bounds the groups that move; a group whose base lr is 0 (frozen by its lr, a warm-up's
    first step) must not be trained at ``min_lr``."""
    a, b, groups = _two_groups(lr=0.0)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    clara = CLARA(optimizer, min_lr=1e-3)
    before = b.detach().clone()
    optimizer.zero_grad()
    (a.sum() + b.sum()).backward()
    optimizer.step()
    assert clara.lr_used[1] == 0.0
    assert torch.equal(b.detach(), before)
    assert clara.lr_used[0] >= 1e-3


@pytest.mark.parametrize("when", ["before the first step", "after a step"])
def test_lr_used_covers_a_group_added_since_the_last_step(when: str) -> None:
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([p], lr=0.1)
    clara = CLARA(optimizer, scope="param_group")
    if when == "after a step":
        p.grad = torch.ones(5)
        optimizer.step()
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))], "lr": 0.2})
    used = clara.lr_used
    assert len(used) == 2
    assert used[1] == pytest.approx(0.2 * clara.initial_factor)


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), "1.0", None])
@pytest.mark.parametrize("loss_brake", [True, False])
def test_observe_loss_refuses_anything_but_one_number(bad: object, loss_brake: bool) -> None:
    """A wrong loss is refused whether or not CLARA wants losses, and does not use up the step's loss."""
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([p], lr=0.1)
    clara = CLARA(optimizer, loss_brake=loss_brake)
    p.grad = torch.ones(5)
    optimizer.step()
    with pytest.raises((TypeError, ValueError), match="observe_loss: loss must be"):
        clara.observe_loss(bad)  # type: ignore[arg-type]
    clara.observe_loss(torch.tensor(3.0))
    if loss_brake:
        assert clara._losses.last_loss == 3.0


@pytest.mark.parametrize("kind", ["numpy scalar", "0-dim array"])
def test_numpy_numbers_are_losses(kind: str) -> None:
    np = pytest.importorskip("numpy")
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([p], lr=0.1)
    clara = CLARA(optimizer)
    p.grad = torch.ones(5)
    optimizer.step()
    clara.observe_loss(np.float32(2.5) if kind == "numpy scalar" else np.array(2.5))
    assert clara._losses.last_loss == 2.5
    with pytest.raises(TypeError, match="observe_loss"):
        clara.observe_loss(np.array([1.0, 2.0]))


def test_detach_under_a_scheduler_made_later_leaves_the_step_alone() -> None:
    """A scheduler made after attaching wraps CLARA's wrapper, which then cannot be unwrapped: detached, it must
    pass through (no NaN skip of its own), and a new controller's skips must reach the new controller."""
    p = torch.nn.Parameter(torch.ones(5))
    optimizer = torch.optim.SGD([p], lr=0.1)
    old = CLARA(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    old.detach()
    p.grad = torch.full((5,), math.nan)
    optimizer.step()
    assert old.num_skipped_updates == 0
    assert bool(torch.isnan(p).all())  # stepped as given: nothing of the old controller is left

    p.data.fill_(1.0)
    new = CLARA(optimizer, initial_factor=3.0)

    def closure() -> torch.Tensor:
        p.grad = torch.full((5,), math.nan)
        return torch.tensor(1.0)

    with pytest.warns(RuntimeWarning, match="skipped an update"):
        optimizer.step(closure)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the base is back
    assert new.num_skipped_updates == 1
    scheduler.step()
    for _ in range(3):
        p.grad = torch.randn(5)
        optimizer.step()
    assert new.num_adapted_steps == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_state_dict_taken_inside_a_step_holds_the_base_lrs() -> None:
    """A checkpoint saved from inside the step (``training_step``, a SLURM requeue) must not store the lr used as
    the base: the resumed run would apply F twice."""
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([p], lr=0.01)
    clara = CLARA(optimizer)
    saved: list[dict[str, object]] = []

    def closure() -> torch.Tensor:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * clara.lr_factor)  # the lr used, inside
        saved.append(optimizer.state_dict())
        p.grad = torch.ones(5)
        return torch.tensor(1.0)

    optimizer.step(closure)
    assert saved[0]["param_groups"][0]["lr"] == 0.01  # type: ignore[index]
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.01


def test_a_state_dict_inside_a_step_keeps_a_tensor_base() -> None:
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.Adam([p], lr=torch.tensor(0.01))
    CLARA(optimizer)
    saved: list[dict[str, object]] = []

    def closure() -> torch.Tensor:
        saved.append(optimizer.state_dict())
        p.grad = torch.ones(5)
        return torch.tensor(1.0)

    optimizer.step(closure)
    base = saved[0]["param_groups"][0]["lr"]  # type: ignore[index]
    assert isinstance(base, torch.Tensor)
    assert base is not optimizer.param_groups[0]["lr"]
    assert float(base) == pytest.approx(0.01)


def test_a_fused_step_that_gradscaler_skips_is_not_judged_nor_counted() -> None:
    """GradScaler hands a fused optimizer its own ``found_inf``: the overflowed step never moves the parameters,
    so its loss is ignored (no alarm, no halving of F) and the skip is GradScaler's, not counted as CLARA's."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    optimizer = torch.optim.Adam([p], lr=1e-2, fused=True)
    clara = CLARA(optimizer, safeguard=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for _ in range(15):
        optimizer.zero_grad()
        loss = (p * torch.randn(50)).sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        clara.observe_loss(loss)
    good, factor = p.detach().clone(), clara.lr_factor
    optimizer.zero_grad()
    loss = (p * math.inf).sum()
    scaler.scale(loss).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no alarm, no "skipped an update"
        scaler.step(optimizer)
        scaler.update()
        assert clara.observe_loss(loss) is False
    assert torch.equal(p.detach(), good)
    assert clara.lr_factor == factor
    assert clara.num_skipped_updates == 0
    assert "found_inf" not in optimizer.__dict__


@pytest.mark.parametrize(
    "make", [torch.optim.Adam, torch.optim.RAdam, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9)]
)
def test_a_parameter_with_no_entries_is_carried_along(make: object) -> None:
    """``nn.Parameter(torch.empty(0))`` (a device marker) used to fail at attach (a reference of size 0): it
    never moves, so CLARA runs as without it."""
    ratios = []
    for with_marker in (True, False):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        params = [p, torch.nn.Parameter(torch.empty(0))] if with_marker else [p]
        optimizer = make(params, 1e-2)  # type: ignore[operator]
        clara = CLARA(optimizer)
        for _ in range(5):
            for param in params:
                param.grad = torch.randn(param.shape)
            optimizer.step()
        ratios.append(clara.ratio)
    assert ratios[0] == ratios[1]


def test_a_path_memory_longer_than_the_references_is_refused() -> None:
    """The references span at most 4096 steps: at c = 1e-4 a random walk's path still grows there, the
    reference would be 44 % low and r on noise 1.8x too high, so c < 1e-3 is refused by name."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.randn(5))], lr=0.1)
    with pytest.raises(ValueError, match=r"c must be in \[0\.001, 1\.0\], got 0\.0001"):
        CLARA(optimizer, c=1e-4)
    CLARA(optimizer, c=1e-3).detach()


def test_fsdp1_parameters_are_refused_by_name() -> None:
    """FSDP1 marks its flat parameters (and the originals it views) ``_fsdp_flattened``: each rank holds a flat
    shard, so every rank would adapt on its own; refused, pointing at FSDP2."""
    param = torch.nn.Parameter(torch.randn(5))
    param._fsdp_flattened = True  # type: ignore[attr-defined]  # what torch's FlatParameter construction sets
    with pytest.raises(TypeError, match=r"FSDP1.*fully_shard"):
        CLARA(torch.optim.SGD([param], lr=0.1))


def test_an_undo_goes_back_two_steps_that_ran_across_a_device_skip() -> None:
    """A fused optimizer skips a NaN update on its device flag: the post-hook runs, but the parameters did not
    move, so the restore point must not count that step either."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    optimizer = torch.optim.Adam([w], lr=0.1, fused=True)
    clara = CLARA(optimizer, safeguard=True)
    history = [w.detach().clone()]

    def step(bad: bool = False, loss: float = 1.0) -> bool:
        optimizer.zero_grad()
        (w**2).sum().backward()
        if bad:
            w.grad[0] = math.nan  # type: ignore[index]
        optimizer.step()
        history.append(w.detach().clone())
        return clara.observe_loss(loss)

    step()
    step()
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        step(bad=True)
    assert torch.equal(history[2], history[3])  # the skipped step moved nothing
    with pytest.warns(RuntimeWarning, match=r"before the last 2 step\(s\)"):
        assert step(loss=math.inf) is True
    assert torch.equal(w.detach(), history[1])  # before steps 2 and 4, the last two that ran


def test_lr_bounds_clamp_against_the_steps_own_base_lr_however_late_it_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a step settles at the next pre-hook, after ``scheduler.step()`` changed the base lr: the clamp to
    ``max_lr`` must still use the base lr that step ran at, so F does not depend on the device."""

    def run(deferred: bool) -> list[float]:
        with monkeypatch.context() as patch:
            if deferred:
                defer_pending_steps(patch)
            weight = torch.nn.Parameter(torch.zeros(64))
            optimizer = torch.optim.SGD([weight], lr=0.1)
            clara = CLARA(optimizer, max_lr=0.05, initial_factor=1.0)
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
            generator = torch.Generator().manual_seed(0)
            for _ in range(12):
                weight.grad = 1.0 + 0.1 * torch.randn(64, generator=generator)  # agreeing steps: F presses on max_lr
                optimizer.step()
                scheduler.step()
            return clara.log_factors

    host = run(deferred=False)
    assert host == run(deferred=True)
    assert host[0] > math.log(0.05 / 0.1)  # the bound moved with the falling base lr: it bound, and not only once


def _stepped(clara: CLARA, steps: int = 5) -> None:
    for _ in range(steps):
        for group in clara.optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        clara.optimizer.step()


def test_an_lr_bound_against_a_factor_bound_wins_and_log_f_stays_within_both() -> None:
    """min_lr 10x the base lr with max_factor 1: the lr used is min_lr (the lr bounds win), but log F was pushed
    to log 10 while F read 1, so clara/log_factor and lr_factor disagreed."""
    param = torch.nn.Parameter(torch.zeros(3))
    clara = CLARA(torch.optim.SGD([param], lr=1e-3), max_factor=1.0, min_lr=1e-2)
    _stepped(clara)
    assert clara.lr_used == [pytest.approx(1e-2)]
    assert clara.log_factors[0] <= 0.0
    assert clara.lr_factor == pytest.approx(math.exp(clara.log_factors[0]))


def test_a_negative_scheduled_lr_is_refused_not_flipped() -> None:
    """A scheduler's negative lr came out of min_lr with its sign flipped (ascent became descent)."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1e-2)
    clara = CLARA(optimizer, min_lr=1e-3)
    _stepped(clara, 1)
    optimizer.param_groups[0]["lr"] = -1e-2
    with pytest.raises(ValueError, match="positive learning rate"):
        _stepped(clara, 1)


def test_a_checkpoint_of_another_variant_restarts_the_paths() -> None:
    """SALeRA keeps gradient paths, CLARA realised-step paths: loading one into the other restarts them."""
    param = torch.nn.Parameter(torch.zeros(3))
    salera = CLARA(torch.optim.Adam([param]), variant="salera")
    _stepped(salera)
    clara = CLARA(torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))]))
    with pytest.warns(RuntimeWarning, match="variant='salera'.*the paths restart"):
        clara.load_state_dict(salera.state_dict())
