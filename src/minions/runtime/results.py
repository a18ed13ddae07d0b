"""Values Gru's lifecycle calls return: results say what happened instead of raising.

A start or stop that fails is an expected outcome of an operator action (a misconfigured minion, a
database that went away), so it is a value with a ``reason`` the caller can log or show.
"""

from __future__ import annotations

import enum

import msgspec

from minions.ops.levels import MemoryLevel


class GruState(enum.Enum):
    RUNNING = "running"
    SHUTTING_DOWN = "shutting_down"
    CLOSED = "closed"


class OrchestrationState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StartResult(msgspec.Struct, frozen=True):
    """``start_orchestration`` outcome. ``reason`` is ``None`` on success and says why
    otherwise; ``suggestion`` (when set) what to do about it; ``cause`` the underlying error."""

    success: bool
    reason: str | None = None
    orchestration_id: str | None = None
    resumed: int = 0
    suggestion: str | None = None
    cause: str | None = None


class StopResult(msgspec.Struct, frozen=True):
    """``stop_orchestration`` outcome; ``cancelled`` workflows kept their checkpoints.
    ``reason`` is ``None`` on success."""

    success: bool
    reason: str | None = None
    orchestration_id: str | None = None
    cancelled: int = 0
    errors: dict[str, str] = {}
    suggestion: str | None = None


class ShutdownResult(msgspec.Struct, frozen=True):
    """``shutdown`` outcome; ``errors`` maps a component (import path) to what went wrong and
    ``reason`` sums them up (``None`` on success)."""

    success: bool
    errors: dict[str, str] = {}
    cancelled: int = 0
    reason: str | None = None
    suggestion: str | None = None


class OrchestrationStatus(msgspec.Struct, frozen=True):
    orchestration_id: str
    pipeline: str
    minion: str
    state: OrchestrationState
    in_flight: int
    max_in_flight: int
    succeeded: int
    failed: int
    aborted: int


class ResourceStatus(msgspec.Struct, frozen=True):
    """One live resource; ``workers_alive`` counts a pool's serving workers and ``circuit`` is
    its circuit (``closed``, ``open``: crash-looping, ``half_open``); both ``None``: no pool."""

    resource: str
    refs: int
    state: str
    is_pool: bool
    workers_alive: int | None = None
    circuit: str | None = None


class GruStatus(msgspec.Struct, frozen=True):
    """A point-in-time snapshot for operators (``gru.status()``)."""

    state: GruState
    orchestrations: tuple[OrchestrationStatus, ...]
    resources: tuple[ResourceStatus, ...]
    pipelines_paused: bool
    durable: bool
    memory_level: MemoryLevel = MemoryLevel.NORMAL
    metrics_url: str | None = None  # None: metrics off, or the port could not be bound
