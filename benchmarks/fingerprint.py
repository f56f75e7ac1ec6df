"""Trajectory fingerprints: ``float.hex`` of log F, the ratio and the lr used at every step, per configuration.

A refactor that means to change nothing (issue 22: one path engine, one home per concern) must leave
every fingerprint identical, bit for bit. The configurations span what the library branches on:
optimizer families and their references (closed form, Monte Carlo), sampled and full paths
(``sample=None``: every coordinate), both rules, the paper's variants, scopes, bounds, the loss brake and the
safeguard fed every step's loss, the run-length defaults, a scheduler, and the NaN/inf skip.
Each is a plain loop (what ``CLARACallback`` does per step: ``optimizer.step(closure)``, then
``observe_loss``) on a small float32 MLP whose middle weight (128 x 64 = 8192 entries) is larger than
the default sample, on fixed regression batches.

    python benchmarks/fingerprint.py --out benchmarks/results/fingerprint.json     # write them
    python benchmarks/fingerprint.py --check benchmarks/results/fingerprint.json   # compare: exit 1 on a change
    python benchmarks/fingerprint.py --smoke                                       # a few configurations, short

Fingerprints are exact on one machine and torch build; across machines or builds a float may differ
in its last bit, so compare runs made on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "fingerprint.json"

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Config:
    """One trajectory: the optimizer, CLARA's options, and what the loop feeds it."""

    optimizer: OptimizerFactory
    options: dict[str, Any] = field(default_factory=dict)
    feed_loss: bool = True  # observe_loss after every step, as both callbacks do
    paper: bool = False  # CLARA.paper(optimizer, **options)
    two_groups: bool = False  # the last layer in its own param group
    scheduler: bool = False  # a cosine schedule on the base lr
    nan_at: tuple[int, ...] = ()  # batches with a NaN input


def _sgd(lr: float = 0.05, **kwargs: Any) -> OptimizerFactory:
    return lambda groups: torch.optim.SGD(groups, lr=lr, **kwargs)


def _adam(lr: float = 1e-3, cls: type[torch.optim.Optimizer] = torch.optim.Adam, **kwargs: Any) -> OptimizerFactory:
    return lambda groups: cls(groups, lr=lr, **kwargs)


CONFIGS: dict[str, Config] = {
    "sgd": Config(_sgd()),
    "sgd-momentum": Config(_sgd(momentum=0.9)),
    "sgd-nesterov": Config(_sgd(momentum=0.9, nesterov=True)),
    "adam": Config(_adam()),
    "adamw": Config(_adam(cls=torch.optim.AdamW, weight_decay=0.01)),
    "adam-no-loss": Config(_adam(), feed_loss=False),
    "adam-total-steps": Config(_adam(), {"total_steps": 160}),
    "adam-anneal": Config(_adam(), {"total_steps": 160, "hold_after": 40}),  # the anneal over steps 80-160
    "adam-small-sample": Config(_adam(), {"sample": 64}),
    "adam-full-paths": Config(_adam(), {"sample": None}),
    "sgd-momentum-full": Config(_sgd(momentum=0.9), {"sample": None}),
    "rmsprop": Config(_adam(cls=torch.optim.RMSprop)),
    "adagrad": Config(_adam(lr=0.01, cls=torch.optim.Adagrad)),
    "nadam": Config(_adam(cls=torch.optim.NAdam)),
    "paper-sgd": Config(_sgd(), paper=True),
    "paper-adam": Config(_adam(), paper=True),
    "unit-step": Config(_sgd(), {"unit_step": True, "sample": None}),
    "salera": Config(_sgd(), {"variant": "salera", "sample": None}),
    "param-group-scope": Config(_adam(), {"scope": "param_group"}, two_groups=True),
    "bounds": Config(_sgd(), {"max_lr": 0.004, "min_factor": 0.05}),
    "safeguard": Config(_adam(), {"safeguard": True}),
    "scheduler": Config(_adam(), scheduler=True),
    "nan-skipped": Config(_sgd(momentum=0.9), nan_at=(30, 31, 50)),
    "nan-stepped": Config(_sgd(momentum=0.9), {"skip_nonfinite": False}, nan_at=(30,)),
}
SMOKE = ("sgd", "adam", "adam-full-paths", "paper-sgd", "nan-skipped")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 1, generator=generator)
    out = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        out.append((x, (x @ weight).sin() + 0.1 * torch.randn(32, 1, generator=generator)))
    return out


