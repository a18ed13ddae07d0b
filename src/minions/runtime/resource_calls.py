"""Per-method call metrics of the resources Gru runs (and ``@Resource.untracked``).

Gru wraps each public ``async def`` of a resource's class on the instance it created, before
``startup()``: a call that returns is timed and counted ``ok``, one that raises is counted
``error`` and re-raised untouched; cancellation is not counted. The metric children are bound
once per method, so the wrapper costs one coroutine frame and two clock reads per call. The
resource's own ``startup``/``shutdown`` and methods marked untracked are left alone.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import Any

from minions.resource import UNTRACKED, Resource
from minions.runtime import telemetry
from minions.runtime.telemetry import RuntimeMetrics

_LIFECYCLE = frozenset(name for name in dir(Resource) if not name.startswith("_"))


def tracked_methods(cls: type) -> list[str]:
    """Names of the public async methods of ``cls`` that Gru times."""
    names = []
    for name in dir(cls):
        if name.startswith("_") or name in _LIFECYCLE:
            continue
        raw = inspect.getattr_static(cls, name)
        func = getattr(raw, "__func__", raw)  # staticmethod / classmethod
        if inspect.iscoroutinefunction(func) and not getattr(func, UNTRACKED, False):
            names.append(name)
    return names


def track_calls(resource: Resource, metrics: RuntimeMetrics) -> None:
    """Replace each tracked method on ``resource`` by its timed wrapper."""
    label = type(resource).__name__
    for name in tracked_methods(type(resource)):
        ok = metrics.child(telemetry.RESOURCE_CALLS, resource=label, method=name, outcome="ok")
        error = metrics.child(
            telemetry.RESOURCE_CALLS, resource=label, method=name, outcome="error"
        )
        seconds = metrics.child(telemetry.RESOURCE_SECONDS, resource=label, method=name)
        setattr(resource, name, _timed(getattr(resource, name), ok, error, seconds))


def _timed(
    method: Callable[..., Coroutine[Any, Any, Any]], ok: Any, error: Any, seconds: Any
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await method(*args, **kwargs)
        except Exception:
            error.inc()
            raise
        seconds.observe(time.perf_counter() - started)
        ok.inc()
        return result

    return call
