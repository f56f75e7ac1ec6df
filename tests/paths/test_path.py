"""The path update of the one engine (``SampledPaths`` with every coordinate, ``m=None``) against a plain
per-tensor loop of ALGORITHM.md steps 2-3. The realised step is made exact: each step starts from zero
parameters and ends at ``-direction``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_clara.stores import SampledPaths

SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), ()]
Problem = tuple[torch.dtype, float, list[Tensor], list[list[Tensor]]]
"""dtype, c, starting paths, and a list of steps (one direction per tensor each)."""


def loop_update(
    paths: list[Tensor], directions: list[Tensor], c: float
) -> tuple[list[Tensor], list[bool], list[float]]:
    """The rule written out in float64: new paths, which tensors moved, and ||p||^2 of the finite ones."""
    new_paths, moved, squared = [], [], []
    for path, direction in zip(paths, directions, strict=True):
        p = path.detach().to(torch.float64).clone()
        d = direction.detach().to(torch.float64)
        norm = math.sqrt(float(d.pow(2).sum()))
        step_moved = math.isfinite(norm) and norm > 0.0
        if step_moved:
            p = (1.0 - c) * p + c * d / norm
        new_paths.append(p)
        moved.append(step_moved)
        squared.append(float(p.pow(2).sum()) if math.isfinite(norm) else 0.0)
    return new_paths, moved, squared


class Update:
    """One update's per-tensor results, as the bucket reports them."""

    def __init__(self, rows: Tensor) -> None:
        self.squared_norms = rows[0]  # ||p||^2 where moved, else 0
        self.moved = rows[2].bool()
        self.non_finite = ~rows[3].bool()


class Paths:
    """Whole-tensor paths of ``len(paths)`` tensors, started at ``paths``; ``step`` feeds one direction each."""

    def __init__(self, paths: list[Tensor]) -> None:
        self.params = [torch.nn.Parameter(torch.zeros_like(p)) for p in paths]
        self.engine = SampledPaths(None, lambda p: p.numel(), lambda p: p)
        self.engine.load({param: (p.flatten(), 0) for param, p in zip(self.params, paths, strict=True)})

    def step(self, directions: list[Tensor], c: float) -> Update:
        with torch.no_grad():
            for param in self.params:
                param.zero_()
            self.engine.before_step([{"params": self.params}])
            for param, direction in zip(self.params, directions, strict=True):
                param.copy_(-direction.to(param.dtype))  # the realised step is exactly ``direction``
        rows = [step.tally(step.results.cpu()) for step in self.engine.update(c, lambda j, n: [1.0], [0])]
        return Update(torch.cat(rows, dim=1))

    @property
    def paths(self) -> list[Tensor]:
        saved = self.engine.export()
        return [saved[param][0].view(param.shape) for param in self.params]


