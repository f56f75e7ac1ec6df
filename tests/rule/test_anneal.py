"""The anneal (``anneal=True``, the normalized rule's default): the lr used of a run of known length whose
scheduled lr stays constant falls linearly over the run's second half; a scheduler that moves the lr stops it
where it is. The measurements behind it: benchmarks/RESULTS.md, section 6 ("An anneal at the end").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import make_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_clara import CLARA, CLARACallback, CLARAOptions
from lightning_clara.rule import ANNEAL_FLOOR, Schedule, annealed

TOTAL = 40
HOLD = 10  # the window is then [max(10, 40 // 2), 40] = [20, 40]
BASE = 0.1
PINNED = {"min_factor": 1.0, "max_factor": 1.0, "initial_factor": 1.0}  # F = 1: the lr used is the anneal's


def window(**options: Any) -> tuple[int, int]:
    schedule = CLARAOptions(**options).resolve().schedule
    return schedule.anneal_from, schedule.anneal_to


def run(
    clara_options: dict[str, Any],
    steps: int = TOTAL,
    scheduler: Callable[[Any], Any] | None = None,
    nan_at: frozenset[int] = frozenset(),
    how: str = "plain",
) -> tuple[CLARA, list[float], list[float]]:
    """``steps`` SGD steps on Gaussian gradients (a NaN in one at the steps ``nan_at``); the lr used and the
    scheduled lr of each step. ``how``: "plain", "closure" (the step takes one) or "fused" (SGD with momentum,
    fused: a skip on the device flag, the step's hooks run)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(8, 4)), torch.nn.Parameter(torch.zeros(4))]
    fused = {"momentum": 0.9, "fused": True} if how == "fused" else {}
    optimizer = torch.optim.SGD(params, lr=BASE, **fused)
    schedule = None if scheduler is None else scheduler(optimizer)
    clara = CLARA(optimizer, **{**PINNED, "hold_after": HOLD, "total_steps": TOTAL, **clara_options})
    used, scheduled = [], []
    for step in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        if step in nan_at:
            params[1].grad[0] = float("nan")
        scheduled.append(optimizer.param_groups[0]["lr"])
        optimizer.step((lambda: 0.0) if how == "closure" else None)
        used.append(clara.lr_used[0])
        if schedule is not None:
            schedule.step()
    return clara, used, scheduled


def test_the_multiplier_is_one_then_linear_to_the_floor() -> None:
    schedule = Schedule("normalized", 0.03, 0, HOLD, 0.7, 20, 40)
    assert [annealed(schedule, t) for t in (0, 10, 20)] == [1.0, 1.0, 1.0]
    assert annealed(schedule, 30) == pytest.approx(0.5)
    assert annealed(schedule, 39) == pytest.approx(0.05)
    assert annealed(schedule, 40) == annealed(schedule, 400) == ANNEAL_FLOOR
    assert annealed(schedule, 35, stopped=25) == pytest.approx(0.75)  # held where a scheduler moved the lr
    assert annealed(schedule, 15, stopped=10) == 1.0
    assert annealed(Schedule("normalized", 0.03, 0, HOLD, 0.7), 10_000) == 1.0  # no window: no anneal


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"total_steps": 3000}, (1500, 3000)),  # the default hold (600) ends before the second half
        ({"total_steps": 300}, (240, 300)),  # a short run: the hold (240 at least) ends after the half
        ({"total_steps": 10_000, "hold_after": 6000}, (6000, 10_000)),  # never during the find
        ({"total_steps": None}, (600, 0)),  # an unknown length: no anneal
        ({"total_steps": 3000, "anneal": False}, (600, 0)),
        ({"total_steps": 3000, "rule": "paper"}, (0, 0)),  # the paper's rule has none
    ],
)
def test_the_window_is_the_second_half_of_a_known_run(options: dict[str, Any], expected: tuple[int, int]) -> None:
    assert window(**options) == expected


def test_a_constant_lr_falls_linearly_over_the_second_half() -> None:
    clara, used, _ = run({})
    schedule = clara.settings.schedule
    assert used == pytest.approx([BASE * annealed(schedule, t) for t in range(TOTAL)], rel=1e-12)
    assert used[HOLD] == used[20] == pytest.approx(BASE)  # the hold is not the anneal
    assert used[-1] == pytest.approx(BASE / (TOTAL - 20))  # one step from the end
    assert min(used) > 0.0


