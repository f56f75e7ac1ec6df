"""The package as published: sdist and wheel built with ``python -m build``, checked, installed in a fresh venv.

How, and why so:

* **No build isolation.** ``python -m build --no-isolation`` uses this environment's setuptools
  (the ``test`` extra pins ``setuptools>=77`` and ``build``), so the test needs no package index.
  What isolation would also prove, that building needs nothing but ``build-system.requires``
  (in particular not torch, since the version is read from ``lightning_clara/__init__.py``),
  is checked directly instead: the build runs with ``torch`` and ``lightning`` shadowed on
  ``PYTHONPATH`` by stubs that raise ``ImportError``, so setuptools' ``attr:`` lookup must
  succeed statically, without importing the package.
* **Built from a clean copy, the wheel from the sdist.** The sources are copied without
  ``*.egg-info``, ``build/`` and other ignored files (a stale ``SOURCES.txt`` would leak into
  the sdist), the sdist is built from the copy, unpacked, and the wheel is built from the
  unpacked sdist, as ``python -m build`` does by default: so the sdist alone is enough to build.
* **A fresh venv, torch linked in.** ``python -m venv`` (no system site-packages), pip resolves
  and installs the wheel *with* its dependencies from the configured indexes (the same ones
  ``pip install -e .[test]`` used), then ``pip check``; the installed copy is imported from an
  empty working directory with no ``PYTHONPATH``, asserted to be the venv's, and steps a tiny
  SGD under ``CLARA``. The one shortcut is torch: installing it would write ~900 MB (60-150 s
  with deletion on the 2 shared CI cores and their disk) or, without a local wheel, download a
  multi-GB CUDA build. So the running torch's own files are symlinked into a directory that a
  ``.pth`` file puts on the venv's path, exactly as if ``pip install torch==<that version>`` had
  run first; pip sees it, is pinned to that exact version, and installs torch's own
  dependencies. A torch with CUDA runtime dependencies skips the test (they would be downloaded).
  About 30-40 s on 2 loaded cores, mostly pip installing lightning, numpy and sympy.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lightning_clara

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lightning_clara"
VERSION = lightning_clara.__version__
URL_NAMES = ("Homepage", "Documentation", "Repository", "Issues", "Changelog")
REQUIRED_CLASSIFIERS = (
    "Operating System :: OS Independent",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.13",
    "Typing :: Typed",
)
#: Not copied into the build tree: version control, virtualenvs, build outputs, caches, run logs.
_IGNORED = shutil.ignore_patterns(
    ".git",
    ".ci-venv",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.py[cod]",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    ".whl",
    "lightning_logs*",
    "logs",
    "runs",
    "*.ckpt",
)
_IMPORT_BLOCKER = 'raise ImportError("{name} must not be imported while building lightning-clara")\n'


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at this checkout or venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off", **extra)
    return env


def _run(args: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert completed.returncode == 0, f"{args} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    return completed


def _metadata(text: str) -> email.message.Message:
    """Core metadata (METADATA, PKG-INFO) is an RFC 822 style header block with the description as body."""
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


def _module_files() -> set[str]:
    """Every file the wheel must carry under ``lightning_clara/``: the modules and ``py.typed``."""
    source = ROOT / PACKAGE
    files = {p.relative_to(ROOT).as_posix() for p in source.rglob("*.py") if "__pycache__" not in p.parts}
    return files | {f"{PACKAGE}/py.typed"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    base = tmp_path_factory.mktemp("packaging")
    stubs = base / "stubs"
    for name in ("torch", "lightning"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(_IMPORT_BLOCKER.format(name=name))
    env = _clean_env(PYTHONPATH=str(stubs))
    source, out = base / "source", base / "dist"
    shutil.copytree(ROOT, source, ignore=_IGNORED)

    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)]
    _run([*build, "--sdist", str(source)], timeout=300, env=env, cwd=base)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        # The "data" filter (Python >= 3.10.12 / 3.11.4) refuses links and paths outside the target.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(base / "unpacked", **kwargs)
    (unpacked,) = (base / "unpacked").iterdir()
    _run([*build, "--wheel", str(unpacked)], timeout=300, env=env, cwd=base)
    (wheel,) = out.glob("*.whl")
    return Dists(sdist=sdist, wheel=wheel)


def test_file_names_carry_the_version(dists: Dists) -> None:
    assert dists.sdist.name == f"{PACKAGE}-{VERSION}.tar.gz"
    assert dists.wheel.name == f"{PACKAGE}-{VERSION}-py3-none-any.whl"


def test_wheel_holds_exactly_the_package_and_its_metadata(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = _metadata(wheel.read(f"{PACKAGE}-{VERSION}.dist-info/METADATA").decode())
        license_text = wheel.read(f"{PACKAGE}-{VERSION}.dist-info/licenses/LICENSE").decode()
    package_files = {name for name in names if not name.startswith(f"{PACKAGE}-{VERSION}.dist-info/")}
    assert package_files == _module_files()  # every module and py.typed; no tests, examples or caches
    assert license_text == (ROOT / "LICENSE").read_text()

    assert metadata["Name"] == "lightning-clara"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier")
    assert set(REQUIRED_CLASSIFIERS) <= set(classifiers)
    # PEP 639: with a license expression, license classifiers are deprecated (setuptools >= 77 refuses them).
    assert not [c for c in classifiers if c.startswith("License ::")]
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL"))
    assert set(urls) == set(URL_NAMES)
    assert all(url.startswith("https://") for url in urls.values())
    requires = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split("<")[0].split(">")[0].split("=")[0] for r in requires) == [
        "lightning",
        "rich",
        "torch",
        "torchmetrics",
    ]
    # PyPI shows README.md as the project description.
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()


def test_classifiers_are_known_to_pypi(dists: Dists) -> None:
    trove_classifiers = pytest.importorskip("trove_classifiers", reason="in the [test] extras")
    with zipfile.ZipFile(dists.wheel) as wheel:
        metadata = _metadata(wheel.read(f"{PACKAGE}-{VERSION}.dist-info/METADATA").decode())
    unknown = set(metadata.get_all("Classifier")) - set(trove_classifiers.classifiers)
    assert not unknown, f"PyPI would refuse the upload: unknown classifiers {sorted(unknown)}"


def test_sdist_holds_what_builds_and_tests_the_package(dists: Dists) -> None:
    top = f"{PACKAGE}-{VERSION}"
    with tarfile.open(dists.sdist) as archive:
        members = archive.getnames()
        license_text = archive.extractfile(f"{top}/LICENSE").read().decode()  # type: ignore[union-attr]
        pkg_info = _metadata(archive.extractfile(f"{top}/PKG-INFO").read().decode())  # type: ignore[union-attr]
    assert all(name == top or name.startswith(f"{top}/") for name in members)
    names = {name.removeprefix(f"{top}/") for name in members}
    required = {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "PKG-INFO", "MANIFEST.in"}
    required |= _module_files() | {
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/project/test_packaging.py",
        "examples/digits.py",
    }
    assert required <= names, f"missing from the sdist: {sorted(required - names)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".ckpt"))]
    assert not [n for n in names if n.startswith("benchmarks/results")]  # data, not sources
    assert license_text == (ROOT / "LICENSE").read_text()
    assert pkg_info["Version"] == VERSION
    assert pkg_info["License-Expression"] == "Apache-2.0"


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def _link_torch(into: Path) -> str:
    """Symlink the running torch's files into ``into``; return the exact requirement that pins it.

    Skips the test where that cannot be done safely: a torch whose own dependencies (CUDA
    runtime wheels) would make pip download gigabytes, or a platform without symlinks.
    """
    dist = importlib.metadata.distribution("torch")
    heavy = [
        r
        for r in map(Requirement, dist.requires or [])
        if (r.marker is None or r.marker.evaluate({"extra": ""})) and r.name.startswith(("nvidia-", "triton", "cuda"))
    ]
    if heavy:
        pytest.skip(f"torch {dist.version} is a CUDA build: pip would download {[r.name for r in heavy]} (GBs)")
    top_level = {Path(f).parts[0] for f in dist.files or [] if Path(f).parts[0] != ".."}
    assert "torch" in top_level, sorted(top_level)
    into.mkdir()
    try:
        for name in sorted(top_level):
            (into / name).symlink_to(dist.locate_file(name), target_is_directory=True)
    except OSError as error:  # e.g. Windows without the symlink privilege
        pytest.skip(f"cannot symlink torch into the fresh venv: {error}")
    return f"torch=={dist.version}"


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Iterator[Path]:
    """A new virtualenv (pip only, no system site-packages); removed afterwards."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120, env=_clean_env())
    yield venv
    shutil.rmtree(venv, ignore_errors=True)  # symlinks are unlinked, never followed


