"""``CLARACallback`` under Lightning DDP: two CPU ranks, ``strategy="ddp_spawn"``, gloo over loopback.

Every ``Trainer.fit(strategy="ddp_spawn")`` starts two fresh processes that import torch and
Lightning (the slow part), so the DDP fits are few and run one after the other in ONE driver
subprocess: this file run as a script (``python tests/distributed/test_ddp.py OUT_DIR``), killed with its
whole process group if it exceeds :data:`DRIVER_TIMEOUT_S`, so that a deadlock fails the test
instead of blocking the suite. The fits:

========  =====  ======  ======================================================================
tag       optim  epochs  checks
========  =====  ======  ======================================================================
sgd       SGD    4       = single process and reference_loop.py (rule="paper"); CSVLogger (rank 0);
                         consistency_check_every=2
adam      Adam   4       = single process; the uninterrupted reference of the resume
half      Adam   2       ModelCheckpoint (saved by rank 0); consistency_check_every=2
resumed   Adam   2 -> 4  fit(ckpt_path=half's checkpoint): = adam's steps 16..31
========  =====  ======  ======================================================================

Inside the workers, :class:`RankChecker` all-gathers the lr used and log F after every step (and
the restored CLARA state at train start) and asserts that every rank holds rank 0's values; a
failing assert raises in the worker, ``torch.multiprocessing`` re-raises it in the driver as
``ProcessRaisedException`` (and terminates the other rank), the driver records the traceback
for that fit, and the tests below fail with it. Each rank also writes what it saw to a JSON file
that the tests compare with single-process runs done here, in the pytest process.

One DDP step sees the same global batch as one single-process step: 8 samples, 4 per rank,
``DistributedSampler(shuffle=False)`` gives rank r the samples ``8t + r, 8t + r + 2, ...``, and
with a mean-reduced MSE the DDP-averaged gradient is the gradient of the 8-sample mean.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from example_runs import ExampleRunner, run_in_group
from helpers import csv_series, make_net, make_regression_data
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from reference_loop import SimpleCLARA, plain_sgd_mu, sgd_step
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.hooks import RemovableHandle

from lightning_clara import CLARACallback
from lightning_clara.options import RULE_DEFAULTS

ROOT = Path(__file__).resolve().parents[2]

WORLD = 2
GLOBAL_BATCH = 8  # 4 samples per rank under DDP, all 8 in one process
NUM_SAMPLES = 64
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH
EPOCHS = 4
HALF_EPOCHS = 2
C = 0.2
D = 0.05  # large enough that F moves by tens of percent within 32 steps
LRS = {"sgd": 0.05, "adam": 0.01}
#: CLARACallback options per optimizer: SGD with the paper's rule (the one reference_loop.py writes
#: out), Adam with the library's default rule on sampled paths of 4 coordinates per tensor (every
#: tensor of the net is larger: the sample, not the whole tensor, must agree across ranks).
CLARA_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"c": C, "d": D, "rule": "paper", "safeguard": False},
    "adam": {"c": C, "d": D, "safeguard": False, "sample": 4},
}
CHECK_EVERY = 2
LOG_EVERY = 2
#: Four DDP fits of two freshly spawned processes each take 60-90 s on 2 busy cores.
#: A deadlock fails the test after this long instead of blocking the suite.
DRIVER_TIMEOUT_S = 360


# ---------------------------------------------------------------------------------------------- model
class ShardedRegression(LightningModule):
    """MSE regression with the float64 MLP of ``conftest``; the global batch is GLOBAL_BATCH at any world size.

    The sampler is built here, not injected by Lightning, so that the rank-to-sample mapping is explicit.
    """

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.dataset = make_regression_data(NUM_SAMPLES)
        self.net = make_net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        # sync_dist puts a collective of Lightning's own into the logging path, beside CLARA's logging
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Optimizer:
        lr = LRS[self.optimizer_name]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=lr)
        return torch.optim.Adam(self.parameters(), lr=lr)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)


# ---------------------------------------------------------------------------------------------- in-worker checks
def disagreeing_ranks(gathered: list[Any]) -> list[int]:
    """The ranks whose value differs from rank 0's (exact comparison: DDP ranks must agree bit for bit)."""
    return [rank for rank, value in enumerate(gathered) if value != gathered[0]]


