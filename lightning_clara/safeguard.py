"""SALeRA's "safe" part: a Page-Hinkley test that detects a blow-up of the training loss, and the
restore point an alarm rolls the parameters back to.

The test accumulates how far each loss lies above its running mean, in standard deviations
of the loss's own noise (so it is scale-free), minus a tolerated drift ``delta``, and raises
an alarm once the accumulated excess passes ``threshold``. A NaN or infinite loss is an
alarm at once. :class:`RestorePoint` keeps the parameters from before the last two steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_clara._validation import check_in_range, check_positive_int

__all__ = ["UNFED_STEPS", "PageHinkley", "RestorePoint", "Safeguard", "snapshot"]

#: Optimizer steps after which a safeguard fed no loss warns: it watches nothing.
UNFED_STEPS = 100


def snapshot(store: dict[Tensor, Tensor], params: Sequence[Tensor], views: Sequence[Tensor]) -> None:
    """Copy each view into ``store[param]``, a persistent buffer shaped like it (allocated when missing or
    no longer matching), in one foreach copy."""
    buffers = []
    for param, view in zip(params, views, strict=True):
        buffer = store.get(param)
        if buffer is None or buffer.shape != view.shape or buffer.dtype != view.dtype or buffer.device != view.device:
            buffer = store[param] = torch.empty_like(view, memory_format=torch.preserve_format)
        buffers.append(buffer)
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(buffers, list(views))


class PageHinkley:
    """One-sided Page-Hinkley test for an increase of the mean of a stream of losses.

    Each loss is measured in units of the stream's own noise: ``z = (loss - mean) / std`` with an
    exponential running mean and variance (updated after the test, so an outlier cannot hide
    itself). The test accumulates ``excess <- max(0, excess + z - delta)`` and raises an alarm
    when ``excess > threshold``. A steadily decreasing loss gives negative z and never alarms; a
    blow-up of many standard deviations alarms at once; pure noise alarms about once every
    ``exp(2 * delta * threshold)`` steps or more rarely (CUSUM run-length bound).

    Args:
        delta: tolerated drift per step, in standard deviations of the loss noise.
        threshold: accumulated excess, in standard deviations, that raises the alarm.
        memory: the running mean and variance average about this many steps.
        warmup: observations before an alarm can be raised (the statistics settle first).
    """

    def __init__(self, delta: float = 0.5, threshold: float = 20.0, memory: int = 50, warmup: int = 10) -> None:
        self.delta = check_in_range("delta", delta, 0.0, math.inf, high_open=True)
        self.threshold = check_in_range("threshold", threshold, 0.0, math.inf, low_open=True, high_open=True)
        self.memory = check_positive_int("memory", memory)
        self.warmup = check_positive_int("warmup", warmup)
        self.reset()
        self.alarms = 0
        self.in_use = False  # set while a CLARA controller feeds it: one detector watches one loss stream

    def reset(self) -> None:
        """Forget the statistics (after an alarm, or when the lr changed on purpose)."""
        self.count = 0
        self.mean = 0.0
        self.variance = 0.0
        self.excess = 0.0

    def update(self, loss: float) -> bool:
        """Feed one loss; return True when the test raises an alarm (the caller then resets it)."""
        if not math.isfinite(loss):
            self.alarms += 1
            return True
        alarm = False
        if self.count >= self.warmup:
            scale = math.sqrt(self.variance) + 1e-12 * (abs(self.mean) + 1e-30)
            self.excess = max(0.0, self.excess + (loss - self.mean) / scale - self.delta)
            alarm = self.excess > self.threshold
        self.count += 1
        rate = max(1.0 / self.count, 1.0 / self.memory)
        deviation = loss - self.mean
        self.mean += rate * deviation
        self.variance = (1.0 - rate) * (self.variance + rate * deviation * deviation)
        if alarm:
            self.alarms += 1
        return alarm

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean,
            "variance": self.variance,
            "excess": self.excess,
            "alarms": self.alarms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.variance = float(state["variance"])
        self.excess = float(state["excess"])
        self.alarms = int(state["alarms"])


class RestorePoint:
    """The parameters from before the last two steps, so that an alarm can restore them bit for bit.

    Two parameter-sized buffers (the safeguard's cost), swapped each step, never copied twice.

    Args:
        view: maps a parameter to the tensor that holds its data on this rank (a DTensor's local
            shard); the buffers are shaped like the view.
    """

    def __init__(self, view: Callable[[Tensor], Tensor] | None = None) -> None:
        self._view = view
        self._current: dict[Tensor, Tensor] = {}  # theta before the last step
        self._previous: dict[Tensor, Tensor] = {}  # theta before the step before
        self._valid_current: set[Tensor] = set()
        self._valid_previous: set[Tensor] = set()
        self._steps_at_snapshot: int | None = None  # the optimizer steps completed when the last one was taken

    def before_step(self, params: Sequence[Tensor], steps_taken: int | None = None, skipped: bool = False) -> None:
        """Snapshot ``params`` (the step pre-hook); the last snapshot becomes the previous one if its step ran:
        ``steps_taken`` (the optimizer steps completed so far; None: it ran) moved on since it was taken, and
        it was not ``skipped`` on a device flag (a fused optimizer's, GradScaler's). A step that raised or was
        skipped changed nothing: its snapshot is taken again, and an undo still goes back two steps that ran."""
        ran = (steps_taken is None or steps_taken != self._steps_at_snapshot) and not skipped
        self._steps_at_snapshot = steps_taken
        if ran:
            self._previous, self._current = self._current, self._previous
            self._valid_previous = self._valid_current
        self._valid_current = set(params)
        snapshot(self._current, params, self._views(params))

    def undo(self) -> int:
        """Restore the parameters from before the last two steps (or the last one, if only that is
        held); returns how many steps were undone (0: nothing held since the last undo)."""
        if not self._valid_current:
            return 0
        undone, source = 1, self._current
        if self._valid_previous >= self._valid_current:
            undone, source = 2, self._previous
        params = list(self._valid_current)
        with torch.no_grad():
            torch._foreach_copy_(self._views(params), [source[p] for p in params])
        self._valid_current, self._valid_previous = set(), set()
        return undone

    def release(self) -> None:
        self._current.clear()
        self._previous.clear()
        self._valid_current, self._valid_previous = set(), set()
        self._steps_at_snapshot = None

    def _views(self, params: Sequence[Tensor]) -> list[Tensor]:
        detached = [p.detach() for p in params]
        return detached if self._view is None else [self._view(p) for p in detached]


class Safeguard:
    """The safeguard in one object: the blow-up test on the losses (:class:`PageHinkley`), the restore
    point an alarm rolls the parameters back to, and the state a checkpoint keeps (the test's).

    Args:
        detector: the test (the ``safeguard`` option's, so ``clara.safeguard`` is this detector).
        view: maps a parameter to the tensor holding its data on this rank (sharded parameters).
    """

    def __init__(self, detector: PageHinkley, view: Callable[[Tensor], Tensor] | None = None) -> None:
        if detector.in_use:  # fed two loss streams, it would see half of each, and one alarm would blind both
            raise ValueError(
                "this PageHinkley already watches another CLARA controller's losses; give each controller its own "
                "(a new PageHinkley(...)), or detach() the other one first"
            )
        detector.in_use = True
        self.detector = detector
        self.restore_point = RestorePoint(view)
        self._holds_detector = True  # until close(): a second close() must not free it for another controller
        self._judged = 0  # losses fed since attaching

    @classmethod
    def maybe(cls, detector: PageHinkley | None, sharding: Any = None) -> Safeguard | None:
        """The safeguard of a controller whose option resolved to ``detector`` (None: no safeguard);
        ``sharding`` (a :class:`~lightning_clara.distributed.Sharding`) gives the local view of each shard."""
        return None if detector is None else cls(detector, None if sharding is None else sharding.local)

    def before_step(self, params: Sequence[Tensor], steps_taken: int | None = None, skipped: bool = False) -> None:
        """Snapshot the parameters the coming step will change (the arguments: see :class:`RestorePoint`)."""
        if steps_taken == UNFED_STEPS and not self._judged:
            warnings.warn(
                f"CLARA: safeguard=True, but no loss in {UNFED_STEPS} optimizer steps: the safeguard watches nothing. "
                "Call observe_loss(loss) after each step; "
                "CLARACallback does it with training_step's loss (return it), the Transformers callback via add_clara",
                RuntimeWarning,
                stacklevel=2,
            )
        self.restore_point.before_step(params, steps_taken, skipped)

    def judge(self, loss: float) -> bool:
        """Feed one step's loss; True on an alarm, after which the test starts afresh."""
        self._judged += 1
        if not self.detector.update(loss):
            return False
        self.detector.reset()
        return True

    def undo(self) -> int:
        """Restore the parameters from before the step that led to the alarm; how many steps were undone."""
        return self.restore_point.undo()

    def release(self) -> None:
        """Drop the restore point (detached, or a state loaded: an alarm undoes only steps taken since)."""
        self.restore_point.release()

    def close(self) -> None:
        """Release the restore point and the detector, which another controller may then take."""
        self.release()
        if self._holds_detector:
            self.detector.in_use = self._holds_detector = False

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)