_SMOKE = """
import importlib.metadata, importlib.resources, json
import torch
import lightning_clara
from lightning_clara import CLARA, CLARACallback

param = torch.nn.Parameter(torch.ones(4))
optimizer = torch.optim.SGD([param], lr=0.1)
clara = CLARA(optimizer)
start = clara.lr_factor
for _ in range(3):
    optimizer.zero_grad()
    (param ** 2).sum().backward()
    optimizer.step()
print(json.dumps({
    "file": lightning_clara.__file__,
    "version": lightning_clara.__version__,
    "dist_version": importlib.metadata.version("lightning-clara"),
    "py_typed": importlib.resources.files("lightning_clara").joinpath("py.typed").is_file(),
    "callback": CLARACallback.__module__,
    "lr_factor": clara.lr_factor,
    "initial_factor": start,
}))
"""


def test_wheel_installs_and_works_in_a_fresh_venv(dists: Dists, fresh_venv: Path, tmp_path: Path) -> None:
    python = str(fresh_venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    env = _clean_env()
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], timeout=60, env=env)
    # torch: this environment's own files, seen through a .pth file (the venv's site-packages stays its own).
    torch_pin = _link_torch(tmp_path / "torch_only")
    (Path(site.stdout.strip()) / "_torch_under_test.pth").write_text(f"{tmp_path / 'torch_only'}\n")
    seen = _run([python, "-c", "import importlib.metadata as m; print(m.version('torch'))"], timeout=60, env=env)
    assert f"torch=={seen.stdout.strip()}" == torch_pin  # so pip keeps it and downloads no torch
    # The wheel with every other dependency (and torch's) resolved by pip from the configured indexes.
    _run(
        [python, "-m", "pip", "install", "--no-compile", "--prefer-binary", torch_pin, str(dists.wheel)],
        timeout=600,
        env=env,
    )
    _run([python, "-m", "pip", "check"], timeout=120, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    completed = _run([python, "-c", _SMOKE], timeout=300, env=env, cwd=work)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    installed = Path(result["file"]).resolve()
    assert installed.is_relative_to(fresh_venv.resolve()), f"imported {installed}, not the venv's copy"
    assert not installed.is_relative_to(ROOT)
    assert result["version"] == result["dist_version"] == VERSION
    assert result["py_typed"]
    assert result["callback"] == "lightning_clara.callback"
    assert result["lr_factor"] > result["initial_factor"]  # three agreeing SGD steps raise F
