"""``Resource``: a long-lived shared component with an async lifecycle.

Gru creates one instance per resource class, injects it into every minion, pipeline and
resource that names it in a class annotation, starts resources in dependency order and stops
them in reverse. A resource is also usable on its own as an async context manager.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Resource:
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
