"""Settling a death, table-driven, over the real Dispatcher with fake workers (no processes).

Each row is one death: its cause, and the call its marker says was running. Four calls stand at
four places when the worker dies: ``answered`` (the worker replied, but the reply died unflushed
with it, so the parent still counts it as owed), ``running`` (the marker names it), ``behind``
(pipelined behind it, never started) and ``queued`` (still in the pool's queue). Each row states
exactly what each caller sees and what order the queue is in afterwards.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from minions.errors import CallTimeout, PoisonCall, PoolUnavailable, WorkerCrashed
from minions.ipc import messages as m
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Dispatcher
from minions.pool.events import Death, WorkerRef
from minions.pool.verdict import DeathCause, Verdict

A = WorkerRef(worker_id=1, pid=1001, identity=b"w1")
B = WorkerRef(worker_id=2, pid=1002, identity=b"w2")
POSITIONS = ("answered", "running", "behind", "queued")


class FakeWorkers:
    """Stands in for the Supervisor and the channel: records what the Dispatcher asks."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []
        self.overran: list[tuple[WorkerRef, str]] = []
        self.lost: list[WorkerRef] = []
        self.drained: list[WorkerRef] = []

    def send(self, identity: bytes, payloads: list[bytes]) -> bool:
        self.sent.append((identity, payloads))
        return True

    def call_overran(self, worker: WorkerRef, call: Any) -> None:
        self.overran.append((worker, call.method))

    def lane_lost(self, worker: WorkerRef) -> None:
        self.lost.append(worker)

    def lane_drained(self, worker: WorkerRef) -> None:
        self.drained.append(worker)


def _setup(retries: int) -> tuple[Dispatcher, dict[str, Any], FakeWorkers]:
    """Four calls at the four positions on lane A (pipelining depth 3: one stays queued)."""
    fake = FakeWorkers()
    cfg = PoolConfig(service="svc:S", pipeline_depth=3, retries_on_crash=retries)
    d = Dispatcher(cfg, "T", fake.send, fake)
    loop = asyncio.get_running_loop()
    d.open_lane(A)
    warm = d.admit("m", (), {}, loop.create_future())
    d.dispatch()
    assert d.take(A.identity, warm.call_id) is warm  # the method's cost is now measured
    calls = {name: d.admit("m", (name,), {}, loop.create_future()) for name in POSITIONS}
    d.dispatch()
    owed, running = d.describe_lane(A.identity, calls["running"].call_id)
    assert (owed, running, d.queue_depth) == (3, "m", 1)  # really pipelined, one really queued
    return d, calls, fake


def _queue_order(d: Dispatcher, calls: dict[str, Any]) -> list[str]:
    names = {c.call_id: n for n, c in calls.items()}
    return [names[c.call_id] for c in d._queue]


def _outcome(call: Any) -> Any:
    if not call.future.done():
        return "pending"
    exc = call.future.exception()
    return type(exc) if exc is not None else call.future.result()


