"""The Hosts: owns a pool's worker hosts (other machines) and the workers they announce.

Design note. It is the Supervisor's counterpart for workers whose processes are not ours: a host
supervises them on its own machine and reports what its Supervisor decides (a worker is ready,
is leaving, died and why; :mod:`minions.remote.wire`); this owner turns those reports into the
very same events the Supervisor emits (``worker_ready``, ``worker_leaving``, one
:class:`~minions.pool.events.Death` per worker), so the Dispatcher serves, pipelines, times out,
recycles and settles remote workers exactly like local ones. It never sees a call.

What only it decides: who may join (the name is the CURVE key's, from the channel; a hello
for a session seen before is a replay and refused), and when a host is lost. A remote worker has
no pidfd, so a host that has said nothing for ``host_timeout_s``, or whose connection refuses a
send, is lost: each of its workers dies with ``DeathCause.HOST_LOST`` and the Dispatcher fails
or retries what they owed. Frames that arrive later from that session are dropped, never
answered twice, and the host is told to start a fresh session, which re-authenticates.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from minions.ipc import messages as m
from minions.ops import metrics
from minions.pool.config import PoolConfig
from minions.pool.events import Death, WorkerRef
from minions.pool.process import Phase
from minions.pool.states import HostSnapshot, WorkerSnapshot
from minions.pool.verdict import DeathCause, Verdict
from minions.remote import wire

log = logging.getLogger("minions.pool")

_SEEN_SESSIONS = 4096  # session ids remembered for replay checks (each is 16 random bytes)
_REFUSE_EVERY_S = 1.0  # how often a stale session is told to start afresh


class HostEvents(Protocol):
    """What the Hosts report: the Supervisor's worker events, from another machine."""

    def worker_ready(self, worker: WorkerRef) -> None: ...
    def worker_leaving(self, worker: WorkerRef, doomed: bool) -> bool: ...
    def worker_died(self, death: Death) -> object: ...
    def changed(self) -> None: ...


class HostLink(Protocol):
    """The pool's tcp channel, as the Hosts use it."""

    def send(self, identity: bytes, payloads: list[bytes]) -> bool: ...
    def peer_name(self, identity: bytes) -> str: ...
    def forget(self, identity: bytes) -> None: ...


@dataclass(eq=False)
class RemoteWorker:
    """A worker on a host. ``identity`` is the pool's name for it (session + ipc identity);
    ``local`` its identity on the host. It has no arena: payloads travel as frames."""

    worker_id: int
    pid: int
    identity: bytes
    local: bytes
    session: HostSession
    phase: Phase = Phase.READY
    calls_served: int = 0
    retire_asked: bool = False
    said_hello: bool = True  # the host admitted it; the pool never sees a remote worker's hello
    arena: None = None

    @property
    def ref(self) -> WorkerRef:
        return WorkerRef(self.worker_id, self.pid, self.identity, host=self.session.name)


@dataclass(eq=False)
class HostSession:
    """One connection of one host, from its hello until either side gives up."""

    rid: bytes
    name: str
    pid: int
    hostname: str
    joined_at: float
    last_heard: float
    next_beat: float = 0.0
    workers: dict[bytes, RemoteWorker] = field(default_factory=dict)


