"""Path stores: where the paths live and how one step turns into :class:`~lightning_clara.rule.StepStatistics`.

A store reads the realised step, updates the paths on their device and hands back a
:class:`DeviceStep`: the per-tensor results (device tensors) and the host function that sums them
per scope. The controller moves the results to the host (:mod:`lightning_clara.transfer`) and gives
the sums to the rule. Two stores, one row each in :data:`PATH_STORES`:

* :class:`SampledPathStore` (``sample=M``, the default): each tensor's path on a fixed sample of
  coordinates (:mod:`lightning_clara.sampling`), the step gathered on it for every optimizer;
* :class:`FullPathStore` (``sample=None``): whole-tensor paths, the step from a direction reader
  (:mod:`lightning_clara.directions`), the paper's exact statistic.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.directions import DeltaReader, DirectionReader, GradientReader
from lightning_clara.options import Settings
from lightning_clara.path import path_dtype_for, update_paths, update_sharded_paths
from lightning_clara.reference_cache import ReferenceCache
from lightning_clara.rule import StepStatistics
from lightning_clara.sampling import SampledPaths
from lightning_clara.support import reader_for

__all__ = ["PATH_STORES", "DeviceStep", "FullPathStore", "PathStore", "SampledPathStore", "store_for", "trainable"]

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


class PathStore(ABC):
    """The paths of one optimizer's tensors; ``reader`` (if any) snapshots for the safeguard's restore."""

    name: str
    reader: DirectionReader | None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: scope="param_group": group j is scope j; else every group is scope 0.
        self.per_group = settings.scope == "param_group"

    def before_step(self, optimizer: Optimizer) -> None:
        """In the pre-hook: what must be read before the parameters change."""
        if self.reader is not None and self.reader.needs_snapshot:
            self.reader.before_step(list(trainable(optimizer)))

    @abstractmethod
    def step(self, optimizer: Optimizer, inputs: StepInputs) -> DeviceStep | None:
        """After the optimizer's step: update the paths; None when no tensor took part."""

    @abstractmethod
    def reference_size(self, param: Tensor) -> int:
        """The tensor size the reference simulates for ``param``."""

    @abstractmethod
    def export(self, optimizer: Optimizer) -> SavedTensors:
        """Every tensor's path for a checkpoint, by (group, position)."""

    @abstractmethod
    def check(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        """Raise ``ValueError`` if saved paths do not fit this optimizer's tensors."""

    @abstractmethod
    def load(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        """Restore checked paths."""

    @abstractmethod
    def restart(self) -> None:
        """Drop every path (they start afresh)."""

    def release(self) -> None:
        """Free the reader's buffers (on detach); the paths stay, for ``state_dict``."""
        if self.reader is not None:
            self.reader.release()

    def undo(self) -> int | None:
        """Restore the parameters from the reader's snapshots; None where no snapshots are kept."""
        if isinstance(self.reader, DeltaReader) and self.reader.keep_snapshots:
            return self.reader.undo()
        return None


class SampledPathStore(PathStore):
    """Paths on a fixed sample of each tensor's coordinates; the step is gathered on the sample."""

    name = "sample"

    def __init__(self, settings: Settings, optimizer: Optimizer) -> None:
        super().__init__(settings)
        sharding = settings.sharding
        assert settings.sample is not None
        if sharding is None:
            self.sampled = SampledPaths(settings.sample, full_numel=lambda p: p.numel(), local=lambda p: p)
        else:
            self.sampled = SampledPaths(
                settings.sample, sharding.full_numel, sharding.local, sharding.offset, sharding.sum_across_shards
            )
        # the sample gives the step; full snapshots remain only for the safeguard's restore
        view = None if sharding is None else sharding.local
        self.reader = DeltaReader(keep_snapshots=True, view=view) if settings.safeguard is not None else None

    def before_step(self, optimizer: Optimizer) -> None:
        self.sampled.before_step(optimizer.param_groups)
        super().before_step(optimizer)

    def reference_size(self, param: Tensor) -> int:
        return self.sampled.size(param)

    def step(self, optimizer: Optimizer, inputs: StepInputs) -> DeviceStep | None:
        references = [inputs.references.get(j) for j in range(len(optimizer.param_groups))]
        steps = self.sampled.update(
            self.settings.c, lambda j, size: references[j].curves[size], [reference.serial for reference in references]
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
        self.sampled.release()


@dataclass
class _TensorState:
    """What the full store keeps per parameter tensor: its path and how often the path was updated."""

    path: Tensor
    count: int = 0


class FullPathStore(PathStore):
    """Whole-tensor paths; the step comes from a direction reader (state, delta or raw gradient)."""

    def __init__(self, settings: Settings, optimizer: Optimizer) -> None:
        super().__init__(settings)
        self.tensors: dict[Tensor, _TensorState] = {}
        sharding = settings.sharding
        if settings.variant == "salera":
            self.reader = GradientReader()
            return
        needs_delta = settings.unit_step or sharding is not None
        self.reader = reader_for(optimizer, "delta" if needs_delta else settings.direction)
        keep = settings.safeguard is not None and settings.direction != "state"  # so that an alarm can restore
        if keep or sharding is not None:
            self.reader = DeltaReader(keep_snapshots=keep, view=None if sharding is None else sharding.local)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.reader.name

    def before_step(self, optimizer: Optimizer) -> None:
        reader = self.reader
        if not reader.needs_snapshot and self.settings.variant != "salera" and _has_sparse_gradients(optimizer):
            # the state readers read the gradient; a sparse one has no norm: read the realised step instead
            reader.release()
            self.reader = DeltaReader()
            warnings.warn(
                "CLARA: sparse gradients (nn.Embedding(sparse=True)?): reading the realised step from parameter "
                "snapshots (direction='delta') from now on",
                RuntimeWarning,
                stacklevel=4,
            )
        super().before_step(optimizer)

    def reference_size(self, param: Tensor) -> int:
        sharding = self.settings.sharding
        return param.numel() if sharding is None else int(sharding.full_numel(param))

    def _local(self, param: Tensor) -> Tensor:
        """The tensor holding this rank's part of ``param`` (the parameter itself unless sharded)."""
        sharding = self.settings.sharding
        return param.detach() if sharding is None else sharding.local(param.detach())

    def _state_for(self, param: Tensor) -> _TensorState:
        state = self.tensors.get(param)
        if state is None:
            local = self._local(param)
            state = _TensorState(torch.zeros(local.shape, dtype=path_dtype_for(local.dtype), device=local.device))
            self.tensors[param] = state
        return state

    def _directions(self, optimizer: Optimizer, inputs: StepInputs) -> tuple[dict[Any, list[Any]], dict[int, Any]]:
        """The directions, bucketed by (device, path dtype) so each bucket is one set of foreach kernels."""
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor, Tensor]]] = defaultdict(list)
        curves: dict[int, dict[int, list[float]]] = {}
        sharded = self.settings.sharding is not None
        for j, group in enumerate(optimizer.param_groups):
            if j < len(inputs.lr_used) and inputs.lr_used[j] == 0.0:
                continue  # nothing moved (warm-up from zero): a state reader would still see an intended step
            params = []
            for param in group["params"]:
                # sharded: every rank must take part in the reduction, even with an empty or grad-less shard
                if param.requires_grad and (param.grad is not None or sharded):
                    params.append(param)
                elif not param.requires_grad and param in self.tensors:
                    del self.tensors[param]  # frozen: when unfrozen it starts a fresh path
            if not params:
                continue
            curves[j] = inputs.references.get(j).curves
            directions = self.reader.directions(optimizer, group, params)
            for param, direction in zip(params, directions, strict=True):
                buckets[(param.device, path_dtype_for(param.dtype))].append((j, param, direction))
        return buckets, curves

    def step(self, optimizer: Optimizer, inputs: StepInputs) -> DeviceStep | None:
        buckets, curves = self._directions(optimizer, inputs)
        if not buckets:
            return None
        # path updates on device; one transfer per bucket brings the per-tensor results back
        items: list[tuple[int, Tensor]] = []
        results: list[Tensor] = []
        sharding = self.settings.sharding
        for entries in buckets.values():
            paths = [self._state_for(param).path for _, param, _ in entries]
            directions = [direction for _, _, direction in entries]
            if sharding is None:
                update = update_paths(paths, directions, self.settings.c)
            else:
                update = update_sharded_paths(paths, directions, self.settings.c, sharding.sum_across_shards)
            if self.settings.unit_step:
                self._take_unit_steps(entries, inputs.lr_used, update.moved, update.step_norms)
            results.append(torch.stack([update.squared_norms, update.moved.double(), update.non_finite.double()]))
            items.extend((j, param) for j, param, _ in entries)

        def finish(buffers: list[Tensor]) -> StepStatistics:
            return self._statistics(items, curves, torch.cat(buffers, dim=1).tolist(), inputs)

        return DeviceStep(results, finish, next(iter(buckets))[0])

    def _statistics(
        self,
        items: list[tuple[int, Tensor]],
        curves: dict[int, dict[int, list[float]]],
        host: list[list[float]],
        inputs: StepInputs,
    ) -> StepStatistics:
        """Counts and references, per scope: a NaN/inf step resets that tensor's path."""
        squared = [0.0] * inputs.scopes
        expected = [0.0] * inputs.scopes
        moved = [0] * inputs.scopes
        non_finite = 0
        for k, (j, param) in enumerate(items):
            state = self.tensors[param]
            if host[2][k]:
                non_finite += 1
                state.path.zero_()
                state.count = 0
                continue
            if not host[1][k]:
                continue
            state.count += 1
            curve = curves[j][self.reference_size(param)]
            scope = j if self.per_group else 0
            squared[scope] += host[0][k]
            expected[scope] += curve[min(state.count, len(curve) - 1)]
            moved[scope] += 1
        return StepStatistics(squared, expected, moved, non_finite)

    def _take_unit_steps(
        self, entries: list[tuple[int, Tensor, Tensor]], lr_used: list[float], moved: Tensor, norms: Tensor
    ) -> None:
        """Replace each realised step s by ``lr * s / ||s||`` (the paper's unit-step variant)."""
        lrs = torch.tensor([lr_used[j] for j, _, _ in entries], dtype=norms.dtype, device=norms.device)
        safe = torch.where(moved, norms, torch.ones_like(norms))
        scales = torch.where(moved, 1.0 - lrs / safe, torch.zeros_like(norms))
        params = [self._local(param) for _, param, _ in entries]
        steps = [step for _, _, step in entries]
        with torch.no_grad():
            # theta_after + s * (1 - lr/||s||) = theta_before - lr * u
            torch._foreach_addcmul_(
                params, steps, [s.to(p.dtype) for s, p in zip(scales.unbind(), params, strict=True)]
            )

    def export(self, optimizer: Optimizer) -> SavedTensors:
        out: SavedTensors = []
        for group in optimizer.param_groups:
            row: list[dict[str, Any] | None] = []
            for param in group["params"]:
                state = self.tensors.get(param)
                row.append(None if state is None else {"path": state.path.detach().clone(), "count": state.count})
            out.append(row)
        return out

    def check(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        if self.settings.sharding is not None:
            return  # the paths restart (load)
        for entry, param in _pairs(saved, optimizer):
            if entry is not None and tuple(entry["path"].shape) != tuple(self._local(param).shape):
                raise ValueError(
                    f"saved path of shape {tuple(entry['path'].shape)} does not match parameter of "
                    f"shape {tuple(self._local(param).shape)}"
                )

    def load(self, saved: SavedTensors, optimizer: Optimizer) -> None:
        self.tensors = {}
        if self.settings.sharding is not None:
            # a checkpoint holds one rank's path shards: loading them on another rank would be
            # silently wrong, so sharded runs restore factors and counters and restart the paths
            warnings.warn(
                "CLARA: sharded parameters: the checkpoint's path shards belong to one rank, so the paths "
                "restart (factors and step counters are restored)",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        for entry, param in _pairs(saved, optimizer):
            if entry is not None:
                local = self._local(param)
                path = entry["path"].to(device=local.device, dtype=path_dtype_for(local.dtype)).clone()
                self.tensors[param] = _TensorState(path, int(entry["count"]))

    def restart(self) -> None:
        self.tensors = {}


def _has_sparse_gradients(optimizer: Optimizer) -> bool:
    return any(param.grad is not None and param.grad.is_sparse for param in trainable(optimizer))


#: The path stores by kind: a new way to keep paths is one class and one row here.
PATH_STORES: dict[str, Callable[[Settings, Optimizer], PathStore]] = {
    "sample": SampledPathStore,
    "full": FullPathStore,
}


def store_for(settings: Settings, optimizer: Optimizer) -> PathStore:
    """The path store for these settings: sampled unless ``sample=None``."""
    return PATH_STORES["full" if settings.sample is None else "sample"](settings, optimizer)
