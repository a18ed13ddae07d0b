"""``WorkerPool``: the parent side of the isolation boundary, a thin front over two owners.

Design note. Everything runs on one event loop. The :class:`~minions.pool.supervisor.Supervisor`
owns the worker processes (spawn, hello, death, restart intensity, circuit, recycling); the
:class:`~minions.pool.dispatcher.Dispatcher` owns the calls (queue, lanes, costs, pipelining,
quarantine, deadlines, settling a death). Neither reads the other's state: the front routes
frames from the ROUTER channel to them and forwards their events (a worker became ready, is
leaving, died; a call overran or was cancelled with ``cancel="kill"``, a lane drained), and it
holds the lifecycle. Workers on other machines belong to the
:class:`~minions.pool.hosts.Hosts`, the Supervisor's counterpart that emits the same worker
events from what worker hosts report; :class:`~minions.pool.replies.Replies` reads the frames of
either kind of worker. The call API (typed ``call``, ``options``, ``map``) and its metrics live
in :mod:`~minions.pool.calling` and :mod:`~minions.pool.mapping`. See
``docs/concepts/worker-pools.md`` ("How a call travels").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from minions.errors import PoolUnavailable
from minions.ipc.channel import RouterChannel
from minions.ipc.endpoint import Endpoint
from minions.ipc.service import MethodSpec, describe, load_service
from minions.ops import metrics
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor
from minions.pool.calling import (
    CallFront,
    Calling,
    S,
    bound_service,
    check_parent_safe,
    service_path,
)
from minions.pool.calls import PendingCall
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Dispatcher
from minions.pool.events import Death, Settlement, WorkerRef
from minions.pool.hosts import Hosts
from minions.pool.pressure import MemoryPressure, throttle
from minions.pool.process import Phase
from minions.pool.replies import Replies
from minions.pool.states import Circuit, PoolSnapshot, PoolState
from minions.pool.supervisor import Supervisor
from minions.pool.verdict import DeathCause
from minions.pool.waiting import wait_until
from minions.remote import wire
from minions.remote.keys import KeyFileError, ServerKeys
from minions.resource import Resource, stop_deadline

log = logging.getLogger("minions.pool")

_TICK_S = 0.05
_STOP_RESERVE_S = 7.0  # of a shutdown deadline, kept for stopping workers (3 escalation steps)

CircuitListener = Callable[["WorkerPool", Circuit], None]


class WorkerPool(Calling[S], Resource):
    """A supervised pool of worker processes serving one ``WorkerService``.

    Configure by subclassing; ``WorkerPool[Service]`` names the service (and lets mypy check
    every call against its handlers), and every class attribute maps to a :class:`PoolConfig`
    field (see it for meanings and defaults)::

        class NativePool(WorkerPool[NativeDemo]):
            workers = 2
            retries_on_crash = 1

        async with NativePool() as pool:
            crc: int = await pool.call(NativeDemo.crc32, b"abc")

    ``service = "module:Class"`` names the service by string instead (calls are then checked
    at run time only). Every call ends with a value or one of the errors in
    :mod:`minions.errors`.
    """

    service: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bound = bound_service(cls)
        if bound is None:
            return
        path = service_path(bound)
        declared = cls.__dict__.get("service")
        if declared and declared != path:
            raise TypeError(
                f"{cls.__qualname__} binds WorkerPool[{bound.__qualname__}] but sets service = "
                f"{declared!r}; drop the service attribute (it is {path!r})"
            )
        cls.service = path

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
        self._circuit_listeners: list[CircuitListener] = []
        self._dispatcher = Dispatcher(self.config, self.name, self._send, self)
        self._replies = Replies(self.name, self._dispatcher, self._count_bad_frame)
        self._calls = CallFront(self.name, self._dispatcher, self._check_accepting)
        Calling.__init__(self, self._calls)
        worker_ids = itertools.count(1)  # one id space for local and remote workers
        self._supervisor = Supervisor(self.config, self.name, self, self._send, worker_ids)
        listens = bool(self.config.listen)
        self._hosts = Hosts(self.config, self.name, self, worker_ids) if listens else None
        self._tcp: RouterChannel | None = None
        self._pressure = MemoryPressure(
            self.config,
            self.name,
            self._supervisor.pids,
            self.apply_memory_level,
            self._supervisor.measured,
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
        try:
            await check_parent_safe(self.name, self.config.service, self.config.boot_timeout_s)
        except BaseException:
            self._state = PoolState.CLOSED
            raise
        self._load_service()
        self._endpoint = Endpoint.create(self.name)
        self._channel = RouterChannel(
            self._endpoint.address, self._on_frames, self._count_bad_frame, self.changed
        )
        try:
            self._channel.open()
            self._open_tcp()
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
        self._supervisor.measures_rss = not self._pressure.measures_workers
        self._task = asyncio.create_task(self._tick_loop(), name=f"minions-pool-{self.name}")
        log.info(
            "pool %s: started %d workers of %s", self.name, self.config.workers, self.config.service
        )

    def _open_tcp(self) -> None:
        """Listen for worker hosts, when configured: CURVE or nothing (see ``PoolConfig``)."""
        if self._hosts is None:
            return
        keys = ServerKeys(Path(self.config.server_key), Path(self.config.host_keys_dir))
        try:
            keys.check()
        except KeyFileError as exc:
            why = f"cannot listen on {self.config.listen}: {exc}"
            raise PoolUnavailable(self.name, why) from None
        self._tcp = RouterChannel(
            self.config.listen, self._on_host_frames, self._count_bad_frame, self.changed,
            secure=keys.configure, on_disconnect=self._hosts.probe,
        )  # fmt: skip
        self._tcp.open()
        self._hosts.begin(self._tcp, tuple(self._specs))
        log.info("pool %s: worker hosts connect to %s", self.name, self._tcp.bound)

    def _load_service(self) -> None:
        try:
            cls = load_service(self.config.service)
            self._specs = describe(cls)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            self._state = PoolState.CLOSED
            raise PoolUnavailable(
                self.name, f"cannot load service {self.config.service!r}: {exc!r}"
            ) from exc
        self._replies.bind(self._specs)
        assert self._loop is not None
        self._calls.bind(cls, self._specs, self.config, self._loop)

    async def _tick_loop(self) -> None:
        """The pool's slow loop: deadlines, then the Supervisor's housekeeping, then gauges."""
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            self._dispatcher.enforce_deadlines(now)
            self._supervisor.tick(now)
            if self._hosts is not None:
                self._hosts.tick(now)
            self._publish_gauges()

    async def shutdown(self, *, deadline: float | None = None) -> None:
        """Stop accepting calls, let calls whose callers still wait finish within
        ``shutdown_grace_s``, then stop workers politely, then SIGTERM, then SIGKILL.

        ``deadline`` (``time.monotonic()``) bounds the whole of it; under Gru it is Gru's one
        stop deadline (:func:`minions.resource.stop_deadline`), and pools stop concurrently."""
        if self._state in (PoolState.NEW, PoolState.CLOSING, PoolState.CLOSED):
            self._state = PoolState.CLOSED if self._state is PoolState.NEW else self._state
            return
        self._state = PoolState.CLOSING
        now = time.monotonic()
        if deadline is None:
            deadline = stop_deadline()
        if deadline is None:
            deadline = now + self.config.shutdown_grace_s + _STOP_RESERVE_S
        reserve = min(_STOP_RESERVE_S, (deadline - now) / 2)
        grace = max(0.0, min(self.config.shutdown_grace_s, deadline - reserve - now))
        await self._pressure.unhook()
        await self._wait_until(
            lambda: not self._dispatcher.waiting_callers() or not self._count_dispatchable(),
            grace,
        )
        gone = PoolUnavailable(self.name, "the pool shut down before the call ran")
        self._dispatcher.fail_queue(gone)
        if self._hosts is not None:
            self._hosts.close()  # their workers end with STOPPED: what they owed fails now
        await self._supervisor.stop_all(deadline, self._wait_until)
        self._dispatcher.fail_queue(gone)  # calls a stopped worker owed but never started
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()
        if self._tcp is not None:
            self._tcp.close()
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
        hosts = self._hosts
        for worker_id in [w.worker_id for w in self.snapshot().workers if w.phase == "ready"]:
            if self._supervisor.retire_by_id(worker_id, "restart") or (
                hosts is not None and hosts.retire_by_id(worker_id, "restart")
            ):
                replaced += 1
                if not await self.wait_ready():
                    raise PoolUnavailable(
                        self.name, "a replacement worker did not boot within boot_timeout_s"
                    )
        return replaced

    # --- calls (the API is calling.Calling's) -------------------------------------------------

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
        hosts = self._hosts
        if hosts is not None and hosts.owns(identity):
            return hosts.send(identity, payloads)
        return self._channel is not None and self._channel.send(identity, payloads)

    def _on_frames(self, identity: bytes, payloads: list[bytes]) -> None:
        worker = self._supervisor.heard(identity)
        if worker is None:
            self._count_bad_frame("unauthenticated")
            return
        self._replies.handle(worker, payloads, self._supervisor)

    def _on_host_frames(self, rid: bytes, payloads: list[bytes]) -> None:
        """A message of a worker host: control, or frames it relays from one of its workers."""
        hosts = self._hosts
        assert hosts is not None
        if payloads[0] == wire.CONTROL:
            for payload in payloads[1:]:
                hosts.on_control(rid, payload)
            return
        worker = hosts.heard(rid, payloads[0])
        if worker is not None:
            self._replies.handle(worker, payloads[1:], hosts)

    def _count_bad_frame(self, kind: str) -> None:
        metrics.PROTOCOL_ERRORS.labels(self.name, kind).inc()

    # --- events between the two owners (see the module note) ---------------------------------

    def worker_ready(self, worker: WorkerRef) -> None:
        self._dispatcher.open_lane(worker)
        self._publish_gauges()  # a scrape right after a (re)start sees it, not the next tick

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

    def _remote(self, worker: WorkerRef) -> Hosts | None:
        hosts = self._hosts
        return hosts if hosts is not None and hosts.owns(worker.identity) else None

    def call_overran(self, worker: WorkerRef, call: PendingCall) -> None:
        if hosts := self._remote(worker):
            hosts.kill(worker, DeathCause.TIMEOUT, call.method, call.timeout_s)
        else:
            self._supervisor.kill_overran(worker, call.method, call.timeout_s)

    def call_cancelled(self, worker: WorkerRef, call: PendingCall) -> None:
        if hosts := self._remote(worker):
            hosts.kill(worker, DeathCause.CANCELLED, call.method, call.timeout_s)
        else:
            self._supervisor.kill_cancelled(worker, call.method)

    def lane_lost(self, worker: WorkerRef) -> None:
        if hosts := self._remote(worker):
            hosts.lose_worker(worker)
        else:
            self._supervisor.lose(worker)

    def lane_drained(self, worker: WorkerRef) -> None:
        if hosts := self._remote(worker):
            hosts.drained(worker)
        else:
            self._supervisor.drained(worker)

    def changed(self) -> None:
        """Something moved (a burst of frames drained, a worker came or went): dispatch once
        and wake whoever waits on pool state."""
        self._dispatcher.dispatch()
        self._changed.set()

    # --- observation and memory pressure ---------------------------------------------------

    def _count_dispatchable(self) -> int:
        remote = self._hosts.count_ready() if self._hosts is not None else 0
        return self._supervisor.count_dispatchable() + remote

    def snapshot(self) -> PoolSnapshot:
        sup, hosts = self._supervisor, self._hosts
        rows = sup.rows(self._dispatcher.describe_lane)
        if hosts is not None:
            rows += hosts.rows(self._dispatcher.describe_lane)
        return PoolSnapshot(
            name=self.name,
            state=self._state,
            circuit=sup.breaker.state,
            workers_ready=self._count_dispatchable(),
            spares_ready=sup.count(Phase.READY, dispatchable=False),
            booting=sup.count_booting(),
            in_flight=self._dispatcher.in_flight,
            queue_depth=self._dispatcher.queue_depth,
            memory_level=self._pressure.level,
            pids=tuple(sup.pids()),
            workers=rows,
            restarts=sup.restarts,
            circuit_opened=sup.breaker.opened,
            zygote_pid=sup.spawner.zygote_pid,
            zygote_restarts=sup.spawner.zygote_restarts,
            hosts=hosts.snapshots() if hosts is not None else (),
            listen=self._tcp.bound if self._tcp is not None and self._tcp.is_open else "",
            hosts_lost=hosts.lost if hosts is not None else 0,
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
        remote = self._hosts.count_ready() if self._hosts is not None else 0
        self._labels["alive"].set(sup.count(Phase.READY) + remote)
        self._labels["queue"].set(self._dispatcher.queue_depth)
        self._labels["circuit"].set(1 if sup.breaker.state is Circuit.OPEN else 0)
        self._labels["rss"].set(sup.rss_bytes())

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checking whenever pool state changes."""
        return await wait_until(self._changed, predicate, timeout)
