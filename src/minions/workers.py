"""Public API of the isolation boundary: pools on the parent side, services on the worker side.

``WorkerPool`` lives in Gru (or any asyncio program); ``WorkerService`` subclasses run only in
worker processes. ``Caller`` (what ``pool.options(...)`` returns) and ``ResultStream`` (what
``pool.map(...)`` returns) are exported for annotations. Everything else under ``minions.pool``
and ``minions.ipc`` is internal.

Service modules import this module too (``from minions.workers import WorkerService, expose``)
and they are imported by every worker and by the zygote: so only the worker-side names are
imported eagerly, and the parent's side (the pool, psutil, Prometheus, asyncio) when first used
(PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minions.ipc.service import Buffer, WorkerService, expose

if TYPE_CHECKING:
    from minions.ops.levels import MemoryLevel
    from minions.pool.calling import Caller
    from minions.pool.config import PoolConfig
    from minions.pool.mapping import ResultStream
    from minions.pool.pool import PoolSnapshot, WorkerPool
    from minions.pool.states import Circuit, PoolState

_HOME = {
    "Caller": "minions.pool.calling",
    "Circuit": "minions.pool.states",
    "MemoryLevel": "minions.ops.levels",
    "PoolConfig": "minions.pool.config",
    "PoolSnapshot": "minions.pool.pool",
    "PoolState": "minions.pool.states",
    "ResultStream": "minions.pool.mapping",
    "WorkerPool": "minions.pool.pool",
}

__all__ = [
    "Buffer",
    "Caller",
    "Circuit",
    "MemoryLevel",
    "PoolConfig",
    "PoolSnapshot",
    "PoolState",
    "ResultStream",
    "WorkerPool",
    "WorkerService",
    "expose",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'minions.workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
