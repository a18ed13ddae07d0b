"""The control protocol: one tagged union of requests, one of replies, msgpack on the wire.

Design note. As on the worker wire (:mod:`minions.ipc.messages`), each ZeroMQ message carries
exactly one Struct; each side decodes with one prebuilt ``Decoder`` for the union it may receive
and ``match``es on the type. Structs are map-encoded (not array-like): an operator's client and
a Gru may be of different versions, and new fields with defaults then decode both ways. The
reply Structs are also what ``minions status --json`` prints, so the JSON is the wire's shape.
"""

from __future__ import annotations

import msgspec

from minions.runtime.results import OrchestrationStatus, StopResult

# --- requests -----------------------------------------------------------------------------------


class StatusRequest(msgspec.Struct, frozen=True, tag="status"):
    """What is running: orchestrations, workflows in flight, pools and their workers."""


class RestartPool(msgspec.Struct, frozen=True, tag="restart-pool"):
    """Replace every worker of pool ``pool``, one at a time, failing no call."""

    pool: str


class StopOrchestration(msgspec.Struct, frozen=True, tag="stop-orchestration"):
    """``gru.stop_orchestration(orchestration_id)``: in-flight steps get the grace period."""

    orchestration_id: str


Request = StatusRequest | RestartPool | StopOrchestration

# --- replies ------------------------------------------------------------------------------------


class WorkerRow(msgspec.Struct, frozen=True):
    worker_id: int
    pid: int
    role: str
    phase: str
    rss_bytes: int
    calls_served: int
    in_flight: int
    host: str = ""  # the worker host it runs on; "" for a local worker


class HostRow(msgspec.Struct, frozen=True):
    """A worker host connected to a listening pool."""

    name: str
    pid: int
    hostname: str
    workers: int
    silent_s: float
    connected_s: float


class PoolRow(msgspec.Struct, frozen=True):
    name: str
    state: str
    circuit: str
    memory_level: str
    queue_depth: int
    in_flight: int
    restarts: int
    workers: tuple[WorkerRow, ...] = ()
    listen: str = ""
    hosts: tuple[HostRow, ...] = ()
    hosts_lost: int = 0


class Status(msgspec.Struct, frozen=True, tag="status"):
    """One Gru, as ``minions status`` shows it."""

    pid: int
    state: str
    started_at: float
    memory_level: str
    pipelines_paused: bool
    durable: bool
    metrics_url: str | None
    workflows_in_flight: int
    orchestrations: tuple[OrchestrationStatus, ...] = ()
    pools: tuple[PoolRow, ...] = ()


class PoolRestarted(msgspec.Struct, frozen=True, tag="pool-restarted"):
    pool: str
    replaced: int


class OrchestrationStopped(msgspec.Struct, frozen=True, tag="orchestration-stopped"):
    result: StopResult


class Refused(msgspec.Struct, frozen=True, tag="refused"):
    """The request was understood but cannot be done (unknown pool, Gru shutting down), or was
    not understood at all; ``reason`` says which, in one line."""

    reason: str


Reply = Status | PoolRestarted | OrchestrationStopped | Refused

encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)
