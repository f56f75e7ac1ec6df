"""Exact resume of ``CLARACallback`` from mid-epoch checkpoints, and what its checkpoint state looks like.

A resumed fit must continue the learning-rate trajectory of the uninterrupted run exactly (float64, CPU,
same seed). That is only meaningful if the resumed run also sees the same batches: Lightning restores the
data position only for *stateful* train iterables (``state_dict``/``load_state_dict``, saved by the fit
loop under ``combined_loader``), and it does not prefetch from sized ones, so ``StatefulBatches`` below
hands out exactly the batches consumed before a checkpoint taken in ``on_train_batch_end``. The tests also
check that the resumed run was served the same batch sequence, so the data side is verified, not assumed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import LR, LRRecorder, clara_state, make_trainer, max_relative_error, sgd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from reference_loop import SimpleCLARA, plain_sgd_mu, sgd_step
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import TensorDataset

from lightning_clara import CLARA, CLARACallback

C, D = 0.2, 0.05
BATCH = 8
EPOCHS = 2
EVERY = 5  # checkpoints at steps 5, 10, 15: positions 5, 2 and 7 of an 8-batch epoch, all mid-epoch

MakeModule = Callable[..., LightningModule]


class StatefulBatches:
    """Fixed, ordered mini-batches; a sized, stateful iterable whose position survives a checkpoint.

    ``served`` logs the index of every batch handed out (across epochs), for comparing runs.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int = BATCH) -> None:
        x, y = dataset.tensors
        self.batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
        self.position = 0
        self._resume_at = 0
        self.served: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        for index in range(start, len(self.batches)):
            self.position = index + 1
            self.served.append(index)
            yield self.batches[index]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = state["position"]


def _adam(module: LightningModule) -> Optimizer:
    return torch.optim.Adam(module.parameters(), lr=0.01)


CONFIGS: dict[str, tuple[Callable[[LightningModule], Optimizer], bool]] = {
    "sgd": (sgd(), False),
    "adam": (_adam, False),
    "sgd-safeguard": (sgd(), True),
    "adam-anneal": (_adam, False),
}
#: Options beyond the configuration's: the anneal's window is [8, 16] (resumes at step 5, before it, and 10, inside)
OPTIONS: dict[str, dict[str, Any]] = {"adam-anneal": {"hold_after": 2}}


class Run:
    """One ``Trainer.fit`` with CLARA, an lr recorder and every-5-steps checkpoints, on ``StatefulBatches``."""

    def __init__(
        self,
        make_module: MakeModule,
        dataset: TensorDataset,
        trainer_kwargs: dict[str, Any],
        directory: Path,
        config: str,
        *,
        ckpt_path: str | None = None,
        clara: bool = True,
    ) -> None:
        configure, safeguard = CONFIGS[config]
        self.module = make_module(configure)
        self.data = StatefulBatches(dataset)
        options = OPTIONS.get(config, {})
        self.callback = CLARACallback(c=C, d=D, safeguard=safeguard, initial_factor=1.0, **options) if clara else None
        self.recorder = LRRecorder()
        self.checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=EVERY, save_top_k=-1)
        callbacks: list[Callback] = [self.recorder, self.checkpoint]
        if self.callback is not None:
            callbacks.insert(0, self.callback)
        self.trainer: Trainer = make_trainer(trainer_kwargs, callbacks, max_epochs=EPOCHS, enable_checkpointing=True)
        self.trainer.fit(self.module, train_dataloaders=self.data, ckpt_path=ckpt_path)
        self.directory = directory

    @property
    def controller(self) -> CLARA:
        assert self.callback is not None
        (controller,) = self.callback.controllers
        return controller

    def checkpoint_at(self, step: int) -> str:
        (path,) = self.directory.glob(f"*-step={step}.ckpt")
        return str(path)


