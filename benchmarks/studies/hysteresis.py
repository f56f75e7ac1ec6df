"""Measurement (2026-12-04, issue 20): is the ratio a function of the lr, or of the lr and the run's history?

The lr the find holds rises with lr0 on every task of ``suite.py`` (Adam CNN 5e-3 from lr0 1e-5, 2e-2 from
lr0 0.1), and every knob of the rule moves all cells the same way. Two measurements, Adam, seed 0:

``swap``: F pinned at 1 (the lr never moves by CLARA), ``A`` steps at ``lr_a``, then ``B`` steps at ``lr_b``;
the mean ratio and training loss over the second half of B. If r at ``lr_b`` differs with ``lr_a``, the
equilibrium ``r = target`` is not a property of the lr and no target places the finds from below and from
above at the same lr.

``loss``: a run as ``suite.py`` runs it (``deep.train``'s loop, every loss to CLARA), recording the mean
training loss over its last tenth beside the test metric: where a cell scores worse at a higher held lr,
does its training loss see it (what a loss-aware rule could read), or only the test metric?

    python benchmarks/studies/hysteresis.py swap out.jsonl mlp,cnn,lm-short,gru,finetune
    python benchmarks/studies/hysteresis.py swap out.jsonl mlp,cnn,lm-short,gru,finetune 1,2   # steady cells
    python benchmarks/studies/hysteresis.py loss out.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite
from deep import batches, make_optimizer

from lightning_clara import CLARA

#: The lrs the default's find holds from lr0 1e-5 and from lr0 0.1 (``t0.5-anneal``, mean of 3 seeds).
HELD = {
    "mlp": (8e-3, 5e-2),
    "cnn": (5e-3, 2e-2),
    "lm-short": (7e-3, 3e-2),
    "gru": (7e-3, 2e-2),
    "finetune": (3e-3, 2e-2),
}
#: Phase lengths (A, B): A is the default's find on the task (``hold_after``), B four path memories.
PHASES = {"mlp": (600, 200), "cnn": (600, 200), "lm-short": (120, 100), "gru": (600, 200), "finetune": (400, 200)}


def swap(cell: tuple[str, float, float, int]) -> dict[str, Any]:
    task_name, lr_a, lr_b, seed = cell
    torch.set_num_threads(1)
    length_a, length_b = PHASES[task_name]
    task = suite.make_task(task_name, seed)
    method = next(m for m in suite.BASELINES if m.name == "Adam")
    optimizer, _ = make_optimizer(method, list(task.model.parameters()), lr_a, length_a + length_b)
    clara = CLARA(optimizer, min_factor=1.0, max_factor=1.0, initial_factor=1.0)
    ratios: list[float] = []
    losses: list[float] = []
    task.model.train()
    for step, batch in enumerate(batches(task.loader, length_a + length_b)):
        if step == length_a:
            for group in optimizer.param_groups:
                group["lr"] = lr_b
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ratios.append(clara.ratio if clara.ratio is not None else float("nan"))
        losses.append(float(loss.detach()))
    task.model.eval()
    window = slice(length_a + length_b // 2, None)
    return {
        "mode": "swap",
        "task": task_name,
        "lr_a": lr_a,
        "lr_b": lr_b,
        "seed": seed,
        "ratio": statistics.fmean(ratios[window]),
        "loss": statistics.fmean(losses[window]),
        "ratio_end_of_a": statistics.fmean(ratios[length_a - length_b // 2 : length_a]),
        "metric": task.metric(task.model),
    }


def final_loss(cell: tuple[str, str, float]) -> dict[str, Any]:
    task_name, method_name, lr0 = cell
    torch.set_num_threads(1)
    steps = suite.SPECS[task_name].steps
    task = suite.make_task(task_name, 0)
    method = next(m for m in (*suite.BASELINES, *suite.CLARA_METHODS) if m.name == method_name)
    optimizer, scheduler = make_optimizer(method, list(task.model.parameters()), lr0, steps)
    clara = None if method.clara is None else CLARA(optimizer, total_steps=steps, **method.clara)
    losses: list[float] = []
    lrs: list[float] = []
    task.model.train()
    for batch in batches(task.loader, steps):
        loss = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if clara is not None:
            clara.observe_loss(loss.detach())
        lrs.append(clara.lr_used[0] if clara is not None else optimizer.param_groups[0]["lr"])
        losses.append(float(loss.detach()))
        if scheduler is not None:
            scheduler.step()
    task.model.eval()
    return {
        "mode": "loss",
        "task": task_name,
        "method": method_name,
        "lr0": lr0,
        "train_loss_last_tenth": statistics.fmean(losses[-steps // 10 :]),
        "largest_lr_second_half": max(lrs[steps // 2 :]),
        "metric": task.metric(task.model),
    }


#: The cells whose held lr is above the tuned lr and score worse (``loss`` mode): the MLP from lr0 0.1
#: against lr0 1e-2, and the harm cells with CLARA lifting a tuned cosine's peak, each beside its reference.
LOSS_CELLS = [
    ("mlp", "Adam+CLARA", 1e-2),
    ("mlp", "Adam+CLARA", 1e-1),
    ("mlp", "Adam", 1e-2),
    ("mlp", "AdamW-cos", 3e-2),
    ("mlp", "AdamW-cos+CLARA", 3e-2),
    ("gru", "AdamW-cos", 3e-2),
    ("gru", "AdamW-cos+CLARA", 3e-2),
    ("cnn", "Adam+CLARA", 1e-5),
    ("cnn", "Adam+CLARA", 1e-1),
    ("cnn", "AdamW-cos", 3e-2),
    ("cnn", "AdamW-cos+CLARA", 3e-2),
    ("finetune", "AdamW-cos", 3e-2),
    ("finetune", "AdamW-cos+CLARA", 3e-2),
]


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "swap":
        cells: list[Any] = []
        for name in sys.argv[3].split(","):
            low, high = HELD[name]
            if len(sys.argv) > 4:  # seeds: the steady cells only (lr_b = lr_a)
                cells += [(name, a, a, int(s)) for s in sys.argv[4].split(",") for a in (low, high)]
            else:
                cells += [(name, a, b, 0) for a in (low, high) for b in (low, (low * high) ** 0.5, high)]
        function: Any = swap
    else:
        cells, function = LOSS_CELLS, final_loss
    with ProcessPoolExecutor(2) as pool, open(out_path, "a") as out:
        for row in pool.map(function, cells):
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
