"""The orchestrations Gru runs, with the pipelines and resources they hold.

Design note. Starting an orchestration acquires, in order, its resources (the
:class:`ResourceGraph` counts them), its pipeline (the :class:`PipelineSet` counts holders), its
minion (one per orchestration, with its config bound), then resumes its saved workflows; any
failure undoes exactly what this start took and becomes a ``StartResult`` reason. Stopping
drains every stopping orchestration under one grace period, then tears each down in reverse:
minion, pipeline, resources, each component's shutdown hook first and its own
``safe_create_task`` tasks after. Gru serializes all of it with one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from minions._tasks import TaskFailureHook, cancel_tasks, supervise_tasks
from minions.exceptions import TaskCancellationTimeoutError
from minions.resource import Resource
from minions.runtime import telemetry
from minions.runtime.composition import Composition
from minions.runtime.config import GruConfig
from minions.runtime.console import Failures
from minions.runtime.identity import component_identity, import_path
from minions.runtime.log import ids
from minions.runtime.minion_config import ConfigError, check_loaded
from minions.runtime.orchestration import Orchestration
from minions.runtime.pipeline import Pipeline, PipelineRunner, PipelineSet
from minions.runtime.resources import ResourceGraph, ResourceStartError
from minions.runtime.results import OrchestrationState
from minions.runtime.snapshot import GruRuntimeStateSnapshot, build_snapshot
from minions.runtime.store_contract import StateStore
from minions.runtime.telemetry import RuntimeMetrics

_TASK_GRACE_S = 5.0
_RESOURCE_SHARE_S = 7.0  # of Gru's stop deadline, left for resources after the steps' grace:
# a worker pool's polite stop, SIGTERM and SIGKILL steps of 2 s each, and their reaping


class StartFailed(Exception):
    """One start phase failed; ``str()`` is the StartResult reason, the cause is chained."""


@dataclass(slots=True)
class Running:
    orchestration: Orchestration
    plan: list[type[Resource]]
    runner: PipelineRunner
    instance_id: str


class OrchestrationSet:
    """Owns the running orchestrations; see the module note. Called under Gru's lock."""

    def __init__(
        self,
        config: GruConfig,
        store: StateStore | None,
        failures: Failures,
        metrics: RuntimeMetrics,
        prepare_resource: Callable[[Resource], None],
        task_failed: TaskFailureHook,
        changed: Callable[[], None],
    ) -> None:
        self._config = config
        self._store = store
        self._failures = failures
        self._metrics = metrics
        self._task_failed = task_failed
        self._changed = changed
        self.graph = ResourceGraph(prepare_resource, metrics)
        self.pipelines = PipelineSet()
        self.running: dict[str, Running] = {}
        self.grace_cut = asyncio.Event()

    async def start(self, comp: Composition, plan: list[type[Resource]], bound: int) -> int:
        """Acquire resources, pipeline and minion, then resume; undo everything on failure."""
        async with contextlib.AsyncExitStack() as undo:
            try:
                await self.graph.acquire(plan)
            except ResourceStartError as exc:
                raise StartFailed(str(exc)) from exc.error
            undo.push_async_callback(self.graph.release, plan)
            runner = await self._acquire_pipeline(comp)
            undo.push_async_callback(self._release_pipeline, comp.pipeline_cls)
            minion = await self._start_minion(comp)
            undo.push_async_callback(self._stop_component, minion, comp.minion_cls)
            orch = Orchestration(
                comp, minion, self._store, self._failures, self._metrics, bound,
                self._config.persistence,
            )  # fmt: skip
            try:
                resumed = await orch.resume()
            except Exception as exc:
                raise StartFailed(f"could not load saved workflows: {exc!r}") from exc
            undo.pop_all()
        orch.state = OrchestrationState.RUNNING
        self.running[orch.id] = Running(orch, plan, runner, uuid.uuid4().hex)
        runner.subscribe(orch)
        self._metrics.child(
            telemetry.ORCHESTRATION_INFO, orchestration=orch.id,
            minion=component_identity(comp.minion_cls),
            pipeline=comp.pipeline_cls.__name__, config=comp.config_label,
        ).set(1)  # fmt: skip
        self._changed()
        self._failures.logger.info(
            "orchestration started: %s -> %s (resumed %d)", import_path(comp.pipeline_cls),
            import_path(comp.minion_cls), resumed, **ids(orch.id),
        )  # fmt: skip
        return resumed

    async def _start_minion(self, comp: Composition) -> Any:
        name = comp.minion_cls.__name__
        try:
            minion = comp.minion_cls(comp.config)
            self.graph.inject(minion)
            supervise_tasks(minion, self._task_failed)
            if comp.config_file is not None and comp.config is None:  # the minion's load_config
                minion.config = check_loaded(
                    await minion.load_config(str(comp.config_file.path)), comp.minion_cls
                )
            await minion.startup()
        except ConfigError as exc:
            raise StartFailed(str(exc)) from exc
        except Exception as exc:
            raise StartFailed(f"minion {name} failed to start: {exc!r}") from exc
        return minion

    async def _acquire_pipeline(self, comp: Composition) -> PipelineRunner:
        runner = self.pipelines.hold(comp.pipeline_cls)
        if runner is not None:
            return runner
        name = comp.pipeline_cls.__name__
        try:
            pipeline = comp.pipeline_cls()
            self.graph.inject(pipeline)
            supervise_tasks(pipeline, self._task_failed)
            await pipeline.startup()
        except Exception as exc:
            raise StartFailed(f"pipeline {name} failed to start: {exc!r}") from exc
        runner = PipelineRunner(
            pipeline, comp.event_type, name, self._failures, self._metrics,
            self._config.pipeline_retry_s,
        )  # fmt: skip
        self.pipelines.add(comp.pipeline_cls, runner)
        return runner

    async def _release_pipeline(self, pipeline_cls: type) -> dict[str, str]:
        errors: dict[str, str] = {}

        async def stop(pipeline: Pipeline[Any]) -> None:
            errors.update(await self._stop_component(pipeline, pipeline_cls))

        await self.pipelines.release(pipeline_cls, stop)
        return errors

    async def stop(
        self, stopping: list[Running], deadline: float | None = None
    ) -> tuple[int, dict[str, str]]:
        """Drain ``stopping`` together under one grace period, then tear each down.

        With a ``deadline`` (Gru's shutdown) the grace also ends early enough to leave the
        resources their share of it (``_RESOURCE_SHARE_S``, or 40% of a shorter budget)."""
        for running in stopping:
            running.runner.unsubscribe(running.orchestration)
            running.orchestration.begin_drain()
        for running in stopping:
            if running.runner.subscriber_count == 0:
                await running.runner.stop()
        drain_by = time.monotonic() + self._config.grace_period_s
        if deadline is not None:
            share = min(_RESOURCE_SHARE_S, 0.4 * max(0.0, deadline - time.monotonic()))
            drain_by = min(drain_by, deadline - share)
        await self._wait_drained((t for r in stopping for t in r.orchestration.tasks), drain_by)
        cancelled = 0
        errors: dict[str, str] = {}
        for running in reversed(stopping):
            cancelled += await running.orchestration.cancel_remaining()
            errors |= await self._teardown(running)
        return cancelled, errors

    async def _wait_drained(self, tasks: Iterable[asyncio.Task[None]], deadline: float) -> None:
        """Wait for ``tasks`` until ``deadline`` or a second signal cuts the grace short."""
        pending: set[asyncio.Future[Any]] = set(tasks)
        if not pending:
            return
        cut = asyncio.ensure_future(self.grace_cut.wait())
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

    async def _teardown(self, running: Running) -> dict[str, str]:
        orch = running.orchestration
        errors = await self._stop_component(orch.minion, orch.composition.minion_cls)
        errors |= await self._release_pipeline(orch.composition.pipeline_cls)
        for name, exc in (await self.graph.release(running.plan)).items():
            errors[name] = repr(exc)
            self._failures(
                ("resource-shutdown", name), f"resource shutdown failed: {name}: {exc!r}", exc,
                extra=ids(orch.id)["extra"],
            )  # fmt: skip
        orch.state = OrchestrationState.STOPPED
        self.running.pop(orch.id, None)
        self._changed()
        self._failures.logger.info("orchestration stopped", **ids(orch.id))
        return errors

    async def _stop_component(self, component: Any, owner: type) -> dict[str, str]:
        """Run a component's shutdown hook, then cancel the tasks it still owns. A failing hook
        or a task that ignores cancellation is reported and returned, never raised."""
        errors: dict[str, str] = {}
        try:
            await component.shutdown()
        except Exception as exc:
            self._failures(
                ("shutdown-hook", import_path(owner), type(exc).__name__),
                f"{owner.__name__}.shutdown() raised {exc!r}", exc,
            )  # fmt: skip
            errors[import_path(owner)] = repr(exc)
        for name in await cancel_tasks(component, _TASK_GRACE_S):
            stuck = TaskCancellationTimeoutError(name, _TASK_GRACE_S)
            self._failures(("task-stuck", import_path(owner)), f"{owner.__name__}: {stuck}")
            errors[f"{import_path(owner)}:{name}"] = repr(stuck)
        return errors

    def snapshot(self) -> GruRuntimeStateSnapshot:
        rows = [
            (oid, r.instance_id, r.orchestration.composition.minion_cls,
             r.orchestration.composition.pipeline_cls)
            for oid, r in self.running.items()
        ]  # fmt: skip
        pipelines = [cls for cls, _ in self.pipelines.items()]
        return build_snapshot(rows, pipelines, self.graph.dependencies())
