"""Every call ends, nothing leaks: random native faults under load, and many crash cycles."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import zlib
from typing import Any

import psutil
import pytest

from conftest import eventually, run
from minions.errors import CallTimeout, RemoteError, WorkerCrashed
from minions.workers import WorkerPool
from pools import SERVICE


class ChaosPool(WorkerPool):
    service = SERVICE
    workers = 2
    spare_workers = 1
    call_timeout_s = 1.5
    restart_intensity = 10_000


PRIMES_BELOW = {1000: 168, 10_000: 1229, 50_000: 5133}


def _plan(rng: random.Random, i: int) -> tuple[str, tuple[Any, ...], Any]:
    """One call: (method, args, expected value or expected error type)."""
    roll = rng.random()
    if roll < 0.02:
        return "segfault", (), WorkerCrashed
    if roll < 0.03:
        return "abort", (), WorkerCrashed
    if roll < 0.04:
        return "exit", (rng.randint(1, 100),), WorkerCrashed
    if roll < 0.07:
        return "fail", (f"boom {i}",), RemoteError
    if roll < 0.09:
        return "crc32", (i,), RemoteError  # wrong argument type
    if roll < 0.4:
        n = rng.choice(list(PRIMES_BELOW))
        return "count_primes", (n,), PRIMES_BELOW[n]
    if roll < 0.7:
        data = rng.randbytes(rng.randint(0, 4096))
        return "crc32", (data,), zlib.crc32(data)
    return "ping", (i,), i


@pytest.mark.timeout(150)
def test_thousand_calls_with_random_native_faults_all_end_correctly() -> None:
    rng = random.Random(20261121)
    plans = [_plan(rng, i) for i in range(1000)]
    plans[500] = ("spin", (), CallTimeout)  # one hang, killed by its deadline

    async def scenario() -> None:
        async with ChaosPool() as pool:
            sem = asyncio.Semaphore(16)

            async def one(method: str, args: tuple[Any, ...]) -> Any:
                async with sem:
                    try:
                        return await pool.call(method, *args)
                    except Exception as exc:
                        return exc

            outcomes = await asyncio.gather(*(one(m, a) for m, a, _ in plans))
        for (method, args, expected), got in zip(plans, outcomes, strict=True):
            if isinstance(expected, type):
                assert type(got) is expected, (method, args, got)
            else:
                assert got == expected, (method, args, got)
        crashes = sum(1 for _, _, e in plans if e is WorkerCrashed)
        assert crashes >= 20  # the test really exercised respawns

    run(scenario(), timeout=140)


def _no_zombie_children() -> bool:
    """No child of ours is a zombie: earlier tests' forked workers, adopted by this process
    (a subreaper), are reaped by the orphan reaper a grace after they exit."""
    me = psutil.Process()
    return not any(_is_zombie(c) for c in me.children())


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(240)
def test_parent_memory_and_fds_do_not_grow_across_200_crash_cycles() -> None:
    class Cycling(ChaosPool):
        workers = 2
        spare_workers = 2

    me = psutil.Process()

    async def cycle(pool: WorkerPool, n: int) -> None:
        async def stream(count: int) -> None:
            for _ in range(count):
                with pytest.raises(WorkerCrashed) as info:
                    await pool.call("segfault")
                assert info.value.signal == signal.SIGSEGV
                assert await pool.call("ping", 1) == 1

        await asyncio.gather(stream(n // 2), stream(n - n // 2))

    async def scenario() -> None:
        async with Cycling() as pool:
            await cycle(pool, 20)  # warm up: imports, metric children, allocator arenas
            await pool.wait_ready()
            await eventually(_no_zombie_children)  # the reaper holds a pidfd per zombie it saw
            fds, rss = _open_fds(), me.memory_info().rss
            await cycle(pool, 200)
            await pool.wait_ready()
            await eventually(_no_zombie_children)
            grown_fds = _open_fds() - fds
            grown_rss = me.memory_info().rss - rss
        assert grown_fds <= 0, f"{grown_fds} file descriptors leaked over 200 crash cycles"
        assert grown_rss < 8 * 2**20, f"parent RSS grew {grown_rss / 2**20:.1f} MiB"

    run(scenario(), timeout=230)
