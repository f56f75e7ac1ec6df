"""CLARA's state dict: plain values and tensors keyed by (group index, position in group).

Format 2 adds ``config["sample"]`` and sampled paths (1-D, the sample's entries, with the
parameter's ``shape``); format 1 (full paths) still loads. Paths kept another way than the
controller keeps them (another ``sample`` or ``c``) restart, with a warning; factors and counters load.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.distributed import is_rank_zero
from lightning_clara.loss_watch import LossWatch
from lightning_clara.options import Settings
from lightning_clara.rule import FactorState, anneal_start, annealed
from lightning_clara.stores import PathStore, SavedTensors

if TYPE_CHECKING:
    from lightning_clara.controller import CLARA

__all__ = [
    "STATE_FORMAT",
    "check_state",
    "checked_states",
    "export_state",
    "load_states",
    "restore_state",
    "run_length",
]

STATE_FORMAT = 2
_READABLE_FORMATS = (1, STATE_FORMAT)
#: The settings a state dict records (``scope`` must match on load, ``sample`` and ``c`` decide whether paths load).
_CONFIG_KEYS = (
    "rule",
    "c",
    "d",
    "fast_start",
    "hold_after",
    "target",
    "scope",
    "variant",
    "unit_step",
    "sample",
    "total_steps",
    "anneal",
    "run_offset",
)


def export_state(
    settings: Settings,
    factors: FactorState,
    tensors: SavedTensors,
    losses: LossWatch,
    skipped_updates: int,
    scheduled: Sequence[float],
    steps: int,
) -> dict[str, Any]:
    """The state dict of a controller (``loss_trend``: the loss brake's averages, None without the brake;
    ``num_skipped_updates``: the updates skipped for non-finite gradients; ``scheduled_lrs``: the base lrs of
    the last step, which the next step's are compared with to see a scheduler at work; ``num_run_steps``:
    the run's optimizer steps, adapted or not, a loaded state's included: the anneal's clock)."""
    return {
        "format": STATE_FORMAT,
        "config": {key: getattr(settings, key) for key in _CONFIG_KEYS},
        "log_factors": list(factors.log_factors),
        "ratios": list(factors.ratios),
        "num_adapted_steps": factors.adapted_steps,
        "num_skipped_steps": factors.skipped_steps,
        "num_skipped_updates": skipped_updates,
        "num_run_steps": steps,
        "anneal_stopped": factors.anneal_stopped,
        "scheduled_lrs": [float(lr) for lr in scheduled],
        "tensors": tensors,
        "safeguard": None if losses.safeguard is None else losses.safeguard.state_dict(),
        "loss_trend": losses.state_dict(),
    }


#: The keys every readable state holds (``safeguard``, ``loss_trend``, ``num_skipped_updates``,
#: ``num_run_steps``, ``anneal_stopped`` and ``scheduled_lrs`` may be absent: older states).
_REQUIRED_KEYS = ("format", "config", "log_factors", "ratios", "num_adapted_steps", "num_skipped_steps", "tensors")
#: ``||p|| <= 1`` for a path of unit steps (a convex combination of unit vectors and 0); the slack
#: covers a low-precision path's rounding.
_PATH_NORM_LIMIT = 1.01
#: |log F| beyond which exp(log F) overflows; the rule keeps it within LOG_FACTOR_LIMIT, except where
#: the lr bounds (``min_lr``/``max_lr`` against a tiny or huge base lr) pull it further.
_LOG_FACTOR_RANGE = math.log(sys.float_info.max)
#: The safeguard's statistics: counts are ints >= 0; a huge loss can overflow the moments to inf.
_SAFEGUARD_COUNTS = ("count", "alarms")
_SAFEGUARD_MOMENTS = ("mean", "variance", "excess")


def _number(field: str, value: Any, low: float = -math.inf, high: float = math.inf, *, integer: bool = False) -> None:
    """A finite real (an int if ``integer``) in [low, high], or ``ValueError`` naming the field and the range."""
    kind = "an int" if integer else "a finite number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid_type or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"CLARA state: {field} must be {kind} in [{low}, {high}], got {value!r}")


def _sequence(field: str, value: Any, length: int) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        got = f"{type(value).__name__} of length {len(value)}" if isinstance(value, (list, tuple)) else repr(value)
        raise ValueError(f"CLARA state: {field} must be a list of {length} value(s) (one per scope), got {got}")
    return value


def _check_path(field: str, entry: Any) -> None:
    """A saved path: a finite tensor no longer than a path of unit steps can be, and its update count."""
    if entry is None:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), Tensor):
        raise ValueError(f"CLARA state: {field} must be None or a dict with a 'path' tensor, got {entry!r:.80}")
    _number(f"{field}['count']", entry.get("count"), 0, math.inf, integer=True)
    path = entry["path"].detach().float()
    if not bool(torch.isfinite(path).all()):
        raise ValueError(f"CLARA state: {field}['path'] must be finite, it holds NaN/inf entries")
    norm = float(torch.linalg.vector_norm(path))
    if norm > _PATH_NORM_LIMIT:
        raise ValueError(f"CLARA state: {field}['path'] has norm {norm:.4g}; a path of unit steps has norm <= 1")


