"""What CLARA costs per step: in units of one foreach Adam step, end to end, and in memory.

All numbers are measured side by side in one run (interleaved repetitions, medians), so the
ratios hold on a loaded machine even when the absolute times do not. Every table compares the
default (sampled paths, ``sample=4096``) with every coordinate (``sample=None``, the paper's exact
statistic on the same engine).

    python benchmarks/overhead.py              # the issue's targets and the scaling tables (~10 min on 2 cores)
    python benchmarks/overhead.py --smoke      # seconds: keeps the script working (tested)
    python benchmarks/overhead.py --device cuda  # also counts kernel launches and blocking syncs
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
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
#: The engines compared: the default and 0.1.0's full paths.
ENGINES = {"sampled": {}, "full": {"sample": None}}
#: The default without its NaN/inf gradient check (``skip_nonfinite=False``): the check's own cost
#: is the difference to "sampled".
NO_CHECK = {"sampled-nocheck": {"skip_nonfinite": False}}
#: The safeguard's restore keeps two full parameter snapshots whatever the paths: its cost, on the
#: target sizes only.
WITH_SAFEGUARD = {**ENGINES, **NO_CHECK, "sampled+safeguard": {"safeguard": True}}
#: End to end: the default, full paths, and the default without the gradient check.
END_TO_END = {**ENGINES, **NO_CHECK}
#: (parameters, tensors) of the per-step targets (issue 13).
TARGETS = ((6.3e6, 50), (26e6, 200))
TENSOR_COUNTS = (10, 100, 1000)
MODEL_SIZES = (1e6, 6.3e6, 26e6, 100e6)


def make_params(total: float, tensors: int, device: str) -> list[torch.nn.Parameter]:
    """``tensors / 2`` square weight matrices, each with its bias (like an MLP), about ``total`` entries."""
    pairs = max(1, tensors // 2)
    width = max(1, round(math.sqrt(total / pairs)))
    params = []
    for _ in range(pairs):
        params.append(torch.nn.Parameter(torch.randn(width, width, device=device) * 0.01))
        params.append(torch.nn.Parameter(torch.zeros(width, device=device)))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def make_optimizer(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if kind == "adam_fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(
    setups: dict[str, Callable[[], None]],
    device: str,
    repeats: int,
    steps: int,
    prepare: dict[str, Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of every setup, interleaved so that load changes hit all alike.

    ``prepare[name]``, if given, runs (untimed) before each of that setup's timed blocks.
    """
    prepare = prepare or {}
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for name, step in setups.items():  # warm-up (and reference calibration)
        prepare.get(name, lambda: None)()
        for _ in range(3):
            step()
    for _ in range(repeats):
        for name, step in setups.items():
            prepare.get(name, lambda: None)()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def persistent_bytes(clara: Any) -> int:
    """Bytes CLARA keeps between steps: paths, step buffers, sample indices, the safeguard's restore point."""
    total = clara.paths.sampled.persistent_bytes()
    restore = None if clara._safeguard is None else clara._safeguard.restore_point
    if restore is not None:
        for store in (restore._current, restore._previous):
            total += sum(b.numel() * b.element_size() for b in store.values())
    return total


