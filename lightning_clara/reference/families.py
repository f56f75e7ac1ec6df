"""Which null-model reference each optimizer family gets, and when a group's reference is rebuilt.

The reference of a param group is chosen from exact to general:

* plain random walk (closed form, exact) where a step is the gradient times an *even*
  function of past gradients, so that E[u_t . u_s] = 0: SGD without momentum, Adagrad,
  Adadelta, ASGD, RMSprop without momentum and centering;
* exact heavy-ball formula: SGD with momentum (no dampening, no Nesterov);
* Monte Carlo of the optimizer's own update rule, with the heavy-ball curve as control
  variate where the optimizer reduces to heavy-ball (Adam, AdamW, SGD with dampening), pure
  otherwise (NAdam, RAdam, Adamax, RMSprop with momentum or centering, Nesterov SGD and any
  user-defined optimizer, assumed element-wise).

:class:`ReferenceKeys` tells, per group, the (quantised) hyper-parameters a reference depends on.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_clara.reference.curves import HeavyBallReference, PlainReference, Reference, freeze, shared
from lightning_clara.reference.monte_carlo import MonteCarloReference, SpeedUp

__all__ = [
    "MAX_CALIBRATIONS",
    "REFERENCE_FAMILIES",
    "ReferenceKeys",
    "reference_for",
    "reference_key",
    "simulation_kwargs",
    "torch_class",
]

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


def torch_class(optimizer: Optimizer) -> str | None:
    """The name of the first ``torch.optim`` class in the optimizer's MRO (None for user-defined)."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls is not Optimizer:
            return cls.__name__
    return None


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


def _is_hyperparameter(optimizer: Optimizer, key: str) -> bool:
    """A constructor setting (in ``optimizer.defaults``), not a key the optimizer adds while stepping
    (pytorch-optimizer's integer ``group["step"]``, Prodigy's ``d_numerator``)."""
    return key not in _IRRELEVANT_KEYS and key in optimizer.defaults


def reference_key(optimizer: Optimizer, group: Mapping[str, Any]) -> tuple[Any, ...]:
    """The (quantised) hyper-parameters the reference depends on: when one changes, it is rebuilt."""
    return (
        type(optimizer),
        freeze({k: _quantize(v) for k, v in group.items() if _is_hyperparameter(optimizer, k)}),
    )


#: Distinct references per param group, at most (a scheduler's return to a value already seen is free:
#: the curves are cached); a further new value keeps the last reference (with a warning). OneCycleLR's
#: momentum cycle takes about 60 (its 1 - beta quantised to 2 significant digits).
MAX_CALIBRATIONS = 128


