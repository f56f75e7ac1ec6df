"""``examples/lightning_cli.py`` with ``examples/config.yaml``: CLARACallback configured through LightningCLI.

One quick end-to-end run in a subprocess (as a user runs it), and in-process parses (no fit)
that check the instantiated callback and the errors for invalid values.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from lightning_clara.options import RULE_DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_cli.py"
CONFIG = ROOT / "examples" / "config.yaml"
TRAIN_BATCHES = 45  # 1,437 training samples (80 % of 1,797) in batches of 32

pytest.importorskip("sklearn", reason="the CLI example needs scikit-learn (in the [examples] extras)")
pytest.importorskip("tensorboard", reason="the example config logs with TensorBoard (in the [examples] extras)")
if not importlib.util.find_spec("docstring_parser") or not importlib.util.find_spec("typeshed_client"):
    pytest.skip(
        "LightningCLI needs jsonargparse[signatures]: pip install 'jsonargparse[signatures]'", allow_module_level=True
    )

pytestmark = [
    # Lightning 2.6's own use of jsonargparse and torch's pytree, not this project's
    pytest.mark.filterwarnings(r"ignore:(?s).*deprecated in v4\.49\.0:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:(?s).*By default only one JsonargparseDeprecationWarning:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*is deprecated, use `isinstance\\(treespec, TreeSpec\\)"),
]


def clara_args() -> dict[str, Any]:
    """The CLARACallback init_args of the shipped config."""
    config = yaml.safe_load(CONFIG.read_text())
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_clara.CLARACallback"]
    return entry["init_args"]


def quick_overrides(root: Path) -> list[str]:
    """Two epochs, output under ``root``."""
    return [
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example as a module; ``sys.argv`` as if it were run alone (LightningCLI warns about pytest's)."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path_factory.mktemp("cli")
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "COLUMNS": "120"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "fit", "--config", str(CONFIG), *quick_overrides(root)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return completed, root


def test_config_configures_clara() -> None:
    args = clara_args()
    # the values the checks below rely on; change them together
    assert args["d"] == 0.05
    assert args["safeguard"] is True
    assert args["summary"] is True


def test_quick_fit_runs_and_prints_the_summary(quick_fit: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, root = quick_fit
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert out.count("CLARA: learning rate used over the fit") == 1
    assert "safeguard alarms: SGD" in out  # the count exists only with safeguard=True, set in the YAML
    row = next(line for line in out.splitlines() if line.strip().startswith("SGD"))
    cells = [cell.strip() for cell in row.split("│")]
    start, end = (float(x) for x in cells[1].split("→"))
    # model.lr from the YAML times F at the first step, the default initial_factor
    assert start == pytest.approx(1e-4 * RULE_DEFAULTS["normalized"]["initial_factor"])
    assert end > start  # CLARA raised the bad lr
    assert int(cells[5]) == 2 * TRAIN_BATCHES  # adapted steps in two epochs
    # the config the run used, saved next to its logs, holds the YAML's CLARA options
    (saved,) = root.rglob("config.yaml")
    config = yaml.safe_load(saved.read_text())
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_clara.CLARACallback"]
    for key, value in clara_args().items():
        assert entry["init_args"][key] == value, key
    assert list(root.rglob("events.out.tfevents.*")), "the TensorBoard logger wrote nothing"


def test_instantiated_callback_has_the_yaml_values(example: ModuleType, tmp_path: Path) -> None:
    from lightning_clara import CLARACallback

    cli = example.main(["--config", str(CONFIG), *quick_overrides(tmp_path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, CLARACallback)]
    args = clara_args()
    assert (callback.summary, callback.prog_bar) == (args["summary"], args["prog_bar"])
    for key in ("c", "d", "rule", "scope", "sample", "max_lr", "safeguard"):
        assert getattr(callback.options, key) == args[key], key
    assert callback.options.min_lr is None  # not in the YAML: the default


def test_print_config_shows_every_clara_option(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        example.main(["fit", "--config", str(CONFIG), *quick_overrides(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    (entry,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "lightning_clara.CLARACallback"]
    init_args = entry["init_args"]
    assert init_args["d"] == 0.05
    assert init_args["min_lr"] is None  # defaults are filled in
    assert {"c", "d", "rule", "scope", "sample", "summary", "prog_bar", "consistency_check_every"} <= set(init_args)


def test_callback_help_shows_the_docstring(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.main(["fit", "--trainer.callbacks.help", "lightning_clara.CLARACallback"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.callbacks.prog_bar {true,false}" in text
    assert "--trainer.callbacks.rule {paper,normalized}" in text
    assert "show the lr used in the progress bar" in text  # from the docstring's Args
    assert "path memory in [0.001, 1]" in text  # an option's doc, declared once in OPTION_DOCS
    assert "type: float | null, default: null" in text
    # plain text, not raw Sphinx markup (issue 12, point 13)
    assert "``" not in text
    assert ":class:" not in text
    assert ":meth:" not in text


def option_texts() -> dict[str, str]:
    """Each CLARACallback argument's documentation: the docstring's own entries, the options' declared text."""
    import docstring_parser

    from lightning_clara import CLARACallback
    from lightning_clara.callback import _CALLBACK_DOCS, CALLBACK_OPTIONS
    from lightning_clara.options import OPTION_DOCS

    own = {p.arg_name: p.description for p in docstring_parser.parse(CLARACallback.__doc__).params}
    texts = {name: own[name] for name in ("options", "log", "summary", "prog_bar")}
    texts |= {name: _CALLBACK_DOCS.get(name, OPTION_DOCS[name]) for name in CALLBACK_OPTIONS}
    return {name: " ".join((text or "").split()) for name, text in texts.items()}


