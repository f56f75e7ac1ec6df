"""Lightning workflows around a fit: tuners, validate(ckpt_path), DeepSpeed, a second fit, Rich's bar.

Each test fails on 0.1.0 (issue 12, points 1-5), except the resume test, the control that shows
the fix for validate(ckpt_path) did not break a real resume.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import clara_state
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint, RichProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.tuner import Tuner

from lightning_clara import CLARACallback
from lightning_clara import callback as callback_module
from lightning_clara.options import RULE_DEFAULTS

BASE_LR = 0.01
INITIAL_FACTOR = RULE_DEFAULTS["normalized"]["initial_factor"]


def sgd(module: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=BASE_LR)


def first_lr_used(callback: CLARACallback) -> float:
    assert callback.summary_rows is not None
    return callback.summary_rows[0].lr_start


@pytest.mark.parametrize("tuning", ["lr_find", "scale_batch_size"])
def test_a_tuner_before_fit_leaves_the_fit_intact(tuning: str, make_module, trainer_kwargs) -> None:
    """The tuner saves and restores a checkpoint taken before CLARA attached: the next fit starts fresh."""
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs)
    module = make_module(sgd)
    if tuning == "lr_find":
        Tuner(trainer).lr_find(module, num_training=5, update_attr=False)
    else:
        Tuner(trainer).scale_batch_size(module, max_trials=2, init_val=8)
    trainer.fit(module)
    assert callback.summary_rows is not None
    assert callback.summary_rows[0].adapted_steps > 0
    assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=1e-6)


@pytest.mark.parametrize("finder", ["lr", "batch_size"])
def test_a_tuner_callback_next_to_clara_runs_before_it_and_leaves_the_fit_intact(
    finder: str, make_module, trainer_kwargs
) -> None:
    """Lightning puts tuner callbacks first: they tune without CLARA, then CLARA adapts the fit."""
    tuner = (
        LearningRateFinder(num_training_steps=5, update_attr=False)
        if finder == "lr"
        else BatchSizeFinder(max_trials=2, init_val=8)
    )
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback, tuner], **trainer_kwargs)
    trainer.fit(make_module(sgd))
    if finder == "lr":
        assert tuner.optimal_lr is not None
        assert len(tuner.optimal_lr.results["lr"]) > 0
    assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=1e-6)


def trained_checkpoint(make_module, trainer_kwargs: dict[str, Any], tmp_path: Path) -> Path:
    """A checkpoint of a 3-epoch fit with CLARA: its F is well above the initial factor."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = {**trainer_kwargs, "enable_checkpointing": True, "max_epochs": 3}
    callback = CLARACallback(c=0.2, d=0.2, fast_start=0)
    pl.Trainer(callbacks=[callback, checkpoint], **kwargs).fit(make_module(sgd))
    assert callback.summary_rows is not None
    assert callback.summary_rows[0].lr_end > 2 * BASE_LR * INITIAL_FACTOR
    return Path(checkpoint.last_model_path)


def test_validate_from_a_checkpoint_does_not_leak_into_a_later_fresh_fit(
    make_module, trainer_kwargs, tmp_path: Path
) -> None:
    path = trained_checkpoint(make_module, trainer_kwargs, tmp_path)
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], limit_val_batches=1, **trainer_kwargs)
    module = make_module(sgd)
    module.val_dataloader = module.train_dataloader
    module.validation_step = lambda batch, batch_idx: None
    trainer.validate(module, ckpt_path=path)
    trainer.fit(module)
    assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=1e-6)


def test_a_resumed_fit_still_continues_the_saved_factor(make_module, trainer_kwargs, tmp_path: Path) -> None:
    """The other side of the validate fix: fit(ckpt_path=...) loads CLARA's state."""
    path = trained_checkpoint(make_module, trainer_kwargs, tmp_path)
    saved_log_factor = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [value for key, value in saved_log_factor.items() if key.startswith("CLARACallback")]
    log_factor = state["controllers"][0]["log_factors"][0]
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], **{**trainer_kwargs, "max_epochs": 4})
    trainer.fit(make_module(sgd), ckpt_path=path)
    assert log_factor > math.log(2 * INITIAL_FACTOR)
    assert callback.summary_rows is not None
    # the first adapted step of the resumed fit starts from the saved factor (one step of movement)
    assert math.log(first_lr_used(callback) / BASE_LR) == pytest.approx(log_factor, abs=0.1)


def test_deepspeed_is_refused_although_it_subclasses_ddp(make_module) -> None:
    """DeepSpeed partitions optimizer state in its own engine: refused clearly, not run as DDP."""

    class DeepSpeedStrategy(DDPStrategy):  # the real one (not installed here) derives from DDPStrategy
        pass

    class StandIn:
        def __init__(self) -> None:
            self.strategy = DeepSpeedStrategy()
            self.optimizers = [sgd(make_module(sgd))]
            self.ckpt_path = None

    with pytest.raises(NotImplementedError, match="DeepSpeedStrategy strategy"):
        CLARACallback().on_fit_start(StandIn(), None)  # type: ignore[arg-type]


