"""CLARA's state dict: plain values and tensors keyed by (group index, position in group).

Format 2 adds ``config["sample"]`` and sampled paths (1-D, the sample's entries, with the
parameter's ``shape``); format 1 (full paths) still loads. Paths kept another way than the
controller keeps them (another ``sample``) restart, with a warning; factors and counters load.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch.optim import Optimizer

from lightning_clara.loss_watch import LossWatch
from lightning_clara.options import Settings
from lightning_clara.rule import FactorState
from lightning_clara.stores import PathStore, SavedTensors

__all__ = ["STATE_FORMAT", "export_state", "restore_state"]

STATE_FORMAT = 2
_READABLE_FORMATS = (1, STATE_FORMAT)
#: The settings a state dict records (``scope`` must match on load, ``sample`` decides whether paths load).
_CONFIG_KEYS = ("rule", "c", "d", "fast_start", "hold_after", "target", "scope", "variant", "unit_step", "sample")


def export_state(settings: Settings, factors: FactorState, tensors: SavedTensors, losses: LossWatch) -> dict[str, Any]:
    """The state dict of a controller (``loss_trend``: the loss brake's averages, None without the brake)."""
    return {
        "format": STATE_FORMAT,
        "config": {key: getattr(settings, key) for key in _CONFIG_KEYS},
        "log_factors": list(factors.log_factors),
        "ratios": list(factors.ratios),
        "num_adapted_steps": factors.adapted_steps,
        "num_skipped_steps": factors.skipped_steps,
        "tensors": tensors,
        "safeguard": None if losses.safeguard is None else losses.safeguard.state_dict(),
        "loss_trend": losses.state_dict(),
    }


def _check_layout(state_dict: Any, settings: Settings, optimizer: Optimizer) -> None:
    if not isinstance(state_dict, dict) or state_dict.get("format") not in _READABLE_FORMATS:
        raise ValueError("not a CLARA state dict (missing or unknown 'format')")
    saved_scope = state_dict["config"]["scope"]
    if saved_scope != settings.scope:
        raise ValueError(f"state dict was saved with scope={saved_scope!r}, this controller has {settings.scope!r}")
    groups = state_dict["tensors"]
    if len(groups) != len(optimizer.param_groups) or any(
        len(row) != len(group["params"]) for row, group in zip(groups, optimizer.param_groups, strict=True)
    ):
        raise ValueError("state dict does not match the optimizer's param groups (count or sizes differ)")


def restore_state(
    state_dict: dict[str, Any], settings: Settings, optimizer: Optimizer, paths: PathStore, losses: LossWatch
) -> FactorState:
    """Check ``state_dict`` against the controller, load its paths and loss trend and return its factors.

    Everything is checked before anything changes: a mismatch raises ``ValueError`` and leaves the
    controller as it was. A state without ``loss_trend`` (saved before the loss brake) keeps the
    fresh trend.
    """
    _check_layout(state_dict, settings, optimizer)
    trend = losses.checked(state_dict.get("loss_trend"))
    saved_sample = state_dict["config"].get("sample")
    same_paths = saved_sample == settings.sample
    if same_paths:
        paths.check(state_dict["tensors"], optimizer)
    factors = FactorState(
        tuple(float(v) for v in state_dict["log_factors"]),
        tuple(None if v is None else float(v) for v in state_dict["ratios"]),
        int(state_dict["num_adapted_steps"]),
        int(state_dict["num_skipped_steps"]),
    )
    if settings.safeguard is not None and state_dict.get("safeguard") is not None:
        settings.safeguard.load_state_dict(state_dict["safeguard"])
    if trend is not None:
        losses.trend = trend
    if same_paths:
        paths.load(state_dict["tensors"], optimizer)
        return factors
    warnings.warn(
        f"CLARA: the checkpoint's paths were kept with sample={saved_sample!r}, this controller keeps "
        f"sample={settings.sample!r}: the paths restart (factors and step counters are restored)",
        RuntimeWarning,
        stacklevel=3,
    )
    paths.restart()
    return factors
