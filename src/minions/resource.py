"""``Resource``: a long-lived shared component with an async lifecycle.

Gru creates one instance per resource class, injects it into every minion, pipeline and
resource that names it in a class annotation, starts resources in dependency order and stops
them in reverse. A resource is also usable on its own as an async context manager.

Under Gru, every public ``async def`` method of a resource is timed and counted
(``minions_resource_calls_total``, ``minions_resource_call_duration_seconds``); mark one
``@Resource.untracked`` to leave it out (a method called in a tight loop, say). Worker pools keep
their own, richer call metrics and are not wrapped.

When Gru stops, it gives the whole stop one monotonic deadline (``stop_timeout_s``) and stops
independent resources concurrently; a resource whose ``shutdown()`` may take long reads
:func:`stop_deadline` and keeps to it (worker pools do).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Self, TypeVar, overload

from minions._tasks import TaskOwner

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

UNTRACKED = "__minions_untracked__"

_stop_by: ContextVar[float | None] = ContextVar("minions_stop_by", default=None)


def stop_deadline() -> float | None:
    """The ``time.monotonic()`` by which a resource's ``shutdown()`` must be done while Gru
    stops under its one budget; ``None`` outside such a stop (a standalone ``async with``)."""
    return _stop_by.get()


@contextlib.contextmanager
def stopping_by(deadline: float) -> Iterator[None]:
    """Within this block (and the tasks it creates), :func:`stop_deadline` is ``deadline``."""
    token = _stop_by.set(deadline)
    try:
        yield
    finally:
        _stop_by.reset(token)


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
