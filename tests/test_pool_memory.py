"""Real memory pressure on a standalone pool: the demo extension leaks, the pool's own monitor
throttles, sheds, recycles the bloated worker and recovers by itself."""

from __future__ import annotations

import asyncio
import types

import psutil
import pytest

from conftest import eventually, run
from minions.errors import Overloaded
from minions.ops.memory import MemoryThresholds
from minions.workers import MemoryLevel, PoolConfig, WorkerPool
from pools import SERVICE

MiB = 2**20


class Leaky(WorkerPool):
    service = SERVICE
    workers = 1
    call_timeout_s = 10.0


def _total_rss(pool: WorkerPool) -> int:
    pids = [psutil.Process().pid, *pool.worker_pids()]
    return sum(psutil.Process(p).memory_info().rss for p in pids)


@pytest.mark.timeout(60)
def test_leak_drives_levels_up_and_the_pool_recovers() -> None:
    async def scenario() -> None:
        async with Leaky() as probe:  # measure Gru + one idle worker first
            baseline = _total_rss(probe)
        memory = MemoryThresholds(
            soft_bytes=baseline + 100 * MiB,
            hard_bytes=baseline + 250 * MiB,
            host_soft_fraction=None,
            host_hard_fraction=None,
        )
        pool = Leaky(PoolConfig.from_class(Leaky, memory=memory))
        async with pool:
            first_pid = await pool.call("pid")
            assert await pool.call("leak", 150) == 150

            def level_is(level: MemoryLevel) -> bool:
                return pool.snapshot().memory_level is level

            assert await pool._wait_until(lambda: level_is(MemoryLevel.HIGH), 15)
            pings = [asyncio.create_task(pool.call("ping", i)) for i in range(5)]
            await asyncio.sleep(0)
            assert pool.snapshot().in_flight == 1  # throttled: the rest wait in the queue
            assert await asyncio.gather(*pings) == list(range(5))

            assert await pool.call("leak", 150) == 300
            assert await pool._wait_until(lambda: level_is(MemoryLevel.CRITICAL), 15)
            with pytest.raises(Overloaded, match="memory"):
                await pool.call("ping", 99)  # shed while critical

            assert await pool._wait_until(lambda: level_is(MemoryLevel.NORMAL), 20)
            assert await pool.call("pid") != first_pid  # the bloated worker was recycled
            assert await pool.call("leak", 0) == 0

    run(scenario(), timeout=55)


def test_a_pool_that_follows_a_monitor_never_measures_its_workers_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker memory is measured once, by the monitor's sample; the pool recycles from it."""
    from minions.pool import supervisor

    measured_by_pool: list[int] = []

    def spy(pid: int) -> psutil.Process:
        measured_by_pool.append(pid)
        return psutil.Process(pid)

    # only the pool's own reference to psutil is watched; the monitor measures as usual
    monkeypatch.setattr(
        supervisor, "psutil", types.SimpleNamespace(Process=spy, Error=psutil.Error)
    )
    memory = MemoryThresholds(
        soft_bytes=2**40, hard_bytes=2**41, host_soft_fraction=None, host_hard_fraction=None
    )

    class Watched(Leaky):
        max_rss_mb = 80
        rss_check_s = 0.05

    async def scenario() -> None:
        async with Watched(PoolConfig.from_class(Watched, memory=memory)) as pool:
            first = await pool.call("pid")
            assert await pool.call("leak", 100) == 100
            assert await pool._wait_until(lambda: first not in pool.worker_pids(), 10)
            assert await pool.call("pid") != first  # recycled on the monitor's figures
            await eventually(lambda: pool.snapshot().workers[0].rss_bytes > 0)  # status rows too
        assert measured_by_pool == []

    run(scenario(), timeout=30)
