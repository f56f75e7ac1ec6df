"""End-of-fit summary of CLARA's learning-rate dynamics: per-step bookkeeping and a ``rich`` table.

:class:`FitSummary` gathers, per optimizer and param group, the learning rate used at the first
and last adapted step, its minimum and maximum and the mean ratio ``r`` over the fit, from
values the controller already holds on the host: the controller tells it each adapted step as the
step's host part runs (at once on the CPU, at the next pre-hook on CUDA), with the lr each group
used, so the bookkeeping adds no device-to-host synchronisation and depends on no hook order. Only
:meth:`FitSummary.close`, at the end of the fit, settles the last step (one synchronisation,
which detaching the controller would cost anyway).

:func:`summary_table` turns the resulting :class:`GroupSummary` rows into a ``rich`` table; it
is a pure function of its data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from rich.console import Console
from rich.table import Table

from lightning_clara.controller import CLARA

__all__ = ["FitSummary", "GroupSummary", "print_below_progress_bar", "summary_table"]

TITLE = "CLARA: learning rate used over the fit"
CAPTION = (
    "lr: the lr used (lr_scheduled × F, annealed at the end of a fit with a constant lr) at the adapted "
    "steps. r: the path ratio (1 on noise); the rule raises the lr while r > target and lowers it below, "
    "until its hold. skipped: steps with a NaN/inf update, not adapted."
)


@dataclass(frozen=True)
class GroupSummary:
    """What the summary shows for one param group (``None``: no adapted step in this fit).

    The step counts are per optimizer (every group of an optimizer shows the same), counted in
    this fit only. ``safeguard_alarms`` is ``None`` without a safeguard, ``resyncs`` ``None``
    without a rank-consistency check and ``skipped_updates`` ``None`` while no update was skipped for
    non-finite gradients; their lines under the table are shown only when some row has them.
    """

    name: str
    lr_start: float | None
    lr_end: float | None
    lr_min: float | None
    lr_max: float | None
    mean_ratio: float | None
    adapted_steps: int
    skipped_steps: int
    safeguard_alarms: int | None = None
    resyncs: int | None = None
    skipped_updates: int | None = None
    optimizer: str = ""  # the optimizer's name, which the counts under the table are keyed by


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _lr(value: float | None) -> str:
    """Three significant digits, with a short exponent below 1e-3 (``1.23e-5``): lrs span decades."""
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return format(value, ".3g")
    mantissa, exponent = format(value, ".2e").split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _per_optimizer(rows: Sequence[GroupSummary], field_name: str, label: str) -> str | None:
    """``label: Adam 2, SGD 0`` for a count every group of an optimizer shares; None if no row has it."""
    counts = {}
    for row in rows:
        if (value := getattr(row, field_name)) is not None:
            counts[row.optimizer or row.name.split("/")[0]] = value
    return f"{label}: " + ", ".join(f"{name} {value}" for name, value in counts.items()) if counts else None


def _caption(rows: Sequence[GroupSummary]) -> str:
    """The legend, then the per-optimizer counts that only some fits have (outside the columns: 80 wide)."""
    counts = (
        _per_optimizer(rows, "safeguard_alarms", "safeguard alarms"),
        _per_optimizer(rows, "resyncs", "rank re-syncs"),
        _per_optimizer(rows, "skipped_updates", "updates skipped (NaN/inf gradients)"),
    )
    return "\n".join([CAPTION, *filter(None, counts)])


def summary_table(rows: Sequence[GroupSummary], *, title: str | None = TITLE) -> Table:
    """A ``rich`` table, one row per param group: lr start → end, min, max, mean r and the step counts.

    Learning rates have three significant digits and a short exponent (``1.23e-5``); ``-`` marks a
    value that does not exist (no adapted step). Every column fits an 80-column terminal on one
    line; only a long group name folds.
    """
    table = Table(title=title, caption=_caption(rows), caption_justify="left", show_edge=False, pad_edge=False)
    # the one column that may fold when the terminal is narrow; numbers never do
    table.add_column("group", justify="left", overflow="fold", min_width=6)
    for header in ("lr start → end", "lr min", "lr max", "mean r", "steps", "skipped"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.name,
            "-" if row.lr_start is None else f"{_lr(row.lr_start)} → {_lr(row.lr_end)}",
            _lr(row.lr_min),
            _lr(row.lr_max),
            _number(row.mean_ratio, ".3f"),
            str(row.adapted_steps),
            str(row.skipped_steps),
        )
    return table


@dataclass
class _GroupStats:
    """Running statistics of one param group over the adapted steps of a fit."""

    first: float | None = None
    last: float | None = None
    low: float = math.inf
    high: float = -math.inf
    ratio_sum: float = 0.0
    ratio_count: int = 0

    def add(self, lr: float, ratio: float | None) -> None:
        if self.first is None:
            self.first = lr
        self.last = lr
        self.low = min(self.low, lr)
        self.high = max(self.high, lr)
        if ratio is not None and math.isfinite(ratio):
            self.ratio_sum += ratio
            self.ratio_count += 1


@dataclass
class _Tracker:
    """The bookkeeping for one controller; see :class:`FitSummary`."""

    controller: CLARA
    groups: list[_GroupStats] = field(default_factory=list)
    adapted: int = 0  # adapted steps told in this fit
    skipped_base: int = 0
    alarms_base: int = 0
    resyncs_base: int = 0
    skipped_updates_base: int = 0
    listening: bool = False

    def start(self) -> None:
        """(Re)start counting from the controller's current state (at attach time, or after a restore)."""
        controller = self.controller
        self.skipped_base = controller.num_skipped_steps  # settles first: a pending step is not this fit's
        self.alarms_base = controller.num_safeguard_alarms
        self.resyncs_base = controller.num_resyncs
        self.skipped_updates_base = controller.num_skipped_updates
        self.groups = []
        self.adapted = 0

    def on_step(self, lrs: list[float], ratios: list[float | None]) -> None:
        """The controller tells each adapted step: the lr each group used and its ratio after the step."""
        self.adapted += 1
        while len(self.groups) < len(lrs):
            self.groups.append(_GroupStats())
        for j, lr in enumerate(lrs):
            self.groups[j].add(lr, ratios[j] if j < len(ratios) else None)

    def rows(self, names: Sequence[str]) -> list[GroupSummary]:
        controller = self.controller
        skipped = controller.num_skipped_steps - self.skipped_base
        alarms = None if controller.safeguard is None else controller.num_safeguard_alarms - self.alarms_base
        checked = controller.consistency_check_every is not None
        resyncs = controller.num_resyncs - self.resyncs_base if checked else None
        skipped_updates = controller.num_skipped_updates - self.skipped_updates_base or None
        # a scheduler's name may hold "/": the optimizer's name is what its groups' names share
        optimizer = names[0].rsplit("/", 1)[0] if len(names) > 1 else (names[0] if names else "")
        out = []
        for j, name in enumerate(names):
            stats = self.groups[j] if j < len(self.groups) else _GroupStats()
            seen = stats.first is not None
            out.append(
                GroupSummary(
                    name=name,
                    lr_start=stats.first,
                    lr_end=stats.last,
                    lr_min=stats.low if seen else None,
                    lr_max=stats.high if seen else None,
                    mean_ratio=stats.ratio_sum / stats.ratio_count if stats.ratio_count else None,
                    adapted_steps=self.adapted,
                    skipped_steps=skipped,
                    safeguard_alarms=alarms,
                    resyncs=resyncs,
                    skipped_updates=skipped_updates,
                    optimizer=optimizer,
                )
            )
        return out


