"""The end-of-fit summary table and the progress-bar display of ``CLARACallback``.

Expected values come from independent records taken during the fit (a step pre-hook added
after CLARA's, and the controller's ratio read after each step), not from the summary itself.
"""

from __future__ import annotations

import io
import math
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from helpers import RecordingLogger, defer_pending_steps
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from torch.optim import Optimizer

from lightning_clara import CLARACallback
from lightning_clara.summary import TITLE, GroupSummary, summary_table

MakeModule = Callable[..., LightningModule]
STEPS_PER_EPOCH = 8  # 64 samples, batch size 8 (conftest's regression data)


def render(table: Any, width: int = 120) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def sgd(module: Any, lr: float = 0.05) -> Optimizer:
    return torch.optim.SGD(module.parameters(), lr=lr)


def sgd_with_decay(module: Any) -> dict[str, Any]:
    """SGD whose scheduled lr halves, thirds, ... step by step: every step's lr differs from the last."""
    optimizer = sgd(module)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def two_groups(module: Any) -> Optimizer:
    return torch.optim.SGD(
        [{"params": module.net[0].parameters()}, {"params": module.net[2].parameters(), "lr": 0.01}], lr=0.05
    )


class StepRecorder(Callback):
    """Per optimizer step: the lr each group used (a pre-hook added after CLARA's) and the ratios after it."""

    def __init__(self, callback: CLARACallback) -> None:
        self.callback = callback
        self.lrs: list[list[float]] = []
        self.ratios: list[list[float | None]] = []
        self.steps_before = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.handle = trainer.optimizers[0].register_step_pre_hook(self._record)

    def _record(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.lrs.append([float(group["lr"]) for group in optimizer.param_groups])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.steps_before = self.callback.controllers[0].num_optimizer_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        controller = self.callback.controllers[0]
        if controller.num_optimizer_steps != self.steps_before:
            self.ratios.append(controller.ratios)  # on the CPU the step's results are already in

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- the table
def test_table_shows_the_given_rows() -> None:
    rows = [
        GroupSummary("SGD/pg1", 1e-4, 0.107, 9.5e-5, 0.164, 2.30149, 900, 0, safeguard_alarms=1),
        GroupSummary("SGD/pg2", None, None, None, None, None, 0, 3, safeguard_alarms=1),
    ]
    text = render(summary_table(rows))
    assert TITLE in text
    for header in ("group", "lr start → end", "lr min", "lr max", "mean r", "steps", "skipped"):
        assert header in text
    first = next(line for line in text.splitlines() if "SGD/pg1" in line)
    assert [cell.strip() for cell in first.split("│")] == [
        "SGD/pg1",
        "1e-4 → 0.107",
        "9.5e-5",
        "0.164",
        "2.301",
        "900",
        "0",
    ]
    second = next(line for line in text.splitlines() if "SGD/pg2" in line)
    assert [cell.strip() for cell in second.split("│")] == ["SGD/pg2", "-", "-", "-", "-", "0", "3"]
    # a count every group of an optimizer shares: once per optimizer, under the table
    assert "safeguard alarms: SGD 1" in text
    assert "rank re-syncs" not in text  # no row has a consistency check


def test_per_optimizer_counts_follow_the_data() -> None:
    plain = render(summary_table([GroupSummary("Adam", 0.001, 0.002, 0.001, 0.003, 1.0, 10, 0)]))
    assert "safeguard alarms" not in plain
    assert "rank re-syncs" not in plain
    rows = [
        GroupSummary("Adam/pg1", 0.001, 0.002, 0.001, 0.003, 1.0, 10, 0, resyncs=2),
        GroupSummary("Adam/pg2", 0.001, 0.002, 0.001, 0.003, 1.0, 10, 0, resyncs=2),
        GroupSummary("SGD", 0.001, 0.002, 0.001, 0.003, 1.0, 10, 0, resyncs=0),
    ]
    checked = render(summary_table(rows))
    assert "rank re-syncs: Adam 2, SGD 0" in checked
    assert "safeguard alarms" not in checked


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e-4, "1e-4"),
        (1.23e-5, "1.23e-5"),
        (1.274e-4, "1.27e-4"),
        (0.131, "0.131"),
        (1.0, "1"),
        (0.0, "0"),
        (None, "-"),
    ],
)
def test_learning_rates_are_compact(value: float | None, text: str) -> None:
    row = next(
        line
        for line in render(summary_table([GroupSummary("Adam", value, value, value, value, 1.0, 1, 0)])).splitlines()
        if line.startswith("Adam")
    )
    assert [cell.strip() for cell in row.split("│")][2] == text