def random_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Seeded Gaussian tensors (drawn in fp64, then cast, so both dtypes see the same values)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def assert_squared(result: Update, moved: list[bool], squared: list[float], dtype: torch.dtype) -> None:
    """||p||^2 of the tensors that moved, 0 for the others."""
    want = torch.tensor([s if m else 0.0 for s, m in zip(squared, moved, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(result.squared_norms, want, **tolerance(dtype))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: rounding of the path dtype."""
    return {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_paths_matches_loop_over_several_steps(dtype: torch.dtype) -> None:
    """Five successive updates of tensors of several shapes agree with the loop, in fp32 and fp64."""
    c = 0.2
    store = Paths([torch.zeros(shape, dtype=dtype) for shape in SHAPES])
    expected = [p.double() for p in store.paths]
    for step in range(5):
        directions = random_tensors(SHAPES, dtype, seed=step)
        # positive rescaling must not matter: only the unit vector enters the path
        directions = [d * (10.0**k) for k, d in enumerate(directions)]
        expected, moved, squared = loop_update(expected, directions, c)
        result = store.step(directions, c)
        for path, want in zip(store.paths, expected, strict=True):
            assert path.dtype == dtype
            torch.testing.assert_close(path.double(), want, **tolerance(dtype))
        assert result.moved.tolist() == moved
        assert not result.non_finite.any()
        assert_squared(result, moved, squared, dtype)


def test_zero_direction_leaves_path_unchanged() -> None:
    """||s|| = 0: the tensor is skipped (ALGORITHM.md step 2), its path stays bit-for-bit the same."""
    before = random_tensors([(4,), (2, 2)], torch.float32, seed=1)
    store = Paths(before)
    directions = [torch.zeros(4), torch.tensor([[1.0, -2.0], [0.5, 3.0]])]
    result = store.step(directions, 0.3)
    paths = store.paths
    assert torch.equal(paths[0], before[0])
    assert not torch.equal(paths[1], before[1])
    assert result.moved.tolist() == [False, True]
    assert result.non_finite.tolist() == [False, False]
    assert float(result.squared_norms[0]) == 0.0  # a tensor that did not move does not count


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_direction_is_reported_and_excluded(bad: float) -> None:
    """A NaN/inf step is flagged non_finite, contributes nothing to squared_norms, and spares the other tensors."""
    c = 0.2
    store = Paths([torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)])
    good = torch.tensor([1.0, 2.0, -2.0, 0.0, 4.0], dtype=torch.float64)
    poisoned = torch.tensor([1.0, bad, 0.0], dtype=torch.float64)
    result = store.step([poisoned, good], c)
    paths = store.paths
    assert result.non_finite.tolist() == [True, False]
    assert result.moved.tolist() == [False, True]
    assert float(result.squared_norms[0]) == 0.0
    assert math.isfinite(float(result.squared_norms.sum()))
    torch.testing.assert_close(paths[1], c * good / good.norm())
    assert not paths[0].any()  # the poisoned path restarts from zero
    assert float(result.squared_norms[1]) == pytest.approx(c * c, rel=1e-12)


def test_low_precision_directions_accumulate_in_path_dtype() -> None:
    """bf16 directions are upcast: an fp32 path receives the bf16 values' exact unit vector."""
    direction = torch.tensor([0.1, -0.7, 0.3], dtype=torch.bfloat16)
    store = Paths([torch.zeros(3, dtype=torch.bfloat16)])
    store.step([direction], 0.2)
    path = store.paths[0]
    want = direction.double()
    assert path.dtype == torch.float32
    torch.testing.assert_close(path.double(), 0.2 * want / want.norm(), rtol=1e-6, atol=1e-8)


magnitudes = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))


@st.composite
def path_problems(draw: st.DrawFn) -> Problem:
    """Random dtype, c, starting paths and a few steps of directions (some all-zero) for 1-4 tensors."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    c = draw(st.floats(0.01, 1.0))
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4))
    numels = [math.prod(shape) for shape in shapes]

    def tensors() -> list[Tensor]:
        return [
            torch.tensor(draw(st.lists(magnitudes, min_size=n, max_size=n)), dtype=dtype).reshape(shape)
            for shape, n in zip(shapes, numels, strict=True)
        ]

    start = [t.clamp(-1.0, 1.0) for t in tensors()]
    steps = [tensors() for _ in range(draw(st.integers(1, 3)))]
    return dtype, c, start, steps


@settings(max_examples=150, deadline=None)
@given(path_problems())
def test_update_paths_equals_loop_property(problem: Problem) -> None:
    """For any shapes, values (zeros included) and c, the fast update equals the loop to float tolerance."""
    dtype, c, start, steps = problem
    store = Paths([p.clone() for p in start])
    expected = [p.double() for p in start]
    for directions in steps:
        expected, moved, squared = loop_update(expected, directions, c)
        result = store.step(directions, c)
        for path, want in zip(store.paths, expected, strict=True):
            torch.testing.assert_close(path.double(), want, **tolerance(dtype))
        assert result.moved.tolist() == moved
        assert not result.non_finite.any()
        assert_squared(result, moved, squared, dtype)


def test_a_step_whose_squares_underflow_leaves_the_path_alone() -> None:
    """A non-zero step too small for its norm (fp32 squares below the smallest subnormal) reads as no move:
    the path stays as it was, bit for bit, as for an exact zero step."""
    start = [torch.zeros(4), *random_tensors([(3,)], torch.float32, seed=5)]  # a zero path shows any addition
    paths = Paths(start)
    result = paths.step([torch.full((4,), -1e-23), torch.zeros(3)], c=0.1)
    assert result.moved.tolist() == [False, False]
    assert not result.non_finite.any()
    for path, before in zip(paths.paths, start, strict=True):
        assert torch.equal(path, before)
