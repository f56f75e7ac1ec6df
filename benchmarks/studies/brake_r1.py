"""One-off study (2026-12-03, issue 20): a brake for ``r >= 1`` and a faster climb, patched into the rule.

The brake: at ``r >= 1``, while the loss trend's z-score says the loss clearly rises (``z < -z_rise``),
a raise of log F becomes a fall of the same size. The faster climb: the damping times ``gain`` over
adapted steps 50-100. Both are patched into ``lightning_clara.rule`` in this process (the workers
fork and inherit the patches); ``{}`` is the unpatched control, which reproduces the suite's runs.
Results and verdict: ``benchmarks/RESULTS.md``, section 6.

    python benchmarks/studies/brake_r1.py '{}' '{"z_rise": 2}' '{"z_rise": 2, "gain": 8}' '{"gain": 8}'
"""

from __future__ import annotations

import dataclasses
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite

import lightning_clara.controller as controller
import lightning_clara.loss_trend as loss_trend
import lightning_clara.rule as rule

VARIANT: dict[str, float] = {}
LAST_Z = [0.0]
TASKS = ("mlp", "cnn", "lm-short", "gru", "mse")
LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_gate = loss_trend.LossTrend.gate.fget
_damping = rule.damping
_adapt = rule.adapt


def gate(self: loss_trend.LossTrend) -> float:
    LAST_Z[0] = self.z if self.count >= loss_trend.WARMUP else 0.0
    return _gate(self)  # type: ignore[misc]


def damping(schedule: rule.Schedule, adapted_steps: int) -> float:
    gain = VARIANT.get("gain", 1.0) if 50 <= adapted_steps < 100 else 1.0
    return _damping(schedule, adapted_steps) * gain


def adapt(state: rule.FactorState, stats: rule.StepStatistics, *args: Any, **kwargs: Any) -> rule.FactorState:
    new = _adapt(state, stats, *args, **kwargs)
    z_rise = VARIANT.get("z_rise")
    if z_rise is None or LAST_Z[0] >= -z_rise:
        return new
    bounds = args[1]
    logs = list(new.log_factors)
    for k, (old, now) in enumerate(zip(state.log_factors, new.log_factors, strict=False)):
        ratio = new.ratios[k]
        if ratio is not None and ratio >= 1.0 and now > old:
            logs[k] = rule.clamp_log_factor(bounds, old - (now - old))
    return new.with_log_factors(logs)


loss_trend.LossTrend.gate = property(gate)  # type: ignore[method-assign, assignment]
rule.damping = damping  # type: ignore[assignment]  # what rule.adapt calls
controller.damping = damping  # type: ignore[assignment]
controller.adapt = adapt  # type: ignore[assignment]


def job(args: tuple[str, float, dict[str, float]]) -> tuple[str, float, str, float, float]:
    task, lr0, variant = args
    VARIANT.clear()
    VARIANT.update(variant)
    method = next(m for m in suite.CLARA_METHODS if m.name == "Adam+CLARA")
    method = dataclasses.replace(method, clara={**(method.clara or {}), "anneal": False})  # measured before the anneal
    result = suite.run_one(task, method, lr0, 0, suite.SPECS[task].steps)
    return task, lr0, json.dumps(variant), result["metric"], result["final_lr"]


if __name__ == "__main__":
    variants = [json.loads(v) for v in sys.argv[1:]] or [{}]
    jobs = [(task, lr0, variant) for variant in variants for task in TASKS for lr0 in LRS]
    with ProcessPoolExecutor(2) as pool:
        for out in pool.map(job, jobs):
            print(*out, flush=True)
