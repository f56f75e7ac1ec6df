"""Shared test set-up: ``tests/`` on ``sys.path`` (for ``reference_loop``) and opt-in Lightning fixtures.

Nothing here is autouse, and Lightning is imported only when a Lightning fixture is requested:
test files that just need ``from reference_loop import ...`` pay nothing for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ConfigureFn, make_regression_data, tiny_module_class
from torch.utils.data import TensorDataset

# The suite's tensors are tiny: with several threads, thread wake-ups cost more than the work,
# badly so when the two CI cores are shared. One thread makes the timings stable.
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def regression_data() -> TensorDataset:
    """64 float64 samples with 4 features: 8 batches of 8."""
    return make_regression_data()


@pytest.fixture
def make_module(regression_data: TensorDataset) -> Callable[..., Any]:
    """Factory ``make_module(configure, **kwargs)``: a TinyRegressionModule on ``regression_data`` by default."""
    cls = tiny_module_class()

    def factory(configure: ConfigureFn, **kwargs: Any) -> Any:
        dataset = kwargs.pop("dataset", regression_data)
        return cls(dataset, configure, **kwargs)

    return factory


@pytest.fixture
def trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """Trainer arguments for fast, quiet CPU runs (override per test)."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }


#: Test modules that share the session's example runs (``run_in_clone``): one xdist worker runs them all,
#: so each example runs once, as in a serial session.
SHARED_EXAMPLE_RUNS = frozenset({"test_examples.py", "test_examples_clean.py", "test_examples_more.py", "test_ddp.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's ``-n 2`` (README's test command): whole modules per worker, as ``--dist loadscope`` does,
    so that a module-scoped fixture (a DDP driver, a wheel build) runs once; the modules that share the example
    runs count as one. Another ``--dist`` given on the command line keeps its own scheduler."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "examples" if Path(module).name in SHARED_EXAMPLE_RUNS else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def run_in_clone(tmp_path_factory: pytest.TempPathFactory) -> Any:  # example_runs.ExampleRunner
    """``run_in_clone(script)``: the example's quick run in a clone of this checkout, once per session
    (``example_runs.ExampleRunner``)."""
    from example_runs import ExampleRunner, make_clone

    base = tmp_path_factory.mktemp("examples")
    (base / "out").mkdir()
    return ExampleRunner(make_clone(base / "clone"), base / "out")
