"""Two CPU ranks with gloo: sharded norm reduction and the rank-consistency guard.

Each test spawns two processes that rendezvous through a file in ``tmp_path`` (loopback only)
and write their results to files the parent compares with a single-process run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException

from lightning_clara import CLARA
from lightning_clara.distributed import RankConsistencyGuard, Sharding
from lightning_clara.options import RULE_DEFAULTS

WORLD = 2
SHAPES = [(6, 5), (7,), (1,)]  # (1,) is empty on rank 1: an empty shard must still join the reduction
STEPS = 60
SPAWN_ATTEMPTS = 3


def _gradients(step: int) -> list[torch.Tensor]:
    """The global gradients of one step: the same on every rank, a drifting signal plus noise."""
    generator = torch.Generator().manual_seed(1000 + step)
    return [0.5 + torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank r holds the r-th half of the flattened tensor (ceil split, so the last shard may be empty)."""
    flat = tensor.reshape(-1)
    size = math.ceil(flat.numel() / WORLD)
    return flat[rank * size : (rank + 1) * size].clone()


#: Sampled paths of 4 coordinates and of 64 (every entry of these tensors); the sampled step is summed
#: across shards, and the 30-entry tensor's sample straddles both shards.
SAMPLES = (4, 64)


def _single_process_trajectory(optimizer_name: str, sample: int) -> list[float]:
    params = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
    optimizer = _make_optimizer(optimizer_name, params)
    clara = CLARA(optimizer, d=0.05, sample=sample)
    out = []
    for step in range(STEPS):
        for param, grad in zip(params, _gradients(step), strict=True):
            param.grad = grad
        optimizer.step()
        out.append(clara.lr_factor)
    return out


