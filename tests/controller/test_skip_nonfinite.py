"""A bad batch never ruins a run (issue 21): an update whose gradients hold NaN/inf is skipped.

What must hold after such a step, with and without a closure, for SGD with momentum, Adam and AdamW:
the parameters *and* the optimizer's state are what they were before it, the scheduled lr is back in
the param groups, one warning is issued however many steps are skipped, and the run goes on as if
the bad batches had never been drawn.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import defer_pending_steps
from torch import nn

from lightning_clara import CLARA, CLARAOptions
from lightning_clara.finite_guard import gradients_finite

LR = 0.01
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGDm": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=LR),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01),
    # fused: the optimizer skips on CLARA's device flag (optimizer.found_inf), no host read decides
    "SGDm-fused": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, fused=True),
    "Adam-fused": lambda params: torch.optim.Adam(params, lr=LR, fused=True),
    "AdamW-fused": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=True),
}


def setup(name: str, seed: int = 0, **options: Any) -> tuple[nn.Module, torch.optim.Optimizer, CLARA, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = OPTIMIZERS[name](model.parameters())
    batches = torch.randn(60, 8, 7)  # 60 batches of 8 rows: 6 inputs and a target
    return model, optimizer, CLARA(optimizer, **options), batches


def poison(batch: torch.Tensor, how: str) -> torch.Tensor:
    """A NaN input row (NaN loss and gradients), or nothing here: the inf entry is put into a gradient."""
    batch = batch.clone()
    if how == "nan loss":
        batch[0, 0] = math.nan
    return batch


def run_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, closure: bool, inf_grad: bool = False
) -> Any:
    def compute() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(batch[:, :6]), batch[:, 6:])
        loss.backward()
        if inf_grad:
            model[0].weight.grad[3, 2] = math.inf  # type: ignore[index]
        return loss

    if closure:
        return optimizer.step(compute)
    compute()
    return optimizer.step()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("closure", [False, True], ids=["no closure", "closure"])
@pytest.mark.parametrize("how", ["nan loss", "inf gradient"])
def test_a_poisoned_step_leaves_parameters_and_optimizer_state(name: str, closure: bool, how: str) -> None:
    model, optimizer, clara, batches = setup(name)
    for batch in batches[:10]:
        run_step(model, optimizer, batch, closure)
    params, state = snapshot(model, optimizer)
    factor, steps = clara.lr_factor, clara.num_optimizer_steps
    with pytest.warns(RuntimeWarning, match="skipped an update of"):
        returned = run_step(model, optimizer, poison(batches[10], how), closure, inf_grad=how == "inf gradient")
    assert_same([p.detach() for p in model.parameters()], params)
    assert_same(optimizer.state_dict(), state)
    assert optimizer.param_groups[0]["lr"] == LR  # the scheduled lr, not LR x F
    ran = 1 if name.endswith("fused") else 0  # a fused step runs, as a no-op on its device flag
    assert (clara.lr_factor, clara.num_optimizer_steps, clara.num_skipped_updates) == (factor, steps + ran, 1)
    if closure:  # the closure's loss comes back, as from any step
        assert isinstance(returned, torch.Tensor)
        assert math.isnan(returned.item()) or how == "inf gradient"
    run_step(model, optimizer, batches[11], closure)  # and the run goes on
    assert clara.num_optimizer_steps == steps + ran + 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_batches_every_k_steps_leave_the_run_as_if_they_were_never_drawn(name: str) -> None:
    """Skipped steps change nothing CLARA or the optimizer keeps: the run equals one without those batches."""
    model, optimizer, clara, batches = setup(name)
    bad = set(range(3, 60, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, batch in enumerate(batches):
            if t in bad:
                run_step(model, optimizer, poison(batch, "nan loss"), closure=t % 2 == 0)
                assert clara.observe_loss(math.nan) is False  # no step ran: the loss is not judged
            else:
                loss = run_step(model, optimizer, batch, closure=t % 2 == 0)
                if loss is not None:
                    clara.observe_loss(loss)
    ours = [w for w in caught if "skipped an update" in str(w.message)]
    assert len(ours) == 1  # one warning, not one per skipped step
    assert clara.num_skipped_updates == len(bad)

    clean_model, clean_optimizer, clean, _ = setup(name)
    for t, batch in enumerate(batches):
        if t not in bad:
            loss = run_step(clean_model, clean_optimizer, batch, closure=t % 2 == 0)
            if loss is not None:
                clean.observe_loss(loss)
    assert clara.log_factors == clean.log_factors
    assert clara.num_adapted_steps == clean.num_adapted_steps
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in clean_model.parameters()])
    assert_same(optimizer.state_dict(), clean_optimizer.state_dict())


def test_a_nan_batch_with_the_safeguard_raises_no_alarm_and_keeps_f() -> None:
    model, optimizer, clara, batches = setup("Adam", safeguard=True)
    for batch in batches[:20]:
        clara.observe_loss(run_step(model, optimizer, batch, closure=True))
    factor = clara.lr_factor
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        loss = run_step(model, optimizer, poison(batches[20], "nan loss"), closure=True)
    assert clara.observe_loss(loss) is False
    assert (clara.num_safeguard_alarms, clara.lr_factor) == (0, factor)


def test_skip_nonfinite_false_steps_the_nan_as_given() -> None:
    """The switch is real: without it a NaN gradient reaches Adam's moments (what issue 21 measured)."""
    model, optimizer, clara, batches = setup("Adam", skip_nonfinite=False)
    run_step(model, optimizer, poison(batches[0], "nan loss"), closure=False)
    assert clara.num_skipped_updates == 0
    assert not bool(torch.isfinite(model[0].weight).all())


