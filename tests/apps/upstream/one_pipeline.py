"""A module with exactly one local Pipeline subclass."""

from __future__ import annotations

from apps.harness import h
from apps.upstream.events import Order
from minions import Pipeline


class LocalOrders(Pipeline[Order]):
    async def produce_event(self) -> Order:
        ev = await h().events.get()
        return Order(ev.n)
