"""The default rule's promises on deep networks and under both null models (docs/default-rule.md).

* No collapse: in a long shuffled run (75 epochs of a small data set) the lr used at the end stays
  within 30x of the tuned fixed lr. CLARA 0.1.0's defaults (c = 0.2, no hold) collapse there.
* I.i.d. noise: the statistic is unbiased (E[r] = 1, so with ``target=1`` E[log F] does not move), and
  with the default target the expected drift of log F is the known sum of ``d_t (1 - target) /
  (r_max - target)``: no more.
* Sampling without replacement at a model that cannot improve (per-example gradients that sum to
  zero over the data set): r < 1 at every lr, and the factor falls, but the hold stops it; CLARA
  0.1.0's rule keeps falling without end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from reference_loop import damping_gain
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clara import CLARA
from lightning_clara.options import RULE_DEFAULTS
from lightning_clara.reference import reference_for

#: CLARA 0.1.0's defaults: the collapse these tests must catch (full paths, as 0.1.0 had).
CLARA_0_1_0 = {
    "c": 0.2,
    "initial_factor": 1.0,
    "hold_after": 0,
    "target": 1.0,
    "sample": None,
}  # full paths
EPOCHS = 75
#: The acceptance of the adaptation issue: the final lr within this factor of the tuned fixed lr.
WITHIN = 30.0


# ------------------------------------------------------------------------------ a small deep network
def teacher_data(samples: int = 512, features: int = 16, classes: int = 4) -> TensorDataset:
    """Labels from a random tanh teacher network: learnable, and fitted to ~0 loss by a wider student."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    w1 = torch.randn(features, 32, generator=generator)
    w2 = torch.randn(32, classes, generator=generator)
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(1))


def train(optimizer_name: str, lr: float, clara_options: dict | None) -> tuple[float, float]:
    """75 epochs of a shuffled DataLoader (batch 32, 16 steps an epoch); returns (final train loss, lr used)."""
    data = teacher_data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    clara = None if clara_options is None else CLARA(optimizer, **clara_options)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2))
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]))
    return final, (lr if clara is None else clara.lr_used[0])


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd_momentum"])
def test_no_collapse_in_a_long_shuffled_run(optimizer_name: str) -> None:
    """From a small and a large lr0, the lr used after 75 epochs is within 30x of the tuned fixed lr."""
    grid = [1e-3, 1e-2, 3e-2, 1e-1]
    tuned = min(grid, key=lambda lr: train(optimizer_name, lr, None)[0])
    for lr0 in (1e-4, 1e-2):
        _, final_lr = train(optimizer_name, lr0, {})
        assert tuned / WITHIN <= final_lr <= tuned * WITHIN, (lr0, final_lr, tuned)
    # the same run with CLARA 0.1.0's defaults collapses: the test can tell the difference
    _, collapsed = train(optimizer_name, 1e-2, CLARA_0_1_0)
    assert collapsed < tuned / WITHIN, (collapsed, tuned)


# ------------------------------------------------------------------------------ the two null models
SIZES = (2000, 300, 20)
OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


def zero_parameters() -> list[Tensor]:
    return [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in SIZES]


def feed(clara: CLARA, params: list[Tensor], gradients: Iterator[list[Tensor]], steps: int) -> list[float]:
    """``steps`` optimizer steps with the given gradients; log F after each."""
    out = []
    for _ in range(steps):
        for p, g in zip(params, next(gradients), strict=True):
            p.grad = g
        clara.optimizer.step()
        out.append(clara.log_factors[0])
    return out


def iid_gaussian(seed: int) -> Iterator[list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(n, generator=generator, dtype=torch.float64) for n in SIZES]


def without_replacement(batches_per_epoch: int, seed: int) -> Iterator[list[Tensor]]:
    """A model that cannot improve, sampled without replacement: each epoch's batch gradients sum to zero.

    Per-example gradients are fixed vectors with zero mean over the data set (the full-batch
    gradient of a model at its optimum); a shuffled loader deals them out in batches, so within an
    epoch the batch gradients are negatively correlated (coefficient -1/(K-1) for K batches).
    """
    generator = torch.Generator().manual_seed(seed)
    per_batch = 4
    examples = [torch.randn(batches_per_epoch * per_batch, n, generator=generator, dtype=torch.float64) for n in SIZES]
    examples = [e - e.mean(0) for e in examples]
    while True:
        order = torch.randperm(batches_per_epoch * per_batch, generator=generator).view(batches_per_epoch, per_batch)
        for batch in order:
            yield [e[batch].mean(0) for e in examples]


def damping_schedule(steps: int) -> list[float]:
    """The default rule's damping d_t for t = 0 .. steps-1 (the loop reference's schedule)."""
    defaults = RULE_DEFAULTS["normalized"]
    return [defaults["d"] * damping_gain(t, defaults["fast_start"], defaults["hold_after"]) for t in range(steps)]


def predicted_drift(optimizer: torch.optim.Optimizer, c: float, target: float, steps: int) -> float:
    """E[log F_T] - log F_0 when E[r_t] = 1: the signal is linear in r and r_max,t is known in advance."""
    reference = reference_for(optimizer, optimizer.param_groups[0], c)
    curves = reference.curves(list(SIZES))
    drift = 0.0
    for t, d_t in enumerate(damping_schedule(steps)):
        expected = sum(float(curve[min(t + 1, len(curve) - 1)]) for curve in curves.values())
        r_max = len(SIZES) / expected
        drift += d_t * (1.0 / target - 1.0) / (r_max / target - 1.0)
    return drift