def step_costs(
    total: float,
    tensors: int,
    kinds: tuple[str, ...],
    device: str,
    repeats: int,
    steps: int,
    engines: dict[str, dict[str, Any]] = ENGINES,
) -> dict:
    """CLARA's cost per optimizer step, in foreach-Adam steps and in ms, per optimizer and engine."""
    from lightning_clara import CLARA

    setups: dict[str, Callable[[], None]] = {}
    prepare: dict[str, Callable[[], None]] = {}
    extra_bytes: dict[str, float] = {}
    hooks: dict[str, float] = {}
    keep: list[Any] = []
    numel = 0
    for kind in ("adam", *[k for k in kinds if k != "adam"]):
        # one set of parameters per optimizer, CLARA attached and detached around each timed block:
        # separate parameter copies differ in memory placement by more than CLARA costs at 100M
        params = make_params(total, tensors, device)
        numel = sum(p.numel() for p in params)
        optimizer = make_optimizer(kind, params)
        attached: list[Any] = []
        keep.append((params, optimizer, attached))

        def attach(
            name: str,
            options: dict[str, Any] | None,
            optimizer: torch.optim.Optimizer = optimizer,
            attached: list[Any] = attached,
            numel: int = numel,
        ) -> None:
            while attached:
                attached.pop().detach()
            if options is not None:
                attached.append(CLARA(optimizer, **PINNED, **options))
                for _ in range(3):  # untimed: the layout, the reference and every buffer (the
                    optimizer.step()  # safeguard's second snapshot comes at the second step)
                extra_bytes[name] = persistent_bytes(attached[0]) / numel
                hooks[name] = min(hooks.get(name, math.inf), _hooks_seconds(attached[0]))

        for engine, options in (("none", None), *engines.items()):
            name = f"{kind}/{engine}"
            setups[name] = optimizer.step
            prepare[name] = lambda name=name, options=options, attach=attach: attach(name, options)
    seconds = time_steps(setups, device, repeats, steps, prepare)
    adam = seconds["adam/none"]
    rows: dict[str, Any] = {}
    for name in extra_bytes:
        kind = name.split("/")[0]
        added = seconds[name] - seconds[f"{kind}/none"]
        rows[name] = {
            "seconds": seconds[name],
            "added_ms": added * 1e3,
            "cost_in_adam_steps": added / adam,
            "hooks_ms": hooks[name] * 1e3,
            "hooks_in_adam_steps": hooks[name] / adam,
            "extra_bytes_per_param": extra_bytes[name],
        }
    for _, _, attached in keep:
        while attached:
            attached.pop().detach()
    del keep
    gc.collect()
    return {"numel": numel, "tensors": tensors, "adam_ms": adam * 1e3, "rows": rows}


def check_costs(total: float, tensors: int, device: str, repeats: int, steps: int) -> dict[str, float]:
    """The NaN/inf gradient check (``skip_nonfinite``) alone, against the Adam and SGD steps it guards.

    Timed by itself because its cost is below the run-to-run spread of a whole optimizer step.
    """
    from lightning_clara.finite_guard import gradients_finite

    params = make_params(total, tensors, device)
    adam, sgd = make_optimizer("adam", params), make_optimizer("sgd", params)
    setups = {"adam": adam.step, "sgd": sgd.step, "check": lambda: gradients_finite(adam)}
    seconds = time_steps(setups, device, repeats, steps)
    numel = sum(p.numel() for p in params)
    return {
        "numel": numel,
        "tensors": tensors,
        "check_ms": seconds["check"] * 1e3,
        "in_adam_steps": seconds["check"] / seconds["adam"],
        "in_sgd_steps": seconds["check"] / seconds["sgd"],
    }


def _hooks_seconds(clara: Any, calls: int = 5) -> float:
    """CLARA's own work per step, timed alone: its pre- and post-step hooks around no update (the
    same kernels run; the step just reads as zero). Free of the memory-bound optimizer step's
    run-to-run spread, which at 100M parameters exceeds CLARA's whole cost."""
    from lightning_clara.stores import trainable

    optimizer = clara.optimizer
    best = math.inf
    for _ in range(calls):
        _sync(str(next(iter(trainable(optimizer))).device))
        start = time.perf_counter()
        clara._before_step(optimizer, (), {})
        clara._after_step(optimizer, (), {})
        clara._settle(collectives=False)
        best = min(best, time.perf_counter() - start)
    return best


