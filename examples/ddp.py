"""CLARA under DDP on CPU: a small MLP on scikit-learn's digits, trained on several processes.

Plain SGD starts at a deliberately small learning rate; ``CLARACallback`` raises it while the
steps agree. Every rank applies the same all-reduced update, so every rank computes the same
factor F without any communication; ``consistency_check_every=50`` still compares F across
ranks every 50 steps (one tiny broadcast) and would re-synchronise from rank 0 with a warning.
Rank 0 prints a table at the end::

    python examples/ddp.py --devices 2          # two CPU processes (gloo), about half a minute
    python examples/ddp.py --devices 1          # the same run in one process
    python examples/ddp.py --devices 2 --quick  # a few seconds of training, for smoke tests

Why the ``"ddp"`` strategy and not ``"ddp_spawn"``: from a plain script, ``"ddp"`` re-launches
this script once per extra rank, and every rank keeps its own ``Trainer`` to the end, so rank 0
can read the callback's controllers and ``trainer.global_step`` after ``fit`` and ``test`` runs
in the same processes. ``"ddp_spawn"`` would hand only the weights and ``callback_metrics`` back
to the parent process and start fresh processes again for ``trainer.test``. (The tests run
CLARA under ``"ddp_spawn"`` as well; both work.)

The global batch is fixed (``--batch-size``, split evenly over the ranks), so ``--devices 1``
and ``--devices 2`` take the same number of steps. The CSV logs (``clara/lr-SGD``,
``clara/ratio-SGD``, ``clara/log_factor-SGD``, ``train_loss``) are written by rank 0 only.
Without network, gloo may need ``GLOO_SOCKET_IFNAME=lo``.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_clara import CLARACallback

NUM_CLASSES = 10
FULL_EPOCHS = 40  # 920 steps: from lr 1e-4 CLARA reaches ~0.16 and 0.97 test accuracy (about 15 s)
#: ``--quick``: 3 epochs of 23 steps each, enough to pass one rank-consistency check (step 50).
QUICK_EPOCHS = 3
CONSISTENCY_CHECK_EVERY = 50


@dataclass
class Summary:
    """What rank 0 reports (and writes to ``summary.json``)."""

    world_size: int
    initial_lr: float
    final_lr: float
    test_accuracy: float
    optimizer_steps: int
    resyncs: int


class DigitsMLP(L.LightningModule):
    """A 64-64-10 MLP trained with plain SGD; the test accuracy is a torchmetrics metric synced across ranks."""

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
        """Cross-entropy on this rank's share of the global batch (DDP averages the gradients)."""
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate the accuracy; the metric reduces its counts over all ranks when computed."""
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD (no momentum) at a fixed, deliberately small learning rate."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits_loaders(seed: int, per_rank_batch: int) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders: a fixed-seed stratified 80/20 split, standardised with train statistics.

    Lightning swaps in a ``DistributedSampler`` under DDP, so each rank sees its share of every epoch.
    """
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        scaled = torch.tensor((features - mean) / std, dtype=torch.float32)
        return TensorDataset(scaled, torch.tensor(labels, dtype=torch.long))

    return (
        DataLoader(dataset(x_train, y_train), batch_size=per_rank_batch, shuffle=True),
        DataLoader(dataset(x_test, y_test), batch_size=256),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="initial SGD learning rate (default: %(default)g)")
    parser.add_argument("--d", type=float, default=None, help="CLARA damping d (default: the callback's)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {FULL_EPOCHS})")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global batch, split over the ranks (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    parser.add_argument(
        "--log-dir", type=Path, default=Path("lightning_logs_ddp"), help="CSV log root (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_EPOCHS}-epoch smoke run")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    if args.devices < 1 or args.epochs < 1:
        parser.error("--devices and --epochs must be >= 1")
    if args.batch_size % args.devices:
        parser.error(f"--batch-size ({args.batch_size}) must be a multiple of --devices ({args.devices})")
    if args.lr <= 0 or (args.d is not None and args.d <= 0):
        parser.error("--lr and --d must be > 0")
    return args


def quiet_lightning() -> None:
    """Keep the output to the table: no device banners, no single-process data-loader advice."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    # The 360 test samples split evenly over 1-6, 8, 9 or 10 ranks, so no sample is evaluated twice.
    warnings.filterwarnings("ignore", ".*it is recommended to use `Trainer\\(devices=1, num_nodes=1\\)`.*")
    # Lightning 2.6 calls a pytree API that recent torch deprecates, inside its own loops.
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def summary_table(summary: Summary) -> Table:
    """The result as a two-column rich table."""
    table = Table(title="CLARA under DDP: SGD on digits")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("world size", str(summary.world_size))
    table.add_row("initial lr", f"{summary.initial_lr:.2e}")
    table.add_row("final lr used", f"{summary.final_lr:.2e}")
    table.add_row("test accuracy", f"{summary.test_accuracy:.3f}")
    table.add_row("optimizer steps", str(summary.optimizer_steps))
    table.add_row("rank resyncs", str(summary.resyncs))
    return table


def main(argv: list[str] | None = None) -> Summary | None:
    """Train and test on every rank; rank 0 prints the table and writes ``summary.json``. Returns it on rank 0."""
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)  # a tiny MLP gains nothing from intra-op threads, and the ranks share the CPU
    L.seed_everything(args.seed, workers=True, verbose=False)
    train_loader, test_loader = digits_loaders(args.seed, args.batch_size // args.devices)
    damping = {} if args.d is None else {"d": args.d}
    clara = CLARACallback(consistency_check_every=CONSISTENCY_CHECK_EVERY, **damping)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=CSVLogger(args.log_dir, name="ddp"),
        callbacks=[clara],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = DigitsMLP(args.lr)
    trainer.fit(model, train_dataloaders=train_loader)
    (metrics,) = trainer.test(model, dataloaders=test_loader, verbose=False)
    if not trainer.is_global_zero:
        return None
    controller = clara.controllers[0]
    summary = Summary(
        world_size=trainer.world_size,
        initial_lr=args.lr,
        final_lr=controller.lr_used[0],  # lr_base * F in the last step
        test_accuracy=float(metrics["test_acc"]),
        optimizer_steps=trainer.global_step,
        resyncs=controller.num_resyncs,
    )
    console = Console()
    console.print(summary_table(summary))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


if __name__ == "__main__":
    main()
