"""Every Prometheus metric Minions exports, declared once on one registry.

Metrics live on :data:`REGISTRY` (not prometheus-client's global one) so the endpoint Gru serves
shows Minions' own series and user code can still use the default registry freely. Label values
are bounded: pool, method, orchestration and outcome names, never call or workflow ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

# --- worker pools ---------------------------------------------------------------------------
WORKER_CALLS = Counter(
    "minions_worker_calls", "Worker calls that ended, by outcome "
    "(ok, remote_error, crashed, poison, timeout, overloaded, unavailable).",
    ["pool", "method", "outcome"], registry=REGISTRY,
)
WORKER_CALL_SECONDS = Histogram(
    "minions_worker_call_duration_seconds", "Time from pool.call() to its end, by method.",
    ["pool", "method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
WORKER_CALL_RETRIES = Counter(
    "minions_worker_call_retries", "Calls re-dispatched to a fresh worker after a crash.",
    ["pool"], registry=REGISTRY,
)
WORKER_CRASHES = Counter(
    "minions_worker_crashes", "Unplanned worker deaths by reason "
    "(a signal name such as SIGSEGV, exit, timeout, boot_failed).",
    ["pool", "reason"], registry=REGISTRY,
)
WORKER_RECYCLES = Counter(
    "minions_worker_recycles", "Planned worker retirements by reason (max_calls, rss, memory).",
    ["pool", "reason"], registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "minions_worker_restarts", "Worker processes spawned to replace one that ended.",
    ["pool"], registry=REGISTRY,
)
WORKERS_ALIVE = Gauge(
    "minions_workers_alive", "Worker processes that completed their hello and are serving.",
    ["pool"], registry=REGISTRY,
)
WORKER_RSS_BYTES = Gauge(
    "minions_worker_rss_bytes", "Resident memory of each pool's workers, summed.",
    ["pool"], registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "minions_dispatch_queue_depth", "Calls waiting for a worker.", ["pool"], registry=REGISTRY,
)
POOL_CIRCUIT_OPEN = Gauge(
    "minions_pool_circuit_open", "1 while the pool's restart intensity is exceeded.",
    ["pool"], registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "minions_protocol_errors", "Frames dropped because they did not decode or broke the "
    "protocol (kind: decode, unauthenticated, unexpected).",
    ["pool", "kind"], registry=REGISTRY,
)
