"""End-of-fit summary of CLARA's learning-rate dynamics: per-step bookkeeping and a ``rich`` table.

:class:`FitSummary` gathers, per optimizer and param group, the learning rate used at the first
and last adapted step, its minimum and maximum and the mean ratio ``r`` over the fit, from
values the controller already holds on the host. It reads them in a step *pre-hook* registered
after the controller's own: that hook has just brought the previous step's results in (on CUDA
they travel asynchronously and are settled there anyway), and it has just set the learning rate
of the coming step, so the bookkeeping adds no device-to-host synchronisation at all. Only
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

from rich.table import Table
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_clara.controller import CLARA

__all__ = ["FitSummary", "GroupSummary", "summary_table"]

TITLE = "CLARA: learning rate used over the fit"
CAPTION = (
    "lr: the lr used, lr_scheduled × F, at the adapted steps\n"
    "r: the path ratio (1 on noise; above the target, 0.7 or 0.55 for Adam with the safeguard, it raises the lr)"
)


@dataclass(frozen=True)
class GroupSummary:
    """What the summary shows for one param group (``None``: no adapted step in this fit).

    The step counts are per optimizer (every group of an optimizer shows the same), counted in
    this fit only. ``safeguard_alarms`` is ``None`` without a safeguard and ``resyncs`` ``None``
    without a rank-consistency check; their columns are shown only when some row has them.
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


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def summary_table(rows: Sequence[GroupSummary], *, title: str | None = TITLE) -> Table:
    """A ``rich`` table, one row per param group: lr start → end, min, max, mean r and the step counts.

    Learning rates have three significant digits (``.3g``); ``-`` marks a value that does not
    exist (no adapted step). It fits an 80-column terminal: with long numbers the start → end column wraps at its arrow.
    """
    alarms = any(row.safeguard_alarms is not None for row in rows)
    resyncs = any(row.resyncs is not None for row in rows)
    table = Table(title=title, caption=CAPTION, caption_justify="left", show_edge=False)
    table.add_column("group", justify="left", no_wrap=True)
    # the one column that may wrap (at its arrow) when the terminal is narrow; numbers never do
    table.add_column("lr start → end", justify="right")
    for header in ("lr min", "lr max", "mean r", "steps", "skipped"):
        table.add_column(header, justify="right", no_wrap=True)
    if alarms:
        table.add_column("alarms", justify="right", no_wrap=True)
    if resyncs:
        table.add_column("resyncs", justify="right", no_wrap=True)
    for row in rows:
        cells = [
            row.name,
            "-" if row.lr_start is None else f"{_number(row.lr_start, '.3g')} → {_number(row.lr_end, '.3g')}",
            _number(row.lr_min, ".3g"),
            _number(row.lr_max, ".3g"),
            _number(row.mean_ratio, ".3f"),
            str(row.adapted_steps),
            str(row.skipped_steps),
        ]
        if alarms:
            cells.append("-" if row.safeguard_alarms is None else str(row.safeguard_alarms))
        if resyncs:
            cells.append("-" if row.resyncs is None else str(row.resyncs))
        table.add_row(*cells)
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
    adapted: int = 0  # adapted steps folded in this fit
    seen: int = 0  # the controller's num_adapted_steps at the last fold
    lrs: list[float] | None = None  # the lr used by the step in flight (set by the pre-hook)
    skipped_base: int = 0
    alarms_base: int = 0
    resyncs_base: int = 0
    handle: RemovableHandle | None = None

    def start(self) -> None:
        """(Re)start counting from the controller's current state (at attach time, or after a restore)."""
        controller = self.controller
        self.groups = []
        self.adapted = 0
        self.lrs = None
        self.seen = controller.num_adapted_steps  # settles: nothing is pending at these points
        self.skipped_base = controller.num_skipped_steps
        self.alarms_base = controller.num_safeguard_alarms
        self.resyncs_base = controller.num_resyncs

    def before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # Runs after the controller's own pre-hook (registered later): the previous step's results
        # were settled there, and ``lr_used`` now holds the lr of the coming step (host floats).
        self.fold()
        self.lrs = self.controller.lr_used

    def fold(self) -> None:
        """Add the last step to the statistics if the controller adapted on it."""
        adapted = self.controller.num_adapted_steps
        if adapted == self.seen:
            return  # no step yet, or the last step moved no tensor
        if adapted != self.seen + 1 or self.lrs is None:
            self.seen = adapted  # counters restored behind our back: nothing to attribute
            return
        self.seen = adapted
        self.adapted += 1
        ratios = self.controller.ratios
        while len(self.groups) < len(self.lrs):
            self.groups.append(_GroupStats())
        for j, lr in enumerate(self.lrs):
            self.groups[j].add(lr, ratios[j] if j < len(ratios) else None)

    def rows(self, names: Sequence[str]) -> list[GroupSummary]:
        controller = self.controller
        skipped = controller.num_skipped_steps - self.skipped_base
        alarms = None if controller.safeguard is None else controller.num_safeguard_alarms - self.alarms_base
        checked = controller.consistency_check_every is not None
        resyncs = controller.num_resyncs - self.resyncs_base if checked else None
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
                )
            )
        return out


class FitSummary:
    """Per-step statistics of CLARA's controllers over one fit, for :func:`summary_table`.

    :meth:`track` registers a step pre-hook on the controller's optimizer; it must come after the
    controller was attached, so that the hook runs after the controller's own pre-hook. The
    statistics cover the adapted steps of this fit: ``lr`` values are the learning rates used
    (``lr_scheduled * F``, host floats the controller sets before each step) and the mean ratio
    is the mean of the ratio after each adapted step. With ``scope="param_group"`` a group that
    did not move in a step keeps its previous ratio, which then counts again.
    """

    def __init__(self) -> None:
        self._trackers: list[_Tracker] = []

    def track(self, controller: CLARA) -> None:
        """Start gathering statistics of ``controller`` (attached, and after any state restore)."""
        tracker = _Tracker(controller)
        tracker.start()
        tracker.handle = controller.optimizer.register_step_pre_hook(tracker.before_step)
        self._trackers.append(tracker)

    def restart(self) -> None:
        """Forget what was gathered and count from the controllers' current state (after a restore)."""
        for tracker in self._trackers:
            tracker.start()

    def close(self) -> None:
        """Fold the last step (this settles a deferred CUDA step: one synchronisation) and remove the hooks."""
        for tracker in self._trackers:
            if tracker.handle is not None:
                tracker.fold()
        self.discard()

    def discard(self) -> None:
        """Remove the hooks without folding anything (after an exception)."""
        for tracker in self._trackers:
            if tracker.handle is not None:
                tracker.handle.remove()
                tracker.handle = None

    def rows(self, names: Sequence[Sequence[str]]) -> list[GroupSummary]:
        """One :class:`GroupSummary` per param group; ``names`` per tracked controller, per group."""
        return [row for tracker, groups in zip(self._trackers, names, strict=True) for row in tracker.rows(groups)]
