"""docs/architecture.md's module table is true: every module is in it, in an order no import climbs back up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_clara"


def table_rows() -> list[list[str]]:
    """The table's rows, top to bottom, each the module names it holds (``reference/`` as ``reference``)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            rows.append([name.removesuffix(".py").removesuffix("/") for name in re.findall(r"`([^`]+)`", first_cell)])
    return rows


def runtime_imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        for module in modules:
            if module.startswith("lightning_clara."):
                found.add(module.split(".")[1])
    return found


def module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_is_in_the_table_once() -> None:
    names = [name for row in table_rows() for name in row]
    modules = {module_of(path) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert len(names) == len(set(names))
    assert set(names) == modules


def test_no_module_imports_one_below_it() -> None:
    position = {name: index for index, row in enumerate(table_rows()) for name in row}  # one row: one level
    climbs = [
        (module_of(path), imported)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
        for imported in runtime_imports(path)
        if imported != module_of(path) and position[imported] > position[module_of(path)]
    ]
    assert climbs == []
