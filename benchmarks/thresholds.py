"""Where the two payload thresholds of Minions come from, measured on this machine.

Run: ``.venv/bin/python benchmarks/thresholds.py [--rounds N]``

- ``ZERO_COPY_MIN_BYTES`` (``minions.ipc.messages``): one call through a real pool with the
  arena off, its payload frame sent copied (``copy=True``) or zero-copy (``copy=False``): round
  trip and parent CPU. Zero-copy pays for a tracker and a hand-off to pyzmq's garbage thread,
  whose wake-ups compete with the event loop for the GIL, so it only wins for big frames.
- ``arena_min_bytes`` (``PoolConfig``): the round trip of one call through a real pool with every
  buffer sent through the arena (``arena_min_bytes=1``) against a pool with the arena off, for
  ``len`` and ``echo``; interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

KiB = 1 << 10


def _pool(name: str, **attrs: Any) -> Any:
    from minions.workers import WorkerPool

    attrs.update(service="payload_tasks:PayloadBench", workers=1)
    return type(name, (WorkerPool,), attrs)()


async def _timed(pool: Any, method: str, data: bytes, calls: int = 150) -> tuple[float, float]:
    """Median round trip and mean parent CPU per call, in us."""
    times = []
    cpu = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await pool.call(method, data)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(times), (time.process_time() - cpu) / calls * 1e6


async def zero_copy_cost(rounds: int) -> list[tuple[int, float, float, float, float]]:
    """(frame size, copied: latency us, CPU us; zero-copy: latency us, CPU us), one call of
    ``length_bytes`` in flight through a pool with the arena off, so the payload is a frame the
    parent sends either way. Toggles the parent channel's threshold (an internal)."""
    from minions.ipc import channel

    sizes = [32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 384 * KiB, 512 * KiB, 1024 * KiB]
    samples: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    saved = channel._ZERO_COPY_MIN
    try:
        async with _pool("Frames", arena_mb=0) as frames:
            frames._channel._sock.copy_threshold = 0  # pyzmq would copy below 64 KiB anyway
            for r in range(rounds):
                for n in sizes:
                    data = os.urandom(n)
                    for zero in (False, True) if r % 2 else (True, False):
                        channel._ZERO_COPY_MIN = 0 if zero else 1 << 40
                        samples.setdefault((n, zero), []).append(
                            await _timed(frames, "length_bytes", data)
                        )
    finally:
        channel._ZERO_COPY_MIN = saved

    def med(n: int, zero: bool, i: int) -> float:
        return statistics.median(s[i] for s in samples[(n, zero)])

    return [
        (n, med(n, False, 0), med(n, False, 1), med(n, True, 0), med(n, True, 1)) for n in sizes
    ]


async def arena_crossover(rounds: int) -> list[tuple[int, str, float, float]]:
    """(payload size, method, arena us, frames us) per call, one call in flight."""
    sizes = [4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 1024 * KiB]
    samples: dict[tuple[int, str, str], list[float]] = {}
    async with _pool("Arena", arena_min_bytes=1) as arena, _pool("Frames", arena_mb=0) as frames:
        for r in range(rounds):
            for n in sizes:
                data = os.urandom(n)
                for method in ("length_bytes", "echo_bytes"):
                    order = [("arena", arena), ("frames", frames)]
                    for name, p in order if r % 2 else order[::-1]:
                        latency, _ = await _timed(p, method, data, 60)
                        samples.setdefault((n, method, name), []).append(latency)
    return [
        (
            n,
            method,
            statistics.median(samples[(n, method, "arena")]),
            statistics.median(samples[(n, method, "frames")]),
        )
        for n in sizes
        for method in ("length_bytes", "echo_bytes")
    ]


def report(rounds: int) -> None:
    print("one call through a pool with the arena off: the payload frame copied or zero-copy\n")
    print(f"{'frame':>9}{'copy us':>9}{'cpu us':>8}{'zero-copy us':>14}{'cpu us':>8}")
    for n, lat, cpu, zlat, zcpu in asyncio.run(zero_copy_cost(rounds)):
        print(f"{n // KiB:>6} KiB{lat:>9.1f}{cpu:>8.1f}{zlat:>14.1f}{zcpu:>8.1f}")
    print("\nround trip of one call, us: every buffer through the arena vs the arena off\n")
    print(f"{'payload':>9}{'method':>14}{'arena':>9}{'frames':>9}{'frames/arena':>14}")
    for n, method, arena, frames in asyncio.run(arena_crossover(rounds)):
        print(f"{n // KiB:>6} KiB{method:>14}{arena:>9.1f}{frames:>9.1f}{frames / arena:>13.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    report(parser.parse_args().rounds)
