"""FSDP2 through Lightning's ModelParallelStrategy on 2 CPU ranks (gloo): CLARA on DTensor shards.

The fit runs in a subprocess (this file is also its driver: ``python test_model_parallel.py OUT``)
with a timeout, so a deadlock fails the test instead of blocking the suite. Each rank records
the learning rate its optimizer actually used at every step; the parent compares them with a
single-process fit over the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_clara import CLARACallback

STEPS_PER_EPOCH, EPOCHS, GLOBAL_BATCH, WORLD = 8, 3, 16, 2
#: Coordinates per sampled path: smaller than three of the four tensors, so the sample (chosen in
#: global coordinates) straddles the shards.
SAMPLE = 4


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS_PER_EPOCH * GLOBAL_BATCH, 7, generator=generator, dtype=torch.float64)
    w = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.tanh(x @ w))


class Regression(L.LightningModule):
    """A float64 MLP with odd sizes (uneven dim-0 shards); ``shard`` applies FSDP2 in configure_model."""

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:  # per layer, then the whole, as FSDP2 is usually applied: each call
                if any(True for _ in layer.parameters()):  # takes its own (equal) mesh object
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # in order, interleaved across ranks: one sharded step sees the same 16 samples as one
        # single-process step, and FSDP2's averaged gradient equals the 16-sample mean
        data = dataset()
        if not self.shard:
            return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler)


class Recorder(L.Callback):
    """Registers a step pre-hook after CLARA's, so it sees the lr the step really uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.paths: list[list[float]] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The sampled paths, read before CLARACallback detaches (and frees them) at the fit's end."""
        (callback,) = (c for c in trainer.callbacks if isinstance(c, CLARACallback))
        self.paths = [path.tolist() for path, _ in callback.controllers[0].paths.sampled.export().values()]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_pre_hook(lambda opt, *_: self.lrs.append(float(opt.param_groups[0]["lr"])))


def fit(shard: bool) -> tuple[Recorder, CLARACallback, L.Trainer]:
    recorder, callback = Recorder(), CLARACallback(d=0.2, sample=SAMPLE, safeguard=True)  # and the loss brake
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        devices = WORLD
    else:
        strategy, devices = "auto", 1
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=EPOCHS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, recorder], use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(Regression(shard))
    return recorder, callback, trainer


def driver(out: Path) -> None:
    recorder, callback, trainer = fit(shard=True)
    controller = callback.controllers[0]
    record = {
        "lrs": recorder.lrs,
        "factor": controller.lr_factor,
        "steps": controller.num_adapted_steps,
        "paths": recorder.paths,
        "safeguard": controller.safeguard.state_dict() if controller.safeguard is not None else None,
        "loss_trend": controller.state_dict()["loss_trend"],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("model_parallel")
    tests_dir = str(Path(__file__).resolve().parents[1])  # the shared helpers, for the script run
    python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        [sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=240, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_every_rank_uses_the_single_process_learning_rates(sharded_run: list[dict[str, Any]]) -> None:
    """Identical lr on both ranks at every step, equal to the unsharded run's within 1e-9."""
    recorder, callback, _ = fit(shard=False)
    expected = recorder.lrs
    assert len(expected) == STEPS_PER_EPOCH * EPOCHS
    assert max(expected) / min(expected) > 1.2  # the lr really moved
    rank0, rank1 = sharded_run
    assert rank0["lrs"] == rank1["lrs"]
    assert rank0["lrs"] == pytest.approx(expected, rel=1e-9)
    assert rank0["factor"] == pytest.approx(callback.controllers[0].lr_factor, rel=1e-9)
    assert rank0["steps"] == rank1["steps"] == STEPS_PER_EPOCH * EPOCHS


def test_the_safeguard_sees_the_same_global_loss_on_every_rank(sharded_run: list[dict[str, Any]]) -> None:
    """Each rank's shard of the batch has its own loss; the callback feeds the mean over ranks, which is
    the single-process loss of the whole batch, so the detector's statistics agree across ranks and with it."""
    _, callback, _ = fit(shard=False)
    single = callback.controllers[0].safeguard
    assert single is not None
    rank0, rank1 = sharded_run
    assert rank0["safeguard"]["count"] == rank1["safeguard"]["count"] == STEPS_PER_EPOCH * EPOCHS
    for key in ("mean", "variance", "excess"):
        assert rank0["safeguard"][key] == rank1["safeguard"][key]
        assert rank0["safeguard"][key] == pytest.approx(getattr(single, key), rel=1e-9, abs=1e-12)
    # the loss brake reads the same global loss: one trend on every rank, the single process's
    trend = callback.controllers[0].state_dict()["loss_trend"]
    assert rank0["loss_trend"] == rank1["loss_trend"]
    assert rank0["loss_trend"] == pytest.approx(trend, rel=1e-9, abs=1e-12)


def test_every_rank_holds_the_single_process_sampled_paths(sharded_run: list[dict[str, Any]]) -> None:
    """Each rank gathers the sample's entries of its shard; the summed step gives every rank the whole
    sampled path, the same as the unsharded run's (so a checkpoint from any rank resumes exactly)."""
    recorder, _, _ = fit(shard=False)
    single = recorder.paths
    rank0, rank1 = sharded_run
    assert [len(p) for p in single] == [min(p.numel(), SAMPLE) for p in Regression(shard=False).parameters()]
    assert rank0["paths"] == rank1["paths"]
    for got, want in zip(rank0["paths"], single, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


if __name__ == "__main__":
    driver(Path(sys.argv[1]))
