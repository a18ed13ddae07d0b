"""Public API of the isolation boundary: pools on the parent side, services on the worker side.

``WorkerPool`` lives in Gru (or any asyncio program); ``WorkerService`` subclasses run only in
worker processes. ``Caller`` (what ``pool.options(...)`` returns) and ``ResultStream`` (what
``pool.map(...)`` returns) are exported for annotations. Everything else under ``minions.pool``
and ``minions.ipc`` is internal.
"""

from minions.ipc.service import Buffer, WorkerService, expose
from minions.ops.levels import MemoryLevel
from minions.pool.calling import Caller
from minions.pool.config import PoolConfig
from minions.pool.mapping import ResultStream
from minions.pool.pool import PoolSnapshot, WorkerPool
from minions.pool.states import Circuit, PoolState

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
