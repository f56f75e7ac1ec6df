"""The 🤗 Transformers Trainer integration: a tiny random-init GPT-2, CLARA on the optimizer it builds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the test extra: never skipped in CI

from lightning_clara import CLARA  # noqa: E402
from lightning_clara.huggingface import CLARATrainerCallback, add_clara  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    """Token sequences with a learnable pattern (each token repeats the one two steps back)."""

    def __init__(self, count: int = 64, length: int = 16, vocab: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (count, 2), generator=generator)
        self.ids = start.repeat(1, length // 2)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_trainer(tmp_path: Path, **callbacks: object) -> transformers.Trainer:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=5,
        weight_decay=0.01,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), **callbacks)  # type: ignore[arg-type]


def test_add_clara_adapts_the_trainers_optimizer_and_logs_through_it(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    callback = add_clara(trainer)
    assert trainer.callback_handler.callbacks[0] is callback  # ahead of the reporting integrations
    trainer.train()
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(training_logs) == 3
    for entry in training_logs:
        # the Trainer splits decay / no-decay groups: one value per group
        assert {"clara/lr-pg0", "clara/lr-pg1", "clara/log_factor-pg0", "clara/ratio-pg0"} <= entry.keys()
    controller = callback.controller
    assert controller is not None
    assert controller.num_adapted_steps == 29  # the warm-up's first step has lr 0: nothing moved
    assert (controller.total_steps, controller.hold_after) == (30, 240)  # the Trainer's max_steps
    assert not controller.attached  # detached at train end: the optimizer's lr is its scheduler's again
    # F moved from its initial value, and the lr used is the scheduled lr times F
    last = training_logs[-1]
    assert last["clara/log_factor-pg0"] != pytest.approx(math.log(0.1))
    assert last["clara/lr-pg0"] == pytest.approx(
        last["learning_rate"] * math.exp(last["clara/log_factor-pg0"]), rel=0.2
    )


def test_add_clara_feeds_the_loss_brake_every_steps_loss(tmp_path: Path) -> None:
    """The tapped training_step hands CLARA each optimizer step's loss, as the Lightning callback does."""
    trainer = tiny_trainer(tmp_path)
    callback = add_clara(trainer)
    seen: list[float] = []
    observe = CLARA.observe_loss

    def recording(self: CLARA, loss: object) -> bool:
        seen.append(float(loss))  # type: ignore[arg-type]
        return observe(self, loss)  # type: ignore[arg-type]

    CLARA.observe_loss = recording  # type: ignore[method-assign]
    try:
        trainer.train()
    finally:
        CLARA.observe_loss = observe  # type: ignore[method-assign]
    assert callback.controller is not None
    assert callback.controller.wants_loss
    assert len(seen) == 30  # one loss per optimizer step
    assert callback.controller._losses.trend.count == 30
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(seen[:10]) / 10 == pytest.approx(logged[0], rel=1e-4)  # the Trainer's own mean of those losses


def test_the_callback_passed_to_the_trainer_also_adapts(tmp_path: Path) -> None:
    callback = CLARATrainerCallback(c=0.1)
    trainer = tiny_trainer(tmp_path, callbacks=[callback])
    with pytest.warns(UserWarning, match="add_clara"):
        trainer.train()
    assert callback.controller is not None
    assert callback.controller.num_adapted_steps == 29
    assert callback.controller.c == 0.1


def test_bad_options_fail_when_the_callback_is_made() -> None:
    with pytest.raises(ValueError, match="c"):
        CLARATrainerCallback(c=2.0)


def test_the_safeguard_is_refused_as_the_trainer_gives_no_per_step_loss() -> None:
    with pytest.raises(ValueError, match="safeguard"):
        CLARATrainerCallback(safeguard=True)