class Hosts:
    """Worker hosts of one pool: sessions, their workers, heartbeats, loss."""

    def __init__(
        self, config: PoolConfig, pool_name: str, events: HostEvents, ids: Iterator[int]
    ) -> None:
        self.cfg = config
        self.pool_name = pool_name
        self._events = events
        self._ids = ids
        self._link: HostLink | None = None
        self._service = config.service
        self._methods: tuple[str, ...] = ()
        self._sessions: dict[bytes, HostSession] = {}
        self._remote: dict[bytes, RemoteWorker] = {}  # by the pool's identity
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._refused_at: dict[bytes, float] = {}
        self.lost = 0  # sessions that ended in host_lost
        self._beat_every = config.host_timeout_s / 4
        self._beat = wire.encoder.encode(wire.Beat())

    def begin(self, link: HostLink, methods: tuple[str, ...]) -> None:
        self._link = link
        self._methods = tuple(sorted(methods))

    def owns(self, identity: bytes) -> bool:
        return identity in self._remote

    # --- frames from hosts -------------------------------------------------------------------

    def heard(self, rid: bytes, local: bytes) -> RemoteWorker | None:
        """A relayed worker frame arrived: the worker, if it belongs to a live session."""
        session = self._sessions.get(rid)
        if session is None:
            self._stale(rid)
            return None
        session.last_heard = time.monotonic()
        worker = session.workers.get(local)
        if worker is None:  # hosts relay only the workers they announced
            self._count("unexpected")
        return worker

    def on_control(self, rid: bytes, payload: bytes) -> None:
        """A control message of a host (see :mod:`minions.remote.wire`)."""
        try:
            msg = wire.host_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.warning("pool %s: undecodable host message: %s", self.pool_name, exc)
            self._count("decode")
            return
        session = self._sessions.get(rid)
        if isinstance(msg, wire.HostHello):
            self._on_hello(rid, msg)
            return
        if session is None:
            self._stale(rid)
            return
        session.last_heard = time.monotonic()
        match msg:
            case wire.WorkerUp():
                self._on_worker_up(session, msg)
            case wire.WorkerLeaving():
                self._on_worker_leaving(session, msg)
            case wire.WorkerDown():
                self._on_worker_down(session, msg)
            case wire.HostBye():
                self._end(session, f"it left: {msg.reason}", lost=False)
            case wire.Beat():
                pass

    def _on_hello(self, rid: bytes, hello: wire.HostHello) -> None:
        name = self._link.peer_name(rid) if self._link is not None else ""
        if rid in self._seen:
            log.warning(
                "pool %s: refused a replayed hello of host %r (session seen before)",
                self.pool_name, name,
            )  # fmt: skip
            self._count("replayed")
            self._send_control(rid, wire.Refused("replayed hello: this session was seen before"))
            return
        why = self._hello_mismatch(name, hello)
        self._remember(rid)
        if why:
            log.error("pool %s: refused host %r: %s", self.pool_name, name, why)
            self._count("protocol")
            self._send_control(rid, wire.Refused(why))
            return
        for old in [s for s in self._sessions.values() if s.name == name]:
            self.lose(old, "it started a new session (the host restarted)")
        now = time.monotonic()
        self._sessions[rid] = HostSession(rid, name, hello.pid, hello.hostname, now, now)
        self._send_control(rid, wire.Welcome(self.pool_name, self.cfg.host_timeout_s))
        log.info(
            "pool %s: worker host %r joined (pid %d on %s, %d workers)",
            self.pool_name, name, hello.pid, hello.hostname or "?", hello.workers,
        )  # fmt: skip
        metrics.HOST_UP.labels(self.pool_name, name).set(1)
        self._events.changed()

    def _hello_mismatch(self, name: str, hello: wire.HostHello) -> str:
        if not name:
            return "the connection has no authenticated host name"
        if hello.protocol != wire.HOST_PROTOCOL or hello.worker_protocol != m.PROTOCOL_VERSION:
            return (
                f"it speaks host protocol {hello.protocol} / worker protocol "
                f"{hello.worker_protocol}; expected {wire.HOST_PROTOCOL} / {m.PROTOCOL_VERSION}: "
                "run the same Minions version on the host and the pool"
            )
        if hello.service != self._service or tuple(sorted(hello.methods)) != self._methods:
            return (
                f"it serves {hello.service!r} with methods {sorted(hello.methods)}, but this "
                f"pool expects {self._service!r} with {list(self._methods)}: deploy the same "
                "service code on the host"
            )
        return ""

    def _on_worker_up(self, session: HostSession, up: wire.WorkerUp) -> None:
        if up.worker in session.workers:
            self._count("unexpected")
            return
        identity = session.rid + b"/" + up.worker
        worker = RemoteWorker(next(self._ids), up.pid, identity, up.worker, session)
        session.workers[up.worker] = worker
        self._remote[identity] = worker
        self._publish(session)
        self._events.worker_ready(worker.ref)

    def _on_worker_leaving(self, session: HostSession, leaving: wire.WorkerLeaving) -> None:
        worker = session.workers.get(leaving.worker)
        if worker is None or worker.phase is not Phase.READY:
            return
        worker.phase = Phase.KILLED if leaving.doomed else Phase.RETIRING
        owes_nothing = self._events.worker_leaving(worker.ref, leaving.doomed)
        if owes_nothing and not leaving.doomed:
            self._send_control(session.rid, wire.Drained(worker.local))
        self._publish(session)

    def _on_worker_down(self, session: HostSession, down: wire.WorkerDown) -> None:
        worker = session.workers.get(down.worker)
        if worker is None:
            return  # a spare, or one that never served: nothing owed
        try:
            cause = DeathCause(down.cause)
        except ValueError:
            self._count("protocol")
            cause = DeathCause.EXIT
        if cause is DeathCause.STOPPED:  # the host is stopping: for our calls, the host is gone
            verdict = Verdict(DeathCause.HOST_LOST, down.returncode, down.stack)
            self._bury(worker, verdict, down.running_call, crash=False)
            return
        self._bury(worker, Verdict(cause, down.returncode, down.stack), down.running_call)

    def _bury(
        self, worker: RemoteWorker, verdict: Verdict, running: int | None, crash: bool = True
    ) -> None:
        """One Death for a remote worker; the Dispatcher settles what it owed. ``crash``:
        count it as one, unless the verdict is planned (or its host stopped it)."""
        worker.phase = Phase.DEAD
        session = worker.session
        self._events.worker_died(Death(worker.ref, verdict, running))
        session.workers.pop(worker.local, None)
        self._remote.pop(worker.identity, None)
        if crash and not verdict.cause.planned:
            metrics.WORKER_CRASHES.labels(self.pool_name, verdict.label).inc()
            if verdict.cause is not DeathCause.HOST_LOST:
                log.warning(
                    "pool %s: worker %d (pid %d on host %r) died of %s",
                    self.pool_name, worker.worker_id, worker.pid, session.name,
                    verdict.describe(),
                )  # fmt: skip
        self._publish(session)
        self._events.changed()

    # --- what the pool asks of a host --------------------------------------------------------

    def served(self, worker: RemoteWorker, answers: int) -> None:
        """A remote worker answered: past ``max_calls_per_worker`` its host retires it."""
        worker.calls_served += answers
        limit = self.cfg.max_calls_per_worker
        if limit and worker.calls_served >= limit:
            self.retire(worker, "max_calls")

    def on_hello(self, worker: RemoteWorker, hello: m.Hello) -> None:
        """A worker hello relayed by a host: hosts admit their workers themselves."""
        self._count("unexpected")

    def retire(self, worker: RemoteWorker, reason: str) -> None:
        if worker.phase is Phase.READY and not worker.retire_asked:
            worker.retire_asked = True
            metrics.WORKER_RECYCLES.labels(self.pool_name, reason).inc()
            self._send_control(worker.session.rid, wire.Retire(worker.local, reason))

    def retire_by_id(self, worker_id: int, reason: str) -> bool:
        for worker in self._remote.values():
            if worker.worker_id == worker_id and worker.phase is Phase.READY:
                self.retire(worker, reason)
                return True
        return False

    def kill(self, ref: WorkerRef, cause: DeathCause, method: str, timeout_s: float) -> None:
        """A call overran (``TIMEOUT``) or was cancelled with ``cancel="kill"``: the host dumps
        the worker's stack and kills it, then reports its death as usual."""
        worker = self._remote.get(ref.identity)
        if worker is None or worker.phase in (Phase.KILLED, Phase.DEAD):
            return
        log.warning(
            "pool %s: asking host %r to kill worker %d (%s of %s())",
            self.pool_name, worker.session.name, worker.worker_id, cause.value, method,
        )  # fmt: skip
        if cause is DeathCause.CANCELLED:
            metrics.WORKER_RECYCLES.labels(self.pool_name, cause.value).inc()
        kill = wire.Kill(worker.local, cause.value, method, timeout_s)
        self._send_control(worker.session.rid, kill)

    def drained(self, ref: WorkerRef) -> None:
        worker = self._remote.get(ref.identity)
        if worker is not None and worker.phase is Phase.RETIRING:
            self._send_control(worker.session.rid, wire.Drained(worker.local))

    def lose_worker(self, ref: WorkerRef) -> None:
        """Sending to the worker failed: its host's connection is gone."""
        worker = self._remote.get(ref.identity)
        if worker is not None:
            self.lose(worker.session, "its connection closed")

    def send(self, identity: bytes, payloads: list[bytes]) -> bool:
        """Relay frames to a remote worker through its host's connection."""
        worker = self._remote[identity]
        assert self._link is not None
        return self._link.send(worker.session.rid, [worker.local, *payloads])

    # --- liveness ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Beat to every host; lose those silent for ``host_timeout_s``."""
        for session in list(self._sessions.values()):
            silent = now - session.last_heard
            if silent > self.cfg.host_timeout_s:
                self.lose(session, f"nothing heard for {silent:.1f}s (host_timeout_s)")
            elif now >= session.next_beat:
                session.next_beat = now + self._beat_every
                if not self._send_raw(session.rid, self._beat):
                    self.lose(session, "its connection closed")
        for rid, at in list(self._refused_at.items()):
            if now - at > 60:
                del self._refused_at[rid]

    def probe(self) -> None:
        """Some host's connection closed (the channel cannot say whose): beat to every host now,
        and the one whose connection is gone refuses the send. A killed host is lost at once
        instead of after ``host_timeout_s``."""
        for session in list(self._sessions.values()):
            if not self._send_raw(session.rid, self._beat):
                self.lose(session, "its connection closed")

    def lose(self, session: HostSession, why: str) -> None:
        """The host is gone: every worker of it dies with ``HOST_LOST``."""
        self._end(session, why, lost=True)

    def _end(self, session: HostSession, why: str, lost: bool) -> None:
        if self._sessions.pop(session.rid, None) is None:
            return
        owed = len(session.workers)
        if lost:
            self.lost += 1
            metrics.HOSTS_LOST.labels(self.pool_name, session.name).inc()
            log.warning(
                "pool %s: lost worker host %r (pid %d on %s): %s; its %d workers end, and what "
                "they owed fails with WorkerCrashed (host_lost) or is retried under "
                "retries_on_crash",
                self.pool_name, session.name, session.pid, session.hostname or "?", why, owed,
            )  # fmt: skip
        else:
            log.info("pool %s: worker host %r left (%s)", self.pool_name, session.name, why)
        metrics.HOST_UP.labels(self.pool_name, session.name).set(0)
        for worker in list(session.workers.values()):
            self._bury(worker, Verdict(DeathCause.HOST_LOST, 0), None)
        if self._link is not None:
            self._link.forget(session.rid)
        self._refused_at[session.rid] = 0.0  # its next frame is told to start afresh

    def _stale(self, rid: bytes) -> None:
        """A frame of no live session (lost, refused, or never said hello): dropped; the
        host is told, at most once a second, to start a fresh session."""
        self._count("stale")
        now = time.monotonic()
        if now - self._refused_at.get(rid, -_REFUSE_EVERY_S) >= _REFUSE_EVERY_S:
            self._refused_at[rid] = now
            refusal = wire.Refused("this session ended; start a new one", rejoin=True)
            self._send_control(rid, refusal)

    def close(self) -> None:
        """Pool shutdown: the hosts' workers end with the pool (nothing owed is left)."""
        for session in list(self._sessions.values()):
            self._send_control(session.rid, wire.Refused("the pool shut down", rejoin=True))
            for worker in list(session.workers.values()):
                self._bury(worker, Verdict(DeathCause.STOPPED, 0), None, crash=False)
            metrics.HOST_UP.labels(self.pool_name, session.name).set(0)
        self._sessions.clear()

    # --- observation ---------------------------------------------------------------------------

    def count_ready(self) -> int:
        return sum(1 for w in self._remote.values() if w.phase is Phase.READY)

    def rows(
        self, calls: Callable[[bytes, int | None], tuple[int, str]]
    ) -> tuple[WorkerSnapshot, ...]:
        rows = []
        for w in self._remote.values():
            owed, _ = calls(w.identity, None)
            row = WorkerSnapshot(
                worker_id=w.worker_id, pid=w.pid, role="active", phase=w.phase.value,
                rss_bytes=0, calls_served=w.calls_served, in_flight=owed, host=w.session.name,
            )  # fmt: skip
            rows.append(row)
        return tuple(rows)

    def snapshots(self) -> tuple[HostSnapshot, ...]:
        now = time.monotonic()
        snaps = []
        for s in self._sessions.values():
            ready = sum(1 for w in s.workers.values() if w.phase is Phase.READY)
            snap = HostSnapshot(
                name=s.name, pid=s.pid, hostname=s.hostname, workers=ready,
                silent_s=now - s.last_heard, connected_s=now - s.joined_at,
            )  # fmt: skip
            snaps.append(snap)
        return tuple(snaps)

    # --- helpers -------------------------------------------------------------------------------

    def _publish(self, session: HostSession) -> None:
        ready = sum(1 for w in session.workers.values() if w.phase is Phase.READY)
        metrics.HOST_WORKERS.labels(self.pool_name, session.name).set(ready)

    def _remember(self, rid: bytes) -> None:
        self._seen[rid] = None
        while len(self._seen) > _SEEN_SESSIONS:
            self._seen.popitem(last=False)

    def _send_control(self, rid: bytes, msg: wire.PoolMessage) -> bool:
        return self._send_raw(rid, wire.encoder.encode(msg))

    def _send_raw(self, rid: bytes, payload: bytes) -> bool:
        return self._link is not None and self._link.send(rid, [wire.CONTROL, payload])

    def _count(self, kind: str) -> None:
        metrics.PROTOCOL_ERRORS.labels(self.pool_name, kind).inc()
