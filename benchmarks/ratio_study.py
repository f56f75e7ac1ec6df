"""What the statistic sees: the ratio r at a fixed learning rate (F pinned at 1) on the deep tasks.

For each MNIST-1D task of ``deep.py`` (CNN, MLP), optimizer (Adam, SGD with momentum 0.9), fixed
lr and path memory c, one 3000-step run from a shuffled DataLoader (and, with ``--replacement``,
one with batches drawn with replacement), recording the mean r over steps 100-500 (early),
500-1500 (mid) and 2000-3000 (late) and the final test accuracy. The factor is pinned with
``min_factor = max_factor = 1``, so the lr never moves: this measures the statistic, not the rule.
Writes ``benchmarks/results/ratio_study.json`` and prints one table per c.

    python benchmarks/ratio_study.py --workers 2                   # c = 0.2, 0.05, 0.02 (about 8 min)
    python benchmarks/ratio_study.py --c 0.02 --replacement         # also with replacement
    python benchmarks/ratio_study.py --suite lm-short gru            # what the loss sees beside r (issue 20)

``--suite TASK ...`` runs tasks of ``suite.py`` instead (the default c, 300 steps, seed 0) and prints,
per lr, the mean r and the mean training loss over each 50-step window: at a far too large lr the
ratio can equal the tuned lr's while the loss has stopped falling (what the loss brake reads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deep

LEARNING_RATES = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
WINDOWS = {"early": (100, 500), "mid": (500, 1500), "late": (2000, 3000)}
STEPS = 3000


def pinned_run(
    task: deep.Task, optimizer_name: str, lr: float, c: float | None, steps: int
) -> tuple[list[float], list[float]]:
    """One run at a fixed lr with F pinned (``c`` None: the default): r and the training loss per step."""
    from lightning_clara import CLARA

    method = deep.Method(optimizer_name, "adam" if optimizer_name == "Adam" else "sgdm")
    optimizer, _ = deep.make_optimizer(method, list(task.model.parameters()), lr, steps)
    clara = CLARA(optimizer, c=c, min_factor=1.0, max_factor=1.0, initial_factor=1.0)
    ratios: list[float] = []
    losses: list[float] = []
    for batch in deep.batches(task.loader, steps):
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ratios.append(clara.ratio if clara.ratio is not None else float("nan"))
        losses.append(float(loss.detach()))
    task.model.eval()
    return ratios, losses


def measure(task_name: str, optimizer_name: str, lr: float, c: float, replacement: bool) -> dict[str, Any]:
    """One run at a fixed lr with F pinned; mean r per window and the final metric."""
    torch.set_num_threads(1)
    task = deep.make_task(task_name, seed=0)
    if replacement:
        sampler = RandomSampler(task.loader.dataset, replacement=True, generator=torch.Generator().manual_seed(1000))
        task.loader = DataLoader(task.loader.dataset, batch_size=task.loader.batch_size, sampler=sampler)
    ratios, _ = pinned_run(task, optimizer_name, lr, c, STEPS)
    means = {name: statistics.fmean(ratios[a:b]) for name, (a, b) in WINDOWS.items()}
    return {
        "task": task_name,
        "optimizer": optimizer_name,
        "lr": lr,
        "c": c,
        "replacement": replacement,
        "metric": task.metric(task.model),
        **means,
    }


def _job(args: tuple[str, str, float, float, bool]) -> dict[str, Any]:
    return measure(*args)


def ratio_and_loss(task_name: str, optimizer_name: str, lr: float, steps: int = 300) -> dict[str, Any]:
    """A suite task at a fixed lr (F pinned, default c): mean r and mean loss per 50-step window."""
    import suite

    torch.set_num_threads(1)
    task = suite.make_task(task_name, 0, steps)
    task.model.train()
    ratios, losses = pinned_run(task, optimizer_name, lr, None, steps)
    windows = range(0, steps, 50)
    return {
        "task": task_name,
        "optimizer": optimizer_name,
        "lr": lr,
        "metric": task.metric(task.model),
        "r": [statistics.fmean(v for v in ratios[a : a + 50] if v == v) for a in windows],
        "loss": [statistics.fmean(losses[a : a + 50]) for a in windows],
    }


def suite_study(tasks: list[str], lrs: list[float], workers: int, out: Path) -> None:
    jobs = [(task, optimizer, lr) for task in tasks for optimizer in ("Adam", "SGDm") for lr in lrs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(ratio_and_loss, *zip(*jobs, strict=True)))
    console = Console(width=200)
    table = Table(title="F pinned at 1: mean r / mean training loss per 50-step window, final metric")
    for column in ("task", "lr", "r per window", "loss per window", "metric"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            f"{row['task']} {row['optimizer']}",
            f"{row['lr']:g}",
            " ".join(f"{v:.2f}" for v in row["r"]),
            " ".join(f"{v:.3f}" for v in row["loss"]),
            f"{row['metric']:.3f}",
        )
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--c", nargs="+", type=float, default=[0.2, 0.05, 0.02])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--replacement", action="store_true", help="also draw batches with replacement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--suite", nargs="+", help="suite.py tasks: r beside the training loss, 300 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ratio_study.json")
    args = parser.parse_args(argv)
    if args.suite:
        suite_study(args.suite, args.lrs, args.workers, args.out.with_name("ratio_study-suite.json"))
        return 0
    jobs = [
        (task, optimizer, lr, c, replacement)
        for c in args.c
        for task in ("cnn", "mlp")
        for optimizer in ("Adam", "SGDm")
        for lr in args.lrs
        for replacement in ((False, True) if args.replacement else (False,))
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(_job, jobs))
    console = Console(width=200)
    for c in args.c:
        table = Table(title=f"c = {c}: mean r early / mid / late (F pinned at 1), test accuracy %")
        table.add_column("task")
        for lr in args.lrs:
            table.add_column(f"{lr:g}", justify="right")
        for task in ("cnn", "mlp"):
            for optimizer in ("Adam", "SGDm"):
                for replacement in (False, True) if args.replacement else (False,):
                    cells = []
                    for lr in args.lrs:
                        (row,) = [
                            r
                            for r in rows
                            if (r["task"], r["optimizer"], r["lr"], r["c"], r["replacement"])
                            == (task, optimizer, lr, c, replacement)
                        ]
                        cells.append(f"{row['early']:.2f}/{row['mid']:.2f}/{row['late']:.2f} ({row['metric']:.0f})")
                    label = f"{task} {optimizer}" + (" (with replacement)" if replacement else "")
                    table.add_row(label, *cells)
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