class ReferenceKeys:
    """Per param group, the reference key: the hyper-parameters a scheduler or the user set.

    A key whose value changes *inside* ``optimizer.step()`` is the optimizer's own state (a step
    counter that pytorch-optimizer keeps in the group and in ``defaults``, Prodigy's ``d``,
    schedule-free's ``weight_sum``): it leaves the key, and the simulation starts it afresh. Keys
    moved *between* steps (a scheduler cycling ``momentum``) recalibrate, quantised, for at most
    :data:`MAX_CALIBRATIONS` distinct values per group (a value seen before comes from the curves'
    cache). Call ``before_step()`` in the pre-hook and ``observe(j, group)`` after the step.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        # torch's own optimizers keep their counters in ``state``, never in the group: no watch needed
        self._watch = torch_class(optimizer) is None
        #: Keys that the optimizer's own step changed: never part of the key.
        self.state_keys: set[str] = set()
        self._before: list[dict[str, Any]] | None = None
        self._keys: dict[int, tuple[Any, ...]] = {}
        self._seen: dict[int, set[tuple[Any, ...]]] = {}  # per group, the keys calibrated so far
        self._capped: set[int] = set()  # the groups warned about
        #: Per group, the raw hyper-parameters last seen and what observe returned for them: a step
        #: that changed none of them (nearly every step) skips the quantising (torch optimizers only).
        self._last: dict[int, tuple[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, Any]]]] = {}

    def _values(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: freeze(_quantize(v))
            for k, v in group.items()
            if k not in self.state_keys and _is_hyperparameter(self.optimizer, k)
        }

    def before_step(self) -> None:
        if self._watch:
            self._before = [self._values(group) for group in self.optimizer.param_groups]

    def observe(self, j: int, group: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The key of group j and the group as the simulation should see it (state keys left out)."""
        raw: tuple[Any, ...] | None = None
        if not self._watch:
            raw = tuple((k, v) for k, v in group.items() if _is_hyperparameter(self.optimizer, k))
            last = self._last.get(j)
            if any(isinstance(v, torch.Tensor) for _, v in raw):
                raw = None  # a tensor compares by identity in a tuple: its value may have moved
            elif last is not None and last[0] == raw:
                return last[1]
        if self._before is not None and j < len(self._before):
            before = self._before[j]
            self.state_keys.update(k for k, v in self._values(group).items() if k in before and before[k] != v)
        view = {k: v for k, v in group.items() if k not in self.state_keys}
        key = reference_key(self.optimizer, view)
        previous = self._keys.get(j)
        seen = self._seen.setdefault(j, set())
        if previous is not None and key != previous and key not in seen and len(seen) >= MAX_CALIBRATIONS:
            if j not in self._capped:
                self._capped.add(j)
                warnings.warn(
                    f"CLARA: the hyper-parameters of {type(self.optimizer).__name__} group {j} took "
                    f"{MAX_CALIBRATIONS} distinct values; a new one keeps the last reference from now on",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return previous, view
        seen.add(key)
        self._keys[j] = key
        if raw is not None:
            self._last[j] = (raw, (key, view))
        return key, view


def simulation_kwargs(
    optimizer: Optimizer, optimizer_class: type[Optimizer], group: Mapping[str, Any]
) -> dict[str, Any]:
    """The group's settings that the optimizer's constructor takes (for the Monte Carlo run): its named
    parameters, and with ``**kwargs`` the keys of ``defaults``; never state the optimizer added."""
    parameters = inspect.signature(optimizer_class.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {
        k: v
        for k, v in group.items()
        if k not in ("params", "name", "initial_lr") and (k in parameters or (takes_any and k in optimizer.defaults))
    }


#: Betas at least this close to 1 are taken for second-moment decays: they change the scale of a step,
#: which the unit step removes, not how successive steps correlate (Adam's 0.999, ADOPT's 0.9999).
SECOND_MOMENT_BETA = 0.995


def _momentum_beta(group: Mapping[str, Any]) -> float:
    """The slowest first-moment decay of a group: the largest of its ``betas`` (or ``momentum``, ``beta``)
    below :data:`SECOND_MOMENT_BETA`. Lion's momentum is its *second* beta (0.99), Adan's the third."""
    candidates: list[float] = []
    for key in ("betas", "momentum", "beta"):
        value = group.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        candidates += [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    momenta = [b for b in candidates if 0.0 <= b < SECOND_MOMENT_BETA]
    return max(momenta, default=0.0)


def _momentum_horizon(beta: float) -> int:
    return max(128, math.ceil(12.0 / (1.0 - beta))) if beta < 1 else 128


def _plain_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    """Steps with no memory of the previous ones: a plain random walk (closed form)."""
    return shared(PlainReference(c))


def _sgd_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
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


def _rmsprop_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    if float(group.get("momentum", 0.0)) == 0.0 and not group.get("centered", False):
        return shared(PlainReference(c))
    return _simulated_reference(optimizer, group, c)


def _adam_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    beta1 = float(group["betas"][0])
    return shared(
        MonteCarloReference(
            c,
            torch.optim.Adam,
            {"betas": tuple(float(b) for b in group["betas"]), "amsgrad": bool(group.get("amsgrad", False))},
            control_beta=beta1 if beta1 > 0 else None,
        )
    )


def _nadam_family_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    kwargs = simulation_kwargs(optimizer, torch.optim.NAdam, group)
    return shared(_nadam_reference(c, kwargs, _momentum_beta(group)))


def _simulated_reference(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    """Any other optimizer: simulate it on pure noise, over its momentum's horizon."""
    name = torch_class(optimizer)
    optimizer_class = type(optimizer) if name is None else getattr(torch.optim, name)
    kwargs = simulation_kwargs(optimizer, optimizer_class, group)
    horizon = _momentum_horizon(_momentum_beta(group))
    # a long horizon leaves few trials per step at the default budget: keep >= 2048 elements per step
    budget = max(1 << 19, horizon * 2048)
    return shared(MonteCarloReference(c, optimizer_class, kwargs, horizon=horizon, budget=budget))


#: The null-model reference by torch optimizer class; any other optimizer is simulated
#: (:func:`_simulated_reference`). A new family is one function and one row.
REFERENCE_FAMILIES: dict[str, Callable[[Optimizer, Mapping[str, Any], float], Reference]] = {
    "Adagrad": _plain_reference,
    "Adadelta": _plain_reference,
    "ASGD": _plain_reference,
    "SGD": _sgd_reference,
    "RMSprop": _rmsprop_reference,
    "Adam": _adam_reference,
    "AdamW": _adam_reference,
    "NAdam": _nadam_family_reference,
}


def reference_for(optimizer: Optimizer, group: Mapping[str, Any], c: float) -> Reference:
    """The null-model reference of one param group (shared process-wide, so computed once per key)."""
    family = REFERENCE_FAMILIES.get(torch_class(optimizer) or "", _simulated_reference)
    return family(optimizer, _quantized(group), c)


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
