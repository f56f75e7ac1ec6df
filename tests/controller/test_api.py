"""The written-out API (issue 22): ``CLARA``'s and ``CLARACallback``'s signatures and ``CLARA``'s typed
attributes stay equal to the option record, which remains the single source of defaults, types and docs."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from lightning_clara import CLARA, CLARACallback, CLARAOptions
from lightning_clara.callback import CALLBACK_OPTIONS
from lightning_clara.options import OPTION_NAMES, Settings, merged_options
from lightning_clara.resolved import ResolvedOptions, _Setting

FIELD_TYPES = typing.get_type_hints(CLARAOptions)
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CLARAOptions)}


def keyword_options(function: typing.Callable[..., object], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip
    ]


def test_clara_takes_every_option_with_its_default_and_type() -> None:
    parameters = keyword_options(CLARA.__init__)
    hints = typing.get_type_hints(CLARA.__init__)
    assert [p.name for p in parameters] == list(OPTION_NAMES)
    for p in parameters:
        assert p.default == FIELD_DEFAULTS[p.name], p.name
        assert hints[p.name] == FIELD_TYPES[p.name], p.name


def test_the_callback_takes_its_options_with_clara_defaults_and_types() -> None:
    parameters = keyword_options(CLARACallback.__init__, skip=("log", "summary", "prog_bar"))
    hints = typing.get_type_hints(CLARACallback.__init__)
    assert [p.name for p in parameters] == list(CALLBACK_OPTIONS)
    assert set(OPTION_NAMES) - set(CALLBACK_OPTIONS) == {"variant", "reference", "sharding"}
    for p in parameters:
        assert p.default == FIELD_DEFAULTS[p.name], p.name
        want = bool if p.name == "safeguard" else FIELD_TYPES[p.name]  # the callback feeds its own loss
        assert hints[p.name] == want, p.name


def test_every_resolved_option_is_a_typed_attribute() -> None:
    hints = typing.get_type_hints(ResolvedOptions)
    settings = typing.get_type_hints(Settings)
    names = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(n for n in hints if n not in ("settings", "options")) == sorted(names)
    for name in names:
        assert hints[name] == _Setting[settings[name]], name
    clara = CLARA(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1), c=0.05, max_lr=0.5)
    for name in names:
        assert getattr(clara, name) is getattr(clara.settings, name), name
    assert (clara.c, clara.max_lr, clara.sample) == (0.05, 0.5, 4096)


def test_keywords_replace_the_given_options_fields_unless_left_at_their_defaults() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    base = CLARAOptions(scope="param_group", c=0.1, sample=64)
    clara = CLARA(torch.optim.SGD(params, lr=0.1), base, c=0.05, sample=None)
    assert (clara.scope, clara.c, clara.sample) == ("param_group", 0.05, None)
    clara.detach()
    kept = CLARA(torch.optim.SGD(params, lr=0.1), base, scope="optimizer")  # at its default: the options' value
    assert kept.scope == "param_group"


def test_resolved_options_are_read_only() -> None:
    clara = CLARA(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1))
    with pytest.raises(AttributeError, match="read-only"):
        clara.c = 0.5  # type: ignore[misc]
    assert clara.c == clara.settings.c


def test_given_overrides_replace_every_field_they_name_and_unknown_names_are_refused() -> None:
    """The Transformers callback's ``**overrides`` hold only what the caller gave: each replaces its field,
    a default value included; a name that is no option is a TypeError naming it."""
    assert merged_options(CLARAOptions.paper(), {"rule": "normalized"}, signature=False).rule == "normalized"
    with pytest.raises(TypeError, match="bogus"):
        merged_options(CLARAOptions(), {"bogus": 1}, signature=False)


def test_numpy_integers_are_integers_for_the_integer_options() -> None:
    """NumPy floats were accepted for the float options and NumPy integers refused for the integer ones."""
    import numpy as np

    for name in ("total_steps", "sample", "hold_after", "fast_start", "consistency_check_every"):
        resolved = getattr(CLARAOptions(**{name: np.int64(300)}).resolve(), name)
        assert resolved == 300
        assert type(resolved) is int, name
    with pytest.raises(TypeError, match="total_steps"):
        CLARAOptions(total_steps=np.bool_(True))
