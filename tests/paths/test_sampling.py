"""Sampled paths (``sample=m``): the coordinates, the null model, the loop reference, checkpoints.

The statistic on a fixed coordinate sample must be exactly the one ALGORITHM.md defines for a
tensor of the sample's size: the null model holds with the reference at size m, the hand-written
loop fed the same coordinates matches step by step, and a sample at least as large as the tensor
is the full-path statistic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from reference_loop import SimpleAdam, SimpleCLARA, SimpleMomentumSGD, plain_sgd_mu, sgd_step
from torch import Tensor

from lightning_clara import CLARA
from lightning_clara.reference import reference_for
from lightning_clara.sampling import DEFAULT_SAMPLE, sample_indices

C = 0.2
M = 64
RTOL = 1e-6
K_SIGMA = 4.0


# ------------------------------------------------------------------------------------ coordinates


def test_sample_indices_are_one_per_stratum_sorted_and_reproducible() -> None:
    """Small samples (m < 128): one entry in each of m strata."""
    numel, m = 10_000, 100
    indices = sample_indices(numel, m, (0, 3, numel))
    assert indices.dtype == torch.int64
    assert indices.numel() == m
    assert torch.equal(indices, sample_indices(numel, m, (0, 3, numel)))  # the same in every process
    bounds = torch.arange(m + 1) * numel // m
    assert bool(((indices >= bounds[:-1]) & (indices < bounds[1:])).all())  # spread: one per stratum
    assert not torch.equal(indices, sample_indices(numel, m, (0, 4, numel)))  # another position, another sample
    # a row-major (100, 100) weight: the sample covers its columns, not one of them
    assert torch.unique(indices % 100).numel() > 50


@pytest.mark.parametrize(("numel", "m"), [(1_000_000, 4096), (9000, 4096), (10_000, 256), (4097, 4096)])
def test_large_samples_are_runs_of_consecutive_entries_in_every_stratum(numel: int, m: int) -> None:
    """m >= 128 on a tensor of at least 2 m entries: runs of min(16, m // 64) consecutive entries (cache
    lines, not scattered entries), one per stratum, at least 64 strata, no entry twice."""
    indices = sample_indices(numel, m, (1, 2, numel))
    assert indices.numel() == m
    assert bool((indices[1:] > indices[:-1]).all())  # sorted, so no entry twice
    assert int(indices[0]) >= 0
    assert int(indices[-1]) < numel
    run = min(16, m // 64) if numel >= 2 * m else 1
    strata = m // run
    assert strata >= 64
    bounds = torch.arange(strata + 1) * numel // strata
    stratum = torch.bucketize(indices, bounds[1:], right=True)
    assert torch.equal(torch.bincount(stratum, minlength=strata), torch.full((strata,), run))
    runs = indices.reshape(strata, run)  # m is a multiple of the run length here
    assert bool((runs[:, -1] - runs[:, 0] == run - 1).all())  # each run: consecutive entries


def test_a_tensor_of_at_most_m_entries_keeps_every_coordinate() -> None:
    assert torch.equal(sample_indices(64, 64, (0, 0, 64)), torch.arange(64))
    assert torch.equal(sample_indices(5, 64, (1, 2, 5)), torch.arange(5))


def test_default_sample_is_the_reference_size_cap() -> None:
    from lightning_clara.reference import SIZE_CAP

    params = [torch.zeros(10_000, requires_grad=True)]
    clara = CLARA(torch.optim.SGD(params, lr=0.1))
    assert clara.sample == DEFAULT_SAMPLE == SIZE_CAP
    assert clara.sample is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample": 0}, "sample"),
        ({"sample": 2.5}, "sample"),
        ({"sample": True}, "sample"),
    ],
)
def test_bad_sample_is_refused(options: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        CLARA(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1), **options)


@pytest.mark.parametrize("options", [{"unit_step": True}, {"variant": "salera"}])
def test_the_paper_variants_keep_the_sample(options: dict) -> None:
    """The variants are add-ons around the one engine: their paths are sampled like any other."""
    clara = CLARA(torch.optim.SGD([torch.zeros(10_000, requires_grad=True)], lr=0.1), **options)
    assert clara.sample == DEFAULT_SAMPLE
    assert clara.sample is not None


# ------------------------------------------------------------------------------------ null model

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
FAMILIES: dict[str, OptimizerFactory] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
}
#: a scalar, a small tensor (all its coordinates), and two tensors larger than the sample
SIZES = (1, 7, 300, 2000)


def gaussian(params: list[Tensor], seed: int) -> Iterator[list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]


def run_noise(name: str, steps: int, seed: int) -> Tensor:
    params = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in SIZES]
    clara = CLARA(FAMILIES[name](params), c=C, d=1e-3, rule="paper", sample=M)
    gradients = gaussian(params, seed)
    ratios = []
    for _ in range(steps):
        for p, g in zip(params, next(gradients), strict=True):
            p.grad = g
        clara.optimizer.step()
        ratios.append(clara.ratio)
    return torch.tensor(ratios, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_first_sampled_ratio_is_exactly_one(name: str) -> None:
    assert float(run_noise(name, 1, seed=0)[0]) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gaussian_gradients_give_unit_mean_sampled_ratio(name: str) -> None:
    """The stationary regime: mean r within K batch-mean standard errors of 1 (reference at size m)."""
    burn_in, batches, length = 100, 40, 75
    window = run_noise(name, burn_in + batches * length, seed=1)[burn_in:]
    means = window.reshape(batches, length).mean(dim=1)
    se = float(means.std()) / math.sqrt(batches)
    assert abs(float(window.mean()) - 1.0) <= K_SIGMA * se, f"mean r {float(window.mean()):.4f} +- {se:.4f}"


def test_gaussian_gradients_unit_mean_sampled_ratio_in_the_transient() -> None:
    """E[r_t] = 1 for small t too, where the reference is in its transient (independent seeds)."""
    runs = torch.stack([run_noise("adam", 20, seed=100 + s) for s in range(60)])
    means, se = runs.mean(dim=0), runs.std(dim=0) / math.sqrt(runs.shape[0])
    assert bool(((means - 1.0).abs() <= K_SIGMA * se + 1e-6).all()), (means - 1.0) / se  # 1e-6: fp32 reference


def test_the_sample_is_what_makes_the_noise_null() -> None:
    """The reference at the *sample's* size is the exact one: a 2000-entry tensor sampled at 1 entry
    behaves as a scalar (plain SGD: mu does not depend on n, so compare with Adam, whose does)."""
    params = [torch.zeros(2000, dtype=torch.float64, requires_grad=True)]
    clara = CLARA(torch.optim.Adam(params, lr=1e-3), c=C, rule="paper", sample=1)
    reference = reference_for(clara.optimizer, clara.optimizer.param_groups[0], C)
    assert clara.references.get(0).curves == {1: reference.curve(1).tolist()}


# ------------------------------------------------------------------------------- the loop reference

FEATURES, HIDDEN = 30, 10


def make_params() -> list[Tensor]:
    """A tanh MLP's tensors, 300, 10, 10 and 1 entries: with m = 64 the first is sampled, the rest whole."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(HIDDEN, FEATURES), (HIDDEN,), (1, HIDDEN), (1,)]
    return [(0.3 * torch.randn(s, generator=generator, dtype=torch.float64)).requires_grad_() for s in shapes]


