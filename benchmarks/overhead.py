"""What CLARA costs: per-step time in units of one foreach Adam step, end-to-end ratios, memory.

All numbers are measured side by side in one run (interleaved repetitions, medians), so the
ratios hold on a loaded machine even when the absolute times do not.

    python benchmarks/overhead.py              # ~1M, ~6M, ~25M parameters (a few minutes on 2 cores)
    python benchmarks/overhead.py --smoke      # seconds: keeps the script working (tested)
    python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
#: F pinned to 1: CLARA does all its work every step, but the repeated steps on fixed gradients
#: cannot drive the lr to a blow-up (whose NaN steps would take another code path) mid-benchmark.
PINNED = {"min_factor": 1.0, "max_factor": 1.0}


def make_params(total: int, width: int, device: str) -> list[torch.nn.Parameter]:
    """Square weight matrices plus biases (like an MLP) adding up to about ``total`` parameters."""
    params = []
    count = 0
    while count < total:
        weight = torch.nn.Parameter(torch.randn(width, width, device=device) * 0.01)
        bias = torch.nn.Parameter(torch.zeros(width, device=device))
        params += [weight, bias]
        count += weight.numel() + bias.numel()
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(setups: dict[str, Callable[[], None]], device: str, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per call of every setup, interleaved so that load changes hit all alike."""
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for step in setups.values():  # warm-up (and reference calibration)
        for _ in range(3):
            step()
    for _ in range(repeats):
        for name, step in setups.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def persistent_bytes(clara: Any) -> int:
    """Bytes CLARA keeps between steps: paths plus the direction reader's buffers."""
    from lightning_clara.directions import DeltaReader

    total = sum(state.path.numel() * state.path.element_size() for state in clara._tensors.values())
    reader = clara._reader
    stores = [reader._snapshots, reader._previous] if isinstance(reader, DeltaReader) else []
    stores.append(getattr(reader, "_scratch", {}))  # the state readers' CPU scratch, the delta's undo copy
    for store in stores:
        total += sum(b.numel() * b.element_size() for b in store.values())
    return total


def per_step_costs(total: int, width: int, device: str, repeats: int, steps: int) -> dict[str, Any]:
    """CLARA's cost per optimizer step, in foreach-Adam steps, for each optimizer and reader."""
    from lightning_clara import CLARA

    results: dict[str, Any] = {}
    rows = {
        "Adam (foreach)": ("adam", None),
        "SGD": ("sgd", None),
        "SGD+CLARA state": ("sgd", "state"),
        "SGD+CLARA delta": ("sgd", "delta"),
        "Adam+CLARA state": ("adam", "state"),
        "Adam+CLARA delta": ("adam", "delta"),
    }
    setups: dict[str, Callable[[], None]] = {}
    keep: list[Any] = []
    numel = 0
    claras: dict[str, Any] = {}
    for name, (kind, direction) in rows.items():
        params = make_params(total, width, device)
        numel = sum(p.numel() for p in params)
        if kind == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
        else:
            optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
        if direction is not None:
            claras[name] = CLARA(optimizer, direction=direction, **PINNED)
        keep.append((params, optimizer))
        setups[name] = optimizer.step
    seconds = time_steps(setups, device, repeats, steps)
    adam = seconds["Adam (foreach)"]
    for name, (kind, direction) in rows.items():
        base = seconds["Adam (foreach)"] if kind == "adam" else seconds["SGD"]
        entry = {"seconds": seconds[name]}
        if direction is not None:
            entry["clara_cost_in_adam_steps"] = (seconds[name] - base) / adam
            entry["extra_bytes_per_param"] = persistent_bytes(claras[name]) / numel
        results[name] = entry
    for name in ("D-Adaptation", "Prodigy"):
        results[name] = _peer_cost(name, total, width, device, repeats, steps, adam)
    del keep
    gc.collect()
    return {"numel": numel, "tensors": len(make_params(total, width, "cpu")), "rows": results}


def _peer_cost(name: str, total: int, width: int, device: str, repeats: int, steps: int, adam: float) -> dict[str, Any]:
    """A learning-rate-free peer's step time relative to Adam, and its state beyond Adam's."""
    try:
        if name == "D-Adaptation":
            from dadaptation import DAdaptAdam as Peer
        else:
            from prodigyopt import Prodigy as Peer
    except ImportError:
        return {"missing": True}
    params = make_params(total, width, device)
    optimizer = Peer(params, lr=1.0)
    reference = torch.optim.Adam(make_params(total, width, device), lr=1e-3, foreach=True)
    seconds = time_steps({"peer": optimizer.step, "adam": reference.step}, device, repeats, steps)
    numel = sum(p.numel() for p in params)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    adam_bytes = 8 * numel  # exp_avg + exp_avg_sq in fp32
    return {
        "seconds": seconds["peer"],
        "cost_in_adam_steps": seconds["peer"] / seconds["adam"] - 1.0,
        "extra_bytes_per_param": (state_bytes - adam_bytes) / numel,
    }


def end_to_end(device: str, repeats: int, steps: int, smoke: bool) -> dict[str, float]:
    """Training-step time with / without CLARACallback's controller, for a small CNN and an MLP."""
    from lightning_clara import CLARA

    def cnn() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
        )  # fmt: skip

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10),
        )  # fmt: skip

    batch = 8 if smoke else 64
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {}
    for model_name, factory in (("cnn", cnn), ("mlp", mlp)):
        for opt_name in ("sgd", "adam"):
            setups = {}
            keep = []
            for with_clara in (False, True):
                torch.manual_seed(0)
                model = factory().to(device)
                if opt_name == "sgd":
                    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
                else:
                    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                clara = CLARA(optimizer, **PINNED) if with_clara else None

                def train_step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                keep.append((model, optimizer, clara))
                setups["with" if with_clara else "without"] = train_step
            seconds = time_steps(setups, device, repeats, steps)
            out[f"{model_name}/{opt_name}"] = seconds["with"] / seconds["without"] - 1.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 6e6, 25e6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.steps = [2e4], 2, 1
    out = args.out or HERE / "results" / f"overhead-{args.device.split(':')[0]}.json"
    console = Console(width=160)
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    table = Table(title=f"CLARA per-step cost on {args.device} (in foreach-Adam steps; persistent bytes/param)")
    for column in ("parameters", "tensors", "method", "step time", "cost (Adam steps)", "extra B/param"):
        table.add_column(column, justify="right")
    for size in args.sizes:
        width = 512 if size < 2e6 else 1024
        costs = per_step_costs(int(size), width, args.device, args.repeats, args.steps)
        report[f"{int(size)}"] = costs
        for name, row in costs["rows"].items():
            cost = row.get("clara_cost_in_adam_steps", row.get("cost_in_adam_steps"))
            table.add_row(
                f"{costs['numel'] / 1e6:.1f}M",
                str(costs["tensors"]),
                name,
                "-" if "seconds" not in row else f"{row['seconds'] * 1e3:.2f} ms",
                "-" if cost is None else f"{cost:+.3f}",
                "-" if "extra_bytes_per_param" not in row else f"{row['extra_bytes_per_param']:.1f}",
            )
    console.print(table)
    ratios = end_to_end(args.device, args.repeats, max(args.steps, 3), args.smoke)
    report["end_to_end_overhead"] = ratios
    e2e = Table(title="End-to-end training step: time with CLARA / without - 1")
    e2e.add_column("model/optimizer")
    e2e.add_column("overhead", justify="right")
    for name, ratio in ratios.items():
        e2e.add_row(name, f"{ratio * 100:+.1f} %")
    console.print(e2e)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
