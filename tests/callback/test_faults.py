"""Fault injection (issue 21): exceptions inside the step, steps GradScaler skips, NaN storms, a fit
killed with SIGKILL mid-epoch; the corrupted-state cases are in ``tests/controller/test_state_checks.py``.

What must hold: the learning rate a user (or a scheduler) sees outside a step is always the scheduled
one, a step that never ran is never judged, and one poisoned state raises one alarm, not one per call.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_clara import CLARA

LR = 0.05
ROOT = Path(__file__).resolve().parents[2]


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), torch.randn(32, 4), torch.randn(32, 1)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def test_an_exception_inside_the_step_leaves_the_scheduled_lr() -> None:
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    clara = CLARA(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    assert clara.lr_used[0] != LR  # lr used = LR x F

    def failing_closure() -> torch.Tensor:  # runs inside step(), after CLARA's pre-hook set lr x F
        raise MemoryError("injected: out of memory in the closure's forward")

    with pytest.raises(MemoryError):
        optimizer.step(failing_closure)
    assert optimizer.param_groups[0]["lr"] == LR  # not LR x F
    optimizer.step()  # and the run goes on
    assert optimizer.param_groups[0]["lr"] == LR
    assert clara.num_optimizer_steps == 4


class LoggingAdam(torch.optim.Adam):
    """A subclass whose step calls super().step(), as custom optimizers do."""

    calls = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        self.calls += 1
        return super().step(closure)


def test_a_subclass_calling_super_step_runs_claras_hooks_once_per_step() -> None:
    """Once a plain Adam exists, torch has wrapped Adam.step too, so its hooks run in both steps; CLARA
    must still see one step per call (before: the second post-hook raised, 'a step without the pre-step
    gather')."""
    torch.optim.Adam(nn.Linear(2, 1).parameters())  # wraps Adam.step with torch's hook runner
    model, x, y = model_and_data()
    optimizer = LoggingAdam(model.parameters(), lr=1e-3)
    clara = CLARA(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    assert optimizer.calls == clara.num_optimizer_steps == 5
    assert clara.num_adapted_steps == 5
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_scheduler_made_after_clara_wraps_the_step_again_and_detach_unwraps() -> None:
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clara = CLARA(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)  # wraps optimizer.step too

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of(model, x, y).backward()
            optimizer.step()
            scheduler.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        train(4)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 4)
        assert clara.num_optimizer_steps == 4
        clara.detach()  # the scheduler's wrapper sits on top of CLARA's: it stays, and the run goes on
        train(2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 8)
    assert clara.num_optimizer_steps == 4  # detached: no more steps seen
    bare = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=LR)
    CLARA(bare).detach()
    assert "step" not in bare.__dict__  # nothing of CLARA is left on an optimizer nobody else wrapped


def test_a_step_that_raises_outside_the_wrapper_does_not_stop_the_adaptation() -> None:
    """accelerate swaps in the step it saved before CLARA attached, so CLARA's wrapper can be bypassed: a
    step that raises there leaves its lr swapped and no post-hook; the next step closes it and adapts on."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    clara = CLARA(optimizer)

    def failing_closure() -> torch.Tensor:
        raise MemoryError("injected")

    with pytest.raises(MemoryError):
        type(optimizer).step(optimizer, failing_closure)  # the class's step: torch's hooks, not CLARA's wrapper
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    assert optimizer.param_groups[0]["lr"] == LR
    assert clara.num_adapted_steps == 3
    assert clara.lr_used[0] != LR


def test_a_step_grad_scaler_skips_with_an_inf_loss_is_not_judged() -> None:
    """GradScaler skips optimizer.step() for inf gradients; the inf loss of that step must neither halve F
    nor undo the good steps before it (issue 21, item 6)."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clara = CLARA(optimizer, safeguard=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        clara.observe_loss(loss)
    weights = [p.detach().clone() for p in model.parameters()]
    log_factor = clara.log_factors[0]
    optimizer.zero_grad()
    scaler.scale(loss_of(model, x, y) * math.inf).backward()  # inf loss, inf gradients
    scaler.step(optimizer)  # skipped
    scaler.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clara.observe_loss(math.inf) is False
    assert clara.log_factors[0] == log_factor
    assert clara.num_safeguard_alarms == 0
    assert all(torch.equal(a, p.detach()) for a, p in zip(weights, model.parameters(), strict=True))


