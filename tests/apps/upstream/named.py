"""Several components, and the module-level variables that name the entry points."""

from __future__ import annotations

from apps.harness import h
from apps.upstream.events import Order, OrderCtx, OrderPipeline
from minions import Minion, minion_step


class Helper(Minion[Order, OrderCtx]):
    @minion_step
    async def never(self) -> None:
        raise AssertionError("the named entry point is ChosenMinion")


class ChosenMinion(Minion[Order, OrderCtx]):
    @minion_step
    async def record(self) -> None:
        h().finished.put_nowait(("chosen", self.event.n))


minion = ChosenMinion
pipeline = OrderPipeline
