"""``WorkerPool``: the parent side of the isolation boundary, a thin front over two owners.

Design note. Everything runs on one event loop. The :class:`~minions.pool.supervisor.Supervisor`
owns the worker processes (spawn, hello, death, restart intensity, circuit, recycling); the
:class:`~minions.pool.dispatcher.Dispatcher` owns the calls (queue, lanes, costs, pipelining,
quarantine, deadlines, settling a death). Neither reads the other's state: the front routes
frames from the ROUTER channel to them and forwards their events (a worker became ready, is
leaving, died; a call overran, a lane drained), and it holds the lifecycle and the metrics of
``call()``. See ``docs/concepts/worker-pools.md`` ("How a call travels").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from minions.errors import PoolUnavailable, ProtocolError, RemoteError, WorkerCallError
from minions.ipc import messages as m
from minions.ipc.channel import RouterChannel
from minions.ipc.endpoint import Endpoint
from minions.ipc.service import MethodSpec, describe, load_service
from minions.ops import metrics
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor
from minions.pool.calls import PendingCall
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Dispatcher
from minions.pool.events import Death, Settlement, WorkerRef
from minions.pool.pressure import MemoryPressure, throttle
from minions.pool.process import Phase, WorkerProcess
from minions.pool.states import Circuit, PoolSnapshot, PoolState, outcome_label
from minions.pool.supervisor import Supervisor
from minions.resource import Resource

log = logging.getLogger("minions.pool")

_TICK_S = 0.05
_UNKNOWN_METHOD = "(unknown)"  # one metric label for every name the service does not expose
_STOP_RESERVE_S = 7.0  # of a shutdown deadline, kept for stopping workers (3 escalation steps)

CircuitListener = Callable[["WorkerPool", Circuit], None]


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
        self._changed = asyncio.Event()
        self._endpoint: Endpoint | None = None
        self._channel: RouterChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._specs: dict[str, MethodSpec] = {}
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}
        self._method_metrics: dict[str, tuple[Any, Any]] = {}
        self._circuit_listeners: list[CircuitListener] = []
        self._dispatcher = Dispatcher(self.config, self.name, self._send, self)
        self._supervisor = Supervisor(self.config, self.name, self, self._send)
        self._pressure = MemoryPressure(
            self.config, self.name, self._supervisor.pids, self.apply_memory_level
        )
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
        self._load_service()
        self._endpoint = Endpoint.create(self.name)
        self._channel = RouterChannel(
            self._endpoint.address, self._on_frames, self._count_bad_frame, self.changed
        )
        try:
            self._channel.open()
            self._supervisor.begin(self._endpoint, self._specs)
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
        self._task = asyncio.create_task(self._tick_loop(), name=f"minions-pool-{self.name}")
        log.info(
            "pool %s: started %d workers of %s", self.name, self.config.workers, self.config.service
        )

    def _load_service(self) -> None:
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

    async def _tick_loop(self) -> None:
        """The pool's slow loop: deadlines, then the Supervisor's housekeeping, then gauges."""
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            self._dispatcher.enforce_deadlines(now)
            self._supervisor.tick(now)
            self._publish_gauges()

    async def shutdown(self, *, deadline: float | None = None) -> None:
        """Stop accepting calls, let calls whose callers still wait finish within
        ``shutdown_grace_s``, then stop workers politely, then SIGTERM, then SIGKILL.

        ``deadline`` (``time.monotonic()``) bounds the whole of it: Gru passes one budget to
        all its pools, which stop concurrently."""
        if self._state in (PoolState.NEW, PoolState.CLOSING, PoolState.CLOSED):
            self._state = PoolState.CLOSED if self._state is PoolState.NEW else self._state
            return
        self._state = PoolState.CLOSING
        now = time.monotonic()
        if deadline is None:
            deadline = now + self.config.shutdown_grace_s + _STOP_RESERVE_S
        reserve = min(_STOP_RESERVE_S, (deadline - now) / 2)
        grace = max(0.0, min(self.config.shutdown_grace_s, deadline - reserve - now))
        await self._pressure.unhook()
        await self._wait_until(
            lambda: (
                not self._dispatcher.waiting_callers() or not self._supervisor.count_dispatchable()
            ),
            grace,
        )
        gone = PoolUnavailable(self.name, "the pool shut down before the call ran")
        self._dispatcher.fail_queue(gone)
        await self._supervisor.stop_all(deadline, self._wait_until)
        self._dispatcher.fail_queue(gone)  # calls a stopped worker owed but never started
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

    async def restart_workers(self) -> int:
        """Replace every worker, one at a time, without failing a call (``minions pools
        restart``): each is retired (it finishes what it owes, then stops) only once the pool is
        back at full strength. Returns how many were replaced."""
        if self._state is not PoolState.RUNNING:
            raise PoolUnavailable(self.name, "it is not running")
        replaced = 0
        for worker_id in [w.worker_id for w in self.snapshot().workers if w.phase == "ready"]:
            if self._supervisor.retire_by_id(worker_id, "restart"):
                replaced += 1
                if not await self.wait_ready():
                    raise PoolUnavailable(
                        self.name, "a replacement worker did not boot within boot_timeout_s"
                    )
        return replaced

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
            label = method if method in self._specs else _UNKNOWN_METHOD
            metrics.WORKER_CALLS.labels(self.name, label, outcome_label(exc)).inc()
            metrics.WORKER_CALL_SECONDS.labels(self.name, label).observe(
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
                message=f"unknown method {method!r}; exposed: {sorted(self._specs)}",
                method=method,
            )
        try:
            encoded_args = m.encoder.encode(args)
            encoded_kwargs = m.encoder.encode(kwargs) if kwargs else m.EMPTY_MAP
        except RecursionError:
            raise TypeError(f"{method}(): arguments nested too deeply to encode") from None
        assert self._loop is not None
        call = self._dispatcher.admit(
            method, encoded_args, encoded_kwargs, self._loop.create_future()
        )
        self._dispatcher.dispatch()
        try:
            return await call.future
        except asyncio.CancelledError:
            self._dispatcher.withdraw(call)  # queued: never runs; sent: its answer is dropped
            raise

    def _check_accepting(self) -> None:
        if self._state is not PoolState.RUNNING:
            reason = "it is not started" if self._state is PoolState.NEW else "it is shutting down"
            raise PoolUnavailable(self.name, reason)
        breaker = self._supervisor.breaker
        if breaker.state is Circuit.OPEN:
            raise PoolUnavailable(
                self.name,
                f"workers crashed more than {self.config.restart_intensity} times in "
                f"{self.config.restart_period_s:g}s (restart intensity); the circuit is open",
                breaker.retry_after(time.monotonic()),
            )

    # --- wire -----------------------------------------------------------------------------

    def _send(self, identity: bytes, payloads: list[bytes]) -> bool:
        return self._channel is not None and self._channel.send(identity, payloads)

    def _on_frames(self, identity: bytes, payloads: list[bytes]) -> None:
        worker = self._supervisor.heard(identity)
        if worker is None:
            self._count_bad_frame("unauthenticated")
            return
        answered = 0
        for payload in payloads:
            try:
                answered += self._on_message(worker, payload)
            except Exception:  # a bug here must not stop the drain of the other frames
                log.exception(
                    "pool %s: handling a frame of worker %d failed", self.name, worker.worker_id
                )
                self._count_bad_frame("handler")
        if answered:
            self._supervisor.served(worker, answered)

    def _on_message(self, worker: WorkerProcess, payload: bytes) -> int:
        """Handle one frame; returns 1 if it answered a call."""
        try:
            msg = m.parent_decoder.decode(payload)
        except Exception as exc:  # DecodeError, ValidationError, RecursionError (too deep)
            return self._undecodable(worker, exc)
        match msg:
            case m.Result():
                call = self._take(worker, msg.call_id)
                if call is not None:
                    self._resolve(call, msg.value)
                    return 1
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
                    return 1
            case m.Hello():
                self._supervisor.on_hello(worker, msg)
            case m.Heartbeat():
                pass  # heard() already noted it
        return 0

    def _take(self, worker: WorkerProcess, call_id: int) -> PendingCall | None:
        call = self._dispatcher.take(worker.identity, call_id) if worker.said_hello else None
        if call is None:
            self._count_bad_frame("unexpected")
        return call

    def _resolve(self, call: PendingCall, raw: msgspec.Raw) -> None:
        try:
            value = self._decoders[call.method].decode(raw)
        except Exception as exc:  # ValidationError, DecodeError, RecursionError: never escapes
            call.fail(
                RemoteError(
                    kind="invalid-result",
                    type_name=type(exc).__name__,
                    message=f"result does not match the declared type: {exc}",
                    method=call.method,
                )
            )
            return
        call.resolve(value)

    def _undecodable(self, worker: WorkerProcess, exc: Exception) -> int:
        """A frame from one of our workers did not decode. Workers answer strictly in order and
        only a result carries handler-made structure, so it is the answer to the oldest call the
        worker owes: that call fails now instead of waiting for its timeout."""
        why = f"{type(exc).__name__}: {exc}"
        log.warning(
            "pool %s: dropped %r",
            self.name,
            ProtocolError(f"undecodable frame from worker {worker.worker_id}: {why}"),
        )
        self._count_bad_frame("decode")
        call = self._dispatcher.take(worker.identity, None) if worker.said_hello else None
        if call is None:
            return 0
        call.fail(
            RemoteError(
                kind="invalid-result",
                type_name=type(exc).__name__,
                message=f"the worker's reply could not be decoded ({why}); a handler that "
                "returns msgspec.Raw must return valid msgpack no more than ~1000 levels deep",
                method=call.method,
                worker_id=worker.worker_id,
            )
        )
        return 1

    def _count_bad_frame(self, kind: str) -> None:
        metrics.PROTOCOL_ERRORS.labels(self.name, kind).inc()

    # --- events between the two owners (see the module note) ---------------------------------

    def worker_ready(self, worker: WorkerRef) -> None:
        self._dispatcher.open_lane(worker)

    def worker_leaving(self, worker: WorkerRef, doomed: bool) -> bool:
        return self._dispatcher.close_lane(worker, doomed)

    def worker_died(self, death: Death) -> Settlement:
        """Settle a death. Answers the dead worker already delivered are read first, so a call
        that finished is not run again."""
        self._dispatcher.close_lane(death.worker, doomed=True)
        if self._channel is not None:
            self._channel.poll()
        return self._dispatcher.settle(death)

    def circuit_changed(self, circuit: Circuit, retry_after_s: float) -> None:
        if circuit is Circuit.OPEN:
            looping = "the pool is crash-looping (circuit open)"
            self._dispatcher.fail_queue(PoolUnavailable(self.name, looping, retry_after_s))
        self._publish_gauges()
        for listener in list(self._circuit_listeners):
            try:
                listener(self, circuit)
            except Exception:
                log.exception("pool %s: circuit listener %r raised", self.name, listener)

    def call_overran(self, worker: WorkerRef, call: PendingCall) -> None:
        self._supervisor.kill_overran(worker, call.method, call.timeout_s)

    def lane_lost(self, worker: WorkerRef) -> None:
        self._supervisor.lose(worker)

    def lane_drained(self, worker: WorkerRef) -> None:
        self._supervisor.drained(worker)

    def changed(self) -> None:
        """Something moved (a burst of frames drained, a worker came or went): dispatch once
        and wake whoever waits on pool state."""
        self._dispatcher.dispatch()
        self._changed.set()

    # --- observation and memory pressure ---------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        sup = self._supervisor
        return PoolSnapshot(
            name=self.name,
            state=self._state,
            circuit=sup.breaker.state,
            workers_ready=sup.count_dispatchable(),
            spares_ready=sup.count(Phase.READY, dispatchable=False),
            booting=sup.count_booting(),
            in_flight=self._dispatcher.in_flight,
            queue_depth=self._dispatcher.queue_depth,
            memory_level=self._pressure.level,
            pids=tuple(sup.pids()),
            workers=sup.rows(self._dispatcher.describe_lane),
            restarts=sup.restarts,
            circuit_opened=sup.breaker.opened,
            zygote_pid=sup.spawner.zygote_pid,
            zygote_restarts=sup.spawner.zygote_restarts,
        )

    def worker_pids(self) -> list[int]:
        """Pids of every live worker process (for the memory monitor)."""
        return self._supervisor.pids()

    def subscribe_circuit(self, listener: CircuitListener) -> Callable[[], None]:
        """Call ``listener(pool, circuit)`` on every circuit change (Gru reports crash loops
        this way); returns the unsubscribe function."""
        self._circuit_listeners.append(listener)
        return lambda: self._circuit_listeners.remove(listener)

    def attach_memory_monitor(self, monitor: MemoryMonitor) -> None:
        """Follow a shared monitor (Gru does this before startup) instead of an own one."""
        if self._state is not PoolState.NEW:
            raise RuntimeError("attach the memory monitor before the pool starts")
        self._pressure.attach(monitor)

    def apply_memory_level(self, level: MemoryLevel) -> None:
        """Called on each memory level change: throttle (HIGH), shed and recycle (CRITICAL)."""
        previous = self._pressure.level
        self._pressure.level = level
        self._dispatcher.set_throttle(throttle(level, self.config))
        if level > previous:
            self._supervisor.relieve_memory(level)
        self.changed()

    def _publish_gauges(self) -> None:
        sup = self._supervisor
        self._labels["alive"].set(sup.count(Phase.READY))
        self._labels["queue"].set(self._dispatcher.queue_depth)
        self._labels["circuit"].set(1 if sup.breaker.state is Circuit.OPEN else 0)
        self._labels["rss"].set(sup.rss_bytes())

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
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