def _all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), or just ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _clara(trainer: Trainer) -> CLARACallback:
    (callback,) = (cb for cb in trainer.callbacks if isinstance(cb, CLARACallback))  # type: ignore[attr-defined]
    return callback


class RankChecker(Callback):
    """Runs in every rank: records the lr the optimizer used and log F per step, asserts all ranks agree.

    The lr is read by a step pre-hook registered in ``on_train_start``, after ``CLARACallback`` attached
    its own, so it sees ``lr_base * F``. At train start the CLARA state (restored or fresh) is compared
    across ranks and with ``start_steps``. Warnings are recorded from ``setup`` to ``teardown``.
    With ``out_dir`` every rank writes ``{tag}_rank{r}.json`` (and rank 0 its final weights) at train end.
    """

    def __init__(self, tag: str, out_dir: str | None = None, *, start_steps: int = 0) -> None:
        self.tag = tag
        self.out_dir = out_dir
        self.start_steps = start_steps
        self.lrs: list[float] = []
        self.log_factors: list[float] = []
        self.guard_checks = 0
        self.start_state: dict[str, Any] = {}
        self.messages: list[str] = []
        self._catcher: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_recording()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_recording()  # a failed fit skips teardown: do not leave the warning filters changed

    def _stop_recording(self) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        controller = _clara(trainer).controllers[0]
        state = controller.state_dict()
        self.start_state = {
            "log_factors": state["log_factors"],
            "num_adapted_steps": state["num_adapted_steps"],
            "path_squared_norms": [
                None if entry is None else float(entry["path"].double().pow(2).sum())
                for row in state["tensors"]
                for entry in row
            ],
        }
        everyone = _all_gather(self.start_state)
        assert not disagreeing_ranks(everyone), f"CLARA state at train start differs across ranks: {everyone}"
        assert self.start_state["num_adapted_steps"] == self.start_steps, self.start_state
        self._handle: RemovableHandle = trainer.optimizers[0].register_step_pre_hook(self._record_lr)
        guard = controller._guard
        if guard is not None:  # count the rank-consistency checks that really ran
            check = guard.check

            def counting_check(*args: Any, **kwargs: Any) -> Any:
                self.guard_checks += 1
                return check(*args, **kwargs)

            guard.check = counting_check  # type: ignore[method-assign]

    def _record_lr(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_factors.append(_clara(trainer).controllers[0].log_factors[0])
        step = self.start_steps + len(self.lrs) - 1
        everyone = _all_gather((self.lrs[-1], self.log_factors[-1]))
        bad = disagreeing_ranks(everyone)
        assert not bad, f"rank {trainer.global_rank}: (lr used, log F) at step {step} differ across ranks: {everyone}"

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle.remove()
        controller = _clara(trainer).controllers[0]
        self.num_resyncs = controller.num_resyncs
        # the normalized rule at c = 0.2 (Adam) warns of its null-model rise at attach: expected here
        messages = [str(w.message) for w in self._caught if str(w.message).startswith("CLARA")]
        self.messages = [m for m in messages if "largest ratio the steps can reach" not in m]
        if self.out_dir is None:
            return
        rank = trainer.global_rank
        record = {
            "rank": rank,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "global_step": trainer.global_step,
            "lrs": self.lrs,
            "log_factors": self.log_factors,
            "start_state": self.start_state,
            "num_resyncs": self.num_resyncs,
            "guard_checks": self.guard_checks,
            "clara_warnings": self.messages,
        }
        (Path(self.out_dir) / f"{self.tag}_rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            torch.save(pl_module.net.state_dict(), Path(self.out_dir) / f"{self.tag}_weights.pt")


# ---------------------------------------------------------------------------------------------- the fits
@dataclass(frozen=True)
class Fit:
    """One ``Trainer.fit`` of the driver."""

    tag: str
    optimizer: str
    epochs: int
    check_every: int | None = None
    csv: bool = False
    checkpoint: bool = False
    resume_from: str | None = None


FITS = (
    Fit("sgd", "sgd", EPOCHS, check_every=CHECK_EVERY, csv=True),
    Fit("adam", "adam", EPOCHS),
    Fit("half", "adam", HALF_EPOCHS, check_every=CHECK_EVERY, checkpoint=True),
    Fit("resumed", "adam", EPOCHS, check_every=CHECK_EVERY, resume_from="half"),
)


def make_trainer(devices: int, epochs: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A quiet CPU trainer; ``devices > 1`` means ``ddp_spawn``."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
    }
    return Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=callbacks,
        use_distributed_sampler=False,
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **{**defaults, **kwargs},
    )


def checkpoint_dir(out_dir: Path, tag: str) -> Path:
    return out_dir / f"{tag}_checkpoints"


def run_ddp_fit(fit: Fit, out_dir: Path) -> None:
    """One ``ddp_spawn`` fit on WORLD CPU ranks; the workers write their records into ``out_dir``."""
    start_steps = HALF_EPOCHS * STEPS_PER_EPOCH if fit.resume_from else 0
    callbacks: list[Callback] = [
        CLARACallback(**CLARA_OPTIONS[fit.optimizer], consistency_check_every=fit.check_every),
        RankChecker(fit.tag, str(out_dir), start_steps=start_steps),
    ]
    kwargs: dict[str, Any] = {"default_root_dir": out_dir}
    if fit.csv:
        kwargs["logger"] = CSVLogger(out_dir, name=f"{fit.tag}_logs")
    if fit.checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir(out_dir, fit.tag)))
        kwargs["enable_checkpointing"] = True
    ckpt_path = None
    if fit.resume_from is not None:
        (ckpt_path,) = checkpoint_dir(out_dir, fit.resume_from).glob("*.ckpt")
    trainer = make_trainer(WORLD, fit.epochs, callbacks, **kwargs)
    trainer.fit(ShardedRegression(fit.optimizer), ckpt_path=ckpt_path)


