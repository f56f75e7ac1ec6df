"""One-off study (2026-12-03, issue 22): what the ratio sees when it is read every k-th step.

A statistic read every k-th step would let CLARA skip its gather and path update on k - 1 of every k
steps (its per-step cost divided by about k). Read every k-th step, the realised "step" is the
k-step displacement ``theta(t) - theta(t + k)``, and the null model's reference is the same
optimizer's k-step displacement on i.i.d. Gaussian gradients.

Per task (``suite.py``'s choose tasks), optimizer (Adam; SGD with momentum 0.9) and fixed lr, one run
(seed 0, the lr never moves) records every step on each tensor's CLARA sample (4096 coordinates) and
keeps, for every k, the path of the k-step displacements (c = 0.1, the library's default) and
``sum ||p||^2`` at each read. The reference is the same computation on a null run: the same optimizer,
on tensors of the sample sizes, fed N(0, 1) gradients (mean over 4 seeds; neither Adam's nor SGD's
unit steps depend on the lr there). The ratio at a read is ``sum ||p||^2 / reference``.

Printed per task and optimizer: for each lr and k, the mean ratio over the reads in the first third
of the run (after step steps/15) and in the rest, the spread of the late reads (their std), and the
run's final metric. Verdict and numbers: ``benchmarks/RESULTS.md`` ("A statistic read every k-th step").

    python benchmarks/studies/kstep.py --out /tmp/kstep.json         # about 2 minutes on 2 cores
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite
from deep import batches

from lightning_clara.sampling import DEFAULT_SAMPLE, sample_indices

KS = (1, 2, 4, 8)
C = 0.1
TASKS = ("mlp", "cnn", "lm-short", "gru", "mse")
LRS = {"Adam": (1e-4, 1e-3, 1e-2, 1e-1), "SGDm": (1e-3, 1e-2, 1e-1, 1.0)}
MAX_STEPS = 1500
NULL_SEEDS = 4


def optimizer_for(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


class Paths:
    """For every k, the paths of the k-step displacements on each tensor's sample, and sum ||p||^2 per read."""

    def __init__(self, sizes: list[int]) -> None:
        self.windows = {k: [torch.zeros(n, dtype=torch.float64) for n in sizes] for k in KS}
        self.paths = {k: [torch.zeros(n, dtype=torch.float64) for n in sizes] for k in KS}
        self.reads: dict[int, list[float]] = {k: [] for k in KS}
        self.steps = 0

    def add(self, steps: list[torch.Tensor]) -> None:
        self.steps += 1
        for k in KS:
            windows = self.windows[k]
            for window, step in zip(windows, steps, strict=True):
                window.add_(step)
            if self.steps % k:
                continue
            total = 0.0
            for window, path in zip(windows, self.paths[k], strict=True):
                norm = float(window.norm())
                if norm > 0:
                    path.mul_(1 - C).add_(window, alpha=C / norm)
                total += float(path.dot(path))
                window.zero_()
            self.reads[k].append(total)


def samples(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [sample_indices(p.numel(), DEFAULT_SAMPLE, (0, i, p.numel())) for i, p in enumerate(params)]


def null_reads(optimizer_name: str, sizes: list[int], steps: int) -> dict[int, list[float]]:
    """The reference: mean sum ||p||^2 per read of the same optimizer on N(0, 1) gradients."""
    runs = []
    for seed in range(NULL_SEEDS):
        generator = torch.Generator().manual_seed(10_000 + seed)
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        optimizer = optimizer_for(optimizer_name, params, 1e-3)
        paths = Paths(sizes)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            before = [p.detach().double().clone() for p in params]
            optimizer.step()
            paths.add([b - p.detach().double() for b, p in zip(before, params, strict=True)])
        runs.append(paths.reads)
    return {k: [statistics.fmean(run[k][i] for run in runs) for i in range(len(runs[0][k]))] for k in KS}


def real_run(task_name: str, optimizer_name: str, lr: float, steps: int) -> dict[str, Any]:
    task = suite.make_task(task_name, 0)
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = optimizer_for(optimizer_name, params, lr)
    indices = samples(params)
    paths = Paths([len(i) for i in indices])
    losses = []
    for batch in batches(task.loader, steps):
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().reshape(-1)[i].double() for p, i in zip(params, indices, strict=True)]
        optimizer.step()
        after = [p.detach().reshape(-1)[i].double() for p, i in zip(params, indices, strict=True)]
        paths.add([b - a for b, a in zip(before, after, strict=True)])
        losses.append(float(loss.detach()))
    task.model.eval()
    metric = task.metric(task.model)
    return {"reads": paths.reads, "sizes": [len(i) for i in indices], "metric": metric, "loss_end": losses[-50:]}


def job(args: tuple[str, str, float]) -> tuple[tuple[str, str, float], dict[str, Any]]:
    torch.set_num_threads(1)
    task_name, optimizer_name, lr = args
    steps = min(suite.SPECS[task_name].steps, MAX_STEPS)
    out = real_run(task_name, optimizer_name, lr, steps)
    null = null_reads(optimizer_name, out.pop("sizes"), steps)
    ratios = {k: [r / n for r, n in zip(out["reads"][k], null[k], strict=True)] for k in KS}
    loss_end = statistics.fmean(out["loss_end"])
    return args, {"ratios": ratios, "metric": out["metric"], "steps": steps, "loss_end": loss_end}


def window(ratios: list[float], k: int, first: int, last: int) -> list[float]:
    """The ratios read in steps ``first .. last - 1`` (read i comes after step (i + 1) k)."""
    return [r for i, r in enumerate(ratios) if first <= (i + 1) * k < last]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    jobs = [(t, o, lr) for t in args.tasks for o, lrs in LRS.items() for lr in lrs]
    with ProcessPoolExecutor(args.workers) as pool:
        results = dict(pool.map(job, jobs))
    args.out.write_text(json.dumps([{"task": t, "optimizer": o, "lr": lr, **r} for (t, o, lr), r in results.items()]))
    console = Console()
    for task_name in args.tasks:
        for optimizer_name, lrs in LRS.items():
            title = "mean r early (steps/15 - steps/3) / late (steps/3 - end) ± std of the late reads"
            table = Table(title=f"{task_name}, {optimizer_name}: {title}")
            table.add_column("lr")
            for k in KS:
                table.add_column(f"k={k}")
            table.add_column("metric")
            for lr in lrs:
                result = results[(task_name, optimizer_name, lr)]
                cells = []
                for k in KS:
                    ratios = result["ratios"][k]
                    steps = result["steps"]
                    early = window(ratios, k, steps // 15, steps // 3)
                    late = window(ratios, k, steps // 3, steps + 1)
                    spread = statistics.stdev(late)
                    cells.append(f"{statistics.fmean(early):.2f} / {statistics.fmean(late):.2f} ± {spread:.2f}")
                table.add_row(f"{lr:g}", *cells, f"{result['metric']:.3g}")
            console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
