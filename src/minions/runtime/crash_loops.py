"""What Gru does when one of its worker pools crash-loops.

A pool past its restart intensity opens its circuit and recovers by itself (its calls fail with
``PoolUnavailable`` meanwhile); that is the pool's business. Gru's is that an operator hears of
it: the log (and stderr, the first time), ``minions_resource_errors_total{phase="crash_loop"}``,
the status and systemd's ``STATUS=`` line. A pool set to ``on_crash_loop = "escalate"`` asks for
OTP's answer instead: its supervisor gives up, so Gru stops with a failure and systemd (or
supervisord, or a container's restart policy) restarts the whole service.
"""

from __future__ import annotations

from collections.abc import Callable

from minions.pool.pool import WorkerPool
from minions.pool.states import Circuit, CrashLoopPolicy
from minions.runtime.console import Failures
from minions.runtime.identity import import_path
from minions.runtime.log import ids
from minions.runtime.telemetry import RESOURCE_ERRORS, RuntimeMetrics


class CrashLoops:
    """Reports pools' circuit changes; calls ``escalate(pool, why)`` for escalating pools."""

    def __init__(
        self,
        failures: Failures,
        metrics: RuntimeMetrics,
        escalate: Callable[[str, str], None],
        status_changed: Callable[[], None],
    ) -> None:
        self._failures = failures
        self._metrics = metrics
        self._escalate = escalate
        self._status_changed = status_changed

    def circuit_changed(self, pool: WorkerPool, circuit: Circuit) -> None:
        """A pool's listener (``pool.subscribe_circuit``), on the loop, once per change."""
        if circuit is Circuit.OPEN:
            self._opened(pool)
        elif circuit is Circuit.CLOSED:
            self._failures.logger.warning(
                "pool %s recovered: its circuit closed", pool.name, **ids()
            )
        self._status_changed()

    def _opened(self, pool: WorkerPool) -> None:
        cfg = pool.config
        name = type(pool).__name__
        self._metrics.child(RESOURCE_ERRORS, resource=name, phase="crash_loop").inc()
        escalate = cfg.on_crash_loop is CrashLoopPolicy.ESCALATE
        then = (
            "on_crash_loop = 'escalate': Gru stops with a failure so its supervisor restarts the "
            "service"
            if escalate
            else "its calls fail with PoolUnavailable until a fresh worker boots; set "
            "on_crash_loop = 'escalate' on the pool to stop the service instead"
        )
        message = (
            f"pool {pool.name} is crash-looping: more than {cfg.restart_intensity} worker "
            f"restarts in {cfg.restart_period_s:g}s opened its circuit; {then}"
        )
        path = import_path(type(pool))
        self._failures(("crash-loop", path), message)
        if escalate:
            self._escalate(path, message)