def _make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def _init(rank: int, store: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _sharded_worker(rank: int, store: str, out_dir: str) -> None:
    _init(rank, store)
    try:
        for optimizer_name in ("sgd", "adam"):
            for sample in SAMPLES:
                _sharded_run(rank, out_dir, optimizer_name, sample)
        dist.barrier()  # leave together: no rank closes its sockets while a peer finishes a collective
    finally:
        dist.destroy_process_group()


def _sharded_run(rank: int, out_dir: str, optimizer_name: str, sample: int) -> None:
    """One rank's run: local halves of every tensor, gradients sharded the same way."""
    full_sizes = {}
    params = []
    for shape in SHAPES:
        local = _shard(torch.zeros(shape, dtype=torch.float64), rank).requires_grad_(True)
        full_sizes[id(local)] = math.prod(shape)
        params.append(local)
    optimizer = _make_optimizer(optimizer_name, params)
    offset = {id(p): rank * math.ceil(math.prod(shape) / WORLD) for p, shape in zip(params, SHAPES, strict=True)}
    sharding = Sharding(full_numel=lambda p: full_sizes[id(p)], offset=lambda p: min(offset[id(p)], full_sizes[id(p)]))
    clara = CLARA(optimizer, d=0.05, sharding=sharding, sample=sample)
    trajectory = []
    for step in range(STEPS):
        for param, grad in zip(params, _gradients(step), strict=True):
            param.grad = _shard(grad, rank)
        optimizer.step()
        trajectory.append(clara.lr_factor)
    torch.save(trajectory, Path(out_dir) / f"{optimizer_name}-{sample}-{rank}.pt")


def spawn_ranks(worker: Callable[..., None], tmp_path: Path) -> None:
    """``mp.spawn`` the WORLD ranks of ``worker(rank, store, out_dir)``.

    A rank killed by a signal (gloo aborting on a peer's closed socket, seen about once in ten full
    suite runs on a loaded 2-core machine, and once twice in a row) is retried, up to
    ``SPAWN_ATTEMPTS`` times in all, each with a fresh rendezvous file; a Python exception in a rank,
    its assertions included, is final (the same policy as tests/distributed/test_ddp.py).
    """
    for attempt in range(SPAWN_ATTEMPTS):
        try:
            mp.spawn(worker, args=(str(tmp_path / f"store{attempt}"), str(tmp_path)), nprocs=WORLD)
            return
        except ProcessExitedException as exc:
            if "signal" not in str(exc) or attempt == SPAWN_ATTEMPTS - 1:
                raise


def test_sharded_reduction_matches_single_process(tmp_path: Path) -> None:
    """Two ranks holding halves of every tensor reproduce the single-process factor trajectory."""
    spawn_ranks(_sharded_worker, tmp_path)
    for optimizer_name in ("sgd", "adam"):
        for sample in SAMPLES:
            expected = _single_process_trajectory(optimizer_name, sample)
            assert abs(math.log(expected[-1] / expected[0])) > 0.05  # the factor moved: the comparison means something
            for rank in range(WORLD):
                got = torch.load(tmp_path / f"{optimizer_name}-{sample}-{rank}.pt")
                assert got == pytest.approx(expected, rel=1e-9), (optimizer_name, sample, rank)
    assert _single_process_trajectory("adam", 4) != pytest.approx(_single_process_trajectory("adam", None), rel=1e-6)


def _guard_worker(rank: int, store: str, out_dir: str) -> None:
    _init(rank, store)
    try:
        param = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([param], lr=0.1)
        clara = CLARA(optimizer, d=0.05, consistency_check_every=5)
        factors = []
        for step in range(20):
            generator = torch.Generator().manual_seed(step)
            param.grad = torch.randn(10, generator=generator, dtype=torch.float64)
            optimizer.step()
            if rank == 1 and step == 6:
                clara._state = clara._state.with_log_factors(
                    [clara._state.log_factors[0] + 0.1]
                )  # rank-dependent drift of the factor after the 7th step
            factors.append(clara.lr_factor)
        torch.save({"factors": factors, "resyncs": clara.num_resyncs}, Path(out_dir) / f"guard{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_consistency_guard_resyncs_from_rank_zero(tmp_path: Path) -> None:
    """A drift injected on rank 1 after the 7th step is caught at the check after step 10 and undone."""
    spawn_ranks(_guard_worker, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"guard{r}.pt") for r in range(WORLD))
    assert rank0["resyncs"] == 1
    assert rank1["resyncs"] == 1
    assert rank0["factors"][:6] == rank1["factors"][:6]
    assert rank0["factors"][6] != rank1["factors"][6]  # drifted ...
    assert rank0["factors"][9:] == rank1["factors"][9:]  # ... and re-synchronised at step 10 (index 9)


def test_guard_validates_arguments() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        RankConsistencyGuard(0)
    with pytest.raises(ValueError, match="tolerance"):
        RankConsistencyGuard(5, tolerance=-1.0)
    with pytest.raises(ValueError, match="consistency_check_every"):
        CLARA(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), consistency_check_every=0)


def _fsdp2_model() -> torch.nn.Module:
    """A small float64 MLP with odd sizes, so that FSDP2's dim-0 shards are uneven (3 + 2 rows)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _fsdp2_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(8, 7, generator=generator, dtype=torch.float64),
            torch.randn(8, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(40)
    ]


#: The batch whose gradient gets one inf entry: on one rank's shard only under FSDP2.
_POISONED_BATCH = 20


def _fsdp2_trajectory(
    model: torch.nn.Module, clara_options: dict, poison_shard: bool = True
) -> tuple[list[float], CLARA]:
    """F after each of 40 Adam steps; batch ``_POISONED_BATCH`` gets an inf gradient entry (where this
    process holds it: ``poison_shard``), so that its update is skipped on every rank."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clara = CLARA(optimizer, d=0.1, **clara_options)
    out = []
    for t, (x, y) in enumerate(_fsdp2_batches()):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t == _POISONED_BATCH and poison_shard:
            grad = model[0].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = math.inf  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skip's warning
            optimizer.step()
        out.append(clara.lr_factor)
    assert clara.num_skipped_updates == 1
    return out, clara