def driver(out_dir: Path) -> None:
    """Run every fit in FITS; a fit's exception (a worker's included) is recorded in ``errors.json``."""
    errors: dict[str, str] = {}
    for fit in FITS:
        for attempt in range(2):
            try:
                run_ddp_fit(fit, out_dir)
                errors.pop(fit.tag, None)
                break
            except Exception as exc:
                errors[fit.tag] = traceback.format_exc()
                # a worker killed by a signal (gloo aborting on a peer's closed socket, seen about once in
                # ten runs on a loaded 2-core machine) is retried once from scratch; any Python exception
                # raised in a worker, the in-worker assertions included, is final
                if not (isinstance(exc, ProcessExitedException) and "signal" in str(exc)) or attempt == 1:
                    break
                shutil.rmtree(checkpoint_dir(out_dir, fit.tag), ignore_errors=True)
                shutil.rmtree(out_dir / f"{fit.tag}_logs", ignore_errors=True)
    (out_dir / "errors.json").write_text(json.dumps(errors))


# ---------------------------------------------------------------------------------------------- fixtures
@dataclass
class DDPRuns:
    """The driver's output directory and console output, with readers for the per-rank records."""

    out_dir: Path
    output: str
    errors: dict[str, str]

    def ranks(self, tag: str) -> list[dict[str, Any]]:
        """Every rank's record of fit ``tag``; fails with the fit's traceback if the fit raised."""
        assert tag not in self.errors, f"DDP fit {tag!r} raised:\n{self.errors[tag]}"
        return [json.loads((self.out_dir / f"{tag}_rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> DDPRuns:
    """All DDP fits, once per module, in one driver subprocess."""
    out_dir = tmp_path_factory.mktemp("ddp")
    completed = run_in_group([sys.executable, str(Path(__file__).resolve()), str(out_dir)], ROOT, DRIVER_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-5000:]
    errors = json.loads((out_dir / "errors.json").read_text())
    return DDPRuns(out_dir, completed.stdout, errors)


@pytest.fixture(scope="module")
def single_process() -> dict[str, tuple[RankChecker, dict[str, Tensor]]]:
    """Per optimizer: the single-process fit over the same global batches (its records and final weights)."""
    out = {}
    for name in LRS:
        checker = RankChecker(name)
        module = ShardedRegression(name)
        make_trainer(1, EPOCHS, [CLARACallback(**CLARA_OPTIONS[name]), checker]).fit(module)
        out[name] = (checker, {k: v.detach().clone() for k, v in module.net.state_dict().items()})
    return out


def simple_sgd_lrs(epochs: int) -> list[float]:
    """The lr trajectory of ``reference_loop``'s simple CLARA with hand-written SGD on the same batches."""
    net = make_net()
    data = make_regression_data(NUM_SAMPLES)
    clara = SimpleCLARA([p.shape for p in net.parameters()], C, D, plain_sgd_mu(C), rule="paper")
    params = list(net.parameters())
    lrs = []
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False):
            net.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            lr = LRS["sgd"] * clara.factor
            clara.update(sgd_step(params, lr))
            lrs.append(lr)
    return lrs


def max_relative_error(actual: list[float], expected: list[float]) -> float:
    assert len(actual) == len(expected), (len(actual), len(expected))
    return max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))


