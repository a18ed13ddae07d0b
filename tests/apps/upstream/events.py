"""Event, context and config types shared by the upstream-form components."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from apps.harness import h
from minions import Pipeline


@dataclass
class Order:
    n: int = 0


@dataclass
class OrderCtx:
    seen: list[str] = field(default_factory=list)


@dataclass
class RegionConfig:
    region: str
    retries: int = 1


class StructConfig(msgspec.Struct):
    region: str
    retries: int = 1


class OrderPipeline(Pipeline[Order]):
    async def produce_event(self) -> Order:
        ev = await h().events.get()
        return Order(ev.n)
