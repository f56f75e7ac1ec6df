"""CLARA in a Lightning Fabric loop: Adam on scikit-learn's digits, started at a deliberately tiny learning rate.

``fabric.setup(model, optimizer)`` returns the optimizer wrapped in Fabric's ``_FabricOptimizer``
(a ``FabricAdam`` here), whose ``step()`` hands the step to the strategy and precision plugin,
which then call the *original* optimizer's ``step()``. CLARA works through torch's step hooks,
so ``CLARA(optimizer)`` attaches them to that original optimizer (``optimizer.optimizer``); the
training loop keeps calling the wrapper's ``optimizer.step()`` as usual, and the hooks fire inside it. The learning
rate used, the ratio r and log F go to Fabric's logger (CSV) with ``fabric.log_dict``::

    python examples/fabric.py            # a few seconds on one CPU core
    python examples/fabric.py --quick    # a 2-epoch smoke run
    # per-step values: lightning_logs/fabric/version_*/metrics.csv

Needs scikit-learn besides the package.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clara import CLARA

NUM_CLASSES = 10
BATCH_SIZE = 32
LOG_EVERY = 5
FULL_EPOCHS = 20
QUICK_EPOCHS = 2


def digits_loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders: fixed-seed stratified 80/20 split, features standardised with train statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        scaled = torch.tensor((features - mean) / std, dtype=torch.float32)
        return TensorDataset(scaled, torch.tensor(labels, dtype=torch.long))

    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(dataset(x_train, y_train), batch_size=BATCH_SIZE, shuffle=True, generator=generator),
        DataLoader(dataset(x_test, y_test), batch_size=256),
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Test accuracy."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-6, help="initial Adam learning rate (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {FULL_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    parser.add_argument(
        "--log-dir", type=Path, default=Path("lightning_logs"), help="CSV logger root (default: %(default)s)"
    )
    parser.add_argument("--summary", type=Path, default=None, help="also write the key numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_EPOCHS}-epoch smoke run")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Train with Fabric and CLARA, print a summary, and optionally write it as JSON."""
    args = parse_args(argv)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)  # no device banner
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)  # a 64-64-10 MLP gains nothing from intra-op threads
    console = Console()

    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(args.log_dir, name="fabric"))
    fabric.seed_everything(args.seed, verbose=False)
    train_loader, test_loader = digits_loaders(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, test_loader = fabric.setup_dataloaders(train_loader, test_loader)

    # The wrapper's own step() is not torch's hooked Optimizer.step, so CLARA attaches to the
    # optimizer inside it (clara.optimizer is optimizer.optimizer): the wrapper's step() ends in that
    # optimizer's step(), so the hooks run on every `optimizer.step()` below. (Attaching to the raw
    # optimizer before fabric.setup works just as well: setup keeps it.)
    # The run's length and every step's loss (below) give CLARA what CLARACallback gives it: the same algorithm.
    clara = CLARA(optimizer, total_steps=args.epochs * len(train_loader))
    name = type(clara.optimizer).__name__

    initial_lr = args.lr  # the configured lr; CLARA's first step uses initial_factor x it
    step = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step()  # Fabric's step; CLARA sets lr * F for it and updates F after it
            clara.observe_loss(loss)  # the loss brake reads it
            step += 1
            if step % LOG_EVERY == 0:
                metrics = {
                    "train_loss": loss.item(),
                    f"clara/lr-{name}": clara.lr_used[0],
                    f"clara/log_factor-{name}": clara.log_factors[0],
                    "epoch": float(epoch),
                }
                if clara.ratio is not None:
                    metrics[f"clara/ratio-{name}"] = clara.ratio
                fabric.log_dict(metrics, step=step)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_loader)
    fabric.logger.finalize("success")  # writes the remaining CSV rows

    table = Table(title=f"Fabric + CLARA: {name} on digits")
    for column in ("initial lr", "final lr used", "F", "last r", "adapted steps", "test acc", "time"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{initial_lr:.2e}",
        f"{clara.lr_used[0]:.2e}",
        f"{clara.lr_factor:.4g}",
        f"{clara.ratio:.3f}" if clara.ratio is not None else "-",
        str(clara.num_adapted_steps),
        f"{test_accuracy:.3f}",
        f"{seconds:.1f} s",
    )
    console.print(table)
    console.print(f"per-step log: {Path(fabric.logger.log_dir) / 'metrics.csv'}")
    summary = {
        "optimizer": name,
        "initial_lr": initial_lr,
        "final_lr": clara.lr_used[0],
        "final_factor": clara.lr_factor,
        "adapted_steps": clara.num_adapted_steps,
        "optimizer_steps": step,
        "test_accuracy": test_accuracy,
        "metrics_csv": str(Path(fabric.logger.log_dir) / "metrics.csv"),
    }
    clara.detach()
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