def compute_grads(params: list[Tensor], t: int) -> None:
    generator = torch.Generator().manual_seed(100 + t % 7)
    x = torch.randn(32, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.sin(x[:, :1] * 2.0)
    w1, b1, w2, b2 = params
    x, y = x.to(w1.dtype), y.to(w1.dtype)
    for p in params:
        p.grad = None
    loss = (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).pow(2).mean()
    loss.backward()


LOOP_CASES: dict[str, tuple[OptimizerFactory, Callable[[list[Tensor]], Callable[[float], list[Tensor]]], float]] = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05), lambda ps: lambda lr: sgd_step(ps, lr), 0.05),
    "momentum": (lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9), lambda ps: SimpleMomentumSGD(ps).step, 0.005),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.003), lambda ps: SimpleAdam(ps).step, 0.003),
}


@pytest.mark.parametrize("case", sorted(LOOP_CASES))
def test_sampled_paths_match_the_loop_reference_step_by_step(case: str) -> None:
    """The hand-written loop, given the same coordinates, gives the same lr, ratio and factor for 200 steps."""
    make_optimizer, make_step, lr = LOOP_CASES[case]
    d, steps = 0.02, 200
    params = make_params()
    clara = CLARA(make_optimizer(params), c=C, d=d, sample=M)
    reference = reference_for(clara.optimizer, clara.optimizer.param_groups[0], C)

    def mu(n: int, t: int) -> float:
        curve = reference.curve(n)
        return float(curve[min(t, curve.numel() - 1)])

    loop_params = make_params()
    samples = [
        None if p.numel() <= M else sample_indices(p.numel(), M, (0, i, p.numel())) for i, p in enumerate(loop_params)
    ]
    loop = SimpleCLARA([p.shape for p in loop_params], C, d, plain_sgd_mu(C) if case == "sgd" else mu, samples=samples)
    step_fn = make_step(loop_params)
    for t in range(steps):
        compute_grads(params, t)
        clara.optimizer.step()
        compute_grads(loop_params, t)
        used = lr * loop.factor
        loop.update(step_fn(used))
        for name, a, b in (("lr used", clara.lr_used[0], used), ("ratio", clara.ratio, loop.ratio)):
            assert a == pytest.approx(b, rel=RTOL), f"step {t}: {name}"
        assert clara.lr_factor == pytest.approx(loop.factor, rel=RTOL), f"step {t}: factor"
    assert abs(math.log(loop.factor / 0.1)) > 0.05  # the factor moved: the comparison means something


