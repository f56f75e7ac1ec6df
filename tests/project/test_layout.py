"""The code's shape, as issue 14 set it: small units, options declared once, tests by layer."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from lightning_clara import CLARA, CLARACallback, CLARAOptions
from lightning_clara.callback import CALLBACK_OPTIONS
from lightning_clara.options import OPTION_DOCS

ROOT = Path(__file__).resolve().parents[2]
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
#: Issue 22: no module of the package over this many lines.
MAX_MODULE_LINES = 400


def _definitions(path: Path) -> list[tuple[str, int, int]]:
    """(name, lines, limit) of every class and function in a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            out.append((f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1, MAX_CLASS_LINES))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1, MAX_FUNCTION_LINES))
    return out


def test_no_class_over_300_lines_and_no_function_over_60() -> None:
    too_long = [
        (name, lines)
        for path in sorted((ROOT / "lightning_clara").rglob("*.py"))
        for name, lines, limit in _definitions(path)
        if lines > limit
    ]
    assert not too_long, too_long


def test_no_module_over_400_lines() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in (ROOT / "lightning_clara").rglob("*.py")
    }
    assert not {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}


def test_no_test_module_imports_another() -> None:
    test_modules = {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [(path.name, name) for name in names if name in test_modules | {"conftest"}]
    assert not offenders, offenders


def test_every_option_is_declared_once_and_documented() -> None:
    """CLARA's and the callback's option parameters are CLARAOptions' fields, with their defaults."""
    fields = {f.name: f for f in dataclasses.fields(CLARAOptions)}
    assert set(OPTION_DOCS) == set(fields)
    clara = inspect.signature(CLARA).parameters
    for name, field in fields.items():
        assert clara[name].default == field.default, name
        assert name in (CLARA.__doc__ or ""), name
    callback = inspect.signature(CLARACallback).parameters
    assert set(CALLBACK_OPTIONS) == set(fields) - {"variant", "reference", "sharding"}
    for name in CALLBACK_OPTIONS:
        assert callback[name].default == fields[name].default, name  # one default in every API
        assert f"{name}:" in (CLARACallback.__doc__ or ""), name


def test_tests_are_organised_by_layer() -> None:
    layers = {"rule", "paths", "references", "controller", "callback", "distributed", "project"}
    assert {path.parent.name for path in (ROOT / "tests").rglob("test_*.py")} == layers
    assert not list((ROOT / "tests").glob("test_*.py"))  # none left at the top
