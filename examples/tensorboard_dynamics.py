"""CLARA's dynamics in TensorBoard, and as a PNG for people without it: digits, SGD and Adam from bad learning rates.

Four runs of a 64-64-10 MLP on scikit-learn's digits (same seed, data and initialisation): SGD
with momentum 0.9 started at ``1e-4`` and Adam started at ``1e-6``, each once with a fixed learning rate and
once with ``CLARACallback()`` (library defaults). Every run logs to TensorBoard: the loss,
``lr-{SGD,Adam}`` from ``LearningRateMonitor`` (the scheduled lr) and, in the CLARA runs,
``clara/lr-*`` (the lr used), ``clara/ratio-*`` and ``clara/log_factor-*``. Afterwards the
script reads those scalars back from the event files with TensorBoard's ``EventAccumulator``
and draws two figures with matplotlib:

* ``<out-dir>/clara_dynamics.png`` (``--dynamics-png``): the lr used, the ratio r and log F
  of the CLARA runs against the optimizer step, with the hold (where the rule stops acting) shaded;
* ``<out-dir>/clara_rescue.png`` (``--rescue-png``): the lr used and the training loss of all
  four runs, with the test accuracy in the legend.

Everything goes under ``--out-dir`` (ignored by git); ``--readme-pictures`` writes the two PNGs
to ``docs/images/`` instead, where the README shows them (the one way to change tracked files)::

    python examples/tensorboard_dynamics.py            # about 20 seconds on one CPU core
    python examples/tensorboard_dynamics.py --quick    # a 2-epoch smoke run
    python examples/tensorboard_dynamics.py --readme-pictures   # regenerate the README's pictures
    tensorboard --logdir lightning_logs/tensorboard_dynamics/tb

Needs scikit-learn, tensorboard and matplotlib besides the package (``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_clara import CLARACallback

NUM_CLASSES = 10
BATCH_SIZE = 32
LOG_EVERY = 5
FULL_EPOCHS = 20
QUICK_EPOCHS = 2
ROOT = Path(__file__).resolve().parents[1]
README_IMAGES = ROOT / "docs" / "images"
#: torch.optim class per ``--*-lr`` option; also the ``{name}`` in the logged tags.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam}
OPTIONS: dict[str, dict[str, float]] = {"SGD": {"momentum": 0.9}, "Adam": {}}
COLORS = {"SGD": "tab:blue", "Adam": "tab:orange"}

Series = tuple[np.ndarray, np.ndarray]  # (steps, values)


@dataclass
class Run:
    """One training run and, once it finished, what it produced."""

    optimizer: str
    initial_lr: float
    clara: bool
    final_lr: float = float("nan")
    test_accuracy: float = float("nan")
    steps: int = 0
    seconds: float = 0.0
    log_dir: str = ""
    hold_after: int = 0  # CLARA runs: the step after which the damping decays (F settles)
    target: float = float("nan")  # CLARA runs: the ratio the rule steers to
    scalars: dict[str, Series] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.optimizer.lower() + ("-clara" if self.clara else "")

    @property
    def label(self) -> str:
        return f"{self.optimizer} {'+ CLARA' if self.clara else 'fixed lr'}"

    def lr_series(self) -> Series:
        """The lr each logged step used: CLARA's ``clara/lr-*``, or the (fixed) scheduled lr."""
        return self.scalars[f"clara/lr-{self.optimizer}" if self.clara else f"lr-{self.optimizer}"]


class DigitsMLP(L.LightningModule):
    """A 64-64-10 multilayer perceptron; the optimizer class and lr are given."""

    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_name = optimizer
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
        self.loss = nn.CrossEntropyLoss()
        self.test_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one mini-batch, logged per step as ``train_loss``."""
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate the test accuracy."""
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9 or Adam with default betas, at the given lr."""
        return OPTIMIZERS[self.optimizer_name](self.parameters(), lr=self.lr, **OPTIONS[self.optimizer_name])


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


def read_scalars(log_dir: Path) -> dict[str, Series]:
    """Every scalar tag of a TensorBoard run directory, as (steps, values) arrays."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return scalars


