"""Strategy adapters: how CLARA sees a Lightning strategy's parameters, one class and one table row each.

The callback looks the strategy's class and its bases up in :data:`STRATEGY_ADAPTERS` (the first
match along the MRO wins, so DeepSpeed, which subclasses DDP, is refused before DDP is accepted).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_clara.distributed import Sharding, dtensor_sharding

__all__ = ["STRATEGY_ADAPTERS", "DTensorSharded", "Replicated", "StrategyAdapter", "Unsupported", "sharding_for"]


class StrategyAdapter:
    """Maps a fit's strategy to the :class:`~lightning_clara.distributed.Sharding` CLARA uses."""

    def sharding(self, trainer: pl.Trainer) -> Sharding | None:
        raise NotImplementedError


class Replicated(StrategyAdapter):
    """Whole parameters, identical steps on every rank: no collective needed (single device, DDP)."""

    def sharding(self, trainer: pl.Trainer) -> Sharding | None:
        return None


class DTensorSharded(StrategyAdapter):
    """DTensor parameters sharded on one 1-D mesh (FSDP2's ``fully_shard`` through ``configure_model``)."""

    def sharding(self, trainer: pl.Trainer) -> Sharding | None:
        params = (p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"])
        return dtensor_sharding(params, "CLARACallback with ModelParallelStrategy") or Sharding.for_dtensors(None)


class Unsupported(StrategyAdapter):
    """A shard layout CLARA does not read yet (FSDP1 flat parameters, DeepSpeed ZeRO partitions)."""

    def sharding(self, trainer: pl.Trainer) -> Sharding | None:
        raise NotImplementedError(
            f"CLARACallback does not support the {type(trainer.strategy).__name__} strategy yet: its shard layout "
            "(FSDP1 flat parameters, DeepSpeed ZeRO partitions) is not wired in. Supported: single device, DDP "
            "(ddp, ddp_spawn, ddp_fork, ddp_notebook) and ModelParallelStrategy with FSDP2 (fully_shard)."
        )


#: By strategy class name; a strategy not found along its MRO is unsupported.
STRATEGY_ADAPTERS: dict[str, StrategyAdapter] = {
    "DeepSpeedStrategy": Unsupported(),  # subclasses DDPStrategy but partitions state in its engine
    "SingleDeviceStrategy": Replicated(),
    "DDPStrategy": Replicated(),
    "ModelParallelStrategy": DTensorSharded(),
}


def sharding_for(trainer: pl.Trainer) -> Sharding | None:
    """None for replicated parameters; the DTensor sharding for FSDP2; ``NotImplementedError`` otherwise."""
    strategy: Any = trainer.strategy
    for cls in type(strategy).__mro__:
        adapter = STRATEGY_ADAPTERS.get(cls.__name__)
        if adapter is not None:
            return adapter.sharding(trainer)
    return Unsupported().sharding(trainer)
