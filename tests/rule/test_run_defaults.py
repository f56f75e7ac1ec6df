"""Defaults that depend on the run (``total_steps``), and one target whatever the optimizer and the safeguard.

A run of known length finds in its first 40 % (``hold_after``) with a damping ``d`` that keeps how far the
find can move log F (benchmarks/RESULTS.md, section 3). The target is the rule's default for every optimizer,
with or without the safeguard (the safeguarded Adam target 0.55 was retired when the default became 0.5,
RESULTS.md section 6).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_clara import CLARA, CLARACallback
from lightning_clara.options import RULE_DEFAULTS, SHORT_RUN_MIN_HOLD, run_length_defaults

DEFAULT = RULE_DEFAULTS["normalized"]


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]


class SubclassedAdam(torch.optim.Adam):
    pass


# ---------------------------------------------------------------------------------------------- target
@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: SubclassedAdam(p, lr=1e-3),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
    ],
)
@pytest.mark.parametrize("safeguard", [False, True])
def test_one_target_for_every_optimizer_with_or_without_the_safeguard(make: Any, safeguard: bool) -> None:
    assert CLARA(make(params()), safeguard=safeguard).target == DEFAULT["target"] == 0.5


def test_an_explicit_target_and_the_paper_rule_keep_their_target() -> None:
    assert CLARA(torch.optim.Adam(params()), safeguard=True, target=0.8).target == 0.8
    assert CLARA.paper(torch.optim.Adam(params()), safeguard=True).target == 1.0


# ---------------------------------------------------------------------------------------------- run length
@pytest.mark.parametrize(
    ("total_steps", "hold"),
    [(1, SHORT_RUN_MIN_HOLD), (600, 240), (1000, 400), (1500, 600), (3000, 600), (100_000, DEFAULT["hold_after"])],
)
def test_a_known_run_length_sets_the_hold_and_keeps_the_find_budget(total_steps: int, hold: int) -> None:
    clara = CLARA(torch.optim.SGD(params(), lr=0.1), total_steps=total_steps)
    assert (clara.total_steps, clara.hold_after) == (total_steps, hold)
    assert clara.d * clara.hold_after == pytest.approx(DEFAULT["d"] * DEFAULT["hold_after"], rel=1e-12)


def test_explicit_hold_or_d_win_over_the_run_length() -> None:
    sgd = torch.optim.SGD(params(), lr=0.1)
    clara = CLARA(sgd, total_steps=600, hold_after=450)
    assert (clara.hold_after, clara.d) == (450, DEFAULT["d"])  # d scales only with the derived hold
    clara.detach()
    clara = CLARA(sgd, total_steps=600, d=0.1)
    assert (clara.hold_after, clara.d) == (240, 0.1)
    clara.detach()
    clara = CLARA.paper(sgd, total_steps=600)
    assert (clara.hold_after, clara.d) == (RULE_DEFAULTS["paper"]["hold_after"], RULE_DEFAULTS["paper"]["d"])
    clara.detach()
    assert CLARA(sgd).hold_after == DEFAULT["hold_after"]  # unknown length: the defaults
    assert run_length_defaults(600, hold_unset=False, d_unset=True) == {}


def test_set_total_steps_later_equals_giving_it_at_construction() -> None:
    sgd = torch.optim.SGD(params(), lr=0.1)
    early = CLARA(sgd, total_steps=800)
    expected = (early.total_steps, early.d, early.hold_after)
    early.detach()
    late = CLARA(sgd)
    late.set_total_steps(800)
    assert (late.total_steps, late.d, late.hold_after) == expected
    late.set_total_steps(None)
    assert (late.total_steps, late.d, late.hold_after) == (None, DEFAULT["d"], DEFAULT["hold_after"])


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError)])
def test_invalid_total_steps_names_the_argument(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="total_steps"):
        CLARA(torch.optim.SGD(params(), lr=0.1), total_steps=value)
    with pytest.raises(error, match="total_steps"):
        CLARACallback(total_steps=value)


# ---------------------------------------------------------------------------------------------- callback
def adam(module: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=1e-3)


def test_the_callback_runs_clara_defaults_fed_every_loss_and_reads_the_run_length(make_module, trainer_kwargs) -> None:
    """One default in every API: CLARA's, with the loss brake fed every step's loss (no safeguard)."""
    callback = CLARACallback()
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            (controller,) = callback.controllers
            seen.update(target=controller.target, total=controller.total_steps, hold=controller.hold_after)
            seen.update(watched=controller.wants_loss, safeguard=controller.safeguard is not None)
            seen.update(losses=controller._losses.trend.count)

    trainer = pl.Trainer(callbacks=[callback, Probe()], **{**trainer_kwargs, "max_epochs": 3})
    trainer.fit(make_module(adam))
    assert seen == {
        "target": DEFAULT["target"],
        "total": 3 * 8,
        "hold": SHORT_RUN_MIN_HOLD,
        "watched": True,
        "safeguard": False,
        "losses": 3 * 8 - 1,  # before the last batch: every earlier step's loss reached the brake
    }
    assert trainer.estimated_stepping_batches == 24


def test_an_explicit_total_steps_is_not_replaced_by_the_estimate(make_module, trainer_kwargs) -> None:
    callback = CLARACallback(total_steps=5000, safeguard=False)
    holds: list[int] = []

    class Probe(pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            holds.append(callback.controllers[0].hold_after)

    pl.Trainer(callbacks=[callback, Probe()], **trainer_kwargs).fit(make_module(adam))
    assert holds == [DEFAULT["hold_after"]]


def test_under_ddp_the_safeguard_sees_the_loss_averaged_over_ranks() -> None:
    """Rank-local losses would make ranks raise different alarms (F and parameters would drift apart)."""
    callback = CLARACallback()
    model = torch.nn.Linear(2, 1)
    callback.controllers = [CLARA(torch.optim.Adam(model.parameters()), safeguard=True)]
    reduced: list[float] = []

    def reduce(value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "mean"
        reduced.append(float(value))
        return value.fill_(7.0)  # Lightning's DDP reduce all-reduces in place

    trainer = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(reduce=reduce),
        lightning_module=SimpleNamespace(automatic_optimization=True),
        accumulate_grad_batches=1,
    )
    model(torch.ones(1, 2)).sum().backward()
    callback.controllers[0].optimizer.step()  # a loss is taken for a step that ran
    outputs = {"loss": torch.tensor(3.0)}
    callback._feed_loss(trainer, outputs, [0])  # type: ignore[arg-type]
    safeguard = callback.controllers[0].safeguard
    assert safeguard is not None
    assert reduced == [3.0]
    assert (safeguard.count, safeguard.mean) == (1, 7.0)
    assert float(outputs["loss"]) == 3.0  # this rank's batch output keeps its own loss
