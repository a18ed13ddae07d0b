"""Measuring memory: Gru itself, its workers, the host and the cgroup, and exporting the figures.

Design note. A sample reads a handful of small ``/proc`` and cgroup files (measured 0.3-0.7 ms on
a loaded 2-core VM, plus about 70 us per worker): cheap enough for the memory monitor to take one
every half second on Gru's event loop. Worker RSS is read here, once per sample, for every pool
the monitor watches; pools get the figures through ``MemoryMonitor.on_sample`` instead of
measuring their workers a second time.

Gru's own RSS and CPU time are exported by prometheus-client's process collector
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``); this module exports only what
that collector does not know: host memory in use and the cgroup's usage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from minions.ops import metrics
from minions.ops.cgroup import CGROUP_ROOT, PROC_SELF_CGROUP, CgroupMemory, CgroupReader, locate

log = logging.getLogger("minions.ops.memory")

PidSource = Callable[[], Iterable[int]]


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


class WorkerProbe:
    """RSS of each watched pool's workers, keeping one ``psutil.Process`` per live pid.

    A pool registers a pid source (asked each sample); a source that raises is logged once and
    skipped until it works again, and a pid that exited between the pool's list and our read is
    left out (its pool reaps it).
    """

    def __init__(self) -> None:
        self.sources: dict[str, PidSource] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._broken: set[str] = set()

    def read(self) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        seen: set[int] = set()
        for pool, source in list(self.sources.items()):
            try:
                pids = list(source())
            except Exception:
                if pool not in self._broken:
                    log.exception("worker pid source of pool %r raised; skipping it", pool)
                self._broken.add(pool)
                continue
            self._broken.discard(pool)
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
            return None


def export_sample(sample: MemorySample) -> None:
    """Set the host and cgroup gauges from a sample (worker RSS is each pool's own gauge)."""
    metrics.HOST_MEMORY_USED_BYTES.set(sample.host_used)
    if sample.cgroup is not None:
        metrics.CGROUP_MEMORY_BYTES.set(sample.cgroup.current)


_scrape_lock = threading.Lock()
_scrape_probe: list[ProcessProbe] = []


def refresh_process_metrics() -> None:
    """Update the host and cgroup gauges now. The metrics server calls this on each scrape (in
    its own threads) so the numbers are fresh even when no monitor runs (standalone pools)."""
    with _scrape_lock:
        if not _scrape_probe:
            _scrape_probe.append(ProcessProbe())
        export_sample(_scrape_probe[0].read())
