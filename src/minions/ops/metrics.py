"""Every Prometheus metric Minions exports, declared once on one registry.

Metrics live on :data:`REGISTRY` (not prometheus-client's global one) so the endpoint Gru serves
shows Minions' own series and user code can still use the default registry freely. Label values
are bounded: pool, method, orchestration and outcome names, never call or workflow ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

REGISTRY = CollectorRegistry(auto_describe=True)

# Called before every collection of REGISTRY: the runtime folds the counts it keeps off the hot
# path into the series here (minions.ops.tally), so every scrape is exact.
BEFORE_COLLECT: list[Callable[[], None]] = []


def run_before_collect() -> None:
    for hook in BEFORE_COLLECT:
        hook()


class _BeforeCollect:
    def collect(self) -> Iterator[Metric]:
        run_before_collect()
        return iter(())


REGISTRY.register(_BeforeCollect())  # registered first, so it runs before any series is read

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
    "(ok, remote_error, crashed, poison, timeout, overloaded, unavailable, cancelled).",
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
    "Planned worker retirements by reason (max_calls, rss, memory, restart, cancelled).",
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
    "Frames dropped or connections refused because they broke the protocol (kind: decode, "
    "unauthenticated, unexpected; on a listen pool also auth: unknown CURVE key, handshake: "
    "plaintext client or wrong server key, replayed: a host hello seen before, protocol: a hello "
    "for another version or service, stale: frames of an ended host session).",
    ["pool", "kind"],
    registry=REGISTRY,
)
HOST_UP = Gauge(
    "minions_host_up",
    "1 while the worker host (named by its key file) has a session with the pool.",
    ["pool", "host"],
    registry=REGISTRY,
)
HOST_WORKERS = Gauge(
    "minions_host_workers_alive",
    "Workers of each worker host that take calls.",
    ["pool", "host"],
    registry=REGISTRY,
)
HOSTS_LOST = Counter(
    "minions_hosts_lost",
    "Worker host sessions that ended because the host went silent or its connection closed "
    "(a host that stops cleanly says goodbye and is not counted).",
    ["pool", "host"],
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
HOST_MEMORY_USED_BYTES = Gauge(
    "minions_host_memory_used_bytes",
    "Host memory in use (total minus available).",
    registry=REGISTRY,
)
CGROUP_MEMORY_BYTES = Gauge(
    "minions_cgroup_memory_current_bytes",
    "Memory usage of Gru's cgroup (v2 memory.current, v1 memory.usage_in_bytes), when present.",
    registry=REGISTRY,
)
WATCHDOG_LAST_PING = Gauge(
    "minions_watchdog_last_ping_timestamp_seconds",
    "Unix time of Gru's last systemd watchdog ping (absent without WatchdogSec).",
    registry=REGISTRY,
)
EVENT_LOOP_LAG = Gauge(
    "minions_event_loop_lag_seconds",
    "How late the watchdog's ping task woke on Gru's event loop, last ping.",
    registry=REGISTRY,
)

# Gru's own RSS, CPU time, open fds and start time (process_start_time_seconds: a change is a
# restart) come from prometheus-client's collector, read from /proc at each scrape.
PROCESS = ProcessCollector(registry=REGISTRY)


class WithoutCreated:
    """:data:`REGISTRY` as served: every sample but the ``_created`` ones.

    prometheus-client adds a ``<name>_created`` series (a timestamp) to each counter and
    histogram child. In the text format it is one more series per label set that no dashboard
    or alert uses, so the endpoint leaves it out. Local to our endpoint: a user's own registry,
    and prometheus-client's global switch, are untouched.
    """

    def __init__(
        self, registry: CollectorRegistry = REGISTRY, names: Iterable[str] | None = None
    ) -> None:
        self._registry = registry
        self._names = None if names is None else list(names)

    def collect(self) -> Iterator[Metric]:
        if self._names is not None:  # a restricted registry skips the BEFORE_COLLECT collector
            run_before_collect()
        source = (
            self._registry
            if self._names is None
            else self._registry.restricted_registry(self._names)
        )
        for metric in source.collect():
            kept = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric if len(kept) == len(metric.samples) else _copy(metric, kept)

    def restricted_registry(self, names: Iterable[str]) -> WithoutCreated:
        """``/metrics?name[]=...``: prometheus-client's app asks the registry for this."""
        return WithoutCreated(self._registry, names)


def _copy(metric: Metric, samples: list[Sample]) -> Metric:
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    out.samples = samples
    return out


# --- appended for the upstream metric names (deploy/prometheus/upstream-names.yml) ---------
STEP_FAILURES = Counter(
    "minions_step_failures",
    "Steps that raised, by outcome (failed, aborted); counted off the hot path, at the failure.",
    ["orchestration", "step", "outcome"],
    registry=REGISTRY,
)
CHECKPOINT_FAILURES = Counter(
    "minions_checkpoint_failures",
    "Checkpoint saves or deletes that failed (operation: save, delete; "
    "stage: serialize, save, delete).",
    ["orchestration", "operation", "stage"],
    registry=REGISTRY,
)
WORKFLOWS_BLOCKED = Gauge(
    "minions_workflows_blocked",
    "Workflows waiting for a checkpoint to be persisted (idle-until-persisted policy).",
    ["orchestration", "operation"],
    registry=REGISTRY,
)
RESOURCE_CALLS = Counter(
    "minions_resource_calls",
    "Calls of a resource's public async methods (outcome: ok, error); "
    "@Resource.untracked methods and worker pools are not counted.",
    ["resource", "method", "outcome"],
    registry=REGISTRY,
)
RESOURCE_CALL_SECONDS = Histogram(
    "minions_resource_call_duration_seconds",
    "Duration of tracked resource method calls that returned.",
    ["resource", "method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ORCHESTRATION_INFO = Gauge(
    "minions_orchestration_info",
    "1 for every orchestration started in this process: its minion, pipeline and config "
    "identities (join on orchestration to label other series).",
    ["orchestration", "minion", "pipeline", "config"],
    registry=REGISTRY,
)
HOST_MEMORY_TOTAL_BYTES = Gauge(
    "minions_host_memory_total_bytes",
    "Total host memory (for percentages of the host).",
    registry=REGISTRY,
)
HOST_CPUS = Gauge(
    "minions_host_cpus",
    "Logical CPUs of the host (for CPU percentages normalised per core).",
    registry=REGISTRY,
)
