"""Deep networks with shuffled DataLoaders: CLARA against fixed, scheduled and learning-rate-free optimizers.

Tasks (all offline):

* ``cnn``: MNIST-1D (``mnist1d``, generated with ``make_dataset(get_dataset_args())``: 4000
  train / 1000 test, length 40), the MNIST-1D paper's CNN (3 conv layers, 25 channels, stride 2);
* ``mlp``: MNIST-1D, an MLP 40-100-100-10;
* ``lm``: a character-level transformer language model (2 pre-norm layers, width 64, 4 heads,
  context 32) on the source text of a few Python standard-library modules, 90/10 split.

Batches come from an ordinary ``DataLoader(shuffle=True)`` (batch 100 for MNIST-1D, 32 windows
for the LM), 3000 steps (75 epochs) for MNIST-1D and 600 for the LM; initial learning rates
1e-5 ... 1e-1; seeds 0 and 1. The metric is the final test accuracy (%) for MNIST-1D and the
final validation loss (nats per character) for the LM. Methods: Adam, SGD with momentum 0.9 and
AdamW (weight decay 0.01) with 5 % linear warm-up and cosine decay, each without and with CLARA
(as ``CLARACallback()`` runs it: fed the loss every step, ``total_steps`` known),
Adam with CLARA's 0.1.0 defaults (the collapse), and the peers DoG
(learning-rate free, run once per seed), Prodigy and D-Adaptation (``d0 = lr0``), Mechanic
(wrapping Adam at ``lr0``) and schedule-free AdamW (at ``lr0``; evaluated in eval mode).

The loop is a plain PyTorch loop (the engine the Lightning callback attaches, without the
Trainer's per-step cost). Writes ``benchmarks/results/deep.json``, ``deep.txt`` (the tables) and
``deep.png`` (the lr used over the steps, per method).

    python benchmarks/deep.py --workers 2        # the full grid (about 40 min on 2 cores)
    python benchmarks/deep.py --quick            # seconds: keeps the script working (tested)
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
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
LEARNING_RATES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TASKS = ("cnn", "mlp", "lm")
STEPS = {"cnn": 3000, "mlp": 3000, "lm": 600}
#: Every this many steps the lr used is recorded for the plots.
RECORD_EVERY = 10
#: CLARA's defaults of version 0.1.0, kept to show the collapse the new defaults fix.
CLARA_0_1_0 = {
    "c": 0.2,
    "initial_factor": 1.0,
    "hold_after": 0,
    "target": 1.0,
    "safeguard": False,
    "loss_brake": False,
    "sample": None,
}


@dataclass(frozen=True)
class Method:
    """One optimizer set-up of the comparison."""

    name: str
    base: str  # adam | sgdm | adamw_wc | dog | prodigy | dadapt | mechanic | schedulefree
    clara: dict[str, Any] | None = None
    family: str | None = None  # the fixed-lr baseline its regret is measured against
    lr_free: bool = False  # run once per seed, whatever lr0


METHODS: tuple[Method, ...] = (
    Method("Adam", "adam", family="Adam"),
    Method("Adam+CLARA", "adam", {}, family="Adam"),
    Method("Adam+CLARA 0.1.0", "adam", CLARA_0_1_0, family="Adam"),
    Method("SGDm", "sgdm", family="SGDm"),
    Method("SGDm+CLARA", "sgdm", {}, family="SGDm"),
    Method("AdamW-wc", "adamw_wc", family="AdamW-wc"),
    Method("AdamW-wc+CLARA", "adamw_wc", {}, family="AdamW-wc"),
    Method("DoG", "dog", lr_free=True),
    Method("Prodigy", "prodigy"),
    Method("D-Adaptation", "dadapt"),
    Method("Mechanic", "mechanic"),
    Method("Schedule-free", "schedulefree"),
)


# ---------------------------------------------------------------------------------------- data and models
@cache
def mnist1d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D generated offline with the package's default arguments (seeded inside)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"])


@cache
def text_tokens() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Characters of a few standard-library modules (printable ASCII), split 90/10."""
    import argparse as m1
    import collections as m2
    import dataclasses as m3
    import email.message as m4
    import inspect
    import json.decoder as m5
    import textwrap as m6
    import typing as m7

    text = "".join(inspect.getsource(m) for m in (m1, m2, m5, m4, m6, m3, m7))
    chars = [ch if 32 <= ord(ch) < 127 or ch == "\n" else "?" for ch in text]
    vocabulary = {ch: i for i, ch in enumerate(sorted(set(chars)))}
    ids = torch.tensor([vocabulary[ch] for ch in chars], dtype=torch.long)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], len(vocabulary)


