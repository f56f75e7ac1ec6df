"""Which optimizers CLARA supports, and for each the direction reader and the null-model reference.

This is the only module that knows optimizer classes by name. The reference of a param
group is chosen from exact to general:

* plain random walk (closed form, exact) where a step is the gradient times an *even*
  function of past gradients, so that E[u_t . u_s] = 0: SGD without momentum, Adagrad,
  Adadelta, ASGD, RMSprop without momentum and centering;
* exact heavy-ball formula: SGD with momentum (no dampening, no Nesterov);
* Monte Carlo of the optimizer's own update rule, with the heavy-ball curve as control
  variate where the optimizer reduces to heavy-ball (Adam, AdamW, SGD with dampening), pure
  otherwise (NAdam, RAdam, Adamax, RMSprop with momentum or centering, Nesterov SGD and any
  user-defined optimizer, assumed element-wise).

Optimizers that are not element-wise, ignore the learning rate after their first step or
need a closure are refused with the reason (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import inspect
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
    SpeedUp,
    freeze,
    shared,
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "UNSUPPORTED",
    "check_supported",
    "reader_for",
    "reference_for",
    "reference_key",
]

DirectionChoice = Literal["auto", "delta", "state"]

#: torch optimizers with a verified reference; any other ``torch.optim.Optimizer`` subclass
#: defined outside ``torch.optim`` is calibrated by Monte Carlo, assuming it is element-wise.
SUPPORTED_OPTIMIZERS: tuple[str, ...] = (
    "SGD",
    "Adam",
    "AdamW",
    "NAdam",
    "RAdam",
    "Adamax",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "ASGD",
)

#: torch optimizers CLARA refuses, with the reason.
UNSUPPORTED: dict[str, str] = {
    "LBFGS": "it runs a closure-driven line search and is not element-wise",
    "SparseAdam": "it takes sparse gradients",
    "Adafactor": "its factored second moment couples the entries of a tensor (not element-wise)",
    "Muon": "its orthogonalised update couples the entries of a matrix (not element-wise)",
    "Rprop": "it reads the learning rate only once, as its initial step size",
}

#: Group keys that never change the null-model reference.
_IRRELEVANT_KEYS = frozenset(
    {
        "params",
        "lr",
        "initial_lr",
        "name",
        "weight_decay",
        "foreach",
        "fused",
        "capturable",
        "differentiable",
        "maximize",
        "decoupled_weight_decay",
    }
)


def _torch_class(optimizer: Optimizer) -> str | None:
    """The name of the first ``torch.optim`` class in the optimizer's MRO (None for user-defined)."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls is not Optimizer:
            return cls.__name__
    return None


