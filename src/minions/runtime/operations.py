"""Gru's operational side: the memory monitor it acts on, ``/metrics``, and systemd's notify.

Design note. Gru is the one owner of everything an operator or a supervisor sees of the process,
so any launcher (``minions run``, a user's own ``asyncio.run(main())``, a test) is systemd-correct
without doing anything itself:

- one :class:`~minions.ops.memory.MemoryMonitor` per Gru; Gru pauses its pipelines at HIGH and
  resumes them at NORMAL, and every :class:`~minions.workers.WorkerPool` Gru starts follows the
  same monitor (attached before the pool's ``startup()``, so the pool's workers are measured from
  their first call and no pool runs a monitor of its own);
- the Prometheus endpoint (a bind failure is one logged error: Gru runs on without it);
- the control endpoint behind ``minions status`` (:mod:`minions.control`), started once the
  store is open, so its pointer file beside the database never names a Gru that failed to start;
- the metrics flush: Gru's hot path counts in plain numbers (:mod:`minions.ops.tally`),
  handed to prometheus-client every ``_FLUSH_INTERVAL_S``, at every scrape and at shutdown;
- sd_notify: ``READY=1`` when ``Gru.create`` returns, ``STATUS=`` whenever the one-line summary
  changes (orchestration start/stop, a memory level change, and a refresh every
  ``status_interval_s``), ``WATCHDOG=1`` from the event loop for Gru's whole life, ``STOPPING=1``
  as shutdown begins. Every one of them is a cheap no-op without ``$NOTIFY_SOCKET``.

Start order: monitor (a first sample, so pipelines and pools start at the right level), endpoint,
metrics flush, watchdog, status refresher, control, ``READY=1``. Stop order (after Gru's resources
and store are closed): control, monitor, metrics flush (a last one), endpoint, refresher, and the
watchdog last, so systemd keeps hearing from a loop that is still busy shutting down until the
very end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import psutil
import zmq

from minions.control import endpoint as control_endpoint
from minions.control.server import ControlServer, ControlTarget
from minions.ops import metrics as declared
from minions.ops import sdnotify
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemorySample
from minions.pool.pool import WorkerPool
from minions.resource import Resource
from minions.runtime.config import DEFAULT, GruConfig
from minions.runtime.identity import import_path
from minions.runtime.log import Logger, ids
from minions.runtime.resource_calls import track_calls
from minions.runtime.resources import ResourceState
from minions.runtime.results import GruStatus, ResourceStatus
from minions.runtime.telemetry import Metrics, PrometheusMetrics, RuntimeMetrics

_FLUSH_INTERVAL_S = 1.0  # how stale an in-process read of a series may be; scrapes are exact

_PAUSE_NOTE = {
    MemoryLevel.NORMAL: "pipelines resumed",
    MemoryLevel.HIGH: "pipelines paused, pools throttle",
    MemoryLevel.CRITICAL: "pipelines paused, pools shed new calls",
}


class Operations:
    """Owned by one Gru, on its loop; see the module note for what it runs and in which order."""

    def __init__(
        self,
        config: GruConfig,
        logger: Logger,
        metrics: RuntimeMetrics,
        status: Callable[[], GruStatus],
        on_level: Callable[[MemoryLevel], None],
    ) -> None:
        self.config = config
        self.monitor = MemoryMonitor(config.memory, interval_s=config.memory_interval_s)
        self.watchdog = sdnotify.Watchdog()
        self.metrics = metrics
        self._metrics_started = False
        self._logger = logger
        self._status = status
        self._on_level = on_level
        self._unsubscribe: Callable[[], None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._last_status = ""
        self.control: ControlServer | None = None
        self._pointer: Path | None = None

    @property
    def _prometheus(self) -> PrometheusMetrics | None:
        backend = self.metrics.backend
        return backend if isinstance(backend, PrometheusMetrics) else None

    @property
    def metrics_url(self) -> str | None:
        return self._prometheus.url if self._prometheus is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self._prometheus.port if self._prometheus is not None else None

    # --- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the monitor, the metrics backend (the endpoint), the watchdog and the status
        refresher; called once by ``Gru.create``, which then calls :meth:`ready` last."""
        self.monitor.start()
        self._unsubscribe = self.monitor.subscribe(self._level_changed)
        self._on_level(self.monitor.level)  # the first sample may already be above NORMAL
        declared.HOST_MEMORY_TOTAL_BYTES.set(psutil.virtual_memory().total)
        declared.HOST_CPUS.set(os.cpu_count() or 1)
        await self._start_metrics(self.metrics.backend)
        self._flusher = asyncio.create_task(self._flush_metrics(), name="minions-metrics-flush")
        self.watchdog.start()
        if sdnotify.enabled():
            self._refresher = asyncio.create_task(self._refresh(), name="minions-gru-status")

    def serve_control(self, target: ControlTarget) -> None:
        """Serve the control socket; a failure is one logged error and Gru runs on without it.
        Called by ``Gru.create`` once the store is open and the signal handlers are in."""
        place = control_endpoint.choose_place(os.environ)
        server = ControlServer(target, place)
        try:
            server.start()
        except zmq.ZMQError as exc:
            place.remove()
            self._logger.error(
                "control endpoint disabled (minions status will not reach this Gru): cannot "
                "bind %s: %s", place.socket, exc, **ids(),
            )  # fmt: skip
            return
        self.control = server
        if self.config.state_store is DEFAULT:
            pointer = control_endpoint.pointer_path(self.config.db_path)
            if control_endpoint.write_pointer(pointer, place):
                self._pointer = pointer
        self._logger.info("control endpoint at %s", place.socket, **ids())

    def ready(self) -> None:
        """``READY=1`` with the first ``STATUS=``: ``systemctl start`` returns now."""
        if self._refresher is not None:
            self._last_status = self.summary()
            sdnotify.ready(self._last_status)

    async def _start_metrics(self, backend: Metrics) -> None:
        """A backend that cannot start (a taken port, a broken custom backend) is one logged
        error: Gru runs on without it rather than not at all."""
        try:
            await backend.startup()
        except Exception as exc:
            self._logger.error("metrics disabled, Gru runs on without /metrics: %s", exc, **ids())
            return
        self._metrics_started = True
        if self.metrics_url is not None:
            self._logger.info("serving Prometheus metrics at %s", self.metrics_url, **ids())

    def prepare_resource(self, resource: Resource) -> None:
        """Called by the resource graph between a resource's constructor and its ``startup()``:
        a pool then follows Gru's monitor (its own ``memory`` thresholds, if any, are unused);
        any other resource gets its per-method call metrics."""
        if isinstance(resource, WorkerPool):
            resource.attach_memory_monitor(self.monitor)
        else:
            track_calls(resource, self.metrics)

    # --- while running -----------------------------------------------------------------------

    def _level_changed(self, level: MemoryLevel, _sample: MemorySample) -> None:
        """Monitor callback, on the loop, once per transition (the monitor logs the measure)."""
        self._on_level(level)
        self._logger.info("memory pressure %s: %s", level.name, _PAUSE_NOTE[level], **ids())
        self.update_status()

    def update_status(self) -> None:
        """Send ``STATUS=`` if the summary changed since the last one (no-op without systemd)."""
        if self._refresher is None:
            return
        text = self.summary()
        if text != self._last_status:
            self._last_status = text
            sdnotify.status(text)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL_S)
            self.metrics.flush()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            self.update_status()

    def summary(self) -> str:
        return summary_line(self._status())

    # --- stop --------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Shutdown has begun: ``STOPPING=1`` with the summary, and no more periodic refresh."""
        if self._refresher is not None:
            self._refresher.cancel()
            sdnotify.stopping(self.summary())

    async def stop(self) -> dict[str, str]:
        """Stop in the module note's order; idempotent. Errors are logged and returned."""
        errors: dict[str, str] = {}
        control, self.control = self.control, None
        if control is not None:
            if self._pointer is not None:
                control_endpoint.remove_pointer(self._pointer, control.place)
            await control.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.monitor.stop()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        self.metrics.flush()  # the last counts of this Gru, before the endpoint closes
        if self._metrics_started:
            self._metrics_started = False
            backend = self.metrics.backend
            try:
                await backend.shutdown()
            except Exception as exc:
                self._logger.error("stopping metrics failed: %r", exc, exc_info=exc, **ids())
                errors[import_path(type(backend))] = repr(exc)
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await self.watchdog.stop()
        return errors


