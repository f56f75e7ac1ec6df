"""Smoke runs of the benchmark scripts, so that they keep working (the full runs are not CI's)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_robustness_smoke_writes_a_summary(tmp_path: Path) -> None:
    """The tiny grid runs every SGD/Adam method and writes per-task worst/mean accuracies."""
    out = tmp_path / "robustness.json"
    stdout = run_script("robustness.py", "--smoke", "--workers", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"iris", "digits"}
    methods = report["summary"]["digits"]
    assert {"SGD", "SGD+CLARA", "Adam+CLARA", "Adam+CLARA paper"} <= set(methods)
    for entry in methods.values():
        assert 0.0 <= entry["worst"] <= entry["mean"] <= 100.0
    assert len(report["runs"]) == 2 * len(methods) * 2  # tasks x methods x learning rates, one seed
    assert "digits: test accuracy" in stdout


def test_overhead_smoke_reports_costs_and_memory(tmp_path: Path) -> None:
    """The tiny run measures both engines on every table and reports the memory CLARA keeps."""
    out = tmp_path / "overhead.json"
    run_script("overhead.py", "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    for table in ("targets", "tensor_counts", "model_sizes"):
        assert report[table], table
    (target,) = report["targets"]
    rows = target["rows"]
    engines = ("sampled", "full", "sampled-nocheck", "sampled+safeguard")
    assert set(rows) == {f"{kind}/{engine}" for kind in ("adam", "sgd") for engine in engines}
    # 2e4 parameters in 4 tensors (two 100x100 weights, two biases): every coordinate keeps a path and a
    # step row, 8 B per parameter whatever the optimizer (the weights in a bucket of their own width, so
    # the biases are not padded to it), plus 16 B of counters per tensor; sampled paths, per tensor, a
    # path row of 4096 fp32 entries (the biases' rows zero-padded) and, beyond it, a step row and the
    # weights' 4096 int32 indices: at most 2 x m x 4 B
    for kind in ("sgd", "adam"):
        assert rows[f"{kind}/full"]["extra_bytes_per_param"] == pytest.approx(8.0, abs=4 * 16 / 20200 + 1e-9)
    m, tensors = 4096, 4
    assert rows["adam/sampled"]["extra_bytes_per_param"] * target["numel"] <= tensors * (m * 4 + 2 * m * 4) + 1024
    assert set(report["end_to_end_overhead"]) == {"cnn/sgd", "cnn/adam", "mlp/sgd", "mlp/adam"}
    assert set(report["small_mlp"]["rows"]) == {"adam/sampled", "adam/full"}
    # the NaN/inf gradient check timed alone, against the Adam and SGD steps it guards: finite, positive timings
    # (comparing them is the benchmark's job: two timed blocks of 20 small steps are not a test)
    for cost in report["gradient_check"]:
        assert all(math.isfinite(cost[key]) and cost[key] > 0 for key in ("check_ms", "in_adam_steps", "in_sgd_steps"))
    # issue 22's op count: the gradient check is one fused op (plus its flag's read) of what CLARA adds
    ops = report["cpu_ops"]
    check = "aten::_amp_foreach_non_finite_check_and_unscale_"
    assert ops["defaults"]["calls_by_op"][check] == ops["defaults"]["kernels_by_op"][check] == 1
    assert check not in ops["defaults-nocheck"]["calls_by_op"]
    for count in ("calls_per_step", "kernels_per_step"):
        assert 0 < ops["defaults-nocheck"][count] < ops["defaults"][count]
    assert ops["defaults"]["calls_per_step"] <= ops["defaults"]["kernels_per_step"]


def test_fingerprints_are_deterministic_and_a_change_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs give the same fingerprints; a saved trajectory changed in one step is reported, with the step.
    (In this process: the script's own runs take seconds, its imports most of a subprocess's time.)"""
    spec = importlib.util.spec_from_file_location("clara_fingerprint", ROOT / "benchmarks" / "fingerprint.py")
    fingerprint = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = fingerprint  # type: ignore[union-attr]  # its dataclass looks itself up there
    spec.loader.exec_module(fingerprint)  # type: ignore[union-attr]
    out = tmp_path / "fingerprint.json"
    assert fingerprint.main(["--smoke", "--out", str(out)]) == 0
    assert fingerprint.main(["--smoke", "--check", str(out)]) == 0
    assert "identical" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved["configs"]) == {"sgd", "adam", "adam-full-paths", "paper-sgd", "nan-skipped"}
    rows = saved["configs"]["adam"]["steps"]
    assert len(rows) == saved["steps"] == 20
    assert len({row[0][0] for row in rows}) > 10  # log F moved: the fingerprint is not of a constant
    rows[7][0][0] = (float.fromhex(rows[7][0][0]) * (1 + 1e-15)).hex()  # the last bits of log F at step 7
    saved["configs"]["adam"]["digest"] = "tampered"
    out.write_text(json.dumps(saved))
    assert fingerprint.main(["--smoke", "--check", str(out)]) == 1
    assert "CHANGED adam: differs from step 7" in capsys.readouterr().out


