"""Per-call policies in the Dispatcher, table-driven over fake workers (no processes).

As in ``test_pool_settle.py``, four calls stand at four places when their worker dies:
``answered`` (it finished; its reply died unflushed with the worker), ``running`` (the marker
names it), ``behind`` (pipelined, never started) and ``queued``. Here every call is
``idempotent=False``: whatever kills the worker, none may be sent to a worker a second time,
and only ``behind`` (certainly never started) and ``queued`` may still run.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from minions.errors import CallTimeout, PoolUnavailable, WorkerCrashed
from minions.pool.calls import CallOptions, CallPolicy
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Dispatcher
from minions.pool.events import Death, WorkerRef
from minions.pool.verdict import DeathCause, Verdict

A = WorkerRef(worker_id=1, pid=1001, identity=b"w1")
B = WorkerRef(worker_id=2, pid=1002, identity=b"w2")
POSITIONS = ("answered", "running", "behind", "queued")
ONCE = CallPolicy(timeout_s=30.0, retries_on_crash=0, idempotent=False)
KILL = CallPolicy(timeout_s=30.0, retries_on_crash=0, kill_on_cancel=True)


class FakeWorkers:
    """Stands in for the Supervisor and the channel (a ``LaneEvents``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []
        self.overran: list[tuple[WorkerRef, str]] = []
        self.cancelled: list[tuple[WorkerRef, str]] = []
        self.lost: list[WorkerRef] = []

    def send(self, identity: bytes, payloads: list[bytes]) -> bool:
        self.sent.append((identity, payloads))
        return True

    def call_overran(self, worker: WorkerRef, call: Any) -> None:
        self.overran.append((worker, call.method))

    def call_cancelled(self, worker: WorkerRef, call: Any) -> None:
        self.cancelled.append((worker, call.method))

    def lane_lost(self, worker: WorkerRef) -> None:
        self.lost.append(worker)

    def lane_drained(self, worker: WorkerRef) -> None:
        pass


def _dispatcher(retries: int = 1) -> tuple[Dispatcher, FakeWorkers]:
    fake = FakeWorkers()
    cfg = PoolConfig(service="svc:S", pipeline_depth=3, retries_on_crash=retries)
    return Dispatcher(cfg, "T", fake.send, fake), fake


def _admit(d: Dispatcher, tag: str, policy: CallPolicy | None = None) -> Any:
    future = asyncio.get_running_loop().create_future()
    return d.admit("m", (tag,), {}, future, policy)


def _setup(policy: CallPolicy) -> tuple[Dispatcher, dict[str, Any]]:
    """The four positions on lane A, every call with ``policy`` (pool: retries_on_crash=1)."""
    d, _ = _dispatcher()
    d.open_lane(A)
    warm = _admit(d, "warm")
    d.dispatch()
    assert d.take(A.identity, warm.call_id) is warm  # the cost is measured: pipelining
    calls = {name: _admit(d, name, policy) for name in POSITIONS}
    d.dispatch()
    assert d.describe_lane(A.identity, calls["running"].call_id) == (3, "m")
    assert d.queue_depth == 1
    return d, calls


def _outcome(call: Any) -> Any:
    if not call.future.done():
        return "pending"
    if call.future.cancelled():
        return "cancelled"
    exc = call.future.exception()
    return type(exc) if exc is not None else call.future.result()


SEGV = Verdict(DeathCause.SIGNAL, -signal.SIGSEGV)
KILLED = Verdict(DeathCause.TIMEOUT, -signal.SIGKILL)
ROWS: list[tuple[str, Verdict, str | None, dict[str, Any], list[str], str]] = [
    # id, verdict, running per marker, what each caller sees, queue after, error text
    ("segv", SEGV, "running",
     {"answered": WorkerCrashed, "running": WorkerCrashed}, ["behind", "queued"],
     "after m() had finished"),
    ("between-calls", SEGV, None,
     {"answered": WorkerCrashed, "running": WorkerCrashed, "behind": WorkerCrashed},
     ["queued"], "which may or may not have run"),
    ("timeout", KILLED, "running",
     {"answered": WorkerCrashed, "running": CallTimeout}, ["behind", "queued"],
     "after m() had finished"),
    ("recycled", Verdict(DeathCause.RECYCLED, 0), "running",
     {"answered": WorkerCrashed, "running": WorkerCrashed}, ["behind", "queued"],
     "after m() had finished"),
    ("stopped", Verdict(DeathCause.STOPPED, -signal.SIGTERM), "running",
     {"answered": PoolUnavailable, "running": PoolUnavailable}, ["behind", "queued"],
     "may have run"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("verdict", "running", "sees", "queue_after", "text"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_a_call_that_is_not_idempotent_is_never_sent_twice(
    verdict: Verdict, running: str | None, sees: dict[str, Any], queue_after: list[str], text: str
) -> None:
    async def scenario() -> None:
        d, calls = _setup(ONCE)
        d.settle(Death(A, verdict, calls[running].call_id if running else None))
        for name in POSITIONS:
            assert _outcome(calls[name]) == sees.get(name, "pending"), name
        names = {c.call_id: n for n, c in calls.items()}
        assert [names[c.call_id] for c in d._queue] == queue_after
        assert text in str(calls["answered"].future.exception())
        crashed = calls["running"].future.exception()
        if isinstance(crashed, WorkerCrashed):
            assert "not idempotent" in str(crashed) and crashed.attempts == 1

    asyncio.run(scenario())


def test_only_the_calls_that_are_not_idempotent_are_failed() -> None:
    """Same death, idempotent neighbours: they run again (at-least-once, the default)."""

    async def scenario() -> None:
        d, _ = _dispatcher()
        d.open_lane(A)
        warm = _admit(d, "warm")
        d.dispatch()
        d.take(A.identity, warm.call_id)
        once, again, running = _admit(d, "once", ONCE), _admit(d, "again"), _admit(d, "run")
        d.dispatch()
        d.settle(Death(A, SEGV, running.call_id))
        assert _outcome(once) is WorkerCrashed
        assert _outcome(again) == "pending" and _outcome(running) == "pending"  # retried
        assert list(d._queue) == [again, running]

    asyncio.run(scenario())


def test_per_call_options_resolve_against_the_handlers_default() -> None:
    base = CallPolicy(timeout_s=30.0, retries_on_crash=2)
    assert CallOptions().resolve("m", base) == base
    assert CallOptions(idempotent=False).resolve("m", base).retries_on_crash == 0
    declared = CallPolicy(timeout_s=30.0, retries_on_crash=0, idempotent=False)
    assert CallOptions(idempotent=True).resolve("m", declared).retries_on_crash == 0
    assert CallOptions(idempotent=True, retries_on_crash=1).resolve("m", declared).idempotent
    with pytest.raises(ValueError, match=r"m\(\) is declared @expose\(idempotent=False\)"):
        CallOptions(retries_on_crash=1).resolve("m", declared)
    killing = CallOptions(timeout_s=1, cancel="kill").resolve("m", base)
    assert killing.kill_on_cancel and killing.timeout_s == 1
    with pytest.raises(ValueError, match="cannot be retried"):  # the invariant settle relies on
        CallPolicy(timeout_s=1.0, retries_on_crash=1, idempotent=False)


def test_the_deadline_is_the_calls_own() -> None:
    async def scenario() -> None:
        d, fake = _dispatcher()
        d.open_lane(A)
        d.open_lane(B)
        short = CallPolicy(timeout_s=0.5, retries_on_crash=0)
        _admit(d, "short", short)
        _admit(d, "long")  # the pool's 30 s
        d.dispatch()
        head = d._lanes[A.identity].head_since
        d.enforce_deadlines(head + 1.0)
        assert fake.overran == [(A, "m")]  # only the short one overran

    asyncio.run(scenario())


def test_a_kill_on_cancel_call_runs_alone_on_an_idle_worker() -> None:
    """It waits for an idle lane (never pipelined behind a call), nothing is pipelined behind
    it, and cancelling it asks for its worker's death exactly once."""

    async def scenario() -> None:
        d, fake = _dispatcher()
        d.open_lane(A)
        warm = _admit(d, "warm")
        d.dispatch()
        d.take(A.identity, warm.call_id)
        first = _admit(d, "first")
        d.dispatch()
        killing = _admit(d, "killing", KILL)
        d.dispatch()
        assert d.queue_depth == 1  # not pipelined behind "first", though cheap
        d.take(A.identity, first.call_id)
        d.dispatch()
        assert d.describe_lane(A.identity, killing.call_id) == (1, "m")
        after = _admit(d, "after")
        d.dispatch()
        assert d.queue_depth == 1 and d.describe_lane(A.identity, None)[0] == 1  # none behind
        killing.future.cancel()
        assert not d.withdraw(killing)
        assert not d.withdraw(killing)  # a second cancel asks nothing more
        assert fake.cancelled == [(A, "m")]
        d.dispatch()
        assert d.queue_depth == 1  # the doomed lane takes no more calls
        settled = d.settle(Death(A, Verdict(DeathCause.CANCELLED, -signal.SIGKILL), None))
        assert settled.requeued == 0 and list(d._queue) == [after]
        assert _outcome(after) == "pending"

    asyncio.run(scenario())


def test_a_queued_kill_on_cancel_call_is_withdrawn_without_a_kill() -> None:
    async def scenario() -> None:
        d, fake = _dispatcher()
        killing = _admit(d, "killing", KILL)  # no lane: it stays queued
        killing.future.cancel()
        assert d.withdraw(killing) and d.queue_depth == 0
        assert fake.cancelled == []

    asyncio.run(scenario())


def test_a_cancelled_death_is_planned_and_explained() -> None:
    verdict = Verdict(DeathCause.CANCELLED, -signal.SIGKILL)
    assert verdict.cause.planned and verdict.label == "cancelled"
    assert "cancel='kill'" in verdict.describe()
