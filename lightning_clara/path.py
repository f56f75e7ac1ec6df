"""Path buffers and the ratio statistic: the CLARA rule in plain torch, on whole tensor lists.

Everything here stays on the tensors' device; nothing reads a value back to the host, so
one adaptation step costs a handful of ``torch._foreach_*`` kernels and no synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PathUpdate", "path_dtype_for", "update_paths", "update_sharded_paths"]


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


def update_paths(paths: Sequence[Tensor], directions: Sequence[Tensor], c: float) -> PathUpdate:
    """Apply ``p_k <- (1 - c) p_k + c s_k / ||s_k||`` in place to every tensor that moved.

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
    _step_paths(paths, directions, moved, norms, c)
    squared = torch.stack(torch._foreach_norm(paths)).double().pow(2)
    squared = torch.where(finite, squared, torch.zeros_like(squared))
    return PathUpdate(moved=moved, non_finite=~finite, squared_norms=squared, step_norms=norms)


def update_sharded_paths(
    paths: Sequence[Tensor], directions: Sequence[Tensor], c: float, sum_across_shards: Callable[[Tensor], None]
) -> PathUpdate:
    """:func:`update_paths` for tensors sharded across ranks: each rank passes its local shards.

    Norms are partial sums, so every rank packs, per tensor, its local ``||s||^2``,
    ``||p||^2`` and ``p . s`` into one vector that ``sum_across_shards`` reduces in place (one
    small collective per step, also on a rank whose shards are empty). The new squared path
    length then follows without a second collective:
    ``||p'||^2 = (1-c)^2 ||p||^2 + 2 (1-c) c (p . s) / ||s|| + c^2``.
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
    step_squared, path_squared, dot = local.unbind()
    norms = step_squared.sqrt()
    finite = torch.isfinite(norms) & torch.isfinite(dot)
    moved = finite & (norms > 0)
    safe_norms = torch.where(moved, norms, torch.ones_like(norms))
    a = 1.0 - c
    squared = torch.where(moved, a * a * path_squared + 2.0 * a * c * dot / safe_norms + c * c, path_squared)
    squared = torch.where(finite, squared, torch.zeros_like(squared))
    norms = norms.to(paths[0].dtype)
    _step_paths(paths, directions, moved, norms, c)
    return PathUpdate(moved=moved, non_finite=~finite, squared_norms=squared, step_norms=norms)


def _in_path_dtype(paths: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
    dtype = paths[0].dtype
    return [d if d.dtype == dtype else d.to(dtype) for d in directions]


def _step_paths(paths: Sequence[Tensor], directions: Sequence[Tensor], moved: Tensor, norms: Tensor, c: float) -> None:
    """``p <- (1 - c) p + (c / ||s||) s`` in place where ``moved``; other paths keep their value."""
    safe_norms = torch.where(moved, norms, torch.ones_like(norms))
    scales = torch.where(moved, c / safe_norms, torch.zeros_like(norms))
    decays = torch.where(moved, torch.full_like(norms, 1.0 - c), torch.ones_like(norms))
    torch._foreach_mul_(paths, list(decays.unbind()))
    torch._foreach_addcmul_(paths, directions, list(scales.unbind()))
