"""CLARA's options, declared once: a frozen record of what the user gave, and what it resolves to.

:class:`CLARAOptions` holds the values as given (None: the rule's default) and checks them when it
is made, with messages that name the argument and its range. :meth:`CLARAOptions.resolve` turns it
into :class:`Settings`, the concrete numbers one controller runs with. ``CLARA``, ``CLARACallback``
and the Transformers callback all take these options; the option docs in their docstrings are built
from :data:`OPTION_DOCS`, and the written-out signatures of ``CLARA`` and ``CLARACallback`` are held
equal to the fields below by ``tests/controller/test_api.py`` (so LightningCLI sees typed, documented
arguments).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from lightning_clara._validation import (
    check_choice,
    check_in_range,
    check_non_negative_int,
    check_optional_positive,
    check_positive_int,
)
from lightning_clara.distributed import Sharding, dtensor_sharding
from lightning_clara.option_docs import OPTION_DOCS, with_option_docs
from lightning_clara.reference.curves import Reference
from lightning_clara.rule import Bounds, Schedule, anneal_start
from lightning_clara.safeguard import PageHinkley
from lightning_clara.sampling import DEFAULT_SAMPLE

__all__ = [
    "OPTION_DOCS",
    "RULE_DEFAULTS",
    "CLARAOptions",
    "Settings",
    "merged_options",
    "run_length_defaults",
]

#: The smallest c: references span at most 4096 steps (``reference.curves.MAX_HORIZON``), enough for c >= 1e-3
MIN_C = 1e-3  # (at c = 1e-4 a random walk's path still grows there: the reference was 44 % low)

Scope = Literal["optimizer", "param_group"]
Variant = Literal["clara", "salera"]
Rule = Literal["paper", "normalized"]

#: The options left at None take their rule's default: ``rule="paper"`` is the paper's exact rule
#: (arXiv 2508.05408: c = 0.2, d = 1e-3, F starts at 1, no fast start, no hold, target 1);
#: ``"normalized"`` is the library's "find, then hold" default, measured on deep networks with
#: shuffled loaders (benchmarks/RESULTS.md, section "Deep networks").
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "normalized": {
        "c": 0.02,
        "d": 0.03,
        "fast_start": 50,
        "hold_after": 600,
        "initial_factor": 0.1,
        "target": 0.5,
        "loss_brake": True,
        "anneal": True,
    },
    "paper": {
        "c": 0.2,
        "d": 1e-3,
        "fast_start": 0,
        "hold_after": 0,
        "initial_factor": 1.0,
        "target": 1.0,
        "loss_brake": False,
        "anneal": False,
    },
}
#: A run known to be short (``total_steps``) finds in its first ``SHORT_RUN_FIND`` part:
#: ``hold_after`` becomes ``SHORT_RUN_FIND * total_steps``, at least ``SHORT_RUN_MIN_HOLD`` and at
#: most the default ``hold_after``, and ``d`` grows so that ``d * hold_after`` (how far the find
#: can move log F) stays that of the defaults.
#: Measured: a 600-step LM from lr0 1e-5 needs it (benchmarks/RESULTS.md); 3000-step runs keep the
#: defaults, as a 3000-step MLP ran away at twice the default d.
SHORT_RUN_FIND = 0.4
SHORT_RUN_MIN_HOLD = 240


def run_length_defaults(total_steps: int, hold_unset: bool, d_unset: bool) -> dict[str, Any]:
    """The normalized rule's ``hold_after`` and ``d`` for a run of ``total_steps`` optimizer steps.

    The find takes the first 40 % of a short run (at least ``SHORT_RUN_MIN_HOLD`` steps) and at most
    the default ``hold_after``; ``d`` (only when ``hold_after`` is not set either) scales inversely,
    so that the find can move log F as far as with the defaults. Runs of 1500 steps or more keep
    the defaults.
    """
    if not hold_unset:
        return {}
    defaults = RULE_DEFAULTS["normalized"]
    hold = min(defaults["hold_after"], max(SHORT_RUN_MIN_HOLD, int(SHORT_RUN_FIND * total_steps)))
    out: dict[str, Any] = {"hold_after": hold}
    if d_unset:
        out["d"] = defaults["d"] * defaults["hold_after"] / hold
    return out


@dataclass(frozen=True)
class Settings:
    """What one controller runs with: every option resolved to a concrete, checked value."""

    rule: Rule
    c: float
    d: float
    fast_start: int
    hold_after: int
    initial_factor: float
    target: float
    loss_brake: bool
    anneal: bool
    skip_nonfinite: bool
    total_steps: int | None
    scope: Scope
    variant: Variant
    unit_step: bool
    reference: Reference | None
    safeguard: PageHinkley | None
    sharding: Sharding | None
    consistency_check_every: int | None
    sample: int | None
    min_factor: float | None
    max_factor: float | None
    min_lr: float | None
    max_lr: float | None
    #: The run's steps before this controller attached (``total_steps`` is what was left of the run then): not an
    #: option; a callback that makes a controller mid-run sets it with the length (``set_total_steps``).
    run_offset: int = 0

    @cached_property
    def schedule(self) -> Schedule:
        """The rule's record: how log F moves per step."""
        end = self.total_steps if self.anneal and self.total_steps else 0
        return Schedule(
            self.rule, self.d, self.fast_start, self.hold_after, self.target, anneal_start(self.hold_after, end), end
        )

    @cached_property
    def bounds(self) -> Bounds:
        """The rule's record: where F and the lr used are clamped."""
        return Bounds(self.min_factor, self.max_factor, self.min_lr, self.max_lr)