def test_a_second_fit_says_that_it_restarts_the_factor(make_module, trainer_kwargs, monkeypatch) -> None:
    messages: list[str] = []
    # recorded where the callback calls it: Lightning's logger may not propagate to pytest's capture
    monkeypatch.setattr(callback_module, "rank_zero_info", messages.append)
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs)
    trainer.fit(make_module(sgd))
    assert messages == []
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs)
    trainer.fit(make_module(sgd))
    assert any("F at initial_factor again" in message for message in messages)
    assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=1e-6)


def test_no_optimizer_warns_and_prints_no_empty_table(make_module, trainer_kwargs, capsys) -> None:
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs)
    module = make_module(lambda module: None)
    module.automatic_optimization = False
    module.training_step = lambda batch, batch_idx: None
    with pytest.warns(UserWarning, match="nothing to adapt"):
        trainer.fit(module)
    assert callback.controllers == []
    assert callback.summary_rows is None
    assert "CLARA: learning rate used" not in capsys.readouterr().out


def test_no_optimizer_in_automatic_optimization_says_one_thing(make_module, trainer_kwargs, monkeypatch) -> None:
    """configure_optimizers returns None: Lightning steps a parameter-less stand-in; one message, no attach."""
    messages: list[str] = []
    monkeypatch.setattr(callback_module, "rank_zero_warn", messages.append)
    callback = CLARACallback()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*configure_optimizers.*returned `None`.*")
        trainer.fit(make_module(lambda module: None))
    assert len(messages) == 1
    assert "nothing to adapt" in messages[0]
    assert callback.controllers == []


def test_the_summary_table_is_printed_after_richs_bar_stopped(make_module, trainer_kwargs, monkeypatch) -> None:
    """With Rich's bar live, printing from a second console drew the bar twice around the table."""
    import rich.console
    from rich.table import Table

    events: list[str] = []
    stop, print_ = RichProgressBar._stop_progress, rich.console.Console.print

    def recording_stop(bar: RichProgressBar) -> None:
        if bar.progress is not None and not bar._progress_stopped:
            events.append("bar stopped")
        stop(bar)

    def recording_print(console: rich.console.Console, *objects: Any, **kwargs: Any) -> None:
        if any(isinstance(o, Table) and "CLARA" in str(o.title) for o in objects):
            events.append("table live" if console._live_stack else "table")
        print_(console, *objects, **kwargs)

    monkeypatch.setattr(RichProgressBar, "_stop_progress", recording_stop)
    monkeypatch.setattr(rich.console.Console, "print", recording_print)
    kwargs = {**trainer_kwargs, "enable_progress_bar": True}
    pl.Trainer(callbacks=[CLARACallback(), RichProgressBar()], **kwargs).fit(make_module(sgd))
    assert events == ["bar stopped", "table"]


def test_spawned_fits_are_recognised_for_the_main_process_note() -> None:
    """Under ddp_spawn the main process's callback is not updated: the callback says so at fit end."""
    from lightning_clara.callback import _runs_in_worker_processes

    spawned = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert _runs_in_worker_processes(spawned)
    assert not _runs_in_worker_processes(single)


# ------------------------------------------------------------------ found in review (2026-12-03)
@pytest.mark.parametrize("finder", ["lr", "batch_size"])
def test_a_reused_callback_with_a_tuner_starts_the_second_fit_afresh(finder: str, make_module, trainer_kwargs) -> None:
    """The tuner saves a checkpoint before CLARA attaches to the new fit: it must not hold the last fit's
    (detached) controllers, or the new fit would continue their F."""
    callback = CLARACallback(c=0.2, d=0.2, fast_start=0)
    for _ in range(2):
        tuner = (
            LearningRateFinder(num_training_steps=5, update_attr=False)
            if finder == "lr"
            else BatchSizeFinder(max_trials=1, init_val=8)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(callbacks=[callback, tuner], **(trainer_kwargs | {"max_epochs": 3})).fit(make_module(sgd))
        assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=1e-6)


