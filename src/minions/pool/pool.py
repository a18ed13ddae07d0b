"""``WorkerPool``: the parent side of the isolation boundary.

Design note. Everything runs on Gru's event loop, in one thread: the ROUTER channel's reader,
each worker's pidfd reader and a slow supervising task. A call is encoded once, waits in one
FIFO queue, and goes to an idle active worker; when none is idle, it may be *pipelined* behind
the calls a worker already has, but only while the predicted run time of that backlog (a moving
average per method) stays under ``pipeline_window_s``. So tiny calls stream back to back (the
worker never waits for the parent) and nothing ever queues behind a slow call.
Workers answer strictly in order, so when a worker dies the first call it owed is the one that
killed it and the rest never started: those are re-queued at no cost. See ``supervisor.py`` for
the death, restart and recycle side.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any, ClassVar

import msgspec
from msgspec import Raw

from minions.errors import (
    Overloaded,
    PoisonCall,
    PoolUnavailable,
    ProtocolError,
    RemoteError,
    WorkerCallError,
)
from minions.ipc import messages as m
from minions.ipc.channel import RouterChannel
from minions.ipc.endpoint import Endpoint
from minions.ipc.service import MethodSpec, describe, load_service
from minions.ops import metrics
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor
from minions.pool.calls import PendingCall, fingerprint
from minions.pool.config import PoolConfig
from minions.pool.intensity import Backoff, RestartIntensity
from minions.pool.pressure import MemoryPressure
from minions.pool.process import Phase, WorkerProcess
from minions.pool.states import Circuit, PoolSnapshot, PoolState, WorkerSnapshot, outcome_label
from minions.pool.supervisor import Supervisor
from minions.resource import Resource

log = logging.getLogger("minions.pool")


class WorkerPool(Resource):
    """A supervised pool of worker processes serving one ``WorkerService``.

    Configure by subclassing; every class attribute below maps to a :class:`PoolConfig` field
    (see it for meanings and defaults)::

        class NativePool(WorkerPool):
            service = "native_demo.service:NativeDemo"
            workers = 2
            retries_on_crash = 1

        async with NativePool() as pool:
            await pool.call("crc32", b"abc")

    Every call ends with a value or one of the errors in :mod:`minions.errors`.
    """

    service: ClassVar[str] = ""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config if config is not None else PoolConfig.from_class(type(self))
        self.name = self.config.name or type(self).__name__
        self._state = PoolState.NEW
        self._circuit = Circuit.CLOSED
        self._queue: collections.deque[PendingCall] = collections.deque()
        self._workers: dict[bytes, WorkerProcess] = {}
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._quarantine: dict[bytes, float] = {}
        self._specs: dict[str, MethodSpec] = {}
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}
        self._method_metrics: dict[str, tuple[Any, Any]] = {}
        self._cost: dict[str, float] = {}  # moving average run time per method, seconds
        self._active: tuple[WorkerProcess, ...] = ()
        self._intensity = RestartIntensity(
            self.config.restart_intensity, self.config.restart_period_s
        )
        self._backoff = Backoff(
            self.config.restart_backoff_initial_s, self.config.restart_backoff_max_s
        )
        self._changed = asyncio.Event()
        self._endpoint: Endpoint | None = None
        self._channel: RouterChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervisor = Supervisor(self)
        self._task: asyncio.Task[None] | None = None
        self._pressure = MemoryPressure(self)
        self._labels = {
            "alive": metrics.WORKERS_ALIVE.labels(self.name),
            "queue": metrics.QUEUE_DEPTH.labels(self.name),
            "rss": metrics.WORKER_RSS_BYTES.labels(self.name),
            "circuit": metrics.POOL_CIRCUIT_OPEN.labels(self.name),
        }

    # --- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        """Spawn the workers and wait until ``workers`` of them said hello.

        Raises ``PoolUnavailable`` (with the worker's traceback) if the service cannot boot.
        """
        if self._state is not PoolState.NEW:
            raise RuntimeError(f"pool {self.name!r} was already started (state {self._state})")
        self._state = PoolState.STARTING
        self._loop = asyncio.get_running_loop()
        try:
            self._specs = describe(load_service(self.config.service))
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            self._state = PoolState.CLOSED
            raise PoolUnavailable(
                self.name, f"cannot load service {self.config.service!r}: {exc!r}"
            ) from exc
        self._decoders = {n: msgspec.msgpack.Decoder(s.result_type) for n, s in self._specs.items()}
        self._method_metrics = {
            n: (
                metrics.WORKER_CALLS.labels(self.name, n, "ok"),
                metrics.WORKER_CALL_SECONDS.labels(self.name, n),
            )
            for n in self._specs
        }
        self._endpoint = Endpoint.create(self.name)
        self._channel = RouterChannel(
            self._endpoint.address, self._on_frames, self._on_bad_frame, self.dispatch
        )
        try:
            self._channel.open()
            self._supervisor.spawn_missing()
            try:
                await asyncio.wait_for(self._supervisor.wait_booted(), self.config.boot_timeout_s)
            except TimeoutError:
                raise PoolUnavailable(
                    self.name,
                    f"workers of {self.config.service!r} did not finish setup() within "
                    f"boot_timeout_s={self.config.boot_timeout_s:g}s",
                ) from None
        except BaseException:
            await self.shutdown()
            raise
        self._state = PoolState.RUNNING
        self._pressure.hook()
        self._task = asyncio.create_task(self._supervisor.run(), name=f"minions-pool-{self.name}")
        log.info(
            "pool %s: started %d workers of %s", self.name, self.config.workers, self.config.service
        )

    async def shutdown(self) -> None:
        """Stop accepting calls, let queued and in-flight calls finish within
        ``shutdown_grace_s``, then stop workers politely, then SIGTERM, then SIGKILL."""
        if self._state in (PoolState.NEW, PoolState.CLOSING, PoolState.CLOSED):
            self._state = PoolState.CLOSED if self._state is PoolState.NEW else self._state
            return
        self._state = PoolState.CLOSING
        await self._pressure.unhook()
        await self._wait_until(
            lambda: (not self._queue and not self._in_flight) or not self._supervisor.serving(),
            self.config.shutdown_grace_s,
        )
        gone = PoolUnavailable(self.name, "the pool shut down before the call ran")
        self._fail_queue(gone)
        await self._supervisor.stop_all()
        self._fail_queue(gone)  # calls a stopped worker owed but never started
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()
        if self._endpoint is not None:
            self._endpoint.remove()
        self._state = PoolState.CLOSED
        self._publish_gauges()
        log.info("pool %s: shut down", self.name)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker and spare has booted; ``False`` if ``timeout`` ran out."""
        cfg = self.config

        def full() -> bool:
            snap = self.snapshot()
            return snap.workers_ready >= cfg.workers and snap.spares_ready >= cfg.spare_workers

        return await self._wait_until(full, cfg.boot_timeout_s if timeout is None else timeout)

    # --- calls ----------------------------------------------------------------------------

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``method(*args, **kwargs)`` in a worker and return its result.

        Ends with the value or a :class:`~minions.errors.WorkerCallError` subclass; arguments
        msgspec cannot encode raise ``TypeError`` before anything is dispatched.
        """
        started = time.perf_counter()
        try:
            value = await self._submit(method, args, kwargs)
        except WorkerCallError as exc:
            method = method if method in self._specs else "<unknown>"  # bounded label values
            metrics.WORKER_CALLS.labels(self.name, method, outcome_label(exc)).inc()
            metrics.WORKER_CALL_SECONDS.labels(self.name, method).observe(
                time.perf_counter() - started
            )
            raise
        ok, seconds = self._method_metrics[method]  # known: _submit checked the method
        ok.inc()
        seconds.observe(time.perf_counter() - started)
        return value

    async def _submit(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._check_accepting()
        if method not in self._specs:
            raise RemoteError(
                kind=m.FailureKind.UNKNOWN_METHOD.value,
                type_name="LookupError",
                message=f"unknown method; exposed: {sorted(self._specs)}",
                method=method,
            )
        encoded_args = m.encoder.encode(args)
        encoded_kwargs = m.encoder.encode(kwargs) if kwargs else m.EMPTY_MAP
        if self._pressure.level is MemoryLevel.CRITICAL:
            raise Overloaded(self.name, "memory pressure is critical")
        if len(self._queue) >= self.config.max_queue:
            raise Overloaded(
                self.name, f"the dispatch queue is full (max_queue={self.config.max_queue})"
            )
        if self._quarantine:
            self._check_quarantine(method, encoded_args, encoded_kwargs)
        assert self._loop is not None
        call = PendingCall(
            next(self._ids), method, encoded_args, encoded_kwargs, self._loop.create_future()
        )
        self._queue.append(call)
        self.dispatch()
        try:
            return await call.future
        except asyncio.CancelledError:
            if call in self._queue:  # not sent yet: forget it; a sent call's answer is dropped
                self._queue.remove(call)
            raise

    def _check_accepting(self) -> None:
        if self._state is not PoolState.RUNNING:
            reason = "it is not started" if self._state is PoolState.NEW else "it is shutting down"
            raise PoolUnavailable(self.name, reason)
        if self._circuit is Circuit.OPEN:
            raise PoolUnavailable(
                self.name,
                f"workers crashed more than {self.config.restart_intensity} times in "
                f"{self.config.restart_period_s:g}s (restart intensity); the circuit is open",
                self._supervisor.retry_after(),
            )

    def _check_quarantine(self, method: str, args: bytes, kwargs: bytes) -> None:
        now = time.monotonic()
        self._quarantine = {fp: t for fp, t in self._quarantine.items() if t > now}
        until = self._quarantine.get(fingerprint(method, args, kwargs))
        if until is not None:
            raise PoisonCall(
                pool=self.name,
                worker_id=0,
                pid=0,
                method=method,
                signal=None,
                exit_code=None,
                reason="quarantined",
                hint=f"this method and these arguments crashed workers "
                f"before; they fail fast for another {until - now:.0f}s without dispatch",
            )

    # --- dispatch -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Send queued calls to workers with room; called whenever either side changes.

        Calls bound for one worker in one pass travel as one message (one pipe flush)."""
        queue = self._queue
        if not queue:
            return
        depth, limit = self._pressure.throttle()
        batches: dict[WorkerProcess, list[bytes]] = {}
        now = time.monotonic()
        while queue and self._in_flight < limit:
            call = queue[0]
            if call.future.done():
                queue.popleft()
                continue
            expected = self._cost.get(call.method, self.config.pipeline_window_s)
            worker = self._pick_worker(depth, expected)
            if worker is None:
                break
            queue.popleft()
            if not worker.inflight:
                worker.head_since = now
                worker.backlog_s = 0.0
            call.expected_s = expected
            worker.backlog_s += expected
            worker.inflight.append(call)
            self._in_flight += 1
            call_msg = m.Call(call.call_id, call.method, Raw(call.args), Raw(call.kwargs))
            batches.setdefault(worker, []).append(m.encoder.encode(call_msg))
        assert self._channel is not None
        for worker, payloads in batches.items():
            if not self._channel.send(worker.identity, payloads):
                self._supervisor.lose(worker)

    def _pick_worker(self, depth: int, expected_s: float) -> WorkerProcess | None:
        """An idle worker, else the one with the shortest predicted backlog that stays within
        ``pipeline_window_s`` after taking this call and has fewer than ``depth`` calls."""
        best: WorkerProcess | None = None
        best_backlog = self.config.pipeline_window_s - expected_s
        for worker in self._active:
            if worker.phase is not Phase.READY:
                continue
            if not worker.inflight:
                return worker
            if len(worker.inflight) < depth and worker.backlog_s <= best_backlog:
                best, best_backlog = worker, worker.backlog_s
        return best

    def refresh_active(self) -> None:
        """Recompute the workers calls may go to; the supervisor calls this on every change
        of a worker's phase or role, so the hot path never filters."""
        self._active = tuple(w for w in self._workers.values() if w.dispatchable)

    def requeue_front(self, calls: list[PendingCall]) -> None:
        """Put calls back at the head of the queue, keeping their order."""
        self._queue.extendleft(reversed(calls))

    def _fail_queue(self, exc: WorkerCallError) -> None:
        while self._queue:
            self._queue.popleft().fail(exc)

    # --- wire -----------------------------------------------------------------------------

    def _on_frames(self, identity: bytes, payloads: list[bytes]) -> None:
        worker = self._workers.get(identity)
        if worker is None:
            self._on_bad_frame("unauthenticated")
            return
        for payload in payloads:
            self._on_message(worker, payload)
        self._supervisor.after_answer(worker)  # dispatch follows once the channel is drained

    def _on_message(self, worker: WorkerProcess, payload: bytes) -> None:
        try:
            msg = m.parent_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = ProtocolError(f"undecodable frame from worker {worker.worker_id}: {exc}")
            log.warning("pool %s: dropped %r", self.name, error)
            self._on_bad_frame("decode")
            return
        match msg:
            case m.Result():
                call = self._take(worker, msg.call_id)
                if call is not None:
                    self._resolve(call, msg.value)
            case m.Failure():
                call = self._take(worker, msg.call_id)
                if call is not None:
                    call.fail(
                        RemoteError(
                            kind=msg.kind.value,
                            type_name=msg.type_name,
                            message=msg.message,
                            remote_traceback=msg.traceback,
                            method=call.method,
                            worker_id=worker.worker_id,
                        )
                    )
            case m.Hello():
                self._supervisor.on_hello(worker, msg)
            case m.Heartbeat():
                pass

    def _take(self, worker: WorkerProcess, call_id: int) -> PendingCall | None:
        """Pop the call a worker just answered; it must be the oldest it owes."""
        if not worker.said_hello or not worker.inflight or worker.inflight[0].call_id != call_id:
            self._on_bad_frame("unexpected")
            return None
        call = worker.inflight.popleft()
        self._in_flight -= 1
        worker.calls_served += 1
        now = time.monotonic()
        ran = now - worker.head_since
        cost = self._cost.get(call.method)
        self._cost[call.method] = ran if cost is None else 0.8 * cost + 0.2 * ran
        worker.backlog_s -= call.expected_s
        worker.head_since = now
        return call

    def _resolve(self, call: PendingCall, raw: msgspec.Raw) -> None:
        try:
            call.resolve(self._decoders[call.method].decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            call.fail(
                RemoteError(
                    kind="invalid-result",
                    type_name=type(exc).__name__,
                    message=f"result does not match the declared type: {exc}",
                    method=call.method,
                )
            )
        self._backoff.succeeded()

    def _on_bad_frame(self, kind: str) -> None:
        metrics.PROTOCOL_ERRORS.labels(self.name, kind).inc()

    # --- observation and memory pressure ---------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        workers = list(self._workers.values())
        return PoolSnapshot(
            name=self.name,
            state=self._state,
            circuit=self._circuit,
            workers_ready=sum(1 for w in workers if w.dispatchable),
            spares_ready=sum(1 for w in workers if w.phase is Phase.READY and not w.dispatchable),
            booting=sum(1 for w in workers if w.phase is Phase.BOOTING),
            in_flight=self._in_flight,
            queue_depth=len(self._queue),
            memory_level=self._pressure.level,
            pids=tuple(w.pid for w in workers),
            workers=tuple(
                WorkerSnapshot(
                    worker_id=w.worker_id,
                    pid=w.pid,
                    role=w.role.value,
                    phase=w.phase.value,
                    rss_bytes=w.rss_bytes,
                    calls_served=w.calls_served,
                    in_flight=len(w.inflight),
                )
                for w in workers
                if w.phase is not Phase.DEAD
            ),
            restarts=self._supervisor.restarts,
        )

    async def restart_workers(self) -> int:
        """Replace every worker, one at a time, without failing a call (``minions pools
        restart``): each is retired (it finishes what it owes, then stops) only once the pool is
        back at full strength. Returns how many were replaced."""
        if self._state is not PoolState.RUNNING:
            raise PoolUnavailable(self.name, "it is not running")
        old = [w for w in self._workers.values() if w.phase is Phase.READY]
        for worker in old:
            if worker.phase is not Phase.READY:
                continue  # died or was recycled meanwhile: already replaced
            self._supervisor.retire(worker, "restart")
            full = await self.wait_ready()
            if not full:
                raise PoolUnavailable(
                    self.name, "a replacement worker did not boot within boot_timeout_s"
                )
        return len(old)

    def worker_pids(self) -> list[int]:
        """Pids of every live worker process (for the memory monitor)."""
        return [w.pid for w in self._workers.values() if w.phase is not Phase.DEAD]

    def attach_memory_monitor(self, monitor: MemoryMonitor) -> None:
        """Follow a shared monitor (Gru does this before startup) instead of an own one."""
        if self._state is not PoolState.NEW:
            raise RuntimeError("attach the memory monitor before the pool starts")
        self._pressure.attach(monitor)

    def apply_memory_level(self, level: MemoryLevel) -> None:
        """Called on each memory level change: throttle (HIGH), shed and recycle (CRITICAL)."""
        previous = self._pressure.level
        self._pressure.level = level
        if level > previous:
            self._supervisor.relieve_memory(level)
        self.dispatch()
        self.notify_changed()

    def _publish_gauges(self) -> None:
        snap = self.snapshot()
        self._labels["alive"].set(snap.workers_ready + snap.spares_ready)
        self._labels["queue"].set(snap.queue_depth)
        self._labels["circuit"].set(1 if self._circuit is Circuit.OPEN else 0)
        self._labels["rss"].set(sum(w.rss_bytes for w in self._workers.values()))

    async def _wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checking whenever pool state changes."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    def notify_changed(self) -> None:
        self._changed.set()
