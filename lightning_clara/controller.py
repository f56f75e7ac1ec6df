"""``CLARA``: cumulative learning-rate adaptation for one torch optimizer, attached through its step hooks.

Contract with the optimizer and any LR scheduler: while ``optimizer.step()`` runs,
``param_groups[j]["lr"]`` holds the learning rate actually used, ``lr_base * F``; outside the
step it holds ``lr_base`` again. A scheduler therefore only ever sees and sets ``lr_base``,
and the learning rate used is ``lr_scheduled * F``. A step the optimizer never runs (a
GradScaler skip, an accumulation micro-batch) fires no hook and changes nothing.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_clara._validation import (
    check_choice,
    check_in_range,
    check_non_negative_int,
    check_optional_positive,
    check_positive_int,
)
from lightning_clara.directions import DeltaReader, DirectionReader, GradientReader
from lightning_clara.distributed import RankConsistencyGuard, Sharding
from lightning_clara.path import path_dtype_for, update_paths, update_sharded_paths
from lightning_clara.reference import PlainReference, Reference, shared
from lightning_clara.safeguard import PageHinkley
from lightning_clara.sampling import DEFAULT_SAMPLE, SampledPaths
from lightning_clara.support import (
    DirectionChoice,
    ReferenceKeys,
    check_supported,
    reader_for,
    reference_for,
    safeguarded_target,
    unwrap,
)

__all__ = ["CLARA", "validate_options"]

Scope = Literal["optimizer", "param_group"]
Variant = Literal["clara", "salera"]
Rule = Literal["paper", "normalized"]
#: 2 adds ``config["sample"]`` and sampled paths (1-D, the sample's entries); 1 (full paths) still loads.
_STATE_FORMAT = 2
#: The options left at None take their rule's default: ``rule="paper"`` is the paper's exact rule
#: (arXiv 2508.05408: c = 0.2, d = 1e-3, F starts at 1, no fast start, no hold, target 1);
#: ``"normalized"`` is the library's "find, then hold" default, measured on deep networks with
#: shuffled loaders (benchmarks/RESULTS.md, section "Deep networks").
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "normalized": {"c": 0.02, "d": 0.03, "fast_start": 50, "hold_after": 600, "initial_factor": 0.1, "target": 0.7},
    "paper": {"c": 0.2, "d": 1e-3, "fast_start": 0, "hold_after": 0, "initial_factor": 1.0, "target": 1.0},
}
#: After ``hold_after`` adapted steps the damping decays as ``exp(-(t - hold_after) / tau)`` with
#: ``tau = HOLD_DECAY * hold_after``: by ``2 * hold_after`` it is 5 % of ``d``, later it vanishes.
HOLD_DECAY = 1.0 / 3.0
#: A run known to be short (``total_steps``) finds in its first ``SHORT_RUN_FIND`` part:
#: ``hold_after`` becomes ``SHORT_RUN_FIND * total_steps``, at least ``SHORT_RUN_MIN_HOLD`` and at
#: most the default ``hold_after``, and ``d`` grows so that ``d * hold_after`` (how far the find
#: can move log F) stays that of the defaults.
#: Measured: a 600-step LM from lr0 1e-5 needs it (benchmarks/RESULTS.md); 3000-step runs keep the
#: defaults, as a 3000-step MLP ran away at twice the default d.
SHORT_RUN_FIND = 0.4
SHORT_RUN_MIN_HOLD = 240
#: The damping's multiplier at the first step of a fast start; it falls linearly to 1.
FAST_START_GAIN = 20.0
#: |log F| never exceeds this (F in [1e-26, 1e26]): F stays finite and non-zero whatever happens.
LOG_FACTOR_LIMIT = 60.0


def validate_options(
    *,
    c: Any = None,
    d: Any = None,
    scope: Any = "optimizer",
    direction: Any = "auto",
    min_factor: Any = None,
    max_factor: Any = None,
    min_lr: Any = None,
    max_lr: Any = None,
    initial_factor: Any = None,
    variant: Any = "clara",
    unit_step: Any = False,
    reference: Any = None,
    safeguard: Any = False,
    sharding: Any = None,
    consistency_check_every: Any = None,
    rule: Any = "normalized",
    fast_start: Any = None,
    hold_after: Any = None,
    target: Any = None,
    total_steps: Any = None,
    sample: Any = DEFAULT_SAMPLE,
) -> dict[str, Any]:
    """Check CLARA's options; raise ``TypeError``/``ValueError`` naming the argument and its range.

    Options given as None take the default of their ``rule`` (:data:`RULE_DEFAULTS`); with
    ``rule="normalized"`` and ``total_steps`` given, ``hold_after`` and ``d`` left at None follow
    the run's length (:func:`run_length_defaults`). ``sample`` becomes None (full paths) where a
    feature reads whole tensors: ``direction="state"``, ``unit_step=True``, ``variant="salera"``.
    """
    rule = check_choice("rule", rule, ("paper", "normalized"))
    total_steps = None if total_steps is None else check_positive_int("total_steps", total_steps)
    defaults = RULE_DEFAULTS[rule]
    if rule == "normalized" and total_steps is not None:
        defaults = {**defaults, **run_length_defaults(total_steps, hold_after is None, d is None)}
    c, d, fast_start, hold_after, initial_factor, target = (
        defaults[name] if value is None else value
        for name, value in (
            ("c", c),
            ("d", d),
            ("fast_start", fast_start),
            ("hold_after", hold_after),
            ("initial_factor", initial_factor),
            ("target", target),
        )
    )
    options = {
        "c": check_in_range("c", c, 0.0, 1.0, low_open=True),
        "rule": rule,
        "total_steps": total_steps,
        "scope": check_choice("scope", scope, ("optimizer", "param_group")),
        "direction": check_choice("direction", direction, ("auto", "delta", "state")),
        "min_factor": check_optional_positive("min_factor", min_factor),
        "max_factor": check_optional_positive("max_factor", max_factor),
        "min_lr": check_optional_positive("min_lr", min_lr),
        "max_lr": check_optional_positive("max_lr", max_lr),
        "initial_factor": check_in_range(
            "initial_factor", initial_factor, 0.0, math.inf, low_open=True, high_open=True
        ),
    }
    options["variant"] = check_choice("variant", variant, ("clara", "salera"))
    if not isinstance(unit_step, bool):
        raise TypeError(f"unit_step must be a bool, got {type(unit_step).__name__} {unit_step!r}")
    options["unit_step"] = unit_step
    if reference is not None and not isinstance(reference, Reference):
        raise TypeError(
            f"reference must be a lightning_clara.reference.Reference or None, got {type(reference).__name__}"
        )
    options["reference"] = reference
    if isinstance(safeguard, bool):
        options["safeguard"] = PageHinkley() if safeguard else None
    elif isinstance(safeguard, PageHinkley):
        options["safeguard"] = safeguard
    else:
        raise TypeError(f"safeguard must be a bool or a PageHinkley, got {type(safeguard).__name__}")
    if sharding is not None and not isinstance(sharding, Sharding):
        raise TypeError(
            f"sharding must be a lightning_clara.distributed.Sharding or None, got {type(sharding).__name__}"
        )
    if sharding is not None and (direction == "state" or variant == "salera"):
        raise ValueError("sharding needs the delta reader: use direction='auto' or 'delta' and variant='clara'")
    options["sharding"] = sharding
    options["d"] = check_in_range("d", d, 0.0, math.inf, low_open=True, high_open=True)
    options["fast_start"] = check_non_negative_int("fast_start", fast_start)
    options["hold_after"] = check_non_negative_int("hold_after", hold_after)
    options["target"] = check_in_range("target", target, 0.0, math.inf, low_open=True, high_open=True)
    options["consistency_check_every"] = (
        None
        if consistency_check_every is None
        else check_positive_int("consistency_check_every", consistency_check_every)
    )
    sample = None if sample is None else check_positive_int("sample", sample)
    if direction == "state" or unit_step or variant == "salera":
        sample = None  # these read or rescale whole tensors
    if sample is not None and sharding is not None and sharding.offset is None:
        raise ValueError(
            "sampled paths on sharded parameters need Sharding.offset (where each rank's shard starts in "
            "the flattened tensor); give it, or pass sample=None for full paths"
        )
    options["sample"] = sample
    if unit_step and direction == "state":
        raise ValueError("unit_step=True needs the realised step: use direction='auto' or 'delta', not 'state'")
    if variant == "salera" and (unit_step or direction != "auto"):
        raise ValueError("variant='salera' reads raw gradients: it takes neither unit_step nor a direction")
    for low, high in (("min_factor", "max_factor"), ("min_lr", "max_lr")):
        if options[low] is not None and options[high] is not None and options[low] > options[high]:
            raise ValueError(f"{low} ({options[low]}) must be <= {high} ({options[high]})")
    return options


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


@dataclass
class _TensorState:
    """What CLARA keeps per parameter tensor: its path and how often the path was updated."""

    path: Tensor
    count: int = 0


@dataclass
class _Pending:
    """A step whose per-tensor results are still on their way to the host (CUDA)."""

    host_buffers: list[Tensor]
    ready: Any  # torch.cuda.Event
    finish: Callable[[list[Tensor], bool], None]  # the host part, given the buffers and ``collectives``


_REFERENCE_SERIALS = itertools.count()


@dataclass
class _GroupReference:
    key: tuple[Any, ...]
    curves: dict[int, list[float]]
    param_ids: tuple[int, ...] = ()  # the group's tensors when the curves were built
    #: Unique per built reference (an ``id`` could be reused once the old one is freed): sampled
    #: paths rebuild their curve table when it changes.
    serial: int = field(default_factory=lambda: next(_REFERENCE_SERIALS))


class CLARA:
    """Adapt the learning rates of ``optimizer`` with CLARA (arXiv 2508.05408).

    Every optimizer step updates, per parameter tensor, a path ``p <- (1-c) p + c s/||s||`` of
    the realised step s, compares ``r = sum ||p||^2 / sum mu`` with the same optimizer's
    random-walk reference mu, and moves ``log F`` (the lr used is ``lr_base * F``).

    Args:
        optimizer: the optimizer to adapt; it keeps doing its own update. A Lightning Fabric
            optimizer (``fabric.setup``'s) is unwrapped: CLARA hooks the optimizer inside it.
        c: path memory in (0, 1]; the path averages roughly the last ``1/c`` unit steps (default
            0.02 with ``rule="normalized"``; the paper's 0.2 with ``"paper"``). The longer memory sees
            the drift of a deep network under its oscillating top directions: at ``c=0.2`` the ratio
            is about 0.6-0.8 over the whole good lr range, at 0.02 it crosses 1 within 2-3x of the
            tuned lr.
        d: damping > 0. With ``rule="normalized"`` (default 0.03) it is the change of log F
            per step when all steps agree; with ``rule="paper"`` (default 1e-3) log F moves by
            ``d * (r - 1)``.
        scope: ``"optimizer"`` (one factor, the paper's choice) or ``"param_group"`` (one per group).
        direction: ``"auto"`` (snapshot-free state reader where exact, else the delta),
            ``"delta"`` (parameter snapshot; any optimizer) or ``"state"`` (force the state reader).
        min_factor: lower bound on F, or None.
        max_factor: upper bound on F, or None (log F is clamped, so there is no wind-up).
        min_lr: lower bound on the learning rate used, ``lr_base * F``, or None.
        max_lr: upper bound on the learning rate used, or None.
        initial_factor: F before the first step (default 0.1 with ``rule="normalized"``, 1 with
            ``"paper"``): starting 10x below the given lr lets CLARA climb to a too-large lr instead
            of diverging before it can act.
        variant: ``"clara"``, or ``"salera"`` (the 2017 rule: normalised raw gradients against a
            plain random walk, whatever the optimizer; for ablations).
        unit_step: the paper's "_us" variant: each tensor's step becomes ``lr * s/||s||``.
        reference: a :class:`~lightning_clara.reference.Reference` to use for every group
            instead of the automatic one.
        safeguard: True (or a :class:`~lightning_clara.safeguard.PageHinkley`) to watch the
            loss given to :meth:`observe_loss` (call it every step). With it, Adam and AdamW steer
            to a lower target (:data:`~lightning_clara.support.SAFEGUARDED_TARGETS`, 0.55), which
            reaches their tuned lr; without it they keep 0.7, which cannot run away. Costs one
            host copy of the loss per step and two parameter snapshots. ``CLARACallback`` turns it on.
        sharding: how parameters are sharded across ranks (FSDP/ZeRO-like), see
            :class:`~lightning_clara.distributed.Sharding`; None for whole tensors (DDP too).
        consistency_check_every: under DDP, compare F across ranks every this many steps.
        rule: ``"normalized"``: ``log F += d * (r - 1) / (r_max - 1)`` with
            ``r_max = (tensors) / sum mu``, the largest ratio possible, so one d suits every
            optimizer (the ratio range of Adam is ~17 times narrower than plain SGD's); still
            unbiased under the null model. ``"paper"``: ``log F += d * (r - 1)``.
        fast_start: for this many adapted steps the damping starts at ``20 d`` and falls linearly
            to ``d`` (default 50 with ``rule="normalized"``, 0 with ``"paper"``), so that a bad
            initial lr is rescued within short runs. The gain depends on the step count only, so
            ``log F`` stays unbiased under the null model; 0 turns it off.
        hold_after: "find, then hold": after this many adapted steps the damping decays as
            ``exp(-(t - hold_after) / (hold_after / 3))``, so F settles and the user's schedule takes
            over (default 600 with ``rule="normalized"``; 0, never, with ``"paper"``). Once a network
            fits its data, successive steps cancel at every lr (r < 1 with or without
            replacement), and a rule that keeps adapting lowers F without end; the hold bounds what
            F can still move to ``d * hold_after / 3`` (x the signal, at most 1) in log F.
        target: the ratio the rule steers to (default 0.7 with ``rule="normalized"``, 0.55 for
            Adam and AdamW with a safeguard; 1, the paper's random walk, with ``"paper"``). At a
            good lr a deep network's steps partly cancel, so ``r = 1`` lies below it; a target
            below 1 accepts that cancellation. On pure noise (E[r] = 1) it makes log F rise by a
            known, bounded amount before the hold (docs/algorithm.md).
        total_steps: the number of optimizer steps the run will take, if known (the callback
            passes the Trainer's estimate). A short run finds faster: with ``rule="normalized"``,
            ``hold_after`` left at None becomes ``0.4 * total_steps`` (between 240 and 600) and
            ``d`` left at None grows as ``0.03 * 600 / hold_after``. None: the defaults.
        sample: keep each tensor's path on a fixed sample of at most this many coordinates
            (default 4096; tensors with fewer entries keep all of them, so small models are
            unchanged). The realised step is read on the sample (gathered before and after the
            step), so a step costs O(sample x tensors) whatever the model's size, for every
            optimizer. The sample is spread over the tensor (runs of 16 consecutive entries in 256
            strata) and chosen from its position and size only (identical on every rank and after
            a resume). None: full paths, the paper's exact
            statistic (also what ``direction="state"``, ``unit_step`` and ``variant="salera"`` use).

    Example::

        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        clara = CLARA(optimizer)
        for x, y in data:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()   # lr adapts inside step()
    """

    @classmethod
    def paper(cls, optimizer: Optimizer, **overrides: Any) -> CLARA:
        """The paper's exact rule and defaults: ``rule="paper"``, ``c=0.2``, ``d=1e-3``, F starting at 1."""
        return cls(optimizer, **{"rule": "paper", **overrides})

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        c: float | None = None,
        d: float | None = None,
        scope: Scope = "optimizer",
        direction: DirectionChoice = "auto",
        min_factor: float | None = None,
        max_factor: float | None = None,
        min_lr: float | None = None,
        max_lr: float | None = None,
        initial_factor: float | None = None,
        variant: Variant = "clara",
        unit_step: bool = False,
        reference: Reference | None = None,
        safeguard: bool | PageHinkley = False,
        sharding: Sharding | None = None,
        consistency_check_every: int | None = None,
        rule: Rule = "normalized",
        fast_start: int | None = None,
        hold_after: int | None = None,
        target: float | None = None,
        total_steps: int | None = None,
        sample: int | None = DEFAULT_SAMPLE,
    ) -> None:
        optimizer = unwrap(optimizer)  # Fabric's wrapper: hook the optimizer it wraps
        check_supported(optimizer)
        options = validate_options(
            c=c,
            d=d,
            scope=scope,
            direction=direction,
            min_factor=min_factor,
            max_factor=max_factor,
            min_lr=min_lr,
            max_lr=max_lr,
            initial_factor=initial_factor,
            variant=variant,
            unit_step=unit_step,
            reference=reference,
            safeguard=safeguard,
            sharding=sharding,
            consistency_check_every=consistency_check_every,
            rule=rule,
            fast_start=fast_start,
            hold_after=hold_after,
            target=target,
            total_steps=total_steps,
            sample=sample,
        )
        if target is None and options["rule"] == "normalized" and options["safeguard"] is not None:
            options["target"] = safeguarded_target(optimizer) or options["target"]
        self.c: float = options["c"]
        self.d: float = options["d"]
        self.scope: Scope = options["scope"]
        self.direction: DirectionChoice = options["direction"]
        self.min_factor: float | None = options["min_factor"]
        self.max_factor: float | None = options["max_factor"]
        self.min_lr: float | None = options["min_lr"]
        self.max_lr: float | None = options["max_lr"]
        initial: float = options["initial_factor"]
        self.variant: Variant = options["variant"]
        self.unit_step: bool = options["unit_step"]
        self._custom_reference: Reference | None = options["reference"]
        self.safeguard: PageHinkley | None = options["safeguard"]
        self.sharding: Sharding | None = options["sharding"]
        self.rule: Rule = options["rule"]
        self.fast_start: int = options["fast_start"]
        self.hold_after: int = options["hold_after"]
        self.target: float = options["target"]
        self.total_steps: int | None = options["total_steps"]
        self.sample: int | None = options["sample"]
        self._given_schedule = {"d": d, "hold_after": hold_after}  # None: the rule's (run-length) default
        self.consistency_check_every: int | None = options["consistency_check_every"]
        every = self.consistency_check_every
        self._guard = None if every is None else RankConsistencyGuard(every)
        if getattr(optimizer, "_clara_controller", None) is not None:
            raise RuntimeError("this optimizer already has a CLARA controller attached; detach() it first")

        self.optimizer = optimizer
        self._sampled: SampledPaths | None = None
        self._reader: DirectionReader | None
        if self.sample is not None:
            self._sampled = self._sampled_paths(self.sample)
            # the sample gives the step; the full snapshots remain only for the safeguard's restore
            view = None if self.sharding is None else self.sharding.local
            self._reader = DeltaReader(keep_snapshots=True, view=view) if self.safeguard is not None else None
        elif self.variant == "salera":
            self._reader = GradientReader()
        else:
            needs_delta = self.unit_step or self.sharding is not None
            self._reader = reader_for(optimizer, "delta" if needs_delta else self.direction)
            keep = self.safeguard is not None and self.direction != "state"  # so that an alarm can restore
            if keep or self.sharding is not None:
                view = None if self.sharding is None else self.sharding.local
                self._reader = DeltaReader(keep_snapshots=keep, view=view)
        self._log_factors: list[float] = []
        self._initial_log_factor = self._clamp_log_factor(math.log(initial))
        self._ratios: list[float | None] = []
        self._tensors: dict[Tensor, _TensorState] = {}
        self._references: list[_GroupReference | None] = []
        self._reference_keys = ReferenceKeys(self.optimizer)
        self._bases: list[Any] | None = None
        self._lr_used: list[float] = []
        self._adapted_steps = 0
        self._skipped_steps = 0
        self._steps_seen = 0
        self._pending: _Pending | None = None
        self._guard_due: torch.device | None = None
        self._sync_scopes()
        for j in range(len(optimizer.param_groups)):
            self._group_reference(j)
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        optimizer._clara_controller = self  # type: ignore[attr-defined]

    def _sampled_paths(self, m: int) -> SampledPaths:
        if self.sharding is None:
            return SampledPaths(m, full_numel=lambda p: p.numel(), local=lambda p: p)
        sharding = self.sharding
        return SampledPaths(
            m, sharding.full_numel, sharding.local, offset=sharding.offset, sum_across_shards=sharding.sum_across_shards
        )

    def set_total_steps(self, total_steps: int | None) -> None:
        """Give the run's length once it is known (``total_steps`` of the constructor, later).

        ``d`` and ``hold_after`` that were not set explicitly take their run-length defaults
        (:func:`run_length_defaults`); a pure function of ``total_steps``, so a resumed run that
        gives the same length continues with the same schedule. ``CLARACallback`` calls it in
        ``on_train_start``, once the Trainer's ``estimated_stepping_batches`` is known without
        loading the data early.
        """
        options = validate_options(rule=self.rule, total_steps=total_steps, **self._given_schedule)
        self.total_steps, self.d, self.hold_after = options["total_steps"], options["d"], options["hold_after"]

    # ------------------------------------------------------------------ public read-only state
    @property
    def lr_factor(self) -> float:
        """The factor F (of the first param group's scope; see :attr:`lr_factors` for per-group scope)."""
        self._sync_scopes()
        return self._factor(self._log_factors[0])

    @property
    def lr_factors(self) -> list[float]:
        """F for every param group (equal across groups with ``scope="optimizer"``)."""
        self._sync_scopes()
        return [self._factor(self._log_factors[self._scope_of(j)]) for j in range(len(self.optimizer.param_groups))]

    @property
    def log_factors(self) -> list[float]:
        """log F for every param group."""
        self._sync_scopes()
        return [self._log_factors[self._scope_of(j)] for j in range(len(self.optimizer.param_groups))]

    @property
    def ratio(self) -> float | None:
        """The last ratio r of the first group's scope (``None`` before the first adapted step)."""
        self._sync_scopes()
        return self._ratios[0]

    @property
    def ratios(self) -> list[float | None]:
        """The last ratio r for every param group."""
        self._sync_scopes()
        return [self._ratios[self._scope_of(j)] for j in range(len(self.optimizer.param_groups))]

    @property
    def lr_used(self) -> list[float]:
        """The learning rate each param group used in the last step (``lr_base * F`` before that)."""
        if self._lr_used:
            return list(self._lr_used)
        return [self._lr_for(j, group["lr"]) for j, group in enumerate(self.optimizer.param_groups)]

    @property
    def num_adapted_steps(self) -> int:
        """Optimizer steps that updated at least one path (and so the factor)."""
        self._settle()
        return self._adapted_steps

    @property
    def damping(self) -> float:
        """The damping of the next adapted step: ``d``, raised during the fast start."""
        self._settle()
        return self._damping()

    def _damping(self) -> float:
        """``d`` x the fast start's gain x the hold's decay: a function of the step count only (unbiased)."""
        steps = self._adapted_steps
        remaining = 1.0 - steps / self.fast_start if self.fast_start else 0.0
        damping = self.d * (1.0 + (FAST_START_GAIN - 1.0) * max(0.0, remaining))
        if self.hold_after and steps > self.hold_after:
            damping *= math.exp(-(steps - self.hold_after) / (HOLD_DECAY * self.hold_after))
        return damping

    @property
    def num_optimizer_steps(self) -> int:
        """``optimizer.step()`` calls seen since attaching (adapted or not)."""
        return self._steps_seen

    @property
    def num_skipped_steps(self) -> int:
        """Steps in which some tensor's step was NaN/inf; those tensors were left out and their paths reset."""
        self._settle()
        return self._skipped_steps

    @property
    def reader_name(self) -> str:
        """Where the step comes from: ``"sample"`` (sampled paths), ``"state"`` or ``"delta"``."""
        if self._sampled is not None:
            return "sample"
        return self._reader.name  # type: ignore[union-attr]

    @property
    def attached(self) -> bool:
        """Whether the step hooks are still registered."""
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the hooks, restore base learning rates if a step was interrupted, free buffers."""
        self._settle()
        self._restore_bases()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._reader is not None:
            self._reader.release()  # the paths stay: state_dict still holds them after detaching
        if getattr(self.optimizer, "_clara_controller", None) is self:
            self.optimizer._clara_controller = None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ scopes and references
    def _scope_of(self, group_index: int) -> int:
        return 0 if self.scope == "optimizer" else group_index

    def _settle(self) -> None:
        """Bring a deferred (CUDA) step's results in before reading state; no collective here."""
        if getattr(self, "_pending", None) is not None:
            self._finish_pending(collectives=False)

    def _sync_scopes(self) -> None:
        """Grow per-scope and per-group lists when param groups were added after attaching."""
        self._settle()
        groups = len(self.optimizer.param_groups)
        scopes = 1 if self.scope == "optimizer" else groups
        while len(self._log_factors) < scopes:
            self._log_factors.append(self._initial_log_factor)
            self._ratios.append(None)
        while len(self._references) < groups:
            self._references.append(None)

    def _group_reference(self, j: int) -> _GroupReference:
        """The reference curves of group j, rebuilt when a hyper-parameter it depends on changed."""
        group = self.optimizer.param_groups[j]
        key, hyperparameters = self._reference_keys.observe(j, group)
        cached = self._references[j]
        param_ids = tuple(map(id, group["params"]))
        if cached is not None and cached.key == key and cached.param_ids == param_ids:
            return cached  # nearly every step: no hyper-parameter and no tensor changed
        sizes = {self._numel(p) for p in group["params"]}
        if cached is None or cached.key != key or not sizes <= cached.curves.keys():
            reference = self._reference_for(hyperparameters)
            curves = {n: curve.tolist() for n, curve in reference.curves(sorted(sizes)).items()}
            cached = _GroupReference(key, curves)
            self._references[j] = cached
        cached.param_ids = param_ids
        return cached

    def _numel(self, param: Tensor) -> int:
        """The tensor size the reference uses: the full size when parameters are sharded, at most the sample."""
        if self._sampled is not None:
            return self._sampled.size(param)
        return param.numel() if self.sharding is None else int(self.sharding.full_numel(param))

    def _reference_for(self, group: dict[str, Any]) -> Reference:
        if self._custom_reference is not None:
            return self._custom_reference
        if self.variant == "salera":
            return shared(PlainReference(self.c))  # SALeRA compares raw gradients with a plain random walk
        return reference_for(self.optimizer, group, self.c)

    def _factor(self, log_factor: float) -> float:
        """F = exp(log F), clamped again after exp so that rounding cannot cross the bounds."""
        factor = math.exp(log_factor)
        if self.min_factor is not None:
            factor = max(factor, self.min_factor)
        if self.max_factor is not None:
            factor = min(factor, self.max_factor)
        return factor

    def _clamp_log_factor(self, value: float) -> float:
        value = min(max(value, -LOG_FACTOR_LIMIT), LOG_FACTOR_LIMIT)
        if self.min_factor is not None:
            value = max(value, math.log(self.min_factor))
        if self.max_factor is not None:
            value = min(value, math.log(self.max_factor))
        return value

    def _lr_for(self, j: int, base: Any) -> float:
        lr = float(base) * self._factor(self._log_factors[self._scope_of(j)])
        if self.min_lr is not None:
            lr = max(lr, self.min_lr)
        if self.max_lr is not None:
            lr = min(lr, self.max_lr)
        return lr

    # ------------------------------------------------------------------ the hooks
    def _trainable(self) -> Iterator[Tensor]:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    yield param

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._restore_bases()  # a previous step that raised never ran the post-hook
        self._finish_pending(collectives=True)
        self._sync_scopes()
        self._reference_keys.before_step()
        if self._sampled is not None:
            self._sampled.before_step(optimizer.param_groups)
        elif not self._reader.needs_snapshot and self.variant != "salera" and self._has_sparse_gradients():  # type: ignore[union-attr]
            # the state readers read the gradient; a sparse one has no norm: read the realised step instead
            self._reader.release()
            self._reader = DeltaReader()
            warnings.warn(
                "CLARA: sparse gradients (nn.Embedding(sparse=True)?): reading the realised step from parameter "
                "snapshots (direction='delta') from now on",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._reader is not None and self._reader.needs_snapshot:  # with sampled paths: the safeguard's
            self._reader.before_step(list(self._trainable()))  # restore points
        bases: list[Any] = []
        used: list[float] = []
        for j, group in enumerate(optimizer.param_groups):
            base = group["lr"]
            lr = self._lr_for(j, base)
            if isinstance(base, Tensor):
                saved = base.clone()
                base.fill_(lr)
                bases.append(saved)
            else:
                group["lr"] = lr
                bases.append(base)
            used.append(lr)
        self._bases = bases
        self._lr_used = used

    def _restore_bases(self) -> None:
        if self._bases is None:
            return
        for group, base in zip(self.optimizer.param_groups, self._bases, strict=False):
            if isinstance(base, Tensor):
                group["lr"].copy_(base)
            else:
                group["lr"] = base
        self._bases = None

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._steps_seen += 1
        try:
            added = optimizer.param_groups[len(self._lr_used) :]
            if added:
                # added inside the step (Lightning runs training_step in the step's closure): these
                # groups stepped at their own lr; from their next step on they are adapted too
                self._lr_used.extend(float(group["lr"]) for group in added)
                self._sync_scopes()
            self._adapt(optimizer)
        finally:
            self._restore_bases()

    def _local(self, param: Tensor) -> Tensor:
        """The tensor holding this rank's part of ``param`` (the parameter itself unless sharded)."""
        return param.detach() if self.sharding is None else self.sharding.local(param.detach())

    def _state_for(self, param: Tensor) -> _TensorState:
        state = self._tensors.get(param)
        if state is None:
            local = self._local(param)
            state = _TensorState(torch.zeros(local.shape, dtype=path_dtype_for(local.dtype), device=local.device))
            self._tensors[param] = state
        return state

    def _has_sparse_gradients(self) -> bool:
        return any(param.grad is not None and param.grad.is_sparse for param in self._trainable())

    def _adapt(self, optimizer: Optimizer) -> None:
        if self._sampled is not None:
            self._adapt_sampled(optimizer)
            return
        # 1. directions, bucketed by (device, path dtype) so each bucket is one set of foreach kernels
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor, Tensor]]] = defaultdict(list)
        curves: dict[int, dict[int, list[float]]] = {}
        for j, group in enumerate(optimizer.param_groups):
            if j < len(self._lr_used) and self._lr_used[j] == 0.0:
                continue  # nothing moved (warm-up from zero): a state reader would still see an intended step
            params = []
            for param in group["params"]:
                # sharded: every rank must take part in the reduction, even with an empty or grad-less shard
                if param.requires_grad and (param.grad is not None or self.sharding is not None):
                    params.append(param)
                elif not param.requires_grad and param in self._tensors:
                    del self._tensors[param]  # frozen: when unfrozen it starts a fresh path
            if not params:
                continue
            curves[j] = self._group_reference(j).curves
            directions = self._reader.directions(optimizer, group, params)
            for param, direction in zip(params, directions, strict=True):
                buckets[(param.device, path_dtype_for(param.dtype))].append((j, param, direction))
        if not buckets:
            return
        # 2. path updates on device; one transfer per bucket brings the per-tensor results back
        items: list[tuple[int, Tensor]] = []
        results: list[Tensor] = []
        for entries in buckets.values():
            paths = [self._state_for(param).path for _, param, _ in entries]
            directions = [direction for _, _, direction in entries]
            if self.sharding is None:
                update = update_paths(paths, directions, self.c)
            else:
                update = update_sharded_paths(paths, directions, self.c, self.sharding.sum_across_shards)
            if self.unit_step:
                self._take_unit_steps(entries, update.moved, update.step_norms)
            results.append(torch.stack([update.squared_norms, update.moved.double(), update.non_finite.double()]))
            items.extend((j, param) for j, param, _ in entries)
        device = next(iter(buckets))[0]

        def finish(buffers: list[Tensor], collectives: bool) -> None:
            self._finish(items, curves, torch.cat(buffers, dim=1).tolist(), device, collectives)

        self._hand_over(results, finish)

    def _adapt_sampled(self, optimizer: Optimizer) -> None:
        """The sampled step: every bucket's paths on device, then one copy of per-tensor sums to the host."""
        sampled = self._sampled
        assert sampled is not None
        references = [self._group_reference(j) for j in range(len(optimizer.param_groups))]
        steps = sampled.update(
            self.c, lambda j, size: references[j].curves[size], [reference.serial for reference in references]
        )
        if not steps:
            return
        groups = [bucket.groups for bucket in sampled.buckets]
        tensors = sum(len(bucket.members) for bucket in sampled.buckets)
        device = sampled.buckets[0].device

        def finish(buffers: list[Tensor], collectives: bool) -> None:
            if self.scope == "optimizer":
                rows = buffers[0] if len(buffers) == 1 else torch.cat(buffers, dim=1)
                sums = rows.sum(dim=1, keepdim=True)
            else:
                sums = torch.zeros(4, len(self._log_factors), dtype=torch.float64)
                for rows, group in zip(buffers, groups, strict=True):
                    sums.index_add_(1, group, rows)
            squared, expected, moved, finite = sums.tolist()
            non_finite = tensors - round(sum(finite))
            self._apply_rule(squared, expected, [round(v) for v in moved], non_finite, device, collectives)

        self._hand_over([step.rows for step in steps], finish)

    def _hand_over(self, results: list[Tensor], finish: Callable[[list[Tensor], bool], None]) -> None:
        """Run the host part of a step, ``finish``, on the step's device results: at once on the CPU;
        on CUDA after a copy to pinned host memory that nothing waits for: ``finish`` runs at the next
        pre-hook (or when a property is read), when the GPU has long finished, so nothing stalls."""
        if not any(result.device.type == "cuda" for result in results):
            finish([result.cpu() for result in results], True)
            return
        host_buffers = []
        for result in results:
            if result.device.type == "cuda":
                buffer = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                buffer.copy_(result, non_blocking=True)
                host_buffers.append(buffer)
            else:
                host_buffers.append(result.cpu())
        event = torch.cuda.Event()
        event.record()
        self._pending = _Pending(host_buffers, event, finish)

    def _finish_pending(self, collectives: bool) -> None:
        """Run the host part of the last step if it was deferred (CUDA), and a deferred guard check."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.ready.synchronize()
            pending.finish(pending.host_buffers, collectives)
        if collectives and self._guard_due is not None:
            device, self._guard_due = self._guard_due, None
            self._log_factors = self._guard.check(self._log_factors, device)  # type: ignore[union-attr]

    def _finish(
        self,
        items: list[tuple[int, Tensor]],
        curves: dict[int, dict[int, list[float]]],
        host: list[list[float]],
        device: torch.device,
        collectives: bool,
    ) -> None:
        """The host part of a step: counts, references, ratio and factor, in float64."""
        scopes = len(self._log_factors)
        squared = [0.0] * scopes
        expected = [0.0] * scopes
        moved = [0] * scopes
        non_finite = 0
        for k, (j, param) in enumerate(items):
            state = self._tensors[param]
            if host[2][k]:
                non_finite += 1
                state.path.zero_()
                state.count = 0
                continue
            if not host[1][k]:
                continue
            state.count += 1
            curve = curves[j][self._numel(param)]
            scope = self._scope_of(j)
            squared[scope] += host[0][k]
            expected[scope] += curve[min(state.count, len(curve) - 1)]
            moved[scope] += 1
        self._apply_rule(squared, expected, moved, non_finite, device, collectives)

    def _apply_rule(
        self,
        squared: list[float],
        expected: list[float],
        moved: list[int],
        non_finite: int,
        device: torch.device,
        collectives: bool,
    ) -> None:
        """The rule on each scope's sums: ``r = sum ||p||^2 / sum mu``, then log F moves (float64)."""
        scopes = len(self._log_factors)
        adapted = False
        damping = self._damping()
        for scope in range(scopes):
            if expected[scope] > 0.0:
                ratio = squared[scope] / expected[scope]
                self._ratios[scope] = ratio
                signal = self._signal(ratio, moved[scope] / expected[scope])
                self._log_factors[scope] = self._clamp_log_factor(self._log_factors[scope] + damping * signal)
                adapted = True
        self._clamp_to_lr_bounds()
        if adapted:
            self._adapted_steps += 1
            if self._guard is not None and self._guard.due(self._adapted_steps):
                # a collective: only where every rank runs it (the hooks), never from a property
                self._guard_due = device
                if collectives:
                    self._finish_pending(collectives=True)
        if non_finite:
            self._skipped_steps += 1
            warnings.warn(
                f"CLARA: {non_finite} parameter tensor(s) took a NaN/inf step; they were left out of the "
                "adaptation and their paths were reset",
                RuntimeWarning,
                stacklevel=2,
            )

    def _signal(self, ratio: float, r_max: float) -> float:
        """The rule's step for log F per unit of damping: ``r / target - 1``, normalized by its range.

        With ``rule="normalized"``: ||p_k|| <= 1, so r <= r_max = moved / expected; dividing by
        ``r_max / target - 1`` (known before the step's noise, so still unbiased) makes d the change of
        log F per step when all steps agree, whatever the optimizer. While young paths fill
        (t_k < ~1/c) the bound is loose, so the signal is damped until the path has its memory: the
        tight bound ``(1 - (1-c)^t_k)^2`` climbed 10x faster and ran away on broken networks
        (benchmarks/RESULTS.md). ``target=1`` is the paper's random walk.
        """
        signal = ratio / self.target - 1.0
        if self.rule == "normalized":
            headroom = r_max / self.target - 1.0
            signal = signal / headroom if headroom > 1e-12 else 0.0
        return signal

    def _take_unit_steps(self, entries: list[tuple[int, Tensor, Tensor]], moved: Tensor, norms: Tensor) -> None:
        """Replace each realised step s by ``lr * s / ||s||`` (the paper's unit-step variant)."""
        lrs = torch.tensor([self._lr_used[j] for j, _, _ in entries], dtype=norms.dtype, device=norms.device)
        safe = torch.where(moved, norms, torch.ones_like(norms))
        scales = torch.where(moved, 1.0 - lrs / safe, torch.zeros_like(norms))
        params = [self._local(param) for _, param, _ in entries]
        steps = [step for _, _, step in entries]
        with torch.no_grad():
            # theta_after + s * (1 - lr/||s||) = theta_before - lr * u
            torch._foreach_addcmul_(
                params, steps, [s.to(p.dtype) for s, p in zip(scales.unbind(), params, strict=True)]
            )

    def _clamp_to_lr_bounds(self) -> None:
        """Keep log F where the lr bounds still bind, so that F cannot wind up past them."""
        if self.min_lr is None and self.max_lr is None:
            return
        bases = self._bases if self._bases is not None else [g["lr"] for g in self.optimizer.param_groups]
        for scope in range(len(self._log_factors)):
            members = [float(b) for j, b in enumerate(bases) if self._scope_of(j) == scope and float(b) > 0]
            if not members:
                continue
            value = self._log_factors[scope]
            if self.max_lr is not None:
                value = min(value, math.log(self.max_lr / min(members)))
            if self.min_lr is not None:
                value = max(value, math.log(self.min_lr / max(members)))
            self._log_factors[scope] = value

    # ------------------------------------------------------------------ safeguard
    @property
    def num_resyncs(self) -> int:
        """How often the rank-consistency guard found drift and re-synchronised from rank 0."""
        return 0 if self._guard is None else self._guard.resyncs

    @property
    def num_safeguard_alarms(self) -> int:
        """How often the safeguard fired (0 without a safeguard)."""
        return 0 if self.safeguard is None else self.safeguard.alarms

    def observe_loss(self, loss: float | Tensor) -> bool:
        """Feed the training loss of the last step to the safeguard; True if it raised an alarm.

        Call it after ``optimizer.step()`` with the loss that step's gradient came from (measured
        at the parameters before the step). On an alarm (a Page-Hinkley detected blow-up, or a
        NaN/inf loss) the parameters are restored from before the step that led to the bad
        loss (two steps back: the loss of step t reflects step t-1) where the delta reader keeps
        snapshots (it does with a safeguard, unless a state reader was asked for), F is halved,
        the test restarts and a warning is issued. The optimizer's own state is not rolled
        back. Reading a tensor loss costs one device-to-host copy. Without a safeguard this does
        nothing and returns False.
        """
        if self.safeguard is None:
            return False
        self._settle()
        value = float(loss.detach().float().item()) if isinstance(loss, Tensor) else float(loss)
        if not self.safeguard.update(value):
            return False
        keeps_snapshots = isinstance(self._reader, DeltaReader) and self._reader.keep_snapshots
        undone = self._reader.undo() if keeps_snapshots else 0  # type: ignore[union-attr]
        self._log_factors = [self._clamp_log_factor(v - math.log(2.0)) for v in self._log_factors]
        self.safeguard.reset()
        if undone:
            restored = f"; parameters restored from before the last {undone} step(s)"
        elif keeps_snapshots:
            restored = "; parameters already restored by the previous alarm (no step since)"
        else:
            restored = "; no snapshot to restore (use direction='auto' or 'delta' to keep one)"
        warnings.warn(
            f"CLARA safeguard: the training loss blew up ({value:.4g}); F halved to {self.lr_factor:.4g}{restored}",
            RuntimeWarning,
            stacklevel=2,
        )
        return True

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors keyed by (group index, position in group): checkpoint-safe."""
        self._sync_scopes()
        sampled = {} if self._sampled is None else self._sampled.export()
        tensors: list[list[dict[str, Any] | None]] = []
        for group in self.optimizer.param_groups:
            row: list[dict[str, Any] | None] = []
            for param in group["params"]:
                if self._sampled is not None:
                    entry = sampled.get(param)
                    shape = tuple(param.shape) if self.sharding is None else None  # a manual shard's shape is local
                    row.append(None if entry is None else {"path": entry[0], "count": entry[1], "shape": shape})
                    continue
                state = self._tensors.get(param)
                row.append(None if state is None else {"path": state.path.detach().clone(), "count": state.count})
            tensors.append(row)
        return {
            "format": _STATE_FORMAT,
            "config": {
                "rule": self.rule,
                "c": self.c,
                "d": self.d,
                "fast_start": self.fast_start,
                "hold_after": self.hold_after,
                "target": self.target,
                "scope": self.scope,
                "variant": self.variant,
                "unit_step": self.unit_step,
                "sample": self.sample,
            },
            "log_factors": list(self._log_factors),
            "ratios": list(self._ratios),
            "num_adapted_steps": self._adapted_steps,
            "num_skipped_steps": self._skipped_steps,
            "tensors": tensors,
            "safeguard": None if self.safeguard is None else self.safeguard.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore paths, counters and factors saved by :meth:`state_dict` (matched by position)."""
        self._settle()
        if not isinstance(state_dict, dict) or state_dict.get("format") not in (1, _STATE_FORMAT):
            raise ValueError("not a CLARA state dict (missing or unknown 'format')")
        saved_scope = state_dict["config"]["scope"]
        if saved_scope != self.scope:
            raise ValueError(f"state dict was saved with scope={saved_scope!r}, this controller has {self.scope!r}")
        groups = state_dict["tensors"]
        if len(groups) != len(self.optimizer.param_groups) or any(
            len(row) != len(group["params"]) for row, group in zip(groups, self.optimizer.param_groups, strict=True)
        ):
            raise ValueError("state dict does not match the optimizer's param groups (count or sizes differ)")
        saved_sample = state_dict["config"].get("sample")
        same_paths = saved_sample == self.sample
        for row, group in zip(groups, self.optimizer.param_groups, strict=True):
            for entry, param in zip(row, group["params"], strict=True):
                if entry is None or not same_paths:
                    continue
                if self._sampled is not None:
                    saved_shape = entry.get("shape")
                    if saved_shape is not None and self.sharding is None and tuple(saved_shape) != tuple(param.shape):
                        raise ValueError(
                            f"saved sampled path of a parameter of shape {tuple(saved_shape)} does not match "
                            f"parameter of shape {tuple(param.shape)}"
                        )
                    if entry["path"].numel() != self._sampled.size(param):
                        raise ValueError(
                            f"saved sampled path of {entry['path'].numel()} entries does not match the sample of "
                            f"{self._sampled.size(param)} entries of a parameter of shape {tuple(param.shape)}"
                        )
                    continue
                if self.sharding is not None:
                    break
                if tuple(entry["path"].shape) != tuple(self._local(param).shape):
                    raise ValueError(
                        f"saved path of shape {tuple(entry['path'].shape)} does not match parameter of "
                        f"shape {tuple(self._local(param).shape)}"
                    )
        self._log_factors = [float(v) for v in state_dict["log_factors"]]
        self._ratios = [None if v is None else float(v) for v in state_dict["ratios"]]
        self._adapted_steps = int(state_dict["num_adapted_steps"])
        self._skipped_steps = int(state_dict["num_skipped_steps"])
        if self.safeguard is not None and state_dict.get("safeguard") is not None:
            self.safeguard.load_state_dict(state_dict["safeguard"])
        self._tensors = {}
        if not same_paths:
            warnings.warn(
                f"CLARA: the checkpoint's paths were kept with sample={saved_sample!r}, this controller keeps "
                f"sample={self.sample!r}: the paths restart (factors and step counters are restored)",
                RuntimeWarning,
                stacklevel=2,
            )
            if self._sampled is not None:
                self._sampled.release()
            self._sync_scopes()
            return
        if self._sampled is not None:
            saved: dict[Tensor, tuple[Tensor, int]] = {}
            for row, group in zip(groups, self.optimizer.param_groups, strict=True):
                for entry, param in zip(row, group["params"], strict=True):
                    if entry is not None:
                        saved[param] = (entry["path"].detach().flatten(), int(entry["count"]))
            self._sampled.load(saved)
            self._sync_scopes()
            return
        if self.sharding is not None:
            # a checkpoint holds one rank's path shards: loading them on another rank would be
            # silently wrong, so sharded runs restore factors and counters and restart the paths
            warnings.warn(
                "CLARA: sharded parameters: the checkpoint's path shards belong to one rank, so the paths "
                "restart (factors and step counters are restored)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._sync_scopes()
            return
        for row, group in zip(groups, self.optimizer.param_groups, strict=True):
            for entry, param in zip(row, group["params"], strict=True):
                if entry is None:
                    continue
                local = self._local(param)
                path = entry["path"].to(device=local.device, dtype=path_dtype_for(local.dtype)).clone()
                self._tensors[param] = _TensorState(path, int(entry["count"]))
        self._sync_scopes()

    def __repr__(self) -> str:
        factors = ", ".join(f"{f:.4g}" for f in self.lr_factors)
        return (
            f"CLARA({type(self.optimizer).__name__}, c={self.c}, d={self.d}, fast_start={self.fast_start}, "
            f"hold_after={self.hold_after}, target={self.target}, scope={self.scope!r}, "
            f"reader={self.reader_name!r}, F=[{factors}], steps={self._adapted_steps})"
        )