def _check_steps(state_dict: dict[str, Any], num_groups: int) -> None:
    """The step counters, where the anneal stopped and the last step's scheduled lrs."""
    _number("num_adapted_steps", state_dict["num_adapted_steps"], 0, math.inf, integer=True)
    _number("num_skipped_steps", state_dict["num_skipped_steps"], 0, math.inf, integer=True)
    _number("num_skipped_updates", state_dict.get("num_skipped_updates", 0), 0, math.inf, integer=True)
    if "num_run_steps" in state_dict:  # every adapted step and every skipped update was one of the run's steps
        least = state_dict["num_adapted_steps"] + state_dict.get("num_skipped_updates", 0)
        _number("num_run_steps", state_dict["num_run_steps"], least, math.inf, integer=True)
    if state_dict.get("anneal_stopped") is not None:
        _number("anneal_stopped", state_dict["anneal_stopped"], 0, run_steps(state_dict), integer=True)
    scheduled = state_dict.get("scheduled_lrs", [])
    if not isinstance(scheduled, (list, tuple)) or len(scheduled) > num_groups:
        raise ValueError(
            f"CLARA state: scheduled_lrs must be a list of at most {num_groups} lr(s) (one per param group), "
            f"got {scheduled!r:.80}"
        )
    for j, lr in enumerate(scheduled):
        _number(f"scheduled_lrs[{j}]", lr, 0.0)


