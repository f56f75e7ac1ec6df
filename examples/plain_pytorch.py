"""CLARA in a plain PyTorch loop (no Lightning): attach, train as usual, checkpoint and resume.

A 64-64-10 MLP on scikit-learn's digits with plain SGD started at a deliberately small learning
rate. Two lines are added to an ordinary training loop: ``clara = CLARA(optimizer, total_steps=...)``
hooks into ``optimizer.step()`` through torch's step hooks, so the loop itself
(``zero_grad(); loss.backward(); optimizer.step()``) stays as it was, and ``clara.observe_loss(loss)``
hands it each step's loss (the loss brake), as ``CLARACallback`` does. The script prints,
per epoch, the learning rate used, the factor F and the ratio r; it saves
``clara.state_dict()`` next to the model and optimizer halfway through, resumes a fresh
model/optimizer/CLARA from that checkpoint, and checks that the resumed run ends with the same
learning rate as the uninterrupted one. A baseline with the same loop and no CLARA comes last::

    python examples/plain_pytorch.py            # a few seconds on one CPU core
    python examples/plain_pytorch.py --quick    # a 2-epoch smoke run

Needs scikit-learn besides the package. Lightning is not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from lightning_clara import CLARA

NUM_CLASSES = 10
BATCH_SIZE = 32
FULL_EPOCHS = 20
QUICK_EPOCHS = 2


@dataclass
class Digits:
    """Standardised train/test tensors (fixed-seed stratified 80/20 split)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class EpochStats:
    """One row of the progression table."""

    epoch: int
    lr_used: float
    factor: float
    mean_ratio: float
    train_loss: float
    test_accuracy: float


def load_data(seed: int) -> Digits:
    """The digits data set, features standardised with the training statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank

    def features(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return Digits(features(x_train), torch.tensor(y_train), features(x_test), torch.tensor(y_test))


def make_model(seed: int) -> nn.Module:
    """The MLP, initialised from ``seed`` (so that a resumed run can rebuild the same architecture)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Digits, epoch: int, seed: int, clara: CLARA | None
) -> tuple[float, float]:
    """One epoch of an ordinary loop; returns the mean loss and, with ``clara``, the mean ratio r.

    The shuffling depends on (seed, epoch) only, so a run resumed at an epoch boundary sees the
    same batches as an uninterrupted one. The adaptation happens inside ``optimizer.step()``;
    ``clara`` is given each step's loss for its loss brake.
    """
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed * 10_000 + epoch))
    losses, ratios = [], []
    model.train()
    for start in range(0, len(order), BATCH_SIZE):
        index = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        optimizer.step()  # runs at lr * F; CLARA updates F right after the step
        if clara is not None:
            clara.observe_loss(loss)
        losses.append(loss.item())
        if clara is not None and clara.ratio is not None:
            ratios.append(clara.ratio)
    return float(np.mean(losses)), float(np.mean(ratios)) if ratios else math.nan


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    """Test accuracy."""
    model.eval()
    return float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())


def progression_table(rows: list[EpochStats], title: str) -> Table:
    """The per-epoch progression as a rich table."""
    table = Table(title=title)
    for column in ("epoch", "lr used", "F", "mean r", "train loss", "test acc"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.epoch),
            f"{row.lr_used:.2e}",
            f"{row.factor:.3g}",
            f"{row.mean_ratio:.2f}",
            f"{row.train_loss:.3f}",
            f"{row.test_accuracy:.3f}",
        )
    return table


def save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, clara: CLARA) -> None:
    """CLARA's state travels next to the model's and the optimizer's: plain values and tensors."""
    torch.save(
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "clara": clara.state_dict(),
        },
        path,
    )


def total_steps(args: argparse.Namespace, data: Digits) -> int:
    """The run's optimizer steps (its length sets the find's duration, as CLARACallback's estimate does)."""
    return args.epochs * math.ceil(len(data.y_train) / BATCH_SIZE)


