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

If ``trainer.train()`` raises, :func:`add_clara`'s wrapper detaches CLARA (the optimizer steps at its
own lr again); the Trainer has no exception hook, so a callback passed in ``callbacks=`` stays
attached after a crash: call its ``on_train_end`` (or build a new optimizer) before stepping on.

CLARA's state goes into each Trainer checkpoint (``checkpoint-N/clara_state.pt``) and comes back on
``train(resume_from_checkpoint=...)``, checked before it is loaded, so log F continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from lightning_clara.checkpoint import run_length
from lightning_clara.controller import CLARA
from lightning_clara.options import CLARAOptions, merged_options

__all__ = ["STATE_FILE", "CLARATrainerCallback", "add_clara"]

#: CLARA's state in a Trainer checkpoint directory, beside the optimizer's.
STATE_FILE = "clara_state.pt"


class CLARATrainerCallback(TrainerCallback):
    """Adapt the learning rate of the Trainer's optimizer with CLARA; options as for :class:`CLARA`, given as
    ``**overrides``: each one given replaces its field of ``options``, a default value included.

    The Trainer's scheduler keeps setting the base lr; the lr used is ``lr_scheduled * F`` (the anneal only
    with ``lr_scheduler_type="constant"``: every other schedule decays by itself). At each
    logging step the callback adds, per param group, ``clara/lr``, ``clara/ratio`` and
    ``clara/log_factor`` (suffixed ``-pg{j}`` when there are several groups, as the Trainer's
    decay / no-decay split makes). ``total_steps`` defaults to the Trainer's ``max_steps``. Each
    step's loss reaches CLARA (the loss brake, and the safeguard with ``safeguard=True``) when
    :func:`add_clara` attached the callback. Every Trainer checkpoint holds CLARA's state
    (:data:`STATE_FILE`); a resumed run loads it, and warns once where the checkpoint has none.
    """

    def __init__(self, options: CLARAOptions | None = None, **overrides: Any) -> None:
        self.options = merged_options(options, overrides, signature=False)
        self.controller: CLARA | None = None
        self.tapped = False  # add_clara taps the Trainer's training_step for the loss
        self._loss: torch.Tensor | None = None
        self._reduce: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss  # the mean over ranks (tap)
        #: The checkpoint ``train(resume_from_checkpoint=...)`` resumes from, as add_clara saw it.
        self._resume_from: str | None = None

    def tap(self, trainer: Trainer) -> None:
        """Wrap ``trainer.training_step`` so that each step's loss reaches CLARA (what :func:`add_clara` does)."""
        step = trainer.training_step
        self._reduce = functools.partial(trainer.accelerator.reduce, reduction="mean")

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if isinstance(loss, torch.Tensor):  # summed over the micro-batches, reduced over ranks per step
                seen = loss.detach().clone()
                self._loss = seen if self._loss is None else self._loss + seen
            return loss  # the Trainer keeps this rank's own loss

        trainer.training_step = training_step  # type: ignore[method-assign]
        train = trainer.train

        @functools.wraps(train)
        def train_and_note_the_checkpoint(*args: Any, **kwargs: Any) -> Any:
            resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
            if resume is True:  # the Trainer resolves it the same way (and raises if there is none)
                resume = get_last_checkpoint(trainer.args.output_dir)  # type: ignore[no-untyped-call]
            self._resume_from = os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None
            try:
                return train(*args, **kwargs)
            except BaseException:
                self._detach()  # the Trainer has no exception hook: the optimizer must not keep lr x F after a crash
                raise

        trainer.train = train_and_note_the_checkpoint  # type: ignore[method-assign]
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
        # DeepSpeed by a config file or by `accelerate launch --use_deepspeed` (only the plugin is set then);
        # FSDP1's flat parameters CLARA refuses itself
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise NotImplementedError(
                "CLARATrainerCallback does not support DeepSpeed yet: its ZeRO partitions are not wired in. "
                "Supported: one device, DDP, and FSDP2, whose DTensor parameters CLARA reads itself."
            )
        self._detach()
        options = self.options
        if options.total_steps is None and state.max_steps > 0:
            # the run-length defaults of hold_after and d
            options = dataclasses.replace(options, total_steps=state.max_steps)
        if options.anneal is None and getattr(args, "lr_scheduler_type", "linear") != "constant":  # a str enum
            options = dataclasses.replace(options, anneal=False)  # the Trainer's schedule decays: no anneal on it
        self.controller = CLARA(optimizer, options)  # unwraps accelerate's AcceleratedOptimizer
        self._loss = None
        if state.global_step > 0:  # the Trainer resumed a checkpoint: continue CLARA where it was
            self._restore(args, state)
        if self.controller.wants_loss and not self.tapped:
            warnings.warn(
                "CLARATrainerCallback gets no loss when passed in callbacks=: attach it with add_clara(trainer) "
                "so that the loss brake sees every step's loss",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """After each optimizer step: hand CLARA the loss of that step's batch (all its micro-batches)."""
        if self.controller is not None and self._loss is not None and self.controller.wants_loss:
            loss = self._loss
            if args.world_size > 1:  # every rank the same loss: one small all-reduce per optimizer step
                loss = self._reduce(loss)
            self.controller.observe_loss(loss)
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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write CLARA's state into the checkpoint the Trainer has just saved (by the saving process).

        The Trainer calls this after its own save, and with ``push_to_hub`` after it started uploading the
        folder: the Hub's copy may lack ``clara_state.pt`` (resume from the local folder to continue F)."""
        folder = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.controller is None or not args.should_save:
            return
        if not os.path.isdir(folder):  # a hyper-parameter search saves under run-*/: not known here
            warnings.warn(
                f"CLARATrainerCallback: no checkpoint folder {folder}: CLARA's state was not saved with it",
                UserWarning,
                stacklevel=2,
            )
            return
        torch.save(self.controller.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._detach()

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """Load the resumed checkpoint's CLARA state (checked first: ValueError naming the field)."""
        assert self.controller is not None
        folder = self._resume_from or os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            warnings.warn(
                f"CLARATrainerCallback: resuming at step {state.global_step} from a checkpoint without CLARA "
                f"state ({path} not found): paths and F start afresh, the find and the anneal run over the steps left",
                UserWarning,
                stacklevel=3,
            )
            # the Trainer's max_steps counts from its first step, a fresh controller from 0: the steps left
            self.controller.set_total_steps(*run_length(self.controller.total_steps, state.global_step))
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.controller.set_total_steps(*run_length(self.controller.total_steps, state.global_step, saved))
        self.controller.load_state_dict(saved)

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