def run_trajectory(make_optimizer: OptimizerFactory, steps: int = 150, dtype: torch.dtype = torch.float64, **options):
    params = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    clara = CLARA(make_optimizer(params), c=C, d=0.05, **options)
    factors = []
    for t in range(steps):
        compute_grads(params, t)
        clara.optimizer.step()
        factors.append(clara.lr_factor)
    return factors, clara


FOREIGN: dict[str, OptimizerFactory] = {
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.003, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.003),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.003),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_sample_as_large_as_the_tensors_is_every_coordinate(name: str) -> None:
    """No optimizer-specific code: a sample as large as the tensors is the paper's full statistic."""
    # 60 steps: later, F climbs into a chaotic regime that amplifies the norms' last-bit differences
    sampled, _ = run_trajectory(FOREIGN[name], steps=60, sample=10_000)
    full, full_clara = run_trajectory(FOREIGN[name], steps=60, sample=None)
    assert full_clara.sample is None
    assert sampled == pytest.approx(full, rel=1e-9)
    assert abs(math.log(full[-1] / 0.1)) > 0.05


def test_bf16_rounding_is_followed_exactly() -> None:
    """bf16 parameters: the sampled step is the exact difference of the rounded values (taken in fp32,
    where it is exact; a bf16 subtraction would round it again)."""
    from lightning_clara.stores import SampledPaths

    generator = torch.Generator().manual_seed(0)
    param = torch.randn(50, 40, generator=generator).to(torch.bfloat16)
    paths = SampledPaths(M, full_numel=lambda p: p.numel(), local=lambda p: p)
    paths.before_step([{"params": [param.requires_grad_()]}])
    before = param.clone()
    with torch.no_grad():
        param.mul_(0.37).add_(1e-3)  # a step that bf16 rounds, crossing magnitudes
    step = paths.buckets[0].realised_step()
    indices = sample_indices(param.numel(), M, (0, 0, param.numel()))
    exact = (before.float() - param.float()).flatten()[indices]
    assert step.dtype == torch.float32
    torch.testing.assert_close(step.flatten(), exact, rtol=0, atol=0)
    assert not torch.equal(exact, (before - param).float().flatten()[indices])  # bf16 would have rounded