def test_a_resume_with_a_tuner_continues_the_checkpoints_factor(make_module, trainer_kwargs, tmp_path: Path) -> None:
    """fit(ckpt_path=Y) with a tuner callback and a callback reused from another fit: Y's factor, not that fit's."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "y", save_last=True)
    options: dict[str, Any] = {"c": 0.2, "d": 0.2, "fast_start": 0}
    saver = CLARACallback(**options)
    kwargs = trainer_kwargs | {"enable_checkpointing": True}
    pl.Trainer(callbacks=[saver, checkpoint], **kwargs).fit(make_module(sgd))
    saved_lr = BASE_LR * math.exp(clara_state(checkpoint.last_model_path)["controllers"][0]["log_factors"][0])
    callback = CLARACallback(**options)
    pl.Trainer(callbacks=[callback], **(trainer_kwargs | {"max_epochs": 4})).fit(make_module(sgd))
    tuner = LearningRateFinder(num_training_steps=5, update_attr=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(callbacks=[callback, tuner], **(trainer_kwargs | {"max_epochs": 2}))
        trainer.fit(make_module(sgd), ckpt_path=checkpoint.last_model_path)
    assert first_lr_used(callback) == pytest.approx(saved_lr, rel=1e-9)


def test_a_resume_with_clara_listed_before_a_finetuning_callback(make_module, trainer_kwargs, tmp_path: Path) -> None:
    """BackboneFinetuning rebuilds its unfrozen param groups in its own on_fit_start: CLARA's state loads after
    every callback's (in on_train_start), whatever the order of the callbacks."""
    from lightning.pytorch.callbacks import BackboneFinetuning
    from torch import nn

    class WithBackbone(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone, self.head = nn.Linear(4, 8), nn.Linear(8, 1)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(torch.tanh(self.backbone(x.float()))), y.float())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=BASE_LR)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(make_module(sgd).dataset, batch_size=8)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "finetune", save_last=True)

    def callbacks() -> list[pl.Callback]:
        return [CLARACallback(), BackboneFinetuning(unfreeze_backbone_at_epoch=1)]

    kwargs = trainer_kwargs | {"enable_checkpointing": True, "max_epochs": 2}
    pl.Trainer(callbacks=[*callbacks(), checkpoint], **kwargs).fit(WithBackbone())
    resumed = callbacks()
    pl.Trainer(callbacks=resumed, **(trainer_kwargs | {"max_epochs": 3})).fit(
        WithBackbone(), ckpt_path=checkpoint.last_model_path
    )
    clara = resumed[0]
    assert isinstance(clara, CLARACallback)
    assert clara.summary_rows is not None
    saved = clara_state(checkpoint.last_model_path)["controllers"][0]["num_adapted_steps"]
    assert saved > 0
    assert clara.summary_rows[0].adapted_steps > 0  # this fit's steps, counted from the restored state
    assert clara.controllers[0].num_adapted_steps == saved + clara.summary_rows[0].adapted_steps


def test_a_checkpoint_saved_inside_the_step_resumes_at_the_base_lr(make_module, trainer_kwargs, tmp_path: Path) -> None:
    """A checkpoint saved while the optimizer steps (from training_step, as Lightning's SLURM requeue handler
    may) holds the base lr, so the resumed fit uses ``base * F`` and not ``base * F**2``."""
    path = tmp_path / "inside.ckpt"

    def save_inside(module: Any) -> torch.optim.Optimizer:
        optimizer = sgd(module)
        step = module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if module.trainer.global_step == 5 and not path.exists():
                module.trainer.save_checkpoint(path)
            return step(*args, **kwargs)

        module.training_step = training_step
        return optimizer

    pl.Trainer(callbacks=[CLARACallback()], **trainer_kwargs).fit(make_module(save_inside))
    saved = torch.load(path, weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == BASE_LR
    callback = CLARACallback()
    pl.Trainer(callbacks=[callback], **(trainer_kwargs | {"max_epochs": 2})).fit(make_module(sgd), ckpt_path=path)
    assert first_lr_used(callback) == pytest.approx(BASE_LR * INITIAL_FACTOR, rel=0.05)


def test_under_gradient_accumulation_the_loss_reaches_clara_at_its_own_scale(
    make_module, trainer_kwargs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's batch outputs hold the loss divided by accumulate_grad_batches: CLARA gets the micro-batch's
    own loss, so a scheduled change of the accumulation is no jump in the loss the brake sees."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from lightning_clara.controller import CLARA

    fed: list[float] = []
    observe = CLARA.observe_loss

    def spy(self: CLARA, loss: Any) -> bool:
        fed.append(float(loss))
        return observe(self, loss)

    monkeypatch.setattr(CLARA, "observe_loss", spy)
    raw: list[float] = []

    def recording(module: Any) -> torch.optim.Optimizer:
        step = module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            raw.append(float(loss))
            return loss

        module.training_step = training_step
        return sgd(module)

    accumulation = GradientAccumulationScheduler({0: 1, 1: 4})
    pl.Trainer(callbacks=[CLARACallback(), accumulation], **(trainer_kwargs | {"max_epochs": 2})).fit(
        make_module(recording)
    )
    per_epoch = len(raw) // 2
    expected = raw[:per_epoch] + raw[per_epoch + 3 :: 4]  # epoch 1: the last micro-batch of each step
    assert fed == pytest.approx(expected, rel=1e-6)


def test_resuming_a_finished_fit_keeps_the_checkpoints_state(make_module, trainer_kwargs, tmp_path: Path) -> None:
    """A resumed fit already at max_epochs skips its training loop (and on_train_start): CLARA's state still
    loads, so a checkpoint saved after it holds the saved factor, not a fresh one."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "done", save_last=True)
    kwargs = trainer_kwargs | {"enable_checkpointing": True}
    pl.Trainer(callbacks=[CLARACallback(), checkpoint], **kwargs).fit(make_module(sgd))
    saved = clara_state(checkpoint.last_model_path)["controllers"][0]["log_factors"]
    trainer = pl.Trainer(callbacks=[CLARACallback()], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_module(sgd), ckpt_path=checkpoint.last_model_path)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    assert clara_state(str(tmp_path / "again.ckpt"))["controllers"][0]["log_factors"] == saved
