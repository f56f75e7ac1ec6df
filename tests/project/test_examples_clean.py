"""Running an example leaves the clone clean: every example's quick mode, with its default outputs, in a clone.

The runs are the ones the other example tests read (``example_runs``): their outputs stay at the
defaults, so an example whose defaults write into tracked files (a README picture, say) or into a
directory git does not ignore shows up in ``git status``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from example_runs import EXAMPLE_RUNS, ExampleRunner

ROOT = Path(__file__).resolve().parents[2]

for module, reason in (
    ("sklearn", "the examples need scikit-learn (in the [test] extras)"),
    ("tensorboard", "the examples log with TensorBoard (in the [test] extras)"),
    ("matplotlib", "tensorboard_dynamics.py draws with matplotlib (in the [test] extras)"),
    ("docstring_parser", "LightningCLI needs jsonargparse[signatures] (in the [test] extras)"),
):
    pytest.importorskip(module, reason=reason)


def test_every_example_is_run() -> None:
    assert set(EXAMPLE_RUNS) == {path.name for path in (ROOT / "examples").glob("*.py")}


@pytest.mark.parametrize("script", EXAMPLE_RUNS)
def test_example_leaves_the_clone_clean(run_in_clone: ExampleRunner, script: str) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare against")
    run = run_in_clone(script)
    completed = run.completed
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert run.status_after == run.status_before, f"{script} changed the clone:\n{run.status_after}"