def trained(make_optimizer: OptimizerFactory, steps: int) -> tuple[list[Tensor], torch.optim.Optimizer, CLARA]:
    """The MLP's tensors, their optimizer and CLARA (sample m), after ``steps`` steps."""
    params = make_params()
    optimizer = make_optimizer(params)
    clara = CLARA(optimizer, sample=M)
    for t in range(steps):
        compute_grads(params, t)
        optimizer.step()
    return params, optimizer, clara


def test_zero_lr_steps_adapt_nothing() -> None:
    """A warm-up from lr 0: the parameters do not move, so no path moves and F stays put."""
    params, optimizer, clara = trained(lambda ps: torch.optim.Adam(ps, lr=0.0), 5)
    assert clara.num_adapted_steps == 0
    assert clara.lr_factor == pytest.approx(0.1)
    optimizer.param_groups[0]["lr"] = 1e-3
    compute_grads(params, 5)
    optimizer.step()
    assert clara.num_adapted_steps == 1


def test_a_non_finite_step_resets_only_that_row() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.01)
    clara = CLARA(optimizer, sample=M, skip_nonfinite=False)  # the NaN step runs
    compute_grads(params, 0)
    optimizer.step()
    compute_grads(params, 1)
    params[1].grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        optimizer.step()
    paths = clara.paths.sampled.export()
    assert float(paths[params[1]][0].abs().sum()) == 0.0
    assert paths[params[1]][1] == 0
    assert paths[params[0]][1] == 2
    assert bool(torch.isfinite(paths[params[0]][0]).all())
    assert clara.num_skipped_steps == 1


def test_param_group_scope_adapts_each_group_like_its_own_controller() -> None:
    def build(split: bool) -> tuple[list[Tensor], list[CLARA]]:
        params = make_params()
        if split:
            optimizers = [torch.optim.SGD(params[:2], lr=0.02), torch.optim.SGD(params[2:], lr=0.02)]
            return params, [CLARA(o, c=C, d=0.05, sample=M) for o in optimizers]
        groups = [{"params": params[:2]}, {"params": params[2:]}]
        return params, [CLARA(torch.optim.SGD(groups, lr=0.02), c=C, d=0.05, sample=M, scope="param_group")]

    (joint_params, (joint,)), (split_params, split) = build(False), build(True)
    for t in range(60):
        compute_grads(joint_params, t)
        joint.optimizer.step()
        compute_grads(split_params, t)
        for clara in split:
            clara.optimizer.step()
    # the sampled weight is at (group 0, position 0) in both; the second group's tensors are whole
    assert joint.lr_factors[0] == pytest.approx(split[0].lr_factor, rel=1e-9)
    assert joint.lr_factors[1] == pytest.approx(split[1].lr_factor, rel=1e-9)
    assert joint.lr_factors[0] != pytest.approx(joint.lr_factors[1], rel=1e-3)


# ------------------------------------------------------------------------------ layout and memory


def test_freezing_a_tensor_keeps_the_other_paths() -> None:
    params, optimizer, clara = trained(lambda ps: torch.optim.SGD(ps, lr=0.02), 10)
    before = {p: path.clone() for p, (path, _) in clara.paths.sampled.export().items()}
    params[1].requires_grad_(False)
    for p in params:
        p.grad = None
    params[0].grad = torch.zeros_like(params[0])  # a zero step: no path moves, only the layout changes
    optimizer.step()
    after = clara.paths.sampled.export()
    assert params[1] not in after
    for p in (params[0], params[2], params[3]):
        torch.testing.assert_close(after[p][0], before[p], rtol=0, atol=0)


