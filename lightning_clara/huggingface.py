"""CLARA for the 🤗 Transformers ``Trainer``: attach to the optimizer it builds, log ``clara/*`` with its logs.

Optional: importing this module needs ``transformers`` (``pip install "lightning-clara[transformers]"``);
the rest of the package never imports it.

    from lightning_clara.huggingface import add_clara
    trainer = Trainer(model=model, args=args, train_dataset=train)
    add_clara(trainer)   # before trainer.train(); options as for CLARA
    trainer.train()

The Trainer hands its reporting integrations (TensorBoard, W&B ...) each ``logs`` dict before the
callbacks passed to ``Trainer(callbacks=...)``; :func:`add_clara` puts the callback first, so those
integrations see the ``clara/*`` values. A callback passed in ``callbacks=`` still adapts, and its
values reach ``trainer.state.log_history``, but not the integrations that ran before it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_clara.controller import CLARA
from lightning_clara.options import CLARAOptions, merged_options

__all__ = ["CLARATrainerCallback", "add_clara"]


class CLARATrainerCallback(TrainerCallback):
    """Adapt the learning rate of the Trainer's optimizer with CLARA; options as for :class:`CLARA`.

    The Trainer's scheduler keeps setting the base lr; the lr used is ``lr_scheduled * F``. At each
    logging step the callback adds, per param group, ``clara/lr``, ``clara/ratio`` and
    ``clara/log_factor`` (suffixed ``-pg{j}`` when there are several groups, as the Trainer's
    decay / no-decay split makes). ``total_steps`` defaults to the Trainer's ``max_steps``. The
    Trainer does not hand its callbacks the loss of every step, so there is no safeguard here (and
    Adam keeps the target 0.7). CLARA's state is not written to the Trainer's checkpoints: a
    resumed run starts its paths and F afresh.
    """

    def __init__(self, options: CLARAOptions | None = None, **overrides: Any) -> None:
        self.options = merged_options(options, overrides)
        if self.options.safeguard:
            raise ValueError(
                "CLARATrainerCallback does not offer the safeguard (it restores parameters the Trainer's "
                "checkpoints do not know of); leave safeguard off: the loss brake watches the loss"
            )
        self.controller: CLARA | None = None
        self.tapped = False  # add_clara taps the Trainer's training_step for the loss
        self._loss: torch.Tensor | None = None

    def tap(self, trainer: Trainer) -> None:
        """Wrap ``trainer.training_step`` so that each step's loss reaches CLARA (what :func:`add_clara` does)."""
        step = trainer.training_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if isinstance(loss, torch.Tensor):
                loss = loss.detach()
                if trainer.args.world_size > 1:
                    loss = trainer.accelerator.reduce(loss, reduction="mean")
                self._loss = loss if self._loss is None else self._loss + loss
            return loss

        trainer.training_step = training_step  # type: ignore[method-assign]
        self.tapped = True

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None:
            raise ValueError("CLARATrainerCallback: the Trainer passed no optimizer to on_train_begin")
        self._detach()
        options = self.options
        if options.total_steps is None and state.max_steps > 0:
            # the run-length defaults of hold_after and d
            options = dataclasses.replace(options, total_steps=state.max_steps)
        self.controller = CLARA(optimizer, options)  # unwraps accelerate's AcceleratedOptimizer
        self._loss = None
        if self.controller.wants_loss and not self.tapped:
            warnings.warn(
                "CLARATrainerCallback gets no loss when passed in callbacks=: attach it with add_clara(trainer) "
                "so that the loss brake sees every step's loss",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """After each optimizer step: hand CLARA the loss of that step's batch (all its micro-batches)."""
        if self.controller is not None and self._loss is not None:
            self.controller.observe_loss(self._loss)
        self._loss = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs:  # training logs only, not evaluation or the final summary
            return
        values = self.metrics()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer appended a copy of logs before on_log

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._detach()

    def metrics(self) -> dict[str, float]:
        """The current ``clara/*`` values (empty before the first adapted step)."""
        controller = self.controller
        if controller is None or controller.num_adapted_steps == 0:
            return {}
        groups = len(controller.optimizer.param_groups)
        out: dict[str, float] = {}
        for j, (lr, ratio, log_factor) in enumerate(
            zip(controller.lr_used, controller.ratios, controller.log_factors, strict=True)
        ):
            suffix = "" if groups == 1 else f"-pg{j}"
            out[f"clara/lr{suffix}"] = lr
            out[f"clara/log_factor{suffix}"] = log_factor
            if ratio is not None:
                out[f"clara/ratio{suffix}"] = ratio
        return out

    def _detach(self) -> None:
        if self.controller is not None:
            self.controller.detach()


def add_clara(trainer: Trainer, options: CLARAOptions | None = None, **overrides: Any) -> CLARATrainerCallback:
    """Add a :class:`CLARATrainerCallback` ahead of the Trainer's reporting integrations and return it."""
    callback = CLARATrainerCallback(options, **overrides)
    callback.tap(trainer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
