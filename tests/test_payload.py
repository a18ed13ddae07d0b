"""Big payloads through real pools: real memfds shared by real workers, real crashes while a
result is written, forged references through the real worker socket, reclaim after every kind
of ending, the fallback for payloads bigger than the arena, and nothing left behind."""

from __future__ import annotations

import array
import asyncio
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import run
from minions.errors import CallTimeout, RemoteError, WorkerCrashed
from minions.ipc.arena import ParentArena, halves
from minions.ops import metrics
from minions.ops.memory import MemoryMonitor
from minions.pool.process import Phase
from minions.workers import PoolConfig, WorkerPool

MiB = 1 << 20
BIG = 1 * MiB  # above the default arena_min_bytes, well inside an arena's half
SMALL = 1000  # below it: stays in the message
ARENA_TAG = "memfd:minions-arena"


class PayloadPool(WorkerPool):
    service = "payload_services:Payloads"
    workers = 1
    call_timeout_s = 3.0
    restart_intensity = 50


class RetryPayloadPool(PayloadPool):
    retries_on_crash = 1


class TinyArenaPool(PayloadPool):
    arena_mb = 1.0  # halves of about half a MiB: a 3 MiB payload can never fit


class NoArenaPool(PayloadPool):
    arena_mb = 0


def pattern(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def arenas_mapped(pid: int) -> set[str]:
    """Names of the arenas ``pid`` maps (``/memfd:minions-arena:<pool>:w<id> (deleted)``)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if ARENA_TAG in line}


def arena_fds(pid: int) -> list[tuple[str, bool]]:
    """The arena descriptors ``pid`` holds (each mapping keeps one): (name, close-on-exec?)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if ARENA_TAG in target:
            flags = int(info.split("flags:")[1].split()[0], 8)
            out.append((target, bool(flags & 0o2000000)))  # O_CLOEXEC
    return sorted(out)


def the_arena(pool: WorkerPool) -> ParentArena:
    """The parent's side of the one serving worker's arena."""
    (arena,) = [w.arena for w in pool._supervisor._workers.values() if w.phase is Phase.READY]
    assert arena is not None
    return arena


def held(pool: WorkerPool) -> int:
    """Arena bytes the calls the serving worker owes hold now."""
    (worker,) = [w for w in pool._supervisor._workers.values() if w.phase is Phase.READY]
    return pool._dispatcher.arena_bytes(worker.identity)


async def dispatched(call: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start ``call`` and return once it was dispatched (its buffers placed), before its answer
    can have been read: the task runs up to its await, then we resume in the same loop pass."""
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0)
    return task


# --- what travels where ----------------------------------------------------------------------

ROWS = [
    # method, payload size, arguments through the arena, result through the arena
    ("length", SMALL, False, False),
    ("length", BIG, True, False),
    ("echo", SMALL, False, False),
    ("echo", BIG, True, True),
    ("echo_view", BIG, True, True),
    ("invert", BIG, True, True),
]


@pytest.mark.parametrize(
    ("method", "size", "args_in_arena", "result_in_arena"),
    ROWS,
    ids=[f"{r[0]}-{r[1]}" for r in ROWS],
)
def test_buffers_above_the_threshold_travel_through_the_arena(
    method: str, size: int, args_in_arena: bool, result_in_arena: bool
) -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            data = pattern(size)
            arena, consumed = the_arena(pool), the_arena(pool).consumed
            task = await dispatched(pool.call(method, data))
            assert (held(pool) >= size) == args_in_arena
            value = await task
            expected: Any = {"length": size, "echo": data, "echo_view": data}.get(method)
            if method == "invert":
                expected = bytearray(data)
                for i in range(0, size, 4096):
                    expected[i] = 255 - expected[i]
            assert value == expected
            assert arena.consumed - consumed == int(result_in_arena)
            assert held(pool) == 0

    run(scenario())


def test_each_annotation_gets_what_it_declares_and_keywords_and_any_buffer_work() -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            big = pattern(BIG)
            assert await pool.call("typed", big, big, big) == ["bytearray", "memoryview", "bytes"]
            assert await pool.call("join", big, big, sep=big) == big * 3
            doubles = array.array("d", range(BIG // 8))  # any object with the buffer protocol
            assert await pool.call("join", b"", doubles, sep=b"") == doubles.tobytes()
            result = await pool.call("echo_view", big)  # declared Buffer: a view of a copy
            assert isinstance(result, memoryview) and result == big

    run(scenario())


def test_a_buffer_kept_past_its_call_is_released_not_silently_reused() -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            await pool.call("keep", pattern(BIG))
            with pytest.raises(RemoteError) as info:
                await pool.call("read_kept")
            assert info.value.type_name == "ValueError" and "released" in info.value.message

    run(scenario())


# --- crashes, forgeries, reclaim -------------------------------------------------------------


def test_a_worker_that_segfaults_while_writing_a_big_result_leaves_nothing_read() -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            old, old_pid = the_arena(pool), pool.worker_pids()[0]
            assert await pool.call("echo", pattern(BIG)) == pattern(BIG)
            consumed = old.consumed
            with pytest.raises(WorkerCrashed) as info:
                await pool.call("crash_while_writing", BIG)
            assert info.value.signal == signal.SIGSEGV
            assert "in place" in info.value.stack  # it died copying the result into the arena
            assert old.consumed == consumed  # nothing of what it wrote was read
            assert old.map.closed  # and its arena is gone with it
            assert await pool.call("echo", pattern(BIG)) == pattern(BIG)
            assert pool.worker_pids() != [old_pid]
            assert len(arenas_mapped(os.getpid())) == 1

    run(scenario())


FORGED = ["past-end", "straddles-end", "header", "negative"]


@pytest.mark.parametrize("where", FORGED)
def test_a_reference_outside_the_arena_from_a_worker_is_a_protocol_error(where: str) -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            pid = pool.worker_pids()[0]
            refused = metrics.PROTOCOL_ERRORS.labels(pool.name, "reference")
            before = refused._value.get()
            with pytest.raises(RemoteError) as info:
                await pool.call("forge", BIG, where)
            assert info.value.kind == "invalid-result"
            assert info.value.type_name == "ProtocolError"
            assert "outside the arena" in info.value.message
            assert refused._value.get() == before + 1
            arena = the_arena(pool)
            consumed = arena.consumed
            assert await pool.call("echo", pattern(BIG)) == pattern(BIG)  # honest again
            assert arena.consumed == consumed + 1 and pool.worker_pids() == [pid]

    run(scenario())


ENDINGS = [
    ("value", "echo", None),
    ("error", "fail", RemoteError),
    ("crash", "segfault", WorkerCrashed),
    ("timeout", "spin", CallTimeout),
]


@pytest.mark.parametrize(("method", "error"), [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS])
def test_arena_space_is_reclaimed_however_the_call_ends(
    method: str, error: type[BaseException] | None
) -> None:
    """The call holds arena space while it runs; once it ended, by any path, calls whose bytes
    add up to several times the arena all still go through it (none falls back)."""

    async def scenario() -> None:
        async with PayloadPool() as pool:
            task = await dispatched(pool.call(method, pattern(BIG)))
            assert held(pool) >= BIG
            if error is None:
                assert await task == pattern(BIG)
            else:
                with pytest.raises(error):
                    await task
            assert await pool.wait_ready()  # after a crash or a timeout: its replacement
            assert held(pool) == 0
            arena = the_arena(pool)
            (lo, hi), _ = halves(arena.size)
            rounds = 3 * (arena.size // BIG)
            consumed = arena.consumed
            for i in range(rounds):
                data = pattern(BIG - i)
                assert await pool.call("echo", data) == data
            assert arena.consumed - consumed == rounds
            assert rounds * BIG > 2 * (hi - lo)

    run(scenario())


def test_the_result_of_a_cancelled_call_is_not_read_and_its_space_comes_back() -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            arena = the_arena(pool)
            consumed = arena.consumed
            task = await dispatched(pool.call("echo", pattern(BIG)))
            task.cancel()  # the worker runs it anyway; its answer has nobody to go to
            assert await pool._wait_until(lambda: held(pool) == 0, 10)  # the answer came
            assert arena.consumed == consumed + 1  # counted as consumed, so the worker reuses it
            for _ in range(3 * (arena.size // BIG)):
                assert await pool.call("echo", pattern(BIG)) == pattern(BIG)
            assert arena.consumed == consumed + 1 + 3 * (arena.size // BIG)

    run(scenario())


def test_a_retried_call_brings_its_buffer_to_the_fresh_worker(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with RetryPayloadPool() as pool:
            data = pattern(BIG)
            flag = str(tmp_path / "crashed-once")
            assert await pool.call("crash_once", data, flag) == zlib.crc32(data)
            assert os.path.exists(flag) and pool.snapshot().restarts == 1

    run(scenario())


def test_a_payload_bigger_than_the_arena_travels_as_a_message() -> None:
    async def scenario() -> None:
        async with TinyArenaPool() as pool:
            data = pattern(3 * MiB)
            arena = the_arena(pool)
            task = await dispatched(pool.call("echo", data))
            assert held(pool) == 0  # not in the arena: it never fits
            assert await task == data
            assert await pool.call("fill", 3 * MiB, 7) == b"\x07" * (3 * MiB)
            assert arena.consumed == 0  # neither result went through it
            assert await pool.call("echo", pattern(BIG // 4)) == pattern(BIG // 4)
            assert arena.consumed == 1  # what fits still does

    run(scenario())


def test_without_an_arena_everything_is_a_message() -> None:
    async def scenario() -> None:
        async with NoArenaPool() as pool:
            assert await pool.call("echo_view", pattern(BIG)) == pattern(BIG)
            assert not arenas_mapped(os.getpid()) and not arenas_mapped(pool.worker_pids()[0])

    run(scenario())


# --- what is left behind, and what the memory monitor sees -----------------------------------


class TwoWorkers(PayloadPool):
    workers = 2


def test_each_worker_maps_only_its_own_arena_and_nothing_survives_the_pool() -> None:
    """Only mappings hold an arena (each keeps one close-on-exec descriptor, so no other child
    inherits it); a dead worker's arena is gone from the parent, and after the pool from
    everywhere."""

    async def scenario() -> None:
        me = os.getpid()
        async with TwoWorkers() as pool:
            for _ in range(4):
                await pool.call("echo", pattern(BIG))
            ours = arenas_mapped(me)
            pids = pool.worker_pids()
            assert len(ours) == 2 and arena_fds(me) == [(name, True) for name in sorted(ours)]
            for pid in pids:
                (theirs,) = arenas_mapped(pid)
                assert theirs in ours and arena_fds(pid) == [(theirs, True)]
            with pytest.raises(WorkerCrashed) as info:
                await pool.call("segfault", pattern(BIG))
            victim = info.value.pid
            assert victim in pids
            assert await pool.wait_ready()
            survivor = next(p for p in pool.worker_pids() if p != victim)
            now = arenas_mapped(me)
            assert len(now) == 2 and now & ours == arenas_mapped(survivor)
            assert arena_fds(me) == [(name, True) for name in sorted(now)]
            for pid in pool.worker_pids():
                (theirs,) = arenas_mapped(pid)
                assert arena_fds(pid) == [(theirs, True)]
        assert not arenas_mapped(me) and not arena_fds(me)

    run(scenario())


KILLED_PARENT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from minions.workers import WorkerPool

class KilledPool(WorkerPool):
    service = "payload_services:Payloads"
    workers = 2

async def main():
    async with KilledPool() as pool:
        await asyncio.gather(*(pool.call("echo", bytes(1 << 20)) for _ in range(4)))
        print(" ".join(map(str, pool.worker_pids())), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _mapping_arena(name: str) -> list[int]:
    """Every process on this machine that still maps an arena whose name contains ``name``."""
    holders = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if name in (entry / "maps").read_text():
                    holders.append(int(entry.name))
            except OSError:
                continue
    return holders


def test_a_sigkilled_parent_leaves_no_arena_anywhere() -> None:
    """Gru SIGKILLed with busy workers: the workers exit by themselves, and with the last process
    mapping it each memfd is gone; nothing was ever in /dev/shm to leave behind."""
    shm_before = set(os.listdir("/dev/shm"))
    parent = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        workers = [psutil.Process(int(p)) for p in parent.stdout.readline().split()]
        assert len(workers) == 2
        tag = f"{ARENA_TAG}:KilledPool:"
        assert set(_mapping_arena(tag)) == {parent.pid, *(w.pid for w in workers)}
        parent.kill()
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their parent: {alive}"
        assert _mapping_arena(tag) == []
        assert {n for n in os.listdir("/dev/shm") if "minions" in n} <= shm_before
    finally:
        parent.kill()
        parent.wait()


def test_the_arena_counts_in_the_memory_monitors_picture() -> None:
    async def scenario() -> None:
        async with PayloadPool() as pool:
            monitor = MemoryMonitor()
            monitor.watch_workers(pool.name, pool.worker_pids)
            pid = pool.worker_pids()[0]
            before = monitor.sample()
            data = pattern(16 * MiB)
            assert await pool.call("crc", data) == zlib.crc32(data)  # C reads the arena in place
            after = monitor.sample()
            grew = after.workers[pool.name][pid] - before.workers[pool.name][pid]
            assert grew >= 15 * MiB  # the arena pages it touched are in its RSS
            assert the_arena(pool).resident_bytes() >= 16 * MiB

    run(scenario())


def test_arena_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="arena_mb"):
        PoolConfig(service="m:C", arena_mb=-1)
    with pytest.raises(ValueError, match="arena_min_bytes"):
        PoolConfig(service="m:C", arena_min_bytes=0)