def test_memory_per_sampled_tensor_is_the_path_plus_its_indices() -> None:
    """Beyond the m-entry fp32 path: an m-entry step row and the m int32 sample indices (no parameter-sized
    snapshot or scratch buffer)."""
    params = [torch.zeros(1000, 1000, requires_grad=True)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    clara = CLARA(optimizer)
    params[0].grad = torch.randn(1000, 1000)
    optimizer.step()
    per_tensor = clara.paths.sampled.persistent_bytes()
    m = DEFAULT_SAMPLE
    assert per_tensor <= m * 4 + 2 * m * 4 + 64
    assert clara._safeguard is None  # no full snapshot without a safeguard


# ------------------------------------------------------------------------------------ checkpoints


def test_resume_from_a_state_dict_is_exact() -> None:
    uninterrupted, _ = run_trajectory(FAMILIES["adam"], steps=80, sample=M)
    params = make_params()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    clara = CLARA(optimizer, c=C, d=0.05, sample=M)
    for t in range(40):
        compute_grads(params, t)
        optimizer.step()
    saved_clara, saved_optimizer = clara.state_dict(), optimizer.state_dict()
    saved_params = [p.detach().clone() for p in params]
    clara.detach()
    resumed = [p.clone().requires_grad_() for p in saved_params]
    optimizer = torch.optim.Adam(resumed, lr=1e-3)
    optimizer.load_state_dict(saved_optimizer)
    clara = CLARA(optimizer, c=C, d=0.05, sample=M)
    clara.load_state_dict(saved_clara)
    assert clara.state_dict()["tensors"][0][0]["path"].numel() == M  # before any step, as loaded
    factors = []
    for t in range(40, 80):
        compute_grads(resumed, t)
        optimizer.step()
        factors.append(clara.lr_factor)
    assert factors == uninterrupted[40:]


def test_a_checkpoint_with_other_paths_restores_the_factor_and_restarts_the_paths() -> None:
    _, full = run_trajectory(FAMILIES["adam"], steps=30, sample=None)
    params = make_params()
    clara = CLARA(torch.optim.Adam(params, lr=1e-3), c=C, d=0.05, sample=M)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clara.load_state_dict(full.state_dict())
    assert any("paths restart" in str(w.message) for w in caught)
    assert clara.lr_factor == pytest.approx(full.lr_factor)
    assert clara.num_adapted_steps == 30
    assert clara.paths.sampled.export() == {}


def test_a_sampled_path_of_the_wrong_size_is_refused() -> None:
    _, clara = run_trajectory(FAMILIES["adam"], steps=3, sample=M)
    state = clara.state_dict()
    state["tensors"][0][0]["path"] = torch.zeros(M + 1)
    other = CLARA(torch.optim.Adam(make_params(), lr=1e-3), c=C, sample=M)  # paths kept the same way: checked
    with pytest.raises(ValueError, match="sampled path"):
        other.load_state_dict(state)


def test_a_changed_hyper_parameter_rebuilds_the_sampled_reference() -> None:
    """A scheduler that moves SGD's momentum: the next step uses the new momentum's reference curves."""
    params = [torch.zeros(300, dtype=torch.float64, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    clara = CLARA(optimizer, c=C, sample=M)

    def step() -> None:
        params[0].grad = torch.randn(300, dtype=torch.float64)
        optimizer.step()

    def expected_curve() -> list[float]:
        reference = reference_for(optimizer, optimizer.param_groups[0], C)
        return reference.curve(M).tolist()

    step()
    bucket = clara.paths.sampled.buckets[0]
    first = list(bucket.curves[0])
    assert first == pytest.approx(expected_curve())
    optimizer.param_groups[0]["momentum"] = 0.5
    step()
    second = list(bucket.curves[0])
    assert second == pytest.approx(expected_curve())
    assert second != pytest.approx(first)


def test_a_channels_last_weight_is_sampled_in_row_major_order() -> None:
    """A non-contiguous tensor's sample is the same logical entries as its contiguous copy's."""
    weight = torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    copy = weight.detach().contiguous().requires_grad_()
    assert not weight.is_contiguous()
    runs = []
    for param in (weight, copy):
        optimizer = torch.optim.SGD([param], lr=0.1)
        clara = CLARA(optimizer, sample=M)
        for step in range(3):
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).contiguous()
            optimizer.step()
        runs.append(clara.paths.sampled.export()[param][0])
    torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.parametrize("tensors", [3, 40])
def test_the_step_on_the_device_is_twelve_calls_whatever_the_tensor_count(tensors: int) -> None:
    """Issue 22's lean hot path, counted by the torch profiler: for tensors within the sample, the gather
    (one foreach copy), the step (one foreach subtraction) and the path update (ten) are 12 ATen calls,
    as many for 40 tensors as for 3; the counts and the reference are host work (no ATen call)."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_clara.stores import SampledPaths

    params = [torch.nn.Parameter(torch.randn(7 + i)) for i in range(tensors)]
    engine = SampledPaths(DEFAULT_SAMPLE, lambda p: p.numel(), lambda p: p)
    groups = [{"params": params}]
    metadata = {"aten::view", "aten::as_strided", "aten::detach", "aten::empty", "aten::alias", "aten::select",
                "aten::slice", "aten::unsqueeze", "aten::lift_fresh"}  # fmt: skip

    def step() -> list[Tensor]:
        engine.before_step(groups)
        with torch.no_grad():
            torch._foreach_add_(params, 0.1)  # the "optimizer": one call, left out of the count
        return [result.results for result in engine.update(0.1, lambda j, n: [0.01, 0.02], [0])]

    step()  # the layout and the curves are made on the first step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        results = step()
    calls = [
        event.name
        for event in prof.events()
        if event.name.startswith("aten::")
        and event.name not in metadata | {"aten::_foreach_add_"}
        and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
    ]
    assert len(calls) == 12, calls
    assert calls[:2] == ["aten::_foreach_copy_", "aten::_foreach_sub_"]
    # the host's tally (its first: count 1, the curve's second value), every row moved and finite
    expected = torch.tensor([[0.02] * tensors, [1.0] * tensors, [1.0] * tensors], dtype=torch.float64)
    assert torch.equal(engine.buckets[0].tally(results[0], [[0.01, 0.02]] * tensors)[1:], expected)


def test_a_checkpoint_with_another_c_restarts_the_paths() -> None:
    """A path's length depends on c: kept with another c it would be judged against the wrong reference for
    about 1/c steps, so it restarts (with a warning) while the factor loads."""
    _, saved = run_trajectory(FAMILIES["adam"], steps=30, sample=M)
    params = make_params()
    clara = CLARA(torch.optim.Adam(params, lr=1e-3), c=C / 2, d=0.05, sample=M)
    with pytest.warns(RuntimeWarning, match=r"c=.*the paths restart"):
        clara.load_state_dict(saved.state_dict())
    assert clara.lr_factor == pytest.approx(saved.lr_factor)
    assert all(entry is None for entry in clara.state_dict()["tensors"][0])  # no path kept yet


def test_a_model_cast_after_attaching_gets_paths_of_its_new_dtype() -> None:
    """``model.double()`` (or ``.to(device)``) keeps the parameters' identity: the buckets must still follow
    their dtype and device, keeping each tensor's path."""
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 50)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clara = CLARA(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 100)).sum().backward()
        optimizer.step()
    before = [entry["path"].clone() for entry in clara.state_dict()["tensors"][0]]
    model.double()
    assert [bucket.path.dtype for bucket in clara.paths.sampled.buckets] == [torch.float32]
    optimizer.zero_grad()
    model(torch.randn(4, 100, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert [bucket.path.dtype for bucket in clara.paths.sampled.buckets] == [torch.float64]
    assert clara.num_adapted_steps == 4
    after = [entry["path"] for entry in clara.state_dict()["tensors"][0]]
    assert all(not torch.equal(a.double(), b) and float(b.abs().sum()) > 0 for a, b in zip(before, after, strict=True))
