"""One-off study (2026-12-04, issue 20): a linear anneal of F to the end of a run of known length.

DoG's averaged iterate beats every constant Adam lr on some suite tasks (RESULTS.md, section 6); an
lr controller under a user's constant lr can only match that by annealing. The variant, patched into
the controller in this process (the workers fork and inherit it): from adapted step
``start = max(hold_after, frac * T)`` on, log F also falls by the increments of
``log max(floor, (T - t) / (T - start))`` (a linear decay of the lr used to ``floor`` at the end);
the rule keeps adapting as before (its damping has mostly decayed by then). The library's ``anneal=True``
(the default since) is this design: with ``{"frac": 0.5}`` the script turns the library's off and adds its own,
which gives the same metrics to the last digit; ``{}`` is the library's default rule.

    python benchmarks/studies/anneal.py out.jsonl mlp,cnn,lm-short,gru,mse Adam+CLARA '{}' '{"frac": 0.5}'
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
_adapt = rule.adapt


def decay(t: int, start: float, total: float, floor: float) -> float:
    """log of the anneal's factor after ``t`` adapted steps."""
    if t <= start:
        return 0.0
    return math.log(max(floor, (total - t) / (total - start)))


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
    if "frac" not in VARIANT or new.adapted_steps == state.adapted_steps:
        return new
    total = VARIANT["T"]
    start = max(schedule.hold_after, VARIANT["frac"] * total)
    floor = VARIANT.get("floor", 0.01)
    step = decay(new.adapted_steps, start, total, floor) - decay(state.adapted_steps, start, total, floor)
    logs = tuple(value + step for value in new.log_factors)
    return new.with_log_factors(logs)


controller.adapt = adapt  # type: ignore[assignment]


def job(args: tuple[str, float, str, dict[str, float], int]) -> dict[str, Any]:
    task, lr0, method_name, variant, seed = args
    VARIANT.clear()
    VARIANT.update(variant)
    VARIANT["T"] = suite.SPECS[task].steps
    method = next(m for m in suite.CLARA_METHODS if m.name == method_name)
    if "frac" in variant:  # the study's decay on the rule without the library's own (which it became)
        method = dataclasses.replace(method, clara={**(method.clara or {}), "anneal": False})
    result = suite.run_one(task, method, lr0, seed, suite.SPECS[task].steps)
    return {
        "task": task,
        "lr0": lr0,
        "method": method_name,
        "variant": variant,
        "seed": seed,
        "metric": result["metric"],
        "final_lr": result["final_lr"],
    }


if __name__ == "__main__":
    rates = tuple(float(x) for x in os.environ.get("LRS", "1e-5,1e-4,1e-3,1e-2,1e-1").split(","))
    first = int(os.environ.get("SEED_FROM", "0"))
    seeds = range(first, first + int(os.environ.get("SEEDS", "1")))
    variants = [json.loads(v) for v in sys.argv[4:]] or [{}]
    jobs = [
        (t, lr, m, v, s)
        for v in variants
        for s in seeds
        for m in sys.argv[3].split(",")
        for t in sys.argv[2].split(",")
        for lr in rates
    ]
    with ProcessPoolExecutor(int(os.environ.get("WORKERS", "2"))) as pool, open(sys.argv[1], "a") as results:
        for out in pool.map(job, jobs):
            print(json.dumps(out), flush=True)
            results.write(json.dumps(out) + "\n")