SEGV = Verdict(DeathCause.SIGNAL, -signal.SIGSEGV, "Fatal Python error: Segmentation fault")
ROWS: list[tuple[str, Verdict, str | None, int, dict[str, Any], list[str]]] = [
    # id, verdict, running per marker, retries_on_crash, what each caller sees, queue after
    ("segv", SEGV, "running", 0, {"running": WorkerCrashed},
     ["answered", "behind", "queued"]),
    ("segv-retried", SEGV, "running", 1, {"running": "pending"},
     ["answered", "running", "behind", "queued"]),
    ("exit", Verdict(DeathCause.EXIT, 7), "running", 0, {"running": WorkerCrashed},
     ["answered", "behind", "queued"]),
    ("exit-retried", Verdict(DeathCause.EXIT, 7), "running", 1, {"running": "pending"},
     ["answered", "running", "behind", "queued"]),
    ("lost", Verdict(DeathCause.LOST, -signal.SIGKILL), "running", 0,
     {"running": WorkerCrashed}, ["answered", "behind", "queued"]),
    ("between-calls", SEGV, None, 0, {},
     ["answered", "running", "behind", "queued"]),
    ("timeout", Verdict(DeathCause.TIMEOUT, -signal.SIGKILL), "running", 1,
     {"running": CallTimeout}, ["answered", "behind", "queued"]),
    ("timeout-no-marker", Verdict(DeathCause.TIMEOUT, -signal.SIGKILL), None, 1,
     {"answered": CallTimeout}, ["running", "behind", "queued"]),
    ("memory-recycle", Verdict(DeathCause.RECYCLED, 0), "running", 0, {},
     ["answered", "running", "behind", "queued"]),
    ("recycle-idle", Verdict(DeathCause.RECYCLED, 0), None, 1, {},
     ["answered", "running", "behind", "queued"]),
    ("stopped", Verdict(DeathCause.STOPPED, -signal.SIGTERM), "running", 1,
     {"running": PoolUnavailable}, ["answered", "behind", "queued"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("verdict", "running", "retries", "sees", "queue_after"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_settling_a_death(
    verdict: Verdict,
    running: str | None,
    retries: int,
    sees: dict[str, Any],
    queue_after: list[str],
) -> None:
    async def scenario() -> None:
        d, calls, _ = _setup(retries)
        marker = calls[running].call_id if running else None
        settled = d.settle(Death(A, verdict, marker))
        for name in POSITIONS:
            assert _outcome(calls[name]) == sees.get(name, "pending"), name
        assert _queue_order(d, calls) == queue_after
        assert d.in_flight == 0 and d.describe_lane(A.identity, None) == (0, "")
        blamed = next((n for n, c in calls.items() if c.future.done()), running)
        assert settled.method == ("m" if blamed else None)
        assert settled.requeued == len([n for n in queue_after if n not in ("queued", blamed)])
        error = next((c.future.exception() for c in calls.values() if c.future.done()), None)
        if isinstance(error, WorkerCrashed):
            assert (error.worker_id, error.pid, error.method) == (1, 1001, "m")
            assert error.signal == verdict.signal and error.exit_code == verdict.exit_code
            assert "retries_on_crash = 0" in str(error)
        if isinstance(error, CallTimeout):
            assert error.worker_id == 1 and error.timeout_s == d.config.call_timeout_s

    asyncio.run(scenario())


def test_a_worker_that_failed_to_boot_owed_nothing() -> None:
    async def scenario() -> None:
        d, calls, _ = _setup(0)
        assert d.settle(Death(B, Verdict(DeathCause.BOOT_FAILED, 3), None)).method is None
        assert all(_outcome(c) == "pending" for c in calls.values())
        assert d.describe_lane(A.identity, None)[0] == 3 and d.queue_depth == 1

    asyncio.run(scenario())


def test_a_retried_crash_that_crashes_again_is_poison_and_quarantined() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        d, calls, fake = _setup(1)
        d.settle(Death(A, SEGV, calls["running"].call_id))  # attempt 1: back to the queue
        d.open_lane(B)
        d.dispatch()
        assert d.describe_lane(B.identity, calls["running"].call_id) == (3, "m")
        d.settle(Death(B, SEGV, calls["running"].call_id))  # attempt 2: poison
        error = calls["running"].future.exception()
        assert isinstance(error, PoisonCall) and error.attempts == 2
        assert [_outcome(calls[n]) for n in ("answered", "behind", "queued")] == ["pending"] * 3
        with pytest.raises(PoisonCall, match="fail fast"):
            d.admit("m", calls["running"].args, {}, loop.create_future())
        assert fake.lost == []

    asyncio.run(scenario())


def test_a_cancelled_caller_is_not_waited_for_and_its_queued_call_never_runs() -> None:
    async def scenario() -> None:
        d, calls, fake = _setup(0)
        assert d.waiting_callers() == 4
        calls["queued"].future.cancel()
        calls["behind"].future.cancel()
        assert d.withdraw(calls["queued"]) and not d.withdraw(calls["behind"])
        assert d.waiting_callers() == 2 and d.queue_depth == 0
        sent = len(fake.sent)
        d.settle(Death(A, SEGV, None))  # everything owed goes back; the cancelled one too
        d.open_lane(B)
        d.dispatch()
        assert len(fake.sent) == sent + 1
        resent = [msg.call_id for msg in map(m.worker_decoder.decode, fake.sent[-1][1])]
        assert resent == [calls["answered"].call_id, calls["running"].call_id]

    asyncio.run(scenario())


def test_overrun_is_reported_once_and_the_lane_takes_no_more_calls() -> None:
    async def scenario() -> None:
        d, calls, fake = _setup(0)
        head = d._lanes[A.identity].head_since
        d.enforce_deadlines(head + d.config.call_timeout_s + 1)
        d.enforce_deadlines(head + d.config.call_timeout_s + 2)
        assert fake.overran == [(A, "m")]
        d.take(A.identity, calls["answered"].call_id)  # a late answer still resolves
        d.dispatch()
        assert d.queue_depth == 1  # nothing new went to the doomed lane

    asyncio.run(scenario())
