"""Shared test set-up: ``tests/`` on ``sys.path`` (for ``reference_loop``) and opt-in Lightning fixtures.

Nothing here is autouse, and Lightning is imported only when a Lightning fixture is requested:
test files that just need ``from reference_loop import ...`` pay nothing for it.
"""

from __future__ import annotations

import csv
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# The suite's tensors are tiny: with several threads, thread wake-ups cost more than the work,
# badly so when the two CI cores are shared. One thread makes the timings stable.
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: ``configure(module)`` returns whatever ``configure_optimizers`` should return.
ConfigureFn = Callable[[Any], Any]


def make_regression_data(num_samples: int = 64, features: int = 4, seed: int = 0) -> TensorDataset:
    """A fixed-seed float64 linear-regression set (noisy), independent of the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=generator, dtype=torch.float64)
    w = torch.randn(features, 1, generator=generator, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    return TensorDataset(x, y)


def csv_series(path: Path) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` from a CSVLogger ``metrics.csv`` (one row per log call)."""
    out: dict[str, dict[int, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = int(row["step"])
            for key, value in row.items():
                if key == "step" or value in ("", None):
                    continue
                series = out.setdefault(key, {})
                assert step not in series, f"{key} logged twice at step {step}"
                series[step] = float(value)
    return out


def make_net(features: int = 4, hidden: int = 8, seed: int = 0) -> nn.Sequential:
    """A float64 two-layer MLP (four parameter tensors) initialised from ``seed`` without touching global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return net.double()


@functools.cache
def tiny_module_class() -> type:
    """Build (once) the BoringModel-style LightningModule; Lightning is imported only here."""
    import lightning.pytorch as pl

    class TinyRegressionModule(pl.LightningModule):
        """MSE regression with a tiny MLP; optimizers come from ``configure(module)``.

        With ``manual=True`` it uses manual optimization: per batch, every optimizer's
        ``zero_grad``, one backward pass, then optimizer i steps when ``batch_idx % step_every[i] == 0``.
        """

        def __init__(
            self,
            dataset: TensorDataset,
            configure: ConfigureFn,
            *,
            batch_size: int = 8,
            hidden: int = 8,
            seed: int = 0,
            manual: bool = False,
            step_every: Sequence[int] | None = None,
        ) -> None:
            super().__init__()
            self.dataset = dataset
            self.configure = configure
            self.batch_size = batch_size
            self.net = make_net(dataset.tensors[0].shape[1], hidden, seed)
            self.automatic_optimization = not manual
            self.step_every = list(step_every) if step_every is not None else None
            self.configured: Any = None

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            if self.automatic_optimization:
                return loss
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            every = self.step_every or [1] * len(optimizers)
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer, k in zip(optimizers, every, strict=True):
                if batch_idx % k == 0:
                    optimizer.step()
            return None

        def configure_optimizers(self) -> Any:
            self.configured = self.configure(self)
            return self.configured

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    return TinyRegressionModule


@pytest.fixture
def regression_data() -> TensorDataset:
    """64 float64 samples with 4 features: 8 batches of 8."""
    return make_regression_data()


@pytest.fixture
def make_module(regression_data: TensorDataset) -> Callable[..., Any]:
    """Factory ``make_module(configure, **kwargs)``: a TinyRegressionModule on ``regression_data`` by default."""
    cls = tiny_module_class()

    def factory(configure: ConfigureFn, **kwargs: Any) -> Any:
        dataset = kwargs.pop("dataset", regression_data)
        return cls(dataset, configure, **kwargs)

    return factory


@pytest.fixture
def trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """Trainer arguments for fast, quiet CPU runs (override per test)."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
