"""A deliberately simple, loop-based implementation of ALGORITHM.md, kept beside the fast one.

No foreach kernels, no hooks, no bucketing: one Python loop over tensors per step, float64
everywhere, the optimizer update written out by hand. The library must match it step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MuFunction = Callable[[int, int], float]
"""mu(n, t): expected ||p||^2 of a tensor with n elements after t path updates."""


def plain_sgd_mu(c: float) -> MuFunction:
    """ALGORITHM.md's closed form for SGD without momentum (independent of n)."""
    return lambda n, t: c / (2 - c) * (1 - (1 - c) ** (2 * t))


def damping_gain(t: int, fast_start: int, hold_after: int) -> float:
    """The multiplier of ``d`` at the t-th adapted step (t = 0, 1, ...): the fast start, then the hold."""
    gain = 1.0
    if t < fast_start:
        gain += 19.0 * (1.0 - t / fast_start)
    if hold_after and t > hold_after:
        gain *= math.exp(-(t - hold_after) / (hold_after / 3))
    return gain


class SimpleCLARA:
    """The rule of ALGORITHM.md for one optimizer (one scope), fed with realised steps.

    ``rule="paper"``: ``log F += d (r / target - 1)``; ``rule="normalized"`` (the library default)
    divides ``r / target - 1`` by ``r_max / target - 1``, with ``r_max = (tensors that moved) / sum mu``.
    The fast start (the library's default: 50 steps with the normalized rule, none with the paper's)
    multiplies ``d`` by ``1 + 19 (1 - t / fast_start)`` at the t-th adapted step (t = 0, 1, ...) while
    positive; the hold (600 steps with the normalized rule, none with the paper's) multiplies it by
    ``exp(-(t - hold_after) / (hold_after / 3))`` once ``t > hold_after``. F starts at
    ``initial_factor`` (0.1 with the normalized rule, 1 with the paper's). ``samples[k]``, when
    given, are the flat indices of tensor k's sampled coordinates (``sample=m``): its path lives on
    them and its step is the full step at them, and ``mu`` is asked for the sample's size.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        c: float,
        d: float,
        mu: MuFunction,
        rule: str = "normalized",
        fast_start: int | None = None,
        hold_after: int | None = None,
        target: float | None = None,
        initial_factor: float | None = None,
        samples: Sequence[Tensor | None] | None = None,
    ) -> None:
        # None: the library's default for the rule (normalized: F from 0.1, target 0.5; paper: 1, 1)
        normalized = rule == "normalized"
        self.c, self.d, self.mu, self.rule = c, d, mu, rule
        self.fast_start = (50 if normalized else 0) if fast_start is None else fast_start
        self.hold_after = (600 if normalized else 0) if hold_after is None else hold_after
        self.target = (0.5 if normalized else 1.0) if target is None else target
        initial_factor = (0.1 if normalized else 1.0) if initial_factor is None else initial_factor
        self.adapted = 0
        # samples[k]: flat indices of tensor k's sampled coordinates (its path lives on them), or None
        self.samples = list(samples) if samples is not None else [None] * len(shapes)
        self.paths = [
            torch.zeros(shape if index is None else (index.numel(),), dtype=torch.float64)
            for shape, index in zip(shapes, self.samples, strict=True)
        ]
        self.counts = [0] * len(shapes)
        self.log_factor = math.log(initial_factor)
        self.ratio: float | None = None

    @property
    def factor(self) -> float:
        return math.exp(self.log_factor)

    def update(self, steps: Sequence[Tensor | None]) -> None:
        """``steps[k] = theta_k(before) - theta_k(after)``, or None for a tensor the step did not touch."""
        squared, expected, moved = 0.0, 0.0, 0
        for k, step in enumerate(steps):
            if step is None:
                continue
            step = step.detach().to(torch.float64)
            if self.samples[k] is not None:
                step = step.flatten()[self.samples[k]]
            norm = float(step.norm())
            if norm == 0.0 or not math.isfinite(norm):
                continue
            self.paths[k] = (1 - self.c) * self.paths[k] + self.c * step / norm
            self.counts[k] += 1
            squared += float(self.paths[k].pow(2).sum())
            expected += self.mu(step.numel(), self.counts[k])
            moved += 1
        if expected > 0:
            self.ratio = squared / expected
            signal = self.ratio / self.target - 1
            if self.rule == "normalized":
                headroom = moved / expected / self.target - 1  # every ||p_k|| <= 1
                signal = signal / headroom if headroom > 1e-12 else 0.0
            self.log_factor += damping_gain(self.adapted, self.fast_start, self.hold_after) * self.d * signal
            self.adapted += 1


def sgd_step(params: Sequence[Tensor], lr: float) -> list[Tensor]:
    """Plain SGD written out: returns the realised steps."""
    steps = []
    with torch.no_grad():
        for p in params:
            step = lr * p.grad
            p.sub_(step)
            steps.append(step)
    return steps


class SimpleAdam:
    """Adam (L2 weight decay off) written out by hand: returns the realised steps."""

    def __init__(self, params: Sequence[Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, lr: float) -> list[Tensor]:
        self.t += 1
        b1, b2 = self.betas
        steps = []
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = m / (1 - b1**self.t)
                v_hat = v / (1 - b2**self.t)
                step = lr * m_hat / (v_hat.sqrt() + self.eps)
                p.sub_(step)
                steps.append(step)
        return steps


class SimpleMomentumSGD:
    """SGD with heavy-ball momentum written out (torch's convention: the first buffer is the gradient)."""

    def __init__(self, params: Sequence[Tensor], momentum: float = 0.9) -> None:
        self.params = list(params)
        self.momentum = momentum
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    def step(self, lr: float) -> list[Tensor]:
        """Update ``buf = momentum * buf + grad`` and ``p -= lr * buf``; returns the realised steps."""
        steps = []
        with torch.no_grad():
            for k, p in enumerate(self.params):
                buffer = self.buffers[k]
                buffer = p.grad.clone() if buffer is None else self.momentum * buffer + p.grad
                self.buffers[k] = buffer
                step = lr * buffer
                p.sub_(step)
                steps.append(step)
        return steps
