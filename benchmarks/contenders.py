"""The contenders of ``bench_pool.py``, all behind one tiny async interface.

Every contender answers ``await ping(x)`` from asyncio by running ``native_demo._native.ping`` in a
child process. ``crash()`` makes one child die of SIGSEGV and returns once the caller has been told;
``recover()`` is what a user of that library must do afterwards before calling again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Protocol

import bench_tasks
from raw_floor import RawFloor

SERVICE = "native_demo.service:NativeDemo"


class Contender(Protocol):
    name: str

    async def start(self) -> None: ...
    async def ping(self, x: int) -> int: ...
    async def close(self) -> None: ...


class CrashSubject(Contender, Protocol):
    async def crash(self) -> BaseException: ...
    async def recover(self) -> None: ...


async def _warm(c: Contender, n: int) -> None:
    """Start every child and import the extension in it before anything is timed."""
    for _ in range(3):
        got = await asyncio.gather(*(c.ping(i) for i in range(n)))
        assert got == list(range(n)), f"{c.name}: wrong ping results"


class StdlibPool:
    """``concurrent.futures.ProcessPoolExecutor`` (platform default start method)."""

    name = "ProcessPoolExecutor"

    def __init__(self, workers: int = 2) -> None:
        self._workers = workers
        self._ex = concurrent.futures.ProcessPoolExecutor(workers)

    async def start(self) -> None:
        await _warm(self, 4 * self._workers)

    async def ping(self, x: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._ex, bench_tasks.ping, x)

    async def crash(self) -> BaseException:
        try:
            await asyncio.get_running_loop().run_in_executor(self._ex, bench_tasks.segfault)
        except concurrent.futures.process.BrokenProcessPool as exc:
            return exc
        raise AssertionError("segfault() returned")

    async def recover(self) -> None:
        # A broken executor refuses all further work: the only way on is a new one.
        self._ex.shutdown(wait=False)
        self._ex = concurrent.futures.ProcessPoolExecutor(self._workers)

    async def close(self) -> None:
        await asyncio.to_thread(self._ex.shutdown, True)


class LokyPool:
    """``loky.get_reusable_executor`` (fresh interpreters via loky's own start method)."""

    name = "loky"

    def __init__(self, workers: int = 2) -> None:
        import loky

        self._loky = loky
        self._workers = workers
        self._ex = loky.get_reusable_executor(max_workers=workers)

    async def start(self) -> None:
        await _warm(self, 4 * self._workers)

    async def ping(self, x: int) -> int:
        return await asyncio.wrap_future(self._ex.submit(bench_tasks.ping, x))

    async def crash(self) -> BaseException:
        try:
            await asyncio.wrap_future(self._ex.submit(bench_tasks.segfault))
        except self._loky.process_executor.TerminatedWorkerError as exc:
            return exc
        raise AssertionError("segfault() returned")

    async def recover(self) -> None:
        # loky's documented recovery: ask for the reusable executor again, it rebuilds itself.
        self._ex = self._loky.get_reusable_executor(max_workers=self._workers)

    async def close(self) -> None:
        await asyncio.to_thread(self._ex.shutdown, True)


class PebblePool:
    """``pebble.ProcessPool``; it replaces dead workers by itself."""

    name = "pebble"

    def __init__(self, workers: int = 2) -> None:
        import pebble

        self._pebble = pebble
        self._workers = workers
        self._pool = pebble.ProcessPool(max_workers=workers)

    async def start(self) -> None:
        await _warm(self, 4 * self._workers)

    async def ping(self, x: int) -> int:
        return await asyncio.wrap_future(self._pool.schedule(bench_tasks.ping, args=(x,)))

    async def crash(self) -> BaseException:
        try:
            await asyncio.wrap_future(self._pool.schedule(bench_tasks.segfault))
        except self._pebble.ProcessExpired as exc:
            return exc
        raise AssertionError("segfault() returned")

    async def recover(self) -> None:
        pass

    async def close(self) -> None:
        self._pool.close()
        await asyncio.to_thread(self._pool.join)


class Floor(RawFloor):
    """The raw floor (one DEALER child) with the same warm-up as the others."""

    async def start(self) -> None:
        await super().start()
        await _warm(self, 8)


def minions_unavailable() -> str | None:
    """Why the Minions contender cannot run, or ``None`` if ``minions.workers`` imports."""
    try:
        from minions.workers import WorkerPool  # noqa: F401
    except Exception as exc:  # a half-written module may fail in any way, not just ImportError
        return f"minions.workers does not import yet ({type(exc).__name__}: {exc})"
    return None


class MinionsPool:
    """The Minions ``WorkerPool`` serving ``NativeDemo``, configured by subclass attributes."""

    def __init__(self, workers: int = 2, spare_workers: int = 0) -> None:
        from minions.workers import WorkerPool

        self.name = "minions" if spare_workers == 0 else f"minions spare={spare_workers}"
        self._workers = workers
        cls_name = f"BenchNativeDemo{workers}w{spare_workers}s"
        attrs = {"service": SERVICE, "workers": workers, "spare_workers": spare_workers}
        self._cls = type(cls_name, (WorkerPool,), attrs)
        self._cm = self._cls()
        self._pool = None

    async def start(self) -> None:
        self._pool = await self._cm.__aenter__()
        await _warm(self, 4 * self._workers)

    async def ping(self, x: int) -> int:
        return await self._pool.call("ping", x)

    async def crash(self) -> BaseException:
        from minions.errors import WorkerCrashed

        try:
            await self._pool.call("segfault")
        except WorkerCrashed as exc:
            return exc
        raise AssertionError("segfault() returned")

    async def recover(self) -> None:
        pass  # the pool respawns by itself; calls wait in its queue meanwhile

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


# name accepted by --only -> factory of the throughput/latency contender
LATENCY_CONTENDERS = {
    "floor": Floor,
    "ppe": StdlibPool,
    "loky": LokyPool,
    "pebble": PebblePool,
    "minions": MinionsPool,
}

# name accepted by --only -> (label, factory) of one-worker crash subjects: one worker, so the
# measurement is the replacement of the dead worker, not a surviving sibling answering the ping
CRASH_SUBJECTS = {
    "ppe": [("ProcessPoolExecutor", lambda: StdlibPool(1))],
    "loky": [("loky", lambda: LokyPool(1))],
    "pebble": [("pebble", lambda: PebblePool(1))],
    "minions": [
        ("minions spare_workers=0", lambda: MinionsPool(1, 0)),
        ("minions spare_workers=1", lambda: MinionsPool(1, 1)),
    ],
}
