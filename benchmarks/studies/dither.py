"""One-off study (2026-12-03, issue 20): can the loss tell whether a larger lr would help, by dithering the lr?

The path ratio alone settles Adam 2-10x below its tuned lr on some networks (CNN, fine-tuning, the LMs)
and a lower target climbs into broken networks on others (benchmarks/RESULTS.md, section 6): neither r
nor the loss's trend separates "raising helps" from "raising hurts". This study measures a different
sensor, the loss's response to a small, known lr modulation (a lock-in measurement).

Adam at a fixed lr (the suite's baseline grid 1e-4 ... 1e-1), the lr used switched between
``lr * sqrt(2)`` and ``lr / sqrt(2)`` every ``B`` steps (B = 20; 10 for runs under 1000 steps). Per block
k, ``s_k`` is the least-squares slope of the training loss over the block's steps; per block,

    D_k = q_k * (s_k - (s_{k-1} + s_{k+1}) / 2)          q_k = +1 on the high blocks, -1 on the low

so D < 0 says the loss falls faster at the higher lr (raising helps), D > 0 that it falls slower or rises
(raising hurts); the neighbours' mean removes the trend of the slope. Per window of the run (early: steps
T/15 ... T/3, late: T/3 ... T), printed: the mean of D, its z-score (mean / standard error over the
window's blocks), and the mean slope, with the final metric of the dithered run (compare with the Adam
rows of ``suite.py --report``, which do not dither).

    python benchmarks/studies/dither.py --out /tmp/dither.jsonl          # the choose tasks, ~15 min on 2 cores
    python benchmarks/studies/dither.py --tasks mlp cnn --lrs 1e-3 1e-2 --out /tmp/d.jsonl

Verdict and numbers: ``benchmarks/RESULTS.md``, section 6 ("Dithering the lr").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite
from deep import batches

CHOOSE = ("mlp", "cnn", "lm-short", "gru", "mse")
RATIO = math.sqrt(2.0)  # the high block's lr over the run's lr (and the run's lr over the low block's)


def block_length(steps: int) -> int:
    return 10 if steps < 1000 else 20


def slope(values: list[float]) -> float:
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def lock_in(losses: list[float], block: int, start: int, stop: int) -> dict[str, float]:
    """Mean D, its z-score and the mean slope over the blocks that lie within steps ``start ... stop``."""
    slopes = [slope(losses[k * block : (k + 1) * block]) for k in range(len(losses) // block)]
    d = [
        (1 if k % 2 == 0 else -1) * (slopes[k] - (slopes[k - 1] + slopes[k + 1]) / 2)
        for k in range(1, len(slopes) - 1)
        if start <= k * block and (k + 1) * block <= stop
    ]
    inside = [slopes[k] for k in range(len(slopes)) if start <= k * block and (k + 1) * block <= stop]
    if len(d) < 3 or not all(math.isfinite(v) for v in d):
        return {"d": math.nan, "z": math.nan, "slope": math.nan, "blocks": len(d)}
    # neighbouring D share a block: the standard error treats the series as half as many independent values
    error = statistics.stdev(d) / math.sqrt(len(d) / 2)
    mean = statistics.fmean(d)
    return {
        "d": mean,
        "z": mean / error if error > 0 else math.nan,
        "slope": statistics.fmean(inside),
        "blocks": len(d),
    }


def dithered_training(
    task_name: str,
    task: Any,
    optimizer: torch.optim.Optimizer,
    lr: float,
    block: int,
    steps: int,
    read: Callable[[torch.Tensor], float],
) -> tuple[list[float], float]:
    """``steps`` steps at ``lr x RATIO`` and ``lr / RATIO`` in turn, ``block`` steps each: ``read(loss)`` after each
    step, and the final metric (a diverged run scores ``suite.failed_value``)."""
    values: list[float] = []
    task.model.train()
    for step, batch in enumerate(batches(task.loader, steps)):
        high = (step // block) % 2 == 0
        optimizer.param_groups[0]["lr"] = lr * RATIO if high else lr / RATIO
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values.append(read(loss))
    task.model.eval()
    metric = task.metric(task.model)
    return values, metric if math.isfinite(metric) else suite.failed_value(task_name)


def run(job: tuple[str, float, int]) -> dict[str, Any]:
    task_name, lr, seed = job
    torch.set_num_threads(1)
    steps = suite.SPECS[task_name].steps
    block = block_length(steps)
    task = suite.make_task(task_name, seed, steps)
    optimizer = torch.optim.Adam(task.model.parameters(), lr=lr)
    losses, metric = dithered_training(task_name, task, optimizer, lr, block, steps, lambda loss: loss.item())
    return {
        "task": task_name,
        "lr": lr,
        "seed": seed,
        "block": block,
        "metric": metric,
        "early": lock_in(losses, block, steps // 15, steps // 3),
        "late": lock_in(losses, block, steps // 3, steps),
    }


Row = dict[str, Any]


def run_and_append(run: Callable[[Any], Row], jobs: list[Any], workers: int, out: Path) -> list[Row]:
    """The jobs on ``workers`` processes, each result appended to ``out`` (JSON lines) as it comes."""
    results = []
    with ProcessPoolExecutor(workers) as pool, out.open("a") as file:
        for result in pool.map(run, jobs):
            results.append(result)
            file.write(json.dumps(result) + "\n")
            file.flush()
    return results


def window_table(title: str, rows_by_lr: dict[float, list[Row]], keys: tuple[str, str, str], fmt: str) -> Table:
    """Per lr: the mean metric and, per window (early, late), the means of ``keys`` (a z-score as ``+.1f``)."""
    table = Table(title=title)
    for column in ("lr", "metric", *(f"{w} {k}" for w in ("early", "late") for k in keys)):
        table.add_column(column, justify="right")
    for lr, rows in rows_by_lr.items():
        if not rows:
            continue

        def mean(window: str, key: str, rows: list[Row] = rows) -> float:
            return statistics.fmean(r[window][key] for r in rows)

        table.add_row(
            f"{lr:g}",
            f"{statistics.fmean(r['metric'] for r in rows):.4g}",
            *(format(mean(w, k), "+.1f" if k == "z" else fmt) for w in ("early", "late") for k in keys),
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(CHOOSE), choices=sorted(suite.SPECS))
    parser.add_argument("--lrs", nargs="+", type=float, default=list(suite.BASELINE_RATES))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    jobs = [(task, lr, seed) for seed in range(args.seeds) for task in args.tasks for lr in args.lrs]
    results = run_and_append(run, jobs, args.workers, args.out)
    console = Console(width=160)
    for task in args.tasks:
        rows = {lr: [r for r in results if r["task"] == task and r["lr"] == lr] for lr in args.lrs}
        title = f"{task}: D (z) per window; D < 0: the loss falls faster at the higher lr"
        console.print(window_table(title, rows, ("d", "z", "slope"), "+.2e"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
