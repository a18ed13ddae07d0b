"""Gru's side of the control endpoint: a ROUTER socket on Gru's event loop.

Design note. Requests are rare (an operator typing), so this uses ``zmq.asyncio`` for plainness
rather than the hand-driven socket of the worker wire. Each request runs in its own tracked
task, so a rolling pool restart (which takes as long as its workers take to boot) never holds up
a ``status``. Everything is done through Gru's public surface (``status()``,
``stop_orchestration()``, each pool's ``snapshot()`` and ``restart_workers()``); a request that
cannot be done gets a :class:`~minions.control.messages.Refused` with the reason, and nothing a
client sends can raise out of here: Gru never dies of an operator's typo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import msgspec
import psutil
import zmq
import zmq.asyncio

from minions.control import messages as m
from minions.control.endpoint import Place
from minions.errors import MinionsError
from minions.pool.pool import WorkerPool
from minions.resource import Resource
from minions.runtime.results import GruStatus, StopResult

log = logging.getLogger("minions.control")


class ControlTarget(Protocol):
    """What the server needs of Gru."""

    def status(self) -> GruStatus: ...
    def live_resources(self) -> list[Resource]: ...
    async def stop_orchestration(self, orchestration_id: str) -> StopResult: ...


class ControlServer:
    """Serves one Gru's control socket at ``place``; :meth:`start` and :meth:`stop` on its loop."""

    def __init__(self, target: ControlTarget, place: Place) -> None:
        self.target = target
        self.place = place
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._started_at = psutil.Process().create_time()

    def start(self) -> None:
        """Bind (raises ``zmq.ZMQError`` if it cannot) and start serving."""
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.place.address)
        except zmq.ZMQError:
            sock.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="minions-control")

    async def stop(self) -> None:
        """Answer in-flight requests with a refusal, close the socket, remove its files."""
        tasks = [t for t in (self._task, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self.place.remove()

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"":  # a REQ client sends [id, "", payload]
                log.debug("control: dropped a message of %d frames", len(frames))
                continue
            self._spawn(self._answer(frames[0], frames[2]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _answer(self, identity: bytes, payload: bytes) -> None:
        try:
            reply = await self.handle(payload)
        except asyncio.CancelledError:
            self._send(identity, m.Refused("Gru is shutting down; the request was not finished"))
            raise
        self._send(identity, reply)

    def _send(self, identity: bytes, reply: m.Reply) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # the client gave up and left
            self._sock.send_multipart([identity, b"", m.encoder.encode(reply)], zmq.NOBLOCK)

    async def handle(self, payload: bytes) -> m.Reply:
        """Decode one request and do it; every failure becomes a :class:`Refused`."""
        try:
            request = m.request_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            return m.Refused(f"not a control request this Gru understands ({exc})")
        try:
            match request:
                case m.StatusRequest():
                    return self.status()
                case m.RestartPool(pool=name):
                    return await self.restart_pool(name)
                case m.StopOrchestration(orchestration_id=oid):
                    result = await self.target.stop_orchestration(oid)
                    return m.OrchestrationStopped(result)
        except MinionsError as exc:  # e.g. PoolUnavailable: the pool is not running
            return m.Refused(str(exc))
        except Exception as exc:
            log.exception("control request %r failed", request)
            return m.Refused(f"{type(request).__name__} failed in Gru: {exc!r}")
        return m.Refused(f"unhandled request {type(request).__name__}")  # pragma: no cover

    def status(self) -> m.Status:
        gru = self.target.status()
        return m.Status(
            pid=os.getpid(),
            state=gru.state.value,
            started_at=self._started_at,
            memory_level=gru.memory_level.name,
            pipelines_paused=gru.pipelines_paused,
            durable=gru.durable,
            metrics_url=gru.metrics_url,
            workflows_in_flight=sum(o.in_flight for o in gru.orchestrations),
            orchestrations=gru.orchestrations,
            pools=tuple(pool_row(p) for p in self.pools().values()),
        )

    def pools(self) -> dict[str, WorkerPool]:
        return {r.name: r for r in self.target.live_resources() if isinstance(r, WorkerPool)}

    async def restart_pool(self, name: str) -> m.Reply:
        pool = self.pools().get(name)
        if pool is None:
            running = ", ".join(sorted(self.pools())) or "none"
            return m.Refused(f"no pool named {name!r} is running (running pools: {running})")
        began = time.monotonic()
        replaced = await pool.restart_workers()
        log.info("control: pool %s restarted %d workers in %.1fs", name, replaced,
                 time.monotonic() - began)  # fmt: skip
        return m.PoolRestarted(name, replaced)


def pool_row(pool: WorkerPool) -> m.PoolRow:
    snap = pool.snapshot()
    return m.PoolRow(
        name=snap.name,
        state=snap.state.value,
        circuit=snap.circuit.value,
        memory_level=snap.memory_level.name,
        queue_depth=snap.queue_depth,
        in_flight=snap.in_flight,
        restarts=snap.restarts,
        workers=tuple(
            m.WorkerRow(
                w.worker_id,
                w.pid,
                w.role,
                w.phase,
                w.rss_bytes,
                w.calls_served,
                w.in_flight,
                w.host,
            )
            for w in snap.workers
        ),
        listen=snap.listen,
        hosts=tuple(
            m.HostRow(h.name, h.pid, h.hostname, h.workers, h.silent_s, h.connected_s)
            for h in snap.hosts
        ),
        hosts_lost=snap.hosts_lost,
    )
