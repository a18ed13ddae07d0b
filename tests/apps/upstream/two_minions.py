"""Two local Minion subclasses and no ``minion =``: ambiguous as a start target."""

from __future__ import annotations

from apps.upstream.events import Order, OrderCtx
from minions import Minion, minion_step


class First(Minion[Order, OrderCtx]):
    @minion_step
    async def one(self) -> None:
        pass


class Second(Minion[Order, OrderCtx]):
    @minion_step
    async def one(self) -> None:
        pass