@dataclass(frozen=True)
class CLARAOptions:
    """CLARA's options as given (None: the default of ``rule``), checked when made.

    ``CLARAOptions.paper(**overrides)`` is the paper's exact rule and defaults. Replace fields with
    ``dataclasses.replace``; the result is checked again. The Args below are :data:`OPTION_DOCS`.
    """

    c: float | None = None
    d: float | None = None
    scope: Scope = "optimizer"
    min_factor: float | None = None
    max_factor: float | None = None
    min_lr: float | None = None
    max_lr: float | None = None
    initial_factor: float | None = None
    variant: Variant = "clara"
    unit_step: bool = False
    reference: Reference | None = None
    safeguard: bool | PageHinkley = False
    sharding: Sharding | None = None
    consistency_check_every: int | None = None
    rule: Rule = "normalized"
    fast_start: int | None = None
    hold_after: int | None = None
    target: float | None = None
    total_steps: int | None = None
    sample: int | None = DEFAULT_SAMPLE
    loss_brake: bool | None = None
    skip_nonfinite: bool = True
    anneal: bool | None = None

    def __post_init__(self) -> None:
        self.resolve()  # raises TypeError/ValueError naming the argument and its range

    @classmethod
    def paper(cls, **overrides: Any) -> CLARAOptions:
        """The paper's rule and defaults: ``rule="paper"``, ``c=0.2``, ``d=1e-3``, F from 1 (exact with sample=None)."""
        return cls(**{"rule": "paper", **overrides})

    def resolve(self, param_groups: Sequence[dict[str, Any]] = ()) -> Settings:
        """The concrete settings; ``sharding`` left at None is FSDP2's where the parameters of ``param_groups``
        are DTensors.

        Options given as None take the default of their ``rule`` (:data:`RULE_DEFAULTS`); with
        ``rule="normalized"`` and ``total_steps`` given, ``hold_after`` and ``d`` left at None follow
        the run's length (:func:`run_length_defaults`).
        ``safeguard=True`` makes a new :class:`PageHinkley` each call (one per controller).
        """
        rule = check_choice("rule", self.rule, ("paper", "normalized"))
        total_steps = None if self.total_steps is None else check_positive_int("total_steps", self.total_steps)
        rule_values = _rule_values(self, rule, total_steps)
        values: dict[str, Any] = {
            "c": check_in_range("c", rule_values["c"], MIN_C, 1.0),
            "rule": rule,
            "total_steps": total_steps,
            "scope": check_choice("scope", self.scope, ("optimizer", "param_group")),
            **{name: check_optional_positive(name, getattr(self, name)) for name in _BOUNDS},
            "initial_factor": _positive("initial_factor", rule_values["initial_factor"]),
            "variant": check_choice("variant", self.variant, ("clara", "salera")),
        }
        values.update(self._resolve_features(param_groups))
        values["d"] = _positive("d", rule_values["d"])
        values["fast_start"] = check_non_negative_int("fast_start", rule_values["fast_start"])
        values["hold_after"] = check_non_negative_int("hold_after", rule_values["hold_after"])
        values["target"] = _positive("target", rule_values["target"])
        values["loss_brake"] = _boolean("loss_brake", rule_values["loss_brake"])
        values["anneal"] = _boolean("anneal", rule_values["anneal"])
        values["skip_nonfinite"] = _boolean("skip_nonfinite", self.skip_nonfinite, optional=False)
        every = self.consistency_check_every
        values["consistency_check_every"] = (
            None if every is None else check_positive_int("consistency_check_every", every)
        )
        values["sample"] = self._resolve_sample()
        self._check_combinations(values)
        return Settings(**values)

    def _resolve_features(self, param_groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``unit_step``, ``reference``, ``safeguard`` and ``sharding``: their types, in that order."""
        if not isinstance(self.unit_step, bool):
            raise TypeError(f"unit_step must be a bool, got {type(self.unit_step).__name__} {self.unit_step!r}")
        if self.reference is not None and not isinstance(self.reference, Reference):
            raise TypeError(
                f"reference must be a lightning_clara.reference.Reference or None, got {type(self.reference).__name__}"
            )
        if isinstance(self.safeguard, bool):
            safeguard = PageHinkley() if self.safeguard else None
        elif isinstance(self.safeguard, PageHinkley):
            safeguard = self.safeguard
        else:
            raise TypeError(f"safeguard must be a bool or a PageHinkley, got {type(self.safeguard).__name__}")
        sharding = self.sharding
        if sharding is not None and not isinstance(sharding, Sharding):
            raise TypeError(
                f"sharding must be a lightning_clara.distributed.Sharding or None, got {type(sharding).__name__}"
            )
        if sharding is None:
            sharding = dtensor_sharding((p for group in param_groups for p in group["params"]), "CLARA")
        if sharding is not None and (self.variant == "salera" or self.unit_step):
            raise ValueError("sharding reads the realised step on the sample: use variant='clara' and unit_step=False")
        return {"unit_step": self.unit_step, "reference": self.reference, "safeguard": safeguard, "sharding": sharding}

    def _resolve_sample(self) -> int | None:
        sample = None if self.sample is None else check_positive_int("sample", self.sample)
        if self.sharding is not None and sample is None:
            raise ValueError(
                "sample=None (every coordinate) is not supported with sharding: each step would sum whole "
                "parameters across the shard group; keep a sample (the default, 4096)"
            )
        if self.sharding is not None and self.sharding.offset is None:
            raise ValueError(
                "sampled paths on sharded parameters need Sharding.offset (where each rank's shard starts in "
                "the flattened tensor)"
            )
        return sample

    def _check_combinations(self, values: Mapping[str, Any]) -> None:
        if self.variant == "salera" and self.unit_step:
            raise ValueError("variant='salera' reads raw gradients: it does not take unit_step")
        for low, high in (("min_factor", "max_factor"), ("min_lr", "max_lr")):
            if values[low] is not None and values[high] is not None and values[low] > values[high]:
                raise ValueError(f"{low} ({values[low]}) must be <= {high} ({values[high]})")
        start, low, high = values["initial_factor"], values["min_factor"], values["max_factor"]
        if self.initial_factor is not None and not (low or 0.0) <= start <= (high or math.inf):
            # a default initial_factor outside the bounds is clamped into them: the bounds were the choice
            raise ValueError(
                f"initial_factor ({start}) lies outside [min_factor, max_factor] = [{low}, {high}]: "
                "F would start clamped to the bound; choose one inside them"
            )
        if self.fast_start is not None and self.hold_after and values["fast_start"] > values["hold_after"]:
            raise ValueError(
                f"fast_start ({values['fast_start']}) must be <= hold_after ({values['hold_after']}): the hold "
                "would begin while the fast start's larger steps still run"
            )


def merged_options(
    options: CLARAOptions | None, keywords: Mapping[str, Any], *, signature: bool = True
) -> CLARAOptions:
    """The options the keywords give; with ``options``, its fields replaced by the keywords, checked again.

    ``signature``: the keywords are a written-out signature's, every option present, so only those not
    at their defaults replace fields (a keyword left at its default keeps the field of ``options``);
    False: only the keywords the caller gave (``**overrides``), each of which replaces its field.
    """
    unknown = sorted(set(keywords) - set(_FIELD_DEFAULTS))
    if unknown:
        raise TypeError(f"got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return CLARAOptions(**keywords)
    if not isinstance(options, CLARAOptions):
        raise TypeError(f"options must be a lightning_clara.CLARAOptions or None, got {type(options).__name__}")
    overrides = {k: v for k, v in keywords.items() if not (signature and is_default_option(k, v))}
    return dataclasses.replace(options, **overrides) if overrides else options


def is_default_option(name: str, value: Any) -> bool:
    """Whether ``value`` is the default of option ``name`` (a keyword at its default keeps ``options``' field)."""
    default = _FIELD_DEFAULTS[name]
    return value is default or (type(value) is type(default) and value == default)


_BOUNDS = ("min_factor", "max_factor", "min_lr", "max_lr")
_RULE_OPTIONS = ("c", "d", "fast_start", "hold_after", "initial_factor", "target", "loss_brake", "anneal")


def _boolean(name: str, value: Any, optional: bool = True) -> bool:
    if not isinstance(value, bool):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    return check_in_range(name, value, 0.0, math.inf, low_open=True, high_open=True)


def _rule_values(options: CLARAOptions, rule: str, total_steps: int | None) -> dict[str, Any]:
    """The options that have rule defaults: as given, or the rule's (run-length) default."""
    defaults = RULE_DEFAULTS[rule]
    if rule == "normalized" and total_steps is not None:
        defaults = {**defaults, **run_length_defaults(total_steps, options.hold_after is None, options.d is None)}
    given = {name: getattr(options, name) for name in _RULE_OPTIONS}
    return {name: defaults[name] if value is None else value for name, value in given.items()}


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CLARAOptions)}


OPTION_NAMES: tuple[str, ...] = tuple(_FIELD_DEFAULTS)
CLARAOptions.__doc__ = with_option_docs(f"{(CLARAOptions.__doc__ or '').rstrip()}\n\n    Args:", OPTION_NAMES)
