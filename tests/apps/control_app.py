"""An orchestration over a real pool whose workflows stay in flight until the test lets them
go, for the control endpoint's tests: each workflow makes one real worker call, reports it, and
waits on the bench's gate; every call's outcome is recorded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from minions import Minion, Pipeline, minion_step
from minions.workers import WorkerPool

SERVICE = "native_demo.service:NativeDemo"


@dataclass
class Tick:
    n: int = 0


@dataclass
class TickContext:
    crcs: list[int] = field(default_factory=list)


class Bench:
    def __init__(self) -> None:
        self.ticks: asyncio.Queue[Tick] = asyncio.Queue()
        self.called: asyncio.Queue[int] = asyncio.Queue()
        self.finished: asyncio.Queue[int] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.failures: list[BaseException] = []


_BENCH: list[Bench] = []


def bench() -> Bench:
    return _BENCH[-1]


def use_bench() -> Bench:
    _BENCH.clear()
    _BENCH.append(Bench())
    return _BENCH[-1]


class ControlPool(WorkerPool):
    service = SERVICE
    workers = 2
    call_timeout_s = 10.0


class TickPipeline(Pipeline[Tick]):
    async def produce_event(self) -> Tick:
        return await bench().ticks.get()


class TickMinion(Minion[Tick, TickContext]):
    pool: ControlPool

    @minion_step
    async def call(self) -> None:
        try:
            self.context.crcs.append(await self.pool.call("crc32", b"tick %d" % self.event.n))
        except Exception as exc:
            bench().failures.append(exc)
            raise
        bench().called.put_nowait(self.event.n)

    @minion_step
    async def hold(self) -> None:
        await bench().gate.wait()
        bench().finished.put_nowait(self.event.n)