@pytest.mark.parametrize("name", ["Adam", "AdamW/no_decay", "a_param_group_named_at_great_length"])
def test_table_fits_a_default_terminal(name: str) -> None:
    """Every column on one line at 80 columns, nothing cut; only a long group name folds."""
    rows = [
        GroupSummary(
            name,
            1.23e-5,
            1.234e-4,
            1.23e-5,
            0.123,
            12.345,
            123456,
            12345,
            safeguard_alarms=10,
            resyncs=3,
            skipped_updates=1234,
        ),
        GroupSummary("SGD/pg2", 1e-4, 0.1, 1e-4, 0.2, 1.2, 100, 0, safeguard_alarms=0, resyncs=0),
    ]
    text = render(summary_table(rows), width=80)
    assert "…" not in text  # nothing cut
    assert max(len(line) for line in text.splitlines()) <= 80
    row = next(line for line in text.splitlines() if line.startswith(name[:6]))
    assert [cell.strip() for cell in row.split("│")][1:] == [
        "1.23e-5 → 1.23e-4",
        "1.23e-5",
        "0.123",
        "12.345",
        "123456",
        "12345",
    ]
    assert "safeguard alarms:" in text
    assert "rank re-syncs:" in text
    assert "updates skipped (NaN/inf gradients):" in text


