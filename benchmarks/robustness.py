"""Robustness to the initial learning rate: the paper's protocol (ALGORITHM.md) on bundled data.

Logistic regression (one linear layer, no feature scaling, 80/20 split, batch 128, 100 epochs)
on scikit-learn's breast_cancer, iris, wine and digits, plus an MLP (64-128-10) on digits;
initial learning rates 1e-6 ... 1; seeds 0-4. Methods: SGD, Adam, their CLARA versions
(library default as ``CLARACallback()`` runs it, fed every step's loss and the run's length;
unit-step; and the paper's rule with d = 1e-3), D-Adaptation (DAdaptAdam,
d0 = lr0) and Prodigy (d0 = lr0). Prints the table (mean +- std test accuracy), the worst and
mean over the lr grid per method, the paper's numbers beside ours, and writes
``benchmarks/results/robustness.json``.

    python benchmarks/robustness.py                 # full grid (about an hour on 2 cores)
    python benchmarks/robustness.py --smoke         # seconds: keeps the script working (tested)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
LEARNING_RATES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TASKS = ("breast_cancer", "iris", "wine", "digits", "digits_mlp")
PAPER_COLUMNS = {"breast_cancer": "bc", "iris": "iris", "wine": "wine", "digits": "digits"}


@dataclass(frozen=True)
class Method:
    """One optimizer set-up of the comparison."""

    name: str
    base: str  # "sgd" | "adam" | "dadapt" | "prodigy"
    clara: dict[str, Any] | None = None
    paper_row: str | None = None  # the row of reference/paper_results.md to print beside ours


METHODS: tuple[Method, ...] = (
    Method("SGD", "sgd", paper_row="SGD"),
    Method("SGD+CLARA", "sgd", {}, paper_row="SGD-C"),
    Method("SGD+CLARA unit-step", "sgd", {"unit_step": True}, paper_row="SGD-Cus"),
    Method("SGD+CLARA paper", "sgd", {"preset": "paper"}),
    Method("Adam", "adam", paper_row="Adam"),
    Method("Adam+CLARA", "adam", {}, paper_row="Adam-C"),
    Method("Adam+CLARA unit-step", "adam", {"unit_step": True}, paper_row="Adam-Cus"),
    Method("Adam+CLARA paper", "adam", {"preset": "paper"}),
    Method("D-Adaptation", "dadapt", paper_row="DAdapt"),
    Method("Prodigy", "prodigy"),
)


def load_task(task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The task's data, split 80/20 with the seed (no feature scaling, as in the paper)."""
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
    from sklearn.model_selection import train_test_split

    loaders: dict[str, Callable[..., Any]] = {
        "breast_cancer": load_breast_cancer,
        "iris": load_iris,
        "wine": load_wine,
        "digits": load_digits,
        "digits_mlp": load_digits,
    }
    x, y = loaders[task](return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_optimizer(method: Method, params: list[torch.nn.Parameter], lr0: float) -> torch.optim.Optimizer:
    if method.base == "sgd":
        return torch.optim.SGD(params, lr=lr0)
    if method.base == "adam":
        return torch.optim.Adam(params, lr=lr0)
    if method.base == "dadapt":
        import dadaptation

        return dadaptation.DAdaptAdam(params, lr=1.0, d0=lr0)
    import prodigyopt

    return prodigyopt.Prodigy(params, lr=1.0, d0=lr0)


def run_one(task: str, method: Method, lr0: float, seed: int, epochs: int) -> dict[str, Any]:
    """Train once; return final test accuracy (%), final lr used (CLARA) and wall time."""
    from lightning_clara import CLARA

    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_task(task, seed)
    classes = int(max(y_train.max(), y_test.max())) + 1
    torch.manual_seed(seed)
    features = x_train.shape[1]
    if task == "digits_mlp":
        model: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(features, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes)
        )
    else:
        model = torch.nn.Linear(features, classes)
    optimizer = make_optimizer(method, list(model.parameters()), lr0)
    clara = None
    if method.clara is not None:
        options = dict(method.clara)
        preset = options.pop("preset", None)
        if preset == "paper":
            clara = CLARA.paper(optimizer, **options)
        else:  # as CLARACallback() runs it: fed every step's loss, the run's length known
            steps = epochs * math.ceil(len(x_train) / 128)
            clara = CLARA(optimizer, **{"total_steps": steps, **options})
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for begin in range(0, len(x_train), 128):
            batch = order[begin : begin + 128]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if clara is not None:
                clara.observe_loss(loss.detach())
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean()) * 100
    final_lr = clara.lr_used[0] if clara is not None else float(optimizer.param_groups[0]["lr"])
    return {"accuracy": accuracy, "final_lr": final_lr, "seconds": time.perf_counter() - start}


def _job(args: tuple[str, Method, float, int, int]) -> tuple[tuple[str, str, float, int], dict[str, Any]]:
    task, method, lr0, seed, epochs = args
    return (task, method.name, lr0, seed), run_one(task, method, lr0, seed, epochs)


