"""How a pool follows memory pressure: which monitor it listens to and what each level allows.

A pool under Gru follows Gru's shared :class:`~minions.ops.memory.MemoryMonitor`; a standalone
pool with ``memory = MemoryThresholds(...)`` runs its own. Either way the monitor measures the
pool's workers (``pids()``) once per sample and hands the figures to ``on_rss`` (so the pool
never measures them again), and ``on_level`` runs once per level change; what a level allows is
the pure :func:`throttle`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from minions.ops.levels import MemoryLevel
from minions.ops.memory import MemoryMonitor, MemorySample
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Throttle

log = logging.getLogger("minions.pool")


def throttle(level: MemoryLevel, config: PoolConfig) -> Throttle:
    """What a level allows: NORMAL pipelines freely, HIGH halves the pool's concurrency and stops
    pipelining, CRITICAL lets one call through at a time (and new calls are shed)."""
    if level is MemoryLevel.NORMAL:
        return Throttle(config.pipeline_depth)
    if level is MemoryLevel.HIGH:
        return Throttle(1, max(1, config.workers // 2))
    return Throttle(1, 1, shed=True)


class MemoryPressure:
    """The current level of one pool and the monitor it follows."""

    def __init__(
        self,
        config: PoolConfig,
        name: str,
        pids: Callable[[], list[int]],
        on_level: Callable[[MemoryLevel], None],
        on_rss: Callable[[Mapping[int, int]], None],
    ) -> None:
        self.config = config
        self.name = name
        self.level = MemoryLevel.NORMAL
        self._pids = pids
        self._on_level = on_level
        self._on_rss = on_rss
        self._monitor: MemoryMonitor | None = None
        self._owned = False
        self._undo: list[Callable[[], None]] = []

    def attach(self, monitor: MemoryMonitor) -> None:
        if self.config.memory is not None:
            log.warning(
                "pool %s: its own memory thresholds are ignored; it follows Gru's monitor",
                self.name,
            )
        self._monitor, self._owned = monitor, False

    def hook(self) -> None:
        """Start following the monitor (creating an own one for a standalone pool)."""
        if self._monitor is None and self.config.memory is not None:
            self._monitor, self._owned = MemoryMonitor(self.config.memory), True
        monitor = self._monitor
        if monitor is None:
            return
        key = self.name
        try:
            unwatch = monitor.watch_workers(key, self._pids)
        except ValueError:  # two pools of one name on one monitor
            key = f"{self.name}#{id(self):x}"
            unwatch = monitor.watch_workers(key, self._pids)

        def follow(level: MemoryLevel, sample: MemorySample) -> None:
            self._on_rss(sample.workers.get(key, {}))  # the figures this level was decided on
            self._on_level(level)

        def measured(sample: MemorySample) -> None:
            self._on_rss(sample.workers.get(key, {}))

        self._undo = [unwatch, monitor.subscribe(follow), monitor.on_sample(measured)]
        if self._owned:
            monitor.start()
        self._on_level(monitor.level)

    @property
    def measures_workers(self) -> bool:
        """Whether a monitor measures this pool's workers (else the pool does, for
        ``max_rss_mb``)."""
        return self._monitor is not None

    async def unhook(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []
        if self._owned and self._monitor is not None:
            await self._monitor.stop()
