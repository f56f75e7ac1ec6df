"""Reductions across ranks and shards, and the rank-consistency guard.

Under DDP every rank holds the whole parameters and applies the same all-reduced update, so
paths, ratios and factors are identical without any collective: nothing here runs on the
hot path. Sharded strategies (FSDP, ZeRO) hold a slice of each tensor per rank: each rank fills
the sampled entries it holds and :class:`ShardSum` sums the sampled step across the shard group
(one collective per step, :class:`~lightning_clara.sampling.SampleBucket`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RankConsistencyGuard", "ShardSum", "Sharding", "dtensor_sharding", "is_distributed", "local_shard"]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    """Whether this process warns for all: rank 0, or the only process (every rank runs its own controllers)."""
    return not is_distributed() or dist.get_rank() == 0


class ShardSum:
    """Sum a tensor in place across the ranks of ``group`` (the shards of each parameter)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def __call__(self, tensor: Tensor) -> None:
        if is_distributed():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


@dataclass
class Sharding:
    """How the optimizer's parameters are sharded across ranks, so that CLARA can reduce norms.

    Args:
        full_numel: the unsharded number of elements of the tensor a local shard belongs to
            (the reference depends on the full size).
        sum_across_shards: in-place SUM of a small tensor across the shard group.
        local: maps a parameter to the tensor holding this rank's shard.
        offset: where this rank's shard starts in the flattened full tensor (its entries are the
            full tensor's flat entries ``offset .. offset + local.numel() - 1``), so that the sample is
            picked in global coordinates. Required by CLARA; None only for code that reads sizes.
    """

    full_numel: Callable[[Tensor], int]
    sum_across_shards: Callable[[Tensor], None] = field(default_factory=ShardSum)
    local: Callable[[Tensor], Tensor] = field(default=lambda tensor: tensor)
    offset: Callable[[Tensor], int] | None = None

    @classmethod
    def for_dtensors(cls, group: dist.ProcessGroup | None = None) -> Sharding:
        """FSDP2 (``torch.distributed.fsdp.fully_shard``) and other DTensor-sharded parameters on a
        1-D mesh: the full size is the DTensor's, the local shard ``to_local()``, and norms are
        summed over ``group`` (default: all ranks). The shards must be row blocks (``Shard(0)``,
        FSDP2's layout) for sampled paths."""
        return cls(
            full_numel=_dtensor_numel, sum_across_shards=ShardSum(group), local=local_shard, offset=_dtensor_offset
        )


def dtensor_sharding(params: Iterable[Tensor], who: str) -> Sharding | None:
    """FSDP2's sharding as the parameters show it: None when none is a DTensor, else the DTensor sharding
    over their 1-D mesh. Meshes are compared by equality: ``fully_shard`` per layer hands each layer an
    equal mesh object of its own. ``NotImplementedError`` (naming ``who``) for several or 2-D meshes."""
    meshes: list[object] = []
    for param in params:
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None and mesh not in meshes:
            meshes.append(mesh)
    if not meshes:
        return None
    if len(meshes) > 1 or any(mesh.ndim != 1 for mesh in meshes):  # type: ignore[attr-defined]
        raise NotImplementedError(
            f"{who} supports parameters sharded on one 1-D mesh (fully_shard over the data-parallel mesh); "
            "tensor-parallel or several meshes are not supported yet"
        )
    return Sharding.for_dtensors(meshes[0].get_group())  # type: ignore[attr-defined]


def _dtensor_numel(tensor: Tensor) -> int:
    return tensor.numel()  # a DTensor reports its global shape


def local_shard(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _dtensor_offset(tensor: Tensor) -> int:
    """The flat position of this rank's row block in the full tensor (``Shard(0)`` on a 1-D mesh)."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        raise TypeError(
            f"CLARA sampled paths on sharded parameters: a {type(tensor).__name__} is not a DTensor; "
            "shard every parameter"
        )
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"CLARA sampled paths need row-sharded DTensors (Shard(0) on a 1-D mesh), got {placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    return int(offset[0]) * math.prod(tensor.shape[1:]) if tensor.shape else 0


class RankConsistencyGuard:
    """Every ``every_n_steps`` adapted steps, check that all ranks hold the same log factors.

    The check broadcasts rank 0's log factors (one small collective) and compares; on a
    mismatch larger than ``tolerance`` every rank adopts rank 0's values and a warning names
    the drift. Under DDP a mismatch means the ranks' steps were not identical (e.g. a
    non-deterministic kernel or a rank-dependent branch in the training step).
    """

    def __init__(self, every_n_steps: int, tolerance: float = 0.0, group: dist.ProcessGroup | None = None) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite float >= 0, got {tolerance!r}")
        self.every_n_steps = every_n_steps
        self.tolerance = float(tolerance)
        self.group = group
        self.resyncs = 0
        #: The device of a check that came due where no collective may run (a property read): it runs
        #: at the next :meth:`run_due`, which every rank reaches.
        self._due_on: torch.device | None = None

    def due(self, adapted_steps: int) -> bool:
        """Whether the check runs after this many adapted steps (identical on every rank)."""
        return is_distributed() and adapted_steps > 0 and adapted_steps % self.every_n_steps == 0

    def mark_due(self, device: torch.device) -> None:
        """A check is due; :meth:`run_due` runs it."""
        self._due_on = device

    def run_due(self, log_factors: list[float]) -> list[float]:
        """Run a check marked due, if any (a collective: call it where every rank does)."""
        device, self._due_on = self._due_on, None
        return log_factors if device is None else self.check(log_factors, device)

    def check(self, log_factors: list[float], device: torch.device) -> list[float]:
        """Rank 0's log factors (after warning if this rank's differed)."""
        mine = torch.tensor(log_factors, dtype=torch.float64, device=device)
        reference = mine.clone()
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(reference, src=source, group=self.group)
        drift = (mine - reference).abs().max()
        dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=self.group)
        if float(drift) > self.tolerance:
            self.resyncs += 1
            warnings.warn(
                f"CLARA: learning-rate factors drifted across ranks (max |log F| difference {float(drift):.3g}); "
                "re-synchronised from rank 0. Steps differ between ranks: check for rank-dependent code or "
                "non-deterministic kernels.",
                RuntimeWarning,
                stacklevel=2,
            )
            return reference.tolist()
        return log_factors
