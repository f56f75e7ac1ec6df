"""Every entry of a CLARA state is checked before anything changes (issue 21): a bad checkpoint is a
``ValueError`` that names the field and what it must be, and the controller stays as it was."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_clara import CLARA, CLARACallback


def trained(scope: str = "optimizer", safeguard: bool = False, **options: Any) -> tuple[nn.Module, CLARA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}], lr=0.1
    )
    clara = CLARA(optimizer, scope=scope, safeguard=safeguard, **options)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        clara.observe_loss(loss)
    return model, clara


def fingerprint(clara: CLARA) -> tuple[Any, ...]:
    state = clara.state_dict()
    paths = [None if e is None else e["path"].clone() for row in state["tensors"] for e in row]
    return tuple(clara.log_factors), state["num_adapted_steps"], paths


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    paths = zip(a[2], b[2], strict=True)
    return a[:2] == b[:2] and all(
        x is y is None or (x is not None and y is not None and torch.equal(x, y)) for x, y in paths
    )


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        state[key] = value

    return change


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


def first_path(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(state: dict[str, Any]) -> None:
        change(state["tensors"][0][0])

    return apply


def random_path(entry: dict[str, Any]) -> None:
    entry["path"] = torch.randn_like(entry["path"]) * 3  # right-sized, but no path of unit steps is that long


def nan_path(entry: dict[str, Any]) -> None:
    entry["path"] = entry["path"].clone()
    entry["path"][0] = math.nan


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "missing count": (drop("num_adapted_steps"), "lacks ['num_adapted_steps']"),
    "missing tensors": (drop("tensors"), "lacks ['tensors']"),
    "missing format": (drop("format"), "format must be one of"),
    "config not a dict": (set_key("config", None), "config must be a dict with a 'scope'"),
    "log_factors NaN": (set_key("log_factors", [math.nan]), "log_factors[0] must be a finite number"),
    "log_factors inf": (set_key("log_factors", [math.inf]), "log_factors[0] must be a finite number"),
    "log_factors 1e6": (
        set_key("log_factors", [1e6]),
        "log_factors[0] must be a finite number in [-709",
    ),
    "log_factors a string": (set_key("log_factors", ["0.1"]), "log_factors[0] must be a finite number"),
    "log_factors too long": (set_key("log_factors", [0.0, 0.0]), "log_factors must be a list of 1 value(s)"),
    "log_factors not a list": (set_key("log_factors", 0.0), "log_factors must be a list of 1 value(s)"),
    "ratios wrong length": (set_key("ratios", []), "ratios must be a list of 1 value(s)"),
    "ratio negative": (set_key("ratios", [-1.0]), "ratios[0] must be a finite number in [0.0"),
    "adapted steps negative": (set_key("num_adapted_steps", -3), "num_adapted_steps must be an int in [0"),
    "adapted steps a float": (set_key("num_adapted_steps", 2.5), "num_adapted_steps must be an int"),
    "skipped steps a bool": (set_key("num_skipped_steps", True), "num_skipped_steps must be an int"),
    "tensors a row short": (lambda s: s["tensors"][0].pop(), "tensors must hold one list per param group"),
    "tensors a group short": (lambda s: s["tensors"].pop(), "tensors must hold one list per param group"),
    "path random": (first_path(random_path), r"tensors[0][0]['path'] has norm"),
    "path NaN": (first_path(nan_path), r"tensors[0][0]['path'] must be finite"),
    "path not a tensor": (first_path(lambda e: e.update(path=[0.0])), "tensors[0][0] must be None or a dict"),
    "path count negative": (first_path(lambda e: e.update(count=-1)), "tensors[0][0]['count'] must be an int"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_state_is_refused_and_changes_nothing(case: str) -> None:
    _, source = trained()
    state = copy.deepcopy(source.state_dict())
    change, message = CASES[case]
    change(state)
    _, target = trained()
    before = fingerprint(target)
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(state)
    assert same(fingerprint(target), before)


@pytest.mark.parametrize("state", [None, [], "state"])
def test_a_state_that_is_not_a_dict_is_refused(state: Any) -> None:
    _, clara = trained()
    with pytest.raises(ValueError, match="CLARA state must be a dict"):
        clara.load_state_dict(state)  # type: ignore[arg-type]


def test_per_group_factors_are_checked_per_scope() -> None:
    _, source = trained(scope="param_group")
    state = source.state_dict()
    state["log_factors"] = [0.0, math.nan]
    _, target = trained(scope="param_group")
    with pytest.raises(ValueError, match=re.escape("log_factors[1] must be a finite number")):
        target.load_state_dict(state)


@pytest.mark.parametrize(("key", "value"), [("count", None), ("variance", -1.0), ("mean", math.nan), ("alarms", 1.5)])
def test_the_safeguard_state_is_checked(key: str, value: Any) -> None:
    _, source = trained(safeguard=True)
    state = source.state_dict()
    if value is None:
        state["safeguard"].pop(key)
    else:
        state["safeguard"][key] = value
    _, target = trained(safeguard=True)
    with pytest.raises(ValueError, match=re.escape(f"safeguard[{key!r}] must be")):
        target.load_state_dict(state)


@pytest.mark.parametrize(
    "options",
    [{}, {"sample": None}, {"scope": "param_group"}, {"safeguard": True}, {"sample": None, "safeguard": True}],
    ids=["default", "full-paths", "param-group", "safeguard", "full-paths-safeguard"],
)
def test_a_good_state_still_loads_exactly(options: dict[str, Any]) -> None:
    """What the library writes passes the checks, for every way of keeping paths and scopes."""
    _, source = trained(**options)
    _, target = trained(**options)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert same(fingerprint(target), fingerprint(source))


def test_a_huge_loss_in_the_safeguard_still_saves_and_loads() -> None:
    """A finite loss of 1e200 overflows the detector's variance to inf: a state the library writes, so it loads."""
    _, source = trained(safeguard=True)
    assert source.safeguard is not None
    source.safeguard.variance = math.inf
    state = source.state_dict()
    _, target = trained(safeguard=True)
    target.load_state_dict(state)
    assert target.safeguard is not None
    assert target.safeguard.variance == math.inf


@pytest.mark.parametrize("state", [{"controllers": None}, {"controllers": [None]}, {"names": []}])
def test_the_callbacks_state_is_checked(state: dict[str, Any]) -> None:
    _, clara = trained()
    callback = CLARACallback()
    callback.controllers = [clara]
    with pytest.raises(ValueError, match="CLARA"):
        callback.load_state_dict(state)


def test_a_state_saved_before_clara_attached_is_skipped_when_restored_after_setup() -> None:
    """A fit without optimizers saves ``{"controllers": []}``; a strategy restoring after on_fit_start skips it."""
    _, clara = trained()
    callback = CLARACallback()
    callback.controllers = [clara]  # attached, before on_train_start: where ModelParallelStrategy restores
    callback.load_state_dict({"controllers": [], "names": []})
    (state,) = callback.state_dict()["controllers"]  # nothing pending: the controller's own state
    assert state["num_adapted_steps"] == clara.num_adapted_steps > 0
