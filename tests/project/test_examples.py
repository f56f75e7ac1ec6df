"""Smoke test of the demo: ``examples/digits.py --quick`` runs, reports, logs, and CLARA raises the lr."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from example_runs import ExampleRunner

from lightning_clara.options import RULE_DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.py"

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (in the [test] extras)")
pytest.importorskip("tensorboard", reason="the digits demo logs with TensorBoard (in the [test] extras)")


@pytest.fixture(scope="module")
def quick_run(run_in_clone: ExampleRunner) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The quick demo, run once per session in a clone (``example_runs``); its logs at the default log dir."""
    run = run_in_clone("digits.py")
    return run.completed, run.clone / "lightning_logs_digits"


def test_demo_exits_cleanly_and_prints_the_table(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    assert "SGD on digits: fixed learning rate vs CLARA" in out
    for header in ("initial lr", "largest lr", "final lr", "test acc", "steps"):
        assert header in out
    assert "sgd-clara" in out


def test_demo_writes_tensorboard_events(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, log_dir = quick_run
    assert completed.returncode == 0, completed.stderr
    for run in ("sgd", "sgd-clara"):
        events = list((log_dir / run).rglob("events.out.tfevents.*"))
        assert events, f"no TensorBoard event file under {log_dir / run}"
        assert any(path.stat().st_size > 0 for path in events)


def test_clara_raises_the_bad_learning_rate(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, log_dir = quick_run
    assert completed.returncode == 0, completed.stderr
    runs = {run["name"]: run for run in json.loads((log_dir / "summary.json").read_text())["runs"]}
    baseline, clara = runs["sgd"], runs["sgd-clara"]
    assert baseline["final_lr"] == pytest.approx(baseline["initial_lr"])
    assert clara["optimizer_steps"] == baseline["optimizer_steps"] > 0
    # CLARA starts 10x below the configured lr (initial_factor); from there the steps of SGD agree
    # (ratio > 1), so F, and with it the lr used, must rise.
    assert clara["final_lr"] > 2 * RULE_DEFAULTS["normalized"]["initial_factor"] * clara["initial_lr"]
