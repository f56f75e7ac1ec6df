"""Admission: which optimizers CLARA takes, and why it refuses the others.

Known optimizers are accepted or refused by name (:data:`UNSUPPORTED`, :data:`FOREIGN_UNSUPPORTED`);
a foreign one (defined outside ``torch.optim``) is probed. CLARA can steer an optimizer only if
(a) its step scales with the learning rate (CLARA moves the lr; a relative-step Adafactor ignores
it) and (b) it is element-wise up to one factor per tensor (the null-model reference simulates each
tensor's entries as independent trials; a factored second moment or an orthogonalised update
couples them). A per-tensor scalar, such as LAMB's trust ratio or a gradient-norm clip, leaves the
step's direction alone and is accepted.

The probe runs the optimizer's own class, rebuilt from the param group's settings (weight decay
off), on a 4 x 4 tensor for a few steps: twice at lr and 2 lr for (a), and twice with one
entry's gradient history changed for (b). It costs a few milliseconds, once per class and settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.distributed import is_rank_zero
from lightning_clara.lr_swap import check_own_lr_tensors
from lightning_clara.reference.cache import GroupReference
from lightning_clara.reference.curves import freeze
from lightning_clara.reference.families import simulation_kwargs, torch_class
from lightning_clara.reference.monte_carlo import simulation_hyperparameters
from lightning_clara.rule import Schedule, signal

__all__ = [
    "FOREIGN_UNSUPPORTED",
    "SUPPORTED_OPTIMIZERS",
    "UNSUPPORTED",
    "ProbeError",
    "check_attachable",
    "check_distinct",
    "check_null_drift",
    "check_parameter",
    "check_supported",
    "probe_update",
    "unwrap",
]

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

#: Optimizers of other libraries CLARA refuses, by a fragment of their class name, with the reason
#: (those the probe would also refuse get a more specific message here).
FOREIGN_UNSUPPORTED: dict[str, str] = {
    "ScheduleFree": (
        "its realised step interpolates between the averaged iterate and the base sequence with a weight "
        "that falls as 1/t, so the steps' null model is not stationary and CLARA's reference cannot be "
        "calibrated (measured: r 0.5 falling to 0.4 on pure noise); schedule-free replaces the schedule "
        "itself: use it without CLARA"
    ),
    "SophiaH": "it needs Hessian-vector products of the loss (backward with create_graph=True), "
    "which CLARA's gradient-only null-model simulation cannot provide",
    "Shampoo": "its preconditioner couples the entries of a matrix (not element-wise)",
    "SOAP": "its preconditioner couples the entries of a matrix (not element-wise)",
}


def _step_is_hooked(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` runs torch's step hooks (``Optimizer.__init__`` patches it)."""
    return bool(getattr(type(optimizer).step, "hooked", False))


#: Wrappers that step the optimizer they wrap and then move the weights themselves: CLARA steers the
#: wrapped optimizer (its lr, its realised steps); the wrapper's own move (Lookahead's pull-back to
#: the slow weights every k steps) is not a step of the optimizer and stays outside the path.
STEERED_THROUGH: tuple[str, ...] = ("Lookahead",)


def unwrap(optimizer: Optimizer) -> Optimizer:
    """The optimizer CLARA hooks: the wrapped one for a wrapper that overrides ``step`` without hooks
    (Lightning Fabric's ``_FabricOptimizer``, whose ``step`` ends in the wrapped optimizer's) or one
    of :data:`STEERED_THROUGH` (pytorch-optimizer's ``Lookahead``); the optimizer itself otherwise."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, Optimizer) or inner is optimizer:
        return optimizer
    if not _step_is_hooked(optimizer) or type(optimizer).__name__ in STEERED_THROUGH:
        return unwrap(inner)
    return optimizer


def _refusal(optimizer: Optimizer) -> str | None:
    """The reason CLARA refuses an optimizer known by name, or None."""
    torch_name, own_name = torch_class(optimizer), type(optimizer).__name__
    for name in (torch_name, own_name):
        if name in UNSUPPORTED:
            return UNSUPPORTED[name]
    for fragment, reason in FOREIGN_UNSUPPORTED.items():
        if fragment in own_name:
            return reason
    return None


def check_supported(optimizer: Any) -> None:
    """Raise ``TypeError`` with the reason if CLARA cannot adapt ``optimizer``.

    Known optimizers are accepted or refused by name; a foreign one (defined outside ``torch.optim``)
    is probed: its own update, run on a small simulated tensor, must scale with the lr and be
    element-wise (:func:`probe_update`).
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    reason = _refusal(optimizer)
    if reason is not None:
        supported = ", ".join(SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"CLARA does not support {type(optimizer).__module__}.{type(optimizer).__name__}: {reason}. "
            f"Supported: {supported}, and element-wise optimizers that scale with the lr (README)."
        )
    if not _step_is_hooked(optimizer):
        raise TypeError(
            f"{type(optimizer).__name__}.step cannot be hooked (torch step hooks are missing); "
            "call torch.optim.Optimizer.__init__ in its constructor"
        )
    for j, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise TypeError(
                f"CLARA cannot steer {type(optimizer).__name__}: param group {j} has lr={lr!r}; CLARA scales a "
                "numeric lr" + (" (an optimizer given lr=None computes its own step size)" if lr is None else "")
            )
        check_distinct(group["params"], j)
        for param in group["params"]:
            if param.requires_grad:  # as the path layout does: a frozen tensor is never tracked
                check_parameter(param, j)
    if torch_class(optimizer) is None:
        optimizer_class = type(optimizer)
        for group in optimizer.param_groups:
            settings = simulation_hyperparameters(simulation_kwargs(optimizer, optimizer_class, group))
            probe_update(optimizer_class, settings)