def test_anneal_false_and_the_paper_rule_keep_the_lr() -> None:
    assert run({"anneal": False})[1] == pytest.approx([BASE] * TOTAL)
    assert run({"rule": "paper"})[1] == pytest.approx([BASE] * TOTAL)
    assert run({"total_steps": None})[1] == pytest.approx([BASE] * TOTAL)


def test_a_scheduler_that_moves_the_lr_later_stops_the_anneal_where_it_is() -> None:
    step_decay = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)  # noqa: E731
    clara, used, scheduled = run({}, scheduler=step_decay)
    held = annealed(clara.settings.schedule, 30)
    assert held == pytest.approx(0.5)
    assert used[:30] == pytest.approx([BASE * annealed(clara.settings.schedule, t) for t in range(30)])
    assert used[30:] == pytest.approx([s * held for s in scheduled[30:]])  # 0.01 x 0.5: no further decay
    assert clara.state_dict()["anneal_stopped"] == 30


def test_a_warm_up_turns_the_anneal_off() -> None:
    warm_up = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))  # noqa: E731
    clara, used, scheduled = run({}, scheduler=warm_up)
    assert used == pytest.approx(scheduled)  # from step 1 on the user's schedule rules
    assert scheduled[-1] == BASE
    assert clara.state_dict()["anneal_stopped"] == 1


def test_the_stop_is_checkpointed_and_checked() -> None:
    step_decay = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)  # noqa: E731
    saved = run({}, steps=35, scheduler=step_decay)[0].state_dict()
    resumed, _, _ = run({}, steps=0)
    resumed.load_state_dict(saved)
    group = resumed.optimizer.param_groups[0]
    group["lr"] = BASE * 0.1  # the scheduler's lr, as a resumed fit restores it
    resumed.optimizer.step()
    assert resumed.lr_used[0] == pytest.approx(BASE * 0.1 * 0.5)  # still held at step 30's value
    # saved before the anneal existed, after steps: that run had none, and continues so (its scheduler is unknown)
    older = {k: v for k, v in saved.items() if k != "anneal_stopped"}
    resumed.load_state_dict(older)
    assert resumed.state_dict()["anneal_stopped"] == 0
    resumed.load_state_dict({**older, "num_adapted_steps": 0})  # no step taken yet: the anneal is to come
    assert resumed.state_dict()["anneal_stopped"] is None
    for wrong in (-1, 36, 1.5):  # 35 steps were taken
        with pytest.raises(ValueError, match="anneal_stopped"):
            resumed.load_state_dict({**saved, "anneal_stopped": wrong})


def test_a_scheduler_change_at_the_first_step_after_a_resume_stops_the_anneal() -> None:
    """The last step's scheduled lrs are checkpointed: a resume compares its first step's with them."""
    step_decay = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)  # noqa: E731
    full, used, scheduled = run({}, steps=TOTAL, scheduler=step_decay)
    assert scheduled[29:31] == pytest.approx([BASE, BASE * 0.1])  # the decay's first change: step 31
    saved = run({}, steps=30, scheduler=step_decay)[0].state_dict()
    assert saved["scheduled_lrs"] == [BASE]
    resumed, _, _ = run({}, steps=0)
    resumed.load_state_dict(saved)
    resumed_used = []
    for _ in range(TOTAL - 30):
        resumed.optimizer.param_groups[0]["lr"] = BASE * 0.1  # the scheduler's lr, as a resumed fit restores it
        for p in resumed.optimizer.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        resumed.optimizer.step()
        resumed_used.append(resumed.lr_used[0])
    assert resumed_used == pytest.approx(used[30:])  # held at step 30's value, as without the resume
    assert resumed.state_dict()["anneal_stopped"] == full.state_dict()["anneal_stopped"] == 30
    older = {k: v for k, v in saved.items() if k != "scheduled_lrs"}  # saved before the key existed: loads
    resumed.load_state_dict(older)
    for wrong in ([BASE, BASE], [-1.0], [float("nan")], BASE):
        with pytest.raises(ValueError, match="scheduled_lrs"):
            resumed.load_state_dict({**saved, "scheduled_lrs": wrong})


