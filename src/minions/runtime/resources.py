"""The resource injection graph: one shared, refcounted instance per ``Resource`` class.

A component (minion, pipeline or resource) asks for a resource by annotating a class attribute
with its class (``native: NativePool``). :meth:`ResourceGraph.plan` walks those annotations
transitively and orders the classes so dependencies come first (a cycle is a
:class:`CompositionError` naming it). Each orchestration acquires its whole plan: a resource
starts on its first reference and shuts down, in reverse order, when its last one is released.
Gru serializes acquire/release, so the graph needs no locking of its own. ``prepare`` sees each
new instance after its constructor and before its ``startup()``: Gru uses it to attach its memory
monitor to worker pools, which must happen before they start.
"""

from __future__ import annotations

import asyncio
import enum
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minions._tasks import cancel_tasks
from minions.exceptions import TaskCancellationTimeoutError
from minions.resource import Resource
from minions.runtime import telemetry
from minions.runtime.composition import CompositionError
from minions.runtime.identity import import_path
from minions.runtime.telemetry import RuntimeMetrics

_TASK_GRACE_S = 5.0


class ResourceState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"


class ResourceStartError(Exception):
    """A resource's constructor or ``startup()`` raised; what was started for it is rolled back."""

    def __init__(self, resource: type, error: BaseException) -> None:
        self.resource = resource
        self.error = error
        super().__init__(f"resource {resource.__name__} failed to start: {error!r}")


@dataclass(slots=True)
class _Entry:
    instance: Resource
    refs: int = 0
    state: ResourceState = ResourceState.STARTING
    error: BaseException | None = None
    deps: dict[str, type[Resource]] = field(default_factory=dict)


def resource_hints(cls: type) -> dict[str, type[Resource]]:
    """Attribute name -> Resource class for every resource annotation on ``cls``."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise CompositionError(f"cannot resolve the annotations of {cls.__name__}: {exc}") from exc
    return {
        name: tp
        for name, tp in hints.items()
        if isinstance(tp, type) and issubclass(tp, Resource) and tp is not Resource
    }


class ResourceGraph:
    """Owns every resource instance Gru created; see the module docstring for the contract."""

    def __init__(
        self,
        prepare: Callable[[Resource], None] | None = None,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self._entries: dict[type[Resource], _Entry] = {}
        self._metrics = metrics or RuntimeMetrics(telemetry.NoOpMetrics(), lambda _m, _e: None)
        self._prepare = prepare

    def _count_error(self, cls: type, phase: str) -> None:
        self._metrics.child(telemetry.RESOURCE_ERRORS, resource=cls.__name__, phase=phase).inc()

    def plan(self, owners: Iterable[type]) -> list[type[Resource]]:
        """Resource classes ``owners`` need, transitively, dependencies before dependents."""
        order: list[type[Resource]] = []
        done: set[type] = set()

        def visit(cls: type[Resource], path: tuple[type, ...]) -> None:
            if cls in done:
                return
            if cls in path:
                cycle = " -> ".join(c.__name__ for c in (*path[path.index(cls) :], cls))
                raise CompositionError(f"resource dependency cycle: {cycle}")
            for dep in resource_hints(cls).values():
                visit(dep, (*path, cls))
            done.add(cls)
            order.append(cls)

        for owner in owners:
            for dep in resource_hints(owner).values():
                visit(dep, (owner,) if issubclass(owner, Resource) else ())
        return order

    async def acquire(self, plan: Sequence[type[Resource]]) -> None:
        """Take one reference on each class of ``plan``, starting new ones in order.

        On failure every reference taken here is released again (started resources are shut
        down in reverse) and :class:`ResourceStartError` is raised.
        """
        taken: list[type[Resource]] = []
        try:
            for cls in plan:
                await self._acquire_one(cls)
                taken.append(cls)
        except ResourceStartError:
            await self.release(taken)
            raise

    async def _acquire_one(self, cls: type[Resource]) -> None:
        entry = self._entries.get(cls)
        if entry is not None:
            entry.refs += 1
            return
        try:
            instance = cls()
            entry = _Entry(instance=instance, deps=resource_hints(cls))
            self.inject(instance)
            if self._prepare is not None:
                self._prepare(instance)
            await instance.startup()
        except Exception as exc:
            self._count_error(cls, "startup")
            raise ResourceStartError(cls, exc) from exc
        entry.refs = 1
        entry.state = ResourceState.RUNNING
        self._entries[cls] = entry

    async def release(self, plan: Sequence[type[Resource]]) -> dict[str, BaseException]:
        """Drop one reference per class and shut down those left unused: concurrently, except
        that a resource stops only after every unused resource that depends on it has (so two
        worker pools stop side by side, within Gru's one stop deadline).

        Returns shutdown errors by resource import path; a failing shutdown never stops the
        others from running.
        """
        unused: list[tuple[type[Resource], _Entry]] = []
        for cls in reversed(plan):  # dependents before their dependencies
            entry = self._entries.get(cls)
            if entry is None:
                continue
            entry.refs -= 1
            if entry.refs <= 0:
                del self._entries[cls]
                unused.append((cls, entry))
        errors: dict[str, BaseException] = {}
        stops: dict[type[Resource], asyncio.Task[None]] = {}
        for cls, entry in unused:
            after = [stops[c] for c, e in unused if c in stops and cls in e.deps.values()]
            stops[cls] = asyncio.ensure_future(self._stop(cls, entry, after, errors))
        await asyncio.gather(*stops.values())
        return errors

    async def _stop(
        self,
        cls: type[Resource],
        entry: _Entry,
        after: list[asyncio.Task[None]],
        errors: dict[str, BaseException],
    ) -> None:
        await asyncio.gather(*after)
        try:
            await entry.instance.shutdown()
        except Exception as exc:
            self._count_error(cls, "shutdown")
            errors[import_path(cls)] = exc
        for name in await cancel_tasks(entry.instance, _TASK_GRACE_S):
            errors[f"{import_path(cls)}:{name}"] = TaskCancellationTimeoutError(name, _TASK_GRACE_S)
        entry.state = ResourceState.STOPPED

    def inject(self, target: object) -> None:
        """Set each resource-annotated attribute of ``target`` to the shared running instance."""
        for name, cls in resource_hints(type(target)).items():
            setattr(target, name, self._entries[cls].instance)

    def mark_failed(self, instance: Resource, error: BaseException) -> type[Resource] | None:
        """Record a runtime failure of ``instance``; returns its class if Gru owns it."""
        for cls, entry in self._entries.items():
            if entry.instance is instance:
                entry.state = ResourceState.FAILED
                entry.error = error
                self._count_error(cls, "runtime")
                return cls
        return None

    def snapshot(self) -> list[tuple[type[Resource], Resource, int, ResourceState]]:
        """(class, instance, refcount, state) of every live resource, in start order."""
        return [(cls, e.instance, e.refs, e.state) for cls, e in self._entries.items()]

    def dependencies(self) -> dict[type[Resource], tuple[type[Resource], ...]]:
        """The resources each live resource was injected with."""
        return {cls: tuple(e.deps.values()) for cls, e in self._entries.items()}

    def instance_of(self, cls: type[Resource]) -> Any:
        return self._entries[cls].instance
