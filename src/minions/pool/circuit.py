"""The pool's circuit breaker, as a pure state machine over monotonic timestamps.

Restart intensity (``intensity.py``) says when a pool is crash-looping; the breaker says what
follows: OPEN (no spawns, calls fail with ``PoolUnavailable``) until a retry time, then
HALF_OPEN (fresh workers are tried), then CLOSED as soon as one of them boots. A failure while
HALF_OPEN re-opens it with the reset delay doubled, up to ``reset_max_s``. Nothing here reads a
clock or touches a process: the Supervisor feeds it ``now`` and acts on its state.
"""

from __future__ import annotations

from minions.pool.states import Circuit


class CircuitBreaker:
    """State, retry time and reset delay of one pool's circuit."""

    def __init__(self, reset_s: float, reset_max_s: float) -> None:
        self.state = Circuit.CLOSED
        self.opened = 0  # times it opened since the pool started (status, tests)
        self._reset_initial_s = reset_s
        self._reset_max_s = max(reset_s, reset_max_s)
        self.reset_s = reset_s
        self._retry_at = 0.0

    def trip(self, now: float) -> None:
        """Open now: a crash loop passed the restart intensity, or a half-open try failed."""
        if self.state is Circuit.HALF_OPEN:
            self.reset_s = min(self.reset_s * 2, self._reset_max_s)
        self.state = Circuit.OPEN
        self.opened += 1
        self._retry_at = now + self.reset_s

    def poll(self, now: float) -> bool:
        """OPEN -> HALF_OPEN once the retry time has come; ``True`` on that transition."""
        if self.state is Circuit.OPEN and now >= self._retry_at:
            self.state = Circuit.HALF_OPEN
            return True
        return False

    def succeeded(self) -> bool:
        """A fresh worker booted: HALF_OPEN -> CLOSED, delay back to its initial value.
        ``True`` when this closed the circuit."""
        if self.state is not Circuit.HALF_OPEN:
            return False
        self.state = Circuit.CLOSED
        self.reset_s = self._reset_initial_s
        return True

    def retry_after(self, now: float) -> float:
        """Seconds until the next half-open try (0 when not open)."""
        return max(0.0, self._retry_at - now) if self.state is Circuit.OPEN else 0.0
