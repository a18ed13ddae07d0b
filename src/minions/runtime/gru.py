"""``Gru``: the one supervised parent that owns orchestrations, resources, pipelines and state.

Design note. Lifecycle calls (start, stop, shutdown) are serialized by one lock, so the resource
and pipeline refcounts never see two changes at once. Signals follow STYLE.md: the handler only
queues the signal and wakes the supervising task, which calls :meth:`Gru.handle_term`. The first
SIGTERM/SIGINT begins a graceful shutdown (pipelines stop, in-flight steps get
``grace_period_s``, the rest are cancelled keeping their checkpoints, resources stop in reverse,
the store closes); a second one cuts the grace period short.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from minions.errors import GruError
from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemoryThresholds
from minions.resource import Resource
from minions.runtime.composition import Composition, CompositionError, compose, import_path
from minions.runtime.config import DEFAULT, GruConfig, check_max_in_flight, metrics_address
from minions.runtime.log import DefaultLogger, LoggerLike, ids
from minions.runtime.operations import Operations, resource_status
from minions.runtime.orchestration import Orchestration
from minions.runtime.pipeline import PipelineRunner
from minions.runtime.resources import ResourceGraph, ResourceStartError
from minions.runtime.results import (
    GruState,
    GruStatus,
    OrchestrationState,
    ShutdownResult,
    StartResult,
    StopResult,
)
from minions.runtime.signals import SignalQueue, end_process_unless_awaited
from minions.runtime.state import SQLiteStateStore, StateStore

_CREATE_TOKEN = object()
_live_gru: Gru | None = None


class _StartFailed(Exception):
    """Internal: one start phase failed; ``str()`` is the StartResult reason."""


@dataclass(slots=True)
class _Running:
    orchestration: Orchestration
    plan: list[type[Resource]]
    runner: PipelineRunner


@dataclass(slots=True)
class _PipelineSlot:
    runner: PipelineRunner
    refs: int


class Gru:
    """The runtime. Create with ``await Gru.create(...)``; one live instance per process."""

    def __init__(self, *args: Any, _token: object = None, **kwargs: Any) -> None:
        if _token is not _CREATE_TOKEN:
            raise GruError("do not call Gru() directly; use `gru = await Gru.create(...)`")
        config: GruConfig = args[0]
        store: StateStore | None = args[1]
        self.config = config
        self.state = GruState.RUNNING
        self._store = store
        self._default_logger: DefaultLogger | None = None
        if config.logger is None:
            self._default_logger = DefaultLogger(config.log_file)
            self.logger: LoggerLike = self._default_logger.logger
        else:
            self.logger = config.logger
        self._lock = asyncio.Lock()
        self._ops = Operations(config, self.logger, self.status, self.apply_memory_level)
        self._graph = ResourceGraph(self._ops.prepare_resource)
        self._orchestrations: dict[str, _Running] = {}
        self._pipelines: dict[type, _PipelineSlot] = {}
        self._paused = False
        self._signal_queue = SignalQueue(self.handle_term)
        self._grace_cut = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown_result: ShutdownResult | None = None
        self._closed_waiters = 0  # tasks in wait_closed()/shutdown(): the app will exit itself

    # --- creation ----------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        *,
        state_store: Any = DEFAULT,
        db_path: str = "minions.db",
        logger: LoggerLike | None = None,
        log_file: str = "minions.log",
        metrics: bool | None = True,
        metrics_host: str | None = None,
        metrics_port: int | None = None,
        memory: MemoryThresholds | None = None,
        memory_interval_s: float = 0.5,
        max_in_flight: int = 64,
        grace_period_s: float = 10.0,
        handle_signals: bool = True,
    ) -> Self:
        """Open the state store, start operations, and return the process's single running Gru.

        ``state_store`` omitted means SQLite at ``db_path``; ``None`` runs stateless (nothing
        survives a restart); any object implementing the ``StateStore`` protocol plugs in.
        ``logger`` replaces the default rotating ``log_file``. Prometheus metrics are served at
        ``http://metrics_host:metrics_port/metrics`` unless ``metrics`` is ``False``/``None``
        (``None`` host/port: ``$MINIONS_METRICS_HOST``/``$MINIONS_METRICS_PORT``, else
        127.0.0.1 and 8081, so sharded units set them per instance; port 0 picks a free port,
        see :attr:`metrics_port`; a port that cannot be bound is logged once and Gru runs on
        without it). ``memory`` sets the memory monitor's
        thresholds (``None``: from the cgroup's limits and host memory), sampled every
        ``memory_interval_s``. ``max_in_flight`` bounds workflows per orchestration (the
        backpressure point); ``grace_period_s`` is how long in-flight steps may finish on
        shutdown (keep it under systemd's TimeoutStopSec). ``handle_signals`` installs the
        SIGTERM/SIGINT handlers (main thread only). With ``$NOTIFY_SOCKET`` set, Gru sends
        ``READY=1`` before returning (see :mod:`minions.runtime.operations`).
        """
        global _live_gru
        metrics_host, metrics_port = metrics_address(metrics_host, metrics_port)
        config = GruConfig(
            state_store=state_store, db_path=db_path, logger=logger, log_file=log_file,
            metrics=metrics, metrics_host=metrics_host, metrics_port=metrics_port, memory=memory,
            memory_interval_s=memory_interval_s, max_in_flight=max_in_flight,
            grace_period_s=grace_period_s, handle_signals=handle_signals,
        )  # fmt: skip
        if _live_gru is not None:
            raise GruError(
                "a Gru is already running in this process; call `await gru.shutdown()` on it "
                "before creating another (one Gru owns the process's signals and state)"
            )
        store = SQLiteStateStore(config.db_path) if state_store is DEFAULT else state_store
        gru = cls(config, store, _token=_CREATE_TOKEN)
        _live_gru = gru
        try:
            if store is not None:
                await store.open()
            gru._ops.start()
            gru._install_signal_handlers()
            gru._ops.serve_control(gru)
        except BaseException:
            await gru._ops.stop()
            _live_gru = None
            gru._close_logger()
            raise
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
        max_in_flight: int | None = None,
    ) -> StartResult:
        """Validate, start and subscribe one orchestration, resuming its saved workflows.

        ``pipeline``/``minion`` are classes or ``"module:Class"`` strings. Any failure returns
        ``StartResult(success=False, reason=...)`` and rolls back what this call started.
        """
        async with self._lock:
            if self.state is not GruState.RUNNING:
                return StartResult(False, f"Gru is {self.state.value}")
            try:
                bound = check_max_in_flight(max_in_flight or self.config.max_in_flight)
                comp = compose(pipeline, minion, minion_config)
                if comp.orchestration_id in self._orchestrations:
                    raise CompositionError(
                        f"orchestration {comp.orchestration_id} ({import_path(comp.pipeline_cls)}"
                        f" -> {import_path(comp.minion_cls)}) is already running"
                    )
                plan = self._graph.plan([comp.pipeline_cls, comp.minion_cls])
            except (CompositionError, TypeError, ValueError) as exc:
                self.logger.warning("start_orchestration refused: %s", exc, **ids())
                return StartResult(False, str(exc))
            try:
                resumed = await self._start(comp, plan, bound)
            except _StartFailed as exc:
                self.logger.error("orchestration failed to start: %s", exc, **ids())
                return StartResult(False, str(exc), comp.orchestration_id)
            return StartResult(True, "", comp.orchestration_id, resumed)

    async def _start(self, comp: Composition, plan: list[type[Resource]], bound: int) -> int:
        """Acquire resources, pipeline and minion, then resume; undo everything on failure."""
        async with contextlib.AsyncExitStack() as undo:
            try:
                await self._graph.acquire(plan)
            except ResourceStartError as exc:
                raise _StartFailed(str(exc)) from exc
            undo.push_async_callback(self._graph.release, plan)
            runner = await self._acquire_pipeline(comp)
            undo.push_async_callback(self._release_pipeline, comp.pipeline_cls)
            minion = await self._start_minion(comp)
            undo.push_async_callback(self._quietly, minion.shutdown, comp.minion_cls)
            orch = Orchestration(comp, minion, self._store, self.logger, bound)
            try:
                resumed = await orch.resume()
            except Exception as exc:
                raise _StartFailed(f"could not load saved workflows: {exc!r}") from exc
            undo.pop_all()
        orch.state = OrchestrationState.RUNNING
        self._orchestrations[orch.id] = _Running(orch, plan, runner)
        runner.subscribe(orch)
        self._ops.update_status()
        self.logger.info(
            "orchestration started: %s -> %s (resumed %d)", import_path(comp.pipeline_cls),
            import_path(comp.minion_cls), resumed, **ids(orch.id),
        )  # fmt: skip
        return resumed

    async def _start_minion(self, comp: Composition) -> Any:
        try:
            minion = comp.minion_cls(comp.config)
            self._graph.inject(minion)
            await minion.startup()
        except Exception as exc:
            name = comp.minion_cls.__name__
            raise _StartFailed(f"minion {name} failed to start: {exc!r}") from exc
        return minion

    async def _acquire_pipeline(self, comp: Composition) -> PipelineRunner:
        slot = self._pipelines.get(comp.pipeline_cls)
        if slot is not None:
            slot.refs += 1
            return slot.runner
        name = comp.pipeline_cls.__name__
        try:
            pipeline = comp.pipeline_cls()
            self._graph.inject(pipeline)
            await pipeline.startup()
        except Exception as exc:
            raise _StartFailed(f"pipeline {name} failed to start: {exc!r}") from exc
        runner = PipelineRunner(
            pipeline, comp.event_type, name, self.logger, self.config.pipeline_retry_s
        )
        if self._paused:
            runner.pause()
        self._pipelines[comp.pipeline_cls] = _PipelineSlot(runner, 1)
        return runner

    async def _release_pipeline(self, pipeline_cls: type) -> dict[str, str]:
        slot = self._pipelines[pipeline_cls]
        slot.refs -= 1
        if slot.refs > 0:
            return {}
        del self._pipelines[pipeline_cls]
        await slot.runner.stop()
        return await self._quietly(slot.runner.pipeline.shutdown, pipeline_cls)

    async def stop_orchestration(self, orchestration_id: str) -> StopResult:
        """Stop one orchestration (others keep running): unsubscribe it from its pipeline, give
        in-flight steps the grace period, cancel the rest keeping their checkpoints, and release
        its minion, pipeline and resources (each stops only when nothing else uses it)."""
        if not isinstance(orchestration_id, str):
            raise TypeError("orchestration_id must be a str (StartResult.orchestration_id)")
        async with self._lock:
            running = self._orchestrations.get(orchestration_id)
            if running is None:
                return StopResult(False, f"no running orchestration {orchestration_id!r}")
            cancelled, errors = await self._stop_all([running])
        reason = "; ".join(errors.values())
        return StopResult(not errors, reason, orchestration_id, cancelled, errors)

    async def _stop_all(self, stopping: list[_Running]) -> tuple[int, dict[str, str]]:
        """Drain ``stopping`` together under one grace period, then tear each down."""
        for running in stopping:
            running.runner.unsubscribe(running.orchestration)
            running.orchestration.begin_drain()
        for running in stopping:
            if running.runner.subscriber_count == 0:
                await running.runner.stop()
        await self._wait_drained(t for r in stopping for t in r.orchestration.tasks)
        cancelled = 0
        errors: dict[str, str] = {}
        for running in reversed(stopping):
            cancelled += await running.orchestration.cancel_remaining()
            errors |= await self._teardown(running)
        return cancelled, errors

    async def _wait_drained(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        """Wait for ``tasks`` until the grace period ends or a second signal cuts it short."""
        pending: set[asyncio.Future[Any]] = set(tasks)
        if not pending:
            return
        deadline = time.monotonic() + self.config.grace_period_s
        cut = asyncio.ensure_future(self._grace_cut.wait())
        try:
            while pending and not cut.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                _, pending = await asyncio.wait(
                    pending | {cut}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(cut)
        finally:
            cut.cancel()
            await asyncio.gather(cut, return_exceptions=True)

    async def _teardown(self, running: _Running) -> dict[str, str]:
        orch = running.orchestration
        errors = await self._quietly(orch.minion.shutdown, orch.composition.minion_cls)
        errors |= await self._release_pipeline(orch.composition.pipeline_cls)
        for name, exc in (await self._graph.release(running.plan)).items():
            errors[name] = repr(exc)
            self.logger.error("resource shutdown failed: %s: %r", name, exc, **ids(orch.id))
        orch.state = OrchestrationState.STOPPED
        self._orchestrations.pop(orch.id, None)
        self._ops.update_status()
        self.logger.info("orchestration stopped", **ids(orch.id))
        return errors

    async def _quietly(self, hook: Callable[[], Awaitable[None]], owner: type) -> dict[str, str]:
        """Await a user shutdown hook; an error is logged and returned, never raised."""
        try:
            await hook()
        except Exception as exc:
            self.logger.error("%s.shutdown() raised %r", owner.__name__, exc, exc_info=exc, **ids())
            return {import_path(owner): repr(exc)}
        return {}

    # --- shutdown ----------------------------------------------------------------------------

    async def shutdown(self) -> ShutdownResult:
        """Stop everything in order and close the store; idempotent, safe from any task."""
        if self.state is not GruState.RUNNING:
            await self.wait_closed()
            assert self._shutdown_result is not None
            return self._shutdown_result
        self.state = GruState.SHUTTING_DOWN
        self.logger.info("gru shutting down (grace %.1fs)", self.config.grace_period_s, **ids())
        self._ops.begin_stop()
        cancelled = 0
        errors: dict[str, str] = {}
        try:
            async with self._lock:
                cancelled, errors = await self._stop_all(list(self._orchestrations.values()))
                errors |= await self._close_store()
        except Exception as exc:
            self.logger.error("shutdown failed: %r", exc, exc_info=exc, **ids())
            errors["minions.runtime.gru:Gru"] = repr(exc)
        finally:
            errors |= await self._ops.stop()
            await self._finish_shutdown()
            self._shutdown_result = ShutdownResult(not errors, errors, cancelled)
            self.logger.info(
                "gru stopped (%d workflows cancelled, %d errors)", cancelled, len(errors), **ids()
            )
            self._close_logger()
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

    def _close_logger(self) -> None:
        if self._default_logger is not None:
            self._default_logger.close()
            self._default_logger = None

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
            self._grace_cut.set()

    async def _shutdown_then_exit(self) -> None:
        """A signal's shutdown; then the process ends unless the app waits (see signals.py)."""
        result = await self.shutdown()
        end_process_unless_awaited(result, self._closed_waiters > 0, self.logger)

    def _track(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- hooks for resources and the memory monitor ------------------------------------------

    def pause_pipelines(self) -> None:
        """Stop asking pipelines for events (in-flight workflows continue). Called on the loop by
        the memory monitor at HIGH pressure; :meth:`resume_pipelines` undoes it."""
        self._paused = True
        for slot in self._pipelines.values():
            slot.runner.pause()

    def resume_pipelines(self) -> None:
        self._paused = False
        for slot in self._pipelines.values():
            slot.runner.resume()

    def apply_memory_level(self, level: MemoryLevel) -> None:
        """Memory monitor hook, called on each level change: HIGH and above pause pipelines."""
        if level >= MemoryLevel.HIGH:
            self.pause_pipelines()
        else:
            self.resume_pipelines()

    def resource_failed(self, resource: Resource, error: BaseException) -> None:
        """Report that a running resource broke for good: every orchestration that depends on it
        is stopped (in a tracked task); orchestrations that do not are untouched."""
        cls = self._graph.mark_failed(resource, error)
        if cls is None or self.state is not GruState.RUNNING:
            return
        self.logger.error("resource %s failed: %r", cls.__name__, error, exc_info=error, **ids())
        dependents = [oid for oid, r in self._orchestrations.items() if cls in r.plan]
        for oid in dependents:
            self._track(self.stop_orchestration(oid))

    # --- status ------------------------------------------------------------------------------

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is bound to (the real one with ``metrics_port=0``); ``None``
        when metrics are off, the port could not be bound, or Gru has shut down."""
        return self._ops.metrics.port if self._ops.metrics is not None else None

    def live_resources(self) -> list[Resource]:
        """Every running resource instance, in start order (the control endpoint finds pools
        here for ``minions status`` and ``minions pools restart``)."""
        return [instance for _, instance, _, _ in self._graph.snapshot()]

    @property
    def memory_monitor(self) -> MemoryMonitor:
        """Gru's one monitor: subscribe to it, or read its ``level`` and ``last_sample``."""
        return self._ops.monitor

    def status(self) -> GruStatus:
        """Snapshot: orchestrations with in-flight counts, resources (pools with workers alive),
        memory level and the metrics URL."""
        return GruStatus(
            state=self.state,
            orchestrations=tuple(r.orchestration.status() for r in self._orchestrations.values()),
            resources=tuple(resource_status(*row) for row in self._graph.snapshot()),
            pipelines_paused=self._paused,
            durable=self._store is not None,
            memory_level=self._ops.monitor.level,
            metrics_url=self._ops.metrics_url,
        )