#: (optimizer, target, safeguard): the paper's target, the default one, 0.7 (the default before 0.5), and the
#: default with the safeguard on (it does not move the target).
DRIFT_CASES = [
    *((name, target, False) for name in sorted(OPTIMIZERS) for target in (1.0, RULE_DEFAULTS["normalized"]["target"])),
    ("adam", 0.7, False),
    ("adam", None, True),
]


@pytest.mark.parametrize(("name", "target", "safeguard"), DRIFT_CASES)
def test_iid_noise_drift_is_the_known_drift(name: str, target: float | None, safeguard: bool) -> None:
    """Under i.i.d. noise E[r] = 1, so E[log F_T] - log F_0 = sum_t d_t (1/target - 1) / (r_max,t/target - 1).

    With ``target=1`` that is 0 (no drift); a target below 1 gives a known, bounded rise, larger for
    the default 0.5 than for 0.7. Checked on the mean over independent seeds, with
    a tolerance of 4 standard errors of their spread.
    """
    steps, seeds = 300, 16
    changes = []
    for seed in range(seeds):
        params = zero_parameters()
        clara = CLARA(OPTIMIZERS[name](params), target=target, safeguard=safeguard)
        start = clara.log_factors[0]
        changes.append(feed(clara, params, iid_gaussian(seed), steps)[-1] - start)
    mean = sum(changes) / seeds
    error = (sum((v - mean) ** 2 for v in changes) / (seeds - 1) / seeds) ** 0.5
    c = RULE_DEFAULTS["normalized"]["c"]
    expected = predicted_drift(OPTIMIZERS[name](zero_parameters()), c, clara.target, steps)
    if target == 1.0:
        assert expected == 0.0
    if clara.target == 0.7:
        default = RULE_DEFAULTS["normalized"]["target"]
        assert expected < predicted_drift(OPTIMIZERS[name](zero_parameters()), c, default, steps)
    assert abs(mean - expected) < 4 * error, (mean, expected, error)


def test_iid_noise_drift_with_a_flat_loss_fed_is_a_fraction_of_the_statistics_alone() -> None:
    """What the callbacks run: the loss is given every step. On i.i.d. noise with a flat noisy loss the brake turns
    raises below r = 1 into falls, so log F rises by a fraction of the statistic-alone drift (measured, 16 seeds,
    1500 steps: +0.51 against +2.34 for Adam at the default target; +0.42 against +1.46 at 0.7)."""
    steps, seeds = 1500, 8
    changes = []
    for seed in range(seeds):
        params = zero_parameters()
        clara = CLARA(OPTIMIZERS["adam"](params))
        start, gradients, losses = clara.log_factors[0], iid_gaussian(seed), torch.Generator().manual_seed(100 + seed)
        for _ in range(steps):
            for p, g in zip(params, next(gradients), strict=True):
                p.grad = g
            clara.optimizer.step()
            clara.observe_loss(1.0 + 0.1 * float(torch.randn(1, generator=losses)))
        changes.append(clara.log_factors[0] - start)
        clara.detach()
    alone = predicted_drift(
        OPTIMIZERS["adam"](zero_parameters()), RULE_DEFAULTS["normalized"]["c"], clara.target, steps
    )
    assert 0.0 < sum(changes) / seeds < 0.5 * alone, (changes, alone)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_without_replacement_the_hold_stops_the_fall(name: str) -> None:
    """A model that cannot improve, 100 epochs of 20 batches: r < 1, F falls, and the hold stops it.

    After ``2 hold_after`` steps what log F can still move is at most the damping left,
    ``sum_{t >= T} d_t`` times the largest |signal| (1): that bounds the last 400 steps. CLARA
    0.1.0's rule (c = 0.2, no hold) falls until the lr is too small to move a float32 parameter
    (F below e^-20; the realised steps round away, and then nothing adapts).
    """
    epochs, batches_per_epoch = 100, 20
    steps = epochs * batches_per_epoch
    params = zero_parameters()
    clara = CLARA(OPTIMIZERS[name](params))
    log_factors = feed(clara, params, without_replacement(batches_per_epoch, seed=0), steps)
    assert clara.ratio is not None
    assert clara.ratio < 1.0  # the statistic sees the cancellation
    assert log_factors[-1] < log_factors[0]  # and the factor fell ...
    left = sum(damping_schedule(steps)[steps - 400 :])
    assert abs(log_factors[-1] - log_factors[steps - 401]) <= left  # ... but no longer moves
    assert log_factors[-1] - log_factors[0] >= -sum(damping_schedule(steps))  # the whole budget, |signal| <= 1

    params = zero_parameters()
    old = CLARA(OPTIMIZERS[name](params), **CLARA_0_1_0)
    old_factors = feed(old, params, without_replacement(batches_per_epoch, seed=0), steps)
    assert old_factors[-1] < min(-20.0, log_factors[-1] - 10.0)  # collapsed
