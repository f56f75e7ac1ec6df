"""Running an example leaves the clone clean: every example's quick mode, with its default outputs, in a clone.

The other example tests pass output paths under ``tmp_path``; this one passes none, so an example
whose defaults write into tracked files (a README picture, say) or into a directory git does not
ignore shows up in ``git status``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Each example's quick mode, as its docstring gives it; outputs at their defaults.
EXAMPLE_RUNS: dict[str, list[str]] = {
    "digits.py": ["--quick"],
    "tensorboard_dynamics.py": ["--quick"],
    "plain_pytorch.py": ["--quick"],
    "fabric.py": ["--quick"],
    "lightning_cli.py": ["fit", "--config", "examples/config.yaml", "--trainer.max_epochs=1"],
    "ddp.py": ["--quick"],
}

for module, reason in (
    ("sklearn", "the examples need scikit-learn (in the [test] extras)"),
    ("tensorboard", "the examples log with TensorBoard (in the [test] extras)"),
    ("matplotlib", "tensorboard_dynamics.py draws with matplotlib (in the [test] extras)"),
    ("docstring_parser", "LightningCLI needs jsonargparse[signatures] (in the [test] extras)"),
):
    pytest.importorskip(module, reason=reason)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def status(clone: Path) -> str:
    return git("status", "--porcelain", "--untracked-files=all", cwd=clone)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this checkout with its uncommitted changes copied in (the code under test)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare against")
    dest = tmp_path_factory.mktemp("examples") / "clone"
    git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest), cwd=ROOT)
    for name in git("ls-files", "--modified", "--others", "--exclude-standard", "-z", cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for name in git("ls-files", "--deleted", "-z", cwd=ROOT).split("\0"):
        if name:
            (dest / name).unlink(missing_ok=True)
    return dest


def test_every_example_is_run() -> None:
    assert set(EXAMPLE_RUNS) == {path.name for path in (ROOT / "examples").glob("*.py")}


@pytest.mark.parametrize("script", EXAMPLE_RUNS)
def test_example_leaves_the_clone_clean(clone: Path, script: str) -> None:
    before = status(clone)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(clone / "examples" / script), *EXAMPLE_RUNS[script]],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert status(clone) == before, f"{script} changed the clone:\n{status(clone)}"
