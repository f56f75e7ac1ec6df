"""CLARA on the noisy sphere and ellipsoid: distance to the optimum and the lr trajectory.

f(x) = 1/2 sum_i h_i x_i^2 in 100 dimensions (sphere: h_i = 1; ellipsoid: h_i log-spaced over
three orders of magnitude), gradients with additive Gaussian noise; SGD and Adam from a bad
initial learning rate, with and without CLARA (library defaults). Writes
``benchmarks/results/synthetic.png`` and ``synthetic.json``.

    python benchmarks/synthetic.py
    python benchmarks/synthetic.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(problem: str, optimizer_name: str, clara: bool, lr0: float, steps: int, seed: int) -> dict[str, list[float]]:
    from lightning_clara import CLARA

    generator = torch.Generator().manual_seed(seed)
    dimension = 100
    curvature = torch.ones(dimension) if problem == "sphere" else torch.logspace(-3, 0, dimension)
    x = torch.nn.Parameter(torch.ones(dimension))
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD([x], lr=lr0) if optimizer_name == "sgd" else torch.optim.Adam([x], lr=lr0)
    )
    controller = CLARA(optimizer) if clara else None
    distance, lrs = [], []
    for _ in range(steps):
        noise = 0.1 * torch.randn(dimension, generator=generator)
        x.grad = (curvature * x.detach() + noise).clone()
        optimizer.step()
        distance.append(float(x.detach().norm()))
        lrs.append(controller.lr_used[0] if controller else lr0)
    return {"distance": distance, "lr": lrs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-5, help="initial learning rate (deliberately bad)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 50
    results = {
        f"{problem}/{name}{'+CLARA' if clara else ''}": run(problem, name, clara, args.lr, args.steps, seed=0)
        for problem in ("sphere", "ellipsoid")
        for name in ("sgd", "adam")
        for clara in (False, True)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic.json").write_text(json.dumps({"lr0": args.lr, "steps": args.steps, "runs": results}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for column, problem in enumerate(("sphere", "ellipsoid")):
        for label, run_result in results.items():
            if not label.startswith(problem):
                continue
            name = label.split("/", 1)[1]
            style = "-" if "CLARA" in name else ":"
            axes[0][column].semilogy(run_result["distance"], style, label=name)
            axes[1][column].semilogy(run_result["lr"], style, label=name)
        axes[0][column].set_title(f"noisy {problem}: distance to the optimum")
        axes[1][column].set_title("learning rate used")
        axes[1][column].set_xlabel("step")
        axes[0][column].legend(fontsize=8)
    figure.suptitle(f"SGD and Adam from lr = {args.lr:g}, with and without CLARA (defaults)")
    figure.tight_layout()
    figure.savefig(args.out / "synthetic.png", dpi=110)
    for label, run_result in results.items():
        print(f"{label:22s} final distance {run_result['distance'][-1]:.3g}  final lr {run_result['lr'][-1]:.3g}")
    print(f"wrote {args.out / 'synthetic.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
