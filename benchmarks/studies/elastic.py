"""One-off study (2026-12-03, issue 20): steer Adam's lr by r's *response* to a dithered lr below r = 1.

``ratio_dither.py`` measured the elasticity e = d ln r / d ln lr within a run (the lr switched by a factor 2
every block): about 0 while the lr is below the tuned one (the steps follow the gradient whatever their
length), clearly negative from about the tuned lr on (a larger lr makes the sharp directions oscillate):
MLP, CNN and GRU turn between 3e-3 and 3e-2 where the tuned lr is 1e-2, the MSE task between 3e-3 and 1e-2
(tuned 1e-3 ... 3e-3). r's *level* meets the default's target 0.7 3x lower, and lower still as the network
settles. This candidate keeps the default rule wherever r >= 1 (the climb) and replaces it below r = 1:

    log F_true <- log F_true + g * damping_t / d * clip((e_bar + e_star) / e_star, -1, 1) * gate (raises)
    log F_used  = log F_true + q_k * ln(sqrt 2)            q_k = +1 on even blocks, -1 on odd blocks

``e_bar`` is the mean of the last ``n`` block estimates (each from a block and its two neighbours, the
second half of each block's r, as in ``ratio_dither.py``); ``gate`` is the loss brake's. Patched into the
controller in this process (the workers inherit the patch; one CLARA per run). Variants (JSON): ``g`` (the
step per block at full signal, default 0.15), ``e_star`` (0.1), ``n`` (3), ``dither`` (1: on; 0: the
control, the library's rule), ``steer`` (1: on; 0: the dither with the library's rule, the second control),
``cap`` (absent: none; k: log F at most ln k above the library's rule run beside it on the same ratios),
``floor`` (1: log F never below that rule's, so the steering only raises), ``anneal`` (1: the library's anneal
stays on, as in its default since the ninth session; absent: off, as first measured).

    python benchmarks/studies/elastic.py out.jsonl mlp,cnn,lm-short,gru,mse Adam+CLARA '{}' '{"dither": 0}'

Verdict and numbers: ``benchmarks/RESULTS.md``, section 6 ("What r's response to the lr sees"); the runs of the
study: ``benchmarks/results/elastic-study.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite

import lightning_clara.controller as controller
import lightning_clara.rule as rule

VARIANT: dict[str, float] = {}
STATE: dict[str, Any] = {}
_adapt = rule.adapt


def reset(variant: dict[str, float], steps: int) -> None:
    VARIANT.clear()
    VARIANT.update(variant)
    STATE.clear()
    STATE.update(block=25 if steps < 1000 else 50, true=None, level=None, ratios=[], means=[], estimates=[], trace=[])


def estimate() -> None:
    """The elasticity of the block before last, from its mean r and its two neighbours'."""
    means = STATE["means"]
    k = len(means) - 2
    if k < 1 or means[k] <= 0:
        return
    q = 1.0 if k % 2 == 0 else -1.0
    STATE["estimates"].append(q * (means[k] - (means[k - 1] + means[k + 1]) / 2) / (means[k] * math.log(2.0)))


