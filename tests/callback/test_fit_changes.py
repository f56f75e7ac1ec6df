"""A fit that changes under the callback: optimizers replaced mid-fit, a checkpoint taken before a resumed state
loads, an accumulation schedule, several manual optimizers, a manual loss that is not one number."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import clara_state, make_trainer, sgd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

from lightning_clara import CLARACallback

STEPS_PER_EPOCH = 8  # 64 samples, batch 8


class ReplaceOptimizers(Callback):
    """Another callback rebuilding the optimizers as epoch ``at`` starts (switching optimizer mid-fit)."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.replaced: list[torch.optim.Optimizer] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.at:
            self.replaced = list(trainer.optimizers)
            trainer.strategy.setup_optimizers(trainer)


def test_a_replaced_optimizer_is_let_go_and_its_successor_adapted_from_its_first_step(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """The old optimizer's controller was kept and saved beside the new one's: the checkpoint could not be resumed
    (2 states for 1 optimizer), and the new optimizer's first step ran at the scheduled lr, uncounted."""
    replace, clara = ReplaceOptimizers(), CLARACallback(summary=True)
    module = make_module(sgd())
    trainer = make_trainer(trainer_kwargs, [replace, clara], max_epochs=2)
    with pytest.warns(UserWarning, match="created after fit start"):
        trainer.fit(module)
    assert len(clara.controllers) == 1
    assert clara.controllers[0].optimizer is trainer.optimizers[0]
    assert clara.controllers[0].num_optimizer_steps == STEPS_PER_EPOCH  # attached before its first step
    assert clara.controllers[0].total_steps == STEPS_PER_EPOCH  # its find and anneal run over the fit's rest
    assert getattr(replace.replaced[0], "_clara_controller", None) is None  # detached
    assert clara.summary_rows is not None
    assert len(clara.summary_rows) == 1
    path = tmp_path / "replaced.ckpt"
    trainer.save_checkpoint(path)
    assert len(clara_state(str(path))["controllers"]) == 1
    resumed = CLARACallback(summary=False)
    make_trainer(trainer_kwargs, [resumed], max_epochs=3).fit(make_module(sgd()), ckpt_path=path)
    assert resumed.controllers[0].num_adapted_steps > STEPS_PER_EPOCH
    # it attached 8 steps into the fit: resumed, it keeps that offset (24 - 8), not the whole fit's 24
    assert (resumed.controllers[0].total_steps, resumed.controllers[0].run_offset) == (2 * STEPS_PER_EPOCH, 8)
    at_end = CLARACallback(summary=False)  # a fit resumed at its end: the state loads in on_fit_end
    make_trainer(trainer_kwargs, [at_end], max_epochs=2).fit(make_module(sgd()), ckpt_path=path)
    assert at_end.controllers[0].run_offset == STEPS_PER_EPOCH  # kept for the next save


class SaveAtTrainStart(Callback):
    """A checkpoint taken before CLARACallback's on_train_start loads the resumed state (another callback's save)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def test_a_checkpoint_taken_before_the_resumed_state_loads_keeps_it(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    first = make_trainer(trainer_kwargs, [CLARACallback(summary=False)], max_epochs=1)
    first.fit(make_module(sgd()))
    saved = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(saved)
    early = tmp_path / "early.ckpt"
    second = make_trainer(trainer_kwargs, [SaveAtTrainStart(early), CLARACallback(summary=False)], max_epochs=2)
    second.fit(make_module(sgd()), ckpt_path=saved)
    kept, original = clara_state(str(early)), clara_state(str(saved))
    assert kept["controllers"][0]["log_factors"] == original["controllers"][0]["log_factors"]
    assert kept["controllers"][0]["num_adapted_steps"] == original["controllers"][0]["num_adapted_steps"] > 0


def test_the_run_length_follows_an_accumulation_schedule(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """GradientAccumulationScheduler sets the accumulation as each epoch starts; the Trainer's estimate used 1."""
    clara = CLARACallback(summary=False)
    schedule = GradientAccumulationScheduler({1: 4})
    make_trainer(trainer_kwargs, [schedule, clara], max_epochs=3).fit(make_module(sgd()))
    assert clara.controllers[0].settings.total_steps == STEPS_PER_EPOCH + 2 + 2
    assert clara.controllers[0].num_optimizer_steps == STEPS_PER_EPOCH + 2 + 2
    bounded = CLARACallback(summary=False)
    make_trainer(trainer_kwargs, [GradientAccumulationScheduler({1: 4}), bounded], max_epochs=3, max_steps=9).fit(
        make_module(sgd())
    )
    assert bounded.controllers[0].settings.total_steps == 9  # max_steps binds before the schedule's 12


def test_several_manual_optimizers_get_no_shared_run_length(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """max_steps bounds manual optimizers' steps together, in shares the callback cannot know."""

    clara = CLARACallback(summary=False)
    make_trainer(trainer_kwargs, [clara], max_steps=12, max_epochs=5).fit(make_module(_two, manual=True))
    assert [c.settings.total_steps for c in clara.controllers] == [None, None]
    one = CLARACallback(summary=False)
    make_trainer(trainer_kwargs, [one], max_steps=12, max_epochs=5).fit(make_module(sgd(), manual=True))
    assert one.controllers[0].settings.total_steps == 12


def test_a_manual_loss_that_is_not_a_0_dim_tensor_is_left_out_with_a_warning(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """Lightning accepts any tensor under 'loss' in manual optimization; the brake takes one number only."""
    module = make_module(sgd(), manual=True)
    step = module.training_step

    def per_sample(batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        step(batch, batch_idx)
        x, y = batch
        return {"loss": ((module(x) - y) ** 2).detach().flatten()}

    module.training_step = per_sample  # type: ignore[method-assign]
    clara = CLARACallback(summary=False)
    with pytest.warns(UserWarning, match="not a 0-dim tensor"):
        make_trainer(trainer_kwargs, [clara], max_epochs=1).fit(module)
    assert clara.controllers[0].num_adapted_steps == STEPS_PER_EPOCH


def _two(module: LightningModule) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(module.net[0].parameters(), lr=0.05), torch.optim.SGD(module.net[2].parameters(), 0.05)]


class EditOptimizers(Callback):
    """At epoch 1 replace the first of two optimizers by hand (``trainer.optimizers = ...``); at epoch 2 drop the
    second."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 1:
            first = torch.optim.SGD(pl_module.net[0].parameters(), lr=0.05)
            trainer.optimizers = [first, trainer.optimizers[1]]
        elif trainer.current_epoch == 2:
            trainer.optimizers = trainer.optimizers[:1]


def test_controllers_follow_the_trainers_optimizers_in_order(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """A state is matched to an optimizer by position: replacing the first of two optimizers put its successor's
    controller last (a resume then loaded one optimizer's state into the other), and dropping one without a
    replacement kept its controller (and its state in the checkpoint)."""
    clara = CLARACallback(summary=True)
    trainer = make_trainer(trainer_kwargs, [EditOptimizers(), clara], max_epochs=2)
    with pytest.warns(UserWarning, match="created after fit start"):
        trainer.fit(make_module(_two, manual=True))
    assert [c.optimizer for c in clara.controllers] == trainer.optimizers
    assert [c.num_optimizer_steps for c in clara.controllers] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert clara.summary_rows is not None
    assert len(clara.summary_rows) == 2
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)
    resumed = CLARACallback(summary=False)
    make_trainer(trainer_kwargs, [resumed], max_epochs=3).fit(make_module(_two, manual=True), ckpt_path=path)
    dropped = CLARACallback(summary=False)
    trainer = make_trainer(trainer_kwargs, [EditOptimizers(), dropped], max_epochs=3)
    with pytest.warns(UserWarning, match="created after fit start"):
        trainer.fit(make_module(_two, manual=True))
    assert len(dropped.controllers) == 1
    assert dropped.controllers[0].optimizer is trainer.optimizers[0]
    assert len(dropped.state_dict()["controllers"]) == 1


def test_a_manual_optimizer_stepped_off_the_logging_batches_is_still_logged(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """Stepped on even batches, logged every 2nd batch (odd ones): clara/* was never logged (the batch end returned
    before logging when nothing stepped in that batch); now each log carries the steps since the last one."""
    from helpers import RecordingLogger

    logger = RecordingLogger()
    clara = CLARACallback(summary=False)
    kwargs = {**trainer_kwargs, "logger": logger, "log_every_n_steps": 2}
    make_trainer(kwargs, [clara], max_epochs=2).fit(make_module(sgd(), manual=True, step_every=[2]))
    assert clara.controllers[0].num_optimizer_steps == STEPS_PER_EPOCH  # 4 per epoch
    lrs = logger.series("clara/lr-SGD")
    assert len(lrs) == STEPS_PER_EPOCH  # one per logging batch, each after a step


def test_metrics_name_a_param_group_added_since_the_last_step(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """metrics() between an added group and the next step raised (zip over stale names), and a checkpoint saved
    there named the old groups; BaseFinetuning adds one."""

    class AddGroupThenRead(Callback):
        def __init__(self, clara: CLARACallback) -> None:
            self.clara = clara
            self.read: dict[str, float] = {}
            self.saved_names: list[list[str]] = []

        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if trainer.current_epoch == 1:
                extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
                trainer.optimizers[0].add_param_group({"params": [extra]})
                self.saved_names = self.clara.state_dict()["names"]  # a checkpoint taken now
                self.read = self.clara.metrics()

    clara = CLARACallback(summary=False)
    reader = AddGroupThenRead(clara)
    make_trainer(trainer_kwargs, [clara, reader], max_epochs=2).fit(make_module(sgd()))
    assert "clara/lr-SGD/pg1" in reader.read
    assert "clara/lr-SGD/pg2" in reader.read
    assert reader.saved_names == [["SGD/pg1", "SGD/pg2"]]


def test_an_optimizer_refused_at_fit_start_leaves_none_of_the_others_attached(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any]
) -> None:
    """The controllers were made in one expression: the first, attached before LBFGS was refused, was never
    stored, so on_exception could not detach it, and a later plain step ran at lr x F."""
    made: list[torch.optim.Optimizer] = []

    def sgd_then_lbfgs(module: LightningModule) -> list[torch.optim.Optimizer]:
        made[:] = [torch.optim.SGD(module.net[0].parameters(), lr=0.05), torch.optim.LBFGS(module.net[2].parameters())]
        return made

    with pytest.raises(TypeError, match="LBFGS"):
        make_trainer(trainer_kwargs, [CLARACallback(summary=False)]).fit(make_module(sgd_then_lbfgs, manual=True))
    first = made[0]
    assert getattr(first, "_clara_controller", None) is None
    assert not first._optimizer_step_pre_hooks
    assert not first._optimizer_step_post_hooks


def test_a_failed_fits_restored_state_is_not_loaded_by_a_later_resume(
    make_module: Callable[..., LightningModule], trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """A fit resuming checkpoint A fails before CLARA attaches; a later fit resumes B, saved without CLARA: it
    warned 'start fresh' and then loaded A's state all the same."""

    class FailOnce(Callback):
        failed = False

        def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a set-up problem")

    with_clara = make_trainer(trainer_kwargs, [CLARACallback(summary=False)], max_epochs=2)
    with_clara.fit(make_module(sgd()))
    with_clara.save_checkpoint(tmp_path / "a.ckpt")
    without = make_trainer(trainer_kwargs, [], max_epochs=1)
    without.fit(make_module(sgd()))
    without.save_checkpoint(tmp_path / "b.ckpt")
    clara = CLARACallback(summary=False)
    failing = make_trainer(trainer_kwargs, [FailOnce(), clara], max_epochs=3)
    with pytest.raises(RuntimeError, match="set-up problem"):
        failing.fit(make_module(sgd()), ckpt_path=tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match="holds no CLARA state"):
        make_trainer(trainer_kwargs, [clara], max_epochs=2).fit(make_module(sgd()), ckpt_path=tmp_path / "b.ckpt")
    assert clara.controllers[0].num_adapted_steps == STEPS_PER_EPOCH  # fresh: epoch 2 only, not A's 16 + 8
