"""How a pool follows memory pressure: which monitor it listens to and what each level allows.

A pool under Gru follows Gru's shared :class:`~minions.ops.memory.MemoryMonitor`; a standalone
pool with ``memory = MemoryThresholds(...)`` runs its own. Either way the monitor measures the
pool's workers and calls :meth:`WorkerPool.apply_memory_level` once per level change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemorySample

if TYPE_CHECKING:
    from minions.pool.pool import WorkerPool

log = logging.getLogger("minions.pool")

_UNLIMITED = 1 << 30


class MemoryPressure:
    """The current level of one pool and the monitor it follows."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.level = MemoryLevel.NORMAL
        self._monitor: MemoryMonitor | None = None
        self._owned = False
        self._undo: list[Callable[[], None]] = []

    def attach(self, monitor: MemoryMonitor) -> None:
        if self.pool.config.memory is not None:
            log.warning(
                "pool %s: its own memory thresholds are ignored; it follows Gru's monitor",
                self.pool.name,
            )
        self._monitor, self._owned = monitor, False

    def throttle(self) -> tuple[int, int]:
        """(calls per worker, calls in flight) allowed now: HIGH halves the pool's concurrency
        and stops pipelining, CRITICAL lets one call through at a time (new calls are shed)."""
        if self.level is MemoryLevel.NORMAL:
            return self.pool.config.pipeline_depth, _UNLIMITED
        if self.level is MemoryLevel.HIGH:
            return 1, max(1, self.pool.config.workers // 2)
        return 1, 1

    def hook(self) -> None:
        """Start following the monitor (creating an own one for a standalone pool)."""
        pool = self.pool
        if self._monitor is None and pool.config.memory is not None:
            self._monitor, self._owned = MemoryMonitor(pool.config.memory), True
        monitor = self._monitor
        if monitor is None:
            return
        try:
            unwatch = monitor.watch_workers(pool.name, pool.worker_pids)
        except ValueError:  # two pools of one name on one monitor
            unwatch = monitor.watch_workers(f"{pool.name}#{id(pool):x}", pool.worker_pids)

        def follow(level: MemoryLevel, _sample: MemorySample) -> None:
            pool.apply_memory_level(level)

        self._undo = [unwatch, monitor.subscribe(follow)]
        if self._owned:
            monitor.start()
        pool.apply_memory_level(monitor.level)

    async def unhook(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []
        if self._owned and self._monitor is not None:
            await self._monitor.stop()