def _hex(value: float | None) -> str | None:
    return None if value is None else float(value).hex()


def trajectory(config: Config, steps: int) -> list[list[Any]]:
    """Per step: [log F per group, ratio per group, lr used per group] as float.hex strings."""
    from lightning_clara import CLARA

    model = _model()
    params = list(model.parameters())
    groups = [{"params": params[:-2]}, {"params": params[-2:]}] if config.two_groups else [{"params": params}]
    optimizer = config.optimizer(groups)
    clara = CLARA.paper(optimizer, **config.options) if config.paper else CLARA(optimizer, **config.options)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if config.scheduler else None
    rows = []
    for t, (x, y) in enumerate(_batches(steps)):
        if t in config.nan_at:
            x = x.clone()
            x[0, 0] = math.nan

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        if config.feed_loss:
            clara.observe_loss(loss.detach())
        if scheduler is not None:
            scheduler.step()
        rows.append(
            [
                [_hex(v) for v in clara.log_factors],
                [_hex(v) for v in clara.ratios],
                [_hex(v) for v in clara.lr_used],
            ]
        )
    clara.detach()
    return rows


def fingerprints(names: list[str], steps: int) -> dict[str, dict[str, Any]]:
    out = {}
    torch.set_num_threads(1)  # the same reductions every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN configurations warn by design
        for name in names:
            rows = trajectory(CONFIGS[name], steps)
            digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
            out[name] = {"digest": digest, "steps": rows}
    return out


def compare(current: dict[str, dict[str, Any]], saved: dict[str, dict[str, Any]]) -> list[str]:
    """One line per configuration that differs (or is missing), naming the first step that differs."""
    problems = []
    for name, entry in current.items():
        if name not in saved:
            problems.append(f"{name}: not in the saved fingerprints")
            continue
        if entry["digest"] == saved[name]["digest"]:
            continue
        mine, theirs = entry["steps"], saved[name]["steps"]
        first = next((t for t, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        if first is None:
            problems.append(f"{name}: {len(mine)} steps, saved {len(theirs)}")
        else:
            problems.append(
                f"{name}: differs from step {first}; largest |log F| difference {_log_f_gap(mine, theirs):.3g}"
            )
    return problems


def _log_f_gap(mine: list[Any], theirs: list[Any]) -> float:
    """The largest difference of log F (any group, any step) between two trajectories."""
    gaps = [
        abs(float.fromhex(a) - float.fromhex(b))
        for row, saved in zip(mine, theirs, strict=False)
        for a, b in zip(row[0], saved[0], strict=False)
    ]
    return max(gaps, default=math.inf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help=f"write the fingerprints here (the usual place: {DEFAULT_OUT})")
    parser.add_argument("--check", type=Path, help="compare with fingerprints written before; exit 1 on a change")
    parser.add_argument("--steps", type=int, default=160)  # the loss brake first acts after ~120
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="a subset (default: all)")
    parser.add_argument("--smoke", action="store_true", help=f"{', '.join(SMOKE)} for 20 steps")
    args = parser.parse_args(argv)
    names = list(SMOKE) if args.smoke else args.configs or list(CONFIGS)
    steps = 20 if args.smoke else args.steps
    current = fingerprints(names, steps)
    for name, entry in current.items():
        print(f"{name:20s} {entry['digest'][:16]}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": steps, "torch": torch.__version__, "configs": current}, indent=0))
        print(f"wrote {args.out}")
    if args.check is not None:
        saved = json.loads(args.check.read_text())
        if saved["steps"] != steps:
            print(f"the saved fingerprints have {saved['steps']} steps, this run {steps}: rerun with --steps")
            return 1
        problems = compare(current, saved["configs"])
        for line in problems:
            print("CHANGED", line)
        print("identical" if not problems else f"{len(problems)} configuration(s) changed")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
