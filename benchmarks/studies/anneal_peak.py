"""One-off probe (2026-12-04, issue 20): the anneal starting from ``k`` x the lr the find holds.

A tuned cosine peaks above the best constant lr (AdamW-cos is tuned at 3e-2 on the MLP, the CNN and the GRU,
constant Adam at 1e-2), and the runs from lr0 0.1, which hold the highest lr, score best on the CNN family. Does
the anneal want a higher start than the lr the find holds? ``controller.annealed`` is patched to return
``max(ANNEAL_FLOOR, k x`` the library's multiplier ``)`` inside the anneal's window (a jump by ``k`` at its
start, then the same linear decay); Adam + CLARA, seed 0, lr0 1e-5 ... 1e-1. Verdict: ``benchmarks/RESULTS.md``,
section 6 ("The anneal from a higher start").

    python benchmarks/studies/anneal_peak.py out.jsonl 2 mlp,cnn,lm-short,gru,mse
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import suite

import lightning_clara.controller as controller
import lightning_clara.rule as rule

K = 1.0  # set from the command line before the workers fork
_annealed = rule.annealed


def annealed(schedule: rule.Schedule, step: int, stopped: int | None = None) -> float:
    value = _annealed(schedule, step, stopped)
    t = step if stopped is None else min(step, stopped)
    if schedule.anneal_to > schedule.anneal_from and t > schedule.anneal_from:
        return max(rule.ANNEAL_FLOOR, K * value)
    return value


controller.annealed = annealed  # type: ignore[assignment]


def job(cell: tuple[str, float]) -> dict[str, Any]:
    task, lr0 = cell
    method = next(m for m in suite.CLARA_METHODS if m.name == "Adam+CLARA")
    result = suite.run_one(task, method, lr0, 0, suite.SPECS[task].steps)
    return {"task": task, "lr0": lr0, "seed": 0, "k": K, "metric": result["metric"]}


if __name__ == "__main__":
    K = float(sys.argv[2])
    cells = [(t, lr) for t in sys.argv[3].split(",") for lr in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
    cells.sort(key=lambda c: -suite.SPECS[c[0]].steps * suite.SPECS[c[0]].batch)
    with ProcessPoolExecutor(2) as pool, open(sys.argv[1], "a") as out:
        for row in pool.map(job, cells):
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