def test_each_option_help_sits_under_its_option(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI's help: every option's text below that option and no other (issue 23: c's text once ended
    prog_bar's, and --trainer.callbacks.c had none)."""
    with pytest.raises(SystemExit):
        example.main(["fit", "--trainer.callbacks.help", "lightning_clara.CLARACallback"])
    out = capsys.readouterr().out
    blocks = {
        match.group(1): " ".join(match.group(2).split())
        for match in re.finditer(r"^  --trainer\.callbacks\.(\w+)[^\n]*\n((?:(?!  --)[^\n]*\n?)*)", out, re.M)
    }
    texts = option_texts()
    assert set(texts) == set(blocks) - {"help"}
    for name, text in texts.items():
        opening = " ".join(text.split()[:4])  # argparse re-wraps the rest
        owners = [option for option, block in blocks.items() if opening in block]
        assert owners == [name], f"{name}'s help ({opening!r}) is under {owners}"


def test_help_shows_every_option_as_its_own_entry() -> None:
    """help(): each option an ``Args`` entry at the entries' indentation, in CLARA, CLARACallback and CLARAOptions."""
    import inspect

    from lightning_clara import CLARA, CLARACallback, CLARAOptions
    from lightning_clara.callback import CALLBACK_OPTIONS
    from lightning_clara.options import OPTION_NAMES

    for cls in (CLARA, CLARACallback, CLARAOptions):
        lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
        args = lines.index("Args:")
        entries = [line for line in lines[args + 1 :] if re.match(r"^    \w+: ", line)]
        names = [line.split(":")[0].strip() for line in entries]
        assert set(CALLBACK_OPTIONS if cls is CLARACallback else OPTION_NAMES) <= set(names), cls.__name__
        assert len(names) == len(set(names)), cls.__name__
        for line in lines[args + 1 :]:  # an entry or its continuation, nothing deeper or shallower
            assert not line or line.startswith("    "), (cls.__name__, line)
            assert not line.startswith("             "), (cls.__name__, line)


def write_config(tmp_path: Path, **changes: Any) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    for entry in config["trainer"]["callbacks"]:
        if entry["class_path"] == "lightning_clara.CLARACallback":
            entry["init_args"].update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_out_of_range_value_names_the_argument(example: ModuleType, tmp_path: Path) -> None:
    config = write_config(tmp_path, c=2.0)
    with pytest.raises(ValueError, match=re.escape("c must be in [0.001, 1.0], got 2.0")):
        example.main(["--config", str(config), *quick_overrides(tmp_path)], run=False)


def run_cli(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "fit", "--config", str(config), *quick_overrides(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_out_of_range_value_fails_the_command(tmp_path: Path) -> None:
    """What the README says: exit 1 before training, a traceback ending in the union report, our message first."""
    completed = run_cli(write_config(tmp_path, d=-1.0), tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.startswith("Traceback")
    tail = completed.stderr[
        completed.stderr.rindex("ValueError: Does not validate against any of the Union subtypes") :
    ]
    errors = tail[tail.index("Errors:") :].splitlines()
    assert errors[1].strip() == "- d must be in (0.0, inf), got -1.0"
    assert "CLARA: learning rate used" not in completed.stdout


def test_wrong_choice_is_a_parse_error_naming_the_key(tmp_path: Path) -> None:
    """What the README says: exit 2 at parse time, the usage, the union report naming the key and the value."""
    completed = run_cli(write_config(tmp_path, rule="bogus"), tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.startswith("usage:")
    assert 'error: Parser key "trainer.callbacks":' in completed.stderr
    report = completed.stderr[completed.stderr.index('Parser key "rule":') :].splitlines()
    assert report[1].strip() == "Expected a typing.Literal['paper', 'normalized']. Got value: bogus"
    assert "Traceback" not in completed.stderr
