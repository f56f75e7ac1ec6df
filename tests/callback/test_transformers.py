"""The 🤗 Transformers Trainer integration: a tiny random-init GPT-2, CLARA on the optimizer it builds."""

from __future__ import annotations

import math
import warnings
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


def tiny_trainer(tmp_path: Path, args: dict[str, object] | None = None, **callbacks: object) -> transformers.Trainer:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    settings: dict[str, object] = {
        "output_dir": str(tmp_path),
        "max_steps": 30,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "weight_decay": 0.01,
        "logging_steps": 10,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    arguments = transformers.TrainingArguments(**(settings | (args or {})))  # type: ignore[arg-type]
    return transformers.Trainer(model=model, args=arguments, train_dataset=RandomTokens(), **callbacks)  # type: ignore[arg-type]


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
    assert not controller.anneal  # the Trainer's linear schedule decays by itself
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


def test_a_crash_in_train_detaches_clara(tmp_path: Path) -> None:
    """The Trainer has no exception hook: after a crash CLARA stayed attached, and the user's optimizer, stepped
    on by hand, ran at lr x F. add_clara's wrapper of train() detaches it."""
    trainer = tiny_trainer(tmp_path)
    callback = add_clara(trainer)
    calls = [0]

    def crash_on_the_sixth_batch(module: torch.nn.Module, args: object) -> None:
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("a bad batch")

    trainer.model.register_forward_pre_hook(crash_on_the_sixth_batch)
    with pytest.raises(RuntimeError, match="a bad batch"):
        trainer.train()
    assert callback.controller is not None
    assert callback.controller.num_adapted_steps > 0  # it had attached and adapted
    assert not callback.controller.attached
    assert not callback.controller.optimizer._optimizer_step_pre_hooks  # the optimizer accelerate wraps


def test_a_constant_schedule_gets_the_anneal(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, {"lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1})
    callback = add_clara(trainer, min_factor=1.0, max_factor=1.0, initial_factor=1.0, hold_after=4)
    trainer.train()
    controller = callback.controller
    assert controller is not None
    assert controller.anneal
    lrs = [entry["clara/lr-pg0"] for entry in trainer.state.log_history if "clara/lr-pg0" in entry]
    # F is pinned at 1: the lr used is the Trainer's 1e-3 until step 15 (max(4, 30 // 2)), then falls linearly
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * (30 - 29) / (30 - 15))


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


# ---------------------------------------------------------------------------------------------- checkpoints
SAVING = {"max_steps": 40, "save_strategy": "steps", "save_steps": 20, "logging_steps": 10}


def logged_log_factors(trainer: transformers.Trainer) -> dict[int, float]:
    return {entry["step"]: entry["clara/log_factor-pg0"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture
def saved_run(tmp_path: Path) -> tuple[Path, dict[int, float]]:
    """A 40-step run that checkpoints at steps 20 and 40, and its logged log F."""
    trainer = tiny_trainer(tmp_path, SAVING)
    add_clara(trainer)
    trainer.train()
    return tmp_path, logged_log_factors(trainer)


def test_each_checkpoint_holds_claras_state(saved_run: tuple[Path, dict[int, float]]) -> None:
    from lightning_clara.huggingface import STATE_FILE

    out, logged = saved_run
    state = torch.load(out / "checkpoint-20" / STATE_FILE, weights_only=True)
    assert state["num_adapted_steps"] == 19  # the warm-up's first step has lr 0: nothing moved, nothing adapted
    assert state["log_factors"][0] == pytest.approx(logged[20], rel=1e-12)


@pytest.mark.parametrize("attach", ["add_clara", "callbacks"])
def test_resume_continues_log_f_exactly(saved_run: tuple[Path, dict[int, float]], attach: str) -> None:
    out, logged = saved_run
    if attach == "add_clara":
        resumed = tiny_trainer(out, SAVING)
        add_clara(resumed)
    else:  # no access to train()'s argument: the checkpoint at the resumed step under output_dir
        resumed = tiny_trainer(out, SAVING, callbacks=[CLARATrainerCallback()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CLARATrainerCallback gets no loss")
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-20"))
    again = logged_log_factors(resumed)  # the resumed log history holds steps 10 and 20 too
    assert sorted(again) == [10, 20, 30, 40]
    if attach == "add_clara":  # the same losses reach the brake: the same trajectory
        assert [again[30], again[40]] == pytest.approx([logged[30], logged[40]], rel=1e-9)
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, CLARATrainerCallback))
    assert callback.controller is not None
    assert callback.controller.num_adapted_steps == 39  # counted on from the checkpoint's 19


def test_resume_from_a_checkpoint_without_clara_state_warns_once(saved_run: tuple[Path, dict[int, float]]) -> None:
    from lightning_clara.huggingface import STATE_FILE

    out, _ = saved_run
    (out / "checkpoint-20" / STATE_FILE).unlink()
    resumed = tiny_trainer(out, SAVING)
    add_clara(resumed)
    with pytest.warns(UserWarning, match="without CLARA state") as caught:
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-20"))
    assert len([w for w in caught if "CLARA state" in str(w.message)]) == 1
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, CLARATrainerCallback))
    assert callback.controller is not None
    # a fresh controller counts from 0: its find and anneal run over the 20 steps left, not the Trainer's 40
    assert callback.controller.total_steps == 20


def test_a_corrupted_clara_state_is_refused_on_resume(saved_run: tuple[Path, dict[int, float]]) -> None:
    from lightning_clara.huggingface import STATE_FILE

    out, _ = saved_run
    path = out / "checkpoint-20" / STATE_FILE
    state = torch.load(path, weights_only=True)
    state["log_factors"] = [math.nan]
    torch.save(state, path)
    resumed = tiny_trainer(out, SAVING)
    add_clara(resumed)
    with pytest.raises(ValueError, match=r"log_factors\[0\] must be a finite number"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-20"))


def test_the_safeguard_watches_the_trainers_loss(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    callback = add_clara(trainer, safeguard=True)
    trainer.train()
    assert callback.controller is not None
    safeguard = callback.controller.safeguard
    assert safeguard is not None
    assert safeguard.count + 10 * safeguard.alarms >= 20  # it saw the steps' losses


def test_a_nan_gradient_in_the_trainer_is_skipped(tmp_path: Path) -> None:
    """Two steps whose embedding gradient holds a NaN (the Trainer clips the norm first, which spreads it):
    both skipped, one warning, every parameter finite after the run."""
    trainer = tiny_trainer(tmp_path)
    callback = add_clara(trainer)
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] in (7, 15):
            grad = grad.clone()
            grad[0, 0] = math.nan
        return grad

    trainer.model.transformer.wte.weight.register_hook(poison)  # type: ignore[union-attr]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    controller = callback.controller
    assert controller is not None
    # the Trainer's default optimizer is fused AdamW: it skips on the device flag, a step that ran as a no-op
    fused = bool(getattr(controller.optimizer, "_step_supports_amp_scaling", False))
    assert (controller.num_skipped_updates, controller.num_optimizer_steps) == (2, 30 if fused else 28)
    steps = {float(state["step"]) for state in controller.optimizer.state.values()}
    assert steps == {28.0}  # the optimizer's own step counts: both skipped updates left them as they were
    assert sum("skipped an update" in str(w.message) for w in caught) == 1
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_resume_from_a_path_object_outside_the_output_dir(
    saved_run: tuple[Path, dict[int, float]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The Trainer takes a ``pathlib.Path``; so does CLARA's state (it used to fall back to ``output_dir``)."""
    import shutil

    out, logged = saved_run
    moved = tmp_path_factory.mktemp("moved") / "checkpoint"
    shutil.copytree(out / "checkpoint-20", moved)
    resumed = tiny_trainer(tmp_path_factory.mktemp("fresh"), SAVING)
    callback = add_clara(resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=moved)
    assert not [w for w in caught if "without CLARA state" in str(w.message)]
    assert callback.controller is not None
    assert callback.controller.num_adapted_steps == 39
    again = logged_log_factors(resumed)
    assert [again[30], again[40]] == pytest.approx([logged[30], logged[40]], rel=1e-9)


@pytest.mark.parametrize(
    ("arguments", "refused"),
    [
        ({"deepspeed": "ds_config.json"}, True),
        ({"deepspeed_plugin": object()}, True),  # `accelerate launch --use_deepspeed`: only the plugin is set
        ({"fsdp": ["full_shard"], "fsdp_config": {"version": 2}}, False),
        ({"fsdp": [], "fsdp_config": None}, False),
    ],
)
def test_shard_layouts_clara_cannot_read_are_refused_by_name(arguments: dict[str, object], refused: bool) -> None:
    """DeepSpeed's ZeRO partitions would give every rank its own F (or fail deep in the first step): refused when
    training begins; FSDP2's DTensors CLARA reads itself, FSDP1's flat parameters it refuses itself."""
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = SimpleNamespace(**{"deepspeed": None, "fsdp": [], "fsdp_config": None, **arguments})
    state = SimpleNamespace(max_steps=10, global_step=0)
    callback = CLARATrainerCallback(loss_brake=False)
    if refused:
        with pytest.raises(NotImplementedError, match="DeepSpeed"):
            callback.on_train_begin(args, state, None, optimizer=optimizer)  # type: ignore[arg-type]
    else:
        callback.on_train_begin(args, state, None, optimizer=optimizer)  # type: ignore[arg-type]
        assert callback.controller is not None


def test_the_loss_tap_leaves_the_trainer_its_own_loss() -> None:
    """Under several processes CLARA takes the mean over ranks once per optimizer step; the Trainer keeps this
    rank's own loss (its NaN filter and logs see what the rank computed)."""
    from types import SimpleNamespace

    own = torch.tensor(2.0)
    reduced: list[float] = []

    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        reduced.append(float(tensor))
        return tensor.fill_(5.0)  # in place, as a collective would

    trainer = SimpleNamespace(
        training_step=lambda *args, **kwargs: own,
        train=lambda *args, **kwargs: None,
        accelerator=SimpleNamespace(reduce=reduce),
        args=SimpleNamespace(world_size=2),
    )
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = CLARATrainerCallback()
    callback.tap(trainer)  # type: ignore[arg-type]
    args = SimpleNamespace(deepspeed=None, fsdp=[], fsdp_config=None, world_size=2)
    callback.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), None, optimizer=optimizer)  # type: ignore[arg-type]
    for _ in range(2):  # two micro-batches of one optimizer step
        assert trainer.training_step() is own
    assert float(own) == 2.0
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    callback.on_step_end(args, SimpleNamespace(), None)  # type: ignore[arg-type]
    assert reduced == [4.0]  # the step's two micro-batch losses, summed, then one mean over ranks
    assert callback.controller is not None
    assert callback.controller._losses.last_loss == 5.0
    assert float(own) == 2.0
    callback.on_train_end(args, SimpleNamespace(), None)  # type: ignore[arg-type]
    quiet = CLARATrainerCallback(loss_brake=False)  # nothing wants the loss: no collective for it
    quiet.tap(trainer)  # type: ignore[arg-type]
    quiet.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), None, optimizer=optimizer)  # type: ignore[arg-type]
    trainer.training_step()
    optimizer.step()
    quiet.on_step_end(args, SimpleNamespace(), None)  # type: ignore[arg-type]
    assert reduced == [4.0]
