"""The path store: where the paths live and how one step turns into :class:`~lightning_clara.rule.StepStatistics`.

The store reads the realised step on each tensor's sample (:mod:`lightning_clara.sampling`; with
``sample=None`` the sample is the whole tensor, the paper's exact statistic), updates the paths on
their device and hands back a :class:`DeviceStep`: the per-tensor results (device tensors) and the
host function that sums them per scope. The controller moves the results to the host
(:mod:`lightning_clara.transfer`) and gives the sums to the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.options import Settings
from lightning_clara.reference_cache import ReferenceCache
from lightning_clara.rule import StepStatistics
from lightning_clara.safeguard import RestorePoint
from lightning_clara.sampling import SampleBucket, SampledPaths

__all__ = ["DeviceStep", "PathStore", "StepInputs", "trainable"]

#: A checkpoint's per-tensor entries: per group, per position, a path record or None.
SavedTensors = list[list[dict[str, Any] | None]]


def trainable(optimizer: Optimizer) -> Iterator[Tensor]:
    """The optimizer's tensors that take gradients."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                yield param


def _pairs(saved: SavedTensors, optimizer: Optimizer) -> Iterator[tuple[dict[str, Any] | None, Tensor]]:
    """Each saved entry with the parameter at its (group, position)."""
    for row, group in zip(saved, optimizer.param_groups, strict=True):
        yield from zip(row, group["params"], strict=True)


@dataclass
class DeviceStep:
    """One step's per-tensor results on the device, and the host part that sums them per scope."""

    results: list[Tensor]
    finish: Callable[[list[Tensor]], StepStatistics]  # given the results, copied to the host
    device: torch.device


@dataclass
class StepInputs:
    """What a store needs from the controller for one step."""

    lr_used: list[float]  # per group, the lr the step ran at
    references: ReferenceCache
    scopes: int  # how many factors (1, or one per group)


class PathStore:
    """The paths of one optimizer's tensors, each on a fixed sample of its coordinates.

    Args:
        settings: the controller's settings (``sample``, ``sharding``, ``scope``, ``c``, ``safeguard``).
        bucket: the bucket class (a variant's, :mod:`lightning_clara.variants`), or the default.
    """

    def __init__(self, settings: Settings, bucket: type[SampleBucket] | None = None) -> None:
        self.settings = settings
        #: scope="param_group": group j is scope j; else every group is scope 0.
        self.per_group = settings.scope == "param_group"
        sharding = settings.sharding
        if sharding is None:
            self.sampled = SampledPaths(settings.sample, lambda p: p.numel(), lambda p: p, bucket=bucket)
        else:
            self.sampled = SampledPaths(
                settings.sample,
                sharding.full_numel,
                sharding.local,
                sharding.offset,
                sharding.sum_across_shards,
                bucket,
            )
        #: The safeguard's restore point (two parameter snapshots), or None without a safeguard.
        self.restore_point: RestorePoint | None = None
        if settings.safeguard is not None:
            self.restore_point = RestorePoint(None if sharding is None else sharding.local)

    @property
    def name(self) -> str:
        """``"sample"``, or ``"full"`` with ``sample=None`` (every coordinate)."""
        return "full" if self.settings.sample is None else "sample"

    def before_step(self, optimizer: Optimizer) -> None:
        """In the pre-hook: gather the samples (and snapshot for the safeguard) before the parameters change."""
        self.sampled.before_step(optimizer.param_groups)
        if self.restore_point is not None:
            self.restore_point.before_step(list(trainable(optimizer)))

    def reference_size(self, param: Tensor) -> int:
        """The tensor size the reference simulates for ``param``."""
        return self.sampled.size(param)

    def undo(self) -> int:
        """Restore the parameters from the safeguard's restore point; how many steps were undone."""
        return 0 if self.restore_point is None else self.restore_point.undo()

    def release(self) -> None:
        """Free the restore point (on detach); the paths stay, for ``state_dict``."""
        if self.restore_point is not None:
            self.restore_point.release()

    def step(self, optimizer: Optimizer, inputs: StepInputs) -> DeviceStep | None:
        references = [inputs.references.get(j) for j in range(len(optimizer.param_groups))]
        steps = self.sampled.update(
            self.settings.c,
            lambda j, size: references[j].curves[size],
            [reference.serial for reference in references],
            inputs.lr_used,
        )
        if not steps:
            return None
        buckets = self.sampled.buckets
        groups = [bucket.groups for bucket in buckets]
        tensors = sum(len(bucket.members) for bucket in buckets)

        def finish(buffers: list[Tensor]) -> StepStatistics:
            if not self.per_group:
                rows = buffers[0] if len(buffers) == 1 else torch.cat(buffers, dim=1)
                sums = rows.sum(dim=1, keepdim=True)
            else:
                sums = torch.zeros(4, inputs.scopes, dtype=torch.float64)
                for rows, group in zip(buffers, groups, strict=True):
                    sums.index_add_(1, group, rows)
            squared, expected, moved, finite = sums.tolist()
            return StepStatistics(squared, expected, [round(v) for v in moved], tensors - round(sum(finite)))

        return DeviceStep([step.rows for step in steps], finish, buckets[0].device)

    def export(self, optimizer: Optimizer) -> SavedTensors:
        saved = self.sampled.export()
        unsharded = self.settings.sharding is None  # a manual shard's shape is local
        out: SavedTensors = []
        for group in optimizer.param_groups:
            row: list[dict[str, Any] | None] = []
            for param in group["params"]:
                entry = saved.get(param)
                shape = tuple(param.shape) if unsharded else None
                row.append(None if entry is None else {"path": entry[0], "count": entry[1], "shape": shape})
            out.append(row)
        return out

    def check(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        for entry, param in _pairs(saved, optimizer):
            if entry is None:
                continue
            saved_shape = entry.get("shape")
            if saved_shape is not None and self.settings.sharding is None and tuple(saved_shape) != tuple(param.shape):
                raise ValueError(
                    f"saved sampled path of a parameter of shape {tuple(saved_shape)} does not match "
                    f"parameter of shape {tuple(param.shape)}"
                )
            if entry["path"].numel() != self.sampled.size(param):
                raise ValueError(
                    f"saved sampled path of {entry['path'].numel()} entries does not match the sample of "
                    f"{self.sampled.size(param)} entries of a parameter of shape {tuple(param.shape)}"
                )

    def load(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        self.sampled.load(
            {
                param: (entry["path"].detach().flatten(), int(entry["count"]))
                for entry, param in _pairs(saved, optimizer)
                if entry is not None
            }
        )

    def restart(self) -> None:
        """Drop every path (they start afresh)."""
        self.sampled.release()
