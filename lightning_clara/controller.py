"""``CLARA``: cumulative learning-rate adaptation for one torch optimizer, attached through its step hooks.

Contract with the optimizer and any LR scheduler: while ``optimizer.step()`` runs,
``param_groups[j]["lr"]`` holds the learning rate actually used, ``lr_base * F`` (x the anneal's
``rule.annealed`` at the end of a run of known length whose scheduled lr never moved); outside the
step it holds ``lr_base`` again. A scheduler therefore only ever sees and sets ``lr_base``,
and the learning rate used is ``lr_scheduled * F``. A step the optimizer never runs (a
GradScaler skip of a non-fused optimizer, an accumulation micro-batch) fires no hook and changes nothing;
an update CLARA skips for a NaN/inf gradient, and a fused optimizer's skip, count as the run's steps (the
anneal's clock).

This module is orchestration only; one step reads top to bottom as
:meth:`CLARA._before_step` (sample / snapshot, lr swap) -> the optimizer's step ->
:meth:`CLARA._after_step` (path store -> host transfer) -> :meth:`CLARA._finish` (the rule -> F).
The parts: :mod:`~lightning_clara.options`, :mod:`~lightning_clara.stores`,
:mod:`~lightning_clara.reference`, :mod:`~lightning_clara.transfer`,
:mod:`~lightning_clara.lr_swap`, :mod:`~lightning_clara.rule`, :mod:`~lightning_clara.checkpoint`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_clara.admission import (
    check_attachable,
    check_null_drift,
    check_supported,
    unwrap,
)
from lightning_clara.checkpoint import export_state, restore_state, run_steps
from lightning_clara.distributed import RankConsistencyGuard, Sharding
from lightning_clara.finite_guard import SkipCounter
from lightning_clara.loss_watch import LossWatch
from lightning_clara.lr_swap import LearningRateSwap, StepHooks
from lightning_clara.option_docs import with_option_docs
from lightning_clara.options import (
    OPTION_NAMES,
    CLARAOptions,
    Rule,
    Scope,
    Settings,
    Variant,
    merged_options,
)
from lightning_clara.reference.cache import ReferenceCache
from lightning_clara.reference.curves import Reference
from lightning_clara.resolved import ResolvedOptions
from lightning_clara.rule import FactorState, adapt, annealed, bases_by_scope, clamp_log_factor, damping, factor, lr_for
from lightning_clara.safeguard import PageHinkley, Safeguard
from lightning_clara.stores import PathStore, StepInputs, trainable
from lightning_clara.transfer import PendingStep, StepListener
from lightning_clara.variants import GradientBucket, UnitStep

__all__ = ["CLARA"]


class CLARA(ResolvedOptions):
    """Adapt the learning rates of ``optimizer`` with CLARA (arXiv 2508.05408).

    Every optimizer step updates, per parameter tensor, a path ``p <- (1-c) p + c s/||s||`` of the realised step s,
    compares ``r = sum ||p||^2 / sum mu`` with the same optimizer's random-walk reference mu and moves ``log F``: the lr
    used is ``lr_base * F`` (``anneal``: decayed at the end). Resolved options read as attributes (``clara.c`` ...).

    Example::

        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        clara = CLARA(optimizer)
        for x, y in data:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()   # lr adapts inside step()

    Args:
        optimizer: the optimizer to adapt; it keeps doing its own update. A Lightning Fabric
            optimizer (fabric.setup's) is unwrapped: CLARA hooks the optimizer inside it.
        options: a CLARAOptions; the keyword options below that are not at their defaults replace its fields.
    """

    @classmethod
    def paper(cls, optimizer: Optimizer, **overrides: Any) -> CLARA:
        """The paper's rule and defaults (:meth:`CLARAOptions.paper`); ``sample=None`` for its exact statistic."""
        return cls(optimizer, CLARAOptions.paper(**overrides))

    def __init__(  # the options of CLARAOptions, in its order (tests/controller/test_api.py keeps them equal)
        self,
        optimizer: Optimizer,
        options: CLARAOptions | None = None,
        *,
        c: float | None = None,
        d: float | None = None,
        scope: Scope = "optimizer",
        min_factor: float | None = None,
        max_factor: float | None = None,
        min_lr: float | None = None,
        max_lr: float | None = None,
        initial_factor: float | None = None,
        variant: Variant = "clara",
        unit_step: bool = False,
        reference: Reference | None = None,
        safeguard: bool | PageHinkley = False,
        sharding: Sharding | None = None,
        consistency_check_every: int | None = None,
        rule: Rule = "normalized",
        fast_start: int | None = None,
        hold_after: int | None = None,
        target: float | None = None,
        total_steps: int | None = None,
        sample: int | None = 4096,
        loss_brake: bool | None = None,
        skip_nonfinite: bool = True,
        anneal: bool | None = None,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in OPTION_NAMES}
        optimizer = unwrap(optimizer)  # Fabric's wrapper: hook the optimizer it wraps
        check_supported(optimizer)
        self.options = merged_options(options, given)
        self.settings: Settings = self.options.resolve(optimizer.param_groups)
        self._guard = None if (every := self.settings.consistency_check_every) is None else RankConsistencyGuard(every)
        check_attachable(optimizer, self.settings.scope)
        self.optimizer = optimizer
        plain = self.settings.variant == "salera"  # SALeRA: gradient paths against a plain random walk
        self.paths = PathStore(self.settings, GradientBucket if plain else None)
        self.references = ReferenceCache(optimizer, self.c, self.paths.reference_size, self.settings.reference, plain)
        self._initial_log_factor = clamp_log_factor(self.settings.bounds, math.log(self.settings.initial_factor))
        groups = len(optimizer.param_groups)
        self._state = FactorState.initial(self._initial_log_factor, 1 if self.settings.scope == "optimizer" else groups)
        self._swap = LearningRateSwap()
        self._pending: PendingStep | None = None
        self._skips = SkipCounter()
        self.step_listeners: list[StepListener] = []  # told of each adapted step (the fit summary)
        self._steps_seen = self._steps_before = 0  # hooked steps since attaching; the run's before (a loaded state's)
        self.references.sync()
        built = [self.references.get(j) for j in range(groups)]  # a Monte Carlo one is simulated (or cached) now
        check_null_drift(self.settings.schedule, self.settings.scope, optimizer, built, self.paths.reference_size)
        self._safeguard = Safeguard.maybe(self.settings.safeguard, self.settings.sharding)  # claims its detector
        self._losses = LossWatch(self.settings, self._safeguard)
        skips = self._skips if self.settings.skip_nonfinite else None
        self._unit_step = UnitStep(optimizer) if self.settings.unit_step else None  # hooks before ours: sees lr used
        on_device = self.settings.variant == "clara"  # SALeRA's paths read the raw gradient: no NaN step for them
        across = getattr(self.settings.sharding, "sum_across_shards", None)  # one skip decision for all shards
        self._hooks = StepHooks(optimizer, self._before_step, self._after_step, self._swap, skips, on_device, across)
        optimizer._clara_controller = self  # type: ignore[attr-defined]

    @property
    def lr_factor(self) -> float:
        """The factor F (of the first param group's scope; see :attr:`lr_factors` for per-group scope)."""
        return self.lr_factors[0]

    @property
    def lr_factors(self) -> list[float]:
        """F for every param group (equal across groups with ``scope="optimizer"``)."""
        return [factor(self.settings.bounds, v) for v in self.log_factors]

    @property
    def log_factors(self) -> list[float]:
        """log F for every param group."""
        self._sync_scopes()
        return [self._state.log_factors[self._scope_of(j)] for j in range(len(self.optimizer.param_groups))]

    @property
    def ratio(self) -> float | None:
        """The last ratio r of the first group's scope (``None`` before the first adapted step)."""
        return self.ratios[0]

    @property
    def ratios(self) -> list[float | None]:
        """The last ratio r for every param group."""
        self._sync_scopes()
        return [self._state.ratios[self._scope_of(j)] for j in range(len(self.optimizer.param_groups))]

    @property
    def lr_used(self) -> list[float]:
        """The learning rate each param group used in the last step (``lr_base * F`` before that)."""
        used, groups = self._swap.used, self.optimizer.param_groups  # groups added since: lr_base * F
        return used[: len(groups)] + [self._lr_for(j, groups[j]["lr"]) for j in range(len(used), len(groups))]

    @property
    def num_adapted_steps(self) -> int:
        """Optimizer steps that updated at least one path (and so the factor)."""
        self._settle(collectives=False)
        return self._state.adapted_steps

    @property
    def damping(self) -> float:
        """The damping of the next adapted step: ``d``, raised during the fast start, decayed after the hold."""
        self._settle(collectives=False)
        return damping(self.settings.schedule, self._state.adapted_steps)

    @property
    def num_optimizer_steps(self) -> int:
        """``optimizer.step()`` calls seen since attaching (adapted or not)."""
        return self._steps_seen

    @property
    def num_skipped_steps(self) -> int:
        """Steps in which some tensor's step was NaN/inf; those tensors were left out and their paths reset."""
        self._settle(collectives=False)
        return self._state.skipped_steps

    @property
    def num_skipped_updates(self) -> int:
        """Updates skipped for NaN/inf gradients (a fused optimizer's on CUDA: counted as its step settles)."""
        return self._skips.count

    @property
    def attached(self) -> bool:
        """Whether the step hooks are still registered."""
        return self._hooks.attached

    @property
    def num_resyncs(self) -> int:
        """How often the rank-consistency guard found drift and re-synchronised from rank 0."""
        return 0 if self._guard is None else self._guard.resyncs

    @property
    def wants_loss(self) -> bool:
        """Whether :meth:`observe_loss` changes anything (the loss brake or a safeguard is on)."""
        return self._losses.wanted

    @property
    def num_safeguard_alarms(self) -> int:
        """How often the safeguard fired (0 without a safeguard)."""
        return 0 if self.safeguard is None else self.safeguard.alarms

    def detach(self) -> None:
        """Remove the hooks, restore base learning rates if a step was interrupted, free buffers."""
        self._settle(collectives=False)
        self._swap.restore(self.optimizer.param_groups)
        self._hooks.remove()
        if self._unit_step is not None:
            self._unit_step.remove()
        if self._safeguard is not None:
            self._safeguard.close()  # the paths stay: state_dict still holds them after detaching
        if getattr(self.optimizer, "_clara_controller", None) is self:
            self.optimizer._clara_controller = None

    @property
    def _run_step(self) -> int:
        """The run's optimizer steps, skipped ones and a loaded state's included: the anneal's clock (total_steps')."""
        return self._steps_before + self._steps_seen + self._skips.on_host

    def _scope_of(self, group_index: int) -> int:
        return 0 if self.settings.scope == "optimizer" else group_index

    def _settle(self, collectives: bool) -> None:
        """Bring a deferred (CUDA) step in; ``collectives`` (the hooks only, which every rank runs): a due check."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finish(pending, collectives)
        self._losses.settle(drop=self._skips.last)  # after the step's statistics: the order of a CPU run
        if collectives and self._guard is not None:
            self._state = self._state.with_log_factors(self._guard.run_due(list(self._state.log_factors)))

    def _sync_scopes(self) -> None:
        """Grow the per-scope factors and per-group references when param groups were added after attaching."""
        self._settle(collectives=False)
        groups = len(self.optimizer.param_groups)
        self._state = self._state.grown(1 if self.settings.scope == "optimizer" else groups, self._initial_log_factor)
        self.references.sync()

    def _lr_for(self, j: int, base: Any) -> float:
        state = self._state.grown(self._scope_of(j) + 1, self._initial_log_factor)  # a group added since: F_0
        scale = annealed(self.settings.schedule, self._run_step, state.anneal_stopped)
        return lr_for(self.settings.bounds, float(base), state.log_factors[self._scope_of(j)], scale)

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._swap.restore(optimizer.param_groups)  # a previous step that raised never ran the post-hook
        self._settle(collectives=True)
        self._sync_scopes()
        self.references.keys.before_step()
        self.paths.before_step(optimizer)  # gather the sample
        if self._safeguard is not None:
            self._safeguard.before_step(list(trainable(optimizer)), self._steps_seen, self._skips.last)
        groups = optimizer.param_groups
        scheduled = [float(group["lr"]) for group in groups]  # read once per step (a CUDA tensor lr: one sync)
        if self._swap.apply(groups, [self._lr_for(j, lr) for j, lr in enumerate(scheduled)], scheduled):
            self._state = self._state.with_anneal_stopped(self._run_step)  # a scheduler at work: the anneal stops

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._steps_seen += 1
        try:
            stepped = len(self._swap.used)  # the groups the pre-hook saw (and swapped)
            added = optimizer.param_groups[stepped:]
            if added:
                # added inside the step's closure (training_step): stepped at their own lr, adapted from the next
                self._swap.used.extend(float(group["lr"]) for group in added)
                self._sync_scopes()
            scopes = len(self._state.log_factors)
            step = self.paths.step(optimizer, StepInputs(self._swap.used, self.references, scopes))
            flag, counted = self._hooks.device_flag, self._hooks.skip_counted  # a fused step's skip flag
            if step is not None:
                bases = self._swap.current_bases(optimizer.param_groups)[:stepped]  # inside the step: the saved ones
                self._pending = PendingStep.send(step, self._swap.used[:stepped], flag, counted, bases)
                if not self._pending.deferred:  # on the host already: the rule runs now
                    self._settle(collectives=True)
            else:  # no tensor to adapt: the flag alone, read now
                self._skips.settled(optimizer, flag is not None and float(flag) > 0, counted)
        finally:
            self._swap.restore(optimizer.param_groups)

    def _finish(self, pending: PendingStep, collectives: bool) -> None:
        """The host part of a step: the rule on each scope's sums moves log F (float64)."""
        stats = pending.settle()
        self._skips.settled(self.optimizer, pending.skipped, pending.skip_counted)
        bounds, losses, before = self.settings.bounds, self._losses, self._state.adapted_steps
        bases = bases_by_scope(bounds, pending.bases, len(self._state.log_factors), self._scope_of)
        self._state = adapt(self._state, stats, self.settings.schedule, bounds, bases, losses.gate, losses.fitted)
        steps = self._state.adapted_steps
        if self._guard is not None and steps > before and self._guard.due(steps):
            self._guard.mark_due(pending.device)  # a collective: only where every rank runs it, never a property
            if collectives:
                self._settle(collectives=True)
        if stats.non_finite:
            _warn_non_finite(stats.non_finite)
        if steps > before:
            ratios = [self._state.ratios[self._scope_of(j)] for j in range(len(pending.lr_used))]
            for listener in self.step_listeners:
                listener(pending.lr_used, ratios)

    def observe_loss(self, loss: float | Tensor) -> bool:
        """Feed the loss of the step just taken to the loss brake and the safeguard; True on an alarm.

        On an alarm (a blow-up, a NaN/inf loss) the parameters of before that step come back (not the optimizer's
        state), F halves, a warning says so. A loss with no new step is ignored; a CUDA loss reaches the brake a
        step late, without a sync. Under DDP pass every rank the same loss (the callbacks pass the ranks' mean)."""
        if not self._losses.accepts(loss):  # raises unless it is one number
            return False
        if not self._losses.queues(loss):  # a queued CUDA loss waits for nothing: the next pre-hook settles
            self._settle(collectives=False)
        skipped = self._skips.last and self._pending is None  # a fused optimizer skipped it: nothing to judge
        if not self._losses.observe(loss, self._steps_seen, skipped) or self._safeguard is None:
            return False  # only the safeguard raises alarms
        undone = self._safeguard.undo()
        halved = [clamp_log_factor(self.settings.bounds, v - math.log(2.0)) for v in self._state.log_factors]
        self._state = self._state.with_log_factors(halved)
        warnings.warn(_alarm_message(self._losses.last_loss, self.lr_factor, undone), RuntimeWarning, stacklevel=2)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors keyed by (group index, position in group): checkpoint-safe."""
        self._sync_scopes()
        counts = (self._skips.count, self._swap.scheduled, self._run_step)
        return export_state(self.settings, self._state, self.paths.export(self.optimizer), self._losses, *counts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore paths, counters and factors saved by :meth:`state_dict` (matched by position)."""
        self._settle(collectives=False)
        self._state = restore_state(state_dict, self.settings, self.optimizer, self.paths, self._losses)
        if self._safeguard is not None:
            self._safeguard.release()  # parameters of before the load are no restore point for the loaded ones
        self._skips.count = int(state_dict.get("num_skipped_updates", 0))
        self._steps_before = run_steps(state_dict) - self._steps_seen - self._skips.on_host
        self._swap.resume(state_dict.get("scheduled_lrs", ()))
        self._sync_scopes()

    def __repr__(self) -> str:
        return _describe(self.settings, type(self.optimizer).__name__, self.lr_factors, self._state.adapted_steps)


def _describe(s: Settings, optimizer: str, factors: list[float], steps: int) -> str:
    rule = f"c={s.c}, d={s.d}, fast_start={s.fast_start}, hold_after={s.hold_after}, target={s.target}"
    rule += f", anneal={s.anneal}"
    f = ", ".join(f"{v:.4g}" for v in factors)
    return f"CLARA({optimizer}, {rule}, scope={s.scope!r}, sample={s.sample}, F=[{f}], steps={steps})"


def _warn_non_finite(tensors: int) -> None:
    warnings.warn(
        f"CLARA: {tensors} parameter tensor(s) took a NaN/inf step; they were left out of the adaptation and "
        "their paths were reset",
        RuntimeWarning,
        stacklevel=3,
    )


def _alarm_message(loss: float, new_factor: float, undone: int) -> str:
    """The safeguard's warning: what blew up, the halved F, and what was restored."""
    if undone:
        restored = f"; parameters restored from before the last {undone} step(s)"
    else:
        restored = "; parameters already restored by the previous alarm (no step since)"
    return f"CLARA safeguard: the training loss blew up ({loss:.4g}); F halved to {new_factor:.4g}{restored}"


CLARA.__doc__ = with_option_docs(CLARA.__doc__, OPTION_NAMES)
