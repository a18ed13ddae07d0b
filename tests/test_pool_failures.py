"""DESIGN.md's failure contract, row by row, against real crashes of the real extension.

One table of cases (where it fails x what the caller must see), one test body; after every
case the same pool must still answer a plain call correctly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import zlib
from typing import Any

import pytest

from conftest import eventually, run
from minions.errors import (
    CallTimeout,
    PoisonCall,
    RemoteError,
    WorkerCrashed,
)
from minions.ops import metrics
from minions.workers import WorkerPool
from pools import DemoPool, RetryPool, SparePool, running_pid

CASES: list[tuple[str, tuple[Any, ...], type[BaseException], dict[str, Any]]] = [
    ("fail", ("boom",), RemoteError, {"kind": "exception", "type_name": "ValueError"}),
    ("crc32", ("not bytes",), RemoteError, {"kind": "invalid-args"}),
    ("crc32", (), RemoteError, {"kind": "invalid-args"}),
    ("crc32", (b"a", b"b"), RemoteError, {"kind": "invalid-args"}),
    ("no_such_method", (), RemoteError, {"kind": "unknown-method"}),
    ("unencodable", (), RemoteError, {"kind": "unencodable-result"}),
    ("segfault", (), WorkerCrashed, {"signal": signal.SIGSEGV, "exit_code": None}),
    ("abort", (), WorkerCrashed, {"signal": signal.SIGABRT}),
    ("exit", (7,), WorkerCrashed, {"signal": None, "exit_code": 7}),
    ("spin", (), CallTimeout, {"method": "spin"}),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("method", "args", "error", "attrs"), CASES, ids=[c[0] for c in CASES])
def test_failure_contract(
    method: str, args: tuple[Any, ...], error: type[BaseException], attrs: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            with pytest.raises(error) as info:
                await pool.call(method, *args)
            for name, value in attrs.items():
                assert getattr(info.value, name) == value, (name, info.value)
            if isinstance(info.value, WorkerCrashed):
                assert info.value.method == method and info.value.worker_id > 0
                if info.value.signal is not None:
                    assert f"in {method}" in info.value.stack  # faulthandler's Python stack
            if isinstance(info.value, CallTimeout):
                assert "in spin" in info.value.stack  # dumped on SIGUSR1 before the SIGKILL
            assert await pool.call("crc32", b"still serving") == zlib.crc32(b"still serving")

    run(scenario())


def test_unencodable_arguments_fail_before_dispatch() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            before = pool.snapshot().pids
            with pytest.raises(TypeError):
                await pool.call("crc32", object())
            assert pool.snapshot().in_flight == 0 and pool.snapshot().pids == before

    run(scenario())


def test_keyword_arguments_are_validated_like_positional_ones() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            assert await pool.call("crc32", data=b"abc") == zlib.crc32(b"abc")
            with pytest.raises(RemoteError) as info:
                await pool.call("crc32", b"abc", data=b"abc")
            assert info.value.kind == "invalid-args"
            with pytest.raises(RemoteError):
                await pool.call("crc32", wrong=b"abc")

    run(scenario())


def test_remote_error_carries_the_remote_traceback() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            with pytest.raises(RemoteError) as info:
                await pool.call("fail", "kaput")
            assert info.value.message == "kaput"
            assert "raise ValueError" in info.value.remote_traceback

    run(scenario())


def test_crash_is_retried_on_a_fresh_worker_then_poisoned() -> None:
    """retries_on_crash=1: a call that crashes twice is PoisonCall and then quarantined."""

    async def scenario() -> None:
        retries = metrics.WORKER_CALL_RETRIES.labels("RetryPool")
        before = retries._value.get()
        async with RetryPool() as pool:
            with pytest.raises(PoisonCall) as info:
                await pool.call("segfault")
            assert info.value.attempts == 2 and info.value.signal == signal.SIGSEGV
            assert retries._value.get() == before + 1
            pids = pool.snapshot().pids
            with pytest.raises(PoisonCall) as again:  # same fingerprint: fails fast, no dispatch
                await pool.call("segfault")
            assert again.value.reason == "quarantined"
            assert pool.snapshot().pids == pids
            assert await pool.call("ping", 3) == 3

    run(scenario())


def test_retry_hides_a_one_off_crash() -> None:
    """A worker killed under a call (here: by SIGKILL from outside) is retried transparently."""

    async def scenario() -> None:
        async with RetryPool() as pool:
            task = asyncio.create_task(pool.call("sleep", 0.5))
            await eventually(lambda: running_pid(pool, "sleep"))  # the handler really runs
            pid = running_pid(pool, "sleep")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await task is None  # the retry on a fresh worker returned normally
            assert pid not in pool.worker_pids()

    run(scenario())


def test_crash_does_not_disturb_calls_in_flight_on_other_workers() -> None:
    async def scenario() -> None:
        async with DemoPool() as pool:
            slow = asyncio.create_task(pool.call("count_primes", 3_000_000))
            await eventually(lambda: running_pid(pool, "count_primes"))
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await slow == 216816

    run(scenario())


class PipelinedPool(WorkerPool):
    service = "services:Pipelined"
    workers = 1
    call_timeout_s = 5.0
    # Wide enough that a loaded machine's slower calls still pipeline to the depth cap (16):
    # with the default 2 ms a call measured at 250 us pipelines only 8 deep.
    pipeline_window_s = 0.5


def test_calls_pipelined_behind_a_crashing_call_are_requeued_not_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Costs warmed up first, so calls really are pipelined on the worker that segfaults: the
    crashing call fails, every other call it owed runs again and succeeds."""

    async def scenario() -> None:
        async with PipelinedPool() as pool:
            for i in range(50):  # the method's cost is now measured (tens of microseconds)
                assert await pool.call("step", i) == i
            calls = [pool.call("step", i, crash=(i == 10)) for i in range(40)]
            tasks = [asyncio.create_task(c) for c in calls]
            await asyncio.sleep(0)  # every task submitted; nothing answered yet
            assert pool.snapshot().workers[0].in_flight > 10  # pipelined past the crash
            with caplog.at_level(logging.WARNING, logger="minions.pool"):
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            crashed = outcomes.pop(10)
            assert isinstance(crashed, WorkerCrashed) and crashed.signal == signal.SIGSEGV
            assert outcomes == [i for i in range(40) if i != 10]
            death = next(r.getMessage() for r in caplog.records if "SIGSEGV" in r.getMessage())
            requeued = re.search(r"; (\d+) calls it owed go back to the queue", death)
            assert requeued and int(requeued[1]) > 1, death  # more than one call was in flight
            assert pool.snapshot().restarts == 1

    run(scenario())


def test_spare_worker_takes_over_without_a_boot() -> None:
    async def scenario() -> None:
        async with SparePool() as pool:
            await pool.wait_ready()
            assert pool.snapshot().spares_ready == 1
            spare_pid = next(w.pid for w in pool.snapshot().workers if w.role == "spare")
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await pool.call("pid") == spare_pid  # served by the promoted spare

    run(scenario())