def _step_is_hooked(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` runs torch's step hooks (``Optimizer.__init__`` patches it)."""
    return bool(getattr(type(optimizer).step, "hooked", False))


def unwrap(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose ``step`` fires the hooks: the wrapped one for a wrapper that overrides ``step``
    without them (Lightning Fabric's ``_FabricOptimizer``, whose ``step`` ends in the wrapped
    optimizer's); the optimizer itself otherwise (a hooked wrapper such as a Lookahead keeps its own)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer) and inner is not optimizer and not _step_is_hooked(optimizer):
        return unwrap(inner)
    return optimizer


def check_supported(optimizer: Any) -> None:
    """Raise ``TypeError`` with the reason if CLARA cannot adapt ``optimizer``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    name = _torch_class(optimizer)
    if name in UNSUPPORTED:
        supported = ", ".join(SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"CLARA does not support torch.optim.{name}: {UNSUPPORTED[name]}. Supported: {supported}, "
            "and element-wise optimizers of your own."
        )
    if not _step_is_hooked(optimizer):
        raise TypeError(
            f"{type(optimizer).__name__}.step cannot be hooked (torch step hooks are missing); "
            "call torch.optim.Optimizer.__init__ in its constructor"
        )
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.is_complex():
                raise TypeError("CLARA does not support complex parameters")
            if param.is_sparse:
                raise TypeError("CLARA does not support sparse parameters")


def _uses_device_state(optimizer: Optimizer) -> bool:
    """Fused / capturable / differentiable variants keep state that reading would sync on or differ from."""
    return any(
        group.get("fused") or group.get("capturable") or group.get("differentiable") for group in optimizer.param_groups
    )


def _state_reader(optimizer: Optimizer) -> DirectionReader | None:
    name = _torch_class(optimizer)
    if name in ("Adam", "AdamW"):
        return AdamStateReader()
    if name == "SGD":
        return SGDStateReader()
    return None


def reader_for(optimizer: Optimizer, direction: DirectionChoice) -> DirectionReader:
    """The direction reader: ``auto`` picks the snapshot-free state reader where it is exact."""
    if direction == "delta":
        return DeltaReader()
    reader = _state_reader(optimizer)
    if direction == "state":
        if reader is None:
            raise ValueError(
                f"direction='state' has no reader for {type(optimizer).__name__} (only SGD, Adam, AdamW); "
                "use 'delta' or 'auto'"
            )
        if _uses_device_state(optimizer):
            raise ValueError("direction='state' cannot read fused/capturable/differentiable optimizers; use 'delta'")
        return reader
    if reader is None or _uses_device_state(optimizer):
        return DeltaReader()
    return reader


def _quantize(value: Any) -> Any:
    """Round a hyper-parameter so that a scheduler's small moves (OneCycleLR cycling momentum)
    do not recalibrate every step: ``1 - x`` to 2 significant digits for x in (0.5, 1) (0.953 stays
    0.953, 0.9534 becomes 0.953), x to 3 significant digits otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_quantize(v) for v in value)
    if isinstance(value, float) and math.isfinite(value) and value != 0.0:
        if 0.5 < value < 1.0:
            return 1.0 - float(f"{1.0 - value:.2g}")
        return float(f"{value:.3g}")
    return value


def _quantized(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if k == "params" else _quantize(v) for k, v in group.items()}


def reference_key(optimizer: Optimizer, group: Mapping[str, Any]) -> tuple[Any, ...]:
    """The (quantised) hyper-parameters the reference depends on: when one changes, it is rebuilt."""
    return (type(optimizer), freeze({k: _quantize(v) for k, v in group.items() if k not in _IRRELEVANT_KEYS}))


def _simulation_kwargs(optimizer_class: type[Optimizer], group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's settings that the optimizer's constructor accepts (for the Monte Carlo run)."""
    parameters = inspect.signature(optimizer_class.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {
        k: v for k, v in group.items() if k not in ("params", "name", "initial_lr") and (takes_any or k in parameters)
    }


def _momentum_horizon(beta: float) -> int:
    return max(128, math.ceil(12.0 / (1.0 - beta))) if beta < 1 else 128


def reference_for(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    """The null-model reference of one param group (shared process-wide, so computed once per key)."""
    group = _quantized(group)
    name = _torch_class(optimizer)
    if name in ("Adagrad", "Adadelta", "ASGD"):
        return shared(PlainReference(c))
    if name == "SGD":
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
                # dampening only changes the first step, so heavy-ball is the exact tail; Nesterov is not heavy-ball
                control_beta=None if nesterov else momentum,
                horizon=_momentum_horizon(momentum),
            )
        )
    if name == "RMSprop" and float(group.get("momentum", 0.0)) == 0.0 and not group.get("centered", False):
        return shared(PlainReference(c))
    optimizer_class = type(optimizer) if name is None else getattr(torch.optim, name)
    kwargs = _simulation_kwargs(optimizer_class, group)
    if name in ("Adam", "AdamW"):
        beta1 = float(group["betas"][0])
        return shared(
            MonteCarloReference(
                c,
                torch.optim.Adam,
                {"betas": tuple(float(b) for b in group["betas"]), "amsgrad": bool(group.get("amsgrad", False))},
                control_beta=beta1 if beta1 > 0 else None,
            )
        )
    beta = float(group["betas"][0]) if "betas" in group else float(group.get("momentum", 0.0) or 0.0)
    if name == "NAdam":
        return shared(_nadam_reference(c, kwargs, beta))
    return shared(MonteCarloReference(c, optimizer_class, kwargs, horizon=_momentum_horizon(beta)))


def _speed_up_nadam(optimizer: Optimizer, factor: int) -> None:
    """From now on one step stands for ``factor``: NAdam's momentum ``beta1 (1 - 0.5 * 0.96^(step *
    momentum_decay))`` stays continuous when step shrinks and momentum_decay grows by ``factor``."""
    for group in optimizer.param_groups:
        group["momentum_decay"] *= factor
        for param in group["params"]:
            state = optimizer.state[param]
            state["step"] = state["step"] / factor


def _nadam_reference(c: float, kwargs: dict[str, Any], beta1: float) -> Reference:
    """NAdam's momentum ramps as ``beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))`` over ~25k
    steps (98 % of the ramp): simulate the first 2048 steps as they are (second moments warm up),
    then the rest of the ramp sped up to fit 1024 more steps."""
    decay = float(kwargs.get("momentum_decay", 4e-3))
    warm = 2048
    ramp_steps = math.ceil(math.log(0.02) / (decay * math.log(0.96))) if decay > 0 else 0
    if ramp_steps <= warm + 1024:
        horizon = max(_momentum_horizon(beta1), ramp_steps)
        return MonteCarloReference(c, torch.optim.NAdam, kwargs, horizon=horizon, budget=1 << 22)
    factor = math.ceil((ramp_steps - warm) / 1024)
    speed_up = SpeedUp(at_step=warm, factor=factor, apply=_speed_up_nadam, name="nadam_momentum_decay")
    return MonteCarloReference(c, torch.optim.NAdam, kwargs, horizon=warm + 1024, budget=1 << 22, speed_up=speed_up)