def adapt(
    state: rule.FactorState,
    stats: rule.StepStatistics,
    schedule: rule.Schedule,
    bounds: rule.Bounds,
    bases: Any = None,
    gate: float = 1.0,
    fitted: bool = False,
) -> rule.FactorState:
    if not VARIANT.get("dither", 1):
        return _adapt(state, stats, schedule, bounds, bases, gate, fitted)
    if STATE["true"] is None:
        STATE["true"] = STATE["level"] = state.log_factors[0]
    level_state = state.with_log_factors((STATE["level"],))
    STATE["level"] = _adapt(level_state, stats, schedule, bounds, bases, gate, fitted).log_factors[0]
    base = state.with_log_factors((STATE["true"],))
    new = _adapt(base, stats, schedule, bounds, bases, gate, fitted)
    ratio = new.ratios[0]
    steer = VARIANT.get("steer", 1)  # 0: the dither alone, the library's rule everywhere (a control)
    step = state.adapted_steps
    block = STATE["block"]
    true = new.log_factors[0]
    if ratio is not None:
        # the block's r (second half only: the path needs time to answer the new lr)
        if step % block >= block // 2:
            STATE["ratios"].append(ratio)
        if step % block == block - 1:
            STATE["means"].append(statistics.fmean(STATE["ratios"]) if STATE["ratios"] else 0.0)
            STATE["ratios"] = []
            estimate()
            recent = STATE["estimates"][-int(VARIANT.get("n", 3)) :]
            if ratio < 1.0 and recent and steer:
                e_star = VARIANT.get("e_star", 0.1)
                value = max(-1.0, min(1.0, (statistics.fmean(recent) + e_star) / e_star))
                if value > 0.0:
                    value *= 0.0 if fitted else gate
                scale = rule.damping(schedule, step) / schedule.d
                true = STATE["true"] + VARIANT.get("g", 0.15) * min(scale, 1.0) * value
        if ratio < 1.0 and STATE["estimates"] and steer:
            true = STATE["true"] if step % block != block - 1 else true  # below r = 1 only the block steps move F
    if "cap" in VARIANT:  # at most cap x the lr the library's rule would use, run beside it on the same r
        true = min(true, STATE["level"] + math.log(VARIANT["cap"]))
    if VARIANT.get("floor"):  # never below the lr the library's rule would use: the steering only raises
        true = max(true, STATE["level"])
    true = rule.clamp_log_factor(bounds, true)
    STATE["true"] = true
    q = 1.0 if ((step + 1) // block) % 2 == 0 else -1.0  # the block of the next step
    STATE["trace"].append((step, ratio or 0.0, true))
    used = rule.clamp_log_factor(bounds, true + q * math.log(math.sqrt(2.0)))
    return new.with_log_factors((used,))


controller.adapt = adapt  # type: ignore[assignment]


def run(task: str, lr0: float, method_name: str, variant: dict[str, float], seed: int = 0) -> dict[str, Any]:
    steps = suite.SPECS[task].steps
    reset(variant, steps)
    method = next(m for m in suite.CLARA_METHODS if m.name == method_name)
    if not variant.get("anneal"):  # measured before the anneal; {"anneal": 1}: the library's anneal on (2026-12-04)
        method = dataclasses.replace(method, clara={**(method.clara or {}), "anneal": False})
    result = suite.run_one(task, method, lr0, seed, steps)
    true = STATE["true"]
    final = result["final_lr"] if true is None else lr0 * math.exp(true)
    trace = STATE["trace"]
    marks = [s for s in (100, 300, 600, 1000, 2000, 5000) if s < len(trace)]
    return {
        "task": task,
        "lr0": lr0,
        "seed": seed,
        "method": method_name,
        "variant": variant,
        "metric": result["metric"],
        "final_lr": final,
        "lr_at": {s: lr0 * math.exp(trace[s][2]) for s in marks},
        "estimates": [round(e, 3) for e in STATE["estimates"]][:60],
    }


def job(args: tuple[str, float, str, dict[str, float], int]) -> dict[str, Any]:
    return run(*args)


if __name__ == "__main__":
    rates = tuple(float(x) for x in os.environ.get("LRS", "1e-5,1e-4,1e-3,1e-2,1e-1").split(","))
    seeds = int(os.environ.get("SEEDS", "1"))
    variants = [json.loads(v) for v in sys.argv[4:]] or [{}]
    jobs = [
        (t, lr, m, v, s)
        for s in range(int(os.environ.get("SEED_FROM", "0")), seeds)
        for v in variants
        for m in sys.argv[3].split(",")
        for t in sys.argv[2].split(",")
        for lr in rates
    ]
    with ProcessPoolExecutor(2) as pool, open(sys.argv[1], "a") as results:
        for out in pool.map(job, jobs):
            print(json.dumps({k: v for k, v in out.items() if k != "estimates"}), flush=True)
            results.write(json.dumps(out) + "\n")
            results.flush()