def check_attachable(optimizer: Optimizer, scope: str) -> None:
    """Refuse a second controller on one optimizer, and per-group factors over one shared lr tensor."""
    if getattr(optimizer, "_clara_controller", None) is not None:
        raise RuntimeError("this optimizer already has a CLARA controller attached; detach() it first")
    if scope == "param_group":
        check_own_lr_tensors(optimizer.param_groups)


#: The share of its full rate at which the normalized rule may raise F on pure noise (r = 1) before
#: attaching warns. At c = 0.02 torch's default settings sit at 0.003-0.08 and momentum (or Adam's beta1) 0.95 at
#: 0.15-0.2, but 0.99 at 0.35 (it correlates steps over 100 steps, the path remembers 50); the paper's c = 0.2
#: gives Adam 0.39-0.49.
NULL_DRIFT_WARNING = 0.25


def check_null_drift(
    schedule: Schedule,
    scope: str,
    optimizer: Optimizer,
    references: Sequence[GroupReference],
    reference_size: Callable[[Tensor], int],
) -> None:
    """Refuse a target the ratio can never pass, and warn where the normalized rule would climb on pure noise.

    ``r_max`` (per scope, once paths are old: tensors / sum of the references' stationary values)
    shrinks towards 1 as ``c`` grows (at ``c = 1`` the path is the unit step: r is 1 whatever the
    steps). A target at or above it leaves F no way up, silently (the normalized rule, which divides
    by ``r_max / target - 1``, not even a way down). A range small against ``1 / target - 1`` makes a
    random walk (r = 1) raise F at a large share of the agreeing steps' rate (the paper's rule is flat
    there at its target 1).
    """
    pooled: list[list[float]] = [[]] if scope == "optimizer" else [[] for _ in references]
    for j, (group, reference) in enumerate(zip(optimizer.param_groups, references, strict=True)):
        sizes = [reference_size(p) for p in group["params"] if p.requires_grad]
        pooled[0 if scope == "optimizer" else j] += [reference.curves[n][-1] for n in sizes if n > 0]
    for k, stationary in enumerate(pooled):
        if not stationary or sum(stationary) <= 0.0:
            continue  # nothing to track in this scope (or a custom reference of zeros, which never adapts)
        r_max = len(stationary) / sum(stationary)
        where = "" if scope == "optimizer" else f" (param group {k})"
        if r_max / schedule.target - 1.0 <= 1e-12:
            raise ValueError(
                f"CLARA: target {schedule.target:g} is at or above the largest ratio the steps can reach{where}, "
                f"r_max = {r_max:.4g} (c too large for this optimizer): F could never rise; lower c or target"
            )
        if schedule.rule != "normalized":
            continue
        drift = signal(schedule, 1.0, r_max)
        if drift > NULL_DRIFT_WARNING and is_rank_zero():
            warnings.warn(
                f"CLARA: the largest ratio the steps can reach is r_max = {r_max:.3g}{where} (target "
                f"{schedule.target:g}): on pure noise (r = 1) the normalized rule raises F at {drift:.0%} of its full "
                "rate. r_max falls towards 1 as the path's memory 1/c shortens against the optimizer's own (momentum "
                "beta correlates steps over ~1/(1 - beta)): set target=1 (no rise on noise), use rule='paper', or "
                "lower c well below 1 - beta (its reference takes longer to compute at attach)",
                UserWarning,
                stacklevel=3,
            )


def check_distinct(params: Sequence[Tensor], group: int) -> None:
    """Refuse a group that lists one tensor twice (torch warns and deprecates it): its two paths, sampled at
    different entries, would be saved under one key, and a resume would load one row's path into both."""
    if len({id(param) for param in params}) != len(params):
        raise ValueError(f"CLARA: param group {group} lists a tensor more than once; list each tensor once")


