"""The path store: where the paths live and how one step turns into :class:`~lightning_clara.rule.StepStatistics`.

The store reads the realised step on each tensor's sample (:mod:`lightning_clara.sampling`; with
``sample=None`` the sample is the whole tensor, the paper's exact statistic), updates the paths on
their device and hands back a :class:`DeviceStep`: the per-tensor results (device tensors) and the
host function that sums them per scope. The controller moves the results to the host
(:mod:`lightning_clara.transfer`) and gives the sums to the rule. :class:`SampledPaths` is the layout:
one bucket per device and dtype (and width, for rows above 4096), rebuilt when the trainable tensors change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.admission import check_distinct, check_parameter
from lightning_clara.options import Settings
from lightning_clara.reference.cache import ReferenceCache
from lightning_clara.rule import StepStatistics
from lightning_clara.sampling import (
    DEFAULT_SAMPLE,
    SampleBucket,
    SampledTensor,
    SampleStep,
    compact_index,
    sample_indices,
    shard_sample,
)

__all__ = ["DeviceStep", "PathStore", "SampledPaths", "StepInputs", "trainable"]

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


class SampledPaths:
    """The sampled paths of one optimizer: one :class:`SampleBucket` per device and dtype.

    The layout follows the trainable tensors: when one is added, frozen or unfrozen, the buckets
    are rebuilt and every tensor still present keeps its path (a frozen one starts afresh). A row
    longer than :data:`DEFAULT_SAMPLE` (a larger ``m``, or every coordinate with ``m=None``) gets a
    bucket of its own length, so that the small tensors' rows are not padded to it.

    Args:
        m: coordinates kept per tensor; None: every coordinate (the paper's exact statistic).
        full_numel: a parameter's unsharded size.
        local: maps a parameter to this rank's data.
        offset: for sharded parameters, the flat position of this rank's data in the whole tensor;
            None when every rank holds whole tensors.
        sum_across_shards: the in-place SUM across the shard group (sharded parameters only).
        bucket: the bucket class (:class:`SampleBucket`, or a variant that reads another step).
    """

    def __init__(
        self,
        m: int | None,
        full_numel: Callable[[Tensor], int],
        local: Callable[[Tensor], Tensor],
        offset: Callable[[Tensor], int] | None = None,
        sum_across_shards: Callable[[Tensor], None] | None = None,
        bucket: type[SampleBucket] | None = None,
    ) -> None:
        self.m = m
        self._full_numel = full_numel
        self._local = local
        self._offset = offset
        self._sum_across_shards = sum_across_shards
        self._bucket = bucket or SampleBucket
        self.buckets: list[SampleBucket] = []
        self._layout_key: tuple[tuple[int, ...], ...] | None = None
        self._loaded: dict[Tensor, tuple[Tensor, int]] = {}

    def size(self, param: Tensor) -> int:
        """The sample's size for ``param``: the size of the tensor the reference simulates."""
        numel = int(self._full_numel(param))
        return numel if self.m is None else min(numel, self.m)

    def before_step(self, param_groups: Sequence[dict[str, Any]]) -> None:
        """Gather every trainable tensor's sample (relaying out first if the trainable tensors changed)."""
        key = tuple(
            (bool(group.get("maximize", False)), *(id(p) if p.requires_grad else 0 for p in group["params"]))
            for group in param_groups
        )  # cheap enough per step; the layout itself is rebuilt only when it changes (maximize: SALeRA's sign)
        if key != self._layout_key or any(bucket.moved() for bucket in self.buckets):
            members = [
                (j, i, param, bool(group.get("maximize", False)))
                for j, group in enumerate(param_groups)
                for i, param in enumerate(group["params"])
                if param.requires_grad
            ]
            for j, group in enumerate(param_groups):
                check_distinct(group["params"], j)
            for j, _, param, _ in members:
                check_parameter(param, j)  # a tensor added after attaching (add_param_group, an unfrozen layer)
            self._relayout(members)
            self._layout_key = key
        for bucket in self.buckets:
            bucket.before_step()

    def _member(self, j: int, i: int, param: Tensor, maximize: bool) -> tuple[tuple[Any, ...], SampledTensor]:
        numel = int(self._full_numel(param))
        data = self._local(param.detach())
        if self._offset is None and (self.m is None or numel <= self.m):  # every entry, in order: no indices
            member = SampledTensor(param, j, numel, None, None, maximize)
        else:
            indices = sample_indices(numel, self.m, (j, i, numel))
            held, positions = indices, None  # sharded: the entries this rank holds, and where they go
            if self._offset is not None:
                held, positions = shard_sample(indices, int(self._offset(param)), data.numel())
            member = SampledTensor(param, j, indices.numel(), compact_index(held), positions, maximize)
        width = member.length if member.length > DEFAULT_SAMPLE else 0  # a long row: a bucket of its own length
        return (data.device, data.dtype, width), member

    def _relayout(self, members: Sequence[tuple[int, int, Tensor, bool]]) -> None:
        kept = self.export()  # the paths of the old layout, or those waiting since load()
        self._loaded = {}
        grouped: dict[tuple[Any, ...], list[SampledTensor]] = {}
        for j, i, param, maximize in members:
            where, member = self._member(j, i, param, maximize)
            grouped.setdefault(where, []).append(member)
        self.buckets = [self._bucket(group, self._local, self._sum_across_shards) for group in grouped.values()]
        for bucket in self.buckets:
            bucket.load(kept)

    def update(
        self,
        c: float,
        curves: Callable[[int, int], Sequence[float]],
        keys: Sequence[int],
        lr_used: Sequence[float] = (),
    ) -> list[SampleStep]:
        """Step every bucket's paths; ``curves(group, size)`` is a group's reference curve and
        ``keys[group]`` changes whenever that curve does; ``lr_used``: per group, the lr the step ran at."""
        out = []
        for bucket in self.buckets:
            bucket_keys = tuple(keys[j] for j in bucket.group_set)  # per group, not per tensor
            if not bucket.curves_current(bucket_keys):
                bucket.set_curves(bucket_keys, [curves(member.group, member.length) for member in bucket.members])
            out.append(bucket.update(c, lr_used))
        return out

    def export(self) -> dict[Tensor, tuple[Tensor, int]]:
        """Every tensor's sampled path and count (for checkpoints and relayouts)."""
        out: dict[Tensor, tuple[Tensor, int]] = dict(self._loaded)
        for bucket in self.buckets:
            out.update(bucket.export())
        return out

    def load(self, saved: dict[Tensor, tuple[Tensor, int]]) -> None:
        """Restore sampled paths (keyed by parameter) now, and again at the next relayout."""
        self.buckets, self._layout_key = [], None
        self._loaded = dict(saved)

    def release(self) -> None:
        self.buckets, self._layout_key, self._loaded = [], None, {}

    def persistent_bytes(self) -> int:
        """Device bytes kept per tensor between steps: paths, the step and result buffers and sample indices
        (the counts and reference curves live on the host)."""
        total = 0
        for bucket in self.buckets:
            for tensor in (bucket.path, bucket._step, bucket._results, bucket._targets, *bucket._sources):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total


class PathStore:
    """The paths of one optimizer's tensors, each on a fixed sample of its coordinates.

    Args:
        settings: the controller's settings (``sample``, ``sharding``, ``scope``, ``c``).
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

    def before_step(self, optimizer: Optimizer) -> None:
        """In the pre-hook: gather the samples before the parameters change."""
        self.sampled.before_step(optimizer.param_groups)

    def reference_size(self, param: Tensor) -> int:
        """The tensor size the reference simulates for ``param``."""
        return self.sampled.size(param)

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
            tallies = [step.tally(buffer) for step, buffer in zip(steps, buffers, strict=True)]
            if not self.per_group:
                rows = tallies[0] if len(tallies) == 1 else torch.cat(tallies, dim=1)
                sums = rows.sum(dim=1, keepdim=True)
            else:
                sums = torch.zeros(4, inputs.scopes, dtype=torch.float64)
                for rows, group in zip(tallies, groups, strict=True):
                    sums.index_add_(1, group, rows)
            squared, expected, moved, finite = sums.tolist()
            return StepStatistics(squared, expected, [round(v) for v in moved], tensors - round(sum(finite)))

        return DeviceStep([step.results for step in steps], finish, buckets[0].device)

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