class CNN(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 convolutions with 25 channels, then a linear layer."""

    def __init__(self, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x.unsqueeze(1)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.linear(x.flatten(1))


class TinyLM(nn.Module):
    """A causal character transformer: embeddings, pre-norm encoder layers with a causal mask, a head."""

    def __init__(self, vocabulary: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        hidden = self.embedding(x) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


@dataclass
class Task:
    """A model, a shuffled loader, the training loss and the final metric."""

    model: nn.Module
    loader: DataLoader
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    metric: Callable[[nn.Module], float]
    higher_is_better: bool


LM_CONTEXT = 32


def make_task(name: str, seed: int) -> Task:
    """The task's model (initialised with the seed) and a DataLoader(shuffle=True) seeded with it."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    if name == "lm":
        train, valid, vocabulary = text_tokens()
        windows = train[: len(train) // (LM_CONTEXT + 1) * (LM_CONTEXT + 1)].view(-1, LM_CONTEXT + 1)
        valid_windows = valid[: len(valid) // (LM_CONTEXT + 1) * (LM_CONTEXT + 1)].view(-1, LM_CONTEXT + 1)
        model: nn.Module = TinyLM(vocabulary, context=LM_CONTEXT)

        def lm_loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            (window,) = batch
            logits = module(window[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())

        def validation_loss(module: nn.Module) -> float:
            with torch.no_grad():
                return float(lm_loss(module, (valid_windows,)))

        loader = DataLoader(TensorDataset(windows), batch_size=32, shuffle=True, generator=generator)
        return Task(model, loader, lm_loss, validation_loss, higher_is_better=False)
    x, y, x_test, y_test = mnist1d()
    model = (
        CNN()
        if name == "cnn"
        else nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    )

    def classification_loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(module(inputs), targets)

    def accuracy(module: nn.Module) -> float:
        with torch.no_grad():
            return float((module(x_test).argmax(1) == y_test).float().mean()) * 100

    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=generator)
    return Task(model, loader, classification_loss, accuracy, higher_is_better=True)


def batches(loader: DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``steps`` batches, epoch after epoch of the shuffled loader."""
    taken = 0
    while True:
        for batch in loader:
            if taken == steps:
                return
            taken += 1
            yield batch


# ---------------------------------------------------------------------------------------- optimizers
def make_optimizer(
    method: Method, params: list[nn.Parameter], lr0: float, steps: int, batch_norm: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    if method.base == "adam":
        return torch.optim.Adam(params, lr=lr0), None
    if method.base == "sgdm":
        return torch.optim.SGD(params, lr=lr0, momentum=0.9), None
    if method.base == "adamw_wc":
        optimizer = torch.optim.AdamW(params, lr=lr0, weight_decay=0.01)
        warmup = max(1, steps // 20)

        def warmup_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    if method.base in ("dog", "dog_avg"):
        import dog

        # "dog_avg" as its authors prescribe (dog 1.0.3's docstring): reps_rel 1e-4 for batch-norm models, and
        # evaluated at its polynomial-decay average (train() keeps it); "dog": the last iterate, reps_rel 1e-6
        return dog.DoG(params, reps_rel=1e-4 if batch_norm and method.base == "dog_avg" else 1e-6), None
    if method.base == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=1.0, d0=lr0), None
    if method.base == "dadapt":
        import dadaptation

        return dadaptation.DAdaptAdam(params, lr=1.0, d0=lr0), None
    if method.base == "mechanic":
        from mechanic_pytorch import mechanize

        return mechanize(torch.optim.Adam)(params, lr=lr0), None
    if method.base == "schedulefree":
        import schedulefree

        optimizer = schedulefree.AdamWScheduleFree(params, lr=lr0)
        optimizer.train()
        return optimizer, None
    raise ValueError(f"unknown optimizer {method.base!r}")


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The step size the method used last, as each peer defines it (lr x its own scale)."""
    group = optimizer.param_groups[0]
    if "eta" in group:  # DoG: one eta per parameter, the first one stands for all
        return float(group["eta"][0])
    if "d" in group:  # Prodigy, D-Adaptation: lr x d
        return float(group["lr"]) * float(group["d"])
    mechanic = optimizer.state.get("_mechanic")
    if mechanic is not None and "s" in mechanic:  # Mechanic: lr x sum of its scales
        return float(group["lr"]) * float(torch.as_tensor(mechanic["s"]).sum())
    return float(group["lr"])


# ---------------------------------------------------------------------------------------- one run
def train(task: Task, method: Method, lr0: float, steps: int) -> dict[str, Any]:
    """Train ``task`` once as ``CLARACallback()`` would (every step's loss to CLARA, the run's length known).

    Returns the final metric (NaN if the run diverged), the lr used every ``RECORD_EVERY`` steps,
    the safeguard's alarms and the wall time. ``suite.py`` trains its tasks with it too.
    """
    from lightning_clara import CLARA

    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.model.modules())
    optimizer, scheduler = make_optimizer(method, list(task.model.parameters()), lr0, steps, batch_norm)
    averager = None
    if method.base == "dog_avg":
        import dog

        averager = dog.PolynomialDecayAverager(task.model)
    clara = None if method.clara is None else CLARA(optimizer, **{"total_steps": steps, **method.clara})
    lrs: list[float] = []
    start = time.perf_counter()
    task.model.train()
    for step, batch in enumerate(batches(task.loader, steps)):
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if averager is not None:
            averager.step()
        if clara is not None:
            clara.observe_loss(loss.detach())  # as CLARACallback does: every step's loss
        if step % RECORD_EVERY == 0 or step == steps - 1:  # the lr this step ran at: before the schedule moves it
            lrs.append(clara.lr_used[0] if clara is not None else effective_lr(optimizer))
        if scheduler is not None:
            scheduler.step()
    if method.base == "schedulefree":
        optimizer.eval()  # schedule-free evaluates at its averaged point
    evaluated = task.model if averager is None else averager.averaged_model
    if averager is not None:  # the averager blends float buffers too: a causal mask's -inf x 0 became NaN
        trained = dict(task.model.named_buffers())
        for name, buffer in evaluated.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.copy_(trained[name])
    evaluated.eval()
    metric = task.metric(evaluated)
    alarms = 0 if clara is None else clara.num_safeguard_alarms
    return {"metric": metric, "final_lr": lrs[-1], "lrs": lrs, "alarms": alarms, "seconds": time.perf_counter() - start}


def run_one(task_name: str, method: Method, lr0: float, seed: int, steps: int) -> dict[str, Any]:
    """Train once on one thread; a diverged run scores 0 % (a classifier) or the uniform model's loss (the LM)."""
    torch.set_num_threads(1)
    task = make_task(task_name, seed)
    result = train(task, method, lr0, steps)
    if not math.isfinite(result["metric"]):
        result["metric"] = 0.0 if task.higher_is_better else math.log(text_tokens()[2])
    return result


def _job(args: tuple[str, Method, float, int, int]) -> tuple[tuple[str, str, float, int], dict[str, Any]]:
    task, method, lr0, seed, steps = args
    return (task, method.name, lr0, seed), run_one(task, method, lr0, seed, steps)


# ---------------------------------------------------------------------------------------- report
@dataclass
class Row:
    """One method on one task: its mean metric per lr0 (over seeds), and derived numbers."""

    per_lr: list[float]
    final_lr: list[float]
    better: Callable[[float, float], bool] = field(repr=False)

    @property
    def worst(self) -> float:
        return min(self.per_lr) if self.better(1, 0) else max(self.per_lr)

    @property
    def best(self) -> float:
        return max(self.per_lr) if self.better(1, 0) else min(self.per_lr)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_lr)


def summarise(
    results: dict[tuple[str, str, float, int], dict[str, Any]],
    tasks: list[str],
    methods: list[Method],
    lrs: list[float],
    console: Console,
) -> dict[str, Any]:
    """Per task: metric per lr0, worst/mean/best, regret of the worst case against the tuned baseline."""
    summary: dict[str, Any] = {}
    for task in tasks:
        higher = task != "lm"
        better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
        rows: dict[str, Row] = {}
        for method in methods:
            cells, finals = [], []
            for lr0 in lrs:
                runs = [
                    r
                    for (t, m, lr, _), r in results.items()
                    if t == task and m == method.name and (lr == lr0 or method.lr_free)
                ]
                if runs:
                    cells.append(statistics.fmean(r["metric"] for r in runs))
                    finals.append(math.exp(statistics.fmean(math.log(max(r["final_lr"], 1e-300)) for r in runs)))
            if cells:
                rows[method.name] = Row(cells, finals, better)
        unit = "test accuracy (%)" if higher else "validation loss (nats/char)"
        table = Table(title=f"{task}: {unit}, mean over seeds; regret = tuned baseline - worst case")
        for column in (
            "method",
            *(f"{lr0:g}" for lr0 in lrs),
            "worst",
            "mean",
            "best",
            "regret",
            "final lr (geo-mean)",
        ):
            table.add_column(column, justify="left" if column in ("method", "final lr (geo-mean)") else "right")
        summary[task] = {}
        for method in methods:
            row = rows.get(method.name)
            if row is None:
                continue
            tuned = rows[method.family].best if method.family in rows else None
            regret = None if tuned is None else (tuned - row.worst if higher else row.worst - tuned)
            summary[task][method.name] = {
                "per_lr": row.per_lr,
                "worst": row.worst,
                "mean": row.mean,
                "best": row.best,
                "tuned_baseline": tuned,
                "regret": regret,
                "final_lr": row.final_lr,
            }
            per_lr = [f"{v:.2f}" if not higher else f"{v:.1f}" for v in row.per_lr]
            if method.lr_free:
                per_lr = [per_lr[0], *["″"] * (len(lrs) - 1)]
            table.add_row(
                method.name,
                *per_lr,
                *(f"{v:.2f}" if not higher else f"{v:.1f}" for v in (row.worst, row.mean, row.best)),
                "-" if regret is None else f"{regret:+.2f}" if not higher else f"{regret:+.1f}",
                " ".join(f"{v:.0e}" for v in row.final_lr),
            )
        console.print(table)
    return summary


def plot(results: dict[tuple[str, str, float, int], dict[str, Any]], tasks: list[str], path: Path) -> None:
    """The lr used over the steps, seed 0: one panel per task and method family, one line per lr0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["Adam+CLARA 0.1.0", "Adam+CLARA", "SGDm+CLARA", "AdamW-wc+CLARA", "Prodigy", "D-Adaptation", "DoG"]
    figure, axes = plt.subplots(len(tasks), len(shown), figsize=(3.0 * len(shown), 2.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for column, name in enumerate(shown):
            axis = axes[row][column]
            for (t, m, lr0, seed), run in sorted(results.items()):
                if t == task and m == name and seed == 0:
                    xs = [i * RECORD_EVERY for i in range(len(run["lrs"]))]
                    axis.semilogy(xs, [max(v, 1e-14) for v in run["lrs"]], label=f"lr0 {lr0:g}", linewidth=1)
            axis.set_title(f"{task}: {name}", fontsize=8)
            axis.tick_params(labelsize=7)
            if column == 0:
                axis.set_ylabel("lr used", fontsize=8)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per task)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a few steps of every method, for the test suite")
    parser.add_argument(
        "--sample", default=None, help="CLARA's sample for the CLARA methods but 0.1.0's: an int or 'none' (full paths)"
    )
    parser.add_argument("--out", type=Path, help="default: results/deep.json (--quick: a temporary folder)")
    args = parser.parse_args(argv)
    if args.out is None:  # a quick run never writes into the kept results
        scratch = Path(tempfile.mkdtemp(prefix="clara-")) if args.quick else None
        args.out = HERE / "results" / "deep.json" if scratch is None else scratch / "deep.json"
    known = {m.name: m for m in METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(known)}")
    methods = [known[m] for m in args.methods]
    if args.sample is not None:
        sample = None if args.sample.lower() == "none" else int(args.sample)
        methods = [
            replace(m, clara={"sample": sample, **m.clara}) if m.clara is not None else m for m in methods
        ]  # 0.1.0's own "sample": None wins
    if args.quick:
        args.seeds, args.lrs, args.steps = 1, [1e-3], 30
    jobs = [
        (task, method, lr0, seed, args.steps or STEPS[task])
        for task in args.tasks
        for method in methods
        for lr0 in (args.lrs[:1] if method.lr_free else args.lrs)
        for seed in range(args.seeds)
    ]
    jobs.sort(key=lambda job: -STEPS[job[0]] * (3 if job[0] == "lm" else 2 if job[0] == "cnn" else 1))  # long first
    console = Console(width=220, record=True)
    results: dict[tuple[str, str, float, int], dict[str, Any]] = {}
    start = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            for key, value in pool.map(_job, jobs):
                results[key] = value
    else:
        for job in jobs:
            key, value = _job(job)
            results[key] = value
    summary = summarise(results, args.tasks, methods, args.lrs, console)
    console.print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {"tasks": args.tasks, "seeds": args.seeds, "lrs": args.lrs, "steps": args.steps or STEPS},
        "summary": summary,
        "runs": [{"task": k[0], "method": k[1], "lr0": k[2], "seed": k[3], **v} for k, v in results.items()],
    }
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".txt").write_text(console.export_text())
    plot(results, args.tasks, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out}, {args.out.with_suffix('.txt')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
