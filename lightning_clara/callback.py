"""``CLARACallback``: CLARA for every optimizer of a Lightning fit, logged to the trainer's loggers.

Thin glue: the adaptation itself happens in :class:`~lightning_clara.CLARA`, attached to each
optimizer's ``step()`` through torch's step hooks, so it runs exactly on real optimizer steps
(gradient accumulation and GradScaler skips included) whatever the training loop looks like.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_clara.checkpoint import checked_states, load_states, run_length
from lightning_clara.controller import CLARA
from lightning_clara.fit_inputs import estimated_steps, fit_options, step_loss
from lightning_clara.followed import changed, count_at, follow, has_parameters
from lightning_clara.metrics import controller_metrics, log_to_loggers, optimizer_names, show_in_progress_bar
from lightning_clara.option_docs import with_option_docs
from lightning_clara.options import (
    OPTION_NAMES,
    CLARAOptions,
    Rule,
    Scope,
    merged_options,
)
from lightning_clara.strategies import sharding_for
from lightning_clara.summary import FitSummary, GroupSummary, print_below_progress_bar, summary_table

__all__ = ["CALLBACK_OPTIONS", "CLARACallback", "optimizer_names"]  # optimizer_names lives in .metrics

#: The CLARA options the callback takes as keywords (the strategy gives the sharding; the 2017
#: variant and custom references go through ``options``).
CALLBACK_OPTIONS: tuple[str, ...] = tuple(n for n in OPTION_NAMES if n not in ("variant", "reference", "sharding"))
_CALLBACK_DOCS = {
    "safeguard": "also watch the training loss (training_step's loss) with a Page-Hinkley test; on a blow-up "
    "undo the last step where a snapshot exists and halve F (see CLARA.observe_loss). Off by default, as in "
    "CLARA: the loss brake, fed the same loss, is on. Costs two parameter snapshots.",
    "total_steps": "the optimizer steps of the fit, for the run-length defaults of hold_after and d (a short "
    "fit finds in its first 40 %) and the anneal; None: the Trainer's estimated_stepping_batches, when it is finite.",
    "anneal": "decay the lr used linearly over the fit's second half, from max(hold_after, total_steps / 2) "
    "towards 0 (at least 1 %) (None, the default: on in a fit with automatic optimization and no lr scheduler, "
    "StochasticWeightAveraging or BackboneFinetuning; off otherwise; True: on, held where a scheduled lr first "
    "moves; False: off).",
}


def _runs_in_worker_processes(trainer: pl.Trainer) -> bool:
    """Whether this fit runs in processes that a launcher started (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


def _tell_if_run_in_workers(trainer: pl.Trainer) -> None:
    """At fit end in the main process of a spawned fit: its callback saw none of the fit."""
    if _runs_in_worker_processes(trainer) and _is_rank_zero():
        rank_zero_info(
            "CLARACallback: this fit ran in worker processes (ddp_spawn/ddp_fork): the callback in the main "
            "process keeps no controllers or summary_rows; read the clara/* logs or a checkpoint instead"
        )


class CLARACallback(Callback):
    """Adapt the learning rate of every optimizer in Trainer.fit with CLARA.

    Keep your optimizer and scheduler: while an optimizer steps, its learning rate is
    lr_scheduled * F; F rises while successive steps agree and falls when they cancel. A fit without
    an lr scheduler (automatic optimization) decays it linearly over its second half (option anneal).
    Every log_every_n_steps the callback logs, per optimizer and param group, clara/lr-{name}
    (the lr used), clara/ratio-{name} and clara/log_factor-{name} on LearningRateMonitor's step axis.

    Args:
        options: a CLARAOptions to start from; the keyword options not at their defaults replace its fields.
            The defaults are CLARA's: the callback runs CLARA fed every step's loss.
        log: log the dynamics to trainer.loggers.
        summary: at the end of a fit that completed, print (rank 0, rich, standard output) one row
            per optimizer and param group: the lr used at the first and last adapted step, its min
            and max, the mean ratio, the adapted steps, and the counts only some fits have (skipped
            updates, safeguard alarms, rank re-syncs). Host-side bookkeeping only (no device sync);
            summary_rows keeps the rows afterwards.
        prog_bar: show the lr used in the progress bar (TQDM or Rich), as clara_lr for a
            single param group and clara_lr-{name} otherwise; logged with logger=False
            (the loggers get clara/lr-{name} through log), from a CPU tensor, so no
            device transfer. Rich's bar shows metrics with .3f: pass
            RichProgressBar(theme=RichProgressBarTheme(metrics_format=".3e")) for small lrs.
    """

    def __init__(  # CLARA's options but variant, reference, sharding (tests/controller/test_api.py)
        self,
        options: CLARAOptions | None = None,
        *,
        log: bool = True,
        summary: bool = True,
        prog_bar: bool = False,
        c: float | None = None,
        d: float | None = None,
        scope: Scope = "optimizer",
        min_factor: float | None = None,
        max_factor: float | None = None,
        min_lr: float | None = None,
        max_lr: float | None = None,
        initial_factor: float | None = None,
        unit_step: bool = False,
        safeguard: bool = False,
        consistency_check_every: int | None = None,
        rule: Rule = "normalized",
        fast_start: int | None = None,
        hold_after: int | None = None,
        target: float | None = None,
        total_steps: int | None = None,
        sample: int | None = 4096,
        loss_brake: bool | None = None,
        skip_nonfinite: bool = True,
        anneal: bool | None = None,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in CALLBACK_OPTIONS}
        for flag, value in (("log", log), ("summary", summary), ("prog_bar", prog_bar), ("safeguard", safeguard)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
        self.options = merged_options(options, given)
        chosen = self.options.safeguard
        if not isinstance(chosen, bool):  # the callback feeds the loss itself: no detector of your own
            raise TypeError(f"safeguard must be a bool, got {type(chosen).__name__} {chosen!r}")
        if self.options.sharding is not None:
            raise ValueError(
                "CLARACallback takes the sharding from the Trainer's strategy: leave options.sharding None"
            )
        self.log, self.summary, self.prog_bar = log, summary, prog_bar
        self.controllers: list[CLARA] = []
        self.names: list[list[str]] = []
        self._scheduler_configs: list[Any] = []
        self._steps_at_batch_start: list[int] = []
        self._steps_at_last_log: list[int] = []  # each optimizer's steps when its clara/* were last logged
        self._restored: dict[str, Any] | None = None
        self._fits_started = 0
        self._fit_starting = False  # between setup("fit") and on_fit_start
        self._to_restore: dict[str, Any] | None = None  # the state this fit resumes, loaded in on_train_start
        self._train_started = False  # this fit's on_train_start ran: the run's length is known
        self._fit_options = self.options
        self._fit_summary: FitSummary | None = None
        #: The rows of the last summary table (rank 0 with ``summary=True``, after a completed fit).
        self.summary_rows: list[GroupSummary] | None = None

    # ------------------------------------------------------------------ attach / detach
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sharding = sharding_for(trainer)
        restored, self._restored, self._to_restore = self._restored, None, None
        if not getattr(trainer, "ckpt_path", None):
            # only a fit that resumes (``fit(ckpt_path=...)``) continues a saved CLARA state; one that
            # ``validate(ckpt_path=...)`` or a tuner's temporary checkpoint restored is not this fit's
            restored = None
        self._detach()
        self._fit_summary = None
        self.summary_rows = None
        # Lightning runs a fit whose configure_optimizers returned None with a parameter-less stand-in
        optimizers = [optimizer for optimizer in trainer.optimizers if has_parameters(optimizer)]
        if not optimizers:
            self.controllers, self.names = [], []
            rank_zero_warn(
                "CLARACallback: the model configures no optimizer with parameters (configure_optimizers "
                "returned None or empty param groups); CLARA has nothing to adapt in this fit"
            )
            return
        if self._fits_started:
            rank_zero_info(
                "CLARACallback: a new fit starts F at initial_factor again, as configure_optimizers creates "
                "the optimizers again; to continue a fit's factors, resume it with fit(ckpt_path=...)"
            )
        self._fits_started += 1
        self._fit_options = fit_options(trainer, self.options, sharding)
        self.controllers = []
        for optimizer in optimizers:  # one by one: if one is refused, on_exception detaches those attached
            self.controllers.append(CLARA(optimizer, self._fit_options))
        self._scheduler_configs = list(getattr(trainer, "lr_scheduler_configs", ()))  # absent on stand-ins
        self.names = self._names()
        self._steps_at_batch_start, self._steps_at_last_log = [0] * len(self.controllers), [0] * len(self.controllers)
        self._to_restore, self._fit_starting, self._train_started = restored, False, False  # loaded in on_train_start
        if self.summary and _is_rank_zero():
            # after the controllers attached; a resumed state restarts it when it loads (on_train_start)
            self._fit_summary = FitSummary(self.controllers)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # until this fit attaches, the last fit's controllers are not its state (a tuner saves one meanwhile)
        self._fit_starting = stage == "fit"
        if self._fit_starting:  # a fit restores its checkpoint after setup: a state held now is a failed fit's
            self._restored = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run's length (run-length defaults, the anneal): not in on_fit_start, where estimating it would load the
        # train dataloader before a resumed fit restores it; before a resumed state loads here (it checks the length).
        if self.options.total_steps is None and self.controllers:
            self._fit_options = dataclasses.replace(self._fit_options, total_steps=estimated_steps(trainer))
        _set_run_lengths(self.controllers, self._fit_options.total_steps, trainer.global_step, self._to_restore)
        self._train_started = True
        self._load_pending()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._follow_optimizers(trainer)  # one made inside this batch's training_step: its first step runs as is

    def _follow_optimizers(self, trainer: pl.Trainer) -> None:
        """One controller per optimizer the trainer steps, in its order (:func:`~lightning_clara.followed.follow`):
        optimizers made after fit start attached before their first step, those no longer stepped let go."""
        change = follow(self.controllers, trainer.optimizers, lambda optimizer: self._attach_late(optimizer, trainer))
        if change is None:
            return  # nearly every batch: the same optimizers, in the same order
        kept, dropped = change
        for replaced in dropped:
            replaced.detach()  # its steps are over
        self.controllers = [controller for _, controller in kept]
        self._steps_at_batch_start = [count_at(self._steps_at_batch_start, index) for index, _ in kept]
        self._steps_at_last_log = [count_at(self._steps_at_last_log, index) for index, _ in kept]
        if self._fit_summary is not None:
            self._fit_summary.follow(self.controllers)
        self._scheduler_configs = list(getattr(trainer, "lr_scheduler_configs", ()))
        self.names = self._names()

    def _attach_late(self, optimizer: Optimizer, trainer: pl.Trainer) -> CLARA:
        rank_zero_warn(f"CLARACallback: optimizer {type(optimizer).__name__} was created after fit start")
        return _made_at(CLARA(optimizer, self._fit_options), trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._load_pending()  # a resumed fit already at its end skips on_train_start
        if self._fit_summary is not None:
            self._fit_summary.close()  # before detaching: the controllers still hold the last step
            self.summary_rows = self._fit_summary.rows(self._names())
            self._fit_summary = None
            print_below_progress_bar(trainer, pl_module, summary_table(self.summary_rows))
        _tell_if_run_in_workers(trainer)
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._fit_summary is not None:
            self._fit_summary.discard()  # no table over a traceback
            self._fit_summary = None
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._restored = None  # validate/test/predict(ckpt_path=...) restored it: not a fit to continue

    def _names(self) -> list[list[str]]:
        return optimizer_names([c.optimizer for c in self.controllers], self._scheduler_configs)

    def _current_names(self) -> list[list[str]]:
        """``names``, made again where a param group was added since (BaseFinetuning unfreezes into a new one)."""
        if [len(names) for names in self.names] != [len(c.optimizer.param_groups) for c in self.controllers]:
            self.names = self._names()
        return self.names

    def _detach(self) -> None:
        for controller in self.controllers:
            controller.detach()

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._follow_optimizers(trainer)  # optimizers made since the last batch: attached before their first step
        self._steps_at_batch_start = [controller.num_optimizer_steps for controller in self.controllers]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # only optimizers that really stepped in this batch: accumulation micro-batches and
        # optimizers stepped every k-th batch by hand are neither logged nor fed the loss
        steps = [controller.num_optimizer_steps for controller in self.controllers]
        stepped = changed(steps, self._steps_at_batch_start)
        if stepped:
            self._feed_loss(trainer, outputs, stepped)
            if self.prog_bar:
                show_in_progress_bar(pl_module, self.controllers, self._current_names(), stepped)
        elif pl_module.automatic_optimization:
            return  # an accumulation micro-batch: the step, and its log, come with the last one
        if not self.log or not trainer.loggers or not trainer._logger_connector.should_update_logs:
            return
        # every optimizer that stepped since its last log, not only this batch's: two optimizers stepped
        # on alternate batches with an even log_every_n_steps would otherwise leave one never logged
        metrics, self._steps_at_last_log = self.metrics(changed(steps, self._steps_at_last_log)), steps
        if metrics:
            log_to_loggers(trainer, metrics)

    def _feed_loss(self, trainer: pl.Trainer, outputs: Any, stepped: list[int]) -> None:
        """Give the batch loss (:func:`~lightning_clara.fit_inputs.step_loss`) to the optimizers that stepped."""
        if not any(self.controllers[index].wants_loss for index in stepped):
            return
        loss = step_loss(trainer, outputs)
        if loss is None:
            return
        for index in stepped:
            self.controllers[index].observe_loss(loss)

    def metrics(self, optimizers: Sequence[int] | None = None) -> dict[str, float]:
        """The current ``clara/*`` values of every optimizer (or of the given optimizer indices) and param group.

        Optimizers that have not adapted a step yet are left out.
        """
        out: dict[str, float] = {}
        names = self._current_names()
        for index in range(len(self.controllers)) if optimizers is None else optimizers:
            out.update(controller_metrics(self.controllers[index], names[index]))
        return out

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fitting = getattr(trainer.state, "fn", None) == "fit"
        if fitting and self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn(
                "CLARACallback: the checkpoint holds no CLARA state (saved without the callback?); "
                "paths and factors start fresh (F = initial_factor), the find and the anneal run over the steps left"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._to_restore is not None:  # a resumed fit before on_train_start loads it: that state is still its
            return dict(self._to_restore)
        if self._restored is not None and (self._fit_starting or not self.controllers):
            return dict(self._restored)
        if self._fit_starting:
            return {"controllers": [], "names": []}
        return {"controllers": [c.state_dict() for c in self.controllers], "names": self._current_names()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the optimizers exist, strategies that restore after setup (ModelParallel)
        # after on_fit_start: checked then, loaded in on_train_start once the run's length is known ([]: not attached)
        if not isinstance(state_dict, dict):
            raise ValueError(f"CLARACallback state must be a dict, got {type(state_dict).__name__}")
        if not (self.controllers and all(c.attached for c in self.controllers)):
            self._restored = dict(state_dict)
        elif self._train_started:
            self._load_controllers(state_dict)
        elif state_dict.get("controllers") != []:
            self._to_restore = checked_states(self.controllers, state_dict)

    def _load_pending(self) -> None:
        """The state this fit resumes, after every on_fit_start (BaseFinetuning's rebuilds its groups); an empty
        list was saved before CLARA attached (a tuner's checkpoint); the rest is checked before it loads."""
        restored, self._to_restore = self._to_restore, None
        if restored is not None and restored.get("controllers") != []:
            self._load_controllers(restored)

    def _load_controllers(self, state_dict: dict[str, Any]) -> None:
        _set_run_lengths(self.controllers, self._fit_options.total_steps, 0, state_dict)  # each state's run_offset
        load_states(self.controllers, state_dict)
        if self._fit_summary is not None:
            self._fit_summary.restart()


CLARACallback.__doc__ = with_option_docs(CLARACallback.__doc__, CALLBACK_OPTIONS, docs=_CALLBACK_DOCS)


def _made_at(controller: CLARA, global_step: int) -> CLARA:
    """A controller made at the fit's ``global_step``: its find and anneal run over the fit's rest (``run_length``)."""
    _set_run_lengths([controller], controller.total_steps, global_step, None)
    return controller


def _set_run_lengths(controllers: list[CLARA], total: int | None, global_step: int, pending: Any) -> None:
    """Each controller's length and offset (``run_length``) before ``pending``'s states load: the saved offset for
    one that loads a state (also where it loads without on_train_start: a fit resumed at its end), the fit's rest
    for one made mid-fit without one (``pending`` None, or a tuner's state of no controllers)."""
    saved = pending.get("controllers") if isinstance(pending, dict) else None
    states = list(saved) if isinstance(saved, (list, tuple)) and len(saved) == len(controllers) else None
    for controller, state in zip(controllers, states or [None] * len(controllers), strict=True):
        controller.set_total_steps(*run_length(total, global_step, state))


def _is_rank_zero() -> bool:
    """The global rank Lightning's strategies set (``rank_zero_only.rank``; typed loosely by Lightning)."""
    return bool(getattr(rank_zero_only, "rank", 0) == 0)
