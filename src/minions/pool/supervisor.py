"""The Supervisor: owns the worker processes of one pool.

Design note. It keeps the process table and decides everything about processes: spawning (active
workers and booted spares), boot and hello, death detection, restart intensity, backoff, the
circuit breaker, recycling, and stopping with escalation. It never sees a call. Death is
event-driven: a worker's pidfd becomes readable the moment it exits and :meth:`on_exit` reaps it,
reads its call marker, judges it once (:func:`~minions.pool.verdict.classify`) and emits one
:class:`~minions.pool.events.Death`; the Dispatcher settles the calls. Everything slow happens on
the pool's tick (:meth:`tick`, every 50 ms): boot deadlines, the circuit's retry time, RSS checks,
and spawning what is missing. Unplanned deaths count toward the OTP-style restart intensity; past
it the circuit opens and re-closes once a fresh worker boots after the reset delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import psutil

from minions.errors import PoolUnavailable
from minions.ipc import messages as m
from minions.ipc.arena import ParentArena, arena_size
from minions.ipc.endpoint import Endpoint
from minions.ops import metrics
from minions.ops.levels import MemoryLevel
from minions.pool.circuit import CircuitBreaker
from minions.pool.config import PoolConfig
from minions.pool.events import Death, Settlement, WorkerRef
from minions.pool.intensity import Backoff, RestartDecision, RestartIntensity
from minions.pool.process import Phase, Role, WorkerProcess
from minions.pool.spawn import Spawned, Spawner, WorkerSpec
from minions.pool.states import Circuit, WorkerSnapshot
from minions.pool.verdict import DeathCause, Verdict, classify

log = logging.getLogger("minions.pool")

_DUMP_WAIT_S = 1.0  # the longest a hung worker's SIGKILL waits for faulthandler's stack
_DUMP_POLL_S = 0.01
_STOP_ESCALATION_S = 2.0  # polite shutdown -> SIGTERM -> SIGKILL steps


class WorkerEvents(Protocol):
    """What the Supervisor reports; the pool front forwards worker changes to the Dispatcher."""

    def worker_ready(self, worker: WorkerRef) -> None: ...
    def worker_leaving(self, worker: WorkerRef, doomed: bool) -> bool: ...
    def worker_died(self, death: Death) -> Settlement: ...
    def circuit_changed(self, circuit: Circuit, retry_after_s: float) -> None: ...
    def changed(self) -> None: ...


Send = Callable[[bytes, list[bytes]], bool]
WaitUntil = Callable[[Callable[[], bool], float], Awaitable[bool]]


class Supervisor:
    """Process table, spawning, deaths, intensity, backoff, circuit and recycling of one pool."""

    def __init__(
        self,
        config: PoolConfig,
        pool_name: str,
        events: WorkerEvents,
        send: Send,
        worker_ids: Iterator[int] | None = None,
    ) -> None:
        self.cfg = config
        self.pool_name = pool_name
        self._events = events
        self._send = send
        self._workers: dict[bytes, WorkerProcess] = {}
        self._spawning: dict[int, Role] = {}  # asked for, not yet a process (zygote replies)
        self._arenas: dict[int, ParentArena] = {}  # the arenas of those, until they exist
        self.spawner = Spawner(config, pool_name, self)
        self._worker_ids = worker_ids if worker_ids is not None else itertools.count(1)
        self._intensity = RestartIntensity(config.restart_intensity, config.restart_period_s)
        self._backoff = Backoff(config.restart_backoff_initial_s, config.restart_backoff_max_s)
        self.breaker = CircuitBreaker(config.circuit_reset_s, config.circuit_reset_max_s)
        self.restarts = 0  # unplanned deaths, since the pool started
        self.measures_rss = True  # False while a memory monitor measures the workers for us
        self._endpoint: Endpoint | None = None
        self._methods: tuple[str, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervising = False
        self._next_spawn_at = 0.0
        self._next_rss_check = 0.0
        self._boot_error: str | None = None
        self._booted: asyncio.Future[None] | None = None
        self._stop_timers: dict[int, asyncio.TimerHandle] = {}
        self._arena_size = arena_size(config.arena_mb)

    # --- the loop ----------------------------------------------------------------------------

    def begin(self, endpoint: Endpoint, methods: Iterable[str]) -> None:
        """Start supervising: spawn the first workers (the hello must list ``methods``)."""
        self._endpoint = endpoint
        self._methods = tuple(sorted(methods))
        self._loop = asyncio.get_running_loop()
        self._supervising = True
        self.spawner.start()
        self.spawn_missing()

    def tick(self, now: float) -> None:
        """Slow housekeeping, on the pool's tick; deaths are handled the moment they happen."""
        self.enforce_boot_deadlines(now)
        self.retry_circuit(now)
        self.recycle_bloated(now)
        self.spawner.tick(now)
        self.spawn_missing()

    # --- spawning ----------------------------------------------------------------------------

    def spawn_missing(self) -> None:
        """Keep ``workers`` active and ``spare_workers`` spare processes booting or ready."""
        if not self._supervising or self.breaker.state is Circuit.OPEN:
            return
        if time.monotonic() < self._next_spawn_at:
            return
        live = [w for w in self._workers.values() if w.phase in (Phase.BOOTING, Phase.READY)]
        roles = [w.role for w in live] + list(self._spawning.values())
        active = roles.count(Role.ACTIVE)
        for _ in range(self.cfg.workers - active):
            self._spawn(Role.ACTIVE)
        for _ in range(self.cfg.spare_workers - (len(roles) - active)):
            self._spawn(Role.SPARE)

    def _spawn(self, role: Role) -> None:
        assert self._endpoint is not None
        worker_id = next(self._worker_ids)
        arena = None
        if self._arena_size:  # the worker's shared memory lives exactly as long as it does
            try:
                name, least = f"{self.pool_name}:w{worker_id}", self.cfg.arena_min_bytes
                arena = ParentArena.create(self._arena_size, name, least)
            except OSError as exc:
                log.error("pool %s: cannot make a worker's arena: %s", self.pool_name, exc)
                self._next_spawn_at = time.monotonic() + self._backoff.next_delay()
                return
        self._spawning[worker_id] = role
        spec = WorkerSpec.for_pool(self._endpoint, self.cfg, worker_id)
        if arena is not None:  # its fd stays open until the worker holds its own copy
            self._arenas[worker_id] = arena
            args = dataclasses.replace(spec.args, arena_slot=0)
            spec = dataclasses.replace(spec, args=args, pass_fds=(arena.fd,))
        self.spawner.spawn(spec)

    def spawned(self, worker: Spawned) -> None:
        """The Spawner made the process: it joins the table; its pidfd goes on the loop."""
        assert self._loop is not None
        spec = worker.spec
        role = self._spawning.pop(spec.worker_id)
        arena = self._arenas.pop(spec.worker_id, None)
        if arena is not None:
            arena.close_fd()  # the worker has its own descriptor; ours stays mapped
        process = WorkerProcess(
            spec.worker_id, spec.args.identity.encode(), worker.pid, worker.pidfd,
            Path(spec.args.crash_file), role, worker.via, worker.popen, arena=arena,
        )  # fmt: skip
        self._workers[process.identity] = process
        self._loop.add_reader(process.pidfd, self.on_exit, process)
        log.info(
            "pool %s: spawned worker %d (pid %d) as %s via %s",
            self.pool_name, process.worker_id, process.pid, role.value, worker.via.value,
        )  # fmt: skip
        if not self._supervising:  # answered after the pool began to stop
            self._kill(process, DeathCause.STOPPED)

    def spawn_failed(self, spec: WorkerSpec, why: str) -> None:
        self._spawning.pop(spec.worker_id, None)
        arena = self._arenas.pop(spec.worker_id, None)
        if arena is not None:
            arena.close()
        if self._supervising:
            log.error("pool %s: cannot spawn a worker: %s", self.pool_name, why)
            self._next_spawn_at = time.monotonic() + self._backoff.next_delay()

    async def wait_booted(self) -> None:
        """Wait until every initial active worker said hello; raise if one failed to boot."""
        assert self._loop is not None
        self._booted = self._loop.create_future()
        self._check_booted()
        await self._booted

    def _check_booted(self) -> None:
        if self._booted is None or self._booted.done():
            return
        if self._boot_error is not None:
            self._booted.set_exception(
                PoolUnavailable(
                    self.pool_name,
                    f"a worker failed to boot service {self.cfg.service!r}:\n{self._boot_error}",
                )
            )
        elif self.count_dispatchable() >= self.cfg.workers:
            self._booted.set_result(None)

    # --- what workers say ----------------------------------------------------------------------

    def heard(self, identity: bytes) -> WorkerProcess | None:
        """A frame arrived from ``identity``: the worker, if it is one of ours."""
        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_heard = time.monotonic()
        return worker

    def on_hello(self, worker: WorkerProcess, hello: m.Hello) -> None:
        """Admit a worker that booted: right token, protocol, pid, service and methods."""
        expected = self._endpoint.token if self._endpoint is not None else ""
        if worker.said_hello or not secrets.compare_digest(hello.token, expected):
            metrics.PROTOCOL_ERRORS.labels(self.pool_name, "unauthenticated").inc()
            return
        mismatch = self._hello_mismatch(worker, hello)
        if mismatch:
            log.error("pool %s: worker %d refused: %s", self.pool_name, worker.worker_id, mismatch)
            metrics.PROTOCOL_ERRORS.labels(self.pool_name, "protocol").inc()
            self._boot_error = mismatch
            self._kill(worker, DeathCause.BOOT_FAILED)
            return
        worker.said_hello = True
        if worker.phase is Phase.BOOTING:
            worker.phase = Phase.READY
            if worker.role is Role.SPARE:
                self._swap_for_booting(worker)
            if worker.role is Role.ACTIVE:
                self._events.worker_ready(worker.ref)
        if self.breaker.succeeded():
            self._intensity.reset()
            log.warning("pool %s: recovered, circuit closed", self.pool_name)
            self._events.circuit_changed(Circuit.CLOSED, 0.0)
        self._check_booted()

    def _hello_mismatch(self, worker: WorkerProcess, hello: m.Hello) -> str:
        if hello.protocol != m.PROTOCOL_VERSION or hello.pid != worker.pid:
            return (
                f"it speaks protocol {hello.protocol} as pid {hello.pid}; expected protocol "
                f"{m.PROTOCOL_VERSION} from pid {worker.pid}"
            )
        if hello.service != self.cfg.service or tuple(sorted(hello.methods)) != self._methods:
            return (
                f"it serves {hello.service!r} with methods {sorted(hello.methods)}, but this pool "
                f"expects {self.cfg.service!r} with {list(self._methods)}: is it a worker from an "
                "older deploy? Restart the service so parent and workers run the same code"
            )
        return ""

    def served(self, worker: WorkerProcess, answers: int) -> None:
        """A worker answered ``answers`` calls: retire it if it served its quota."""
        worker.calls_served += answers
        self._backoff.succeeded()
        limit = self.cfg.max_calls_per_worker
        if limit and worker.phase is Phase.READY and worker.calls_served >= limit:
            self.retire(worker, "max_calls")

    # --- what the Dispatcher reports -----------------------------------------------------------

    def kill_overran(self, ref: WorkerRef, method: str, timeout_s: float) -> None:
        """A call overran its timeout: dump the worker's stack, then SIGKILL it."""
        worker = self._workers.get(ref.identity)
        if worker is None or worker.phase in (Phase.KILLED, Phase.DEAD):
            return
        log.warning(
            "pool %s: worker %d (pid %d) exceeded %gs on %s(); killing it",
            self.pool_name, worker.worker_id, worker.pid, timeout_s, method,
        )  # fmt: skip
        dumped_from = _size(worker.crash_file)
        worker.send_signal(signal.SIGUSR1)  # faulthandler dumps where it is stuck
        self._kill(worker, DeathCause.TIMEOUT, delay=_DUMP_WAIT_S)
        self._kill_once_dumped(worker, dumped_from, -1, time.monotonic() + _DUMP_WAIT_S)

    def _kill_once_dumped(self, worker: WorkerProcess, before: int, last: int, by: float) -> None:
        """SIGKILL as soon as faulthandler's dump has landed (the crash file grew, then held
        still for a poll), rather than after a fixed pause a loaded machine may not honour;
        ``_kill``'s timer still fires at ``by`` if it never does."""
        if worker.phase is Phase.DEAD or self._loop is None:
            return
        size = _size(worker.crash_file)
        if size > before and size == last:
            timer = self._stop_timers.pop(worker.worker_id, None)
            if timer is not None:
                timer.cancel()
            worker.send_signal(signal.SIGKILL)
        elif time.monotonic() < by:
            self._loop.call_later(_DUMP_POLL_S, self._kill_once_dumped, worker, before, size, by)

    def kill_cancelled(self, ref: WorkerRef, method: str) -> None:
        """The caller of a ``cancel="kill"`` call gave up while it ran: kill its worker. The
        pool's own doing (``DeathCause.CANCELLED``, planned): replaced at once, counted as a
        recycle, never toward restart intensity."""
        worker = self._workers.get(ref.identity)
        if worker is None or worker.phase in (Phase.KILLED, Phase.DEAD):
            return
        log.info(
            "pool %s: killing worker %d (pid %d): the caller of %s() cancelled it (cancel='kill')",
            self.pool_name, worker.worker_id, worker.pid, method,
        )  # fmt: skip
        metrics.WORKER_RECYCLES.labels(self.pool_name, DeathCause.CANCELLED.value).inc()
        self._kill(worker, DeathCause.CANCELLED)

    def lose(self, ref: WorkerRef) -> None:
        """The worker's socket is gone while its process lingers: kill it, its calls follow."""
        worker = self._workers.get(ref.identity)
        if worker is not None:
            self._kill(worker, DeathCause.LOST)

    def drained(self, ref: WorkerRef) -> None:
        """A retiring worker owes nothing any more: stop it."""
        worker = self._workers.get(ref.identity)
        if worker is not None and worker.phase is Phase.RETIRING:
            self._stop(worker, DeathCause.RECYCLED)

    # --- recycling -----------------------------------------------------------------------------

    def retire(self, worker: WorkerProcess, reason: str) -> None:
        """Stop dispatching to a worker, replace it now, stop it once it owes nothing."""
        if worker.phase is not Phase.READY:
            return
        worker.phase = Phase.RETIRING
        metrics.WORKER_RECYCLES.labels(self.pool_name, reason).inc()
        log.info(
            "pool %s: recycling worker %d (pid %d, %d calls, %.0f MiB): %s",
            self.pool_name, worker.worker_id, worker.pid, worker.calls_served,
            worker.rss_bytes / 2**20, reason,
        )  # fmt: skip
        owes_nothing = self._events.worker_leaving(worker.ref, doomed=False)
        self._promote_spare(worker)
        self.spawn_missing()
        if owes_nothing:
            self._stop(worker, DeathCause.RECYCLED)

    def retire_by_id(self, worker_id: int, reason: str) -> bool:
        """Retire the worker with this id if it is still serving; ``False`` if it is gone."""
        for worker in self._workers.values():
            if worker.worker_id == worker_id and worker.phase is Phase.READY:
                self.retire(worker, reason)
                return True
        return False

    def recycle_bloated(self, now: float, force: bool = False) -> None:
        """Retire workers above ``max_rss_mb``. Without a memory monitor the pool measures them
        itself (psutil, every ``rss_check_s``); with one, :meth:`measured` does this check."""
        if not self.measures_rss or (not force and now < self._next_rss_check):
            return
        self._next_rss_check = now + self.cfg.rss_check_s
        rss: dict[int, int] = {}
        for worker in self._workers.values():
            if worker.phase is Phase.READY:
                try:
                    rss[worker.pid] = psutil.Process(worker.pid).memory_info().rss
                except psutil.Error:
                    continue
        self.measured(rss)

    def measured(self, rss: Mapping[int, int]) -> None:
        """Workers' RSS by pid, measured once (by the memory monitor's sample, or by
        :meth:`recycle_bloated`): note it, and retire those above ``max_rss_mb``."""
        limit = self.cfg.max_rss_mb * 2**20
        for worker in list(self._workers.values()):
            if worker.pid not in rss:
                continue
            worker.rss_bytes = rss[worker.pid]
            if limit and worker.phase is Phase.READY and worker.rss_bytes > limit:
                self.retire(worker, "rss")

    def relieve_memory(self, level: MemoryLevel) -> None:
        """Memory pressure rose: recycle workers over their own limit (as of the sample that
        raised the level), and at CRITICAL the largest."""
        self.recycle_bloated(time.monotonic(), force=True)
        if level is MemoryLevel.CRITICAL:
            ready = [w for w in self._workers.values() if w.phase is Phase.READY]
            if ready:
                self.retire(max(ready, key=lambda w: w.rss_bytes), "memory")

    def enforce_boot_deadlines(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if worker.phase is Phase.BOOTING and now - worker.spawned_at > self.cfg.boot_timeout_s:
                log.error(
                    "pool %s: worker %d (pid %d) did not boot within %gs; killing it",
                    self.pool_name, worker.worker_id, worker.pid, self.cfg.boot_timeout_s,
                )  # fmt: skip
                self._kill(worker, DeathCause.BOOT_FAILED)

    # --- deaths --------------------------------------------------------------------------------

    def on_exit(self, worker: WorkerProcess) -> None:
        """The worker's pidfd fired: reap it, judge once, emit its Death, replace it."""
        assert self._loop is not None
        self._loop.remove_reader(worker.pidfd)
        timer = self._stop_timers.pop(worker.worker_id, None)
        if timer is not None:
            timer.cancel()
        returncode = worker.reap()
        running = worker.read_running_call()
        verdict = classify(
            returncode,
            killed_for=worker.killed_for,
            said_hello=worker.said_hello,
            stack=worker.read_stack(),
        )
        settled = self._events.worker_died(Death(worker.ref, verdict, running))
        worker.drop_arena()
        del self._workers[worker.identity]
        self._report(worker, verdict, settled)
        if not verdict.cause.planned:
            self._count_restart(time.monotonic())
        self._promote_spare(worker)
        self.spawn_missing()
        self._check_booted()
        self._events.changed()

    def _report(self, worker: WorkerProcess, verdict: Verdict, settled: Settlement) -> None:
        """The one log line (and metric) of a death, from its one verdict."""
        requeued = (
            f"; {settled.requeued} calls it owed go back to the queue (not started, or their "
            "replies died with it)"
            if settled.requeued
            else ""
        )
        if verdict.cause.planned:
            log.info(
                "pool %s: worker %d (pid %d) stopped (%s)%s",
                self.pool_name, worker.worker_id, worker.pid, verdict.cause.value, requeued,
            )  # fmt: skip
            return
        metrics.WORKER_CRASHES.labels(self.pool_name, verdict.label).inc()
        log.warning(
            "pool %s: worker %d (pid %d) died of %s while running %s%s",
            self.pool_name, worker.worker_id, worker.pid, verdict.describe(),
            f"{settled.method}()" if settled.method else "no call", requeued,
        )  # fmt: skip
        if verdict.cause is DeathCause.BOOT_FAILED and self._boot_error is None:
            self._boot_error = verdict.stack or verdict.describe()

    def _count_restart(self, now: float) -> None:
        metrics.WORKER_RESTARTS.labels(self.pool_name).inc()
        self.restarts += 1
        self._next_spawn_at = now + self._backoff.next_delay()
        give_up = self._intensity.record(now) is RestartDecision.GIVE_UP
        state = self.breaker.state
        if state is Circuit.HALF_OPEN or (give_up and state is Circuit.CLOSED):
            self.breaker.trip(now)
            log.error(
                "pool %s: more than %d worker restarts in %gs: circuit open, calls fail with "
                "PoolUnavailable; trying again in %gs",
                self.pool_name, self.cfg.restart_intensity, self.cfg.restart_period_s,
                self.breaker.reset_s,
            )  # fmt: skip
            self._events.circuit_changed(Circuit.OPEN, self.breaker.reset_s)

    def retry_circuit(self, now: float) -> None:
        if self.breaker.poll(now):
            self._next_spawn_at = 0.0
            log.warning("pool %s: circuit half-open, starting fresh workers", self.pool_name)
            self._events.circuit_changed(Circuit.HALF_OPEN, 0.0)

    def _swap_for_booting(self, spare: WorkerProcess) -> None:
        """A spare booted while an active slot still waits for its replacement (booting, or
        not even forked yet): the spare serves now and the replacement becomes the spare."""
        waiting = (w for w in self._workers.values() if w.role is Role.ACTIVE)
        booting = next((w for w in waiting if w.phase is Phase.BOOTING), None)
        asked = next((i for i, role in self._spawning.items() if role is Role.ACTIVE), None)
        if booting is not None:
            booting.role, spare.role = Role.SPARE, Role.ACTIVE
        elif asked is not None:
            self._spawning[asked], spare.role = Role.SPARE, Role.ACTIVE

    def _promote_spare(self, gone: WorkerProcess) -> None:
        """``gone`` stops taking calls: hand its active slot to a ready spare, if any."""
        if gone.role is not Role.ACTIVE:
            return
        gone.role = Role.SPARE  # it no longer holds an active slot
        for worker in self._workers.values():
            if worker.role is Role.SPARE and worker.phase is Phase.READY:
                worker.role = Role.ACTIVE
                self._events.worker_ready(worker.ref)
                return

    # --- stopping ------------------------------------------------------------------------------

    def _kill(self, worker: WorkerProcess, cause: DeathCause, delay: float = 0.0) -> None:
        if worker.phase in (Phase.KILLED, Phase.DEAD):
            return
        if worker.dispatchable or worker.phase is Phase.RETIRING:
            self._events.worker_leaving(worker.ref, doomed=True)
        worker.killed_for = cause
        worker.phase = Phase.KILLED
        self._promote_spare(worker)
        if delay and self._loop is not None:
            self._stop_timers[worker.worker_id] = self._loop.call_later(
                delay, worker.send_signal, signal.SIGKILL
            )
        else:
            worker.send_signal(signal.SIGKILL)
        self.spawn_missing()

    def _stop(self, worker: WorkerProcess, cause: DeathCause, step_s: float = 0.0) -> None:
        """Ask politely; escalate to SIGTERM then SIGKILL on monotonic deadlines."""
        worker.killed_for = cause
        if worker.said_hello:
            self._send(worker.identity, [m.encoder.encode(m.Shutdown(cause.value))])
        else:
            worker.send_signal(signal.SIGTERM)
        self._escalate(worker, signal.SIGTERM, step_s or _STOP_ESCALATION_S)

    def _escalate(self, worker: WorkerProcess, signum: int, step_s: float) -> None:
        def fire() -> None:
            if worker.phase is Phase.DEAD:
                return
            worker.send_signal(signum)
            if signum != signal.SIGKILL:
                self._escalate(worker, signal.SIGKILL, step_s)

        assert self._loop is not None
        self._stop_timers[worker.worker_id] = self._loop.call_later(step_s, fire)

    async def stop_all(self, deadline: float, wait_until: WaitUntil) -> None:
        """Stop every worker (pool shutdown) by ``deadline`` and wait until all are reaped:
        polite, then SIGTERM, then SIGKILL, each step a third of the time that is left."""
        self._supervising = False
        step = min(_STOP_ESCALATION_S, max(0.05, (deadline - time.monotonic()) / 3))
        for worker in list(self._workers.values()):
            if worker.phase in (Phase.READY, Phase.RETIRING, Phase.BOOTING):
                if worker.dispatchable or worker.phase is Phase.RETIRING:
                    self._events.worker_leaving(worker.ref, doomed=True)
                worker.phase = Phase.RETIRING
                self._stop(worker, DeathCause.STOPPED, step)
        ok = await wait_until(lambda: not self._workers and not self._spawning, 3 * step + 1.0)
        await self.spawner.close(step)  # after: workers it forked meanwhile were answered
        ok = await wait_until(lambda: not self._workers, step + 1.0) and ok
        if not ok:  # cannot happen unless the kernel refuses SIGKILL; never leave a zombie
            for worker in list(self._workers.values()):
                worker.send_signal(signal.SIGKILL)
                self.on_exit(worker)

    # --- observation ---------------------------------------------------------------------------

    def count_dispatchable(self) -> int:
        return sum(1 for w in self._workers.values() if w.dispatchable)

    def count(self, phase: Phase, dispatchable: bool | None = None) -> int:
        return sum(
            1
            for w in self._workers.values()
            if w.phase is phase and (dispatchable is None or w.dispatchable == dispatchable)
        )

    def count_booting(self) -> int:
        """Workers on their way: spawned with no hello yet, or asked of the zygote."""
        return self.count(Phase.BOOTING) + len(self._spawning)

    def pids(self) -> list[int]:
        """Pids of every live worker process (for the memory monitor)."""
        return [w.pid for w in self._workers.values() if w.phase is not Phase.DEAD]

    def rss_bytes(self) -> int:
        return sum(w.rss_bytes for w in self._workers.values())

    def rows(
        self, calls: Callable[[bytes, int | None], tuple[int, str]]
    ) -> tuple[WorkerSnapshot, ...]:
        """One row per live worker; ``calls(identity, running_call_id)`` is the Dispatcher's
        (calls owed, method running)."""
        rows = []
        for w in self._workers.values():
            if w.phase is Phase.DEAD:
                continue
            owed, running = calls(w.identity, w.running_call() if w.said_hello else None)
            rows.append(
                WorkerSnapshot(
                    worker_id=w.worker_id,
                    pid=w.pid,
                    role=w.role.value,
                    phase=w.phase.value,
                    rss_bytes=w.rss_bytes,
                    calls_served=w.calls_served,
                    in_flight=owed,
                    running=running,
                )
            )
        return tuple(rows)

    @property
    def empty(self) -> bool:
        return not self._workers


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