def test_a_nan_storm_without_steps_raises_one_alarm() -> None:
    """The same poisoned state reported again and again (a loop that keeps evaluating a NaN loss without
    stepping) is one alarm: F is halved once, one warning."""
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clara = CLARA(optimizer, safeguard=True)
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        clara.observe_loss(loss)
    optimizer.zero_grad()
    loss_of(model, x, y).backward()
    optimizer.step()
    log_factor = clara.log_factors[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(50):
            clara.observe_loss(math.nan)
    assert len([w for w in caught if "safeguard" in str(w.message)]) == 1
    assert clara.num_safeguard_alarms == 1
    assert clara.log_factors[0] == pytest.approx(log_factor - math.log(2.0), abs=1e-12)


# ---------------------------------------------------------------------------------------------- kill -9
CHILD = """
import json, os, signal, sys
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_clara import CLARACallback

mode, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = torch.randn(64, 4, dtype=torch.float64)
y = x @ torch.randn(4, 1, dtype=torch.float64)


class Batches:  # ordered batches whose position survives a checkpoint (a stateful iterable)
    def __init__(self):
        self.batches, self.position, self.start = list(zip(x.split(8), y.split(8))), 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for index in range(start, len(self.batches)):
            self.position = index + 1
            yield self.batches[index]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.start = state["position"]


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class KillAt(Callback):  # SIGKILL mid-epoch, after the step-10 checkpoint was written
    def on_train_batch_end(self, trainer, *args):
        if mode == "killed" and trainer.global_step == 12:
            os.kill(os.getpid(), signal.SIGKILL)


clara = CLARACallback(summary=False)
checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=5, save_top_k=-1)
trainer = Trainer(max_epochs=2, callbacks=[clara, checkpoints, KillAt()], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1)
ckpt = os.path.join(out, "epoch=1-step=10.ckpt") if mode == "resume" else None
model = Model()
trainer.fit(model, train_dataloaders=Batches(), ckpt_path=ckpt)
(controller,) = clara.controllers
state = controller.state_dict()
result = {"log_factors": state["log_factors"], "adapted": state["num_adapted_steps"],
          "params": [p.detach().flatten().tolist() for p in model.parameters()]}
with open(os.path.join(out, mode + ".json"), "w") as file:
    json.dump(result, file)
"""


def run_child(mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    script = out / "child.py"
    script.write_text(CHILD)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(script), mode, str(out)],
        env={**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_fit_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    """kill -9 at step 12 (mid-epoch 2, the last checkpoint at step 10); resuming from that checkpoint ends
    with the uninterrupted run's log F, step count and parameters."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir()
    broken.mkdir()
    done = run_child("full", full)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_child("killed", broken)
    assert killed.returncode == -signal.SIGKILL
    assert (broken / "epoch=1-step=10.ckpt").is_file()
    assert not (broken / "killed.json").exists()
    resumed = run_child("resume", broken)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (json.loads((d / f"{m}.json").read_text()) for d, m in ((full, "full"), (broken, "resume")))
    assert got["adapted"] == expected["adapted"] == 16
    assert got["log_factors"] == pytest.approx(expected["log_factors"], rel=1e-12)
    for a, b in zip(got["params"], expected["params"], strict=True):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12)


# ------------------------------------------------------------------------ bad batches in a Lightning fit
class PoisonedRegression(__import__("lightning").pytorch.LightningModule):
    """A float32 regression fit whose batch ``nan_at`` has a NaN input and whose step ``inf_at`` gets one
    inf gradient entry (``on_after_backward``): what a corrupt sample or an overflowing op does."""

    def __init__(self, optimizer: str, nan_at: set[int], inf_at: set[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer, self.nan_at, self.inf_at = optimizer, nan_at, inf_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx in self.nan_at:
            x = x.clone()
            x[0, 0] = math.nan
        return nn.functional.mse_loss(self.net(x).float(), y)

    def on_after_backward(self) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_idx in self.inf_at:
            self.net[0].weight.grad[1, 1] = math.inf  # type: ignore[index]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "SGDm":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.optimizer == "AdamW-fused":  # skips on CLARA's device flag: no host decision
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)
        return getattr(torch.optim, self.optimizer)(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(512, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["SGDm", "Adam", "AdamW", "AdamW-fused"])
def test_a_fit_with_nan_batches_and_an_inf_gradient_goes_on(
    optimizer: str, precision: str, trainer_kwargs: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three NaN batches and one inf gradient entry in 32 steps: four updates skipped, one warning, the
    optimizer's state finite, the summary counts them; the fit ends where the clean batches lead."""
    from lightning.pytorch import Trainer

    from lightning_clara import CLARACallback

    module = PoisonedRegression(optimizer, nan_at={5, 6, 20}, inf_at={12})
    callback = CLARACallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**{**trainer_kwargs, "precision": precision}, callbacks=[callback]).fit(module)
    clara = callback.controllers[0]
    assert clara.num_skipped_updates == 4
    ran = 4 if optimizer.endswith("fused") else 0  # a fused optimizer's skipped steps ran, as no-ops
    assert clara.num_optimizer_steps == 32 - 4 + ran
    assert clara.num_adapted_steps <= 32 - 4
    assert sum("skipped an update" in str(w.message) for w in caught) == 1
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    state = module.trainer.optimizers[0].state_dict()["state"]
    assert all(bool(torch.isfinite(v).all()) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert {float(s["step"]) for s in state.values() if "step" in s} <= {28.0}  # Adam's counts: 4 updates skipped
    assert math.isfinite(clara.lr_factor)
    assert clara.num_safeguard_alarms == 0
    assert "updates skipped (NaN/inf gradients):" in capsys.readouterr().out


class ManualPoisonedRegression(PoisonedRegression):
    """The same fit with manual optimization: ``manual_backward`` then ``optimizer.step()`` by hand."""

    def __init__(self, nan_at: set[int]) -> None:
        super().__init__("Adam", nan_at=nan_at, inf_at=set())
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss.detach()


@pytest.mark.parametrize("mode", ["manual optimization", "gradient accumulation"])
def test_bad_batches_are_skipped_in_manual_optimization_and_under_accumulation(mode: str, trainer_kwargs: dict) -> None:
    """Manual optimization steps through Lightning's do-nothing closure; under accumulation a NaN micro-batch
    poisons the accumulated gradient, so that one optimizer step (of two batches) is skipped."""
    from lightning.pytorch import Trainer

    from lightning_clara import CLARACallback

    manual = mode == "manual optimization"
    module = ManualPoisonedRegression({5, 20}) if manual else PoisonedRegression("Adam", {5, 20}, set())
    callback = CLARACallback(summary=False)
    extra = {} if manual else {"accumulate_grad_batches": 2}
    with pytest.warns(RuntimeWarning, match="skipped an update"):
        Trainer(**trainer_kwargs, **extra, callbacks=[callback]).fit(module)
    clara = callback.controllers[0]
    assert clara.num_skipped_updates == 2
    assert clara.num_optimizer_steps == (32 if manual else 16) - 2
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