def resume(path: Path, args: argparse.Namespace, steps: int) -> tuple[int, nn.Module, torch.optim.Optimizer, CLARA]:
    """Rebuild model, optimizer and CLARA as at the start, then load all three states."""
    checkpoint = torch.load(path, weights_only=True)  # CLARA's state dict needs no pickled objects
    model = make_model(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    clara = CLARA(optimizer, total_steps=steps)  # the same options, then paths, counters and F
    clara.load_state_dict(checkpoint["clara"])
    return checkpoint["epoch"], model, optimizer, clara


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-4, help="initial SGD learning rate (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {FULL_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="where to save the mid-run checkpoint (default: a temp file)"
    )
    parser.add_argument("--summary", type=Path, default=None, help="also write the key numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_EPOCHS}-epoch smoke run")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the run is checkpointed and resumed halfway)")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    return args


def run(args: argparse.Namespace, checkpoint: Path, console: Console) -> dict[str, object]:
    """Train with CLARA, checkpoint halfway, resume from it, train the baseline; return the key numbers."""
    data = load_data(args.seed)
    save_at = args.epochs // 2

    # 1. an ordinary loop; CLARA(optimizer, total_steps=...) and observe_loss are the only additions
    model = make_model(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    clara = CLARA(optimizer, total_steps=total_steps(args, data))
    console.print(f"attached: {clara!r}")
    rows = []
    factor_at_save = math.nan
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss, mean_ratio = train_epoch(model, optimizer, data, epoch, args.seed, clara)
        rows.append(EpochStats(epoch, clara.lr_used[0], clara.lr_factor, mean_ratio, loss, accuracy(model, data)))
        if epoch == save_at:
            save_checkpoint(checkpoint, epoch, model, optimizer, clara)
            factor_at_save = clara.lr_factor
    seconds = time.perf_counter() - start
    console.print(progression_table(rows, f"SGD + CLARA on digits, initial lr {args.lr:g}"))
    console.print(
        f"lr used: {args.lr:.2e} -> {clara.lr_used[0]:.2e} (F = {clara.lr_factor:.4g}) after "
        f"{clara.num_adapted_steps} adapted steps in {seconds:.1f} s; scheduled lr in the optimizer: "
        f"{optimizer.param_groups[0]['lr']:g}"
    )

    # 2. resume a fresh model/optimizer/CLARA from the checkpoint and finish the run
    saved_epoch, resumed_model, resumed_optimizer, resumed = resume(checkpoint, args, total_steps(args, data))
    factor_after_load = resumed.lr_factor
    console.print(
        f"checkpoint of epoch {saved_epoch}: F saved {factor_at_save:.6g}, "
        f"F after load_state_dict {factor_after_load:.6g}"
    )
    for epoch in range(saved_epoch + 1, args.epochs + 1):
        train_epoch(resumed_model, resumed_optimizer, data, epoch, args.seed, resumed)
    identical = resumed.lr_used == clara.lr_used and resumed.lr_factor == clara.lr_factor
    console.print(
        f"resumed run ends at lr {resumed.lr_used[0]:.6e}, uninterrupted at {clara.lr_used[0]:.6e}: "
        + ("[green]identical[/]" if identical else "[red]different[/]")
    )
    clara.detach()  # remove the hooks: the optimizer is a plain SGD again
    resumed.detach()

    # 3. the same loop without CLARA
    baseline = make_model(args.seed)
    baseline_optimizer = torch.optim.SGD(baseline.parameters(), lr=args.lr)
    for epoch in range(1, args.epochs + 1):
        train_epoch(baseline, baseline_optimizer, data, epoch, args.seed, None)
    baseline_accuracy = accuracy(baseline, data)
    console.print(
        f"test accuracy after {args.epochs} epochs: {rows[-1].test_accuracy:.3f} with CLARA, "
        f"{baseline_accuracy:.3f} at the fixed lr {args.lr:g}"
    )
    return {
        "initial_lr": args.lr,
        "final_lr": clara.lr_used[0],
        "final_factor": clara.lr_factor,
        "adapted_steps": clara.num_adapted_steps,
        "test_accuracy": rows[-1].test_accuracy,
        "baseline_test_accuracy": baseline_accuracy,
        "checkpoint_epoch": save_at,
        "factor_at_save": factor_at_save,
        "factor_after_load": factor_after_load,
        "resumed_final_lr": resumed.lr_used[0],
        "resume_identical": identical,
        "epochs": [row.__dict__ for row in rows],
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse options, run, and optionally write the summary JSON."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier than several
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(args, args.checkpoint or Path(tmp) / "checkpoint.pt", console)
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