def max_absolute_error(actual: list[float], expected: list[float]) -> float:
    assert len(actual) == len(expected), (len(actual), len(expected))
    return max(abs(a - e) for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------------------------------------- a. identical ranks
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_ranks_use_identical_lrs_equal_to_single_process(
    name: str, ddp_runs: DDPRuns, single_process: dict[str, tuple[RankChecker, dict[str, Tensor]]]
) -> None:
    """Both ranks used the same lr at every step (asserted in the workers, re-checked here), and the
    trajectory is the single-process one over the same global batches of 8."""
    rank0, rank1 = ddp_runs.ranks(name)
    assert rank0["world_size"] == rank1["world_size"] == WORLD
    assert rank0["global_step"] == EPOCHS * STEPS_PER_EPOCH == len(rank0["lrs"])
    assert rank0["lrs"] == rank1["lrs"]
    assert rank0["log_factors"] == rank1["log_factors"]

    checker, weights = single_process[name]
    assert len(checker.lrs) == EPOCHS * STEPS_PER_EPOCH
    assert max_relative_error(rank0["lrs"], checker.lrs) < 1e-9
    # log F starts at 0: compare it absolutely (a relative error near 0 would measure rounding noise)
    assert max_absolute_error(rank0["log_factors"], checker.log_factors) < 1e-12
    # F really moved, so the agreement is not the trivial lr == lr_base
    assert abs(rank0["log_factors"][-1]) > 0.3
    assert max(rank0["lrs"]) / min(rank0["lrs"]) > 1.5
    # the model followed the same trajectory too
    ddp_weights = torch.load(ddp_runs.out_dir / f"{name}_weights.pt")
    for key, value in weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-9, atol=1e-12)


def test_sgd_trajectory_matches_the_simple_reference_loop(ddp_runs: DDPRuns) -> None:
    """Independently of the library's single-process path: the hand-written loop of reference_loop.py."""
    rank0, _ = ddp_runs.ranks("sgd")
    assert max_relative_error(rank0["lrs"], simple_sgd_lrs(EPOCHS)) < 1e-9


def test_disagreeing_ranks_finds_the_odd_one() -> None:
    """The comparison the workers assert on does flag a differing rank (exactly, no tolerance)."""
    assert disagreeing_ranks([(0.1, 0.2), (0.1, 0.2)]) == []
    assert disagreeing_ranks([(0.1, 0.2), (0.1, math.nextafter(0.2, 1.0))]) == [1]  # one ulp
    assert disagreeing_ranks([{"a": [1.0]}, {"a": [1.0]}, {"a": [2.0]}]) == [2]


# ---------------------------------------------------------------------------------------------- b. logging
def test_csv_logger_gets_clara_keys_from_rank_zero_only(ddp_runs: DDPRuns) -> None:
    """The fit with a CSVLogger finished (no deadlock: the driver returned in time) and rank 0 alone wrote
    one metrics.csv in which every clara/* key appears once per logging step, with the lrs used."""
    rank0, _ = ddp_runs.ranks("sgd")
    files = list((ddp_runs.out_dir / "sgd_logs").rglob("metrics.csv"))
    assert len(files) == 1, files
    logged = csv_series(files[0])
    expected_steps = {s for s in range(EPOCHS * STEPS_PER_EPOCH) if (s + 1) % LOG_EVERY == 0}
    for key in ("clara/lr-SGD", "clara/ratio-SGD", "clara/log_factor-SGD"):
        assert set(logged.get(key, {})) == expected_steps, (key, sorted(logged))
    for step in expected_steps:
        assert logged["clara/lr-SGD"][step] == pytest.approx(rank0["lrs"][step], rel=1e-12)
        assert logged["clara/log_factor-SGD"][step] == pytest.approx(rank0["log_factors"][step], rel=1e-12)
    assert set(logged["train_loss"]) == expected_steps  # Lightning's own (synced) logging ran beside it


