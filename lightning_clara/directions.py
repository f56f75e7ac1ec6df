"""Where a step's direction comes from.

CLARA needs, per parameter tensor, a tensor *proportional* to the realised step
``s_k = theta_k(before) - theta_k(after)``. Two ways to get it:

* :class:`DeltaReader` -- snapshot the parameters before the step and subtract afterwards.
  Works for any optimizer; costs one parameter-sized buffer and two passes.
* state readers -- rebuild the step from what the optimizer keeps anyway, after it ran:
  :class:`SGDStateReader` (gradient / ``momentum_buffer``) and :class:`AdamStateReader`
  (``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``). No snapshot, no persistent memory.
  Weight decay is folded in exactly: with ``theta_before = theta_after + s`` an L2 or
  decoupled decay term ``wd * theta_before`` becomes ``(... + wd * theta_after) / (1 - lr * wd)``.

:class:`GradientReader` gives the raw (sign-corrected) gradient, the direction SALeRA used.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["AdamStateReader", "DeltaReader", "DirectionReader", "GradientReader", "SGDStateReader"]


class DirectionReader(ABC):
    """Produces, after ``optimizer.step()``, a tensor proportional to each parameter's realised step."""

    #: Short name used in messages and ``state_dict``.
    name: str = "reader"
    #: Whether :meth:`before_step` must snapshot parameters.
    needs_snapshot: bool = False

    def before_step(self, params: Sequence[Tensor]) -> None:  # noqa: B027 - optional hook
        """Called in the optimizer's step pre-hook with every trainable parameter."""

    @abstractmethod
    def directions(self, optimizer: Optimizer, group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        """Directions for ``params`` (tensors of one param group that have a gradient).

        Returned tensors may be scratch buffers or the optimizer's own state: callers must
        treat them as read-only and must not keep them beyond the step.
        """

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free persistent buffers (when the controller detaches)."""


def _buffers_like(store: dict[Tensor, Tensor], params: Sequence[Tensor], views: Sequence[Tensor]) -> list[Tensor]:
    """Persistent buffers keyed by parameter, shaped like its view (allocated once, reused every step)."""
    out = []
    for param, view in zip(params, views, strict=True):
        buffer = store.get(param)
        if buffer is None or buffer.shape != view.shape or buffer.dtype != view.dtype:
            buffer = torch.empty_like(view, memory_format=torch.preserve_format)
            store[param] = buffer
        out.append(buffer)
    return out


class DeltaReader(DirectionReader):
    """``theta(before) - theta(after)`` from a snapshot taken in the step pre-hook (any optimizer).

    Args:
        keep_snapshots: also keep the parameters from before the last *two* steps, so that
            :meth:`undo` can restore them bit for bit (the safeguard's need). Costs two more
            parameter-sized buffers; without it the step is computed in place in the snapshot.
        view: maps a parameter to the tensor that holds its data on this rank (a DTensor's local
            shard); buffers are keyed by the parameter and shaped like the view.
    """

    name = "delta"
    needs_snapshot = True

    def __init__(self, keep_snapshots: bool = False, view: Callable[[Tensor], Tensor] | None = None) -> None:
        self.keep_snapshots = keep_snapshots
        self._view = view
        self._snapshots: dict[Tensor, Tensor] = {}  # theta before the last step (or, in place, its step)
        self._previous: dict[Tensor, Tensor] = {}  # theta before the step before (keep_snapshots)
        self._scratch: dict[Tensor, Tensor] = {}  # the last step (keep_snapshots)
        self._valid_current: set[Tensor] = set()
        self._valid_previous: set[Tensor] = set()

    def before_step(self, params: Sequence[Tensor]) -> None:
        if self.keep_snapshots:
            # the snapshot of the last step becomes the previous one: swap the buffers, no copy
            self._previous, self._snapshots = self._snapshots, self._previous
            self._valid_previous, self._valid_current = self._valid_current, set()
        else:
            self._valid_current = set()
        views = self._views(params)
        buffers = _buffers_like(self._snapshots, params, views)
        if params:
            with torch.no_grad():
                torch._foreach_copy_(buffers, views)
        if self.keep_snapshots:
            self._valid_current = set(params)

    def directions(self, optimizer: Optimizer, group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        missing = [p for p in params if p not in self._snapshots]
        if missing:
            raise RuntimeError(
                "DeltaReader: a parameter was stepped without a snapshot; parameters added to the "
                "optimizer inside the step are not supported"
            )
        snapshots = [self._snapshots[p] for p in params]
        views = self._views(params)
        with torch.no_grad():
            if not self.keep_snapshots:
                torch._foreach_sub_(snapshots, views)
                return snapshots
            steps = _buffers_like(self._scratch, params, views)
            torch._foreach_copy_(steps, snapshots)
            torch._foreach_sub_(steps, views)
            return steps

    def _views(self, params: Sequence[Tensor]) -> list[Tensor]:
        detached = [p.detach() for p in params]
        return detached if self._view is None else [self._view(p) for p in detached]

    def undo(self) -> int:
        """Restore the parameters from before the last two steps (or the last one, if only that is
        held); returns how many steps were undone (0 without ``keep_snapshots``)."""
        if not self.keep_snapshots or not self._valid_current:
            return 0
        undone = 1
        source = {p: self._snapshots[p] for p in self._valid_current}
        if self._valid_previous >= self._valid_current:
            source = {p: self._previous[p] for p in self._valid_current}
            undone = 2
        params = list(source)
        with torch.no_grad():
            torch._foreach_copy_(self._views(params), [source[p] for p in params])
        self._valid_current, self._valid_previous = set(), set()
        return undone

    def release(self) -> None:
        self._snapshots.clear()
        self._previous.clear()
        self._scratch.clear()
        self._valid_current, self._valid_previous = set(), set()


def _signed_gradients(group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
    grads = [p.grad.detach() for p in params]  # type: ignore[union-attr]
    return torch._foreach_neg(grads) if group.get("maximize", False) else grads


def _decay_sign(lr: Any, weight_decay: float) -> float:
    """The sign of ``1 / (1 - lr * wd)``, the factor that maps the after-step parameter back into
    the step (see the module docstring). Its size drops out of the unit vector; its sign does not."""
    product = float(lr) * weight_decay
    if product == 1.0:
        raise ValueError("lr * weight_decay == 1 makes the step direction undefined; use direction='delta'")
    return 1.0 if product < 1.0 else -1.0


class GradientReader(DirectionReader):
    """The raw gradient (negated with ``maximize``): SALeRA's direction, whatever the optimizer."""

    name = "gradient"

    def directions(self, optimizer: Optimizer, group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        return _signed_gradients(group, params)


class _ScratchReader(DirectionReader):
    """A state reader that builds its directions in scratch buffers.

    On the CPU the buffers persist (one per parameter, like the step itself) and every tensor is
    computed by a few ``out=`` kernels: a fresh allocation each step costs page faults that take
    longer than the arithmetic. Elsewhere (CUDA) torch's caching allocator makes fresh buffers
    free, and ``torch._foreach_*`` kernels save a launch per tensor, so the buffers are allocated.
    """

    def __init__(self) -> None:
        self._scratch: dict[Tensor, Tensor] = {}

    def _persistent(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """Persistent buffers when every tensor is on the CPU, else None (use foreach kernels)."""
        if any(p.device.type != "cpu" for p in params):
            return None
        return _buffers_like(self._scratch, params, [p.detach() for p in params])

    def release(self) -> None:
        self._scratch.clear()


class SGDStateReader(_ScratchReader):
    """``torch.optim.SGD``: the momentum buffer, or the (weight-decayed) gradient, read after the step."""

    name = "state"

    def directions(self, optimizer: Optimizer, group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        momentum = float(group.get("momentum", 0.0))
        weight_decay = float(group.get("weight_decay", 0.0))
        nesterov = bool(group.get("nesterov", False))
        if momentum != 0.0 and not nesterov:
            return [optimizer.state[p]["momentum_buffer"] for p in params]
        if weight_decay == 0.0 and not nesterov:
            return _signed_gradients(group, params)
        # step ∝ sign * (g + sign * wd * theta_after + momentum * buf), sign = -1 with maximize,
        # times the sign of the decay factor when there is weight decay
        sign = -1.0 if group.get("maximize", False) else 1.0
        grads = [p.grad.detach() for p in params]  # type: ignore[union-attr]
        thetas = [p.detach() for p in params]
        buffers = [optimizer.state[p]["momentum_buffer"] for p in params] if nesterov else []
        out = self._persistent(params)
        if out is None:
            out = list(torch._foreach_add(grads, thetas, alpha=sign * weight_decay))
            if nesterov:
                torch._foreach_add_(out, buffers, alpha=sign * momentum)
        else:
            for k, (buffer, grad, theta) in enumerate(zip(out, grads, thetas, strict=True)):
                torch.add(grad, theta, alpha=sign * weight_decay, out=buffer)
                if nesterov:
                    buffer.add_(buffers[k], alpha=sign * momentum)
        if weight_decay != 0.0:
            sign *= _decay_sign(group["lr"], weight_decay)
        if sign < 0.0:
            torch._foreach_neg_(out)
        return out


class AdamStateReader(_ScratchReader):
    """``torch.optim.Adam`` / ``AdamW``: ``m_hat / (sqrt(v_hat) + eps)`` (+ decoupled decay), read after the step."""

    name = "state"

    def directions(self, optimizer: Optimizer, group: Mapping[str, Any], params: Sequence[Tensor]) -> list[Tensor]:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        amsgrad = bool(group.get("amsgrad", False))
        weight_decay = float(group.get("weight_decay", 0.0))
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(optimizer, torch.optim.AdamW)
        decay = weight_decay if decoupled else 0.0  # L2 decay is inside m and v already
        by_step: dict[float, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_step[float(optimizer.state[p]["step"])].append(i)
        out: list[Tensor | None] = [None] * len(params)
        for step, indices in by_step.items():
            chosen = [params[i] for i in indices]
            states = [optimizer.state[p] for p in chosen]
            second = [s["max_exp_avg_sq"] if amsgrad else s["exp_avg_sq"] for s in states]
            first = [s["exp_avg"] for s in states]
            # m_hat / (sqrt(v_hat) + eps) = k * m / (sqrt(v) + eps * b) with b = sqrt(1 - beta2^t),
            # k = b / (1 - beta1^t) > 0; with decoupled decay the step is ∝ that + wd * theta_after,
            # i.e. ∝ theta_after + (k / wd) * m / (sqrt(v) + eps * b): positive factors drop out
            bias2_sqrt = math.sqrt(1.0 - beta2**step)
            scale = bias2_sqrt / (1.0 - beta1**step)
            thetas = [p.detach() for p in chosen]
            scratch = self._persistent(chosen)
            if scratch is None:
                denominators = torch._foreach_sqrt(second)
                torch._foreach_add_(denominators, eps * bias2_sqrt)
                if decay == 0.0:
                    scratch = list(torch._foreach_div(first, denominators))
                else:
                    scratch = list(torch._foreach_addcdiv(thetas, first, denominators, scale / decay))
            else:
                for k, buffer in enumerate(scratch):
                    torch.sqrt(second[k], out=buffer)
                    buffer.add_(eps * bias2_sqrt)
                    if decay == 0.0:
                        torch.div(first[k], buffer, out=buffer)
                    else:
                        torch.addcdiv(thetas[k], first[k], buffer, value=scale / decay, out=buffer)
            if decay != 0.0 and _decay_sign(group["lr"], decay) < 0.0:
                torch._foreach_neg_(scratch)
            for i, tensor in zip(indices, scratch, strict=True):
                out[i] = tensor
        return out  # type: ignore[return-value]
