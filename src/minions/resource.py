"""``Resource``: a long-lived shared component with an async lifecycle.

Gru creates one instance per resource class, injects it into every minion, pipeline and
resource that names it in a class annotation, starts resources in dependency order and stops
them in reverse. A resource is also usable on its own as an async context manager.

Under Gru, every public ``async def`` method of a resource is timed and counted
(``minions_resource_calls_total``, ``minions_resource_call_duration_seconds``); mark one
``@Resource.untracked`` to leave it out (a method called in a tight loop, say). Worker pools keep
their own, richer call metrics and are not wrapped.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar, overload

from minions._tasks import TaskOwner

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

UNTRACKED = "__minions_untracked__"


class Resource(TaskOwner):
    """Base class of shared components (worker pools, clients, caches)."""

    async def startup(self) -> None:
        """Acquire what the resource needs; raising here fails the orchestration's start."""

    async def shutdown(self) -> None:
        """Release everything acquired in :meth:`startup`; must be safe to call once after it."""

    async def __aenter__(self) -> Self:
        await self.startup()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @overload
    @staticmethod
    def untracked(func: F, /) -> F: ...

    @overload
    @staticmethod
    def untracked() -> Callable[[F], F]: ...

    @staticmethod
    def untracked(func: F | None = None, /) -> F | Callable[[F], F]:
        """Decorator (``@Resource.untracked`` or ``@Resource.untracked()``): do not time or
        count calls of this async method."""

        def mark(fn: F) -> F:
            target: Any = fn  # inspect's TypeGuard would narrow ``fn`` itself
            if not inspect.iscoroutinefunction(target):
                raise TypeError(
                    f"@Resource.untracked marks async methods; {fn.__qualname__} is not async"
                )
            setattr(fn, UNTRACKED, True)
            setattr(fn, "__untracked__", True)  # the established marker  # noqa: B010
            return fn

        return mark(func) if func is not None else mark
