"""CLARA follows the step the optimizer really took: sparse gradients, bf16 parameters, lr = 0 (issue 12, 10-11).

0.1.0 raised on the first sparse step after the optimizer had updated, counted bf16 updates that had
rounded away (log F +4.9 against +1.4 from the realised steps) and adapted on steps with lr = 0.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_clara import CLARA


@pytest.mark.parametrize("sample", [4096, None])
def test_sparse_gradients_need_nothing(sample: int | None) -> None:
    """The step is a difference of parameter entries: a sparse gradient changes nothing, sampled or full."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1)
    optimizer = torch.optim.SGD(list(embedding.parameters()) + list(head.parameters()), lr=0.1)
    clara = CLARA(optimizer, initial_factor=1.0, sample=sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            loss = head(embedding(torch.randint(0, 50, (16,)))).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert clara.sample == sample
    assert clara.num_adapted_steps == 5
    assert clara.log_factors[0] != 0.0


def bf16_run(lr: float, steps: int = 20, sample: int | None = None) -> CLARA:
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    clara = CLARA(optimizer, c=0.2, d=0.2, fast_start=0, initial_factor=1.0, sample=sample)
    x = torch.randn(32, 64).to(torch.bfloat16)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
    return clara


def test_bf16_parameters_are_read_from_the_realised_step() -> None:
    """bf16 updates read on every coordinate and on a sample larger than the tensor: one trajectory, moving."""
    full, sampled = bf16_run(1e-5), bf16_run(1e-5, sample=1 << 13)
    assert full.log_factors == sampled.log_factors
    assert full.num_adapted_steps == 20
    assert full.log_factors[0] != 0.0


@pytest.mark.parametrize("sample", [None, 4096])
def test_bf16_updates_that_round_away_do_not_adapt(sample: int | None) -> None:
    """lr 1e-9: every Adam update is below bf16's resolution, nothing moves, so nothing adapts."""
    clara = bf16_run(1e-9, steps=5, sample=sample)
    assert clara.num_adapted_steps == 0
    assert clara.log_factors == [0.0]


def test_a_step_with_lr_zero_does_not_adapt() -> None:
    """A warm-up from zero: the step at lr 0 moved nothing (0.1.0 read an intended step from the Adam state)."""
    param = nn.Parameter(torch.randn(10))
    optimizer = torch.optim.Adam([param], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 3))
    clara = CLARA(optimizer, c=0.2, d=0.2, fast_start=0, initial_factor=1.0, sample=None)
    log_factors = []
    for _ in range(5):
        param.grad = torch.ones(10)
        optimizer.step()
        scheduler.step()
        log_factors.append(clara.log_factors[0])
    assert log_factors[0] == 0.0  # the step at lr 0
    assert clara.num_adapted_steps == 4
    assert log_factors[-1] > 0.0  # agreeing steps afterwards: F rises


def test_a_step_too_small_for_float32_squares_counts_as_no_move() -> None:
    """Steps of 4.5e-23 per entry: their squares are subnormal in float32, the norm came out 30 % off, the path
    grew past length 1 (r 13 where a constant gradient gives 1/mu = 9) and its own checkpoint was refused. Such a
    step now counts as no move; at a representable size the same gradients give r = 9 again."""
    param = torch.nn.Parameter(torch.zeros(64))
    optimizer = torch.optim.SGD([param], lr=4.5e-23)
    clara = CLARA.paper(optimizer, sample=None, min_factor=1.0, max_factor=1.0)

    def steps(count: int) -> None:
        for _ in range(count):
            param.grad = -torch.ones(64)
            optimizer.step()
            with torch.no_grad():
                param.zero_()  # the entries stay at 0, where the step keeps its full size

    steps(50)
    assert clara.num_adapted_steps == 0
    fresh = CLARA.paper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(64))], lr=1.0), sample=None)
    fresh.load_state_dict(clara.state_dict())
    optimizer.param_groups[0]["lr"] = 1e-16
    steps(200)
    assert clara.ratio == pytest.approx(9.0, rel=1e-5)  # 1 / mu for c = 0.2 and a constant direction