@pytest.mark.parametrize("how", ["plain", "closure", "fused"])
def test_skipped_updates_keep_the_anneal_on_the_runs_clock(how: str) -> None:
    """An update skipped for a NaN gradient is one of the run's optimizer steps (``total_steps`` counts it), on the
    host (plain, with a closure) or on a fused optimizer's device flag (its hooks run: counted once): the anneal
    follows optimizer steps, not adapted ones, and reaches its floor at the last step as without skips."""
    skipped = frozenset({5, 25, 33})
    clara, used, _ = run({}, nan_at=skipped, how=how)
    schedule = clara.settings.schedule
    assert (clara.num_skipped_updates, clara.num_adapted_steps) == (3, TOTAL - 3)
    stepped = [t for t in range(TOTAL) if t not in skipped]  # a skipped step ran at no lr (lr_used: the last one)
    assert [used[t] for t in stepped] == pytest.approx([BASE * annealed(schedule, t) for t in stepped], rel=1e-12)
    assert used[-1] == pytest.approx(BASE / (TOTAL - 20))
    assert clara.state_dict()["num_run_steps"] == TOTAL
    assert clara.num_optimizer_steps == TOTAL - (0 if how == "fused" else 3)  # step() calls whose hooks ran


def test_the_runs_clock_is_checkpointed_and_checked() -> None:
    saved = run({}, steps=30, nan_at=frozenset({5, 25}))[0].state_dict()
    assert (saved["num_run_steps"], saved["num_adapted_steps"], saved["num_skipped_updates"]) == (30, 28, 2)
    older = {k: v for k, v in saved.items() if k != "num_run_steps"}  # saved before the key: adapted + skipped
    used_before = run({}, steps=7, nan_at=frozenset({2}))[0]  # a controller that saw steps and a skip already
    for resumed, state in ((run({}, steps=0)[0], saved), (run({}, steps=0)[0], older), (used_before, saved)):
        resumed.load_state_dict(state)
        for p in resumed.optimizer.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        resumed.optimizer.step()
        assert resumed.lr_used[0] == pytest.approx(BASE * 0.5)  # step 30 of [20, 40], not adapted step 28's 0.6
        assert resumed.state_dict()["num_run_steps"] == 31
    for wrong in (29, -1, 30.5, float("nan")):  # fewer than the 28 adapted steps and 2 skipped updates, or no count
        with pytest.raises(ValueError, match="num_run_steps"):
            resumed.load_state_dict({**saved, "num_run_steps": wrong})
    with pytest.raises(ValueError, match="anneal_stopped"):
        resumed.load_state_dict({**saved, "anneal_stopped": 31})
    resumed.load_state_dict({**saved, "anneal_stopped": 30})  # stopped at the last optimizer step: fine


def test_a_resume_with_another_run_length_warns_that_the_window_moved() -> None:
    saved = run({}, steps=25)[0].state_dict()
    assert saved["config"]["total_steps"] == TOTAL
    longer, _, _ = run({"total_steps": 2 * TOTAL}, steps=0)
    with pytest.warns(RuntimeWarning, match="anneal's window moves"):
        longer.load_state_dict(saved)
    same, _, _ = run({}, steps=0)
    unknown, _, _ = run({"total_steps": None}, steps=0)  # this run has no anneal: no window to move
    early = run({}, steps=15)[0].state_dict()  # before the window's start (20): nothing had been annealed
    at_start = run({}, steps=21)[0].state_dict()  # its last step (20) still ran at the multiplier 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved)
        unknown.load_state_dict(saved)
        longer.load_state_dict(early)
        longer.load_state_dict(at_start)
    with pytest.warns(RuntimeWarning, match="anneal's window moves"):  # its last step (21) ran at 0.95
        longer.load_state_dict(run({}, steps=22)[0].state_dict())


def test_a_group_held_at_max_lr_decays_from_it() -> None:
    """Capped after the decay, a group whose lr_base x F lies above max_lr stayed at max_lr until the multiplier
    fell below max_lr / (lr_base x F) and ended at half of it here, where the other group ended at 5 %."""
    torch.manual_seed(0)
    small, large = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.SGD([{"params": [small], "lr": 1e-3}, {"params": [large], "lr": 1e-2}])
    pinned_at_10 = {"min_factor": 10.0, "max_factor": 10.0, "initial_factor": 10.0}
    clara = CLARA(optimizer, **pinned_at_10, max_lr=1e-2, hold_after=HOLD, total_steps=TOTAL)
    used = []
    for _ in range(TOTAL):
        small.grad, large.grad = torch.randn(10), torch.randn(10)
        optimizer.step()
        used.append(clara.lr_used)
    assert used[-1] == pytest.approx([1e-2 / 20, 1e-2 / 20])  # both held 1e-2: the window is [20, 40]
    assert all(small_lr == pytest.approx(large_lr) for small_lr, large_lr in used)


