"""One-off study (2026-12-03, issue 22): does ``torch.compile`` make the path update cheaper on the CPU?

Issue 22 asks for at most +15 % (MLP) and +8 % (CNN) CPU time per MNIST-1D training step with the
callback's defaults. After the leaner step, CLARA's own cost there is a fixed ~200-300 us per step,
and the ten eager ops of ``SampleBucket.update`` are about a third of it (benchmarks/RESULTS.md, "A
leaner step"). The obvious way to fewer kernels without leaving plain torch is ``torch.compile``:
Inductor fuses the ten ops into one generated C++ loop. This script measures whether that pays.

It compiles the same arithmetic as ``SampleBucket.update`` (path decay and unit-step update, reset of
non-finite rows, ``||p||^2`` and ``||s||`` per row; ``dynamic=False``) and times, one thread:

1. the update alone on the bucket shapes of the MNIST-1D MLP ``(6, 4096)`` and CNN ``(8, 1875)``,
   eager against compiled (median of 7 blocks of 1000 calls);
2. the MNIST-1D MLP training step (batch 100, Adam, F pinned, the loss observed) without CLARA, with
   the library's eager update, with the compiled one patched in, and with the host part only (the
   gather and the update replaced by nothing, ``skip_nonfinite=False``: what CLARA costs with no device
   work at all), interleaved blocks of 100 steps (median of 25). The compiled kernel is checked against
   the eager one before timing.

    python benchmarks/studies/compiled_update.py        # about 1 minute (the compile takes ~20 s)

Verdict and numbers: ``benchmarks/RESULTS.md`` ("Fused by torch.compile (measured, not adopted)").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.console import Console

import lightning_clara.sampling as sampling
from lightning_clara import CLARA


def update_arithmetic(path: torch.Tensor, step: torch.Tensor, results: torch.Tensor, c: float) -> None:
    """``SampleBucket.update``'s arithmetic in one function, as Inductor would fuse it."""
    norms = torch.linalg.vector_norm(step, dim=1)
    still = norms == 0
    scale = torch.where(still, 0.0, c / norms)
    decay = torch.where(still, 1.0, 1.0 - c) + norms * 0.0  # NaN where ||s|| is not finite
    path.mul_(decay[:, None]).addcmul_(step, scale[:, None]).nan_to_num_(0.0, 0.0, 0.0)
    results[0] = (path * path).sum(1)
    results[1] = norms


def median_us(call: Callable[[], None], blocks: int, calls: int) -> float:
    for _ in range(50):
        call()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def alone(console: Console, compiled: Callable[..., None]) -> None:
    for name, shape in (("MLP (6, 4096)", (6, 4096)), ("CNN (8, 1875)", (8, 1875))):
        tensors = (torch.zeros(shape), torch.randn(shape), torch.zeros(2, shape[0]), 0.02)
        eager_us = median_us(lambda tensors=tensors: update_arithmetic(*tensors), 7, 1000)
        compiled_us = median_us(lambda tensors=tensors: compiled(*tensors), 7, 1000)
        console.print(f"update alone, {name}: eager {eager_us:.1f} us, compiled {compiled_us:.1f} us")


def in_training_step(console: Console, compiled: Callable[..., None]) -> None:
    eager_update, eager_gather = sampling.SampleBucket.update, sampling.SampleBucket.before_step
    mode = ["eager update"]

    def update(self: sampling.SampleBucket, c: float, lr_used: Sequence[float] = ()) -> sampling.SampleStep:
        if mode[0] == "eager update":
            return eager_update(self, c, lr_used)
        if mode[0] == "compiled update":
            step = self.realised_step(lr_used)
            with torch.no_grad():
                compiled(self.path, step, self._results, c)
        return sampling.SampleStep(self, self._results, self.curves)  # "host part only": no device work

    def before_step(self: sampling.SampleBucket) -> None:
        if mode[0] != "host part only":
            eager_gather(self)

    x, y = torch.randn(100, 40), torch.randint(0, 10, (100,))

    def setup(**options: Any) -> Callable[[], None]:
        torch.manual_seed(0)
        layers = (torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU())
        model = torch.nn.Sequential(*layers, torch.nn.Linear(100, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        clara = None if options.get("off") else CLARA(optimizer, min_factor=1.0, max_factor=1.0, **options)

        def train_step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if clara is not None:
                clara.observe_loss(loss)

        return train_step

    setups = {
        "without CLARA": setup(off=True),
        "eager update": setup(),
        "compiled update": setup(),
        # the hooks, the lr swap, the host copy, the tally and the rule, with no path work and no NaN check
        "host part only": setup(skip_nonfinite=False),
    }
    sampling.SampleBucket.update = update  # type: ignore[method-assign]
    sampling.SampleBucket.before_step = before_step  # type: ignore[method-assign]
    try:
        samples: dict[str, list[float]] = {name: [] for name in setups}
        for name, train_step in setups.items():
            mode[0] = name
            for _ in range(30):
                train_step()
        for _ in range(25):
            for name, train_step in setups.items():
                mode[0] = name
                start = time.perf_counter()
                for _ in range(100):
                    train_step()
                samples[name].append((time.perf_counter() - start) / 100)
    finally:
        sampling.SampleBucket.update = eager_update  # type: ignore[method-assign]
        sampling.SampleBucket.before_step = eager_gather  # type: ignore[method-assign]
    base = statistics.median(samples["without CLARA"])
    for name, values in samples.items():
        seconds = statistics.median(values)
        console.print(f"MLP training step, {name}: {seconds * 1e6:.0f} us ({seconds / base - 1:+.0%})")


def main() -> None:
    torch.set_num_threads(1)
    console = Console()
    compiled = torch.compile(update_arithmetic, dynamic=False)
    path, step = torch.zeros(3, 64), torch.randn(3, 64)
    step[1] = 0.0
    step[2, 0] = float("nan")
    expected, got = path.clone(), path.clone()
    results_e, results_c = torch.zeros(2, 3), torch.zeros(2, 3)
    start = time.perf_counter()
    for _ in range(3):
        update_arithmetic(expected, step, results_e, 0.02)
        compiled(got, step, results_c, 0.02)
    console.print(f"first compiled calls (compile included): {time.perf_counter() - start:.1f} s")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(results_c, results_e, equal_nan=True)
    alone(console, compiled)
    in_training_step(console, compiled)


if __name__ == "__main__":
    main()