def test_skipped_updates_are_saved_checked_and_restored() -> None:
    model, optimizer, clara, batches = setup("SGDm")
    with pytest.warns(RuntimeWarning):
        run_step(model, optimizer, poison(batches[0], "nan loss"), closure=False)
    state = clara.state_dict()
    assert state["num_skipped_updates"] == 1
    _, _, fresh, _ = setup("SGDm")
    fresh.load_state_dict(state)
    assert fresh.num_skipped_updates == 1
    _, _, other, _ = setup("SGDm")
    for bad in (-1, 1.5, math.nan, "2"):
        with pytest.raises(ValueError, match="num_skipped_updates"):
            other.load_state_dict({**state, "num_skipped_updates": bad})
    del state["num_skipped_updates"]  # a state saved before the option: 0
    other.load_state_dict(state)
    assert other.num_skipped_updates == 0


def test_the_check_sees_every_kind_of_gradient() -> None:
    """NaN and inf, in fp32, fp64 and bf16 tensors, sparse gradients, and none at all."""
    params = [nn.Parameter(torch.zeros(3, dtype=dtype)) for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    assert gradients_finite(optimizer)  # no gradient yet
    for p in params:
        p.grad = torch.ones_like(p)
    assert gradients_finite(optimizer)
    for p in params:
        for bad in (math.nan, math.inf, -math.inf):
            p.grad[1] = bad
            assert not gradients_finite(optimizer)
            p.grad[1] = 1.0
    assert torch.equal(params[0].grad, torch.ones(3))  # the check leaves the values as they are
    embedding = nn.Embedding(5, 2, sparse=True)
    sparse = torch.optim.SGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    assert gradients_finite(sparse)
    embedding.weight.grad = torch.sparse_coo_tensor([[1]], [[math.nan, 0.0]], (5, 2))
    assert not gradients_finite(sparse)


def test_the_option_is_checked_and_on_by_default() -> None:
    assert CLARAOptions().skip_nonfinite is True
    assert CLARAOptions.paper().skip_nonfinite is True
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        CLARAOptions(skip_nonfinite=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheduler_after", [False, True])
def test_the_skip_warning_points_at_the_optimizer_step_call(scheduler_after: bool) -> None:
    """However many wrappers lie between (CLARA's; a scheduler made after CLARA wraps the step once more)."""
    _, optimizer, _, _ = setup("SGDm")
    if scheduler_after:
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, math.nan)
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(RuntimeWarning, match="skipped an update") as caught:
        optimizer.step()
    skips = [w for w in caught if "skipped an update" in str(w.message)]
    assert [(Path(w.filename).name, w.lineno) for w in skips] == [(Path(__file__).name, line)]


@pytest.mark.parametrize("name", ["SGDm-fused", "Adam-fused", "AdamW-fused"])
def test_a_fused_optimizer_decides_on_the_device_flag(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No host read decides a fused optimizer's skip (on CUDA, no synchronisation): the flag goes to the step as
    ``found_inf``, is gone afterwards, and is read with the step's results only to count the skip."""
    import lightning_clara.lr_swap as lr_swap

    def host_read(optimizer: torch.optim.Optimizer) -> bool:
        raise AssertionError("the host decision ran for a fused optimizer")

    model, optimizer, clara, batches = setup(name)
    run_step(model, optimizer, batches[0], closure=False)  # fused SGD's momentum buffers exist from here on
    monkeypatch.setattr(lr_swap, "gradients_finite", host_read)
    seen: list[Any] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(getattr(opt, "found_inf", None)))
    run_step(model, optimizer, batches[1], closure=False)
    params, state = snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        run_step(model, optimizer, poison(batches[2], "nan loss"), closure=False)
    assert [float(flag) for flag in seen] == [0.0, 1.0]  # each step saw its own 0-dim device flag
    assert not hasattr(optimizer, "found_inf")
    assert_same([p.detach() for p in model.parameters()], params)
    assert_same(optimizer.state_dict(), state)
    assert (clara.num_skipped_updates, clara.num_adapted_steps) == (1, 2)
    assert clara.observe_loss(math.nan) is False  # the skipped update's loss is not taken


def test_a_grad_scaler_flag_is_left_to_the_scaler() -> None:
    """Where GradScaler drives a fused step (its ``found_inf`` set on the optimizer), its flag decides: CLARA
    neither replaces nor removes it, and counts no skip of its own."""
    model, optimizer, clara, batches = setup("Adam-fused")
    run_step(model, optimizer, batches[0], closure=False)
    params = [p.detach().clone() for p in model.parameters()]
    scaler_flag = torch.ones(())  # the scaler found an overflow in the (scaled) gradients
    optimizer.found_inf = scaler_flag  # type: ignore[attr-defined]
    run_step(model, optimizer, batches[1], closure=False)
    assert optimizer.found_inf is scaler_flag  # type: ignore[attr-defined]
    del optimizer.found_inf  # type: ignore[attr-defined]
    assert_same([p.detach() for p in model.parameters()], params)
    assert clara.num_skipped_updates == 0


def test_a_fused_skip_on_a_deferred_step_is_counted_when_it_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's deferred host part, emulated on the CPU: the device flag travels with the step's results, the skip
    is counted when the step settles (reading the count never waits), and the skipped update's loss is dropped."""
    defer_pending_steps(monkeypatch)
    model, optimizer, clara, batches = setup("AdamW-fused")
    for batch in batches[:3]:
        clara.observe_loss(run_step(model, optimizer, batch, closure=True))
    trend = clara._losses.trend
    run_step(model, optimizer, poison(batches[3], "nan loss"), closure=True)
    assert clara.num_skipped_updates == 0  # the step has not settled: the count does not wait for it
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        assert clara.observe_loss(torch.tensor(math.nan)) is False  # a host loss settles the step first
    assert clara.num_skipped_updates == 1
    assert clara._losses.trend == trend  # the NaN loss never reached the brake
    clara.observe_loss(run_step(model, optimizer, batches[4], closure=True))
    assert clara._losses.trend != trend  # the next step's loss does
    assert clara.num_adapted_steps == 4


def test_a_fused_sgd_skip_before_its_momentum_exists_is_decided_on_the_host() -> None:
    """Fused SGD with momentum makes its buffers with ``empty_like`` before its kernel would skip: a bad first
    batch must not step at all (the host decides until the buffers exist), or the next step reads garbage."""
    model, optimizer, clara, batches = setup("SGDm-fused")
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        run_step(model, optimizer, poison(batches[0], "nan loss"), closure=False)
    assert optimizer.state_dict()["state"] == {}  # no step ran: no buffer was made
    assert clara.num_optimizer_steps == 0
    for batch in batches[1:4]:
        run_step(model, optimizer, batch, closure=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert clara.num_skipped_updates == 1


@pytest.mark.parametrize("name", ["Adam", "Adam-fused"])
def test_the_check_works_whatever_the_default_dtype(name: str) -> None:
    """torch's non-finite check needs a float32 flag: under ``set_default_dtype(float64)`` every step raised."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(4, 1)
        optimizer = OPTIMIZERS[name](model.parameters())
        clara = CLARA(optimizer)
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        assert clara.num_adapted_steps == 1
        before = [p.detach().clone() for p in model.parameters()]
        model.weight.grad[0, 0] = math.nan
        with pytest.warns(RuntimeWarning, match="skipped an update"):
            optimizer.step()
        assert clara.num_skipped_updates == 1
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", ["Adam", "Adam-fused"])
def test_a_manual_sharding_decides_the_skip_over_its_shard_group(name: str) -> None:
    """With a manual ``Sharding`` (no DTensors to tell) each rank saw its shard only: the flag must go through the
    sharding's sum, or a rank that alone saw a NaN skips while the others step (and their collectives part)."""
    from lightning_clara.distributed import Sharding

    def another_rank_saw_a_nan(tensor: torch.Tensor) -> None:
        if tensor.dim() == 0:  # the skip flag (the path sums are not 0-dim)
            tensor.add_(1.0)

    model = nn.Linear(4, 1)
    optimizer = OPTIMIZERS[name](model.parameters())
    sharding = Sharding(full_numel=torch.Tensor.numel, sum_across_shards=another_rank_saw_a_nan, offset=lambda _: 0)
    clara = CLARA(optimizer, sharding=sharding)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()  # finite here
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        optimizer.step()
    assert clara.num_skipped_updates == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
