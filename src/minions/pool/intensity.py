"""Restart intensity and backoff, OTP style, as pure functions over monotonic timestamps.

An Erlang/OTP supervisor gives up when more than ``intensity`` restarts happen within ``period``
seconds; we do the same per pool, except "giving up" opens a circuit that re-closes after a
reset delay instead of crashing the parent. Nothing here reads a clock: callers pass ``now``,
which keeps these trivially testable.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class RestartDecision(enum.Enum):
    RESTART = "restart"
    GIVE_UP = "give_up"


@dataclass
class RestartIntensity:
    """At most ``max_restarts`` restarts in any window of ``period_s`` seconds."""

    max_restarts: int
    period_s: float
    _stamps: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> RestartDecision:
        """Count one restart at ``now`` and say whether the limit still holds."""
        self._stamps.append(now)
        while self._stamps and self._stamps[0] <= now - self.period_s:
            self._stamps.popleft()
        if len(self._stamps) > self.max_restarts:
            return RestartDecision.GIVE_UP
        return RestartDecision.RESTART

    def reset(self) -> None:
        self._stamps.clear()


@dataclass
class Backoff:
    """Exponential delay between consecutive failed starts: initial, 2x, 4x, ... capped."""

    initial_s: float
    max_s: float
    failures: int = 0

    def next_delay(self) -> float:
        """Delay before the next start, then count this failure."""
        if self.failures == 0:
            delay = 0.0
        else:
            delay = min(self.max_s, self.initial_s * (2 ** (self.failures - 1)))
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0