def check_parameter(param: Tensor, group: int) -> None:
    """Raise ``TypeError`` for a trainable tensor CLARA cannot track: complex, sparse, or one of FSDP1's flat
    parameters (checked at attach, and whenever the trainable tensors change: added or unfrozen later)."""
    kind = "complex" if param.is_complex() else "sparse" if param.is_sparse else None
    if kind is not None:
        raise TypeError(f"CLARA does not support {kind} parameters (param group {group})")
    if getattr(param, "_fsdp_flattened", False):  # FSDP1 marks its flat parameters and the originals
        raise TypeError(
            f"CLARA does not support FSDP1 (FullyShardedDataParallel) parameters (param group {group}): each rank "
            "holds a flat shard it would adapt on its own; shard with FSDP2 (torch.distributed.fsdp.fully_shard)"
        )


_SHAPE = (4, 4)
_STEPS = 6
#: Relative tolerance of the lr-scaling check (the probe's weights dominate LAMB's trust ratio).
_SCALE_TOLERANCE = 1e-2
#: 1 - cos between the other entries' steps, above which one entry's history changed them.
_COUPLING_TOLERANCE = 1e-6


class ProbeError(TypeError):
    """The optimizer cannot be steered by CLARA; the message says why."""


#: (class, frozen settings, build) of the optimizers that passed: probed once per process.
_PASSED: set[tuple[Any, ...]] = set()


def probe_update(
    optimizer_class: type[Optimizer], settings: Mapping[str, Any], build: Callable[..., Optimizer] | None = None
) -> None:
    """Raise :class:`ProbeError` if the update does not scale with lr or is not element-wise.

    ``settings`` are the param group's constructor settings without ``params`` (lr included);
    ``build(params, **settings)`` constructs the optimizer (default: the class itself).
    """
    key: tuple[Any, ...] | None = (optimizer_class, freeze(dict(settings)), build)
    try:
        if key in _PASSED:
            return
    except TypeError:  # a setting freeze cannot make hashable (a set): probe every time, it is cheap
        key = None
    _probe(optimizer_class, dict(settings), build)
    if key is not None:
        _PASSED.add(key)


def _probe(optimizer_class: type[Optimizer], kwargs: dict[str, Any], build: Callable[..., Optimizer] | None) -> None:
    name = optimizer_class.__name__
    lr = kwargs.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ProbeError(
            f"CLARA cannot steer {name}: its param group has lr={lr!r}, and CLARA scales a positive lr"
            + (" (with lr=None it computes its own relative step size)" if lr is None else "")
        )
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(_SHAPE, generator=generator, dtype=torch.float64)
    gradients = [torch.randn(_SHAPE, generator=generator, dtype=torch.float64) for _ in range(_STEPS)]
    changed = [g.clone() for g in gradients]
    for g in changed:
        g[0, 0] = 3.0 * g[0, 0] + 1.0

    def steps(lr: float, history: list[Tensor]) -> list[Tensor]:
        param = torch.nn.Parameter(start.clone())
        try:
            optimizer = (build or optimizer_class)([param], **{**kwargs, "lr": lr})
            train = getattr(optimizer, "train", None)
            if callable(train):
                train()
            out = []
            for gradient in history:
                before = param.detach().clone()
                param.grad = gradient.clone()
                optimizer.step()
                out.append(param.detach() - before)
        except Exception as error:  # a foreign optimizer may fail in any way: name it
            raise ProbeError(
                f"CLARA cannot steer {name}: its update could not be simulated on a plain tensor with gradients "
                f"only ({type(error).__name__}: {error}). CLARA calibrates its null model by running the "
                "optimizer's own step on simulated gradients"
            ) from error
        return out

    base, doubled, other = steps(lr, gradients), steps(2.0 * lr, gradients), steps(lr, changed)
    moved = [k for k, s in enumerate(base) if bool(s.abs().sum() > 0)]
    if not moved:
        raise ProbeError(f"CLARA cannot steer {name}: its step did not move a simulated tensor in {_STEPS} steps")
    for k in moved:
        scale = float(torch.linalg.vector_norm(doubled[k]) / torch.linalg.vector_norm(base[k]))
        if abs(scale / 2.0 - 1.0) > _SCALE_TOLERANCE:
            raise ProbeError(
                f"CLARA cannot steer {name}: its step does not scale with the learning rate (doubling lr scaled "
                f"the step by {scale:.3g}), so the lr CLARA sets would not be the step it takes"
            )
    mask = torch.ones(_SHAPE, dtype=torch.bool)
    mask[0, 0] = False
    for k in moved:
        a, b = base[k][mask], other[k][mask]
        cosine = float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(1e-300))
        if 1.0 - cosine > _COUPLING_TOLERANCE:
            raise ProbeError(
                f"CLARA cannot steer {name}: it is not element-wise (changing one entry's gradients changed the "
                "direction of the other entries' steps: a factored or matrix-wise update), while CLARA's null "
                "model treats the entries of a tensor as independent"
            )
