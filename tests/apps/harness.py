"""In-process test components for the Gru runtime, driven by a per-test :class:`Harness`.

Pipelines read events from the harness queue and minions report to it, so tests synchronise on
queues and events instead of sleeping. ``use_harness()`` must be called inside the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from minions import AbortWorkflow, Gru, Minion, Pipeline, Resource, minion_step


@dataclass
class Ev:
    n: int = 0


@dataclass
class Ctx:
    trail: list[str] = field(default_factory=list)


class Harness:
    def __init__(self) -> None:
        self.events: asyncio.Queue[Ev] = asyncio.Queue()
        self.other_events: asyncio.Queue[Ev] = asyncio.Queue()
        self.finished: asyncio.Queue[tuple[str, int, list[str]]] = asyncio.Queue()
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.release = asyncio.Event()
        self.lifecycle: list[str] = []
        self.fail_startup: set[str] = set()
        self.produce_failures = 0

    async def take(self, queue: asyncio.Queue, count: int, timeout: float = 10.0) -> list:
        return [await asyncio.wait_for(queue.get(), timeout) for _ in range(count)]


_H: list[Harness] = []


def h() -> Harness:
    return _H[-1]


def use_harness() -> Harness:
    _H.clear()
    _H.append(Harness())
    return _H[-1]


@contextlib.asynccontextmanager
async def running_gru(**kwargs: object) -> AsyncIterator[Gru]:
    """A Gru that is always shut down, even when the test fails."""
    kwargs.setdefault("state_store", None)
    kwargs.setdefault("metrics", False)  # tests never fight over port 8081
    gru = await Gru.create(**kwargs)
    try:
        yield gru
    finally:
        await gru.shutdown()


class Lifecycle:
    """Mixin: record startup/shutdown, fail startup on request."""

    async def startup(self) -> None:
        name = type(self).__name__
        if name in h().fail_startup:
            raise RuntimeError(f"{name} refuses to start")
        h().lifecycle.append(f"start {name}")

    async def shutdown(self) -> None:
        h().lifecycle.append(f"stop {type(self).__name__}")


class Db(Lifecycle, Resource):
    pass


class Cache(Lifecycle, Resource):
    db: Db


class Api(Lifecycle, Resource):
    cache: Cache
    db: Db


class Lonely(Lifecycle, Resource):
    pass


class CycleA(Resource):
    b: CycleB


class CycleB(Resource):
    a: CycleA


class QPipeline(Lifecycle, Pipeline[Ev]):
    db: Db

    async def produce_event(self) -> Ev:
        return await h().events.get()


class OtherPipeline(Lifecycle, Pipeline[Ev]):
    async def produce_event(self) -> Ev:
        return await h().other_events.get()


class FlakyPipeline(Pipeline[Ev]):
    """Raises on its first ``produce_failures`` calls, then serves the queue."""

    async def produce_event(self) -> Ev:
        if h().produce_failures > 0:
            h().produce_failures -= 1
            raise ConnectionError("source unavailable")
        return await h().events.get()


class RecMinion(Lifecycle, Minion[Ev, Ctx]):
    api: Api

    @minion_step
    async def first(self) -> None:
        self.context.trail.append("first")
        if self.event.n < 0:
            raise ValueError("negative events are rejected")
        if self.event.n == 13:
            raise AbortWorkflow("unlucky")

    @minion_step
    async def second(self) -> None:
        self.context.trail.append("second")
        h().finished.put_nowait((type(self).__name__, self.event.n, list(self.context.trail)))


class PlainMinion(Minion[Ev, Ctx]):
    @minion_step
    async def only(self) -> None:
        self.context.trail.append("only")
        h().finished.put_nowait((type(self).__name__, self.event.n, list(self.context.trail)))


class LonelyMinion(Minion[Ev, Ctx]):
    lonely: Lonely

    @minion_step
    async def only(self) -> None:
        h().finished.put_nowait((type(self).__name__, self.event.n, []))


class GatedMinion(Minion[Ev, Ctx]):
    """Blocks in its first step until ``release`` is set; reports when it enters it."""

    @minion_step
    async def wait_gate(self) -> None:
        self.context.trail.append("gate")
        h().started.put_nowait(self.event.n)
        await h().release.wait()

    @minion_step
    async def after(self) -> None:
        self.context.trail.append("after")
        h().finished.put_nowait((type(self).__name__, self.event.n, list(self.context.trail)))
