"""One-off study (2026-12-04, issue 20): a fast path (c = 0.2) that drives a one-shot climb from a small lr0.

The suite's worst cells are the climbs from lr0 1e-5 / 1e-4: the default's path (c = 0.02, a 50-step
memory) cannot climb faster than about e-fold per 20-50 steps without outrunning its own statistic. A second
path with c = 0.2 (5 steps of memory) sees "the steps agree more than a random walk's" within a few steps.
The sensor is computed here, beside the library, from the realised steps of every tensor (global optimizer
hooks on the run's optimizer; the reference is the library's ``reference_for(optimizer, group, 0.2)``), and
the climb is patched into the controller's ``adapt`` (the workers fork and inherit the patch):

* ``--measure TASKS FAMILY LRS``: the fast ratio of fixed-lr runs (no CLARA), mean per window of steps.
* variants ``{"theta": 1.2, "g": 0.05, "after": 20, "window": 5}``: from step ``after`` on, while the mean
  fast ratio of the last ``window`` steps is at least ``theta``, log F += ``g`` each step (on top of the
  rule's own move); the first step it is below ``theta`` ends the climb for good (a one-shot ramp, like a
  range test). ``{}`` is the library's rule (the control).

Results and verdict: ``benchmarks/RESULTS.md``, section 6 ("A fast path for the climb"); rows in
``results/fast-climb-study.jsonl``.

    python benchmarks/studies/fast_climb.py --measure mlp,cnn,lm-short,gru,mse Adam 1e-6,1e-5,1e-4,1e-3,1e-2,1e-1
    python benchmarks/studies/fast_climb.py out.jsonl mlp,cnn,lm-short,gru,mse Adam+CLARA '{"theta": 1.2, "g": 0.05}'
    LRS=3e-2 python benchmarks/studies/fast_climb.py out.jsonl mlp,cnn,gru AdamW-cos+CLARA '{"theta": 1.2, "g": 0.05}'
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deep
import suite

import lightning_clara.controller as controller
import lightning_clara.rule as rule
from lightning_clara.reference import reference_for

C_FAST = 0.2
VARIANT: dict[str, float] = {}


class FastPath:
    """The paper's ratio with c = 0.2 over every tensor of the (one) optimizer, from its realised steps."""

    def __init__(self) -> None:
        self.busy = False  # building a reference steps the Monte Carlo's own optimizers: not ours
        self.reset()

    def reset(self, optimizer: Any = None) -> None:
        """Follow ``optimizer`` (the run's; CLARA's Monte Carlo references step optimizers of their own)."""
        self.optimizer = optimizer
        self.ratios = []
        self.paths: dict[int, torch.Tensor] = {}
        self.ages: dict[int, int] = {}
        self.curves: dict[int, torch.Tensor] = {}

    def pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.busy or optimizer is not self.optimizer:
            return
        if not self.curves:
            self.busy = True
            for group in optimizer.param_groups:
                reference = reference_for(optimizer, group, C_FAST)
                for p in group["params"]:
                    self.curves[id(p)] = reference.curve(p.numel())
            self.busy = False
        self.before = [(p, p.detach().clone()) for g in optimizer.param_groups for p in g["params"]]

    def post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.busy or optimizer is not self.optimizer:
            return
        squared, expected = 0.0, 0.0
        for p, old in self.before:
            step = (p.detach() - old).flatten().double()
            norm = float(step.norm())
            if not norm > 0 or not math.isfinite(norm):
                continue
            key = id(p)
            path = self.paths.get(key, torch.zeros_like(step))
            self.paths[key] = path = path.mul_(1 - C_FAST).add_(step, alpha=C_FAST / norm)
            self.ages[key] = age = self.ages.get(key, 0) + 1
            curve = self.curves[key]
            squared += float(path.square().sum())
            expected += float(curve[min(age, len(curve) - 1)])
        self.ratios.append(squared / expected if expected > 0 else float("nan"))


SENSOR = FastPath()
register_optimizer_step_pre_hook(SENSOR.pre)
register_optimizer_step_post_hook(SENSOR.post)
RAMP = {"on": True}
_adapt = rule.adapt


