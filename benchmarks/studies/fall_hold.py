"""One-off study (2026-12-03, issue 20): hold the lr while the loss falls, and a loss-confirmed faster climb.

``{}`` is the library's rule (the control); ``{"s": 1}`` is the hold on falls that was tried as the default
and dropped after 3 seeds (commit bdeecea, reverted). Patched into the controller in this process (the workers
fork and inherit the patch):

* ``s``: a fall of log F is scaled by ``1 - s * max(gate, 0)`` (``gate``: the loss trend's, +1 while the
  loss clearly falls); ``s = 1`` is the candidate (the library version held nothing in the first 10 losses).
* ``k``: a raise at ``r >= r_boost`` (default 2) while the gate is fully open is multiplied by ``k``.

``--trace`` prints r, r_max, the gate and the lr used per step window for the cells given instead.
Results and verdict: ``benchmarks/RESULTS.md``, section 6 ("The hold on falls").

    python benchmarks/studies/fall_hold.py out.jsonl mlp,cnn,lm-short,gru,mse Adam+CLARA '{}' '{"s": 1}'
    python benchmarks/studies/fall_hold.py out.jsonl mlp,cnn,lm-short,gru,mse Adam+CLARA '{"s": 1, "k": 3}'
    python benchmarks/studies/fall_hold.py --trace cnn:0.01:Adam+CLARA lm-short:1e-5:Adam+CLARA
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite

import lightning_clara.controller as controller
import lightning_clara.rule as rule

VARIANT: dict[str, float] = {}
TRACE: list[tuple[int, float, float, float, float]] = []
_adapt = rule.adapt


def adapt(
    state: rule.FactorState,
    stats: rule.StepStatistics,
    schedule: rule.Schedule,
    bounds: rule.Bounds,
    bases: Any = None,
    gate: float = 1.0,
    fitted: bool = False,
) -> rule.FactorState:
    new = _adapt(state, stats, schedule, bounds, bases, gate, fitted)
    if stats.expected and stats.expected[0] > 0:
        r_max = stats.moved[0] / stats.expected[0]
        TRACE.append((state.adapted_steps, new.ratios[0] or 0.0, r_max, gate, new.log_factors[0]))
    if not VARIANT:
        return new
    logs = list(new.log_factors)
    for scope, (old, now) in enumerate(zip(state.log_factors, new.log_factors, strict=True)):
        ratio = new.ratios[scope]
        if now > old and ratio is not None and ratio >= VARIANT.get("r_boost", 2.0) and gate >= 1.0:
            logs[scope] = rule.clamp_log_factor(bounds, old + (now - old) * VARIANT.get("k", 1.0))
        if now < old:
            logs[scope] = old + (now - old) * (1.0 - VARIANT.get("s", 0.0) * max(gate, 0.0))
    return new.with_log_factors(logs)


controller.adapt = adapt  # type: ignore[assignment]


def run(task: str, lr0: float, method_name: str, variant: dict[str, float]) -> dict[str, Any]:
    VARIANT.clear()
    VARIANT.update(variant)
    TRACE.clear()
    method = next(m for m in suite.CLARA_METHODS if m.name == method_name)
    method = dataclasses.replace(method, clara={**(method.clara or {}), "anneal": False})  # measured before the anneal
    result = suite.run_one(task, method, lr0, 0, suite.SPECS[task].steps)
    return {
        "task": task,
        "lr0": lr0,
        "method": method_name,
        "variant": variant,
        "metric": result["metric"],
        "final_lr": result["final_lr"],
        "trace": list(TRACE),
    }


def job(args: tuple[str, float, str, dict[str, float]]) -> dict[str, Any]:
    return run(*args)


def print_trace(out: dict[str, Any]) -> None:
    print(out["task"], out["lr0"], out["method"], round(out["metric"], 3))
    trace = out["trace"]
    for step in (0, 10, 20, 50, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200):
        window = trace[max(0, step - 5) : step + 5]
        if step >= len(trace) or not window:
            break
        mean = [sum(row[i] for row in window) / len(window) for i in (1, 2, 3)]
        lr = out["lr0"] * math.exp(trace[step][4])
        print(f"  step {step:5d}  r {mean[0]:6.3f}  r_max {mean[1]:7.2f}  gate {mean[2]:+.2f}  lr {lr:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "--trace":
        cells = [(t, float(lr), m, {}) for t, lr, m in (cell.split(":") for cell in sys.argv[2:])]
        with ProcessPoolExecutor(2) as pool:
            for out in pool.map(job, cells):
                print_trace(out)
        sys.exit(0)
    rates = tuple(float(x) for x in os.environ.get("LRS", "1e-5,1e-4,1e-3,1e-2,1e-1").split(","))
    variants = [json.loads(v) for v in sys.argv[4:]] or [{}]
    jobs = [
        (t, lr, m, v) for v in variants for m in sys.argv[3].split(",") for t in sys.argv[2].split(",") for lr in rates
    ]
    with ProcessPoolExecutor(2) as pool, open(sys.argv[1], "a") as results:
        for out in pool.map(job, jobs):
            out.pop("trace")
            print(json.dumps(out), flush=True)
            results.write(json.dumps(out) + "\n")
