"""CLARA rescues a bad learning rate: a small MLP on scikit-learn's digits, with and without CLARA.

Two runs, same seed, same data, same SGD started at a deliberately small learning rate: the
first keeps it, the second adds ``CLARACallback()``. Both log to TensorBoard, and a table at
the end compares the largest learning rate each used (the one CLARA found), the one each finished
with (CLARA anneals the second half of a run at a constant lr) and the test accuracy::

    python examples/digits.py                      # about ten seconds on 2 CPU cores
    tensorboard --logdir lightning_logs_digits     # clara/lr-SGD, clara/ratio-SGD, train_loss ...

Needs scikit-learn and tensorboard besides the package (``pip install -e ".[test]"`` has both).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_clara import CLARACallback

NUM_CLASSES = 10
BATCH_SIZE = 32
#: Full run (about ten seconds on 2 CPU cores) and ``--quick`` run (a few seconds, for the smoke test).
FULL_EPOCHS = 20
QUICK_EPOCHS = 2


@dataclass
class RunResult:
    """What the comparison table shows for one run."""

    name: str
    initial_lr: float
    largest_lr: float  # the lr CLARA found (its anneal ends the run below it)
    final_lr: float
    test_accuracy: float
    optimizer_steps: int
    seconds: float


class DigitsMLP(L.LightningModule):
    """A 64-64-10 multilayer perceptron trained with SGD (momentum 0.9) at a given learning rate."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
        self.loss = nn.CrossEntropyLoss()
        self.test_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one mini-batch."""
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate the test accuracy."""
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9, the SGD most networks are trained with."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders: fixed-seed stratified 80/20 split, features standardised with train statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        scaled = torch.tensor((features - mean) / std, dtype=torch.float32)
        return TensorDataset(scaled, torch.tensor(labels, dtype=torch.long))

    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(dataset(x_train, y_train), batch_size=BATCH_SIZE, shuffle=True, generator=generator),
        DataLoader(dataset(x_test, y_test), batch_size=256),
    )


def train_once(name: str, args: argparse.Namespace, clara: CLARACallback | None) -> RunResult:
    """Train and test one model; ``clara=None`` is the baseline at the fixed learning rate."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    train_loader, test_loader = digits_loaders(args.seed)
    model = DigitsMLP(args.lr)
    callbacks: list[Callback] = [LearningRateMonitor(logging_interval="step")]
    if clara is not None:
        callbacks.append(clara)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.log_dir, name=name, default_hp_metric=False),
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, dataloaders=test_loader, verbose=False)
    if clara is not None:
        final_lr = clara.controllers[0].lr_used[0]  # lr_scheduled * F x the anneal, see CLARA.lr_used
        rows = clara.summary_rows or []  # the fit summary's rows: the lr used's min and max among them
        largest_lr = rows[0].lr_max if rows and rows[0].lr_max is not None else final_lr
    else:
        final_lr = largest_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
    accuracy = float(metrics["test_acc"])
    return RunResult(name, args.lr, largest_lr, final_lr, accuracy, trainer.global_step, seconds)


def summary_table(results: list[RunResult]) -> Table:
    """The comparison as a rich table."""
    table = Table(title="SGD on digits: fixed learning rate vs CLARA")
    for column in ("run", "initial lr", "largest lr", "final lr", "test acc", "steps", "fit time"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.initial_lr:.2e}",
            f"{r.largest_lr:.2e}",
            f"{r.final_lr:.2e}",
            f"{r.test_accuracy:.3f}",
            str(r.optimizer_steps),
            f"{r.seconds:.1f} s",
        )
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-4, help="initial SGD learning rate (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default: {FULL_EPOCHS})")
    parser.add_argument("--d", type=float, default=None, help="CLARA damping d (default: the library's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    parser.add_argument(
        "--log-dir", type=Path, default=Path("lightning_logs_digits"), help="TensorBoard root (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_EPOCHS}-epoch smoke run (a few seconds)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.lr <= 0 or (args.d is not None and args.d <= 0):
        parser.error("--lr and --d must be > 0")
    return args


def quiet_lightning() -> None:
    """Keep the output to the table: no device banners, no single-process data-loader advice."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    # Lightning 2.6 calls a pytree API that recent torch deprecates, inside its own loops.
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Run both trainings, print the table, and write ``summary.json`` into the log directory."""
    args = parse_args(argv)
    quiet_lightning()
    # A 64-64-10 MLP gains nothing from intra-op threads; one thread is faster and steadier on a busy CPU.
    torch.set_num_threads(1)
    console = Console()
    results = []
    for name, clara in (("sgd", None), ("sgd-clara", CLARACallback(d=args.d))):
        console.print(
            f"[bold]{name}[/]: {args.epochs} epoch(s), lr={args.lr:g}" + (f", d={args.d or 'default'}" if clara else "")
        )
        results.append(train_once(name, args, clara))
    console.print(summary_table(results))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [asdict(r) for r in results]}
    (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"TensorBoard logs: tensorboard --logdir {args.log_dir}")
    return results


if __name__ == "__main__":
    main()
