"""Snapshot-free state readers against the parameter delta, and the reader choice of ``support.reader_for``.

The realised step is ``theta(before) - theta(after)`` (ALGORITHM.md step 1); a state reader must
give a tensor proportional to it, so the unit vectors must agree for every configuration.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_clara.directions import (
    AdamStateReader,
    DeltaReader,
    DirectionReader,
    SGDStateReader,
    _ScratchReader,
)
from lightning_clara.support import reader_for

SHAPES = [(5,), (3, 4), (1,)]
STEPS = 6

SGD_CONFIGS: list[dict[str, Any]] = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "dampening": 0.5},
    {"weight_decay": 0.1},
    {"momentum": 0.9, "weight_decay": 0.1},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"maximize": True},
    {"momentum": 0.9, "maximize": True, "weight_decay": 0.1},
    {"momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.1},
]
ADAM_CONFIGS: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1}),
    (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.Adam, {"maximize": True, "weight_decay": 0.1}),
    (torch.optim.Adam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    (torch.optim.AdamW, {}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "maximize": True}),
    (torch.optim.AdamW, {"weight_decay": 0.0}),
]
CASES = [(torch.optim.SGD, config, SGDStateReader) for config in SGD_CONFIGS] + [
    (cls, config, AdamStateReader) for cls, config in ADAM_CONFIGS
]


CASE_IDS = [
    f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in config.items()) or 'default'}" for cls, config, _ in CASES
]


def unit(tensor: Tensor) -> Tensor:
    """The unit vector in float64 (the only thing CLARA uses from a direction)."""
    tensor = tensor.detach().double()
    return tensor / tensor.norm()


def make_params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Parameters of several shapes with values of order one (so weight decay matters)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for shape in SHAPES]


def compare_readers(
    optimizer_class: type[torch.optim.Optimizer],
    config: dict[str, Any],
    reader: DirectionReader,
    dtype: torch.dtype,
    atol: float,
    grad_pattern: list[list[bool]] | None = None,
    lr: float = 0.1,
) -> int:
    """Step with random gradients; at every step, state-reader and delta unit vectors must agree.

    ``grad_pattern[t][k]`` says whether tensor k has a gradient at step t (default: always).
    Returns the number of (step, tensor) pairs compared, so callers can check the test ran.
    """
    params = make_params(dtype)
    optimizer = optimizer_class(params, lr=lr, **config)
    delta = DeltaReader()
    generator = torch.Generator().manual_seed(1)
    compared = 0
    for t in range(STEPS):
        present = grad_pattern[t] if grad_pattern is not None else [True] * len(params)
        for param, has_grad in zip(params, present, strict=True):
            grad = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype)
            param.grad = grad if has_grad else None
        stepped = [p for p in params if p.grad is not None]
        before = [p.detach().clone() for p in stepped]
        delta.before_step(stepped)
        optimizer.step()
        group = optimizer.param_groups[0]
        from_state = [d.clone() for d in reader.directions(optimizer, group, stepped)]
        from_delta = delta.directions(optimizer, group, stepped)
        for param, old, state_dir, delta_dir in zip(stepped, before, from_state, from_delta, strict=True):
            manual = old - param.detach()
            torch.testing.assert_close(delta_dir, manual, rtol=0, atol=0)  # the delta reader is the definition
            assert state_dir.shape == param.shape
            torch.testing.assert_close(unit(state_dir), unit(manual), rtol=0, atol=atol)
            compared += 1
    return compared


@pytest.fixture(params=["per-tensor", "foreach"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both code paths of the state readers: per-tensor ``out=`` kernels into persistent buffers (the
    CPU's) and allocating ``torch._foreach_*`` kernels (CUDA's), forced here on the CPU."""
    if request.param == "foreach":
        monkeypatch.setattr(_ScratchReader, "_persistent", lambda self, params: None)
    return str(request.param)


@pytest.mark.parametrize(("optimizer_class", "config", "reader_class"), CASES, ids=CASE_IDS)
def test_state_reader_matches_delta_float64(
    optimizer_class: type[torch.optim.Optimizer],
    config: dict[str, Any],
    reader_class: type[DirectionReader],
    kernels: str,
) -> None:
    """fp64: the state reader's unit direction equals the realised step's to rounding, over several steps."""
    assert compare_readers(optimizer_class, config, reader_class(), torch.float64, atol=1e-12) == STEPS * len(SHAPES)


@pytest.mark.parametrize(
    ("optimizer_class", "config", "reader_class"),
    [
        (torch.optim.SGD, {"weight_decay": 1.0}, SGDStateReader),
        (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1.0, "maximize": True}, SGDStateReader),
        (torch.optim.AdamW, {"weight_decay": 1.0}, AdamStateReader),
    ],
)
def test_state_reader_when_decay_flips_the_sign(
    optimizer_class: type[torch.optim.Optimizer],
    config: dict[str, Any],
    reader_class: type[DirectionReader],
    kernels: str,
) -> None:
    """lr * wd > 1 makes the factor 1 / (1 - lr * wd) negative: the direction must flip with it."""
    compared = compare_readers(optimizer_class, config, reader_class(), torch.float64, atol=1e-12, lr=1.5)
    assert compared == STEPS * len(SHAPES)