def check_state(state_dict: Any, settings: Settings, optimizer: Optimizer) -> None:
    """Raise ``ValueError`` (naming the field and what it must be) unless ``state_dict`` is a CLARA state
    this controller can load: every entry is checked before anything changes."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"CLARA state must be a dict (from CLARA.state_dict()), got {type(state_dict).__name__}")
    if state_dict.get("format") not in _READABLE_FORMATS:
        raise ValueError(
            f"CLARA state: format must be one of {_READABLE_FORMATS}, got {state_dict.get('format')!r} "
            "(not a CLARA state dict?)"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"CLARA state lacks {missing} (keys of a state dict: {list(_REQUIRED_KEYS)})")
    config = state_dict["config"]
    if not isinstance(config, dict) or "scope" not in config:
        raise ValueError(f"CLARA state: config must be a dict with a 'scope', got {config!r:.80}")
    if config["scope"] != settings.scope:
        raise ValueError(
            f"CLARA state: config['scope'] is {config['scope']!r} (the scope it was saved with), "
            f"this controller has scope={settings.scope!r}"
        )
    if "run_offset" in config:  # the run's steps before the controller attached (absent in older states)
        _number("config['run_offset']", config["run_offset"], 0, math.inf, integer=True)
    scopes = 1 if settings.scope == "optimizer" else len(optimizer.param_groups)
    for j, value in enumerate(_sequence("log_factors", state_dict["log_factors"], scopes)):
        _number(f"log_factors[{j}]", value, -_LOG_FACTOR_RANGE, _LOG_FACTOR_RANGE)
    for j, value in enumerate(_sequence("ratios", state_dict["ratios"], scopes)):
        if value is not None:
            _number(f"ratios[{j}]", value, 0.0)
    _check_steps(state_dict, len(optimizer.param_groups))
    groups = state_dict["tensors"]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if (
        not isinstance(groups, (list, tuple))
        or [len(row) if isinstance(row, (list, tuple)) else None for row in groups] != sizes
    ):
        raise ValueError(
            f"CLARA state: tensors must hold one list per param group with one entry per parameter "
            f"(sizes {sizes}), it does not match the optimizer's param groups"
        )
    for g, row in enumerate(groups):
        for k, entry in enumerate(row):
            _check_path(f"tensors[{g}][{k}]", entry)
    safeguard = state_dict.get("safeguard")
    if safeguard is not None:
        if not isinstance(safeguard, dict):
            raise ValueError(f"CLARA state: safeguard must be None or a dict, got {type(safeguard).__name__}")
        for key in _SAFEGUARD_COUNTS:
            _number(f"safeguard[{key!r}]", safeguard.get(key), 0, math.inf, integer=True)
        for key in _SAFEGUARD_MOMENTS:
            value = safeguard.get(key)
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
            if not number or (key == "variance" and isinstance(value, (int, float)) and value < 0):
                raise ValueError(
                    f"CLARA state: safeguard[{key!r}] must be a number (not NaN; variance >= 0), got {value!r}"
                )


def run_steps(state_dict: dict[str, Any]) -> int:
    """The saved run's optimizer steps (the anneal's clock); a state saved before they were kept: its adapted steps
    and skipped updates (a step that moved no tensor was not counted then)."""
    if "num_run_steps" in state_dict:
        return int(state_dict["num_run_steps"])
    return int(state_dict["num_adapted_steps"]) + int(state_dict.get("num_skipped_updates", 0))


def run_length(total_steps: int | None, global_step: int, state_dict: Any = None) -> tuple[int | None, int]:
    """The ``(total_steps, run_offset)`` of a controller made at a trainer's ``global_step`` of a run of
    ``total_steps`` steps (``state_dict``: the state it will load, or None).

    A controller counts its steps (the anneal's clock) from when it attached. One made later than the run's
    first step without a state (an optimizer made mid-fit, a resume from a checkpoint saved without CLARA, a
    second ``fit``) gets the steps left, so that its find and anneal run over the rest of the run; a state
    resumes with the offset it was saved with (``config['run_offset']``, 0 in older states), so a controller
    made mid-run keeps its length, and one made at the start gets the whole run (skipped steps never shift it).
    A malformed offset counts as 0 here: the state's check refuses it when it loads.
    """
    if state_dict is None:
        offset = max(0, global_step)
    else:
        config = state_dict.get("config") if isinstance(state_dict, dict) else None
        saved = config.get("run_offset", 0) if isinstance(config, dict) else 0
        offset = saved if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0 else 0
    if total_steps is None or offset == 0:
        return total_steps, offset
    return max(1, total_steps - offset), offset


def _anneal_stopped(state_dict: dict[str, Any]) -> int | None:
    """Where the anneal stopped; a state saved before the anneal existed, after steps were taken, ran without it
    (its scheduler, if any, is not known here): it continues without it (stopped at 0)."""
    if "anneal_stopped" in state_dict:
        return None if state_dict["anneal_stopped"] is None else int(state_dict["anneal_stopped"])
    return 0 if int(state_dict["num_adapted_steps"]) > 0 else None


def _warn_if_the_run_length_moved(state_dict: dict[str, Any], settings: Settings) -> None:
    """The anneal's window follows ``total_steps``: a resume with another length moves it, and an anneal the saved
    run had begun restarts from the new window (the lr can rise back to the lr held). One that had not begun (it
    starts at max(hold_after, total_steps / 2), 240 steps in at the least with the defaults) loses nothing."""
    config, steps = state_dict["config"], run_steps(state_dict)
    saved = config.get("total_steps")
    annealing = bool(settings.anneal and settings.total_steps)  # this run has an anneal's window
    if annealing and not (config.get("anneal") and saved):
        _warn_if_an_anneal_begins_at_once(state_dict, settings, steps)
        return
    if not (annealing and config.get("anneal") and saved) or saved == settings.total_steps:
        return
    stopped = state_dict.get("anneal_stopped")
    last = steps - 1 if stopped is None else min(steps - 1, int(stopped))  # the clock of the last step taken
    begun = last > anneal_start(int(config.get("hold_after", 0)), saved)  # it ran below the lr held
    if begun and is_rank_zero():
        warnings.warn(
            f"CLARA: the checkpoint was saved in a run of total_steps={saved}, this run has "
            f"total_steps={settings.total_steps}: the anneal's window moves with it (an anneal under way "
            "starts again from the new window); pass anneal=False to keep the lr the rule holds",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_if_an_anneal_begins_at_once(state_dict: dict[str, Any], settings: Settings, steps: int) -> None:
    """A state saved without an anneal (``anneal=False``, or the run's length unknown) resumed into a run that
    anneals, at a step already inside its window: the lr used drops at once to the window's multiplier."""
    multiplier = annealed(settings.schedule, steps)
    if _anneal_stopped(state_dict) is None and multiplier < 1 and is_rank_zero():  # the next step runs below 1
        warnings.warn(
            "CLARA: the checkpoint was saved by a run without the anneal; this run anneals from step "
            f"{settings.schedule.anneal_from} of "
            f"total_steps={settings.total_steps} and resumes at step {steps}: the lr used drops at once to "
            f"{multiplier:.3g} x the lr held; pass anneal=False to keep the lr the rule holds",
            RuntimeWarning,
            stacklevel=4,
        )


def restore_state(
    state_dict: dict[str, Any], settings: Settings, optimizer: Optimizer, paths: PathStore, losses: LossWatch
) -> FactorState:
    """Check ``state_dict`` against the controller, load its paths and loss trend and return its factors.

    Everything is checked before anything changes: a mismatch raises ``ValueError`` and leaves the
    controller as it was. A state without ``loss_trend`` (saved before the loss brake) keeps the
    fresh trend.
    """
    check_state(state_dict, settings, optimizer)
    trend = losses.checked(state_dict.get("loss_trend"))
    config = state_dict["config"]
    # how the paths were kept (SALeRA's paths hold gradients, CLARA's the realised steps)
    kept = {"sample": config.get("sample"), "c": config.get("c", settings.c), "variant": config.get("variant", "clara")}
    same_paths = kept == {"sample": settings.sample, "c": settings.c, "variant": settings.variant}
    if same_paths:
        paths.check(state_dict["tensors"], optimizer)
    factors = FactorState(
        tuple(float(v) for v in state_dict["log_factors"]),
        tuple(None if v is None else float(v) for v in state_dict["ratios"]),
        int(state_dict["num_adapted_steps"]),
        int(state_dict["num_skipped_steps"]),
        _anneal_stopped(state_dict),
    )
    _warn_if_the_run_length_moved(state_dict, settings)
    if losses.safeguard is not None and state_dict.get("safeguard") is not None:
        losses.safeguard.load_state_dict(state_dict["safeguard"])
    if trend is not None:
        losses.trend = trend
    if same_paths:
        paths.load(state_dict["tensors"], optimizer)
        return factors
    warnings.warn(
        f"CLARA: the checkpoint's paths were kept with sample={kept['sample']!r}, c={kept['c']!r}, variant="
        f"{kept['variant']!r}; this controller keeps sample={settings.sample!r}, c={settings.c!r}, variant="
        f"{settings.variant!r}: the paths restart (factors and step counters are restored)",
        RuntimeWarning,
        stacklevel=3,
    )
    paths.restart()
    return factors


def checked_states(controllers: Sequence[CLARA], state_dict: dict[str, Any]) -> dict[str, Any]:
    """A CLARACallback state (a copy), once each controller's state was checked against its controller."""
    saved = state_dict.get("controllers") if isinstance(state_dict, dict) else None
    if not isinstance(saved, (list, tuple)):
        raise ValueError(
            "CLARACallback state must be a dict whose 'controllers' is a list of CLARA states (one per "
            f"optimizer), got {state_dict!r:.80}"
        )
    if len(saved) != len(controllers):
        raise ValueError(
            f"checkpoint holds CLARA state for {len(saved)} optimizer(s), the model configures {len(controllers)}"
        )
    for controller, state in zip(controllers, saved, strict=True):
        check_state(state, controller.settings, controller.optimizer)
    return dict(state_dict)


def load_states(controllers: Sequence[CLARA], state_dict: dict[str, Any]) -> None:
    """A CLARACallback state into its controllers, one per optimizer: every one checked before any loads."""
    for controller, state in zip(controllers, checked_states(controllers, state_dict)["controllers"], strict=True):
        controller.load_state_dict(state)
