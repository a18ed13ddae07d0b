"""The memory monitor: samples memory on Gru's loop, decides a level, and tells pools and Gru.

Design note. Memory is guarded at two layers. systemd/the kernel enforce ``MemoryHigh`` and
``MemoryMax`` on the unit's cgroup: the last safety net, and a blunt one (throttling, then an OOM
kill). This monitor is the first layer: it sees pressure coming and turns it into a
:class:`~minions.ops.levels.MemoryLevel` that pools and Gru act on (HIGH: throttle dispatch and
pause pipelines; CRITICAL: shed new calls and recycle the largest workers) *before* the kernel has
to.

Three modules, three ideas: :mod:`minions.ops.sampling` measures (Gru, workers, host, cgroup),
:mod:`minions.ops.thresholds` decides (the pure level policy with hysteresis), and this module
only schedules the two on the loop and notifies: :meth:`MemoryMonitor.subscribe` once per level
change, :meth:`MemoryMonitor.on_sample` after every sample. ``MemoryThresholds`` and
``MemorySample`` are re-exported here, where pools and Gru import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from minions.ops import metrics
from minions.ops.cgroup import CGROUP_ROOT, PROC_SELF_CGROUP
from minions.ops.levels import MemoryLevel
from minions.ops.sampling import MemorySample, ProcessProbe, WorkerProbe, export_sample
from minions.ops.thresholds import LevelTracker, MemoryThresholds

log = logging.getLogger(__name__)

MiB = 1 << 20

Subscriber = Callable[[MemoryLevel, MemorySample], None]
SampleHook = Callable[[MemorySample], None]


class MemoryMonitor:
    """Samples memory every ``interval_s`` on the event loop and announces level changes.

    Pools register their workers with :meth:`watch_workers`; pools and Gru react to levels via
    :meth:`subscribe` (called once per transition, on the loop, with the sample that caused it),
    :attr:`level`, or :meth:`wait_level_below`. Each transition is logged once and exported as
    ``minions_memory_pressure_level`` and ``minions_memory_pressure_transitions_total``.
    """

    def __init__(
        self,
        thresholds: MemoryThresholds | None = None,
        *,
        interval_s: float = 0.5,
        proc_cgroup: Path = PROC_SELF_CGROUP,
        cgroup_root: Path = CGROUP_ROOT,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.thresholds = thresholds if thresholds is not None else MemoryThresholds()
        self.interval_s = interval_s
        self._probe = ProcessProbe(proc_cgroup, cgroup_root)
        self._workers = WorkerProbe()
        self._tracker = LevelTracker(self.thresholds.hysteresis)
        self._subscribers: list[Subscriber] = []
        self._sample_hooks: list[SampleHook] = []
        self._failing_hooks: set[int] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None
        self.last_sample: MemorySample | None = None

    @property
    def level(self) -> MemoryLevel:
        return self._tracker.level

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(level, sample)`` on every transition; returns the unsubscribe function.

        Callbacks run on the monitor's loop and should only flip state (a flag, an Event); one
        that raises is logged and the others still run.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def on_sample(self, callback: SampleHook) -> Callable[[], None]:
        """Call ``callback(sample)`` after every poll; returns the unsubscribe function.

        Runs on the monitor's loop once per ``interval_s`` (and on every forced :meth:`poll`),
        after the level decision, so a pool reading ``sample.workers[name]`` sees the same
        figures the level was decided on. Keep it cheap; one that raises is logged once (until
        it succeeds again) and the others still run.
        """
        self._sample_hooks.append(callback)

        def unsubscribe() -> None:
            if callback in self._sample_hooks:
                self._sample_hooks.remove(callback)

        return unsubscribe

    def watch_workers(self, pool: str, pids: Callable[[], Iterable[int]]) -> Callable[[], None]:
        """Include the RSS of ``pids()`` (asked each sample) under ``pool``; returns the unwatch
        function. The figures reach the pool through :meth:`on_sample` (``sample.workers[pool]``
        is ``{pid: rss}``), so each worker is measured once per interval, here."""
        sources = self._workers.sources
        if pool in sources:
            raise ValueError(f"pool {pool!r} is already watched by this memory monitor")
        sources[pool] = pids

        def unwatch() -> None:
            if sources.get(pool) is pids:
                del sources[pool]

        return unwatch

    def start(self) -> None:
        """Take a first sample now (so the level is known before any dispatch), then keep sampling
        on the running loop."""
        if self._task is not None:
            return
        metrics.MEMORY_LEVEL.set(int(self.level))
        self._poll_guarded()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="minions-memory")

    async def stop(self) -> None:
        """Stop sampling; waiters on :meth:`wait_level_below` are released."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake_waiters()

    async def wait_level_below(self, level: MemoryLevel) -> None:
        """Return once the level is below ``level`` (e.g. a paused pipeline waits for
        ``HIGH``), or once the monitor stops."""
        while self.level >= level and self.running:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def sample(self) -> MemorySample:
        """Measure now, without deciding a level."""
        return self._probe.read(self._workers.read())

    def poll(self) -> MemorySample:
        """One tick: measure, export, decide, and notify on a transition. The loop calls this
        every ``interval_s``; tests and pools may call it to force a fresh decision."""
        sample = self.sample()
        self.last_sample = sample
        export_sample(sample)
        previous = self.level
        new = self._tracker.update(self.thresholds.budgets(sample))
        if new is not None:
            self._announce(previous, new, sample)
        self._run_sample_hooks(sample)
        return sample

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._poll_guarded()

    def _poll_guarded(self) -> None:
        try:
            self.poll()
        except Exception as exc:  # a sampling fault must not end the monitor
            kind = type(exc).__name__
            if self._failing != kind:
                log.exception("memory sampling failed; keeping level %s", self.level.name)
            self._failing = kind
        else:
            self._failing = None

    def _run_sample_hooks(self, sample: MemorySample) -> None:
        for callback in list(self._sample_hooks):
            key = id(callback)
            try:
                callback(sample)
            except Exception:
                if key not in self._failing_hooks:
                    log.exception("memory sample hook %r raised", callback)
                self._failing_hooks.add(key)
            else:
                self._failing_hooks.discard(key)

    def _announce(self, previous: MemoryLevel, new: MemoryLevel, sample: MemorySample) -> None:
        metrics.MEMORY_LEVEL.set(int(new))
        metrics.MEMORY_LEVEL_TRANSITIONS.labels(new.name.lower()).inc()
        cause = self._tracker.cause
        detail = (
            f"{cause.name} {cause.used / MiB:.0f} MiB (soft {cause.soft / MiB:.0f} MiB, "
            f"hard {cause.hard / MiB:.0f} MiB)"
            if cause is not None
            else "no measure applies"
        )
        if new > previous:
            log.warning(
                "memory pressure %s (was %s): %s; %s",
                new.name,
                previous.name,
                detail,
                _CONSEQUENCE[new],
            )
        else:
            log.info("memory pressure %s (was %s): %s", new.name, previous.name, detail)
        for callback in list(self._subscribers):
            try:
                callback(new, sample)
            except Exception:
                log.exception("memory level subscriber %r raised", callback)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)


_CONSEQUENCE = {
    MemoryLevel.HIGH: "pools throttle dispatch and pipelines pause until it falls",
    MemoryLevel.CRITICAL: "pools shed new calls (Overloaded) and recycle their largest workers",
}
