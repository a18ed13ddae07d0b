"""An orchestration over the real ``NativeDemo`` pool, for the operations tests.

The test feeds :class:`Job` events through a queue on the per-test :class:`Bench`; the pipeline
records the memory level at the start of every ``produce_event()`` call, and the minions record
every worker call's outcome (a value or a typed error) and report each workflow's end, so tests
synchronise on queues and events instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from minions import Minion, Pipeline, minion_step
from minions.errors import Overloaded, WorkerCallError
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor
from minions.workers import WorkerPool

SERVICE = "native_demo.service:NativeDemo"


@dataclass
class Job:
    n: int = 0
    op: str = "crc32"  # crc32 | segfault | ping | leak
    arg: int = 0
    gated: bool = False  # LeakMinion: leak again, then ping, each when the test opens a gate


@dataclass
class JobContext:
    values: list[int] = field(default_factory=list)


class Bench:
    def __init__(self) -> None:
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.finished: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.outcomes: list[object] = []
        self.pulls: list[MemoryLevel] = []
        self.gates: dict[tuple[int, str], asyncio.Event] = {}
        self.monitor: MemoryMonitor | None = None
        self.pools: list[WorkerPool] = []

    def level(self) -> MemoryLevel:
        return self.monitor.level if self.monitor is not None else MemoryLevel.NORMAL

    async def take(self, count: int, timeout: float = 20.0) -> list[tuple[int, str]]:
        return [await asyncio.wait_for(self.finished.get(), timeout) for _ in range(count)]


_BENCH: list[Bench] = []


def bench() -> Bench:
    return _BENCH[-1]


def use_bench() -> Bench:
    _BENCH.clear()
    _BENCH.append(Bench())
    return _BENCH[-1]


class CrashPool(WorkerPool):
    service = SERVICE
    workers = 2
    call_timeout_s = 5.0
    restart_intensity = 50
    retries_on_crash = 0


class LeakPool(WorkerPool):
    service = SERVICE
    workers = 1
    call_timeout_s = 10.0

    async def startup(self) -> None:
        bench().pools.append(self)
        await super().startup()


class JobPipeline(Pipeline[Job]):
    async def produce_event(self) -> Job:
        b = bench()
        b.pulls.append(b.level())  # a pull that begins while HIGH would break the pause
        return await b.jobs.get()


async def recorded(call: Callable[[], object]) -> object:
    """Await one worker call and record how it ended: a value or a typed error."""
    try:
        value = await call()  # type: ignore[misc]
    except WorkerCallError as exc:
        bench().outcomes.append(exc)
        raise
    bench().outcomes.append(value)
    return value


class CrashMinion(Minion[Job, JobContext]):
    """One call per workflow: ``crc32`` succeeds, ``segfault`` kills a real worker."""

    pool: CrashPool

    @minion_step
    async def work(self) -> None:
        job = self.event
        try:
            if job.op == "segfault":
                await recorded(lambda: self.pool.call("segfault"))
            else:
                crc = await recorded(lambda: self.pool.call("crc32", b"job %d" % job.n))
                self.context.values.append(crc)  # type: ignore[arg-type]
        except WorkerCallError:
            bench().finished.put_nowait((job.n, "failed"))
            raise

    @minion_step
    async def report(self) -> None:
        bench().finished.put_nowait((self.event.n, "succeeded"))


async def shed_tolerant(pool: WorkerPool, method: str, *args: object) -> object:
    """A call that rides out memory pressure: shed with ``Overloaded``, it waits for the level
    to fall below CRITICAL and tries once more, so its workflow does not fail."""
    try:
        return await recorded(lambda: pool.call(method, *args))
    except Overloaded:
        monitor = bench().monitor
        assert monitor is not None
        await monitor.wait_level_below(MemoryLevel.CRITICAL)
        return await recorded(lambda: pool.call(method, *args))


class LeakMinion(Minion[Job, JobContext]):
    """``op(arg)``; a gated job then leaks ``arg`` MiB more and pings, each after its gate
    (``Bench.gates[(n, "more")]`` and ``[(n, "probe")]``) opens."""

    pool: LeakPool

    async def _gate(self, name: str) -> None:
        await bench().gates.setdefault((self.event.n, name), asyncio.Event()).wait()

    @minion_step
    async def first(self) -> None:
        job = self.event
        value = await shed_tolerant(self.pool, job.op, job.arg)
        self.context.values.append(value)  # type: ignore[arg-type]

    @minion_step
    async def more(self) -> None:
        if self.event.gated:
            await self._gate("more")
            value = await shed_tolerant(self.pool, "leak", self.event.arg)
            self.context.values.append(value)  # type: ignore[arg-type]

    @minion_step
    async def probe(self) -> None:
        if self.event.gated:
            await self._gate("probe")
            await shed_tolerant(self.pool, "ping", self.event.n)
        bench().finished.put_nowait((self.event.n, "succeeded"))


class QuietMinion(Minion[Job, JobContext]):
    """No resources: for tests about Gru itself."""

    @minion_step
    async def only(self) -> None:
        bench().finished.put_nowait((self.event.n, "succeeded"))
