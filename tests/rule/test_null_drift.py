"""The normalized rule's range at attach: its null-model rise stays small at the defaults, warns where ``c``
is so large that a random walk would raise F at a large share of its full rate, and a target the steps can
never reach is refused (the rule would sit still, silently)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_clara import CLARA
from lightning_clara.admission import NULL_DRIFT_WARNING


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params),
    "rmsprop": lambda params: torch.optim.RMSprop(params),
}


def _drift_warnings(**options: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CLARA(OPTIMIZERS[str(options.pop("optimizer"))](_model().parameters()), **options).detach()
    return [str(w.message) for w in caught if "r_max" in str(w.message)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("safeguard", [False, True])
def test_the_defaults_do_not_drift_on_noise(name: str, safeguard: bool) -> None:
    assert _drift_warnings(optimizer=name, safeguard=safeguard) == []


def test_a_large_c_with_the_normalized_rule_warns_with_the_rise_on_noise() -> None:
    (message,) = _drift_warnings(optimizer="adam", c=0.2)  # the default target
    rise = float(message.split("raises F at ")[1].split("%")[0]) / 100
    assert NULL_DRIFT_WARNING < rise < 1.0
    assert _drift_warnings(optimizer="adam", c=0.2, rule="paper") == []  # the paper's rule: flat at target 1
    assert _drift_warnings(optimizer="sgd", c=0.2) == []  # plain SGD keeps a wide range (r_max 9)


def test_a_target_the_steps_cannot_reach_is_refused() -> None:
    with pytest.raises(ValueError, match="could never rise"):
        CLARA(OPTIMIZERS["sgd-momentum"](_model().parameters()), c=0.9, target=1.5)
    with pytest.raises(ValueError, match="could never rise"):  # the paper's rule: F could only fall
        CLARA(OPTIMIZERS["sgd-momentum"](_model().parameters()), c=0.9, target=1.5, rule="paper")
    with pytest.raises(ValueError, match="could never rise"):  # c = 1: the path is the unit step, r = 1 always
        CLARA.paper(OPTIMIZERS["sgd"](_model().parameters()), c=1.0)
    CLARA.paper(OPTIMIZERS["sgd-momentum"](_model().parameters())).detach()  # the paper's own settings


def test_per_group_scope_names_the_group() -> None:
    model = _model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "momentum": 0.9}, {"params": model[1].parameters()}], lr=0.1
    )
    with pytest.warns(UserWarning, match=r"r_max = .*\(param group 0\)"):
        CLARA(optimizer, c=0.3, scope="param_group").detach()


def test_a_high_momentum_warns_at_the_default_c_and_says_what_helps() -> None:
    """Momentum 0.99 correlates steps over ~100 steps, longer than the default path's memory (50): r_max 1.5."""
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.99)
    with pytest.warns(UserWarning, match=r"set target=1 \(no rise on noise\), use rule='paper', or lower c"):
        CLARA(optimizer).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CLARA(optimizer, target=1.0).detach()  # no rise on noise (a longer memory, c = 0.002, also: 100 s to build)