def _assert_same_state(resumed: CLARA, uninterrupted: CLARA) -> None:
    """Factors, counters, paths and safeguard statistics agree to float64 rounding."""
    assert resumed.num_adapted_steps == uninterrupted.num_adapted_steps
    assert resumed.log_factors[0] == pytest.approx(uninterrupted.log_factors[0], rel=1e-12)
    a, b = resumed.state_dict(), uninterrupted.state_dict()
    for row_a, row_b in zip(a["tensors"], b["tensors"], strict=True):
        for entry_a, entry_b in zip(row_a, row_b, strict=True):
            assert entry_a["count"] == entry_b["count"]
            torch.testing.assert_close(entry_a["path"], entry_b["path"], rtol=1e-12, atol=1e-14)
    if b["safeguard"] is None:
        assert a["safeguard"] is None
    else:
        assert a["safeguard"] == pytest.approx(b["safeguard"], rel=1e-12)


@pytest.mark.parametrize("resume_step", [EVERY, 2 * EVERY])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mid_epoch_resume_continues_the_trajectory_exactly(
    config: str,
    resume_step: int,
    make_module: MakeModule,
    regression_data: TensorDataset,
    trainer_kwargs: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Resume from a mid-epoch checkpoint: the lr used at every later step, F, the paths, the optimizer's
    trajectory and (with safeguard=True) the Page-Hinkley statistics equal the uninterrupted run's."""
    full = Run(make_module, regression_data, trainer_kwargs, tmp_path / "full", config)
    total = EPOCHS * len(full.data)
    assert full.trainer.global_step == total == 16
    resumed = Run(
        make_module,
        regression_data,
        trainer_kwargs,
        tmp_path / "resumed",
        config,
        ckpt_path=full.checkpoint_at(resume_step),
    )

    # the data side: the resumed run was served exactly the rest of the uninterrupted run's batches
    assert resumed.data.served == full.data.served[resume_step:]
    assert resume_step % len(full.data) != 0  # mid-epoch
    expected = full.recorder.first_group()[resume_step:]
    used = resumed.recorder.first_group()
    assert len(used) == total - resume_step
    assert used[0] != full.recorder.first_group()[0]  # F != 1 at the resume point: a reset would show
    assert max_relative_error(used, expected) < 1e-12
    _assert_same_state(resumed.controller, full.controller)
    if config in OPTIONS:  # the anneal acted: A = 2/8 then 1/8 at the last two steps, F held (the hold from step 2)
        assert full.controller.settings.schedule.anneal_from == 8
        assert resumed.controller.state_dict()["anneal_stopped"] is None
        assert used[-1] / used[-2] == pytest.approx(0.5, rel=1e-6)
    if CONFIGS[config][1]:
        assert full.controller.safeguard is not None
        assert full.controller.safeguard.count == total  # it watched every step, across the resume
    for a, b in zip(resumed.module.parameters(), full.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_without_clara_state_warns_and_starts_fresh(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """A checkpoint saved without the callback: resuming with it warns (no CLARA state) and CLARA starts at
    F = 1 with empty paths, exactly like the simple loop started from the checkpoint's weights."""
    plain = Run(make_module, regression_data, trainer_kwargs, tmp_path / "plain", "sgd", clara=False)
    path = plain.checkpoint_at(EVERY)
    with pytest.warns(UserWarning, match="no CLARA state"):
        resumed = Run(make_module, regression_data, trainer_kwargs, tmp_path / "resumed", "sgd", ckpt_path=path)
    total = EPOCHS * len(plain.data)
    used = resumed.recorder.first_group()
    assert used[0] == LR  # F = 1
    assert resumed.controller.num_adapted_steps == total - EVERY

    # the simple loop from the checkpoint's weights over the remaining batches
    net = copy.deepcopy(resumed.module.net)
    weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    net.load_state_dict({key.removeprefix("net."): value for key, value in weights.items()})
    params = list(net.parameters())
    clara = SimpleCLARA([p.shape for p in params], C, D, plain_sgd_mu(C), initial_factor=1.0)
    expected: list[float] = []
    for index in plain.data.served[EVERY:]:
        x, y = plain.data.batches[index]
        net.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        expected.append(LR * clara.factor)
        clara.update(sgd_step(params, expected[-1]))
    assert max_relative_error(used, expected) < 1e-9
    assert abs(clara.log_factor) > 0.05


def _walk(value: Any, where: str = "state") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested checkpoint value, with its path; asserts every dict key is a str."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where} has a {type(key).__name__} key {key!r}"
            yield from _walk(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
    else:
        yield where, value


def test_saved_state_is_keyed_by_position_not_tensor_identity(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """Only str keys, plain leaves (numbers, strings, None, tensors); paths listed per group in parameter order."""
    run = Run(make_module, regression_data, trainer_kwargs, tmp_path, "sgd-safeguard")
    state = clara_state(run.checkpoint_at(3 * EVERY))
    leaves = list(_walk(state))
    assert leaves
    for where, leaf in leaves:
        assert leaf is None or isinstance(leaf, (bool, int, float, str, Tensor)), (where, type(leaf))
    (saved,) = state["controllers"]
    (row,) = saved["tensors"]
    params = list(run.module.parameters())
    # sampled paths (the default): 1-D, at most 4096 entries, with the shape they were sampled from
    assert [entry["path"].numel() for entry in row] == [min(p.numel(), 4096) for p in params]
    assert [tuple(entry["shape"]) for entry in row] == [tuple(p.shape) for p in params]
    assert [entry["count"] for entry in row] == [3 * EVERY] * len(params)
    assert saved["safeguard"]["count"] == 3 * EVERY


def _two_groups(module: LightningModule) -> Optimizer:
    net = module.net
    return torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=LR)


def test_resuming_into_a_different_parameter_layout_raises(
    make_module: MakeModule, regression_data: TensorDataset, trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """Same weights, but the optimizer groups them differently: the saved CLARA state cannot be matched."""
    run = Run(make_module, regression_data, trainer_kwargs, tmp_path / "a", "sgd")
    module = make_module(_two_groups)
    trainer = make_trainer(trainer_kwargs, [CLARACallback(c=C, d=D, safeguard=False)], max_epochs=EPOCHS)
    with pytest.raises(ValueError, match=r"param(eter)? groups"):
        trainer.fit(module, train_dataloaders=StatefulBatches(regression_data), ckpt_path=run.checkpoint_at(EVERY))


def test_controller_state_loads_by_position_and_checks_shapes() -> None:
    """A state loads into a controller on *other* tensors of the same layout and continues identically; a
    layout with the same count but other shapes raises ValueError."""

    def make(seed: int, shapes: list[tuple[int, ...]]) -> tuple[list[Tensor], CLARA]:
        generator = torch.Generator().manual_seed(seed)
        params = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]
        return params, CLARA(torch.optim.SGD(params, lr=0.1), c=C, d=D)

    def step(params: list[Tensor], clara: CLARA, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) + 0.5
        clara.optimizer.step()

    shapes = [(3, 2), (2,)]
    params, original = make(0, shapes)
    for seed in range(5):
        step(params, original, seed)
    copies, restored = make(0, shapes)
    with torch.no_grad():
        for c, p in zip(copies, params, strict=True):
            c.copy_(p)
    restored.load_state_dict(original.state_dict())
    for seed in range(5, 10):
        step(params, original, seed)
        step(copies, restored, seed)
        assert restored.lr_used == original.lr_used
    assert restored.log_factors == original.log_factors
    assert not math.isclose(original.log_factors[0], 0.0, abs_tol=1e-3)

    _, other = make(0, [(2, 3), (2,)])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(original.state_dict())
    _, fewer = make(0, [(3, 2)])
    with pytest.raises(ValueError, match="param groups"):
        fewer.load_state_dict(original.state_dict())
