"""One line of documentation per option of CLARA, and the ``Args`` entries built from them.

The texts are declared once here: ``CLARAOptions``, ``CLARA`` and ``CLARACallback`` append them to their docstrings
(LightningCLI prints them as the arguments' help); the Transformers callback takes the same options.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping

__all__ = ["OPTION_DOCS", "option_docs", "with_option_docs"]

#: One line of documentation per option, in plain text (LightningCLI prints it as is).
OPTION_DOCS: dict[str, str] = {
    "c": "path memory in [0.001, 1]; the path averages roughly the last 1/c unit steps (default 0.02; the "
    "paper's 0.2 with rule='paper'). The longer memory sees the drift of a deep network under its "
    "oscillating top directions: at c=0.2 the ratio is about 0.6-0.8 over the whole good lr range, at "
    "0.02 it crosses 1 within 2-3x of the tuned lr.",
    "d": "damping > 0: with rule='normalized' (default 0.03) the change of log F per step when all steps "
    "agree; with rule='paper' (default 1e-3) log F moves by d * (r - 1).",
    "scope": "'optimizer' (one factor, the paper's choice) or 'param_group' (one per group).",
    "min_factor": "lower bound on F, or None.",
    "max_factor": "upper bound on F, or None (log F is clamped, so there is no wind-up).",
    "min_lr": "lower bound on the learning rate used, lr_base * F (x the anneal), or None.",
    "max_lr": "upper bound on the learning rate used (the anneal decays from it), or None.",
    "initial_factor": "F before the first step (default 0.1; 1 with rule='paper'): starting 10x below the "
    "given lr lets CLARA climb to a too-large lr instead of diverging before it can act. One given outside "
    "[min_factor, max_factor] raises ValueError (the default is clamped into them).",
    "variant": "'clara', or 'salera' (the 2017 rule: normalised raw gradients against a plain random walk, "
    "whatever the optimizer; for ablations).",
    "unit_step": "the paper's unit-step variant: each tensor's step becomes lr * s/||s|| (costs one parameter "
    "snapshot).",
    "reference": "a lightning_clara.reference.Reference to use for every group instead of the automatic one.",
    "safeguard": "True (or a lightning_clara.safeguard.PageHinkley) to watch the loss given to "
    "CLARA.observe_loss with a Page-Hinkley test: on a blow-up, restore the parameters and halve F "
    "(default False in every API). Costs two parameter snapshots.",
    "sharding": "how parameters are sharded across ranks (FSDP/ZeRO-like), a "
    "lightning_clara.distributed.Sharding; None: FSDP2's where the parameters are DTensors, else whole "
    "tensors (DDP too).",
    "consistency_check_every": "under DDP, every this many steps compare F across ranks (one small "
    "broadcast) and re-synchronise from rank 0 with a warning on drift; None: never. DDP needs no "
    "collective for correctness: every rank applies the same update.",
    "rule": "'normalized' (default): log F += d * (r / target - 1) / (r_max / target - 1) with r_max the "
    "largest ratio possible, so one d suits every optimizer; 'paper': the paper's exact rule, "
    "log F += d * (r - 1), with its defaults.",
    "fast_start": "for this many adapted steps the damping starts at 20 d and falls linearly to d "
    "(default 50; 0, off, with rule='paper'), so that a bad initial lr is rescued within short runs. "
    "The gain depends on the step count only, so log F stays unbiased under the null model. Given together "
    "with hold_after > 0, it must be <= hold_after.",
    "hold_after": "'find, then hold': after this many adapted steps the damping decays as "
    "exp(-(t - hold_after) / (hold_after / 3)), so F settles and the schedule takes over (default 600; "
    "0, never, with rule='paper').",
    "target": "the ratio the rule steers to (default 0.5; 1, the paper's random walk, with rule='paper'). At a "
    "good lr a deep network's steps partly cancel, so a target below 1 accepts that cancellation.",
    "total_steps": "the number of optimizer steps of the run, if known (the Lightning callback uses the "
    "Trainer's estimate). A short run finds faster: with rule='normalized', hold_after left at None becomes "
    "0.4 * total_steps (between 240 and 600) and then d left at None grows as 0.03 * 600 / hold_after.",
    "loss_brake": "gate the rule's upward moves with the trend of the losses given to CLARA.observe_loss (the "
    "callbacks give every step's loss): below r = 1 a raise of F needs a clearly falling smoothed loss and turns "
    "into a fall where the loss has stalled (at r >= 1 F rises ungated); once the smoothed loss is below 5 % of the "
    "first losses' (the network fits its data) F is not raised at all (default True; False with rule='paper'). "
    "Without losses it does nothing. Under DDP give every rank the same loss (the mean over ranks, as the "
    "callbacks do).",
    "anneal": "with a known total_steps and a scheduled lr that stays constant (no scheduler at work), take the lr "
    "used down linearly from max(hold_after, total_steps / 2) towards 0 at the last step (at least 1 %): the rule "
    "finds a constant lr, and a decay at the end gains what a tuned schedule's does. The first change of the "
    "scheduled lr (a warm-up, a cosine, a step decay) holds it where it is; a scheduler whose first change comes "
    "later decays on top of that value (pass False there; the callbacks turn it off for the schedulers they know). "
    "Default True; False with rule='paper'.",
    "skip_nonfinite": "skip an optimizer update whose gradients hold a NaN or inf, as GradScaler does: the "
    "parameters and the optimizer's state stay as they were, the first skip warns and later ones are counted "
    "(num_skipped_updates, the summary table) (default True). One fused read of the gradients per step; on CUDA "
    "its decision costs one synchronisation per step (False: none, and a NaN gradient is stepped as given).",
    "sample": "keep each tensor's path on a fixed sample of at most this many coordinates (default 4096; "
    "tensors with fewer entries keep all of them). The step is read on the sample, so a step costs "
    "O(sample x tensors) whatever the model's size; None: every coordinate, the paper's exact statistic "
    "(a path and a step buffer as large as the model; not with sharding).",
}


def option_docs(names: Iterable[str], *, docs: Mapping[str, str] | None = None, indent: str = "        ") -> str:
    """Google-style ``Args`` entries for the named options, wrapped to the docstring's width."""
    docs = docs or {}
    lines = []
    for name in names:
        text = f"{name}: {docs.get(name, OPTION_DOCS[name])}"
        lines.extend(textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent + "    "))
    return "\n".join(lines)


def with_option_docs(doc: str | None, names: Iterable[str], *, docs: Mapping[str, str] | None = None) -> str:
    """``doc`` with the named options' ``Args`` entries appended at the entries' own indentation.

    The docstring's trailing indentation (the spaces before its closing quotes) is dropped first:
    left in place it would indent the first appended entry further, and docstring parsers (help(),
    LightningCLI) would read it as the continuation of the entry before it.
    """
    return f"{(doc or '').rstrip()}\n{option_docs(names, docs=docs)}\n"