def _fsdp2_worker(rank: int, store: str, out_dir: str) -> None:
    _init(rank, store)
    try:
        from torch.distributed.fsdp import fully_shard

        model = _fsdp2_model()
        fully_shard(model)
        # the inf entry sits in rank 1's shard only: rank 0 must skip that update too
        options = {"sharding": Sharding.for_dtensors(), "sample": 16}
        trajectory, _ = _fsdp2_trajectory(model, options, poison_shard=rank == 1)
        # no sharding given, FSDP2 applied per layer (each layer its own, equal mesh): CLARA finds it
        model = _fsdp2_model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        found, _ = _fsdp2_trajectory(model, {"sample": 16}, poison_shard=rank == 1)
        torch.save({"factors": trajectory, "found": found}, Path(out_dir) / f"fsdp{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_matches_single_process(tmp_path: Path) -> None:
    """torch's FSDP2 on 2 CPU ranks (DTensor parameters sharded on dim 0): CLARA with ``Sharding.for_dtensors()``,
    or with no sharding given (found on the DTensor parameters), reproduces the unsharded run, and an inf
    gradient entry in one rank's shard skips that update on both ranks, as it does in one process (more of
    FSDP2: tests/distributed/test_model_parallel.py)."""
    spawn_ranks(_fsdp2_worker, tmp_path)
    expected, _ = _fsdp2_trajectory(_fsdp2_model(), {"sample": 16})
    initial = RULE_DEFAULTS["normalized"]["initial_factor"]
    assert abs(math.log(expected[-1] / initial)) > 0.05  # the factor moved from where it started
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert saved["factors"] == pytest.approx(expected, rel=1e-9)
        assert saved["found"] == pytest.approx(expected, rel=1e-9)  # the sharding CLARA found itself


def test_sharded_sampled_paths_resume_exactly() -> None:
    """Sampled paths are whole on every rank (the step is summed across shards), so a checkpoint from any
    rank restores them: no restart, and the factor continues as if uninterrupted."""
    sharding = Sharding(full_numel=lambda p: p.numel(), offset=lambda p: 0)  # one process: one shard

    def gradient(step: int) -> torch.Tensor:
        return 1.0 + torch.randn(60, generator=torch.Generator().manual_seed(step), dtype=torch.float64)

    def controller() -> tuple[list[torch.Tensor], CLARA]:
        params = [torch.zeros(60, dtype=torch.float64, requires_grad=True)]
        return params, CLARA(torch.optim.SGD(params, lr=0.1), d=0.2, sharding=sharding, sample=8)

    params, clara = controller()
    factors = []
    for step in range(20):
        params[0].grad = gradient(step)
        clara.optimizer.step()
        factors.append(clara.lr_factor)
        if step == 9:
            state, saved = clara.state_dict(), params[0].detach().clone()
    fresh, restored = controller()
    with torch.no_grad():
        fresh[0].copy_(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "paths restart"
        restored.load_state_dict(state)
    resumed = []
    for step in range(10, 20):
        fresh[0].grad = gradient(step)
        restored.optimizer.step()
        resumed.append(restored.lr_factor)
    assert resumed == factors[10:]


def test_sampled_paths_on_manual_shards_need_the_offset() -> None:
    params = [torch.zeros(6, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Sharding\.offset"):
        CLARA(torch.optim.SGD(params, lr=0.1), sharding=Sharding(full_numel=lambda p: p.numel()))


def test_every_coordinate_is_refused_on_shards() -> None:
    """sample=None would sum whole parameters across the shard group every step: refused, naming the way out."""
    sharding = Sharding(full_numel=lambda p: p.numel(), offset=lambda p: 0)
    with pytest.raises(ValueError, match=r"sample=None .* sharding"):
        CLARA(torch.optim.SGD([torch.zeros(6, requires_grad=True)], lr=0.1), sharding=sharding, sample=None)