# ---------------------------------------------------------------------------------------------- in a fit
def test_summary_printed_once_with_the_recorded_values(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    callback = CLARACallback(d=0.4, initial_factor=1.0, safeguard=False)  # no alarm column: None
    recorder = StepRecorder(callback)
    trainer = Trainer(
        **{**trainer_kwargs, "max_epochs": 2, "accumulate_grad_batches": 2, "callbacks": [callback, recorder]}
    )
    trainer.fit(make_module(sgd_with_decay))
    out = capsys.readouterr().out
    assert out.count(TITLE) == 1

    steps = 2 * STEPS_PER_EPOCH // 2  # accumulation: one optimizer step per two batches
    lrs = [step[0] for step in recorder.lrs]
    ratios = [step[0] for step in recorder.ratios]
    assert len(lrs) == len(ratios) == steps
    assert callback.summary_rows is not None
    (row,) = callback.summary_rows
    assert row.name == "SGD"
    assert row.adapted_steps == steps
    assert (row.skipped_steps, row.safeguard_alarms, row.resyncs) == (0, None, None)
    assert row.lr_start == pytest.approx(0.05, rel=1e-12)
    assert row.lr_start == pytest.approx(lrs[0], rel=1e-12)
    assert row.lr_end == pytest.approx(lrs[-1], rel=1e-12)
    assert row.lr_min == pytest.approx(min(lrs), rel=1e-12)
    assert row.lr_max == pytest.approx(max(lrs), rel=1e-12)
    assert row.mean_ratio == pytest.approx(sum(ratios) / steps, rel=1e-12)  # type: ignore[arg-type]
    assert len(set(lrs)) == steps  # every step used another lr: an off-by-one step would show
    assert f"{lrs[0]:.3g} → {lrs[-1]:.3g}" in out
    assert f"{sum(ratios) / steps:.3f}" in out  # type: ignore[arg-type]


def test_summary_per_param_group_and_safeguard(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    callback = CLARACallback(d=0.4, scope="param_group", safeguard=True)
    recorder = StepRecorder(callback)
    trainer = Trainer(**{**trainer_kwargs, "callbacks": [callback, recorder]})
    trainer.fit(make_module(two_groups))
    assert callback.summary_rows is not None
    assert [row.name for row in callback.summary_rows] == ["SGD/pg1", "SGD/pg2"]
    for j, row in enumerate(callback.summary_rows):
        lrs = [step[j] for step in recorder.lrs]
        ratios = [step[j] for step in recorder.ratios]
        assert row.lr_start == pytest.approx(lrs[0], rel=1e-12)
        assert row.lr_end == pytest.approx(lrs[-1], rel=1e-12)
        assert (row.lr_min, row.lr_max) == (pytest.approx(min(lrs)), pytest.approx(max(lrs)))
        assert row.mean_ratio == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)  # type: ignore[arg-type]
        assert row.adapted_steps == STEPS_PER_EPOCH
        assert row.safeguard_alarms == 0
    assert callback.summary_rows[0].lr_start != callback.summary_rows[1].lr_start  # 0.05 vs 0.01
    out = capsys.readouterr().out
    assert "safeguard alarms: SGD 0" in out
    assert "SGD/pg2" in out


def test_summary_off_prints_nothing(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    callback = CLARACallback(d=0.4, summary=False)
    trainer = Trainer(**{**trainer_kwargs, "callbacks": [callback]})
    trainer.fit(make_module(sgd))
    assert callback.controllers[0].num_adapted_steps == STEPS_PER_EPOCH
    assert TITLE not in capsys.readouterr().out
    assert callback.summary_rows is None


def test_summary_only_on_rank_zero(
    make_module: MakeModule,
    trainer_kwargs: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what DDP's strategies set on every other rank
    callback = CLARACallback(d=0.4)
    trainer = Trainer(**{**trainer_kwargs, "callbacks": [callback]})
    trainer.fit(make_module(sgd))
    assert callback.controllers[0].num_adapted_steps == STEPS_PER_EPOCH
    assert TITLE not in capsys.readouterr().out
    assert callback.summary_rows is None


def test_no_summary_and_no_hooks_left_after_an_exception(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    class Boom(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    callback = CLARACallback(d=0.4)
    trainer = Trainer(**{**trainer_kwargs, "callbacks": [callback, Boom()]})
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_module(sgd))
    optimizer = trainer.optimizers[0]
    assert callback.controllers[0].num_adapted_steps == 3
    assert not optimizer._optimizer_step_pre_hooks  # CLARA's and the summary's hooks are gone
    assert TITLE not in capsys.readouterr().out
    assert callback.summary_rows is None


def test_summary_counts_the_resumed_fit_only(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], tmp_path: Any
) -> None:
    first = CLARACallback(d=0.4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(**{**trainer_kwargs, "enable_checkpointing": True, "callbacks": [first, checkpoint]})
    trainer.fit(make_module(sgd))
    assert first.summary_rows is not None
    end_of_first = first.summary_rows[0].lr_end
    factor = first.controllers[0].lr_factor

    second = CLARACallback(d=0.4)
    recorder = StepRecorder(second)
    trainer = Trainer(**{**trainer_kwargs, "max_epochs": 2, "callbacks": [second, recorder]})
    trainer.fit(make_module(sgd), ckpt_path=tmp_path / "last.ckpt")
    assert second.summary_rows is not None
    (row,) = second.summary_rows
    assert second.controllers[0].num_adapted_steps == 2 * STEPS_PER_EPOCH  # restored counter + this fit
    assert row.adapted_steps == STEPS_PER_EPOCH  # this fit only
    assert row.lr_start == pytest.approx(recorder.lrs[0][0], rel=1e-12)
    assert row.lr_start == pytest.approx(0.05 * factor, rel=1e-12)  # the restored F, not F = 1
    assert row.lr_start != pytest.approx(end_of_first)  # F moved once more after the last step


def test_bookkeeping_never_settles_a_deferred_step(
    make_module: MakeModule, trainer_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulate CUDA's deferred host part on the CPU: every settle must come from CLARA's own pre-hook.

    ``PendingStep.send`` keeps every step's results pending (as on CUDA) and each settle is
    traced; with the summary and the progress bar on, and no logger (logging reads settled
    values by design), only CLARA's pre-hook and the final detach may wait for a step.
    """
    waits: list[list[str]] = []

    defer_pending_steps(monkeypatch, lambda: waits.append([frame.name for frame in traceback.extract_stack()]))
    # the loss brake and the safeguard read every step's loss on the host, which waits for the step
    callback = CLARACallback(d=0.4, prog_bar=True, safeguard=False, loss_brake=False)
    trainer = Trainer(**{**trainer_kwargs, "max_epochs": 2, "callbacks": [callback]})
    trainer.fit(make_module(sgd))
    steps = 2 * STEPS_PER_EPOCH
    assert len(waits) == steps  # every step was deferred and settled exactly once
    in_step = [stack for stack in waits if "_before_step" in stack]
    assert len(in_step) == steps - 1  # CLARA's pre-hook settles the previous step ...
    (last,) = [stack for stack in waits if "_before_step" not in stack]
    assert "on_fit_end" in last  # ... and the last one is settled once, at the end of the fit
    assert callback.summary_rows is not None
    assert callback.summary_rows[0].adapted_steps == steps
    assert callback.summary_rows[0].lr_end == pytest.approx(callback.controllers[0].lr_used[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------- progress bar


@pytest.mark.parametrize("bar", [TQDMProgressBar, partial(RichProgressBar, leave=True)], ids=["tqdm", "rich"])
@pytest.mark.parametrize(
    ("configure", "keys"), [(sgd, ["clara_lr"]), (two_groups, ["clara_lr-SGD/pg1", "clara_lr-SGD/pg2"])]
)
def test_prog_bar_shows_the_lr_used(
    make_module: MakeModule,
    trainer_kwargs: dict[str, Any],
    bar: Callable[[], Callback],
    configure: Any,
    keys: list[str],
) -> None:
    callback, logger, progress = CLARACallback(d=0.4, prog_bar=True, summary=False), RecordingLogger(), bar()
    trainer = Trainer(
        **{
            **trainer_kwargs,
            "enable_progress_bar": True,
            "logger": logger,
            "log_every_n_steps": 1,
            "callbacks": [callback, progress],
        }
    )
    module = make_module(configure)
    trainer.fit(module)
    shown = progress.get_metrics(trainer, module)  # type: ignore[attr-defined]
    lrs = callback.controllers[0].lr_used
    for key, lr in zip(keys, lrs, strict=True):
        assert trainer.progress_bar_metrics[key] == pytest.approx(lr, rel=1e-12)
        assert shown[key] == pytest.approx(lr, rel=1e-12)
    assert not math.isclose(lrs[0], 0.05)  # the last lr used, not the initial one
    logged = logger.keys()
    assert not any(key.startswith("clara_lr") for key in logged)  # progress bar only
    assert any(key.startswith("clara/lr-") for key in logged)  # the loggers keep their own keys


def test_prog_bar_off_by_default(make_module: MakeModule, trainer_kwargs: dict[str, Any]) -> None:
    callback = CLARACallback(d=0.4, summary=False)
    trainer = Trainer(**{**trainer_kwargs, "enable_progress_bar": True, "callbacks": [callback, TQDMProgressBar()]})
    trainer.fit(make_module(sgd))
    assert callback.controllers[0].num_adapted_steps == STEPS_PER_EPOCH
    assert not any("clara" in key for key in trainer.progress_bar_metrics)
    assert not any("clara" in key for key in trainer.callback_metrics)


@pytest.mark.parametrize(("kwargs", "argument"), [({"summary": 1}, "summary"), ({"prog_bar": "yes"}, "prog_bar")])
def test_new_flags_must_be_bools(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(TypeError, match=argument):
        CLARACallback(**kwargs)


def test_counts_under_the_table_keep_optimizers_whose_names_hold_a_slash() -> None:
    """A scheduler config may be named "lr/gen": the counts are keyed by the optimizer, not by the name's
    first part (the generator's alarms were merged into, and hidden by, the discriminator's)."""
    from lightning_clara import CLARA
    from lightning_clara.summary import FitSummary

    rows = []
    for names, alarms in ((["lr/gen"], 3), (["lr/disc/pg1", "lr/disc/pg2"], 0)):
        groups = [{"params": [torch.nn.Parameter(torch.randn(3))]} for _ in names]
        controller = CLARA(torch.optim.SGD(groups, lr=0.1), safeguard=True)
        summary = FitSummary()
        summary.track(controller)
        controller.safeguard.alarms = alarms  # type: ignore[union-attr]  # in this fit
        rows += summary.rows([names])
    assert [row.optimizer for row in rows] == ["lr/gen", "lr/disc", "lr/disc"]
    assert "safeguard alarms: lr/gen 3, lr/disc 0" in render(summary_table(rows))
