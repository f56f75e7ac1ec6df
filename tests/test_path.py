"""``update_paths`` (foreach kernels) against a plain per-tensor loop of ALGORITHM.md steps 2-3."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_clara.path import PathUpdate, fold_interval, update_paths

SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), ()]
Problem = tuple[torch.dtype, float, list[Tensor], list[list[Tensor]], list[list[bool]]]
"""dtype, c, starting paths, a list of steps (one direction per tensor each) and which paths fold at each."""


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


class ScaledPaths:
    """Paths as the controller keeps them: stored tensors and their scales (the path is scale * stored)."""

    def __init__(self, start: list[Tensor]) -> None:
        self.stored = start
        self.scales = torch.ones(len(start), dtype=torch.float64)
        self.since_fold = [0] * len(start)

    def update(self, directions: list[Tensor], c: float, fold: list[bool] | None = None) -> PathUpdate:
        """One update; ``fold`` adds folds to those the contract requires (every ``fold_interval(c)`` updates)."""
        due = [n + 1 >= fold_interval(c) for n in self.since_fold]
        fold = [a or b for a, b in zip(fold or [False] * len(directions), due, strict=True)]
        result = update_paths(self.stored, self.scales, directions, c, fold)
        self.since_fold = [0 if f else n + 1 for f, n in zip(fold, self.since_fold, strict=True)]
        self.scales = result.scales
        return result

    def values(self) -> list[Tensor]:
        """The paths, in float64."""
        return [t.double() * scale for t, scale in zip(self.stored, self.scales.tolist(), strict=True)]


def random_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Seeded Gaussian tensors (drawn in fp64, then cast, so both dtypes see the same values)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: rounding of the path dtype."""
    return {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_paths_matches_loop_over_several_steps(dtype: torch.dtype) -> None:
    """Five successive updates of tensors of several shapes agree with the loop, in fp32 and fp64."""
    c = 0.2
    paths = ScaledPaths([torch.zeros(shape, dtype=dtype) for shape in SHAPES])
    expected = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for step in range(5):
        directions = random_tensors(SHAPES, dtype, seed=step)
        # positive rescaling must not matter, also from step to step (the stored scale follows)
        directions = [d * (10.0 ** (k - 2 * step)) for k, d in enumerate(directions)]
        expected, moved, squared = loop_update(expected, directions, c)
        result = paths.update(directions, c, fold=[step == 3] * len(SHAPES))
        assert all(path.dtype == dtype for path in paths.stored)
        for path, want in zip(paths.values(), expected, strict=True):
            torch.testing.assert_close(path, want, **tolerance(dtype))
        assert result.moved.tolist() == moved
        assert not result.non_finite.any()
        torch.testing.assert_close(result.squared_norms, torch.tensor(squared, dtype=torch.float64), **tolerance(dtype))


def test_zero_direction_leaves_path_unchanged() -> None:
    """||s|| = 0: the tensor is skipped (ALGORITHM.md step 2), its path stays bit-for-bit the same."""
    paths = ScaledPaths(random_tensors([(4,), (2, 2)], torch.float32, seed=1))
    before = [p.clone() for p in paths.stored]
    directions = [torch.zeros(4), torch.tensor([[1.0, -2.0], [0.5, 3.0]])]
    result = paths.update(directions, 0.3)
    assert torch.equal(paths.stored[0], before[0])
    assert paths.scales[0] == 1.0
    assert not torch.equal(paths.stored[1], before[1])
    assert result.moved.tolist() == [False, True]
    assert result.non_finite.tolist() == [False, False]
    assert float(result.squared_norms[0]) == pytest.approx(float(before[0].double().pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_direction_is_reported_and_excluded(bad: float) -> None:
    """A NaN/inf step is flagged non_finite, contributes nothing to squared_norms, and spares the other tensors."""
    c = 0.2
    paths = ScaledPaths([torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)])
    good = torch.tensor([1.0, 2.0, -2.0, 0.0, 4.0], dtype=torch.float64)
    poisoned = torch.tensor([1.0, bad, 0.0], dtype=torch.float64)
    result = paths.update([poisoned, good], c)
    assert result.non_finite.tolist() == [True, False]
    assert result.moved.tolist() == [False, True]
    assert float(result.squared_norms[0]) == 0.0
    assert math.isfinite(float(result.squared_norms.sum()))
    torch.testing.assert_close(paths.values()[1], c * good / good.norm())
    assert float(result.squared_norms[1]) == pytest.approx(c * c, rel=1e-12)


def test_low_precision_directions_accumulate_in_path_dtype() -> None:
    """bf16 directions are upcast: an fp32 path receives the bf16 values' exact unit vector."""
    direction = torch.tensor([0.1, -0.7, 0.3], dtype=torch.bfloat16)
    paths = ScaledPaths([torch.zeros(3, dtype=torch.float32)])
    paths.update([direction], 0.2)
    want = direction.double()
    assert paths.stored[0].dtype == torch.float32
    torch.testing.assert_close(paths.values()[0], 0.2 * want / want.norm(), rtol=1e-6, atol=1e-8)


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
    folds = [draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes))) for _ in steps]
    return dtype, c, start, steps, folds


@settings(max_examples=150, deadline=None)
@given(path_problems())
def test_update_paths_equals_loop_property(problem: Problem) -> None:
    """For any shapes, values (zeros included), c and folds, the fast update equals the loop to float tolerance."""
    dtype, c, start, steps, folds = problem
    paths = ScaledPaths([p.clone() for p in start])
    expected = [p.double() for p in start]
    for directions, fold in zip(steps, folds, strict=True):
        expected, moved, squared = loop_update(expected, directions, c)
        result = paths.update(directions, c, fold)
        for path, want in zip(paths.values(), expected, strict=True):
            torch.testing.assert_close(path, want, **tolerance(dtype))
        assert result.moved.tolist() == moved
        assert not result.non_finite.any()
        torch.testing.assert_close(result.squared_norms, torch.tensor(squared, dtype=torch.float64), **tolerance(dtype))


@pytest.mark.parametrize("c", [0.2, 0.9, 1.0])
def test_long_runs_fold_and_keep_stored_paths_bounded(c: float) -> None:
    """Over many updates, folding every ``fold_interval(c)`` updates (as the controller does) keeps the
    scale >= 1e-8 and the stored tensor <= 1e8, while the path matches the float64 loop throughout."""
    interval = fold_interval(c)
    assert (1.0 - c) ** interval >= 1e-8 > (1.0 - c) ** (interval + 1) or c == 1.0
    shapes = [(50,), (3, 3)]
    paths = ScaledPaths([torch.zeros(shape) for shape in shapes])
    expected = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    smallest, largest = 1.0, 0.0
    for step in range(3 * max(interval, 50)):
        directions = random_tensors(shapes, torch.float32, seed=step)
        expected, _, squared = loop_update(expected, directions, c)
        result = paths.update(directions, c, fold=[(step + 1) % interval == 0] * len(shapes))
        smallest = min(smallest, float(paths.scales.min()))
        largest = max(largest, max(float(t.abs().max()) for t in paths.stored))
        torch.testing.assert_close(result.squared_norms, torch.tensor(squared, dtype=torch.float64), rtol=2e-5, atol=0)
    for path, want in zip(paths.values(), expected, strict=True):
        torch.testing.assert_close(path, want, rtol=2e-5, atol=1e-7)
    assert smallest >= 1e-8
    assert largest <= 1e8
    if c == 0.2:
        assert smallest < 1e-6  # the lazy scale really went down between folds