def test_a_controller_that_starts_mid_fit_anneals_over_the_rest(
    make_module: Any, trainer_kwargs: dict[str, Any], tmp_path: Any
) -> None:
    """Resumed from a checkpoint saved without CLARA, a fresh controller counts its steps from 0: given the whole
    fit's 16 steps, its window [8, 16] was never reached in the 8 steps left and the lr was never decayed."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    make_trainer(trainer_kwargs, [checkpoint], max_epochs=1, enable_checkpointing=True).fit(make_module(sgd(BASE)))
    callback = CLARACallback(**PINNED, hold_after=2)
    trainer = make_trainer(trainer_kwargs, [callback], max_epochs=2)
    with pytest.warns(UserWarning, match="holds no CLARA state"):
        trainer.fit(make_module(sgd(BASE)), ckpt_path=str(tmp_path / "epoch=0-step=8.ckpt"))
    clara = callback.controllers[0]
    assert (clara.total_steps, clara.num_adapted_steps) == (8, 8)
    assert clara.lr_used[0] == pytest.approx(BASE * (8 - 7) / (8 - 4))  # the last step of the window [4, 8]


def test_a_state_without_the_anneal_warns_where_the_resume_anneals_at_once() -> None:
    """Saved with anneal=False, or by a run whose length was unknown: resumed inside the window, the next step
    runs at once at the window's multiplier (here 0.5 at step 30 of [20, 40])."""
    resuming, _, _ = run({}, steps=0)
    for options in ({"anneal": False}, {"total_steps": None}):
        saved = run(options, steps=30)[0].state_dict()
        with pytest.warns(RuntimeWarning, match=r"drops at once to 0\.5 x the lr held"):
            resuming.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resuming.load_state_dict(run({"anneal": False}, steps=20)[0].state_dict())  # its next step runs at 1


def test_a_second_fit_on_the_same_trainer_anneals_over_its_own_steps(
    make_module: Any, trainer_kwargs: dict[str, Any]
) -> None:
    """A second fit continues the Trainer's step count (8 -> 24): its fresh controllers run over the 16 left."""
    callback = CLARACallback(**PINNED, hold_after=2)
    trainer, module = make_trainer(trainer_kwargs, [callback], max_epochs=1), make_module(sgd(BASE))
    trainer.fit(module)
    trainer.fit_loop.max_epochs = 3
    trainer.fit(module)
    clara = callback.controllers[0]
    assert (trainer.global_step, clara.total_steps, clara.num_adapted_steps) == (24, 16, 16)
    assert clara.lr_used[0] == pytest.approx(BASE * (16 - 15) / (16 - 8))  # the last step of the window [8, 16]


@pytest.mark.parametrize(
    ("global_step", "state", "expected"),
    [
        (0, None, (100, 0)),  # made at the run's start
        (30, None, (70, 30)),  # made at step 30 without a state: the steps left
        (100, None, (1, 100)),  # at the end: at least one
        (30, {"config": {"total_steps": 100}, "num_run_steps": 30}, (100, 0)),  # a state saved before offsets
        (50, {"config": {"total_steps": 70, "run_offset": 30}, "num_run_steps": 20}, (70, 30)),  # keeps its offset
        (50, {"config": {"total_steps": 50, "run_offset": 30}, "num_run_steps": 20}, (70, 30)),  # the run grew
        # skipped steps GradScaler never showed CLARA (its clock 45 at the trainer's 50) do not shift the length
        (50, {"config": {"total_steps": 80, "run_offset": 0}, "num_run_steps": 45}, (100, 0)),
        (50, {"config": {"total_steps": 70, "run_offset": "30"}}, (100, 0)),  # malformed: refused when it loads
    ],
)
def test_the_run_length_of_a_controller_made_mid_run(global_step: int, state: Any, expected: tuple[int, int]) -> None:
    from lightning_clara.checkpoint import run_length

    assert run_length(100, global_step, state) == expected
    assert run_length(None, global_step, state) == (None, expected[1])


def test_the_run_offset_is_checkpointed_and_checked() -> None:
    clara, _, _ = run({}, steps=5)
    clara.set_total_steps(TOTAL - 10, run_offset=10)
    saved = clara.state_dict()
    assert saved["config"]["run_offset"] == 10
    for wrong in (-1, 2.5, "10", True):
        with pytest.raises(ValueError, match="run_offset"):
            clara.load_state_dict({**saved, "config": {**saved["config"], "run_offset": wrong}})


