"""Each example's quick run, once per test session, in a clone of this checkout with its outputs at their defaults.

The smoke tests of the examples read what a run printed and wrote; the clean-clone test checks that the same
run left ``git status`` as it was. One run serves both (an example takes 5-25 s), so the examples run once.
Opt-in outputs (``--summary``) and the plain example's checkpoint (by default a temp file, outside the clone)
go to the session's own directory, written as ``{out}`` in the arguments.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: An example's quick run takes 5-25 s on 2 busy cores; a hung one (a DDP deadlock) fails its tests after this.
EXAMPLE_TIMEOUT_S = 300
#: Each example's quick mode, as its docstring gives it (the clean-clone test runs every one of them).
EXAMPLE_RUNS: dict[str, tuple[str, ...]] = {
    "digits.py": ("--quick",),
    "tensorboard_dynamics.py": ("--quick",),
    "plain_pytorch.py": ("--quick", "--checkpoint", "{out}/checkpoint.pt", "--summary", "{out}/plain-summary.json"),
    "fabric.py": ("--quick", "--summary", "{out}/fabric-summary.json"),
    "lightning_cli.py": ("fit", "--config", "examples/config.yaml", "--trainer.max_epochs=1"),
    "ddp.py": ("--quick",),
}


def run_in_group(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own process group, stdout and stderr together; on timeout kill the whole group
    (a DDP run's spawned ranks included) and return code -9 with the output so far."""
    # ROOT for the package, tests/ for the shared helpers a driver script imports
    python_path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    env |= {"COLUMNS": "120", "OMP_NUM_THREADS": "1"}  # rich must not wrap a table in a pipe
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            output += f"\n[killed: {command} did not finish within {timeout} s (deadlock?)]"
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def status(clone: Path) -> str:
    """``git status`` of the clone ("" for a copy of a tree that is not a git checkout)."""
    if not (clone / ".git").exists():
        return ""
    return git("status", "--porcelain", "--untracked-files=all", cwd=clone)


def make_clone(dest: Path) -> Path:
    """A clone of this checkout with its uncommitted changes copied in (the code under test); a plain copy
    where the tests run from an unpacked source tree."""
    if not (ROOT / ".git").exists():
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns("__pycache__", "lightning_logs*", ".*_cache"))
        return dest
    git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest), cwd=ROOT)
    for name in git("ls-files", "--modified", "--others", "--exclude-standard", "-z", cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for name in git("ls-files", "--deleted", "-z", cwd=ROOT).split("\0"):
        if name:
            (dest / name).unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class ExampleRun:
    completed: subprocess.CompletedProcess[str]
    clone: Path  # the working directory: default outputs lie under it
    out: Path  # the session's directory for opt-in outputs
    status_before: str
    status_after: str


@dataclass
class ExampleRunner:
    clone: Path
    out: Path
    runs: dict[str, ExampleRun] = field(default_factory=dict)

    def __call__(self, script: str) -> ExampleRun:
        """``examples/<script>`` with :data:`EXAMPLE_RUNS`'s arguments, run once (a failed or killed run too: its
        code and output are what every test of it reads); this checkout's package first."""
        if script not in self.runs:
            args = [arg.replace("{out}", str(self.out)) for arg in EXAMPLE_RUNS[script]]
            before = status(self.clone)
            command = [sys.executable, str(self.clone / "examples" / script), *args]
            completed = run_in_group(command, self.clone, EXAMPLE_TIMEOUT_S)
            self.runs[script] = ExampleRun(completed, self.clone, self.out, before, status(self.clone))
        return self.runs[script]