def train(run: Run, args: argparse.Namespace) -> None:
    """Fit, test and read back the TensorBoard scalars of one run (fills in ``run``)."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    train_loader, test_loader = digits_loaders(args.seed)
    model = DigitsMLP(run.optimizer, run.initial_lr)
    clara = CLARACallback() if run.clara else None
    callbacks: list[Callback] = [LearningRateMonitor(logging_interval="step")]
    callbacks += [clara] if clara is not None else []
    # a new version_N directory per invocation, so that reading it back never mixes two runs
    logger = TensorBoardLogger(args.out_dir / "tb", name=run.name, default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader)
    run.seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, dataloaders=test_loader, verbose=False)
    run.test_accuracy = float(metrics["test_acc"])
    run.steps = trainer.global_step
    run.final_lr = clara.controllers[0].lr_used[0] if clara is not None else run.initial_lr
    if clara is not None:
        run.hold_after = clara.controllers[0].settings.hold_after
        run.target = clara.controllers[0].settings.target
    run.log_dir = logger.log_dir
    run.scalars = read_scalars(Path(logger.log_dir))


def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with the given span (in logged points), bias-corrected at the start."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    mean, weight = 0.0, 0.0
    for i, value in enumerate(values):
        mean = (1 - alpha) * mean + alpha * value
        weight = (1 - alpha) * weight + alpha
        out[i] = mean / weight
    return out


def plot_dynamics(runs: list[Run], path: Path) -> None:
    """lr used, ratio and log F of the CLARA runs against the step, read back from TensorBoard."""
    clara_runs = [run for run in runs if run.clara]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7.5), sharex=True, layout="constrained")
    lr_ax, ratio_ax, factor_ax = axes
    for run in clara_runs:
        color = COLORS[run.optimizer]
        steps, lr = run.lr_series()
        lr_ax.plot(steps, lr, color=color, label=f"{run.label} (start {run.initial_lr:.0e})")
        lr_ax.axhline(run.initial_lr, color=color, linestyle=":", linewidth=1)
        steps, ratio = run.scalars[f"clara/ratio-{run.optimizer}"]
        ratio_ax.plot(steps, ratio, color=color, alpha=0.25, linewidth=0.8)
        ratio_ax.plot(steps, smooth(ratio, 10), color=color, label=f"{run.label} (EMA of 10 points)")
        steps, log_factor = run.scalars[f"clara/log_factor-{run.optimizer}"]
        factor_ax.plot(steps, log_factor, color=color, label=run.label)
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("lr used  (clara/lr-*)")
    steps = max(run.steps for run in clara_runs)
    lr_ax.set_title(
        f"CLARA dynamics on digits (logged every {LOG_EVERY} steps; dotted: initial lr);\n"
        f"from step {max(min(run.hold_after for run in clara_runs), steps // 2)} the anneal takes the lr used down "
        "(a constant scheduled lr)",
        fontsize="medium",
    )
    ratio_ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ratio_ax.set_yscale("log")
    ratio_ax.set_ylim(bottom=0.3)  # room for the legend below r = 1
    ratio_ax.yaxis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 4, 8]))
    ratio_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ratio_ax.yaxis.set_minor_formatter(NullFormatter())
    ratio_ax.set_ylabel("ratio r  (clara/ratio-*)")
    hold_after = min(run.hold_after for run in clara_runs)
    targets = "/".join(f"{t:g}" for t in sorted({run.target for run in clara_runs}))
    for ax in axes:
        ax.axvspan(hold_after, max(run.steps for run in clara_runs), color="0.5", alpha=0.12, linewidth=0)
    ratio_ax.set_title(
        f"r > target ({targets}) raises the lr, r < target lowers it, until the hold (shaded, from step "
        f"{hold_after}):\nthen the rule's steps fade out and F settles whatever r does (faint: every logged value)",
        fontsize="medium",
    )
    factor_ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    factor_ax.set_ylabel("log F  (clara/log_factor-*)")
    factor_ax.set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if ax is ratio_ax else "lower right", fontsize="small")
    save(fig, path)


def plot_rescue(runs: list[Run], path: Path, epochs: int, seed: int) -> None:
    """The README picture: lr used and training loss, each optimizer with a fixed lr and with CLARA."""
    fig, (lr_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for run in runs:
        style = {"color": COLORS[run.optimizer], "linestyle": "-" if run.clara else "--"}
        steps, lr = run.lr_series()
        lr_ax.plot(steps, lr, label=run.label, **style)
        steps, loss = run.scalars["train_loss"]
        loss_ax.plot(steps, smooth(loss, 10), label=f"{run.label}: test acc {run.test_accuracy:.1%}", **style)
    lr_ax.set_yscale("log")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_ylabel("learning rate used")
    lr_ax.set_title("learning rate")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (EMA of 10 logged points)")
    loss_ax.set_title("training loss")
    for ax in (lr_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        "CLARA rescuing a bad initial learning rate: "
        f"64-64-10 MLP on digits, {epochs} epochs of batch {BATCH_SIZE}, seed {seed}"
    )
    save(fig, path)


def save(fig: plt.Figure, path: Path) -> None:
    """Write a small PNG (dpi 100, no software tag, so that reruns give the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def summary_table(runs: list[Run]) -> Table:
    """The runs as a rich table."""
    table = Table(title="digits: fixed learning rate vs CLARA (read back from TensorBoard)")
    for column in ("run", "initial lr", "final lr", "test acc", "steps", "fit time"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in runs:
        table.add_row(
            run.name,
            f"{run.initial_lr:.2e}",
            f"{run.final_lr:.2e}",
            f"{run.test_accuracy:.3f}",
            str(run.steps),
            f"{run.seconds:.1f} s",
        )
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sgd-lr", type=float, default=1e-4, help="initial SGD learning rate (default: %(default)g)")
    parser.add_argument("--adam-lr", type=float, default=1e-6, help="initial Adam learning rate (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default: {FULL_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("lightning_logs/tensorboard_dynamics"),
        help="TensorBoard logs (tb/), clara_dynamics.png and summary.json go here (default: %(default)s)",
    )
    parser.add_argument(
        "--dynamics-png",
        type=Path,
        default=None,
        help="where the dynamics plot goes (default: <out-dir>/clara_dynamics.png)",
    )
    parser.add_argument(
        "--rescue-png",
        type=Path,
        default=None,
        help="where the lr-and-loss picture goes (default: <out-dir>/clara_rescue.png)",
    )
    parser.add_argument(
        "--readme-pictures",
        action="store_true",
        help=f"write both PNGs to {README_IMAGES.relative_to(ROOT)}/, the README's pictures (tracked files)",
    )
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_EPOCHS}-epoch smoke run (seconds)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.sgd_lr <= 0 or args.adam_lr <= 0:
        parser.error("--sgd-lr and --adam-lr must be > 0")
    if args.readme_pictures and (args.dynamics_png or args.rescue_png):
        parser.error("--readme-pictures chooses where both PNGs go: drop --dynamics-png / --rescue-png")
    picture_dir = README_IMAGES if args.readme_pictures else args.out_dir
    args.dynamics_png = args.dynamics_png or picture_dir / "clara_dynamics.png"
    args.rescue_png = args.rescue_png or picture_dir / "clara_rescue.png"
    return args


def quiet_lightning() -> None:
    """Keep the output to the table: no device banners, no single-process data-loader advice."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    # Lightning 2.6 calls a pytree API that recent torch deprecates, inside its own loops.
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def main(argv: list[str] | None = None) -> list[Run]:
    """Train the four runs, print the table, draw both PNGs, write ``summary.json``."""
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)  # a 64-64-10 MLP gains nothing from intra-op threads
    console = Console()
    runs = [
        Run(optimizer, lr, clara)
        for optimizer, lr in (("SGD", args.sgd_lr), ("Adam", args.adam_lr))
        for clara in (False, True)
    ]
    for run in runs:
        console.print(f"[bold]{run.name}[/]: {args.epochs} epoch(s), initial lr {run.initial_lr:g}")
        train(run, args)
    console.print(summary_table(runs))
    plot_dynamics(runs, args.dynamics_png)
    plot_rescue(runs, args.rescue_png, args.epochs, args.seed)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [{k: v for k, v in asdict(run).items() if k != "scalars"} | {"name": run.name} for run in runs],
        "tags": {run.name: sorted(run.scalars) for run in runs},
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"dynamics plot: {args.dynamics_png}")
    console.print(f"rescue plot:   {args.rescue_png}")
    console.print(f"TensorBoard:   tensorboard --logdir {args.out_dir / 'tb'}")
    return runs


if __name__ == "__main__":
    main()
