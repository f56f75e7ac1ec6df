"""The null-model reference mu(t): expected ||p||^2 after t path updates under pure-noise gradients.

CLARA compares the squared length of the path with the length a random walk *made by the
same optimizer* would have. That reference depends on the optimizer's update rule, its
hyper-parameters, the tensor size n and the number of updates t (the transient), so it is
provided as a *curve* per tensor size: ``curve[t]`` for ``t = 0 .. horizon`` where the last
entry is the stationary value used for every later step. One home, four modules:

* :mod:`.curves` -- the contract (:class:`Reference`) and the exact references:
  :class:`PlainReference` (independent steps, ``c/(2-c) * (1 - (1-c)^(2t))``) and
  :class:`HeavyBallReference` (heavy-ball momentum, from the expected cosine of two correlated
  isotropic Gaussian vectors);
* :mod:`.monte_carlo` -- :class:`MonteCarloReference`: any element-wise optimizer's own update
  on i.i.d. Gaussian gradients (with the heavy-ball curve as control variate where it applies);
* :mod:`.families` -- which reference each optimizer family gets, and the hyper-parameter keys
  that decide when it is rebuilt;
* :mod:`.cache` -- per param group, the curves in use (:class:`ReferenceCache`).
"""

from lightning_clara.reference.cache import GroupReference, ReferenceCache
from lightning_clara.reference.curves import (
    SIZE_CAP,
    HeavyBallReference,
    PlainReference,
    Reference,
    expected_cosine,
    freeze,
    shared,
)
from lightning_clara.reference.families import REFERENCE_FAMILIES, ReferenceKeys, reference_for, reference_key
from lightning_clara.reference.monte_carlo import MonteCarloReference, SpeedUp

__all__ = [
    "REFERENCE_FAMILIES",
    "SIZE_CAP",
    "GroupReference",
    "HeavyBallReference",
    "MonteCarloReference",
    "PlainReference",
    "Reference",
    "ReferenceCache",
    "ReferenceKeys",
    "SpeedUp",
    "expected_cosine",
    "freeze",
    "reference_for",
    "reference_key",
    "shared",
]
