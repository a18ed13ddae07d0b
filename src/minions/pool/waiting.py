"""Waiting for a condition on state that changes on the event loop (pool or host state)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(changed: asyncio.Event, predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``predicate()`` holds, re-checking each time ``changed`` is set (whoever
    changes the state sets it); ``False`` if ``timeout`` ran out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            return predicate()
    return True
