"""The package type-checks under ``mypy --strict`` (issue 22: an API a type checker sees)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_is_clean_under_mypy_strict() -> None:
    """Every module, with torch's and Lightning's own annotations followed (about a minute cold)."""
    from mypy import api

    out, err, status = api.run(
        [
            "--strict",
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            str(ROOT / "lightning_clara"),
        ]
    )
    assert status == 0, out + err
    assert "Success: no issues found" in out
