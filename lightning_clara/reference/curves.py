"""The closed-form references and what every reference shares: the curve contract, the process-wide cache.

:class:`Reference` provides mu_n(t), the expected ||p||^2 after t path updates under pure-noise
gradients, as a curve per tensor size. :class:`PlainReference` (independent steps: plain SGD) and
:class:`HeavyBallReference` (heavy-ball momentum) are exact for any n and t.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import torch

__all__ = [
    "SIZE_CAP",
    "HeavyBallReference",
    "PlainReference",
    "Reference",
    "expected_cosine",
    "freeze",
    "shared",
]

#: Tensors larger than this share one curve: the finite-size correction is below 1e-4 there.
SIZE_CAP = 4096
#: Relative weight below which the tail of a geometric sum is dropped.
_TOLERANCE = 1e-12
#: Longest transient a curve stores; later steps use its last (stationary) value.
MAX_HORIZON = 4096


def _horizon_for(rate: float) -> int:
    """Steps until ``rate ** t`` falls below the tolerance (``rate`` in [0, 1))."""
    if rate <= 0.0:
        return 1
    return min(MAX_HORIZON, max(1, math.ceil(math.log(_TOLERANCE) / math.log(rate))))


#: Below this size the hypergeometric series converges slowly near |rho| = 1 (its terms fall like
#: k^-(n/2 + 1) rho^2k: 10^5 terms for n = 2), so Euler's integral is summed by quadrature instead.
_QUADRATURE_BELOW = 16
#: Gauss-Legendre nodes of that quadrature: it matches the series to ~1e-12 for n < 16, |rho| <= 0.9999.
_QUADRATURE_NODES = 128


def expected_cosine(n: int, rho: torch.Tensor) -> torch.Tensor:
    """E[cos(x, y)] for n-dimensional isotropic Gaussians x, y with coordinate correlation rho.

    ``rho * 2/n * (Gamma((n+1)/2) / Gamma(n/2))**2 * 2F1(1/2, 1/2; n/2 + 1; rho**2)``; for n = 1
    this is ``(2/pi) * arcsin(rho)``, and it tends to rho as n grows.
    """
    rho = rho.to(torch.float64)
    if n == 1:
        return (2.0 / math.pi) * torch.asin(rho.clamp(-1.0, 1.0))
    prefactor = 2.0 / n * math.exp(2.0 * (math.lgamma((n + 1) / 2) - math.lgamma(n / 2)))
    hypergeometric = _euler_integral if n < _QUADRATURE_BELOW else _series
    return rho * prefactor * hypergeometric(n, rho * rho)


def _series(n: int, x: torch.Tensor) -> torch.Tensor:
    """``2F1(1/2, 1/2; n/2 + 1; x)`` by its power series, to relative 1e-16."""
    term = torch.ones_like(x)
    total = torch.ones_like(x)
    k = 0
    while True:
        term = term * ((0.5 + k) ** 2 / ((n / 2 + 1 + k) * (k + 1))) * x
        total = total + term
        k += 1
        if bool((term <= 1e-16 * total).all()) or k > 100_000:
            return total


def _euler_integral(n: int, x: torch.Tensor) -> torch.Tensor:
    """``2F1(1/2, 1/2; n/2 + 1; x)`` from Euler's integral with ``t = sin^2(phi)``:
    ``Gamma(c) / (Gamma(1/2) Gamma(c - 1/2)) * int_0^(pi/2) 2 cos^n(phi) / sqrt(1 - x sin^2(phi)) dphi``,
    ``c = n/2 + 1``; a smooth integrand for n >= 2 and x < 1, summed one node at a time (no nodes x entries copy).
    """
    c = n / 2 + 1
    scale = math.exp(math.lgamma(c) - math.lgamma(0.5) - math.lgamma(c - 0.5))
    total = torch.zeros_like(x)
    for phi, weight in _legendre_nodes(_QUADRATURE_NODES):
        sin2 = math.sin(phi) ** 2
        total += (2.0 * weight * math.cos(phi) ** n) * torch.rsqrt(1.0 - sin2 * x)
    return scale * total


@functools.cache
def _legendre_nodes(count: int) -> tuple[tuple[float, float], ...]:
    """Gauss-Legendre nodes and weights on [0, pi/2] (Golub-Welsch: the eigenpairs of the Jacobi matrix)."""
    k = torch.arange(1, count, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = 2.0 * vectors[0] ** 2
    half = math.pi / 4
    return tuple((half * (float(t) + 1.0), half * float(w)) for t, w in zip(nodes, weights, strict=True))


class Reference(ABC):
    """A family of curves mu_n(t), one per tensor size n, cached per size."""

    def __init__(self, c: float) -> None:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"c must be in (0, 1], got {c!r}")
        self.c = float(c)
        self._curves: dict[int, torch.Tensor] = {}

    @property
    @abstractmethod
    def key(self) -> tuple[Any, ...]:
        """Hashable description: two references with equal keys give equal curves."""

    @abstractmethod
    def _compute(self, sizes: list[int]) -> dict[int, torch.Tensor]:
        """Curves (float64, CPU, ``curve[0] == 0``) for the given capped sizes."""

    def curves(self, sizes: list[int]) -> dict[int, torch.Tensor]:
        """Curves for the given tensor sizes (numel), computed once per capped size."""
        capped = {n: min(int(n), SIZE_CAP) for n in sizes}
        missing = sorted({m for m in capped.values() if m not in self._curves})
        if missing:
            self._curves.update(self._compute(missing))
        return {n: self._curves[m] for n, m in capped.items()}

    def curve(self, n: int) -> torch.Tensor:
        """The curve for one tensor size."""
        return self.curves([n])[n]

    def stationary(self, n: int) -> float:
        """The large-t value mu_n(infinity)."""
        return float(self.curve(n)[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key}"


class PlainReference(Reference):
    """Independent steps: ``mu(t) = c/(2-c) * (1 - (1-c)^(2t))`` whatever n."""

    @property
    def key(self) -> tuple[Any, ...]:
        return ("plain", self.c)

    def _compute(self, sizes: list[int]) -> dict[int, torch.Tensor]:
        a2 = (1.0 - self.c) ** 2
        t = torch.arange(_horizon_for(a2) + 1, dtype=torch.float64)
        curve = self.c / (2.0 - self.c) * (1.0 - a2**t)
        return dict.fromkeys(sizes, curve)


class HeavyBallReference(Reference):
    """Steps ``m_t = beta * m_{t-1} + g_t`` with i.i.d. N(0, I) gradients (any dampening-free momentum).

    Steps i < j have coordinate correlation ``beta^(j-i) * sqrt(S_i / S_j)`` with
    ``S_t = (1 - beta^(2t)) / (1 - beta^2)``, and their unit vectors have the expected cosine
    :func:`expected_cosine`. With ``a = 1 - c`` the path obeys
    ``mu(t) = a^2 mu(t-1) + c^2 + 2 c^2 sum_{lag>=1} a^lag E[cos(u_{t-lag}, u_t)]``.
    """

    def __init__(self, c: float, beta: float) -> None:
        super().__init__(c)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)

    @property
    def key(self) -> tuple[Any, ...]:
        return ("heavy_ball", self.c, self.beta)

    def _compute(self, sizes: list[int]) -> dict[int, torch.Tensor]:
        a, beta = 1.0 - self.c, self.beta
        if beta == 0.0:
            return PlainReference(self.c)._compute(sizes)
        horizon = max(_horizon_for(beta * beta), _horizon_for(a * a))
        max_lag = _horizon_for(a * beta)
        t = torch.arange(1, horizon + 1, dtype=torch.float64).unsqueeze(1)  # step index t
        lag = torch.arange(1, max_lag + 1, dtype=torch.float64).unsqueeze(0)
        earlier = t - lag
        valid = earlier >= 1
        s_now = 1.0 - beta ** (2 * t)
        s_then = 1.0 - beta ** (2 * earlier.clamp(min=1))
        rho = torch.where(valid, beta**lag * torch.sqrt(s_then / s_now), torch.zeros(()))
        weights = torch.where(valid, a**lag, torch.zeros(()))
        out = {}
        c2 = self.c * self.c
        for n in sizes:
            cross = (weights * expected_cosine(n, rho)).sum(dim=1)
            mu = torch.zeros(horizon + 1, dtype=torch.float64)
            for step in range(1, horizon + 1):
                mu[step] = a * a * mu[step - 1] + c2 + 2.0 * c2 * cross[step - 1]
            out[n] = mu
        return out


def freeze(value: Any) -> Any:
    """A hashable copy of nested lists, tuples and dicts (for cache keys)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value


#: References kept process-wide (least recently used dropped first): enough for every group of a
#: few models, bounded whatever an optimizer does to its hyper-parameters.
SHARED_CAPACITY = 128
_SHARED: OrderedDict[tuple[Any, ...], Reference] = OrderedDict()


def shared(reference: Reference) -> Reference:
    """The process-wide instance with the same key, so curves are computed once per process."""
    key = reference.key
    if key in _SHARED:
        _SHARED.move_to_end(key)
        return _SHARED[key]
    _SHARED[key] = reference
    while len(_SHARED) > SHARED_CAPACITY:
        _SHARED.popitem(last=False)
    return reference