def resource_status(
    cls: type[Resource], instance: Resource, refs: int, state: ResourceState
) -> ResourceStatus:
    """One row of :meth:`Gru.status`; a pool also reports how many of its workers serve."""
    if not isinstance(instance, WorkerPool):
        return ResourceStatus(import_path(cls), refs, state.value, False)
    snap = instance.snapshot()
    alive = snap.workers_ready + snap.spares_ready
    return ResourceStatus(import_path(cls), refs, state.value, True, alive, snap.circuit.value)


def summary_line(status: GruStatus) -> str:
    """The one line ``systemctl status`` shows, e.g. ``running: 2 orchestrations, 13 workflows
    in flight, 4 workers alive, memory NORMAL``."""
    orchestrations = len(status.orchestrations)
    in_flight = sum(o.in_flight for o in status.orchestrations)
    workers = sum(r.workers_alive or 0 for r in status.resources)
    parts = [
        f"{status.state.value.replace('_', ' ')}: {orchestrations} orchestration"
        + ("" if orchestrations == 1 else "s"),
        f"{in_flight} workflows in flight",
        f"{workers} workers alive",
        f"memory {status.memory_level.name}",
    ]
    if status.pipelines_paused:
        parts.append("pipelines paused")
    looping = [r.resource.rpartition(":")[2] for r in status.resources if r.circuit == "open"]
    if looping:
        parts.append(f"crash-looping (circuit open): {', '.join(looping)}")
    return ", ".join(parts)
