"""Sampled against full paths: the final metric per lr0 and the lr trajectories, as Markdown tables.

Reads two result files of the same benchmark (``deep.py`` or ``robustness.py``), one run with full
paths and one with sampled paths, and prints, per task and CLARA method, the mean final metric
per lr0 (full / sampled), the worst case over lr0, and how far the lr trajectories are apart:
the median over the run of |log(lr_sampled / lr_full)| (deep.py records the lr every 10 steps;
robustness.py only the final lr), beside the same measure between two seeds of the full run,
the spread that the seeds alone give.

    python benchmarks/deep.py --workers 2 --methods Adam+CLARA SGDm+CLARA AdamW-wc+CLARA --sample 4096 \\
        --out benchmarks/results/deep-sample4096.json
    python benchmarks/parity.py benchmarks/results/deep.json benchmarks/results/deep-sample4096.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(path: Path) -> tuple[dict[tuple[str, str, float], dict[int, dict[str, Any]]], str]:
    """Runs keyed by (task, method, lr0), then seed; and the metric's name."""
    runs: dict[tuple[str, str, float], dict[int, dict[str, Any]]] = defaultdict(dict)
    report = json.loads(path.read_text())
    metric = "metric"
    for run in report["runs"]:
        metric = "metric" if "metric" in run else "accuracy"
        runs[(run["task"], run["method"], run["lr0"])][run["seed"]] = run
    return runs, metric


def trajectory(run: dict[str, Any]) -> list[float]:
    return run.get("lrs") or [run["final_lr"]]


def distance(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Median |log lr ratio| over the recorded points (None where an lr is missing or zero)."""
    pairs = [(x, y) for x, y in zip(trajectory(a), trajectory(b), strict=False) if x and y and x > 0 and y > 0]
    return statistics.median(abs(math.log(x / y)) for x, y in pairs) if pairs else None


def table(full_path: Path, sampled_path: Path) -> list[str]:
    full, metric = load(full_path)
    sampled, _ = load(sampled_path)
    keys = sorted(set(full) & set(sampled))
    tasks = list(dict.fromkeys(task for task, _, _ in keys))
    lrs = sorted({lr for _, _, lr in keys})
    lower_is_better = metric == "metric" and any(task == "lm" for task in tasks)
    lines = [
        f"full: `{full_path.name}`, sampled: `{sampled_path.name}`; cells: mean {metric}, full / sampled",
        "",
        "| task | method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | worst | lr apart | seeds apart |",
        "|---|---|" + "---|" * (len(lrs) + 3),
    ]
    for task in tasks:
        digits = 2 if task == "lm" else 1
        worst = max if (lower_is_better and task == "lm") else min
        methods = list(dict.fromkeys(method for t, method, _ in keys if t == task))
        for method in methods:
            cells, means_full, means_sampled, apart, seeds_apart = [], [], [], [], []
            for lr in lrs:
                a, b = full.get((task, method, lr)), sampled.get((task, method, lr))
                if not a or not b:
                    cells.append("-")
                    continue
                mean_a = statistics.mean(run[metric] for run in a.values())
                mean_b = statistics.mean(run[metric] for run in b.values())
                means_full.append(mean_a)
                means_sampled.append(mean_b)
                cells.append(f"{mean_a:.{digits}f} / {mean_b:.{digits}f}")
                apart += [d for s in a if s in b and (d := distance(a[s], b[s])) is not None]
                seeds = sorted(a)
                if len(seeds) > 1 and (d := distance(a[seeds[0]], a[seeds[1]])) is not None:
                    seeds_apart.append(d)

            def factor(values: list[float]) -> str:
                return f"{math.exp(statistics.median(values)):.2f}x" if values else "-"

            lines.append(
                f"| {task} | {method} | " + " | ".join(cells) + f" | {worst(means_full):.{digits}f} / "
                f"{worst(means_sampled):.{digits}f} | {factor(apart)} | {factor(seeds_apart)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("full", type=Path, help="the run with full paths (sample=None)")
    parser.add_argument("sampled", type=Path, nargs="+", help="runs with sampled paths")
    args = parser.parse_args(argv)
    for path in args.sampled:
        print("\n".join(table(args.full, path)), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
