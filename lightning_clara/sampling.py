"""Sampled paths: CLARA's statistic on a fixed sample of at most ``m`` coordinates per tensor.

The ratio only needs, per tensor, the cosines between its recent unit steps. So each tensor
keeps its path on a fixed coordinate sample: the entries are gathered before the optimizer
step and again after it, and their difference is the realised step on the sample, whatever
the optimizer (fused, capturable, bf16, zero lr). A coordinate sample of an i.i.d. Gaussian
vector is i.i.d. Gaussian, so the null model holds exactly with the reference at the sample's
size. A step costs O(m x tensors), not O(parameters).

All tensors of one device and dtype live in one :class:`SampleBucket`: a ``(tensors, width)``
matrix with one row per tensor (rows of tensors smaller than ``width`` are zero-padded), so a
step is a fixed handful of kernels whatever the tensor count, and every per-tensor sum is a
row sum (deterministic on every device, so DDP ranks stay bit-identical).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DEFAULT_SAMPLE", "SampleBucket", "SampledTensor", "path_dtype_for", "sample_indices"]

#: Coordinates kept per tensor by default. The reference already treats every tensor above
#: 4096 entries as the same size (``reference.SIZE_CAP``); the parity study is in
#: benchmarks/RESULTS.md ("Sampled paths").
DEFAULT_SAMPLE = 4096
#: The sample is taken in runs of up to this many consecutive entries (one 64-byte cache line of
#: fp32): gathering 4096 scattered entries of a large tensor costs a cache (and TLB) miss each,
#: which grew with the tensor (12 -> 55 us per gather from 0.26M to 8M entries on the CPU), while
#: 256 runs of 16 cost the same 5 us at any size (benchmarks/RESULTS.md, "Sampled paths").
RUN_LENGTH = 16


def path_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Paths are accumulated in fp32 (fp64 for fp64 parameters): bf16 would round small EMA updates away."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_indices(numel: int, m: int | None, key: tuple[int, ...]) -> Tensor:
    """``min(numel, m)`` sorted flat indices into a tensor of ``numel`` entries (int64, CPU).

    A tensor with at most ``m`` entries (every tensor with ``m=None``) keeps all of them. A larger one
    is cut into strata of consecutive entries, one run of ``min(16, m // 64)`` consecutive entries per stratum (single
    entries for ``m < 128``, or for a tensor smaller than ``2 m``), at an offset drawn from a
    generator seeded by ``key`` (the tensor's position in the optimizer and its size): spread over
    the whole tensor (at least 64 strata), identical on every rank, after a resume and in every
    process.
    """
    if m is None or numel <= m:
        return torch.arange(numel, dtype=torch.int64)
    run = max(1, min(RUN_LENGTH, m // 64)) if numel >= 2 * m else 1
    strata = m // run
    # run lengths that add up to m (differing by at most one); with numel >= 2 m every stratum is
    # at least as wide as its run, so the runs never overlap
    lengths = torch.diff(torch.arange(strata + 1, dtype=torch.int64) * m // strata)
    bounds = torch.arange(strata + 1, dtype=torch.int64) * numel // strata
    room = bounds[1:] - bounds[:-1] - lengths + 1
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.minimum((torch.rand(strata, generator=generator, dtype=torch.float64) * room).long(), room - 1)
    starts = bounds[:-1] + offsets
    within = torch.arange(m, dtype=torch.int64) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + within


@dataclass
class SampledTensor:
    """One parameter tensor in a bucket: where its sample lies in the tensor and in its row.

    ``source`` indexes this rank's data of the tensor (flat, int32 where it fits); ``target``
    the row entries those values fill (all of ``0 .. length-1`` unless the tensor is sharded).
    """

    param: Tensor
    group: int
    length: int
    source: Tensor | None  # None: every entry, in order (a tensor with at most m entries)
    target: Tensor | None  # None: the entries 0 .. length-1 of the row
    maximize: bool = False  # the group maximizes (its gradient points the other way)


@dataclass
class SampleStep:
    """One bucket's step: the device results, and the bucket that turns them into statistics on the host."""

    bucket: SampleBucket
    results: Tensor
    """(2, tensors) in the path dtype: ||p||^2 after the update, and ||s|| of the step."""
    curves: list[Sequence[float]]  # each row's reference curve, as it was at this step

    def tally(self, host: Tensor) -> Tensor:
        """The statistics rows from ``results`` copied to the host: see :meth:`SampleBucket.tally`."""
        return self.bucket.tally(host, self.curves)


class SampleBucket:
    """The sampled paths of the tensors of one device and dtype, as one ``(tensors, width)`` matrix.

    Args:
        members: the bucket's tensors, in a fixed order.
        local: maps a parameter to this rank's data (a DTensor's local shard, or itself).
        sum_across_shards: for sharded parameters, the in-place SUM across the shard group of the
            sampled step (each rank fills the entries it holds, zeros elsewhere); None otherwise.
    """

    def __init__(
        self,
        members: Sequence[SampledTensor],
        local: Callable[[Tensor], Tensor],
        sum_across_shards: Callable[[Tensor], None] | None,
    ) -> None:
        self.members = list(members)
        self.width = max(1, max(member.length for member in self.members))
        self._local = local
        self._sum_across_shards = sum_across_shards
        first = local(self.members[0].param.detach())
        self.device, self.dtype = first.device, first.dtype
        self.path_dtype = path_dtype_for(self.dtype)
        rows = len(self.members)
        self.path = torch.zeros(rows, self.width, dtype=self.path_dtype, device=self.device)
        self.counts = [0] * rows  # steps since each path (re)started: on the host, where the tally reads them
        self._constants: tuple[float, tuple[Tensor, ...]] | None = None
        # ||p||^2 and ||s|| per row, written in place each step (read on the host before the next)
        self._results = torch.zeros(2, rows, dtype=self.path_dtype, device=self.device)
        self._squared, self._norms = self._results.unbind()
        # below this norm every entry's square underflows to a subnormal: ||s|| is off (by 30 % measured), the unit
        # step is not unit, and the path outgrows 1 (its checkpoint was refused): such a step counts as no move
        tiny = torch.finfo(self.path_dtype).tiny
        self._still_below = float(torch.tensor(math.sqrt(tiny * self.width), dtype=self.path_dtype))
        self._sources = [None if m.source is None else m.source.to(self.device) for m in self.members]
        # a sharded rank gathers only the entries it holds, which ``targets`` place in the rows
        self._targets: Tensor | None = None
        if sum_across_shards is not None:
            targets = [m.target + row * self.width for row, m in enumerate(self.members) if m.target is not None]
            self._targets = compact_index(torch.cat(targets)).to(self.device)
        self._before: Tensor | None = None
        self._step: Tensor | None = None
        self._whole_params: list[Tensor] = []
        self._whole_rows: list[Tensor] = []
        self._sampled_rows: list[tuple[Tensor, Tensor, Tensor]] = []
        if sum_across_shards is None:
            # the step is taken in place in one persistent (tensors, width) buffer: whole tensors by
            # one foreach copy / subtraction into row views shaped like them, sampled ones by index
            self._step = torch.zeros(rows, self.width, dtype=self.path_dtype, device=self.device)
            whole = [(row, m) for row, m in enumerate(self.members) if m.source is None]
            self._whole_params = [m.param for _, m in whole]
            self._whole_rows = [self._step[row, : m.length].view(m.param.shape) for row, m in whole]
            self._sampled_rows = [
                (self._step[row, : m.length], m.param, source)
                for row, (m, source) in enumerate(zip(self.members, self._sources, strict=True))
                if source is not None
            ]
        self.curves: list[Sequence[float]] = [[1.0]] * rows  # each row's reference curve (host lists)
        self._curve_keys: tuple[int, ...] | None = None
        self.groups = torch.tensor([member.group for member in self.members], dtype=torch.int64)
        self.group_set = sorted({member.group for member in self.members})

    def moved(self) -> bool:
        """Whether the tensors left this bucket's device or dtype in place (``model.to(...)``, ``.double()``)."""
        first = self._local(self.members[0].param.detach())
        return first.device != self.device or first.dtype != self.dtype

    def _gather(self) -> Tensor:
        """Sharded: the sampled entries this rank holds, concatenated (their ``targets`` place them)."""
        pieces = [
            _take(self._local(member.param.detach()), source)  # type: ignore[arg-type]
            for member, source in zip(self.members, self._sources, strict=True)
        ]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()

    def before_step(self) -> None:
        """Gather the sampled entries before the optimizer changes them."""
        with torch.no_grad():
            if self._step is None:  # sharded: this rank's entries, placed by ``targets`` after the step
                self._before = self._gather()
                return
            if self._whole_params:
                torch._foreach_copy_(self._whole_rows, self._whole_params)
            for row, param, source in self._sampled_rows:
                if param.dtype == row.dtype and param.is_contiguous():
                    torch.index_select(param.detach().view(-1), 0, source, out=row)
                else:
                    row.copy_(_take(param, source))
            self._before = self._step

    def realised_step(self, lr_used: Sequence[float] = ()) -> Tensor:
        """``theta(before) - theta(after)`` on the sample, as the ``(tensors, width)`` matrix (path dtype).

        ``lr_used`` (per group, the lr the step ran at) is for variants that do not read the parameters.
        """
        before, self._before = self._before, None
        if before is None:
            raise RuntimeError("SampleBucket: a step without the pre-step gather")
        with torch.no_grad():
            if self._step is not None:  # not sharded: ``before`` is the step buffer, filled in place
                if self._whole_params:  # in fp32 for bf16 parameters: the difference is exact there
                    torch._foreach_sub_(self._whole_rows, self._whole_params)
                for row, param, source in self._sampled_rows:
                    row.sub_(_take(param, source))
                return self._step
            after = self._gather()
            if self.dtype == self.path_dtype:
                step = before.sub_(after)
            else:  # bf16/fp16: the difference of the rounded values, exact in fp32
                step = before.to(self.path_dtype) - after.to(self.path_dtype)
            matrix = torch.zeros(len(self.members), self.width, dtype=self.path_dtype, device=self.device)
            matrix.view(-1).index_put_((self._targets,), step)
            self._sum_across_shards(matrix)  # type: ignore[misc]
            return matrix

    def set_curves(self, keys: tuple[int, ...], curves: Sequence[Sequence[float]]) -> None:
        """The reference curve of every row (its last value holds from there on); ``keys`` say when to rebuild."""
        self._curve_keys = keys
        self.curves = list(curves)

    def curves_current(self, keys: tuple[int, ...]) -> bool:
        return self._curve_keys == keys

    def _constants_for(self, c: float) -> tuple[Tensor, ...]:
        """``(1, c, 1 - c, 0)`` as 0-dim tensors of the path dtype on the device, made once per ``c``."""
        if self._constants is None or self._constants[0] != c:
            one = torch.ones((), dtype=self.path_dtype, device=self.device)
            # 1 - c rounded as ``1 - 1 * c`` in the path dtype, the decay of the paths' first form
            keep = torch.ones_like(one).sub_(one, alpha=c)
            self._constants = (c, (one, one * c, keep, torch.zeros_like(one)))
        return self._constants[1]

    def update(self, c: float, lr_used: Sequence[float] = ()) -> SampleStep:
        """``p <- (1 - c) p + c s / ||s||`` for every row whose step is finite and non-zero.

        A zero step (no gradient, zero lr), or one too small for the path dtype's squares, leaves its row
        alone; a non-finite one resets it. On the device, in ten kernels whatever the tensor count; the
        per-row bookkeeping (counts, the reference) is left to :meth:`tally`, on the host.
        """
        step = self.realised_step(lr_used)
        one, c_value, keep, zero = self._constants_for(c)
        squared, norms = self._squared, self._norms
        with torch.no_grad():
            torch.linalg.vector_norm(step, dim=1, out=norms)
            still = norms <= self._still_below  # False for NaN
            # c / ||s|| where moved, 0 where still (a step whose squares underflow adds nothing either); a NaN
            # or inf row adds NaN, zeroed below
            scale = torch.where(still, zero, torch.div(c_value, norms))
            # 1 - c where moved, 1 where still; + ||s|| * 0: NaN where ||s|| is not finite (a row of finite
            # entries whose norm overflows resets too)
            decay = torch.where(still, one, keep).addcmul_(norms, zero)
            # a non-finite row is NaN here, zeroed, so its path restarts from 0
            self.path.mul_(decay[:, None]).addcmul_(step, scale[:, None]).nan_to_num_(0.0, 0.0, 0.0)
            torch.linalg.vecdot(self.path, self.path, dim=1, out=squared)
        return SampleStep(self, self._results, self.curves)

    def tally(self, host: Tensor, curves: Sequence[Sequence[float]]) -> Tensor:
        """The ``(4, tensors)`` float64 statistics of one step from its results on the host: ||p||^2 where
        moved, the reference where moved (each row's curve at its count), moved, finite; counts advance."""
        squared, norms = host.tolist()
        counts = self.counts
        table: list[list[float]] = [[], [], [], []]
        for row, (norm, curve) in enumerate(zip(norms, curves, strict=True)):
            finite = norm < math.inf  # False for NaN too
            moved = finite and norm > self._still_below
            counts[row] = counts[row] + moved if finite else 0
            weight = float(moved)
            table[0].append(squared[row] * weight)
            table[1].append(curve[min(counts[row], len(curve) - 1)] * weight)
            table[2].append(weight)
            table[3].append(float(finite))
        return torch.tensor(table, dtype=torch.float64)

    # ------------------------------------------------------------------ checkpointing
    def export(self) -> dict[Tensor, tuple[Tensor, int]]:
        """Each tensor's sampled path (its row, unpadded) and count, keyed by parameter."""
        return {
            member.param: (self.path[row, : member.length].clone(), self.counts[row])
            for row, member in enumerate(self.members)
        }

    def load(self, saved: dict[Tensor, tuple[Tensor, int]]) -> None:
        """Take the paths of ``saved`` (as :meth:`export` gives them) for the tensors it holds."""
        for row, member in enumerate(self.members):
            entry = saved.get(member.param)
            if entry is None or entry[0].numel() != member.length:
                continue
            self.path[row, : member.length].copy_(entry[0].to(self.path.device, self.path_dtype))
            self.counts[row] = int(entry[1])


def _take(tensor: Tensor, source: Tensor) -> Tensor:
    """The entries at flat (row-major) positions ``source``, without copying a non-contiguous tensor
    (a channels-last convolution weight) whole."""
    tensor = tensor.detach()
    if tensor.is_contiguous():
        return tensor.view(-1).index_select(0, source)
    return torch.take(tensor, source.long())


def shard_sample(indices: Tensor, offset: int, local_numel: int) -> tuple[Tensor, Tensor]:
    """The entries of a global sample that a shard holds: (their local flat indices, their row positions).

    The shard holds the global flat entries ``offset .. offset + local_numel - 1``.
    """
    held = (indices >= offset) & (indices < offset + local_numel)
    positions = torch.nonzero(held).flatten()
    return indices[held] - offset, positions


def compact_index(indices: Tensor) -> Tensor:
    """int32 indices where they fit (half the memory; ``index_select`` takes them), else int64."""
    if indices.numel() == 0 or int(indices.max()) < 2**31 - 1:
        return indices.to(torch.int32)
    return indices