class FitSummary:
    """Per-step statistics of CLARA's controllers over one fit, for :func:`summary_table`.

    :meth:`track` listens to the controller, which tells each adapted step as its host part runs
    (``CLARA.step_listeners``). The statistics cover the adapted steps of this fit: ``lr`` values
    are the learning rates used (``lr_scheduled * F``, x the anneal; host floats) and the mean ratio is the mean
    of the ratio after each adapted step. With ``scope="param_group"`` a group that did not move
    in a step keeps its previous ratio, which then counts again.
    """

    def __init__(self, controllers: Sequence[CLARA] = ()) -> None:
        self._trackers: list[_Tracker] = []
        for controller in controllers:
            self.track(controller)

    def track(self, controller: CLARA) -> None:
        """Start gathering statistics of ``controller`` (attached, and after any state restore)."""
        tracker = _Tracker(controller)
        tracker.start()
        controller.step_listeners.append(tracker.on_step)
        tracker.listening = True
        self._trackers.append(tracker)

    def follow(self, controllers: Sequence[CLARA]) -> None:
        """Track exactly ``controllers``, in their order (optimizers replaced during the fit): the ones dropped
        stop listening and leave the rows, new ones start."""
        trackers = {id(tracker.controller): tracker for tracker in self._trackers}
        self._trackers = []
        for controller in controllers:
            if id(controller) in trackers:
                self._trackers.append(trackers.pop(id(controller)))
            else:
                self.track(controller)
        for tracker in trackers.values():
            if tracker.listening:
                tracker.controller.step_listeners.remove(tracker.on_step)
                tracker.listening = False

    def restart(self) -> None:
        """Forget what was gathered and count from the controllers' current state (after a restore)."""
        for tracker in self._trackers:
            tracker.start()

    def close(self) -> None:
        """Take the last step (this settles a deferred CUDA step: one synchronisation) and stop listening."""
        for tracker in self._trackers:
            if tracker.listening:
                tracker.controller.num_adapted_steps  # noqa: B018 - settles: the controller tells the last step
        self.discard()

    def discard(self) -> None:
        """Stop listening without taking anything more (after an exception)."""
        for tracker in self._trackers:
            if tracker.listening:
                tracker.controller.step_listeners.remove(tracker.on_step)
                tracker.listening = False

    def rows(self, names: Sequence[Sequence[str]]) -> list[GroupSummary]:
        """One :class:`GroupSummary` per param group; ``names`` per tracked controller, per group."""
        return [row for tracker, groups in zip(self._trackers, names, strict=True) for row in tracker.rows(groups)]


def print_below_progress_bar(trainer: Any, pl_module: Any, renderable: Any) -> None:
    """Print after the progress bar's last line: Rich's live bar is stopped first (its own teardown, idempotent).

    Printed from a second console while Rich's bar is live, the bar is drawn twice around the table.
    """
    bar = getattr(trainer, "progress_bar_callback", None)
    if isinstance(bar, RichProgressBar) and bar.progress is not None:
        bar.teardown(trainer, pl_module, "fit")
        bar.progress.console.print(renderable)
        return
    Console().print(renderable)