def test_the_callback_anneals_a_constant_lr_fit(make_module: Any, trainer_kwargs: dict[str, Any]) -> None:
    callback = CLARACallback(**PINNED, hold_after=2)  # 8 batches x 2 epochs: the window is [8, 16]
    make_trainer(trainer_kwargs, [callback], max_epochs=2).fit(make_module(sgd(BASE)))
    clara = callback.controllers[0]
    assert clara.total_steps == 16
    assert clara.anneal
    assert clara.num_adapted_steps == 16
    assert clara.lr_used[0] == pytest.approx(BASE * (16 - 15) / (16 - 8))  # the last step's


class _RestoresAfterSetup(SingleDeviceStrategy):
    """As ModelParallelStrategy does: the checkpoint (callback states included) is restored after on_fit_start."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("after_setup", [False, True])
def test_a_resumed_fit_checks_the_run_length_whenever_its_strategy_restores(
    make_module: Any, trainer_kwargs: dict[str, Any], tmp_path: Any, after_setup: bool
) -> None:
    """The resumed state loads once the run's length is known, also where it is restored after setup."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
    options = {**PINNED, "hold_after": 2}  # 8 batches x 2 epochs: the window is [8, 16]; saved at step 12
    first = make_trainer(
        trainer_kwargs, [CLARACallback(**options), checkpoint], max_epochs=2, enable_checkpointing=True
    )
    first.fit(make_module(sgd(BASE)))
    callback = CLARACallback(**options)
    strategy = {"strategy": _RestoresAfterSetup(torch.device("cpu"))} if after_setup else {}
    trainer = make_trainer(trainer_kwargs, [callback], max_epochs=3, **strategy)
    with pytest.warns(RuntimeWarning, match="anneal's window moves"):
        trainer.fit(make_module(sgd(BASE)), ckpt_path=str(tmp_path / "epoch=1-step=12.ckpt"))
    clara = callback.controllers[0]
    assert (clara.total_steps, clara.num_adapted_steps) == (24, 24)  # resumed at 12, not from 0


def with_scheduler(module: Any) -> dict[str, Any]:
    """SGD with a step decay whose first change comes late (at step 14, after the anneal would have started)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=BASE)
    decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=14, gamma=0.5)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


@pytest.mark.parametrize("anneal", [None, True])
def test_a_fit_with_a_scheduler_has_no_anneal_unless_asked(
    make_module: Any, trainer_kwargs: dict[str, Any], anneal: bool | None
) -> None:
    """The callback knows the fit's schedulers: a late first change would stack the user's decay on the anneal."""
    callback = CLARACallback(**PINNED, hold_after=2, anneal=anneal)
    make_trainer(trainer_kwargs, [callback], max_epochs=2).fit(make_module(with_scheduler))
    clara = callback.controllers[0]
    assert clara.anneal is bool(anneal)
    # the last step: the scheduler's 0.05 alone, or x the anneal's value where the decay first moved (step 14)
    expected = BASE * 0.5 * (1.0 if anneal is None else (16 - 14) / (16 - 8))
    assert clara.lr_used[0] == pytest.approx(expected)


def test_manual_optimization_has_no_anneal(make_module: Any, trainer_kwargs: dict[str, Any]) -> None:
    """Under manual optimization the fit's estimate counts batches, not each optimizer's steps."""
    callback = CLARACallback(**PINNED, hold_after=2)
    make_trainer(trainer_kwargs, [callback], max_epochs=2).fit(make_module(sgd(BASE), manual=True))
    assert not callback.controllers[0].anneal
    assert callback.controllers[0].lr_used[0] == pytest.approx(BASE)


def test_a_callback_that_schedules_the_lr_later_turns_the_anneal_off(
    make_module: Any, trainer_kwargs: dict[str, Any]
) -> None:
    """StochasticWeightAveraging sets its SWALR from 80 % of the epochs: the anneal would be under way by then."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    callback = CLARACallback(**PINNED, hold_after=2)
    swa = StochasticWeightAveraging(swa_lrs=BASE)
    make_trainer(trainer_kwargs, [callback, swa], max_epochs=2).fit(make_module(sgd(BASE)))
    assert not callback.controllers[0].anneal