def test_synthetic_smoke_raises_the_learning_rate(tmp_path: Path) -> None:
    """Even 50 steps from lr 1e-5 on the noisy sphere: CLARA's lr rises from where it started, the fixed one
    stays."""
    run_script("synthetic.py", "--smoke", "--out", str(tmp_path))
    runs = json.loads((tmp_path / "synthetic.json").read_text())["runs"]
    assert (tmp_path / "synthetic.png").stat().st_size > 0
    for optimizer in ("sgd", "adam"):
        assert runs[f"sphere/{optimizer}+CLARA"]["lr"][-1] > 2 * runs[f"sphere/{optimizer}+CLARA"]["lr"][0]
        assert runs[f"sphere/{optimizer}"]["lr"][-1] == runs[f"sphere/{optimizer}"]["lr"][0]


def test_deep_quick_runs_every_method_on_every_task(tmp_path: Path) -> None:
    """A few steps of every method on the MNIST-1D CNN and MLP and the LM: tables, JSON and the lr plot."""
    out = tmp_path / "deep.json"
    stdout = run_script("deep.py", "--quick", "--workers", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"cnn", "mlp", "lm"}
    for task, methods in report["summary"].items():
        assert {"Adam", "Adam+CLARA", "SGDm+CLARA", "AdamW-wc+CLARA", "DoG", "Prodigy", "Mechanic"} <= set(methods)
        for entry in methods.values():
            if task == "lm":
                assert 0.0 < entry["best"] <= entry["mean"] <= entry["worst"]  # a loss: lower is better
            else:
                assert 0.0 <= entry["worst"] <= entry["mean"] <= entry["best"] <= 100.0
        assert methods["Adam+CLARA"]["tuned_baseline"] == methods["Adam"]["best"]
    runs = report["runs"]
    assert all(len(run["lrs"]) >= 2 for run in runs)
    assert all(run["final_lr"] > 0 for run in runs if run["method"] != "AdamW-wc")  # cosine ends at 0
    assert (tmp_path / "deep.png").stat().st_size > 0
    assert "cnn: test accuracy" in stdout
    assert (tmp_path / "deep.txt").exists()


def test_parity_report_compares_metrics_and_trajectories(tmp_path: Path) -> None:
    """Two tiny deep.py-style reports: the table shows full / sampled per lr0, the worst case, and the
    lr trajectories' distance (a factor 2 everywhere here) beside the seeds' (identical seeds: 1x)."""

    def report(metric: float, scale: float) -> dict:
        runs = [
            {
                "task": "mlp",
                "method": "Adam+CLARA",
                "lr0": lr,
                "seed": seed,
                "metric": metric + lr,
                "lrs": [scale, scale],
            }
            for lr in (0.1, 1.0)
            for seed in (0, 1)
        ]
        return {"runs": runs}

    full, sampled = tmp_path / "full.json", tmp_path / "sampled.json"
    full.write_text(json.dumps(report(60.0, 1.0)))
    sampled.write_text(json.dumps(report(50.0, 2.0)))
    stdout = run_script("parity.py", str(full), str(sampled))
    assert "| mlp | Adam+CLARA | 60.1 / 50.1 | 61.0 / 51.0 | 60.1 / 50.1 | 2.00x | 1.00x |" in stdout


def test_suite_quick_runs_every_task_and_method_and_resumes(tmp_path: Path) -> None:
    """Every task of the default-rule suite, every baseline, peer and CLARA row; a rerun runs nothing."""
    out = tmp_path / "suite.jsonl"
    stdout = run_script("suite.py", "--quick", "--workers", "2", "--out", str(out))
    assert "90 runs to do" in stdout  # 10 tasks x (Adam, SGDm, AdamW-cos, DoG, DoG-avg, Prodigy, 3 CLARA rows)
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(runs) == 90
    assert {r["task"] for r in runs} == {
        "mlp",
        "cnn",
        "lm-short",
        "gru",
        "mse",
        "lm-long",
        "resnet-bn",
        "cnn-long",
        "mlp-256",
        "finetune",
    }
    clara = [r for r in runs if r["method"].endswith("+CLARA")]
    assert len(clara) == 30
    assert {r["tag"] for r in clara} == {"default"}
    assert all(len(r["lrs"]) >= 2 and r["final_lr"] >= 0 for r in runs)  # the cosine ends at 0
    assert all(r["final_lr"] > 0 for r in runs if not r["method"].startswith("AdamW-cos"))
    summary = json.loads((tmp_path / "suite-default-summary.json").read_text())
    assert summary["lm-short"]["split"] == "choose"
    assert summary["finetune"]["split"] == "confirm"
    assert {"regret", "tuned_lr", "worst"} <= summary["mlp"]["Adam"].keys()
    assert (tmp_path / "suite-default.png").stat().st_size > 0
    again = run_script("suite.py", "--quick", "--workers", "1", "--out", str(out))
    assert "0 runs to do" in again
    assert len(out.read_text().splitlines()) == 90


