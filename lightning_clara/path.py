"""Path buffers and the ratio statistic: the CLARA rule in plain torch, on whole tensor lists.

Everything here stays on the tensors' device; nothing reads a value back to the host, so
one adaptation step costs a handful of ``torch._foreach_*`` kernels and no synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PathUpdate", "fold_interval", "path_dtype_for", "update_paths", "update_sharded_paths"]

#: A stored path is folded before its scale falls below this: ``||q|| <= 1 / scale`` stays small
#: enough that the sum of its squares cannot overflow fp32 accumulation.
SMALLEST_SCALE = 1e-8


def fold_interval(c: float) -> int:
    """How many updates a stored path may take between folds: the largest K with ``(1 - c)^K >= 1e-8``."""
    decay = 1.0 - c
    if decay <= SMALLEST_SCALE:
        return 1
    interval = max(1, int(math.log(SMALLEST_SCALE) / math.log(decay)))
    while interval > 1 and decay**interval < SMALLEST_SCALE:  # log rounding, e.g. at decay = 0.1
        interval -= 1
    return interval


def path_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Paths are accumulated in fp32 (fp64 for fp64 parameters): bf16 would round small EMA updates away."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class PathUpdate:
    """Per-tensor results of one path update (all 1-D tensors on the paths' device)."""

    moved: Tensor
    """True where the tensor's step was finite and non-zero, i.e. where its path was updated."""
    non_finite: Tensor
    """True where the step had a NaN or inf entry: that path is poisoned and must be reset by the caller."""
    squared_norms: Tensor
    """||p_k||^2 after the update (fp64)."""
    step_norms: Tensor
    """||s_k|| of the directions (path dtype)."""
    scales: Tensor
    """The new scale of every stored path (fp64): the path is ``scales[k] * paths[k]``."""


def update_paths(
    paths: Sequence[Tensor], scales: Tensor, directions: Sequence[Tensor], c: float, fold: Sequence[bool]
) -> PathUpdate:
    """Apply ``p_k <- (1 - c) p_k + c s_k / ||s_k||`` to every tensor that moved.

    Each path is stored lazily scaled, ``p_k = scales[k] * paths[k]``, so that the decay costs
    no pass over the tensor: ``scale <- (1 - c) scale`` and ``q += (c / (||s|| scale)) s``, one
    ``addcmul`` pass. Where ``fold[k]`` (decided on the host, every :func:`fold_interval` updates)
    the scale is first multiplied into the stored tensor and reset to 1, which keeps
    ``||q|| <= 1 / scale`` bounded. Pass the returned ``scales`` next time; a fresh path is zeros
    with scale 1. Callers must fold a path at least every :func:`fold_interval` updates (every
    update when ``1 - c <= 1e-8``: there the scale would vanish, so this function folds itself).

    ``directions[k]`` only has to be *proportional* to the realised step of tensor k (any
    positive scale): the update uses its unit vector. A zero direction leaves ``paths[k]``
    unchanged. A non-finite direction poisons ``paths[k]``; it is reported in ``non_finite``
    (and excluded from ``squared_norms``) so that the caller can reset that path, which needs
    the host and is therefore left to the rare step where it happens. All paths must share
    one device and dtype.
    """
    directions = _in_path_dtype(paths, directions)
    norms = torch.stack(torch._foreach_norm(directions))
    finite = torch.isfinite(norms)
    moved = finite & (norms > 0)
    new_scales = _step_paths(paths, scales, directions, moved, norms, c, fold)
    squared = (torch.stack(torch._foreach_norm(paths)).double() * new_scales).pow(2)
    squared = torch.where(finite, squared, torch.zeros_like(squared))
    return PathUpdate(moved=moved, non_finite=~finite, squared_norms=squared, step_norms=norms, scales=new_scales)


def update_sharded_paths(
    paths: Sequence[Tensor],
    scales: Tensor,
    directions: Sequence[Tensor],
    c: float,
    fold: Sequence[bool],
    sum_across_shards: Callable[[Tensor], None],
) -> PathUpdate:
    """:func:`update_paths` for tensors sharded across ranks: each rank passes its local shards.

    Norms are partial sums, so every rank packs, per tensor, its local ``||s||^2``,
    ``||q||^2`` and ``q . s`` of the stored path into one vector that ``sum_across_shards``
    reduces in place (one small collective per step, also on a rank whose shards are empty).
    The new squared path length then follows without a second collective: with
    ``p = scale * q``, ``||p'||^2 = (1-c)^2 ||p||^2 + 2 (1-c) c (p . s) / ||s|| + c^2``. The
    scales and folds are the same on every rank (they follow the reduced norms and the counts).
    """
    directions = _in_path_dtype(paths, directions)
    local = torch.stack(
        [
            torch.stack(torch._foreach_norm(directions)).double().pow(2),
            torch.stack(torch._foreach_norm(paths)).double().pow(2),
            torch.stack(
                [torch.dot(p.flatten().double(), d.flatten().double()) for p, d in zip(paths, directions, strict=True)]
            ),
        ]
    )
    sum_across_shards(local)
    step_squared, stored_squared, stored_dot = local.unbind()
    path_squared, dot = stored_squared * scales.pow(2), stored_dot * scales
    norms = step_squared.sqrt()
    finite = torch.isfinite(norms) & torch.isfinite(dot)
    moved = finite & (norms > 0)
    safe_norms = torch.where(moved, norms, torch.ones_like(norms))
    a = 1.0 - c
    squared = torch.where(moved, a * a * path_squared + 2.0 * a * c * dot / safe_norms + c * c, path_squared)
    squared = torch.where(finite, squared, torch.zeros_like(squared))
    norms = norms.to(paths[0].dtype)
    new_scales = _step_paths(paths, scales, directions, moved, norms, c, fold)
    return PathUpdate(moved=moved, non_finite=~finite, squared_norms=squared, step_norms=norms, scales=new_scales)


def _in_path_dtype(paths: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
    dtype = paths[0].dtype
    return [d if d.dtype == dtype else d.to(dtype) for d in directions]


def _step_paths(
    paths: Sequence[Tensor],
    scales: Tensor,
    directions: Sequence[Tensor],
    moved: Tensor,
    norms: Tensor,
    c: float,
    fold: Sequence[bool],
) -> Tensor:
    """``q <- q + (c / (||s|| scale')) s`` in place where ``moved``, after folding where ``fold``.

    ``scale' = (1 - c) scale`` where moved (else unchanged); a folded path first takes
    ``q <- scale' q`` and ``scale' = 1``. Returns the new scales.
    """
    decayed = torch.where(moved, scales * (1.0 - c), scales)
    if fold_interval(c) == 1:
        fold = [True] * len(paths)
    folded = [k for k, due in enumerate(fold) if due]
    new_scales = decayed
    if folded:
        factors = decayed.to(paths[0].dtype).unbind()
        torch._foreach_mul_([paths[k] for k in folded], [factors[k] for k in folded])
        one = torch.ones((), dtype=decayed.dtype, device=decayed.device)
        new_scales = torch.stack([one if due else part for due, part in zip(fold, decayed.unbind(), strict=True)])
    safe = torch.where(moved, norms.double() * new_scales, torch.ones_like(new_scales))
    gains = torch.where(moved, c / safe, torch.zeros_like(new_scales))
    torch._foreach_addcmul_(paths, directions, list(gains.to(paths[0].dtype).unbind()))
    return new_scales
