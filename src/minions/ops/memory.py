"""The memory monitor: samples Gru, its workers, the host and the cgroup, and decides a level.

Design note. Memory is guarded at two layers. systemd/the kernel enforce ``MemoryHigh`` and
``MemoryMax`` on the unit's cgroup: the last safety net, and a blunt one (throttling, then an OOM
kill). This monitor is the first layer: it sees pressure coming and turns it into a
:class:`~minions.ops.levels.MemoryLevel` that pools and Gru act on (HIGH: throttle dispatch and
pause pipelines; CRITICAL: shed new calls and recycle the largest workers) *before* the kernel has
to.

Up to three measures are compared with their own soft/hard thresholds, and the level is the worst
of them, because any one of them filling up is enough to hurt:

- ``cgroup``: the cgroup's working set (``memory.current`` minus inactive page cache) against
  thresholds derived from ``memory.high``/``memory.max`` -- only when a limit exists. This is what
  the kernel enforces on Gru plus all workers together.
- ``host``: host memory in use (total minus available) against fractions of host total -- other
  tenants of the machine can push us into the OOM killer too.
- ``process``: Gru's RSS plus its workers' RSS against explicit byte thresholds -- only when the
  user sets them: an application-level budget independent of where it runs.

Each measure keeps its own level with hysteresis (it rises as soon as a threshold is crossed, and
falls only once the value is below ``threshold * (1 - hysteresis)``), so a value hovering at a
threshold does not flap. The decision is the pure :func:`step_level`/:class:`LevelTracker`; the
:class:`MemoryMonitor` only samples, exports and notifies.

The monitor runs on Gru's event loop: one sample reads a handful of small ``/proc`` and cgroup
files (measured 0.3-0.7 ms on a loaded 2-core VM, plus about 70 us per worker), a fraction of a
percent of one core at the default half-second interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from minions.ops import metrics
from minions.ops.cgroup import CGROUP_ROOT, PROC_SELF_CGROUP, CgroupMemory, CgroupReader, locate
from minions.ops.levels import MemoryLevel

log = logging.getLogger(__name__)

MiB = 1 << 20

Subscriber = Callable[[MemoryLevel, "MemorySample"], None]


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One measurement. ``workers`` maps each watched pool to ``{pid: rss}`` of its live workers,
    which is what a pool needs to pick its largest workers to recycle at CRITICAL."""

    taken_at: float
    gru_rss: int
    gru_cpu_seconds: float
    host_total: int
    host_available: int
    cgroup: CgroupMemory | None = None
    workers: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    @property
    def workers_rss(self) -> int:
        return sum(sum(pids.values()) for pids in self.workers.values())

    @property
    def process_rss(self) -> int:
        """Gru plus every watched worker: the footprint the application is responsible for."""
        return self.gru_rss + self.workers_rss

    @property
    def host_used(self) -> int:
        return self.host_total - self.host_available


@dataclass(frozen=True, slots=True)
class Budget:
    """One measure compared with its thresholds; ``name`` is ``process``, ``cgroup`` or ``host``."""

    name: str
    used: int
    soft: int
    hard: int


