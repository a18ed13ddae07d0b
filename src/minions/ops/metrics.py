"""Every Prometheus metric Minions exports, declared once on one registry.

Metrics live on :data:`REGISTRY` (not prometheus-client's global one) so the endpoint Gru serves
shows Minions' own series and user code can still use the default registry freely. Label values
are bounded: pool, method, orchestration and outcome names, never call or workflow ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# --- worker pools ---------------------------------------------------------------------------
WORKER_CALLS = Counter(
    "minions_worker_calls",
    "Worker calls that ended, by outcome "
    "(ok, remote_error, crashed, poison, timeout, overloaded, unavailable).",
    ["pool", "method", "outcome"],
    registry=REGISTRY,
)
WORKER_CALL_SECONDS = Histogram(
    "minions_worker_call_duration_seconds",
    "Time from pool.call() to its end, by method.",
    ["pool", "method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
WORKER_CALL_RETRIES = Counter(
    "minions_worker_call_retries",
    "Calls re-dispatched to a fresh worker after a crash.",
    ["pool"],
    registry=REGISTRY,
)
WORKER_CRASHES = Counter(
    "minions_worker_crashes",
    "Unplanned worker deaths by reason "
    "(a signal name such as SIGSEGV, exit, timeout, boot_failed).",
    ["pool", "reason"],
    registry=REGISTRY,
)
WORKER_RECYCLES = Counter(
    "minions_worker_recycles",
    "Planned worker retirements by reason (max_calls, rss, memory, restart).",
    ["pool", "reason"],
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "minions_worker_restarts",
    "Worker processes spawned to replace one that ended.",
    ["pool"],
    registry=REGISTRY,
)
WORKER_SPAWNS = Counter(
    "minions_worker_spawns",
    "Worker processes started, by how: forked from the pool's zygote, or exec.",
    ["pool", "via"],
    registry=REGISTRY,
)
ZYGOTE_RESTARTS = Counter(
    "minions_zygote_restarts",
    "Zygote processes started to replace one that ended.",
    ["pool"],
    registry=REGISTRY,
)
WORKERS_ALIVE = Gauge(
    "minions_workers_alive",
    "Worker processes that completed their hello and are serving.",
    ["pool"],
    registry=REGISTRY,
)
WORKER_RSS_BYTES = Gauge(
    "minions_worker_rss_bytes",
    "Resident memory of each pool's workers, summed.",
    ["pool"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "minions_dispatch_queue_depth",
    "Calls waiting for a worker.",
    ["pool"],
    registry=REGISTRY,
)
POOL_CIRCUIT_OPEN = Gauge(
    "minions_pool_circuit_open",
    "1 while the pool's restart intensity is exceeded.",
    ["pool"],
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "minions_protocol_errors",
    "Frames dropped because they did not decode or broke the "
    "protocol (kind: decode, unauthenticated, unexpected).",
    ["pool", "kind"],
    registry=REGISTRY,
)

# --- orchestration --------------------------------------------------------------------------
WORKFLOWS = Counter(
    "minions_workflows",
    "Workflow lifecycle events per orchestration "
    "(event: started, succeeded, failed, aborted, resumed).",
    ["orchestration", "event"],
    registry=REGISTRY,
)
WORKFLOWS_IN_FLIGHT = Gauge(
    "minions_workflows_in_flight",
    "Workflows currently running, per orchestration.",
    ["orchestration"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "minions_step_duration_seconds",
    "Duration of one minion step.",
    ["orchestration", "step"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PIPELINE_EVENTS = Counter(
    "minions_pipeline_events",
    "Events produced by each pipeline.",
    ["pipeline"],
    registry=REGISTRY,
)
PIPELINE_ERRORS = Counter(
    "minions_pipeline_errors",
    "produce_event() calls that raised.",
    ["pipeline"],
    registry=REGISTRY,
)
RESOURCE_ERRORS = Counter(
    "minions_resource_errors",
    "Resource startup/shutdown/runtime failures.",
    ["resource", "phase"],
    registry=REGISTRY,
)

# --- host and process -----------------------------------------------------------------------
MEMORY_LEVEL = Gauge(
    "minions_memory_pressure_level",
    "Memory pressure level: 0 normal, 1 high, 2 critical.",
    registry=REGISTRY,
)
MEMORY_LEVEL_TRANSITIONS = Counter(
    "minions_memory_pressure_transitions",
    "Changes of the memory pressure level, by new level.",
    ["level"],
    registry=REGISTRY,
)
GRU_RSS_BYTES = Gauge(
    "minions_gru_rss_bytes",
    "Resident memory of the Gru process.",
    registry=REGISTRY,
)
GRU_CPU_SECONDS = Gauge(
    "minions_gru_cpu_seconds",
    "CPU time (user+system) used by the Gru process.",
    registry=REGISTRY,
)
HOST_MEMORY_USED_BYTES = Gauge(
    "minions_host_memory_used_bytes",
    "Host memory in use (total minus available).",
    registry=REGISTRY,
)
CGROUP_MEMORY_BYTES = Gauge(
    "minions_cgroup_memory_current_bytes",
    "memory.current of Gru's cgroup v2, when present.",
    registry=REGISTRY,
)
