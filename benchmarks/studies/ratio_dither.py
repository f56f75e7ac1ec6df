"""One-off study (2026-12-03, issue 20): does r's *response* to the lr locate the tuned lr where r's level does not?

The default settles Adam 2-10x below its tuned lr because the ratio of a network that trains falls at a fixed
lr (benchmarks/RESULTS.md, section 6, "The hold on falls"): the find meets the falling r, whatever the lr.
Across runs at fixed lrs, though, r(lr) has a valley close to the tuned lr on several tasks (the r(lr) study,
section 3; ``ratio_study.py --suite``): its slope in log lr is steep below the tuned lr and flat or rising
above it. A slope is a comparison of two lrs *at the same time*, so the drift of r cancels out of it. This
study measures whether a run can read that slope online, by dithering the lr (a lock-in measurement).

Adam (or SGD with momentum) at a fixed lr of the suite's baseline grid, CLARA attached with F pinned at 1
(it only measures), the lr used switched between ``lr * sqrt(2)`` and ``lr / sqrt(2)`` every ``B`` steps
(B = 50, the path's memory 1/c; 25 for runs under 1000 steps). Per block k, ``m_k`` is the mean r over the
block's second half (the path needs time to answer); per block

    D_k = q_k * (m_k - (m_{k-1} + m_{k+1}) / 2)       q_k = +1 on the high blocks, -1 on the low

so ``e = D / (m ln 2)`` estimates the elasticity d ln r / d ln lr at the run's lr (the high and low blocks
differ by a factor 2). Per window (early: steps T/15 ... T/3, late: T/3 ... T): the mean e, its z-score, the
mean r, with the dithered run's final metric.

    python benchmarks/studies/ratio_dither.py --out /tmp/rd.jsonl                  # the choose tasks, Adam
    python benchmarks/studies/ratio_dither.py --families SGDm --tasks mlp cnn --out /tmp/rd.jsonl

Verdict and numbers: ``benchmarks/RESULTS.md``, section 6 ("What r's response to the lr sees"); the runs:
``benchmarks/results/ratio_dither.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite
from dither import dithered_training, run_and_append, window_table

from lightning_clara import CLARA

CHOOSE = ("mlp", "cnn", "lm-short", "gru", "mse")


def block_length(steps: int) -> int:
    return 25 if steps < 1000 else 50


def lock_in(ratios: list[float], block: int, start: int, stop: int) -> dict[str, float]:
    """Mean elasticity, its z-score and the mean r over the blocks within steps ``start ... stop``."""
    half = block // 2
    means = [statistics.fmean(ratios[k * block + half : (k + 1) * block]) for k in range(len(ratios) // block)]
    e = [
        (1 if k % 2 == 0 else -1) * (means[k] - (means[k - 1] + means[k + 1]) / 2) / (means[k] * math.log(2.0))
        for k in range(1, len(means) - 1)
        if start <= k * block and (k + 1) * block <= stop
    ]
    inside = [means[k] for k in range(len(means)) if start <= k * block and (k + 1) * block <= stop]
    if len(e) < 3 or not all(math.isfinite(v) for v in e):
        return {"e": math.nan, "z": math.nan, "r": math.nan, "blocks": len(e)}
    error = statistics.stdev(e) / math.sqrt(len(e) / 2)  # neighbouring values share a block
    mean = statistics.fmean(e)
    return {"e": mean, "z": mean / error if error > 0 else math.nan, "r": statistics.fmean(inside), "blocks": len(e)}


def run(job: tuple[str, str, float, int]) -> dict[str, Any]:
    task_name, family, lr, seed = job
    torch.set_num_threads(1)
    steps = suite.SPECS[task_name].steps
    block = block_length(steps)
    task = suite.make_task(task_name, seed, steps)
    params = list(task.model.parameters())
    if family == "Adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    clara = CLARA(optimizer, min_factor=1.0, max_factor=1.0, initial_factor=1.0)

    def ratio(_: torch.Tensor) -> float:
        return clara.ratio if clara.ratio is not None and math.isfinite(clara.ratio) else 0.0

    ratios, metric = dithered_training(task_name, task, optimizer, lr, block, steps, ratio)
    return {
        "task": task_name,
        "family": family,
        "lr": lr,
        "seed": seed,
        "block": block,
        "metric": metric,
        "early": lock_in(ratios, block, steps // 15, steps // 3),
        "late": lock_in(ratios, block, steps // 3, steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(CHOOSE), choices=sorted(suite.SPECS))
    parser.add_argument("--families", nargs="+", default=["Adam"], choices=["Adam", "SGDm"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(suite.BASELINE_RATES))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    jobs = [
        (task, family, lr, seed)
        for seed in range(args.seeds)
        for family in args.families
        for task in args.tasks
        for lr in args.lrs
    ]
    results = run_and_append(run, jobs, args.workers, args.out)
    console = Console(width=160)
    for family in args.families:
        for task in args.tasks:
            rows = {
                lr: [r for r in results if r["task"] == task and r["family"] == family and r["lr"] == lr]
                for lr in args.lrs
            }
            title = f"{family}, {task}: elasticity d ln r / d ln lr per window (z), mean r"
            console.print(window_table(title, rows, ("e", "z", "r"), "+.2f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