def test_suite_report_compares_like_with_like() -> None:
    """The suite's report on hand-made rows (the MSE task, lower is better): a baseline is averaged over the
    seeds its CLARA rows have, rows of another run length are left out, DoG is its first lr0's cell, a
    non-finite final lr counts as a broken climb, and harm is measured at the tuned lr or not at all."""
    import io

    from rich.console import Console

    spec = importlib.util.spec_from_file_location("clara_suite", ROOT / "benchmarks" / "suite.py")
    suite = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = suite  # type: ignore[union-attr]  # its dataclasses look themselves up there
    spec.loader.exec_module(suite)  # type: ignore[union-attr]
    steps = suite.SPECS["mse"].steps
    rows = [
        ("Adam", "", 1e-3, 0, 0.050, 1e-3),
        ("Adam", "", 1e-3, 1, 0.010, 1e-3),  # a seed CLARA lacks: a baseline over both would be tuned at 0.030
        ("Adam", "", 1e-2, 0, 0.060, 1e-2),
        ("Adam+CLARA", "t", 1e-5, 0, 0.055, math.nan),  # diverged lr: a broken climb (the metric is worse)
        ("Adam+CLARA", "t", 1e-4, 0, 0.052, 2e-3),
        ("DoG", "", 1e-5, 0, 0.070, 1e-3),
        ("DoG", "", 1e-2, 0, 0.010, 1e-3),  # a second DoG cell (another lr0): not mixed in
        ("AdamW-cos", "", 1e-3, 0, 0.040, 0.0),
        ("AdamW-cos", "", 1e-2, 0, 0.045, 0.0),
        ("AdamW-cos+CLARA", "t", 1e-2, 0, 0.046, 0.0),  # no row at the tuned 1e-3: no harm figure
    ]
    runs = [
        {"task": "mse", "method": m, "tag": tag, "lr0": lr0, "seed": seed, "steps": steps, "metric": v, "final_lr": f}
        for m, tag, lr0, seed, v, f in rows
    ]
    runs.append({**runs[4], "steps": 20, "metric": 9.9})  # a --steps 20 run of the same cell: left out
    summary = suite.report(
        {str(i): run for i, run in enumerate(runs)}, ["mse"], "t", [1e-5, 1e-4], Console(file=io.StringIO()), None
    )["mse"]
    assert summary["Adam"]["tuned"] == pytest.approx(0.050)
    assert summary["Adam"]["worst"] == pytest.approx(0.055)
    assert summary["Adam"]["regret"] == pytest.approx(10.0)  # % relative MSE
    assert summary["dog"] == pytest.approx(0.070)
    assert summary["broken_climbs"] == 1
    assert summary["seeds"] == 1
    assert summary["AdamW-cos"]["tuned_lr"] == 1e-3
    assert summary["AdamW-cos"]["harm"] is None
    json.dumps(summary, allow_nan=False)  # the summary file stays valid JSON
    # the lr a run held is the largest of its second half: an anneal's (or a cosine's) end is no evidence
    assert suite.held_lr({"final_lr": 1e-4, "lrs": [1e-3, 2.0, 1.0, 0.5, 1e-4]}) == 1.0
    assert suite.held_lr({"final_lr": 3e-3}) == 3e-3  # no trace kept
    assert suite.held_lr({"final_lr": 1e-4, "lrs": [1e-3, 1e-3, math.nan, 1e-4]}) == math.inf
    # DoG as prescribed (iterate averaging) is the peer where it covers the CLARA rows' seeds; a worst case
    # needs every lr0
    runs.append({**runs[5], "method": "DoG-avg", "seed": 1, "metric": 0.049})  # another seed only: not compared
    other_seed = {str(i): run for i, run in enumerate(runs)}
    assert suite.report(other_seed, ["mse"], "t", [1e-5, 1e-4], Console(file=io.StringIO()), None)["mse"]["dog"] == (
        pytest.approx(0.070)
    )
    runs.append({**runs[5], "method": "DoG-avg", "metric": 0.065})
    table = {str(i): run for i, run in enumerate(runs)}
    summary = suite.report(table, ["mse"], "t", [1e-5, 1e-4], Console(file=io.StringIO()), None)["mse"]
    assert summary["dog"] == pytest.approx(0.065)
    incomplete = suite.report(table, ["mse"], "t", [1e-5, 1e-4, 1e-3], Console(file=io.StringIO()), None)["mse"]
    assert "Adam" not in incomplete  # no cell at lr0 1e-3: no worst case over the grid
