"""The Dispatcher: owns every call of one pool, from admission to its ending.

Design note. Calls wait in one FIFO queue. A worker the Supervisor declared ready gets a
*lane*: the calls it owes, in the order it will answer them (workers serve strictly in order).
A call goes to an idle lane; when none is idle it may be *pipelined* behind what a lane already
owes, but only while the predicted run time of that backlog (a moving average per method) stays
under ``pipeline_window_s``, so tiny calls stream back to back and nothing queues behind a slow
call. A method never measured is assumed to cost the whole window, so it is not pipelined.

Deadlines are a timestamp per lane (when its head call started), checked on the pool's tick;
an overrun is reported to the Supervisor, which kills the worker. When a worker ends, the
Supervisor emits one :class:`~minions.pool.events.Death` and :meth:`Dispatcher.settle` decides
what every call that worker owed becomes: the call it was running (its marker says which) gets
the error the verdict implies or is retried; every other owed call either finished with a reply
that died unflushed or never started, and goes back to the head of the queue (at-least-once).
A call whose policy says it is not idempotent is never sent twice (at-most-once): it goes back
only if it certainly never started (it was behind the running call), and otherwise fails.

Cancellation: a queued call is withdrawn and never runs; a sent one runs on and its answer is
dropped, unless its policy kills on cancel: then the lane is doomed and the front asks the
Supervisor to kill the worker (:meth:`LaneEvents.call_cancelled`). Such a call only goes to an
idle lane and nothing is pipelined behind it, so the kill never costs another caller anything.

Big buffer arguments travel through the worker's shared-memory arena (:mod:`minions.ipc.arena`):
the arena belongs to the worker (the Supervisor creates and drops it with the process), but the
space a call's buffers take in it follows the call, so it is the lane's. A lane allocates it when
it takes the call and frees it when the answer arrives, oldest first, as workers answer in order;
a call whose worker died frees nothing, its space died with the arena, and it copies its buffers
again wherever it runs next. A call whose buffers do not fit beside what a busy lane already holds
waits in the queue; one that fits in no arena at all was encoded whole at admission.

Everything runs on the pool's event loop; the hot path is :meth:`dispatch` and :meth:`take`.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from minions.errors import (
    CallTimeout,
    Overloaded,
    PoisonCall,
    PoolUnavailable,
    WorkerCallError,
    WorkerCrashed,
)
from minions.ipc.arena import Ring, arena_size, halves
from minions.ipc.payload import Request
from minions.ops import metrics
from minions.pool.calls import CallPolicy, PendingCall, fingerprint
from minions.pool.config import PoolConfig
from minions.pool.events import Death, Settlement, WorkerRef
from minions.pool.verdict import DeathCause

log = logging.getLogger("minions.pool")

UNLIMITED = 1 << 30


class LaneState(enum.Enum):
    OPEN = "open"  # takes new calls
    DRAINING = "draining"  # no new calls; the worker is retiring once it owes nothing
    DOOMED = "doomed"  # the worker is being killed; its Death settles what it owes


@dataclass(frozen=True, slots=True)
class Throttle:
    """How many calls may be in flight: per worker (pipelining depth) and in the whole pool;
    ``shed`` refuses new calls outright (memory is critical)."""

    per_worker: int
    total: int = UNLIMITED
    shed: bool = False


class Lane:
    """The calls one worker owes, oldest first, and its pipelining budget."""

    __slots__ = ("backlog_s", "exclusive", "head_since", "owed", "ring", "state", "worker")

    def __init__(self, worker: WorkerRef) -> None:
        self.worker = worker
        self.state = LaneState.OPEN
        self.owed: collections.deque[PendingCall] = collections.deque()
        self.head_since = 0.0  # monotonic time the call it is running now started
        self.backlog_s = 0.0  # predicted run time of what it owes
        self.exclusive = False  # it owes one kill-on-cancel call: nothing is pipelined behind it
        arena = worker.arena
        self.ring = Ring(*arena.requests) if arena is not None else None  # its buffers' space


class LaneEvents(Protocol):
    """What the Dispatcher reports about workers; the pool front forwards it to the Supervisor."""

    def call_overran(self, worker: WorkerRef, call: PendingCall) -> None: ...
    def call_cancelled(self, worker: WorkerRef, call: PendingCall) -> None: ...
    def lane_lost(self, worker: WorkerRef) -> None: ...
    def lane_drained(self, worker: WorkerRef) -> None: ...


Send = Callable[[bytes, list[bytes]], bool]


class Dispatcher:
    """Queue, lanes, costs, quarantine and deadlines of one pool; settles every Death."""

    def __init__(self, config: PoolConfig, pool_name: str, send: Send, events: LaneEvents) -> None:
        self.config = config
        self.pool_name = pool_name
        self._send = send
        self._events = events
        self._queue: collections.deque[PendingCall] = collections.deque()
        self._lanes: dict[bytes, Lane] = {}
        self._open: tuple[Lane, ...] = ()
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._cost: dict[str, float] = {}  # moving average run time per method, seconds
        self._quarantine: dict[bytes, float] = {}
        self._throttle = Throttle(config.pipeline_depth)
        self._retries = metrics.WORKER_CALL_RETRIES.labels(pool_name)
        self._policy = CallPolicy(config.call_timeout_s, config.retries_on_crash)
        size = arena_size(config.arena_mb)
        requests = halves(size)[0] if size else (0, 0)
        self._arena_max = requests[1] - requests[0]  # the most one call may put in an arena
        self._arena_min = config.arena_min_bytes

    # --- admission ---------------------------------------------------------------------------

    def admit(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Any,
        policy: CallPolicy | None = None,
    ) -> PendingCall:
        """Encode and queue a call, or refuse it before anything is sent (``TypeError`` if
        msgspec cannot encode the arguments, ``Overloaded``, ``PoisonCall``). ``policy``
        defaults to the pool's settings."""
        if self._throttle.shed:
            raise Overloaded(self.pool_name, "memory pressure is critical")
        if len(self._queue) >= self.config.max_queue:
            raise Overloaded(
                self.pool_name, f"the dispatch queue is full (max_queue={self.config.max_queue})"
            )
        call_id = next(self._ids)
        request = Request(call_id, method, args, kwargs, self._arena_min, self._arena_max)
        if self._quarantine:
            self._check_quarantine(method, request)
        call = PendingCall(call_id, method, args, kwargs, future, request)
        call.policy = self._policy if policy is None else policy
        self._queue.append(call)
        return call

    def kick(self) -> None:
        """Dispatch after an admission, unless calls were already waiting: a queue left
        non-empty means no lane had room, and room only comes with an answer, a worker or a
        throttle change, each of which dispatches. (At 64 in flight that skips a pass per call.)"""
        queue = self._queue
        if len(queue) == 1 or queue[0].future.done():
            self.dispatch()

    def withdraw(self, call: PendingCall) -> bool:
        """The caller gave up: a call still queued leaves the queue and never runs (``True``).
        A sent one runs on and its answer is dropped, or, if its policy kills on cancel, its
        worker is reported for killing (``False`` either way)."""
        try:
            self._queue.remove(call)
        except ValueError:
            pass
        else:
            return True
        if call.policy.kill_on_cancel:
            lane = next((ln for ln in self._lanes.values() if ln.owed and ln.owed[0] is call), None)
            if lane is not None and lane.state is not LaneState.DOOMED:
                self._doom(lane)
                self._events.call_cancelled(lane.worker, call)
        return False

    def _check_quarantine(self, method: str, request: Request) -> None:
        now = time.monotonic()
        self._quarantine = {fp: t for fp, t in self._quarantine.items() if t > now}
        until = self._quarantine.get(fingerprint(method, *request.encoded_arguments()))
        if until is not None:
            raise PoisonCall(
                pool=self.pool_name, worker_id=0, pid=0, method=method, signal=None,
                exit_code=None, reason="quarantined",
                hint=f"this method and these arguments crashed workers before; they fail fast "
                f"for another {until - now:.0f}s without dispatch",
            )  # fmt: skip

    def fail_queue(self, exc: WorkerCallError) -> None:
        """End every queued call with ``exc`` (circuit open, pool shutting down)."""
        queue = self._queue
        while queue:
            queue.popleft().fail(exc)

    # --- lanes -------------------------------------------------------------------------------

    def open_lane(self, worker: WorkerRef) -> None:
        """The Supervisor says this worker serves now."""
        self._lanes[worker.identity] = Lane(worker)
        self._refresh_open()

    def close_lane(self, worker: WorkerRef, doomed: bool) -> bool:
        """No more new calls for this worker: it is retiring (``doomed=False``: it finishes what
        it owes) or being killed. Returns ``True`` if it owes nothing now."""
        lane = self._lanes.get(worker.identity)
        if lane is None:
            return True
        lane.state = LaneState.DOOMED if doomed else LaneState.DRAINING
        self._refresh_open()
        return not lane.owed

    def _refresh_open(self) -> None:
        self._open = tuple(lane for lane in self._lanes.values() if lane.state is LaneState.OPEN)

    def set_throttle(self, throttle: Throttle) -> None:
        self._throttle = throttle

    # --- dispatch: the hot path --------------------------------------------------------------

    def dispatch(self) -> None:
        """Send queued calls to lanes with room; called whenever either side changes.

        Calls bound for one worker in one pass travel as one message (one pipe flush)."""
        queue = self._queue
        if not queue:
            return
        depth, limit = self._throttle.per_worker, self._throttle.total
        window = self.config.pipeline_window_s
        batches: dict[Lane, list[bytes]] = {}
        now = time.monotonic()
        while queue and self._in_flight < limit:
            call = queue[0]
            if call.future.done():  # cancelled while queued
                queue.popleft()
                continue
            expected = self._cost.get(call.method, window)
            exclusive = call.policy.kill_on_cancel  # an idle lane only, see the module note
            lane = self._pick_lane(1 if exclusive else depth, window - expected)
            if lane is None:
                break
            frame = call.request.message or self._frame(lane, call)  # b"": buffers to place
            if frame is None:
                break  # its buffers wait for room in that worker's arena
            queue.popleft()
            if not lane.owed:
                lane.head_since = now
                lane.backlog_s = 0.0
                lane.exclusive = exclusive
            call.expected_s = expected
            lane.backlog_s += expected
            lane.owed.append(call)
            self._in_flight += 1
            batches.setdefault(lane, []).append(frame)
        for lane, payloads in batches.items():
            if not self._send(lane.worker.identity, payloads):
                self._doom(lane)
                self._events.lane_lost(lane.worker)

    def _frame(self, lane: Lane, call: PendingCall) -> bytes | None:
        """The message that sends a call with arena buffers to ``lane``, copied into the worker's
        arena; ``None`` if they do not fit beside what the lane already holds there."""
        request = call.request
        arena, ring = lane.worker.arena, lane.ring
        if arena is None or ring is None:  # a worker without an arena gets the whole message
            return request.inline(call.call_id, call.method)
        at = ring.alloc(request.nbytes, call.call_id)
        if at is None:
            return None  # an empty ring always fits it: admission checked it against the half
        call.region = at
        return request.place(arena, at, call.call_id, call.method)

    def _pick_lane(self, depth: int, max_backlog: float) -> Lane | None:
        """An idle lane, else the one with the shortest backlog that stays within the window
        after taking the call and owes fewer than ``depth`` calls."""
        best: Lane | None = None
        for lane in self._open:
            owed = lane.owed
            if not owed:
                return lane
            if len(owed) < depth and lane.backlog_s <= max_backlog and not lane.exclusive:
                best, max_backlog = lane, lane.backlog_s
        return best

    def take(self, identity: bytes, call_id: int | None) -> PendingCall | None:
        """Pop the call a worker just answered; it must be the oldest it owes (``None``: a
        frame the protocol never sends, which the caller counts). ``call_id=None`` takes the
        oldest, whatever its id (its answer was unreadable)."""
        lane = self._lanes.get(identity)
        if lane is None or not lane.owed:
            return None
        if call_id is not None and lane.owed[0].call_id != call_id:
            return None
        call = lane.owed.popleft()
        self._in_flight -= 1
        if call.region is not None and lane.ring is not None:
            # FIFO: the oldest space is this call's. The bytes stay readable until the next
            # dispatch() allocates, which is after the caller has read an answer lying there.
            lane.ring.free_oldest()
            call.region = None
        now = time.monotonic()
        ran = now - lane.head_since
        cost = self._cost.get(call.method)
        self._cost[call.method] = ran if cost is None else 0.8 * cost + 0.2 * ran
        lane.backlog_s -= call.expected_s
        lane.head_since = now
        if not lane.owed and lane.state is LaneState.DRAINING:
            self._events.lane_drained(lane.worker)
        return call

    # --- deadlines ---------------------------------------------------------------------------

    def enforce_deadlines(self, now: float) -> None:
        """Report every worker whose running call overran its timeout (checked every tick: a
        timestamp per lane is far cheaper than a timer per call on the hot path)."""
        for lane in list(self._lanes.values()):
            if lane.state is LaneState.DOOMED or not lane.owed:
                continue
            head = lane.owed[0]
            if now - lane.head_since > head.timeout_s:
                self._doom(lane)
                self._events.call_overran(lane.worker, head)

    def _doom(self, lane: Lane) -> None:
        lane.state = LaneState.DOOMED
        self._refresh_open()

    # --- settling a death --------------------------------------------------------------------

    def settle(self, death: Death) -> Settlement:
        """Decide what each call the dead worker owed becomes (see the module note).

        Calls that go back keep their order, ahead of everything still queued."""
        lane = self._lanes.pop(death.worker.identity, None)
        if lane is None:
            return Settlement()  # it never served (a spare, or it died booting): owed nothing
        self._refresh_open()
        calls = list(lane.owed)
        self._in_flight -= len(calls)
        for call in calls:
            call.region = None  # the space died with the worker's arena
        culprit = next((c for c in calls if c.call_id == death.running_call), None)
        if culprit is None and death.verdict.cause.blames_head and calls:
            # killed before its marker could say (the head overran), or its host is gone and
            # with it the marker: the head may have been running
            culprit = calls[0]
        started = calls.index(culprit) + 1 if culprit is not None else len(calls)
        if death.verdict.cause is DeathCause.HOST_LOST:
            started = len(calls)  # the answers died with the host: any of them may have run
        back = []
        for i, call in enumerate(calls):
            if call.future.done():
                continue  # its caller gave up: nobody waits for it
            if call is culprit:
                if self._runs_again(call, death):
                    back.append(call)
            elif call.policy.idempotent or i >= started:
                back.append(call)  # never started, or harmless to run again
            else:
                call.fail(self._reply_lost(call, death, finished=culprit is not None))
        self._queue.extendleft(reversed(back))
        requeued = len(back) - (culprit in back)
        return Settlement(culprit.method if culprit is not None else None, requeued)

    def _reply_lost(self, call: PendingCall, death: Death, finished: bool) -> WorkerCallError:
        """The error of a call that is not idempotent and may have run (``finished``: it ran
        before the call the worker died in) but whose reply died with its worker."""
        if death.verdict.cause is DeathCause.STOPPED:
            return PoolUnavailable(
                self.pool_name,
                f"the pool shut down before the reply of {call.method}() arrived; it may have "
                "run and was not run again because it is not idempotent",
            )
        during = (
            f"after {call.method}() had finished, before its reply reached the pool"
            if finished
            else f"while it owed {call.method}(), which may or may not have run"
        )
        hint = "it was not run again because it is not idempotent (idempotent=False)"
        return _crash_error(WorkerCrashed, self.pool_name, call, death, hint, during)

    def _runs_again(self, call: PendingCall, death: Death) -> bool:
        """The call the worker was running when it died: fail it with what the verdict implies,
        or say it goes back to the queue (``True``)."""
        cause = death.verdict.cause
        if cause is DeathCause.RECYCLED and call.policy.idempotent:
            return True  # a planned stop never interrupts a call; if one did, it runs again
        if cause is DeathCause.STOPPED:
            call.fail(PoolUnavailable(self.pool_name, "the pool shut down while the call ran"))
            return False
        if cause is DeathCause.TIMEOUT:
            call.fail(
                CallTimeout(
                    pool=self.pool_name, worker_id=death.worker.worker_id, pid=death.worker.pid,
                    method=call.method, timeout_s=call.timeout_s, stack=death.verdict.stack,
                )
            )  # fmt: skip
            return False
        call.crashes += 1
        retries = call.policy.retries_on_crash  # 0 if not idempotent: CallPolicy's invariant
        if call.crashes <= retries:
            self._retries.inc()
            log.info(
                "pool %s: retrying %s() on a fresh worker (attempt %d of %d)",
                self.pool_name, call.method, call.crashes + 1, retries + 1,
            )  # fmt: skip
            return True
        if retries > 0:
            self._quarantine[call.fingerprint] = time.monotonic() + self.config.poison_ttl_s
            hint = (
                f"it crashed {call.crashes} workers, so it is not retried again and the same "
                f"method+arguments fail fast for {self.config.poison_ttl_s:g}s"
            )
            call.fail(_crash_error(PoisonCall, self.pool_name, call, death, hint))
        elif not call.policy.idempotent:
            hint = "the call was not retried because it is not idempotent (idempotent=False)"
            call.fail(_crash_error(WorkerCrashed, self.pool_name, call, death, hint))
        else:
            hint = (
                "the call was not retried because retries_on_crash = 0; set it on the pool "
                "(or per call: pool.options(retries_on_crash=1)) if it is safe to run again"
            )
            call.fail(_crash_error(WorkerCrashed, self.pool_name, call, death, hint))
        return False

    # --- observation -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def describe_lane(self, identity: bytes, running_call: int | None) -> tuple[int, str]:
        """(calls owed, method of ``running_call`` if the lane owes it) for status rows."""
        lane = self._lanes.get(identity)
        if lane is None:
            return 0, ""
        method = next((c.method for c in lane.owed if c.call_id == running_call), "")
        return len(lane.owed), method

    def arena_bytes(self, identity: bytes) -> int:
        """Bytes of this worker's arena that the calls it owes hold now."""
        lane = self._lanes.get(identity)
        return lane.ring.in_use if lane is not None and lane.ring is not None else 0

    def waiting_callers(self) -> int:
        """Calls queued or sent whose caller still waits (cancelled callers are not counted:
        shutdown does not wait for answers nobody will read)."""
        waiting = sum(1 for c in self._queue if not c.future.done())
        for lane in self._lanes.values():
            waiting += sum(1 for c in lane.owed if not c.future.done())
        return waiting


def _crash_error(
    cls: type[WorkerCrashed],
    pool: str,
    call: PendingCall,
    death: Death,
    hint: str,
    during: str = "",
) -> WorkerCrashed:
    verdict = death.verdict
    return cls(
        pool=pool, worker_id=death.worker.worker_id, pid=death.worker.pid, method=call.method,
        signal=verdict.signal, exit_code=verdict.exit_code, reason=verdict.explanation,
        stack=verdict.stack, attempts=max(1, call.crashes), hint=hint, during=during,
        cause=verdict.cause.value, host=death.worker.host,
    )  # fmt: skip
