"""GPU checks (run where a CUDA device is available; CI has none).

1. CLARA on CUDA parameters follows the same trajectory as on the CPU (SGD, Adam, fused Adam), with
   sampled paths (the default; the 256x128 weight is sampled) and with full paths.
2. Synchronisations (torch's sync debug mode): CLARA's defaults make at most one per step with a
   foreach Adam (the NaN/inf check's decision), none without the check, and none with a fused Adam,
   which skips a NaN step on the device flag (issue 21; the skip is counted one step late).
3. Path buffers stay fp32 for bf16 parameters, on the parameters' device.
4. Lightning fits on the GPU with precision "bf16-mixed" and "16-mixed" (a real GradScaler):
   F stays finite, adapted steps equal optimizer steps (scaler-skipped steps change nothing).

    python benchmarks/gpu_check.py        # prints PASS/FAIL lines, exits 1 on any failure

The per-step cost on CUDA, with kernel launches and synchronisations counted:
``python benchmarks/overhead.py --device cuda``.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch

from lightning_clara import CLARA

FAILURES: list[str] = []


def check(name: str, condition: bool, detail: str = "") -> None:
    print(f"{'PASS' if condition else 'FAIL'} {name} {detail}", flush=True)
    if not condition:
        FAILURES.append(name)


def trajectory(device: str, kind: str, steps: int = 60, sample: int | None = 4096) -> list[float]:
    """F after each step for a fixed synthetic gradient stream (drift + noise)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(256, 128), (128,), (10, 256), (10,)]
    params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
    if kind == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    elif kind == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-3)
    else:
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    clara = CLARA(optimizer, sample=sample)
    out = []
    for _ in range(steps):
        for p in params:
            p.grad = (0.3 + torch.randn(p.shape, generator=generator)).to(device)
        optimizer.step()
        out.append(clara.lr_factor)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for kind in ("sgd", "adam", "adam_fused"):
        for sample in (4096, None):
            cpu = trajectory("cpu", "adam" if kind == "adam_fused" else kind, sample=sample)
            gpu = trajectory("cuda", kind, sample=sample)
            error = max(abs(math.log(a / b)) for a, b in zip(cpu, gpu, strict=True))
            moved = abs(math.log(cpu[-1] / cpu[0]))
            check(
                f"trajectory-{kind}-sample-{sample}",
                error < 1e-4 and moved > 0.01,
                f"max |log F_gpu - log F_cpu| = {error:.2e}, |log F| = {moved:.3f}",
            )

    # synchronisations in 5 steps: Adam alone, CLARA's defaults (the NaN/inf gradient check decides on
    # the host: one per step), and without the check (none of CLARA's own)
    def syncs_in_five_steps(options: dict | None, fused: bool = False, nan_at: int = -1) -> tuple[list[str], Any]:
        params = [
            torch.zeros(512, 512, device="cuda", requires_grad=True),
            torch.zeros(512, device="cuda", requires_grad=True),
        ]
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused)
        clara = None if options is None else CLARA(optimizer, **options)
        loss = params[1][0].detach() * 0 + 1.0  # a CUDA loss, fed as the callback feeds training_step's
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(5):
                if t == nan_at:
                    params[0].grad[3, 4] = math.nan
                optimizer.step()
                if clara is not None:
                    clara.observe_loss(loss * math.nan if t == nan_at else loss)
                if t == nan_at:
                    params[0].grad[3, 4] = 0.0
        torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
        return syncs, clara

    adam_alone = len(syncs_in_five_steps(None)[0])
    defaults, _ = syncs_in_five_steps({})
    unchecked, _ = syncs_in_five_steps({"skip_nonfinite": False})
    check("syncs-defaults", len(defaults) - adam_alone <= 5, f"{len(defaults) - adam_alone} of CLARA's in 5 steps")
    extra = len(unchecked) - adam_alone
    check("syncs-skip_nonfinite-off", extra == 0, f"{extra} of CLARA's in 5 steps")
    for line in defaults[:6]:
        print("   ", line)
    # a fused optimizer decides on the device flag (issue 21): no sync of CLARA's, a NaN step skipped too
    fused_alone = len(syncs_in_five_steps(None, fused=True)[0])
    fused, clara = syncs_in_five_steps({}, fused=True, nan_at=2)
    extra = len(fused) - fused_alone
    check("syncs-defaults-fused", extra == 0, f"{extra} of CLARA's in 5 steps, one with a NaN gradient")
    for line in fused[:6]:
        print("   ", line)
    finite = all(bool(torch.isfinite(p).all()) for p in clara.optimizer.param_groups[0]["params"])
    check("fused-nan-skipped", finite and clara.num_skipped_updates == 1, f"{clara.num_skipped_updates} skipped")

    # bf16 parameters: fp32 paths on the same device
    params = [torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    clara = CLARA(optimizer)
    params[0].grad = torch.randn_like(params[0])
    optimizer.step()
    path = clara.paths.sampled.buckets[0].path
    check(
        "bf16-paths-fp32", path.dtype == torch.float32 and path.device.type == "cuda", f"{path.dtype} on {path.device}"
    )

    # Lightning mixed precision on the GPU
    import lightning as L

    from lightning_clara import CLARACallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    x = torch.randn(512, 32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)
    for precision in ("bf16-mixed", "16-mixed"):
        callback = CLARACallback()
        trainer = L.Trainer(
            accelerator="gpu", devices=1, precision=precision, max_epochs=3, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[callback],
        )  # fmt: skip
        trainer.fit(Module(), data)
        controller = callback.controllers[0]
        finite = math.isfinite(controller.lr_factor) and controller.lr_factor > 0
        check(
            f"lightning-{precision}",
            finite and controller.num_adapted_steps <= trainer.global_step and controller.num_adapted_steps > 0,
            f"F={controller.lr_factor:.3g}, adapted {controller.num_adapted_steps} of {trainer.global_step} steps",
        )
    print("FAILURES:", FAILURES if FAILURES else "none")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