@dataclass(frozen=True)
class MemoryThresholds:
    """When memory is HIGH and CRITICAL. Validated once, here; see the module note for the measures.

    ``soft_bytes``/``hard_bytes`` budget Gru plus its workers (RSS) and are off unless both are
    set. The cgroup thresholds are fractions of the cgroup's own limits: soft is
    ``cgroup_soft_fraction`` of ``memory.high`` and hard is ``cgroup_hard_fraction`` of
    ``memory.max`` (with only ``memory.max``, soft is ``cgroup_soft_fraction`` of hard; with only
    ``memory.high``, hard is ``memory.high`` itself, where the kernel starts throttling). The host
    thresholds are fractions of host total memory; set both to ``None`` to ignore the host.
    """

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    cgroup_soft_fraction: float = 0.9
    cgroup_hard_fraction: float = 0.9
    host_soft_fraction: float | None = 0.8
    host_hard_fraction: float | None = 0.9
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        if (self.soft_bytes is None) != (self.hard_bytes is None):
            raise ValueError("soft_bytes and hard_bytes must be set together (or neither)")
        soft, hard = self.soft_bytes, self.hard_bytes
        if soft is not None and hard is not None and not 0 < soft < hard:
            raise ValueError(f"need 0 < soft_bytes < hard_bytes, got {soft} and {hard}")
        for name in ("cgroup_soft_fraction", "cgroup_hard_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        host = (self.host_soft_fraction, self.host_hard_fraction)
        if (host[0] is None) != (host[1] is None):
            raise ValueError("host_soft_fraction and host_hard_fraction must both be set or None")
        if host[0] is not None and host[1] is not None and not 0 < host[0] < host[1] <= 1:
            raise ValueError(f"need 0 < host_soft_fraction < host_hard_fraction <= 1, got {host}")
        if not 0 <= self.hysteresis < 0.5:
            raise ValueError(f"hysteresis must be in [0, 0.5), got {self.hysteresis!r}")

    def budgets(self, sample: MemorySample) -> tuple[Budget, ...]:
        """The measures that apply to this sample, each with its soft and hard threshold."""
        out: list[Budget] = []
        if self.soft_bytes is not None and self.hard_bytes is not None:
            out.append(Budget("process", sample.process_rss, self.soft_bytes, self.hard_bytes))
        cg = sample.cgroup
        if cg is not None and cg.limited:
            soft, hard = self.cgroup_thresholds(cg.high, cg.max)
            out.append(Budget("cgroup", cg.working_set, soft, hard))
        if self.host_soft_fraction is not None and self.host_hard_fraction is not None:
            total = sample.host_total
            soft, hard = int(total * self.host_soft_fraction), int(total * self.host_hard_fraction)
            out.append(Budget("host", sample.host_used, soft, hard))
        return tuple(out)

    def cgroup_thresholds(self, high: int | None, max_: int | None) -> tuple[int, int]:
        """(soft, hard) in bytes for a cgroup with these limits; at least one must be set."""
        if max_ is not None:
            hard = int(max_ * self.cgroup_hard_fraction)
        elif high is not None:
            hard = high
        else:
            raise ValueError("cgroup has no memory limit")
        soft = int(high * self.cgroup_soft_fraction) if high is not None else hard
        if soft >= hard:
            soft = int(hard * self.cgroup_soft_fraction)
        return soft, hard


def step_level(
    current: MemoryLevel, used: int, soft: int, hard: int, hysteresis: float
) -> MemoryLevel:
    """The next level of one measure: rise at once, fall only below ``threshold*(1-hysteresis)``."""
    raw = (
        MemoryLevel.CRITICAL
        if used >= hard
        else MemoryLevel.HIGH
        if used >= soft
        else MemoryLevel.NORMAL
    )
    if raw >= current:
        return raw
    level = current
    if level is MemoryLevel.CRITICAL and used < hard * (1 - hysteresis):
        level = MemoryLevel.HIGH
    if level is MemoryLevel.HIGH and used < soft * (1 - hysteresis):
        level = MemoryLevel.NORMAL
    return level


class LevelTracker:
    """Levels per measure with hysteresis; the overall level is the worst of them. Pure, no I/O."""

    def __init__(self, hysteresis: float) -> None:
        self.hysteresis = hysteresis
        self.level = MemoryLevel.NORMAL
        self.cause: Budget | None = None
        self._levels: dict[str, MemoryLevel] = {}

    def update(self, budgets: Iterable[Budget]) -> MemoryLevel | None:
        """Feed one sample's budgets; returns the new overall level if it changed, else ``None``."""
        levels: dict[str, MemoryLevel] = {}
        worst = MemoryLevel.NORMAL
        cause: Budget | None = None
        for b in budgets:
            lvl = step_level(
                self._levels.get(b.name, MemoryLevel.NORMAL),
                b.used,
                b.soft,
                b.hard,
                self.hysteresis,
            )
            levels[b.name] = lvl
            if cause is None or lvl > worst or (lvl == worst and _ratio(b) > _ratio(cause)):
                worst, cause = lvl, b
        self._levels = levels  # a measure that disappeared (cgroup gone) forgets its level
        self.cause = cause
        if worst == self.level:
            return None
        self.level = worst
        return worst


def _ratio(b: Budget) -> float:
    return b.used / b.soft if b.soft else 0.0


class ProcessProbe:
    """Reads this process, the host and the cgroup once; used by the monitor and on scrape.

    Not thread-safe: give each thread its own probe (the metrics server's scrape thread has one).
    """

    def __init__(
        self, proc_cgroup: Path = PROC_SELF_CGROUP, cgroup_root: Path = CGROUP_ROOT
    ) -> None:
        self._self = psutil.Process()
        self._cgroup: CgroupReader | None = locate(proc_cgroup, cgroup_root)

    def read(self, workers: Mapping[str, Mapping[int, int]] | None = None) -> MemorySample:
        # Two plain reads: psutil's oneshot() reads more /proc files than these two need.
        rss = self._self.memory_info().rss
        cpu = self._self.cpu_times()
        vm = psutil.virtual_memory()
        return MemorySample(
            taken_at=time.monotonic(),
            gru_rss=rss,
            gru_cpu_seconds=cpu.user + cpu.system,
            host_total=vm.total,
            host_available=vm.available,
            cgroup=self._cgroup.read() if self._cgroup is not None else None,
            workers=workers or {},
        )


def export_sample(sample: MemorySample) -> None:
    """Set the Gru/host/cgroup gauges from a sample (worker RSS is each pool's own gauge)."""
    metrics.GRU_RSS_BYTES.set(sample.gru_rss)
    metrics.GRU_CPU_SECONDS.set(sample.gru_cpu_seconds)
    metrics.HOST_MEMORY_USED_BYTES.set(sample.host_used)
    if sample.cgroup is not None:
        metrics.CGROUP_MEMORY_BYTES.set(sample.cgroup.current)


_scrape_lock = threading.Lock()
_scrape_probe: list[ProcessProbe] = []


def refresh_process_metrics() -> None:
    """Update Gru's process and host gauges now. The metrics server calls this on each scrape (in
    its own threads) so the numbers are fresh even when no monitor runs (standalone pools)."""
    with _scrape_lock:
        if not _scrape_probe:
            _scrape_probe.append(ProcessProbe())
        export_sample(_scrape_probe[0].read())


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
        self._tracker = LevelTracker(self.thresholds.hysteresis)
        self._sources: dict[str, Callable[[], Iterable[int]]] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._broken_sources: set[str] = set()
        self._subscribers: list[Subscriber] = []
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

    def watch_workers(self, pool: str, pids: Callable[[], Iterable[int]]) -> Callable[[], None]:
        """Include the RSS of ``pids()`` (asked each sample) under ``pool``; returns the unwatch
        function. ``minions_worker_rss_bytes`` stays the pool's to export: it measures its
        workers anyway for ``max_rss_mb``."""
        if pool in self._sources:
            raise ValueError(f"pool {pool!r} is already watched by this memory monitor")
        self._sources[pool] = pids

        def unwatch() -> None:
            self._sources.pop(pool, None)

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
        return self._probe.read(self._sample_workers())

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

    def _sample_workers(self) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        seen: set[int] = set()
        for pool, source in list(self._sources.items()):
            try:
                pids = list(source())
            except Exception:
                if pool not in self._broken_sources:
                    log.exception("worker pid source of pool %r raised; skipping it", pool)
                self._broken_sources.add(pool)
                continue
            self._broken_sources.discard(pool)
            out[pool] = {}
            for pid in pids:
                rss = self._rss(pid)
                if rss is not None:
                    out[pool][pid] = rss
                    seen.add(pid)
        for pid in self._procs.keys() - seen:
            del self._procs[pid]
        return out

    def _rss(self, pid: int) -> int | None:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None  # exited between the pool's list and our read: its pool will reap it

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
