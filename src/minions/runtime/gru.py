"""``Gru``: the one supervised parent that owns orchestrations, resources, pipelines and state.

Design note. Lifecycle calls (start, stop, shutdown) are serialized by one lock, so the resource
graph and the pipeline set never see two changes at once; each of them owns its own counts.
Signals follow STYLE.md: the handler only queues the signal and wakes the supervising task,
which calls :meth:`Gru.handle_term`. The first SIGTERM/SIGINT begins a graceful shutdown
(pipelines stop, in-flight steps get ``grace_period_s``, the rest are cancelled keeping their
checkpoints, resources stop in reverse, the store closes); a second one cuts the grace period
short. Every failure Gru sees goes through one :class:`~minions.runtime.console.Failures`:
logged, and the first of each kind printed to the console.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

from minions._tasks import supervise_tasks
from minions.errors import GruError
from minions.ops import reaper
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemoryThresholds
from minions.pool.pool import WorkerPool
from minions.resource import Resource, stopping_by
from minions.runtime import assembly
from minions.runtime.composition import CompositionError, compose
from minions.runtime.config import (
    DEFAULT,
    GruConfig,
    PersistencePolicy,
    check_max_in_flight,
    metrics_address,
)
from minions.runtime.console import Failures, abandoned_message
from minions.runtime.crash_loops import CrashLoops
from minions.runtime.identity import import_path
from minions.runtime.lifecycle import OrchestrationSet, StartFailed
from minions.runtime.log import WARNING, FileLogger, Logger, ids
from minions.runtime.minion_config import ConfigError, read_config_file
from minions.runtime.operations import Operations, resource_status
from minions.runtime.results import (
    GruState,
    GruStatus,
    ShutdownResult,
    StartResult,
    StopResult,
)
from minions.runtime.signals import SignalQueue, end_process_unless_awaited
from minions.runtime.snapshot import GruRuntimeStateSnapshot
from minions.runtime.store_contract import StateStore
from minions.runtime.telemetry import Metrics, RuntimeMetrics

_CREATE_TOKEN = object()
_LOGGER_SHUTDOWN_S = 5.0  # a user logger's shutdown() may not hold the process past this
_live_gru: Gru | None = None


class Gru:
    """The runtime. Create with ``await Gru.create(...)``; one live instance per process."""

    def __init__(
        self,
        config: GruConfig | None = None,
        store: StateStore | None = None,
        logger: Logger | None = None,
        metrics: Metrics | None = None,
        *,
        _token: object = None,
    ) -> None:
        """Internal: ``create`` builds the parts and passes them; the defaults only exist so a
        direct ``Gru()`` gets the explanation below instead of a TypeError."""
        if _token is not _CREATE_TOKEN or config is None or logger is None or metrics is None:
            raise GruError("do not call Gru() directly; use `gru = await Gru.create(...)`")
        self.config = config
        self.state = GruState.RUNNING
        self.logger = logger
        self._store = store
        hint = str(logger.path) if isinstance(logger, FileLogger) else "Gru's log"
        self._failures = Failures(logger, log_hint=hint)
        self._metrics = RuntimeMetrics(metrics, self._metrics_failed)
        self._lock = asyncio.Lock()
        self._ops = Operations(config, logger, self._metrics, self.status, self.apply_memory_level)
        self._set = OrchestrationSet(
            config, store, self._failures, self._metrics, self._prepare_resource,
            self._task_failed, self._ops.update_status,
        )  # fmt: skip
        self._signal_queue = SignalQueue(self.handle_term)
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown_result: ShutdownResult | None = None
        self._closed_waiters = 0  # tasks in wait_closed()/shutdown(): the app will exit itself
        self._escalations: dict[str, str] = {}  # pools whose crash loop stops Gru (a failure)
        self._crash_loops = CrashLoops(
            self._failures, self._metrics, self._escalate, self._ops.update_status
        )

    # --- creation ----------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        state_store: Any = DEFAULT,
        logger: Any = DEFAULT,
        metrics: Any = DEFAULT,
        metrics_port: int | None = None,
        workflow_failure_policy: str = "delete",
        workflow_persistence_failure_policy: str = "continue-on-failure",
        workflow_persistence_retry_delay_seconds: float = 1.0,
        workflow_persistence_retry_max_delay_seconds: float = 60.0,
        workflow_persistence_retry_backoff_multiplier: float = 2.0,
        workflow_persistence_retry_jitter_ratio: float = 0.1,
        workflow_persistence_retry_warning_interval_seconds: float = 30.0,
        workflow_persistence_retry_error_after_seconds: float | None = 60.0,
        *,
        db_path: str | os.PathLike[str] = "minions.db",
        log_file: str | os.PathLike[str] = "minions.log",
        metrics_host: str | None = None,
        memory: MemoryThresholds | None = None,
        memory_interval_s: float = 0.5,
        max_in_flight: int = 64,
        grace_period_s: float = 10.0,
        stop_timeout_s: float = 40.0,
        handle_signals: bool = True,
    ) -> Self:
        """Open the state store, start operations, and return the process's single running Gru.

        The first arguments take the established forms, positionally too:
        ``Gru.create(state_store, logger, metrics)``. Each is omitted for the default, ``None``
        for off, or an instance of the :mod:`minions.interfaces` class to plug in your own:

        - ``state_store``: SQLite at ``db_path``; ``None`` runs stateless (nothing survives a
          restart).
        - ``logger``: the rotating ``log_file``; ``None`` discards logs; a
          :class:`logging.Logger` also works.
        - ``metrics``: Prometheus at ``http://metrics_host:metrics_port/metrics`` (``None``
          host/port: ``$MINIONS_METRICS_HOST``/``$MINIONS_METRICS_PORT``, else 127.0.0.1 and
          8081; port 0 picks a free one, see :attr:`metrics_port`; a port that cannot be bound
          is logged once and Gru runs on without it); ``None``/``False`` serves nothing.

        ``workflow_failure_policy`` (only ``"delete"``) and the ``workflow_persistence_*``
        arguments are the workflow failure and checkpoint failure policies
        (:class:`~minions.runtime.config.PersistencePolicy`). ``memory`` sets the memory
        monitor's thresholds (``None``: from the cgroup's limits and host memory), sampled every
        ``memory_interval_s``. ``max_in_flight`` bounds workflows per orchestration (the
        backpressure point); ``grace_period_s`` is how long in-flight steps may finish on
        shutdown, and ``stop_timeout_s`` bounds the whole shutdown, steps and resources (worker
        pools stop concurrently within it): keep it under systemd's ``TimeoutStopSec`` (45 s in
        the shipped units). ``handle_signals`` installs the
        SIGTERM/SIGINT handlers (main thread only). With ``$NOTIFY_SOCKET`` set, Gru sends
        ``READY=1`` before returning (see :mod:`minions.runtime.operations`).
        """
        global _live_gru
        metrics_host, port = metrics_address(metrics_host, metrics_port)
        policy = PersistencePolicy(
            workflow_persistence_failure_policy,  # type: ignore[arg-type]  # validated there
            workflow_persistence_retry_delay_seconds,
            workflow_persistence_retry_max_delay_seconds,
            workflow_persistence_retry_backoff_multiplier,
            workflow_persistence_retry_jitter_ratio,
            workflow_persistence_retry_warning_interval_seconds,
            workflow_persistence_retry_error_after_seconds,
        )
        config = GruConfig(
            state_store=state_store, db_path=db_path, logger=logger, log_file=log_file,
            metrics=metrics, metrics_host=metrics_host, metrics_port=port, memory=memory,
            memory_interval_s=memory_interval_s, max_in_flight=max_in_flight,
            grace_period_s=grace_period_s, stop_timeout_s=stop_timeout_s,
            handle_signals=handle_signals,
            workflow_failure_policy=workflow_failure_policy, persistence=policy,
        )  # fmt: skip
        if _live_gru is not None:
            raise GruError(
                "a Gru is already running in this process; call `await gru.shutdown()` on it "
                "before creating another (one Gru owns the process's signals and state)"
            )
        store = assembly.make_store(config)
        gru = cls(
            config, store, assembly.make_logger(config), assembly.make_metrics(config),
            _token=_CREATE_TOKEN,
        )  # fmt: skip
        _live_gru = gru
        try:
            await gru.logger.startup()
            if store is not None:
                await store.open()
            await gru._ops.start()
            gru._install_signal_handlers()
            reaper.hold(gru.logger)  # sweeps only while Gru is PID 1 or a child subreaper
            gru._ops.serve_control(gru)
        except BaseException:
            await gru._ops.stop()
            _live_gru = None
            await gru._close_logger()
            raise
        _warn_at_exit_if_abandoned()
        gru.logger.info("gru started (store=%s)", type(store).__name__, **ids())
        gru._ops.ready()
        return gru

    @classmethod
    def current(cls) -> Gru | None:
        """The process's running Gru, if any (launchers such as ``minions run`` use this)."""
        return _live_gru

    # --- orchestrations ----------------------------------------------------------------------

    async def start_orchestration(
        self,
        pipeline: type | str,
        minion: type | str,
        *,
        minion_config: Any = None,
        minion_config_path: str | os.PathLike[str] | None = None,
        max_in_flight: int | None = None,
    ) -> StartResult:
        """Validate, start and subscribe one orchestration, resuming its saved workflows.

        ``pipeline``/``minion`` are classes, ``"module:Class"`` strings or module paths (the
        module's ``pipeline =``/``minion =`` variable, else its one local subclass). Config
        comes inline (``minion_config``: the declared type, or a mapping of its fields) or from
        a file (``minion_config_path``: TOML or JSON, or the minion's ``load_config``). Any
        failure returns ``StartResult(success=False, reason=...)`` and rolls back what this
        call started; success has ``reason=None``.
        """
        async with self._lock:
            if self.state is not GruState.RUNNING:
                return StartResult(False, f"Gru is {self.state.value}")
            try:
                bound = check_max_in_flight(max_in_flight or self.config.max_in_flight)
                config_file = None
                if minion_config_path is not None:
                    config_file = await asyncio.to_thread(read_config_file, minion_config_path)
                comp = compose(pipeline, minion, minion_config, config_file)
                if comp.orchestration_id in self._set.running:
                    raise CompositionError(
                        f"orchestration {comp.orchestration_id} ({import_path(comp.pipeline_cls)}"
                        f" -> {import_path(comp.minion_cls)}) is already running"
                    )
                plan = self._set.graph.plan([comp.pipeline_cls, comp.minion_cls])
            except (CompositionError, ConfigError, TypeError, ValueError) as exc:
                self._failures(
                    ("start-refused", str(exc)[:80]), f"start_orchestration refused: {exc}",
                    level=WARNING,
                )  # fmt: skip
                return StartResult(False, str(exc))
            try:
                resumed = await self._set.start(comp, plan, bound)
            except StartFailed as exc:
                self._failures(
                    ("start-failed", comp.orchestration_id),
                    f"orchestration failed to start: {exc}", exc.__cause__,
                )  # fmt: skip
                cause = repr(exc.__cause__) if exc.__cause__ is not None else None
                return StartResult(False, str(exc), comp.orchestration_id, cause=cause)
            return StartResult(True, None, comp.orchestration_id, resumed)

    async def start(self, pipeline: type | str, minion: type | str, **kwargs: Any) -> StartResult:
        """The established short name of :meth:`start_orchestration`."""
        return await self.start_orchestration(pipeline, minion, **kwargs)

    async def stop(self, orchestration_id: str) -> StopResult:
        """The established short name of :meth:`stop_orchestration`."""
        return await self.stop_orchestration(orchestration_id)

    async def stop_orchestration(self, orchestration_id: str) -> StopResult:
        """Stop one orchestration (others keep running): unsubscribe it from its pipeline, give
        in-flight steps the grace period, cancel the rest keeping their checkpoints, and release
        its minion, pipeline and resources (each stops only when nothing else uses it)."""
        if not isinstance(orchestration_id, str):
            raise TypeError("orchestration_id must be a str (StartResult.orchestration_id)")
        async with self._lock:
            running = self._set.running.get(orchestration_id.strip())
            if running is None:
                return StopResult(False, f"no running orchestration {orchestration_id!r}")
            cancelled, errors = await self._set.stop([running])
        reason = "; ".join(errors.values()) or None
        return StopResult(not errors, reason, running.orchestration.id, cancelled, errors)

    # --- shutdown ----------------------------------------------------------------------------

    async def shutdown(self) -> ShutdownResult:
        """Stop everything in order and close the store; idempotent, safe from any task."""
        if self.state is not GruState.RUNNING:
            await self.wait_closed()
            assert self._shutdown_result is not None
            return self._shutdown_result
        self.state = GruState.SHUTTING_DOWN
        deadline = time.monotonic() + self.config.stop_timeout_s
        self.logger.info(
            "gru shutting down (grace %.1fs, all done within %.1fs)",
            self.config.grace_period_s, self.config.stop_timeout_s, **ids(),
        )  # fmt: skip
        self._ops.begin_stop()
        cancelled = 0
        errors: dict[str, str] = dict(self._escalations)
        try:
            async with self._lock:
                with stopping_by(deadline):  # resources read it (pools keep to it)
                    stopped = await self._set.stop(list(self._set.running.values()), deadline)
                cancelled = stopped[0]
                errors |= stopped[1]
                errors |= await self._close_store()
        except Exception as exc:
            self.logger.error("shutdown failed: %r", exc, exc_info=exc, **ids())
            errors["minions.runtime.gru:Gru"] = repr(exc)
        finally:
            errors |= await self._ops.stop()
            await self._finish_shutdown()
            reason = f"shutdown finished with {len(errors)} error(s)" if errors else None
            self._shutdown_result = ShutdownResult(not errors, errors, cancelled, reason)
            self.logger.info(
                "gru stopped (%d workflows cancelled, %d errors)", cancelled, len(errors), **ids()
            )
            self._failures.flush()
            await self._close_logger()
            self._closed.set()
        return self._shutdown_result

    async def _close_store(self) -> dict[str, str]:
        if self._store is None:
            return {}
        try:
            await self._store.close()
        except Exception as exc:
            self.logger.error("state store close failed: %r", exc, exc_info=exc, **ids())
            return {import_path(type(self._store)): repr(exc)}
        return {}

    async def _finish_shutdown(self) -> None:
        """Release the process: signal handlers, helper tasks, the singleton slot."""
        global _live_gru
        self._signal_queue.remove()
        await reaper.unhold()
        current = asyncio.current_task()
        helpers = [t for t in (self._signal_queue.task, *self._tasks) if t and t is not current]
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        self.state = GruState.CLOSED
        if _live_gru is self:
            _live_gru = None

    async def wait_closed(self) -> None:
        """Return once shutdown has finished (a launcher's ``main`` awaits this, then exits 0).

        While any task waits here, a signal-driven shutdown leaves ending the process to the
        application (see :mod:`minions.runtime.signals`).
        """
        self._closed_waiters += 1
        try:
            await self._closed.wait()
        finally:
            self._closed_waiters -= 1

    async def _close_logger(self) -> None:
        """Deliver what is still queued for the logger, then release it; a failing logger is
        reported on stderr, never raised."""
        try:
            await self.logger.flush()
            await asyncio.wait_for(self.logger.shutdown(), _LOGGER_SHUTDOWN_S)
        except Exception as exc:
            print(
                f"minions: {type(self.logger).__name__}.shutdown() raised {exc!r}", file=sys.stderr
            )

    # --- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if not self.config.handle_signals:
            return
        try:
            self._signal_queue.install()
        except (RuntimeError, ValueError) as exc:  # not the main thread
            self.logger.warning("signal handlers not installed: %s", exc, **ids())

    def handle_term(self, signum: int = signal.SIGTERM) -> None:
        """SIGTERM/SIGINT: begin a graceful shutdown; a repeat cuts the grace period short."""
        name = signal.Signals(signum).name
        if self.state is GruState.RUNNING:
            self.logger.info("%s received: shutting down", name, **ids())
            self._track(self._shutdown_then_exit())
        else:
            self.logger.warning("%s received again: cancelling in-flight steps now", name, **ids())
            self._set.grace_cut.set()

    async def _shutdown_then_exit(self) -> None:
        """A signal's shutdown; then the process ends unless the app waits (see signals.py)."""
        result = await self.shutdown()
        end_process_unless_awaited(result, self._closed_waiters > 0, self.logger)

    def _track(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- hooks for components, resources and the memory monitor ------------------------------

    def _prepare_resource(self, resource: Resource) -> None:
        supervise_tasks(resource, self._task_failed)
        self._ops.prepare_resource(resource)
        if isinstance(resource, WorkerPool):
            resource.subscribe_circuit(self._crash_loops.circuit_changed)

    def _escalate(self, pool: str, why: str) -> None:
        """A pool set to ``on_crash_loop = "escalate"`` gave up: stop with a failure."""
        if self.state is GruState.RUNNING:
            self._escalations[pool] = why
            self._track(self._shutdown_then_exit())

    def _task_failed(self, owner: object, label: str, exc: BaseException) -> None:
        name = type(owner).__name__
        self._failures(
            ("task", name, label, type(exc).__name__),
            f"{name} task {label} (safe_create_task) raised {exc!r}", exc,
        )  # fmt: skip

    def _metrics_failed(self, what: str, exc: BaseException) -> None:
        self._failures(("metrics", what), f"{what}: {exc!r}; that metric is off from now", exc)

    def pause_pipelines(self) -> None:
        """Stop asking pipelines for events (in-flight workflows continue). Called on the loop by
        the memory monitor at HIGH pressure; :meth:`resume_pipelines` undoes it."""
        self._set.pipelines.pause()

    def resume_pipelines(self) -> None:
        self._set.pipelines.resume()

    def apply_memory_level(self, level: MemoryLevel) -> None:
        """Memory monitor hook, called on each level change: HIGH and above pause pipelines."""
        if level >= MemoryLevel.HIGH:
            self.pause_pipelines()
        else:
            self.resume_pipelines()

    def resource_failed(self, resource: Resource, error: BaseException) -> None:
        """Report that a running resource broke for good: every orchestration that depends on it
        is stopped (in a tracked task); orchestrations that do not are untouched."""
        cls = self._set.graph.mark_failed(resource, error)
        if cls is None or self.state is not GruState.RUNNING:
            return
        self._failures(
            ("resource", cls.__name__), f"resource {cls.__name__} failed: {error!r}", error
        )
        dependents = [oid for oid, r in self._set.running.items() if cls in r.plan]
        for oid in dependents:
            self._track(self.stop_orchestration(oid))

    # --- status ------------------------------------------------------------------------------

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is bound to (the real one with ``metrics_port=0``); ``None``
        when metrics are off, the port could not be bound, or Gru has shut down."""
        return self._ops.metrics_port

    def live_resources(self) -> list[Resource]:
        """Every running resource instance, in start order (the control endpoint finds pools
        here for ``minions status`` and ``minions pools restart``)."""
        return [instance for _, instance, _, _ in self._set.graph.snapshot()]

    @property
    def memory_monitor(self) -> MemoryMonitor:
        """Gru's one monitor: subscribe to it, or read its ``level`` and ``last_sample``."""
        return self._ops.monitor

    def status(self) -> GruStatus:
        """Snapshot: orchestrations with in-flight counts, resources (pools with workers alive),
        memory level and the metrics URL."""
        return GruStatus(
            state=self.state,
            orchestrations=tuple(r.orchestration.status() for r in self._set.running.values()),
            resources=tuple(resource_status(*row) for row in self._set.graph.snapshot()),
            pipelines_paused=self._set.pipelines.paused,
            durable=self._store is not None,
            memory_level=self._ops.monitor.level,
            metrics_url=self._ops.metrics_url,
        )

    async def runtime_state_snapshot(self) -> GruRuntimeStateSnapshot:
        """The live component graph by identifier (see :mod:`minions.runtime.snapshot`)."""
        async with self._lock:
            return self._set.snapshot()


_exit_warning: list[Callable[[], None]] = []


def _warn_at_exit_if_abandoned() -> None:
    """Once per process: at interpreter exit, say so if a Gru was left running (``main()``
    returned without ``await gru.wait_closed()``, so the loop and the process just ended)."""
    if _exit_warning:
        return

    def warn() -> None:
        gru = _live_gru
        if gru is None or gru.state is not GruState.RUNNING or not gru._set.running:
            return
        status = gru.status().orchestrations
        finished = sum(o.succeeded + o.failed + o.aborted for o in status)
        in_flight = sum(o.in_flight for o in status)
        print(abandoned_message(len(status), finished, in_flight), file=sys.stderr)

    _exit_warning.append(warn)
    atexit.register(warn)