# ---------------------------------------------------------------------------------------------- c. checkpoints
def test_checkpoint_from_rank_zero_restores_on_every_rank(ddp_runs: DDPRuns) -> None:
    """Adam: 2 epochs + checkpoint, then resume to 4 = 4 epochs uninterrupted, exactly, on both ranks.

    In the workers every rank asserted at train start that its restored CLARA state (log F, step
    count, path norms) equals rank 0's and holds the 16 steps of the first fit.
    """
    half = ddp_runs.ranks("half")
    resumed = ddp_runs.ranks("resumed")
    uninterrupted, _ = ddp_runs.ranks("adam")
    cut = HALF_EPOCHS * STEPS_PER_EPOCH

    (checkpoint,) = checkpoint_dir(ddp_runs.out_dir, "half").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = (value for key, value in saved["callbacks"].items() if "CLARACallback" in key)
    assert state["controllers"][0]["log_factors"] == [half[0]["log_factors"][-1]]

    for rank in range(WORLD):
        assert half[rank]["lrs"] == uninterrupted["lrs"][:cut]
        start = resumed[rank]["start_state"]
        assert start["num_adapted_steps"] == cut
        assert start["log_factors"] == [uninterrupted["log_factors"][cut - 1]] == [half[0]["log_factors"][-1]]
        assert start == resumed[0]["start_state"]
        assert resumed[rank]["global_step"] == EPOCHS * STEPS_PER_EPOCH
        assert resumed[rank]["lrs"] == uninterrupted["lrs"][cut:]  # exact, float64
        assert resumed[rank]["log_factors"] == uninterrupted["log_factors"][cut:]
    assert abs(resumed[0]["start_state"]["log_factors"][0]) > 0.1  # a fresh F = 1 would not pass for restored
    resumed_weights = torch.load(ddp_runs.out_dir / "resumed_weights.pt")
    uninterrupted_weights = torch.load(ddp_runs.out_dir / "adam_weights.pt")
    for key, value in uninterrupted_weights.items():
        assert torch.equal(resumed_weights[key], value), key


# ---------------------------------------------------------------------------------------------- d. consistency check
@pytest.mark.parametrize("tag", ["sgd", "half", "resumed"])
def test_consistency_check_with_identical_ranks_never_resyncs(tag: str, ddp_runs: DDPRuns) -> None:
    """consistency_check_every=2: the check ran every second step on both ranks, found nothing, warned nothing."""
    steps = {"sgd": EPOCHS * STEPS_PER_EPOCH, "half": HALF_EPOCHS * STEPS_PER_EPOCH}
    steps["resumed"] = steps["sgd"] - steps["half"]  # counted from the restored step 16 on
    for record in ddp_runs.ranks(tag):
        assert record["guard_checks"] == steps[tag] // CHECK_EVERY
        assert record["num_resyncs"] == 0
        assert record["clara_warnings"] == []


# ---------------------------------------------------------------------------------------------- the example
def test_ddp_example_runs_on_two_ranks(run_in_clone: ExampleRunner) -> None:
    """``examples/ddp.py --quick`` (two ranks by default) exits cleanly, prints its table from rank 0 only, raises
    the lr. The session's one run of it in a clone (``example_runs``), its logs at the default log dir."""
    run = run_in_clone("ddp.py")
    completed, log_dir = run.completed, run.clone / "lightning_logs_ddp"
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert out.count("CLARA under DDP: SGD on digits") == 1, out  # rank 1 prints nothing
    assert "world size" in out
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["world_size"] == WORLD
    assert summary["optimizer_steps"] > 50  # past the first rank-consistency check (step 50)
    assert summary["resyncs"] == 0
    # CLARA starts at initial_factor x the configured lr; from a too-small lr the steps agree: F rose
    assert summary["final_lr"] > 1.5 * RULE_DEFAULTS["normalized"]["initial_factor"] * summary["initial_lr"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    (metrics,) = log_dir.rglob("metrics.csv")
    assert "clara/lr-SGD" in metrics.read_text().splitlines()[0]


if __name__ == "__main__":
    # The driver: ``python tests/distributed/test_ddp.py OUT_DIR`` (spawned ranks import this file as ``__mp_main__``).
    driver(Path(sys.argv[1]))