def read_paper_results() -> dict[tuple[str, str, float], float]:
    """(row, column, lr0) -> accuracy from ../shared/reference/paper_results.md, when present."""
    for candidate in (HERE.parent.parent / "shared" / "reference" / "paper_results.md",):
        if candidate.exists():
            break
    else:
        return {}
    out: dict[tuple[str, str, float], float] = {}
    header: list[str] = []
    for line in candidate.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        if cells[0] == "lr0":
            header = cells
            continue
        try:
            lr0 = float(cells[0])
        except ValueError:
            continue
        for column, value in zip(header[2:], cells[2:], strict=False):
            out[(cells[1], column, lr0)] = float(value)
    return out


def summarise(
    results: dict[tuple[str, str, float, int], dict[str, Any]],
    tasks: list[str],
    methods: list[Method],
    lrs: list[float],
    console: Console,
) -> dict[str, Any]:
    """Print one table per task and the worst/mean summary; return the numbers."""
    paper = read_paper_results()
    summary: dict[str, Any] = {}
    for task in tasks:
        table = Table(title=f"{task}: test accuracy (%) mean ± std over seeds; [paper]")
        table.add_column("method")
        for lr0 in lrs:
            table.add_column(f"{lr0:g}", justify="right")
        table.add_column("worst", justify="right")
        table.add_column("mean", justify="right")
        for method in methods:
            cells, means = [], []
            for lr0 in lrs:
                accs = [
                    r["accuracy"]
                    for (t, m, lr, _), r in results.items()
                    if t == task and m == method.name and lr == lr0
                ]
                if not accs:
                    cells.append("-")
                    continue
                mean = statistics.fmean(accs)
                std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
                means.append(mean)
                cell = f"{mean:.1f}±{std:.1f}"
                column = PAPER_COLUMNS.get(task)
                if method.paper_row and column and (method.paper_row, column, lr0) in paper:
                    cell += f" [{paper[(method.paper_row, column, lr0)]:.1f}]"
                cells.append(cell)
            worst = min(means) if means else math.nan
            average = statistics.fmean(means) if means else math.nan
            summary.setdefault(task, {})[method.name] = {"worst": worst, "mean": average, "per_lr": means}
            table.add_row(method.name, *cells, f"{worst:.1f}", f"{average:.1f}")
        console.print(table)
    return summary


def plot(summary: dict[str, Any], lrs: list[float], path: Path) -> None:
    """Accuracy against the initial learning rate, one panel per task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), sharey=True, squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for name, entry in summary[task].items():
            if len(entry["per_lr"]) != len(lrs):
                continue
            style = "-" if "CLARA" in name else ("--" if name in ("D-Adaptation", "Prodigy") else ":")
            axis.semilogx(lrs, entry["per_lr"], style, marker="o", markersize=3, label=name)
        axis.set_title(task)
        axis.set_xlabel("initial learning rate")
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="tiny grid, for the test suite")
    parser.add_argument("--sample", default=None, help="CLARA's sample for the CLARA methods: an int or 'none'")
    parser.add_argument("--out", type=Path, help="default: results/robustness.json (--smoke: a temporary folder)")
    parser.add_argument("--plot-only", type=Path, default=None, help="redraw the PNG from a saved JSON")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run never writes into the kept results
        scratch = Path(tempfile.mkdtemp(prefix="clara-")) if args.smoke else None
        args.out = HERE / "results" / "robustness.json" if scratch is None else scratch / "robustness.json"
    if args.plot_only is not None:
        report = json.loads(args.plot_only.read_text())
        plot(report["summary"], report["config"]["lrs"], args.plot_only.with_suffix(".png"))
        return 0
    if args.smoke:
        args.tasks, args.seeds, args.epochs, args.lrs = ["iris", "digits"], 1, 1, [1e-4, 1.0]
    known = {m.name: m for m in METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(known)}")
    methods = [known[m] for m in args.methods]
    if args.sample is not None:
        sample = None if args.sample.lower() == "none" else int(args.sample)
        methods = [replace(m, clara={"sample": sample, **m.clara}) if m.clara is not None else m for m in methods]
    if args.smoke:
        methods = [m for m in methods if m.base in ("sgd", "adam")]
    jobs = [
        (t, m, lr, s, args.epochs) for t in args.tasks for m in methods for lr in args.lrs for s in range(args.seeds)
    ]
    console = Console(width=200)
    results: dict[tuple[str, str, float, int], dict[str, Any]] = {}
    columns = (
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=args.smoke) as progress:
        task_id = progress.add_task("runs", total=len(jobs))
        if args.workers > 1:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                for key, value in pool.map(_job, jobs, chunksize=4):
                    results[key] = value
                    progress.advance(task_id)
        else:
            for job in jobs:
                key, value = _job(job)
                results[key] = value
                progress.advance(task_id)
    summary = summarise(results, args.tasks, methods, args.lrs, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": {"tasks": args.tasks, "seeds": args.seeds, "epochs": args.epochs, "lrs": args.lrs},
                "summary": summary,
                "runs": [{"task": k[0], "method": k[1], "lr0": k[2], "seed": k[3], **v} for k, v in results.items()],
            },
            indent=1,
        )
    )
    plot(summary, args.lrs, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
