"""The memory level policy: thresholds per measure, and the hysteresis that stops flapping.

Design note. Up to three measures are compared with their own soft/hard thresholds, and the
level is the worst of them, because any one of them filling up is enough to hurt:

- ``cgroup``: the cgroup's working set (usage minus inactive page cache) against thresholds
  derived from its limits (``memory.high``/``memory.max`` on v2, ``memory.soft_limit_in_bytes``/
  ``memory.limit_in_bytes`` on v1) -- only when a limit exists. This is what the kernel enforces
  on Gru plus all workers together.
- ``host``: host memory in use (total minus available) against fractions of host total -- other
  tenants of the machine can push us into the OOM killer too.
- ``process``: Gru's RSS plus its workers' RSS against explicit byte thresholds -- only when the
  user sets them: an application-level budget independent of where it runs.

Each measure keeps its own level with hysteresis (it rises as soon as a threshold is crossed, and
falls only once the value is below ``threshold * (1 - hysteresis)``), so a value hovering at a
threshold does not flap. Everything here is pure: no I/O, no clock, trivially unit-tested.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minions.ops.levels import MemoryLevel

if TYPE_CHECKING:
    from minions.ops.sampling import MemorySample


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
    ``cgroup_soft_fraction`` of the soft limit (v2 ``memory.high``) and hard is
    ``cgroup_hard_fraction`` of the hard limit (v2 ``memory.max``); with only a hard limit, soft
    is ``cgroup_soft_fraction`` of hard; with only a soft limit, hard is the soft limit itself,
    where the kernel starts throttling. The host thresholds are fractions of host total memory;
    set both to ``None`` to ignore the host.
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
