"""Every ```python block of README.md runs as written.

Each block runs on its own, in a fresh interpreter (``python block.py``) with an empty temporary
directory as its working directory and this checkout first on ``PYTHONPATH``: a reader copies
one block at a time, so each must be self-contained, and whatever it writes (logs, checkpoints)
lands in the temporary directory. A block that is deliberately a fragment can be marked with
``<!-- readme-test: skip -->`` on the line before its fence; the test reports it as skipped and
allows at most ``MAX_SKIPPED`` such blocks, so the marker cannot quietly switch the check off.
``MIN_BLOCKS`` makes deleting or renaming the blocks fail too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIP_MARKER = "<!-- readme-test: skip -->"
#: README.md has (at least) the Lightning and the plain-PyTorch usage examples.
MIN_BLOCKS = 2
MAX_SKIPPED = 1
#: Generous against a loaded machine; each block takes a few seconds on one core.
TIMEOUT_S = 180

#: An opening fence (up to 3 spaces of indentation, as in CommonMark) and its info string's first word.
_FENCE = re.compile(r"^ {0,3}```\s*([^\s`]*)")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def python_blocks(text: str) -> list[Block]:
    """The fenced ```python (or ```py) blocks of ``text``, in order, with their skip markers."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1).lower()
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: unterminated code fence")
        if language in ("python", "py", "python3"):
            previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
            code = textwrap.dedent("\n".join(lines[start + 1 : i]) + "\n")  # a fence inside a list is indented
            blocks.append(Block(start + 1, code, previous == SKIP_MARKER))
        i += 1  # past the closing fence
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _param(index: int, block: Block) -> object:
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", block.first_line).strip("-")[:40]
    marks = [pytest.mark.skip(reason=f"README.md:{block.line} is marked {SKIP_MARKER}")] if block.skip else []
    return pytest.param(block, id=f"{index}-line{block.line}-{slug}", marks=marks)


def test_readme_has_enough_runnable_blocks() -> None:
    skipped = [block.line for block in BLOCKS if block.skip]
    assert len(BLOCKS) >= MIN_BLOCKS, f"README.md has {len(BLOCKS)} python blocks, expected at least {MIN_BLOCKS}"
    assert len(skipped) <= MAX_SKIPPED, f"too many README blocks marked {SKIP_MARKER!r}: lines {skipped}"
    assert len(BLOCKS) - len(skipped) >= MIN_BLOCKS - MAX_SKIPPED


def test_block_parser_sees_fences_and_markers() -> None:
    lines = ["```bash", "echo no", "```", "```python", "a = 1", "```", SKIP_MARKER, "", "```py", "fragment(", "```"]
    lines += ["```", "plain", "```", "  ```Python title=x", "  b = 2", "  ```"]
    blocks = python_blocks("\n".join(lines))
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (4, "a = 1\n", False),
        (9, "fragment(\n", True),
        (15, "b = 2\n", False),
    ]


def check_transformers_output(stdout: str) -> None:
    """What the README says the Transformers snippet shows: the lr used starts below the schedule
    (CLARA starts at 0.1 x learning_rate), climbs past it, and the loss falls."""
    rows = [tuple(float(x) for x in line.split()) for line in stdout.splitlines() if len(line.split()) == 4]
    assert len(rows) == 10, stdout
    (_, scheduled, used, first_loss), last_loss = rows[0], rows[-1][3]
    assert used < 0.5 * scheduled
    assert any(used > scheduled for _, scheduled, used, _ in rows[:5])  # caught up by step 150
    assert last_loss < first_loss - 2.0


#: Checks of what a block prints, for the blocks whose README text describes their output.
OUTPUT_CHECKS: dict[str, Callable[[str], None]] = {"add_clara(trainer)": check_transformers_output}


@pytest.mark.parametrize("block", [_param(i, b) for i, b in enumerate(BLOCKS)])
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # One thread: the blocks' tensors are tiny and the CI cores are shared (as in conftest.py).
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, (
        f"README.md:{block.line} failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    )
    for marker, check in OUTPUT_CHECKS.items():
        if marker in block.code:
            check(completed.stdout)