def adapt(state: rule.FactorState, stats: rule.StepStatistics, *args: Any, **kwargs: Any) -> rule.FactorState:
    """The library's rule (the controller's positional call), then the ramp's raise while it is on."""
    new = _adapt(state, stats, *args, **kwargs)
    bounds: rule.Bounds = args[1]
    if not VARIANT or not RAMP["on"] or not SENSOR.ratios:
        return new
    if state.adapted_steps < VARIANT.get("after", 20):
        return new
    recent = SENSOR.ratios[-int(VARIANT.get("window", 5)) :]
    if not sum(recent) / len(recent) >= VARIANT.get("theta", 1.2):
        RAMP["on"] = False
        RAMP["ended"] = state.adapted_steps
        return new
    return new.with_log_factors([rule.clamp_log_factor(bounds, v + VARIANT.get("g", 0.1)) for v in new.log_factors])


controller.adapt = adapt  # type: ignore[assignment]
_make_optimizer = deep.make_optimizer


def make_optimizer(*args: Any, **kwargs: Any) -> Any:
    optimizer, scheduler = _make_optimizer(*args, **kwargs)
    SENSOR.reset(optimizer)
    return optimizer, scheduler


deep.make_optimizer = make_optimizer


def run(task: str, lr0: float, method_name: str, variant: dict[str, float], seed: int = 0) -> dict[str, Any]:
    VARIANT.clear()
    VARIANT.update(variant)
    SENSOR.reset()
    RAMP.clear()
    RAMP["on"] = True
    method = next(m for m in (*suite.CLARA_METHODS, *suite.BASELINES) if m.name == method_name)
    steps = suite.SPECS[task].steps if "steps" not in variant else int(variant["steps"])
    result = suite.run_one(task, method, lr0, seed, steps)
    return {
        "task": task,
        "lr0": lr0,
        "seed": seed,
        "method": method_name,
        "variant": variant,
        "metric": result["metric"],
        "final_lr": result["final_lr"],
        "lrs": result["lrs"],
        "ramp_ended": RAMP.get("ended"),
        "fast_ratios": SENSOR.ratios[:400],
    }


def job(args: tuple[str, float, str, dict[str, float], int]) -> dict[str, Any]:
    return run(*args)


WINDOWS = ((1, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 400))


def measure(tasks: list[str], family: str, rates: list[float]) -> None:
    jobs = [(t, lr, family, {"steps": 400}, 0) for t in tasks for lr in rates]
    with ProcessPoolExecutor(2) as pool:
        for out in pool.map(job, jobs):
            r = out["fast_ratios"]
            windows = " ".join(f"{sum(r[a:b]) / len(r[a:b]):5.2f}" if r[a:b] else "    -" for a, b in WINDOWS)
            print(f"{out['task']:9s} {family} lr {out['lr0']:.0e}  r_fast {windows}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--measure":
        print("windows (steps):", " ".join(f"{a}-{b}" for a, b in WINDOWS))
        measure(sys.argv[2].split(","), sys.argv[3], [float(x) for x in sys.argv[4].split(",")])
        sys.exit(0)
    rates = tuple(float(x) for x in os.environ.get("LRS", "1e-5,1e-4,1e-3,1e-2,1e-1").split(","))
    first = int(os.environ.get("SEED_FROM", "0"))
    seeds = range(first, first + int(os.environ.get("SEEDS", "1")))
    variants = [json.loads(v) for v in sys.argv[4:]] or [{}]
    jobs = [
        (t, lr, m, v, s)
        for v in variants
        for m in sys.argv[3].split(",")
        for t in sys.argv[2].split(",")
        for lr in rates
        for s in seeds
    ]
    jobs.sort(key=lambda j: -suite.SPECS[j[0]].steps * suite.SPECS[j[0]].batch)
    with ProcessPoolExecutor(2) as pool, open(sys.argv[1], "a") as results:
        for out in pool.map(job, jobs):
            out.pop("fast_ratios")
            lrs = out.pop("lrs")
            out["held_lr"] = max(lrs[len(lrs) // 2 :]) if lrs else None
            print(json.dumps(out), flush=True)
            results.write(json.dumps(out) + "\n")
