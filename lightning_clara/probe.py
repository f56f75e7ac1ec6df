"""Probe a foreign optimizer's own update on a small simulated tensor before CLARA steers it.

CLARA can steer an optimizer only if (a) its step scales with the learning rate (CLARA moves the
lr; a relative-step Adafactor ignores it) and (b) it is element-wise up to one factor per tensor
(the null-model reference simulates each tensor's entries as independent trials; a factored
second moment or an orthogonalised update couples them). A per-tensor scalar, such as LAMB's
trust ratio or a gradient-norm clip, leaves the step's direction alone and is accepted.

The probe runs the optimizer's own class, rebuilt from the param group's settings (weight decay
off), on a 4 x 4 tensor for a few steps: twice at lr and 2 lr for (a), and twice with one
entry's gradient history changed for (b). It costs a few milliseconds, once per class and settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.reference import freeze

__all__ = ["ProbeError", "probe_update"]

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