def _deep_models() -> Any:
    """benchmarks/deep.py's MNIST-1D models (loaded from the file: the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("clara_deep_benchmark", HERE / "deep.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # its dataclasses look themselves up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def end_to_end(device: str, repeats: int, steps: int) -> dict[str, dict[str, float]]:
    """MNIST-1D training-step time (batch 100, forward + backward + step) with CLARA over without, - 1."""
    from lightning_clara import CLARA

    deep = _deep_models()
    factories = {
        "cnn": deep.CNN,
        "mlp": lambda: torch.nn.Sequential(
            *(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU()),
            torch.nn.Linear(100, 10),
        ),
    }
    x = torch.randn(100, 40, device=device)
    y = torch.randint(0, 10, (100,), device=device)
    out: dict[str, dict[str, float]] = {}
    for model_name, factory in factories.items():
        for kind in ("sgd", "adam"):
            setups = {}
            keep = []
            for engine in ("none", *END_TO_END):
                torch.manual_seed(0)
                model = factory().to(device)
                if kind == "sgd":
                    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
                else:
                    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                clara = None if engine == "none" else CLARA(optimizer, **PINNED, **END_TO_END[engine])

                def train_step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                keep.append((model, optimizer, clara))
                setups[engine] = train_step
            seconds = time_steps(setups, device, repeats, steps)
            out[f"{model_name}/{kind}"] = {engine: seconds[engine] / seconds["none"] - 1.0 for engine in END_TO_END} | {
                "step_us": seconds["none"] * 1e6
            }
    return out


def cuda_launches(device: str) -> dict[str, Any]:
    """Kernel launches and blocking synchronisations of one Adam+CLARA step on CUDA (26M in 200 tensors)."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_clara import CLARA

    out: dict[str, Any] = {}
    # "defaults": CLARACallback()'s work per step, the loss brake fed a CUDA loss after every step;
    # the gradient check's decision is one sync per step, which "defaults-nocheck" leaves out; a fused
    # Adam decides on the device flag ("fused" rows: 0 syncs of CLARA's expected)
    engines = (("none", None), *ENGINES.items(), ("defaults", {}), ("defaults-nocheck", {"skip_nonfinite": False}))
    engines += (("fused-none", None), ("fused-defaults", {}))
    for engine, options in engines:
        params = make_params(26e6, 200, device)
        optimizer = make_optimizer("adam_fused" if engine.startswith("fused") else "adam", params)
        clara = None if options is None else CLARA(optimizer, **PINNED, **options)

        # a loss on the device, as training_step returns it
        loss = params[0][0, 0].detach() * 0 + 1.0 if "defaults" in engine else None

        def step(optimizer: torch.optim.Optimizer = optimizer, clara: Any = clara, loss: Any = loss) -> None:
            optimizer.step()
            if loss is not None:
                clara.observe_loss(loss)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # every synchronising call inside the steps warns
            try:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        kernels = sum(1 for event in prof.events() if event.device_type.name == "CUDA")
        out[engine] = {"kernels_per_step": kernels / 2, "syncs_per_step": len(syncs) / 2}
    return out


#: ATen ops that only make views or allocate (no arithmetic, no copy): left out of the op count.
METADATA_OPS = frozenset(
    {
        "aten::view", "aten::as_strided", "aten::detach", "aten::empty", "aten::empty_strided", "aten::alias",
        "aten::reshape", "aten::expand", "aten::unsqueeze", "aten::select", "aten::slice", "aten::t",
        "aten::transpose", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::unbind",
    }
)  # fmt: skip


