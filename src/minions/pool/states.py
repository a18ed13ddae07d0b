"""Pool lifecycle and circuit states, the snapshot, and call outcome labels."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from minions.errors import (
    CallTimeout,
    Overloaded,
    PoisonCall,
    PoolUnavailable,
    RemoteError,
    WorkerCrashed,
)
from minions.ops.levels import MemoryLevel


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


class CrashLoopPolicy(enum.Enum):
    """What a pool does past its restart intensity (OTP's "give up" of a supervisor)."""

    CIRCUIT = "circuit"  # open the circuit and recover by itself; Gru runs on (the default)
    ESCALATE = "escalate"  # also ask Gru to stop with a failure, so systemd restarts the service


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker process as an operator sees it (``minions status``)."""

    worker_id: int
    pid: int
    role: str  # "active" or "spare"
    phase: str  # "booting", "ready", "retiring", "killed"
    rss_bytes: int  # as of the last measurement (0 before the first)
    calls_served: int
    in_flight: int  # calls it owes answers for (running, pipelined, or answered unflushed)
    running: str = ""  # the method it is executing right now, per its call marker
    host: str = ""  # the worker host it runs on (its pid is the host's); "" for a local worker


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """One connected worker host, named by its key file in ``host_keys_dir``."""

    name: str
    pid: int  # of its ``minions worker-host`` process, on its own machine
    hostname: str  # what the host says its machine is called (informational)
    workers: int  # its workers that take calls now
    silent_s: float  # since the pool last heard from it
    connected_s: float  # since its session began


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A point-in-time view for status pages, metrics and tests."""

    name: str
    state: PoolState
    circuit: Circuit
    workers_ready: int
    spares_ready: int
    booting: int
    in_flight: int
    queue_depth: int
    memory_level: MemoryLevel
    pids: tuple[int, ...]
    workers: tuple[WorkerSnapshot, ...] = ()
    restarts: int = 0  # unplanned worker deaths that were replaced, since the pool started
    circuit_opened: int = 0  # times the circuit opened, since the pool started
    zygote_pid: int = 0  # the zygote workers are forked from; 0: none (exec, or it is down)
    zygote_restarts: int = 0  # zygotes started to replace one that died
    hosts: tuple[HostSnapshot, ...] = ()  # connected worker hosts (``listen`` pools)
    listen: str = ""  # the tcp address worker hosts connect to; "" if none
    hosts_lost: int = 0  # host sessions that ended in host_lost, since the pool started


_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (PoisonCall, "poison"),
    (WorkerCrashed, "crashed"),
    (CallTimeout, "timeout"),
    (RemoteError, "remote_error"),
    (Overloaded, "overloaded"),
    (PoolUnavailable, "unavailable"),
    (asyncio.CancelledError, "cancelled"),  # the caller gave up (see WorkerPool.call)
)


def outcome_label(exc: BaseException) -> str:
    """The bounded ``outcome`` label of ``minions_worker_calls_total`` for a call that did not
    end with a value (``cancelled``: its caller stopped waiting)."""
    for cls, label in _OUTCOMES:
        if isinstance(exc, cls):
            return label
    return "error"
