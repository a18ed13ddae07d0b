"""A module with exactly one local Minion subclass (and an imported one, which does not count)."""

from __future__ import annotations

from apps.harness import h
from apps.upstream.events import Order, OrderCtx, OrderPipeline, RegionConfig
from minions import Minion, minion_step

__all__ = ["OrderPipeline"]  # imported here, but defined elsewhere: not this module's pipeline


class OrderMinion(Minion[Order, OrderCtx]):
    config: RegionConfig

    @minion_step
    async def record(self) -> None:
        handle = self.workflow_handle
        region = self.config.region if self.config is not None else "-"
        h().finished.put_nowait((handle.orchestration_id, handle.workflow_id, region, self.event.n))