def cpu_ops(steps: int = 4) -> dict[str, Any]:
    """ATen ops CLARA adds to one Adam step of a small MLP whose tensors all fit the sample (issue 22's
    kernel count, on the CPU): the step with CLARA (fed its loss, as the callback does) minus without.

    Two counts: ``calls``, the ops dispatched from Python (what an accelerator launches: a foreach op is
    one multi-tensor kernel there), and ``kernels``, the innermost ops that compute (a foreach op's
    per-tensor loop on the CPU counts once per tensor); views and bare allocations aside in both."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from lightning_clara import CLARA

    def working(event: Any) -> bool:
        return event.name.startswith("aten::") and event.name not in METADATA_OPS

    def count(attach: dict[str, Any] | None) -> tuple[Counter[str], Counter[str]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        clara = None if attach is None else CLARA(optimizer, **attach)
        x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()  # the gradients stay: each profiled step is the optimizer's step alone

        def step() -> None:
            optimizer.step()
            if clara is not None:
                clara.observe_loss(loss.detach())

        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        calls: Counter[str] = Counter()
        kernels: Counter[str] = Counter()
        for event in prof.events():
            if not working(event):
                continue
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:
                calls[event.name] += 1
            if not any(working(child) for child in event.cpu_children):
                kernels[event.name] += 1
        return calls, kernels

    without = count(None)
    out: dict[str, Any] = {}
    for engine, options in (("defaults", {}), ("defaults-nocheck", {"skip_nonfinite": False})):
        row: dict[str, Any] = {}
        for name, added, base in zip(("calls", "kernels"), count(options), without, strict=True):
            added.subtract(base)
            ops = {op: n / steps for op, n in sorted(added.items()) if n > 0}
            row[f"{name}_per_step"] = sum(added.values()) / steps  # a net count: Adam's own ops cancel
            row[f"{name}_by_op"] = ops
        out[engine] = row
    return out


def memory(total: float, tensors: int, device: str) -> dict[str, float]:
    """Bytes per parameter that CLARA keeps with CLARACallback()'s defaults (and with the safeguard),
    beside Adam's own state, after a few steps fed their loss (issue 21: <= 0.5 B/param at 34M)."""
    from lightning_clara import CLARA

    out: dict[str, float] = {}
    for name, options in (("defaults", {}), ("safeguard", {"safeguard": True})):
        params = make_params(total, tensors, device)
        numel = sum(p.numel() for p in params)
        optimizer = make_optimizer("adam", params)
        clara = CLARA(optimizer, **PINNED, **options)
        for _ in range(3):
            optimizer.step()
            clara.observe_loss(1.0)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        out["parameters"] = numel
        out["adam_state_bytes_per_param"] = sum(t.numel() * t.element_size() for t in state) / numel
        out[f"clara_{name}_bytes_per_param"] = persistent_bytes(clara) / numel
        clara.detach()
        del clara, optimizer, params
        gc.collect()
    return out


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--out", type=Path, help="default: results/overhead-DEVICE.json (--smoke: a temporary folder)")
    args = parser.parse_args(argv)
    targets, counts, sizes = TARGETS, TENSOR_COUNTS, MODEL_SIZES
    if args.smoke:
        targets, counts, sizes, args.repeats, args.steps = ((2e4, 4),), (4,), (2e4,), 2, 1
    name = f"overhead-{args.device.split(':')[0]}.json"  # --smoke never writes into the kept results
    out = args.out or (Path(tempfile.mkdtemp(prefix="clara-")) / name if args.smoke else HERE / "results" / name)
    console = Console(width=200)
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    columns = [
        "parameters", "tensors", "optimizer", "engine", "added per step", "cost (Adam steps)",
        "hooks alone", "hooks (Adam steps)", "extra B/param",
    ]  # fmt: skip

    def add_rows(table: Table, costs: dict[str, Any]) -> None:
        for name, row in costs["rows"].items():
            kind, engine = name.split("/")
            table.add_row(
                f"{costs['numel'] / 1e6:.2f}M", str(costs["tensors"]), kind, engine, f"{row['added_ms']:.3f} ms",
                f"{row['cost_in_adam_steps']:+.3f}", f"{row['hooks_ms']:.3f} ms", f"{row['hooks_in_adam_steps']:.3f}",
                f"{row['extra_bytes_per_param']:.2f}",
            )  # fmt: skip

    report["memory"] = memory(2e4 if args.smoke else 34e6, 4 if args.smoke else 200, args.device)
    mem = report["memory"]
    table = _table("Memory per parameter (target: CLARA <= 0.5 B/param with the defaults, 34M parameters)",
                   ["parameters", "Adam's state", "CLARA, defaults", "CLARA, safeguard=True"])  # fmt: skip
    table.add_row(
        f"{mem['parameters'] / 1e6:.2f}M", f"{mem['adam_state_bytes_per_param']:.2f} B",
        f"{mem['clara_defaults_bytes_per_param']:.2f} B", f"{mem['clara_safeguard_bytes_per_param']:.2f} B",
    )  # fmt: skip
    console.print(table)

    table = _table("CLARA's added cost per optimizer step (targets: <= 0.1 Adam steps)", columns)
    report["targets"] = []
    for total, tensors in targets:
        costs = step_costs(total, tensors, ("adam", "sgd"), args.device, args.repeats, args.steps, WITH_SAFEGUARD)
        report["targets"].append(costs)
        add_rows(table, costs)
    console.print(table)

    table = _table("The NaN/inf gradient check alone (skip_nonfinite, on by default)",
                   ["parameters", "tensors", "check", "in Adam steps", "in SGD-momentum steps"])  # fmt: skip
    report["gradient_check"] = []
    for total, tensors in (*targets, (1.5e4, 6)):
        cost = check_costs(total, tensors, args.device, args.repeats, args.steps * (20 if total < 1e5 else 1))
        report["gradient_check"].append(cost)
        table.add_row(
            f"{cost['numel'] / 1e6:.2f}M", str(tensors), f"{cost['check_ms']:.3f} ms",
            f"{cost['in_adam_steps']:.3f}", f"{cost['in_sgd_steps']:.3f}",
        )  # fmt: skip
    console.print(table)

    small = step_costs(1.5e4, 6, ("adam",), args.device, args.repeats * 3, args.steps * 20)
    report["small_mlp"] = small
    table = _table("6-tensor MLP (target: <= 0.5 of its own Adam step)", columns)
    add_rows(table, small)
    console.print(table)

    table = _table("Against the tensor count (1M parameters, Adam)", columns)
    report["tensor_counts"] = []
    for tensors in counts:
        costs = step_costs(1e6 if not args.smoke else 2e4, tensors, ("adam",), args.device, args.repeats, args.steps)
        report["tensor_counts"].append(costs)
        add_rows(table, costs)
    console.print(table)

    table = _table("Against the model size (100 tensors, Adam): sampled stays flat in ms", columns)
    report["model_sizes"] = []
    for total in sizes:
        tensors = 100 if not args.smoke else 4
        costs = step_costs(total, tensors, ("adam",), args.device, max(3, args.repeats // 2), args.steps)
        report["model_sizes"].append(costs)
        add_rows(table, costs)
    console.print(table)

    report["cpu_ops"] = cpu_ops()
    table = _table("ATen ops CLARA adds per Adam step, CPU, tensors within the sample (issue 22's target: <= 12)",
                   ["engine", "calls per step", "CPU kernels per step", "the most frequent calls"])  # fmt: skip
    for engine, row in report["cpu_ops"].items():
        common = sorted(row["calls_by_op"].items(), key=lambda item: -item[1])[:6]
        table.add_row(engine, f"{row['calls_per_step']:.0f}", f"{row['kernels_per_step']:.0f}",
                      ", ".join(f"{n:g} {name[6:]}" for name, n in common))  # fmt: skip
    console.print(table)

    ratios = end_to_end(args.device, args.repeats, max(args.steps, 3) * (1 if args.smoke else 10))
    report["end_to_end_overhead"] = ratios
    e2e = _table("End to end, MNIST-1D training step (batch 100): with CLARA / without - 1", ["model/optimizer",
                 "step without", *END_TO_END])  # fmt: skip
    for name, row in ratios.items():
        e2e.add_row(name, f"{row['step_us']:.0f} us", *(f"{row[engine] * 100:+.1f} %" for engine in END_TO_END))
    console.print(e2e)
    if args.device.startswith("cuda"):
        report["cuda_launches"] = cuda_launches(args.device)
        console.print(report["cuda_launches"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