@pytest.mark.parametrize(
    ("optimizer_class", "config", "reader_class"),
    [
        (torch.optim.SGD, {"weight_decay": 0.1}, SGDStateReader),
        (torch.optim.AdamW, {"weight_decay": 0.1}, AdamStateReader),
        (torch.optim.Adam, {}, AdamStateReader),
    ],
)
def test_state_reader_reuses_its_buffers_on_the_cpu(
    optimizer_class: type[torch.optim.Optimizer], config: dict[str, Any], reader_class: type[DirectionReader]
) -> None:
    """On the CPU a fresh buffer per step costs page faults: the readers write into the same buffers."""
    params = make_params(torch.float32)
    optimizer = optimizer_class(params, lr=0.1, **config)
    reader = reader_class()
    addresses = []
    for _ in range(3):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
        directions = reader.directions(optimizer, optimizer.param_groups[0], params)
        addresses.append([d.data_ptr() for d in directions])
    assert addresses[0] == addresses[1] == addresses[2]
    assert not set(addresses[0]) & {p.data_ptr() for p in params}
    reader.release()
    assert not reader._scratch


@pytest.mark.parametrize(("optimizer_class", "config", "reader_class"), CASES, ids=CASE_IDS)
def test_state_reader_matches_delta_float32(
    optimizer_class: type[torch.optim.Optimizer], config: dict[str, Any], reader_class: type[DirectionReader]
) -> None:
    """fp32: agreement up to the cancellation error of theta(before) - theta(after) (~eps32 * |theta| / |s|)."""
    assert compare_readers(optimizer_class, config, reader_class(), torch.float32, atol=1e-4) == STEPS * len(SHAPES)


@pytest.mark.parametrize(
    ("optimizer_class", "config", "reader_class"),
    [
        (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1}, SGDStateReader),
        (torch.optim.Adam, {}, AdamStateReader),
        (torch.optim.AdamW, {"weight_decay": 0.1}, AdamStateReader),
    ],
)
def test_state_reader_with_intermittent_gradients(
    optimizer_class: type[torch.optim.Optimizer], config: dict[str, Any], reader_class: type[DirectionReader]
) -> None:
    """Tensors that skip steps have their own step counts (Adam bias correction); directions still agree."""
    pattern = [[True, t % 2 == 0, t % 3 != 1] for t in range(STEPS)]
    compared = compare_readers(optimizer_class, config, reader_class(), torch.float64, atol=1e-12, grad_pattern=pattern)
    assert compared == sum(map(sum, pattern))


# ------------------------------------------------------------------------------------------ reader_for


def _optimizer(cls: type[torch.optim.Optimizer], **kwargs: Any) -> torch.optim.Optimizer:
    """A one-tensor optimizer: reader_for only looks at its class and param groups."""
    return cls([torch.zeros(3, requires_grad=True)], lr=0.1, **kwargs)


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (_optimizer(torch.optim.SGD), SGDStateReader),
        (_optimizer(torch.optim.SGD, momentum=0.9, nesterov=True), SGDStateReader),
        (_optimizer(torch.optim.Adam), AdamStateReader),
        (_optimizer(torch.optim.AdamW, amsgrad=True), AdamStateReader),
    ],
)
def test_auto_picks_the_state_reader(optimizer: torch.optim.Optimizer, expected: type[DirectionReader]) -> None:
    """The default needs no snapshot where the optimizer's state gives the step exactly."""
    reader = reader_for(optimizer, "auto")
    assert isinstance(reader, expected)
    assert not reader.needs_snapshot
    assert isinstance(reader_for(optimizer, "state"), expected)


@pytest.mark.parametrize(
    "optimizer",
    [
        _optimizer(torch.optim.Adam, fused=True),
        _optimizer(torch.optim.AdamW, fused=True),
        _optimizer(torch.optim.Adam, capturable=True),
        _optimizer(torch.optim.SGD, fused=True),
        _optimizer(torch.optim.SGD, momentum=0.9, differentiable=True),
    ],
)
def test_device_state_variants_use_the_delta(optimizer: torch.optim.Optimizer) -> None:
    """Fused/capturable/differentiable state cannot be read on the host: auto falls back, state refuses."""
    assert isinstance(reader_for(optimizer, "auto"), DeltaReader)
    with pytest.raises(ValueError, match="delta"):
        reader_for(optimizer, "state")


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_direction_delta_is_honoured(cls: type[torch.optim.Optimizer]) -> None:
    """direction='delta' forces the snapshot reader even where a state reader exists."""
    reader = reader_for(_optimizer(cls), "delta")
    assert isinstance(reader, DeltaReader)
    assert reader.needs_snapshot


class _HandWrittenSGD(torch.optim.Optimizer):
    """A user optimizer with no state reader (plain SGD written out)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "optimizer",
    [_HandWrittenSGD([torch.zeros(2, requires_grad=True)]), _optimizer(torch.optim.RMSprop)],
)
def test_state_direction_without_reader_raises(optimizer: torch.optim.Optimizer) -> None:
    """direction='state' on an optimizer without a state reader is a configuration error; auto uses the delta."""
    with pytest.raises(ValueError, match="state"):
        reader_for(optimizer, "state")
    assert isinstance(reader_for(optimizer, "auto"), DeltaReader)
