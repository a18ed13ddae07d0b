"""Pool lifecycle and circuit states, shared by the pool and its supervisor."""

from __future__ import annotations

import enum


class PoolState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Circuit(enum.Enum):
    CLOSED = "closed"  # healthy
    OPEN = "open"  # restart intensity exceeded: calls fail with PoolUnavailable
    HALF_OPEN = "half_open"  # trying again with fresh workers
