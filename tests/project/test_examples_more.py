"""Smoke tests of the TensorBoard-dynamics, plain-PyTorch and Fabric examples (``--quick`` runs in subprocesses).

Each example runs once per session in a clone of this checkout (``example_runs``; never into this
checkout's ``docs/images``), and the checks read what it wrote: PNGs, TensorBoard event files, CSV
logs and summary JSON.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from example_runs import ExampleRunner

from lightning_clara.options import RULE_DEFAULTS, run_length_defaults

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_STEPS = 2 * 45  # --quick: 2 epochs of ceil(1437 / 32) batches
#: CLARA starts at this fraction of the configured lr (the default rule's initial_factor).
INITIAL_FACTOR = RULE_DEFAULTS["normalized"]["initial_factor"]

pytest.importorskip("sklearn", reason="the examples need scikit-learn (in the [examples] extras)")

Completed = subprocess.CompletedProcess[str]


def assert_ok(completed: Completed) -> str:
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---------------------------------------------------------------------------- tensorboard_dynamics.py
@pytest.fixture(scope="module")
def dynamics(run_in_clone: ExampleRunner) -> tuple[Completed, Path]:
    """The quick run in a clone, outputs at their defaults (a run never touches this checkout's README pictures)."""
    pytest.importorskip("tensorboard", reason="the example logs with TensorBoard")
    pytest.importorskip("matplotlib", reason="the example draws with matplotlib")
    run = run_in_clone("tensorboard_dynamics.py")
    return run.completed, run.clone / "lightning_logs" / "tensorboard_dynamics"


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of the one TensorBoard version directory under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = sorted(run_dir.glob("version_*"))
    accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_dynamics_prints_the_table_and_writes_both_pngs(dynamics: tuple[Completed, Path]) -> None:
    completed, out_dir = dynamics
    out = assert_ok(completed)
    assert "digits: fixed learning rate vs CLARA" in out
    for run in ("sgd-clara", "adam-clara"):
        assert run in out
    for png in (out_dir / "clara_dynamics.png", out_dir / "clara_rescue.png"):
        assert png.stat().st_size > 10_000, f"{png} is suspiciously small"
        width, height = png_size(png)
        assert width >= 600
        assert height >= 300


def test_dynamics_tensorboard_events_hold_clara_tags_per_optimizer(dynamics: tuple[Completed, Path]) -> None:
    completed, out_dir = dynamics
    assert_ok(completed)
    for optimizer in ("SGD", "Adam"):
        with_clara = scalars(out_dir / "tb" / f"{optimizer.lower()}-clara")
        for metric in ("lr", "ratio", "log_factor"):
            assert f"clara/{metric}-{optimizer}" in with_clara
        baseline = scalars(out_dir / "tb" / optimizer.lower())
        assert not [tag for tag in baseline if tag.startswith("clara/")]
        assert f"lr-{optimizer}" in baseline


@pytest.mark.parametrize(("optimizer", "initial_lr"), [("SGD", 1e-4), ("Adam", 1e-6)])
def test_dynamics_clara_lifts_the_bad_learning_rate(
    dynamics: tuple[Completed, Path], optimizer: str, initial_lr: float
) -> None:
    completed, out_dir = dynamics
    assert_ok(completed)
    baseline = scalars(out_dir / "tb" / optimizer.lower())[f"lr-{optimizer}"]
    assert baseline == pytest.approx([initial_lr] * len(baseline))
    with_clara = scalars(out_dir / "tb" / f"{optimizer.lower()}-clara")
    lr = with_clara[f"clara/lr-{optimizer}"]
    assert len(lr) == QUICK_STEPS // 5  # log_every_n_steps=5
    start = INITIAL_FACTOR * initial_lr  # CLARA starts 10x below the configured lr and climbs
    assert lr[0] == pytest.approx(start, rel=0.2)  # the first logged step is still near the start
    assert lr[-1] > 1.5 * start  # steps agree from such a small lr: F must have grown
    assert with_clara[f"clara/log_factor-{optimizer}"][-1] > math.log(INITIAL_FACTOR)
    # the scheduled lr that LearningRateMonitor sees is never touched by CLARA
    assert with_clara[f"lr-{optimizer}"] == pytest.approx([initial_lr] * len(with_clara[f"lr-{optimizer}"]))
    # the hold the dynamics picture shades: the run-length default for the fit's steps
    runs = {run["name"]: run for run in json.loads((out_dir / "summary.json").read_text())["runs"]}
    assert (
        runs[f"{optimizer.lower()}-clara"]["hold_after"] == run_length_defaults(QUICK_STEPS, True, True)["hold_after"]
    )


def load_example(script: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import an example script as a module (registered for the test only: dataclasses look it up)."""
    name = f"example_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_dynamics_pictures_go_to_the_out_dir_unless_asked_for_the_readme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="the example logs with TensorBoard")
    pytest.importorskip("matplotlib", reason="the example draws with matplotlib")
    example = load_example("tensorboard_dynamics.py", monkeypatch)
    for argv in (["--quick"], []):
        args = example.parse_args([*argv, "--out-dir", str(tmp_path)])
        assert (args.rescue_png, args.dynamics_png) == (tmp_path / "clara_rescue.png", tmp_path / "clara_dynamics.png")
    readme = example.parse_args(["--readme-pictures"])
    images = ROOT / "docs" / "images"
    assert (readme.rescue_png, readme.dynamics_png) == (images / "clara_rescue.png", images / "clara_dynamics.png")
    with pytest.raises(SystemExit):
        example.parse_args(["--readme-pictures", "--rescue-png", str(tmp_path / "x.png")])
    assert example.parse_args([]).epochs > example.parse_args(["--quick"]).epochs


# ---------------------------------------------------------------------------- plain_pytorch.py
@pytest.fixture(scope="module")
def plain(run_in_clone: ExampleRunner) -> tuple[Completed, Path]:
    """The quick run; its checkpoint and ``plain-summary.json`` lie in the returned directory."""
    run = run_in_clone("plain_pytorch.py")
    return run.completed, run.out


def test_plain_prints_the_progression(plain: tuple[Completed, Path]) -> None:
    completed, _ = plain
    out = assert_ok(completed)
    assert "SGD + CLARA on digits" in out
    for header in ("epoch", "lr used", "mean r", "test acc"):
        assert header in out
    assert "identical" in out
    assert "different" not in out


def test_plain_raises_the_lr_and_resumes_exactly(plain: tuple[Completed, Path]) -> None:
    completed, out_dir = plain
    assert_ok(completed)
    summary = json.loads((out_dir / "plain-summary.json").read_text())
    assert summary["initial_lr"] == pytest.approx(1e-4)
    assert summary["final_lr"] > 1.5 * INITIAL_FACTOR * summary["initial_lr"]  # F grew from where it started
    assert summary["adapted_steps"] == QUICK_STEPS
    lrs = [row["lr_used"] for row in summary["epochs"]]
    assert lrs == sorted(lrs)
    # state_dict round trip: the same F right after loading, the same lr at the end
    assert summary["factor_after_load"] == summary["factor_at_save"]
    assert summary["factor_at_save"] > INITIAL_FACTOR
    assert summary["resume_identical"] is True
    assert summary["resumed_final_lr"] == summary["final_lr"]


def test_plain_checkpoint_holds_clara_state(plain: tuple[Completed, Path]) -> None:
    completed, out_dir = plain
    assert_ok(completed)
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "clara", "epoch"}
    summary = json.loads((out_dir / "plain-summary.json").read_text())
    assert checkpoint["clara"]["num_adapted_steps"] == QUICK_STEPS // 2
    assert checkpoint["clara"]["log_factors"][0] == pytest.approx(torch.tensor(summary["factor_at_save"]).log().item())


# ---------------------------------------------------------------------------- fabric.py
@pytest.fixture(scope="module")
def fabric_run(run_in_clone: ExampleRunner) -> tuple[Completed, Path]:
    """The quick run; ``fabric-summary.json`` lies in ``run.out``, the CSV log under the clone's default log dir."""
    run = run_in_clone("fabric.py")
    return run.completed, run.out


@pytest.fixture(scope="module")
def fabric_logs(run_in_clone: ExampleRunner) -> Path:
    return run_in_clone("fabric.py").clone / "lightning_logs" / "fabric"


def test_fabric_prints_the_summary(fabric_run: tuple[Completed, Path]) -> None:
    completed, _ = fabric_run
    out = assert_ok(completed)
    assert "Fabric + CLARA: Adam on digits" in out
    for header in ("initial lr", "final lr used", "adapted steps"):
        assert header in out


def test_fabric_adapts_every_step_and_raises_the_lr(fabric_run: tuple[Completed, Path]) -> None:
    completed, out_dir = fabric_run
    assert_ok(completed)
    summary = json.loads((out_dir / "fabric-summary.json").read_text())
    assert summary["initial_lr"] == pytest.approx(1e-6)  # the configured lr (the first step uses F0 x it)
    # the hooks on the unwrapped optimizer fire on every step of Fabric's wrapper
    assert summary["adapted_steps"] == summary["optimizer_steps"] == QUICK_STEPS
    assert summary["final_lr"] > 1.5 * INITIAL_FACTOR * summary["initial_lr"]
    assert summary["final_factor"] > 1.5 * INITIAL_FACTOR  # F after the last step; final_lr is the lr that step used


def test_fabric_logs_clara_metrics_with_log_dict(fabric_run: tuple[Completed, Path], fabric_logs: Path) -> None:
    completed, _ = fabric_run
    assert_ok(completed)
    (metrics_csv,) = fabric_logs.rglob("metrics.csv")
    with metrics_csv.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == QUICK_STEPS // 5
    lr = [float(row["clara/lr-Adam"]) for row in rows]
    assert lr[-1] > lr[0] >= INITIAL_FACTOR * 1e-6
    ratios = [float(row["clara/ratio-Adam"]) for row in rows]
    assert all(math.isfinite(r) and r > 0 for r in ratios), ratios
