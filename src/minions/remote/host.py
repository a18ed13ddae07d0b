"""``minions worker-host``: supervise local workers and serve them to remote pools.

Design note. For each pool it connects to, the host runs one :class:`Session` after another. A
session is a fresh DEALER connection (a random routing id, CURVE as this host's key), a hello,
and, once the pool welcomes it, an ordinary :class:`~minions.pool.supervisor.Supervisor` of
``workers`` local processes on a private ipc socket. The Supervisor does what it does in a pool
(spawn, hello, death, verdict, restart intensity, backoff, recycling); its events go to the pool
instead of a Dispatcher (:mod:`minions.remote.wire`), and the pool's requests (kill a worker
whose call overran, retire one, it drained) come back to it. Worker frames are relayed as they
are, in both directions; before a death is reported, the worker's socket is read empty, so the
pool gets its answers first.

A session ends when the pool has said nothing for its ``host_timeout_s``, or refuses it (it
lost us during a partition, or restarted). Its workers are stopped with it, because what they
were running belongs to a session the pool has already settled, and the next session starts
with new ones: the pool never sees an answer twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from minions.ipc import messages as m
from minions.ipc.channel import RouterChannel
from minions.ipc.endpoint import Endpoint
from minions.ipc.service import describe, load_service
from minions.ops import sdnotify
from minions.pool.config import PoolConfig
from minions.pool.events import Death, Settlement, WorkerRef
from minions.pool.states import Circuit
from minions.pool.supervisor import Supervisor
from minions.pool.waiting import wait_until
from minions.remote import keys, wire

log = logging.getLogger("minions.remote")

_TICK_S = 0.05
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_STOP_S = 5.0  # a session's workers get this long to stop (polite, SIGTERM, SIGKILL)
_BYE_LINGER_MS = 1000  # how long a goodbye may wait for the pool's socket
_REJOIN_MIN_S, _REJOIN_MAX_S = 0.2, 5.0  # between sessions: doubling while refused


@dataclass(frozen=True, slots=True)
class HostConfig:
    """One worker host: where the pools are, what it serves, and its keys."""

    connect: tuple[str, ...]
    pool: PoolConfig  # the local Supervisor's settings: service, workers, spares, spawn, RSS
    key: Path  # this host's .key_secret
    server_key: Path  # the pool's public .key
    hello_timeout_s: float = 5.0  # waiting for a welcome, before the pool told its own timeout

    def __post_init__(self) -> None:
        if not self.connect:
            raise ValueError("a worker host needs at least one --connect tcp://HOST:PORT")
        for address in self.connect:
            if not address.startswith("tcp://"):
                raise ValueError(f"--connect takes tcp:// addresses, got {address!r}")


class Session:
    """One connection to one pool, and the workers serving it (see the module note)."""

    def __init__(self, cfg: HostConfig, address: str, methods: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.address = address
        self._methods = methods
        self.rid = b"h" + secrets.token_bytes(15)
        self._sup = Supervisor(cfg.pool, cfg.pool.name, self, self._send_worker)
        self._endpoint = Endpoint.create(cfg.pool.name)
        self._local = RouterChannel(
            self._endpoint.address, self._from_worker, self._bad, self.changed
        )
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self._link = self._ctx.socket(zmq.DEALER)
        self._loop = asyncio.get_running_loop()
        self._announced: dict[bytes, WorkerRef] = {}
        self._changed = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.refused = False  # the pool refused the hello itself (not a rejoin)
        self.pool_name = ""
        self._welcomed = False
        self._timeout_s = cfg.hello_timeout_s
        self._last_heard = time.monotonic()
        self._next_beat = 0.0
        self._fd = -1

    # --- start and end -------------------------------------------------------------------

    def open(self) -> None:
        link = self._link
        keys.client_options(self.cfg.key, self.cfg.server_key)(link)
        link.setsockopt(zmq.ROUTING_ID, self.rid)
        link.setsockopt(zmq.LINGER, 0)
        link.setsockopt(zmq.SNDHWM, 0)
        link.setsockopt(zmq.RCVHWM, 0)
        link.connect(self.address)
        self._fd = int(link.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._local.open()
        hello = wire.HostHello(
            wire.HOST_PROTOCOL, m.PROTOCOL_VERSION, self.cfg.pool.service, self._methods,
            self.cfg.pool.workers, os.getpid(), os.uname().nodename,
        )  # fmt: skip
        self._control(hello)
        self._last_heard = time.monotonic()

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def close(self) -> None:
        """Stop this session's workers, then its sockets; a host that stops says goodbye (given
        a moment to reach a live pool), one whose session the pool ended does not."""
        linger = 0
        if self._welcomed:
            await self._sup.stop_all(time.monotonic() + _STOP_S, self._wait_until)
            if not self.ended.is_set():
                self._control(wire.HostBye("the worker host is stopping"))
                linger = _BYE_LINGER_MS
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self._link.close(linger=linger)
        self._ctx.term()
        self._local.close()
        self._endpoint.remove()

    def tick(self, now: float) -> None:
        """Beat to the pool; end the session if the pool has gone silent."""
        silent = now - self._last_heard
        if silent > self._timeout_s:
            what = "answered the hello" if not self._welcomed else "said anything"
            self.end(f"the pool has not {what} for {silent:.1f}s")
            return
        if self._welcomed:
            self._sup.tick(now)
            if now >= self._next_beat:
                self._next_beat = now + self._timeout_s / 4
                self._control(wire.Beat())

    # --- the pool's side -------------------------------------------------------------------

    def _drain(self) -> None:
        """Read the pool's messages until none is left. As in the pool's channel, the first two
        are looked for with ``EVENTS`` (cheaper than the ``zmq.Again`` a latency-path drain of
        one message would otherwise raise), the rest read until ``zmq.Again``."""
        link = self._link
        looks = 2
        while True:
            try:
                if looks:
                    looks -= 1
                    if not link.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                        return
                frames = link.recv_multipart(_NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: read empty, which re-arms the edge; or closed
                return
            self._last_heard = time.monotonic()
            try:
                self._from_pool(frames)
            except Exception:  # a bug here must not stop the drain
                log.exception("handling a message of pool %s failed", self.address)

    def _from_pool(self, frames: list[bytes]) -> None:
        if frames[0] != wire.CONTROL:
            ref = self._announced.get(frames[0])
            if ref is not None and not self._local.send(ref.identity, frames[1:]):
                self._sup.lose(ref)
            return
        try:
            msg = wire.pool_decoder.decode(frames[1])
        except (IndexError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable message from pool %s: %s", self.address, exc)
            return
        match msg:
            case wire.Welcome():
                self._welcome(msg)
            case wire.Refused():
                self.refused = not msg.rejoin
                self.end(f"the pool refused this session: {msg.reason}")
            case wire.Kill():
                self._kill(msg)
            case wire.Retire():
                ref = self._announced.get(msg.worker)
                if ref is not None:
                    self._sup.retire_by_id(ref.worker_id, msg.reason)
            case wire.Drained():
                ref = self._announced.get(msg.worker)
                if ref is not None:
                    self._sup.drained(ref)
            case wire.Beat():
                pass

    def _welcome(self, welcome: wire.Welcome) -> None:
        if self._welcomed:
            return
        self._welcomed = True
        self.pool_name = welcome.pool
        self._timeout_s = welcome.timeout_s
        log.info(
            "joined pool %r at %s; starting %d workers of %s",
            welcome.pool, self.address, self.cfg.pool.workers, self.cfg.pool.service,
        )  # fmt: skip
        self._sup.begin(self._endpoint, self._methods)

    def _kill(self, kill: wire.Kill) -> None:
        ref = self._announced.get(kill.worker)
        if ref is None:
            return
        if kill.cause == "timeout":
            self._sup.kill_overran(ref, kill.method, kill.timeout_s)
        elif kill.cause == "cancelled":
            self._sup.kill_cancelled(ref, kill.method)
        else:
            self._sup.lose(ref)

    def _control(self, msg: wire.HostMessage) -> None:
        self._to_pool([wire.CONTROL, wire.encoder.encode(msg)])

    def _to_pool(self, frames: list[bytes]) -> None:
        """Queue one message for the pool (the DEALER queues while disconnected). Like the
        pool's channel, look for input after a send: it can consume the FD's edge."""
        link = self._link
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                flags = _NOBLOCK if i == last else _SEND_MORE
                link.send(frame, flags, copy=len(frame) < m.ZERO_COPY_MIN_BYTES)
        except zmq.ZMQError as exc:
            log.warning("cannot send to pool %s: %s", self.address, exc)
        if link.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
            self._loop.call_soon(self._drain)

    # --- the workers' side -----------------------------------------------------------------

    def _from_worker(self, identity: bytes, payloads: list[bytes]) -> None:
        worker = self._sup.heard(identity)
        if worker is None:
            self._bad("unauthenticated")
            return
        if identity in self._announced:  # relayed untouched: the pool decodes them
            self._to_pool([identity, *payloads])
            self._sup.served(worker, 0)
            return
        for payload in payloads:  # a worker's first words: its hello, for us alone
            try:
                msg = m.parent_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                self._bad("decode")
                continue
            if isinstance(msg, m.Hello):
                self._sup.on_hello(worker, msg)

    def _send_worker(self, identity: bytes, payloads: list[bytes]) -> bool:
        return self._local.send(identity, payloads)

    def _bad(self, kind: str) -> None:
        log.debug("dropped a %s frame of a local worker", kind)

    # --- the Supervisor's events, told to the pool -------------------------------------------

    def worker_ready(self, worker: WorkerRef) -> None:
        self._announced[worker.identity] = worker
        self._control(wire.WorkerUp(worker.identity, worker.worker_id, worker.pid))

    def worker_leaving(self, worker: WorkerRef, doomed: bool) -> bool:
        if worker.identity in self._announced:
            self._control(wire.WorkerLeaving(worker.identity, doomed))
            return False  # the pool says when it owes nothing (Drained)
        return True

    def worker_died(self, death: Death) -> Settlement:
        self._local.poll()  # relay what it wrote before it died, ahead of the death
        if self._announced.pop(death.worker.identity, None) is not None:
            verdict = death.verdict
            down = wire.WorkerDown(
                death.worker.identity, verdict.cause.value, verdict.returncode, verdict.stack,
                death.running_call,
            )  # fmt: skip
            self._control(down)
        return Settlement()

    def circuit_changed(self, circuit: Circuit, retry_after_s: float) -> None:
        log.warning("workers for pool %s: circuit %s", self.address, circuit.value)

    def changed(self) -> None:
        self._changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return await wait_until(self._changed, predicate, timeout)

    @property
    def workers_ready(self) -> int:
        return len(self._announced)


class WorkerHost:
    """Every pool this host serves, one session at a time each, until SIGTERM."""

    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self._stop = asyncio.Event()
        self._sessions: dict[str, Session] = {}
        self._status_sent = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        methods = tuple(sorted(describe(load_service(self.cfg.pool.service))))
        serving = [
            asyncio.create_task(self._serve(address, methods), name=f"minions-host-{address}")
            for address in self.cfg.connect
        ]
        sdnotify.ready(self._status())
        try:
            await self._stop.wait()
        finally:
            sdnotify.stopping("stopping workers")
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
        log.info("worker host stopped")
        return 0

    async def _serve(self, address: str, methods: tuple[str, ...]) -> None:
        """Sessions with one pool, one after another."""
        pause = _REJOIN_MIN_S
        while True:
            session = Session(self.cfg, address, methods)
            self._sessions[address] = session
            try:
                session.open()
                await self._run_session(session)
            finally:
                await asyncio.shield(session.close())
            log.warning("session with pool %s ended: %s", address, session.end_reason)
            pause = min(_REJOIN_MAX_S, pause * 2) if session.refused else _REJOIN_MIN_S
            self._publish_status()
            await asyncio.sleep(pause)

    async def _run_session(self, session: Session) -> None:
        while not session.ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.ended.wait(), _TICK_S)
            session.tick(time.monotonic())
            self._publish_status()

    def _publish_status(self) -> None:
        """``STATUS=`` for systemctl status, sent when it changes (joined, workers up or down)."""
        text = self._status()
        if text != self._status_sent:
            self._status_sent = text
            sdnotify.status(text)

    def _status(self) -> str:
        parts = [
            f"pool {s.pool_name} at {a}: {s.workers_ready} workers"
            if s.pool_name and not s.ended.is_set()
            else f"{a}: connecting"
            for a, s in self._sessions.items()
        ]
        return "; ".join(parts) or "starting"
