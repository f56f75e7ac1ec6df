"""Which optimizers CLARA supports, and for each the direction reader and the null-model reference.

This is the only module that knows optimizer classes by name; adding an optimizer means
adding it here (and a null-model test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from lightning_clara.directions import AdamStateReader, DeltaReader, DirectionReader, SGDStateReader
from lightning_clara.reference import (
    HeavyBallReference,
    MonteCarloReference,
    PlainReference,
    Reference,
    shared,
)

__all__ = ["SUPPORTED_OPTIMIZERS", "check_supported", "reader_for", "reference_for", "reference_key"]

DirectionChoice = Literal["auto", "delta", "state"]

#: Optimizer classes with a verified reference (checked with ``isinstance``).
SUPPORTED_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _is_adam(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def check_supported(optimizer: Optimizer) -> None:
    """Raise ``TypeError`` naming the supported optimizers if ``optimizer`` is not one of them."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        names = ", ".join(f"torch.optim.{cls.__name__}" for cls in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"CLARA does not support {type(optimizer).__qualname__} yet: its random-walk reference is unknown. "
            f"Supported optimizers: {names} (and their subclasses)."
        )
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.is_complex():
                raise TypeError("CLARA does not support complex parameters")
            if param.is_sparse:
                raise TypeError("CLARA does not support sparse parameters")


def _uses_device_step(optimizer: Optimizer) -> bool:
    """Fused / capturable / differentiable variants keep state where reading it would sync or differ."""
    return any(
        group.get("fused") or group.get("capturable") or group.get("differentiable") for group in optimizer.param_groups
    )


def reader_for(optimizer: Optimizer, direction: DirectionChoice) -> DirectionReader:
    """The direction reader for ``optimizer``: ``auto`` picks the snapshot-free state reader where exact."""
    if direction == "delta":
        return DeltaReader()
    state_reader: DirectionReader | None = None
    if _is_adam(optimizer):
        state_reader = AdamStateReader()
    elif isinstance(optimizer, torch.optim.SGD):
        state_reader = SGDStateReader()
    if direction == "state":
        if state_reader is None:
            raise ValueError(f"direction='state' has no reader for {type(optimizer).__name__}; use 'delta' or 'auto'")
        if _uses_device_step(optimizer):
            raise ValueError("direction='state' cannot read fused/capturable/differentiable optimizers; use 'delta'")
        return state_reader
    if state_reader is None or _uses_device_step(optimizer):
        return DeltaReader()
    return state_reader


def reference_key(optimizer: Optimizer, group: Mapping[str, Any]) -> tuple[Any, ...]:
    """The hyper-parameters the reference depends on: a change of any of them means a new reference."""
    if _is_adam(optimizer):
        return ("adam", tuple(float(b) for b in group["betas"]), bool(group.get("amsgrad", False)))
    momentum = float(group.get("momentum", 0.0))
    return ("sgd", momentum, float(group.get("dampening", 0.0)), bool(group.get("nesterov", False)))


def reference_for(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    """The null-model reference of one param group (shared process-wide, so computed once)."""
    if _is_adam(optimizer):
        beta1 = float(group["betas"][0])
        return shared(
            MonteCarloReference(
                c,
                torch.optim.Adam,
                {"betas": tuple(float(b) for b in group["betas"]), "eps": 1e-8, "amsgrad": bool(group["amsgrad"])},
                control_beta=beta1 if beta1 > 0 else None,
            )
        )
    momentum = float(group.get("momentum", 0.0))
    dampening = float(group.get("dampening", 0.0))
    nesterov = bool(group.get("nesterov", False))
    if momentum == 0.0:
        return shared(PlainReference(c))
    if dampening == 0.0 and not nesterov:
        return shared(HeavyBallReference(c, momentum))
    return shared(
        MonteCarloReference(
            c,
            torch.optim.SGD,
            {"lr": 1.0, "momentum": momentum, "dampening": dampening, "nesterov": nesterov},
            # Dampening only changes the first step, so heavy-ball is the exact tail; Nesterov is not heavy-ball.
            control_beta=None if nesterov else momentum,
            horizon=max(64, math.ceil(6.0 / (1.0 - momentum))),
        )
    )
