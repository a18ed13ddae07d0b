"""The supervising half of a ``WorkerPool``: spawn, watch, judge each death, restart, recycle.

Design note. The slow loop (:meth:`Supervisor.run`) is a table of contents; everything urgent
is event-driven instead: a worker's pidfd fires :meth:`on_exit` the moment it dies, a per-call
timer fires :meth:`_on_deadline`. Every death gets one :class:`~minions.pool.verdict.Verdict`
that feeds the log line, the metric, the caller's error and the restart decision. Unplanned
deaths count toward the OTP-style restart intensity; past it the circuit opens (queued and new
calls get ``PoolUnavailable``) and re-closes once a fresh worker boots after the reset delay.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from typing import TYPE_CHECKING

import psutil

from minions.errors import CallTimeout, PoisonCall, PoolUnavailable, WorkerCrashed
from minions.ipc import messages as m
from minions.ops import metrics
from minions.ops.levels import MemoryLevel
from minions.pool.intensity import RestartDecision
from minions.pool.process import Phase, Role, WorkerProcess
from minions.pool.states import Circuit, PoolState
from minions.pool.verdict import DeathCause, Verdict, classify

if TYPE_CHECKING:
    from minions.pool.calls import PendingCall
    from minions.pool.pool import WorkerPool

log = logging.getLogger("minions.pool")

_TICK_S = 0.05
_DUMP_BEFORE_KILL_S = 0.2  # time faulthandler gets to write a hung worker's stack
_STOP_ESCALATION_S = 2.0  # polite shutdown -> SIGTERM -> SIGKILL steps


class Supervisor:
    """Owns the worker processes of one pool. Runs on the pool's event loop only."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.cfg = pool.config
        self._next_spawn_at = 0.0
        self._circuit_retry_at = 0.0
        self._circuit_reset_s = self.cfg.circuit_reset_s
        self._next_rss_check = 0.0
        self._boot_error: str | None = None
        self._booted: asyncio.Future[None] | None = None
        self._stop_timers: dict[int, asyncio.TimerHandle] = {}
        self.restarts = 0

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Slow housekeeping; deaths and deadlines are handled the moment they happen."""
        while True:
            await asyncio.sleep(_TICK_S)
            self.enforce_deadlines()
            self.enforce_boot_deadlines()
            self.retry_circuit()
            self.recycle_bloated()
            self.spawn_missing()
            self.pool._publish_gauges()

    # --- spawning ----------------------------------------------------------------------------

    def spawn_missing(self) -> None:
        """Keep ``workers`` active and ``spare_workers`` spare processes booting or ready."""
        pool = self.pool
        if pool._state not in (PoolState.STARTING, PoolState.RUNNING):
            return
        if pool._circuit is Circuit.OPEN or time.monotonic() < self._next_spawn_at:
            return
        live = [w for w in pool._workers.values() if w.phase in (Phase.BOOTING, Phase.READY)]
        active = sum(1 for w in live if w.role is Role.ACTIVE)
        spares = len(live) - active
        for _ in range(self.cfg.workers - active):
            self._spawn(Role.ACTIVE)
        for _ in range(self.cfg.spare_workers - spares):
            self._spawn(Role.SPARE)

    def _spawn(self, role: Role) -> None:
        pool = self.pool
        assert pool._endpoint is not None and pool._loop is not None
        worker_id = next(pool._worker_ids)
        try:
            worker = WorkerProcess.spawn(
                worker_id=worker_id,
                identity=f"w{worker_id}-{secrets.token_hex(4)}".encode(),  # unguessable
                role=role,
                service=self.cfg.service,
                endpoint=pool._endpoint.address,
                token=pool._endpoint.token,
                crash_file=pool._endpoint.crash_file(worker_id, 0),
                heartbeat_s=self.cfg.heartbeat_s,
            )
        except OSError as exc:
            log.error("pool %s: cannot spawn a worker: %s", pool.name, exc)
            self._next_spawn_at = time.monotonic() + pool._backoff.next_delay()
            return
        pool._workers[worker.identity] = worker
        pool._loop.add_reader(worker.pidfd, self.on_exit, worker)
        log.info(
            "pool %s: spawned worker %d (pid %d) as %s",
            pool.name,
            worker_id,
            worker.pid,
            role.value,
        )

    async def wait_booted(self) -> None:
        """Wait until every initial active worker said hello; raise if one failed to boot."""
        assert self.pool._loop is not None
        self._booted = self.pool._loop.create_future()
        self._check_booted()
        await self._booted

    def _check_booted(self) -> None:
        if self._booted is None or self._booted.done():
            return
        if self._boot_error is not None:
            self._booted.set_exception(
                PoolUnavailable(
                    self.pool.name,
                    f"a worker failed to boot service {self.cfg.service!r}:\n{self._boot_error}",
                )
            )
        elif sum(1 for w in self.pool._workers.values() if w.dispatchable) >= self.cfg.workers:
            self._booted.set_result(None)

    def on_hello(self, worker: WorkerProcess, hello: m.Hello) -> None:
        pool = self.pool
        expected = pool._endpoint.token if pool._endpoint is not None else ""
        if worker.said_hello or not secrets.compare_digest(hello.token, expected):
            pool._on_bad_frame("unauthenticated")
            return
        if hello.protocol != m.PROTOCOL_VERSION or hello.pid != worker.pid:
            log.error(
                "pool %s: worker %d speaks protocol %d (pid %d), expected %d (pid %d)",
                pool.name,
                worker.worker_id,
                hello.protocol,
                hello.pid,
                m.PROTOCOL_VERSION,
                worker.pid,
            )
            pool._on_bad_frame("protocol")
            self._kill(worker, DeathCause.BOOT_FAILED)
            return
        worker.said_hello = True
        if worker.phase is Phase.BOOTING:
            worker.phase = Phase.READY
            self.pool.refresh_active()
        if pool._circuit is Circuit.HALF_OPEN:
            pool._circuit = Circuit.CLOSED
            pool._intensity.reset()
            self._circuit_reset_s = self.cfg.circuit_reset_s
            log.warning("pool %s: recovered, circuit closed", pool.name)
        self._check_booted()

    # --- answers, deadlines, recycling ----------------------------------------------------------

    def after_answer(self, worker: WorkerProcess) -> None:
        """A worker answered: retire it if it served its quota, stop it if it is retiring."""
        limit = self.cfg.max_calls_per_worker
        if limit and worker.phase is Phase.READY and worker.calls_served >= limit:
            self.retire(worker, "max_calls")
        if worker.phase is Phase.RETIRING and not worker.inflight:
            self._stop(worker, DeathCause.RECYCLED)
        self.pool.notify_changed()

    def enforce_deadlines(self) -> None:
        """Kill workers whose current call overran ``call_timeout_s`` (checked every tick:
        a timestamp per call is far cheaper than a timer per call on the hot path)."""
        now = time.monotonic()
        for worker in list(self.pool._workers.values()):
            if (
                worker.inflight
                and worker.phase in (Phase.READY, Phase.RETIRING)
                and now - worker.head_since > self.cfg.call_timeout_s
            ):
                log.warning(
                    "pool %s: worker %d (pid %d) exceeded %gs on %s(); killing it",
                    self.pool.name, worker.worker_id, worker.pid, self.cfg.call_timeout_s,
                    worker.inflight[0].method,
                )  # fmt: skip
                worker.send_signal(signal.SIGUSR1)  # faulthandler dumps where it is stuck
                self._kill(worker, DeathCause.TIMEOUT, delay=_DUMP_BEFORE_KILL_S)

    def lose(self, worker: WorkerProcess) -> None:
        """The worker's socket is gone while its process lingers: kill it, its calls follow."""
        self._kill(worker, DeathCause.LOST)

    def retire(self, worker: WorkerProcess, reason: str) -> None:
        """Stop dispatching to a worker, replace it now, stop it once its calls are answered."""
        if worker.phase is not Phase.READY:
            return
        worker.phase = Phase.RETIRING
        metrics.WORKER_RECYCLES.labels(self.pool.name, reason).inc()
        log.info(
            "pool %s: recycling worker %d (pid %d, %d calls, %.0f MiB): %s",
            self.pool.name,
            worker.worker_id,
            worker.pid,
            worker.calls_served,
            worker.rss_bytes / 2**20,
            reason,
        )
        self._promote_spare(worker)
        self.spawn_missing()
        if not worker.inflight:
            self._stop(worker, DeathCause.RECYCLED)

    def recycle_bloated(self, force: bool = False) -> None:
        """Measure workers' RSS (psutil) and retire those above ``max_rss_mb``."""
        now = time.monotonic()
        if not force and now < self._next_rss_check:
            return
        self._next_rss_check = now + self.cfg.rss_check_s
        limit = self.cfg.max_rss_mb * 2**20
        for worker in list(self.pool._workers.values()):
            if worker.phase is not Phase.READY:
                continue
            try:
                worker.rss_bytes = psutil.Process(worker.pid).memory_info().rss
            except psutil.Error:
                continue
            if limit and worker.rss_bytes > limit:
                self.retire(worker, "rss")

    def relieve_memory(self, level: MemoryLevel) -> None:
        """Memory pressure rose: recycle workers over their own limit, at CRITICAL the largest."""
        self.recycle_bloated(force=True)
        if level is MemoryLevel.CRITICAL:
            ready = [w for w in self.pool._workers.values() if w.phase is Phase.READY]
            if ready:
                self.retire(max(ready, key=lambda w: w.rss_bytes), "memory")

    def enforce_boot_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.pool._workers.values()):
            if worker.phase is Phase.BOOTING and now - worker.spawned_at > self.cfg.boot_timeout_s:
                log.error(
                    "pool %s: worker %d (pid %d) did not boot within %gs; killing it",
                    self.pool.name,
                    worker.worker_id,
                    worker.pid,
                    self.cfg.boot_timeout_s,
                )
                self._kill(worker, DeathCause.BOOT_FAILED)

    # --- deaths -------------------------------------------------------------------------------

    def on_exit(self, worker: WorkerProcess) -> None:
        """The worker's pidfd fired: reap it, judge once, settle its calls, replace it."""
        pool = self.pool
        assert pool._loop is not None
        pool._loop.remove_reader(worker.pidfd)
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
        del pool._workers[worker.identity]
        self._report(worker, verdict, running)
        self._settle_calls(worker, verdict, running)
        if not verdict.cause.planned:
            self._count_restart(verdict)
        self._promote_spare(worker)
        self.spawn_missing()
        self._check_booted()
        pool.dispatch()
        pool.notify_changed()

    def _report(self, worker: WorkerProcess, verdict: Verdict, running: int | None) -> None:
        pool = self.pool
        culprit = next((c for c in worker.inflight if c.call_id == running), None)
        method = culprit.method + "()" if culprit else "no call"
        if verdict.cause.planned:
            log.info(
                "pool %s: worker %d (pid %d) stopped (%s)",
                pool.name,
                worker.worker_id,
                worker.pid,
                verdict.cause.value,
            )
            return
        metrics.WORKER_CRASHES.labels(pool.name, verdict.label).inc()
        log.warning(
            "pool %s: worker %d (pid %d) died of %s while running %s",
            pool.name,
            worker.worker_id,
            worker.pid,
            verdict.describe(),
            method,
        )
        if verdict.cause is DeathCause.BOOT_FAILED:
            self._boot_error = verdict.stack or verdict.describe()

    def _settle_calls(self, worker: WorkerProcess, verdict: Verdict, running: int | None) -> None:
        """Blame only the call the worker was running (per its marker); re-queue the others.

        Calls before it finished but their replies died with the process; calls after it never
        started. Both run again on another worker (at-least-once for them, documented).
        """
        calls = list(worker.inflight)
        worker.inflight.clear()
        self.pool._in_flight -= len(calls)
        culprit = next((c for c in calls if c.call_id == running), None)
        if culprit is None and verdict.cause is DeathCause.TIMEOUT and calls:
            culprit = calls[0]
        self.pool.requeue_front([c for c in calls if c is not culprit])
        if culprit is None:
            return
        if verdict.cause is DeathCause.STOPPED:
            culprit.fail(PoolUnavailable(self.pool.name, "the pool shut down while the call ran"))
        elif verdict.cause is DeathCause.RECYCLED:
            self.pool.requeue_front([culprit])
        elif verdict.cause is DeathCause.TIMEOUT:
            culprit.fail(
                CallTimeout(
                    pool=self.pool.name, worker_id=worker.worker_id, pid=worker.pid,
                    method=culprit.method, timeout_s=self.cfg.call_timeout_s, stack=verdict.stack,
                )
            )  # fmt: skip
        else:
            self._crashed(culprit, worker, verdict)

    def _crashed(self, call: PendingCall, worker: WorkerProcess, verdict: Verdict) -> None:
        call.crashes += 1
        retries = self.cfg.retries_on_crash
        if call.crashes <= retries:
            metrics.WORKER_CALL_RETRIES.labels(self.pool.name).inc()
            log.info(
                "pool %s: retrying %s() on a fresh worker (attempt %d of %d)",
                self.pool.name, call.method, call.crashes + 1, retries + 1,
            )  # fmt: skip
            self.pool.requeue_front([call])
        elif retries > 0:
            self.pool._quarantine[call.fingerprint] = time.monotonic() + self.cfg.poison_ttl_s
            hint = (
                f"it crashed {call.crashes} workers, so it is not retried again and the same "
                f"method+arguments fail fast for {self.cfg.poison_ttl_s:g}s"
            )
            call.fail(self._crash_error(PoisonCall, call, worker, verdict, hint))
        else:
            hint = (
                "the call was not retried because retries_on_crash = 0; set it on the pool "
                "if the method is safe to run again"
            )
            call.fail(self._crash_error(WorkerCrashed, call, worker, verdict, hint))

    def _crash_error(
        self,
        cls: type[WorkerCrashed],
        call: PendingCall,
        worker: WorkerProcess,
        verdict: Verdict,
        hint: str,
    ) -> WorkerCrashed:
        return cls(
            pool=self.pool.name, worker_id=worker.worker_id, pid=worker.pid, method=call.method,
            signal=verdict.signal, exit_code=verdict.exit_code, reason=verdict.explanation,
            stack=verdict.stack, attempts=call.crashes, hint=hint,
        )  # fmt: skip

    def _count_restart(self, verdict: Verdict) -> None:
        pool = self.pool
        metrics.WORKER_RESTARTS.labels(pool.name).inc()
        self.restarts += 1
        now = time.monotonic()
        self._next_spawn_at = now + pool._backoff.next_delay()
        give_up = pool._intensity.record(now) is RestartDecision.GIVE_UP
        if pool._circuit is Circuit.HALF_OPEN or (give_up and pool._circuit is Circuit.CLOSED):
            self._open_circuit(now)

    def _open_circuit(self, now: float) -> None:
        pool = self.pool
        if pool._circuit is Circuit.HALF_OPEN:
            self._circuit_reset_s = min(self._circuit_reset_s * 2, 60.0)
        pool._circuit = Circuit.OPEN
        self._circuit_retry_at = now + self._circuit_reset_s
        log.error(
            "pool %s: more than %d worker restarts in %gs: circuit open, calls fail with "
            "PoolUnavailable; trying again in %gs",
            pool.name,
            self.cfg.restart_intensity,
            self.cfg.restart_period_s,
            self._circuit_reset_s,
        )
        pool._fail_queue(
            PoolUnavailable(
                pool.name, "the pool is crash-looping (circuit open)", self._circuit_reset_s
            )
        )
        pool._publish_gauges()

    def retry_circuit(self) -> None:
        pool = self.pool
        if pool._circuit is Circuit.OPEN and time.monotonic() >= self._circuit_retry_at:
            pool._circuit = Circuit.HALF_OPEN
            self._next_spawn_at = 0.0
            log.warning("pool %s: circuit half-open, starting fresh workers", pool.name)

    def retry_after(self) -> float:
        return max(0.0, self._circuit_retry_at - time.monotonic())

    def _promote_spare(self, gone: WorkerProcess) -> None:
        """``gone`` stops taking calls: hand its active slot to a ready spare, if any."""
        if gone.role is Role.ACTIVE:
            gone.role = Role.SPARE  # it no longer holds an active slot
            for worker in self.pool._workers.values():
                if worker.role is Role.SPARE and worker.phase is Phase.READY:
                    worker.role = Role.ACTIVE
                    break
        self.pool.refresh_active()

    def serving(self) -> bool:
        return any(w.dispatchable for w in self.pool._workers.values())

    # --- stopping -----------------------------------------------------------------------------

    def _kill(self, worker: WorkerProcess, cause: DeathCause, delay: float = 0.0) -> None:
        if worker.phase is Phase.DEAD:
            return
        worker.killed_for = cause
        worker.phase = Phase.KILLED
        self._promote_spare(worker)
        if delay and self.pool._loop is not None:
            self._stop_timers[worker.worker_id] = self.pool._loop.call_later(
                delay, worker.send_signal, signal.SIGKILL
            )
        else:
            worker.send_signal(signal.SIGKILL)
        self.spawn_missing()

    def _stop(self, worker: WorkerProcess, cause: DeathCause) -> None:
        """Ask politely; escalate to SIGTERM then SIGKILL on monotonic deadlines."""
        worker.killed_for = cause
        if self.pool._channel is not None and worker.said_hello:
            self.pool._channel.send(worker.identity, [m.encoder.encode(m.Shutdown(cause.value))])
        else:
            worker.send_signal(signal.SIGTERM)
        self._escalate(worker, signal.SIGTERM)

    def _escalate(self, worker: WorkerProcess, signum: int) -> None:
        def fire() -> None:
            if worker.phase is Phase.DEAD:
                return
            worker.send_signal(signum)
            if signum != signal.SIGKILL:
                self._escalate(worker, signal.SIGKILL)

        assert self.pool._loop is not None
        self._stop_timers[worker.worker_id] = self.pool._loop.call_later(_STOP_ESCALATION_S, fire)

    async def stop_all(self) -> None:
        """Stop every worker (pool shutdown) and wait until all are reaped."""
        for worker in list(self.pool._workers.values()):
            if worker.phase in (Phase.READY, Phase.RETIRING, Phase.BOOTING):
                worker.phase = Phase.RETIRING
                self._stop(worker, DeathCause.STOPPED)
        self.pool.refresh_active()
        ok = await self.pool._wait_until(lambda: not self.pool._workers, 3 * _STOP_ESCALATION_S)
        if not ok:  # cannot happen unless the kernel refuses SIGKILL; never leave a zombie
            for worker in list(self.pool._workers.values()):
                worker.send_signal(signal.SIGKILL)
                self.on_exit(worker)
