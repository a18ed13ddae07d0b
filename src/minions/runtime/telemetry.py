"""The metrics interface (``minions.interfaces.Metrics``) and the backends Minions ships.

Design note. The interface is the established one: a backend implements
``create_metric(metric_name, label_names, kind)`` and returns an object with
``labels(**values)``, whose result has ``inc()``, ``set()`` or ``observe()``. Gru asks for each
metric once, binds each label set once (an orchestration's step timers when it starts, not per
step) and reuses the bound child, so a backend sees no per-event lookups. A backend that raises
is reported once and replaced by a no-op for that metric: metrics never fail a workflow. With
the Prometheus backend, Gru's counters and histograms are counted in plain numbers and handed to
prometheus-client in batches (:mod:`minions.ops.tally`); other backends see every call.

Gru emits the ``minions_*`` names of :data:`RUNTIME_METRICS` (Prometheus naming; the mapping
to the established names is ``deploy/prometheus/upstream-names.yml``). Worker pool and host
metrics are Prometheus-only: they live on Minions' registry whatever the backend.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from minions.ops import metrics as declared
from minions.ops import tally
from minions.ops.metrics_server import MetricsServer, start_metrics_server

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    labels: tuple[str, ...]


WORKFLOWS = MetricSpec("minions_workflows_total", "counter", ("orchestration", "event"))
IN_FLIGHT = MetricSpec("minions_workflows_in_flight", "gauge", ("orchestration",))
STEP_SECONDS = MetricSpec("minions_step_duration_seconds", "histogram", ("orchestration", "step"))
STEP_FAILURES = MetricSpec(
    "minions_step_failures_total", "counter", ("orchestration", "step", "outcome")
)
CHECKPOINT_FAILURES = MetricSpec(
    "minions_checkpoint_failures_total", "counter", ("orchestration", "operation", "stage")
)
BLOCKED = MetricSpec("minions_workflows_blocked", "gauge", ("orchestration", "operation"))
PIPELINE_EVENTS = MetricSpec("minions_pipeline_events_total", "counter", ("pipeline",))
PIPELINE_ERRORS = MetricSpec("minions_pipeline_errors_total", "counter", ("pipeline",))
RESOURCE_ERRORS = MetricSpec("minions_resource_errors_total", "counter", ("resource", "phase"))
RESOURCE_CALLS = MetricSpec(
    "minions_resource_calls_total", "counter", ("resource", "method", "outcome")
)
RESOURCE_SECONDS = MetricSpec(
    "minions_resource_call_duration_seconds", "histogram", ("resource", "method")
)
ORCHESTRATION_INFO = MetricSpec(
    "minions_orchestration_info", "gauge", ("orchestration", "minion", "pipeline", "config")
)

RUNTIME_METRICS: dict[str, tuple[MetricSpec, Any]] = {
    spec.name: (spec, collector)
    for spec, collector in (
        (WORKFLOWS, declared.WORKFLOWS),
        (IN_FLIGHT, declared.WORKFLOWS_IN_FLIGHT),
        (STEP_SECONDS, declared.STEP_SECONDS),
        (STEP_FAILURES, declared.STEP_FAILURES),
        (CHECKPOINT_FAILURES, declared.CHECKPOINT_FAILURES),
        (BLOCKED, declared.WORKFLOWS_BLOCKED),
        (PIPELINE_EVENTS, declared.PIPELINE_EVENTS),
        (PIPELINE_ERRORS, declared.PIPELINE_ERRORS),
        (RESOURCE_ERRORS, declared.RESOURCE_ERRORS),
        (RESOURCE_CALLS, declared.RESOURCE_CALLS),
        (RESOURCE_SECONDS, declared.RESOURCE_CALL_SECONDS),
        (ORCHESTRATION_INFO, declared.ORCHESTRATION_INFO),
    )
}


class Metrics(ABC):
    """Base class of metrics backends; subclass it and implement :meth:`create_metric`."""

    def __init__(self, logger: object = None) -> None:
        """``logger`` is accepted for compatibility and unused: Gru reports backend failures."""
        return None

    @abstractmethod
    def create_metric(self, metric_name: str, label_names: list[str], kind: Kind) -> Any:
        """A metric object for ``metric_name``, called once per name. ``labels(**values)`` on
        it must return an object with ``inc(amount=1)`` (counter), ``set(value)`` (gauge) or
        ``observe(value)`` (histogram); Gru keeps and reuses those bound objects."""

    def snapshot_counters(self) -> dict[str, list[dict[str, Any]]]:
        """``{name: [{"labels": {...}, "value": v}, ...]}`` for tests and debugging."""
        return {}

    def snapshot_gauges(self) -> dict[str, list[dict[str, Any]]]:
        return {}

    def snapshot_histograms(self) -> dict[str, list[dict[str, Any]]]:
        """``{name: [{"labels": {...}, "count": n, "sum": s}, ...]}``."""
        return {}

    async def startup(self) -> None:
        """Called once by ``Gru.create`` (the Prometheus backend binds its port here)."""
        return None

    async def shutdown(self) -> None:
        """Called once by ``Gru.shutdown``."""
        return None


class NoOpMetrics(Metrics):
    """Records nothing."""

    def create_metric(self, metric_name: str, label_names: list[str], kind: Kind) -> Any:
        return _NOOP


class _NoOp:
    def labels(self, *args: object, **kwargs: object) -> _NoOp:
        return self

    def inc(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, value: float) -> None: ...


_NOOP = _NoOp()


class PrometheusMetrics(Metrics):
    """The default: Minions' Prometheus registry, served at ``http://addr:port/metrics``.

    ``port=None``/``addr=None`` read ``$MINIONS_METRICS_PORT``/``$MINIONS_METRICS_HOST`` (else
    8081 and 127.0.0.1); ``port=0`` picks a free port (see :attr:`port`). ``serve=False`` keeps
    the series without an endpoint. Names Minions does not declare are created on ``registry``.
    """

    def __init__(
        self,
        logger: object = None,
        port: int | None = None,
        addr: str | None = None,
        registry: CollectorRegistry = declared.REGISTRY,
        *,
        serve: bool = True,
    ) -> None:
        from minions.runtime.config import metrics_address

        self.host, self.requested_port = metrics_address(addr or None, port)
        self.registry = registry
        self.serve = serve
        self.server: MetricsServer | None = None
        self._created: dict[str, Any] = {}

    @property
    def port(self) -> int | None:
        """The bound port while serving, else ``None``."""
        return self.server.port if self.server is not None else None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    async def startup(self) -> None:
        """Bind the endpoint; raises ``MetricsServerError`` when the port is taken (Gru logs it
        once and runs on without ``/metrics``)."""
        if self.serve and self.server is None:
            self.server = start_metrics_server(
                self.host, self.requested_port, registry=self.registry
            )

    async def shutdown(self) -> None:
        server, self.server = self.server, None
        if server is not None:  # close() joins the serving thread: never on the loop
            await asyncio.to_thread(server.close)

    def create_metric(self, metric_name: str, label_names: list[str], kind: Kind) -> Any:
        known = RUNTIME_METRICS.get(metric_name)
        if known is not None:
            return known[1]
        if metric_name not in self._created:
            factory: dict[str, Callable[..., Any]] = {
                "counter": Counter, "gauge": Gauge, "histogram": Histogram
            }  # fmt: skip
            self._created[metric_name] = factory[kind](
                metric_name, metric_name, label_names, registry=self.registry
            )
        return self._created[metric_name]

    def snapshot_counters(self) -> dict[str, list[dict[str, Any]]]:
        return self._samples("counter", "_total")

    def snapshot_gauges(self) -> dict[str, list[dict[str, Any]]]:
        return self._samples("gauge", "")

    def snapshot_histograms(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for family in self.registry.collect():
            if family.type != "histogram":
                continue
            rows: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for s in family.samples:
                if s.name.endswith(("_count", "_sum")):
                    key = tuple(sorted(s.labels.items()))
                    row = rows.setdefault(key, {"labels": dict(s.labels), "count": 0.0, "sum": 0.0})
                    row["count" if s.name.endswith("_count") else "sum"] = s.value
            out[family.name] = list(rows.values())
        return out

    def _samples(self, kind: str, suffix: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for family in self.registry.collect():
            if family.type == kind:
                wanted = family.name + suffix
                out[wanted] = [
                    {"labels": dict(s.labels), "value": s.value}
                    for s in family.samples
                    if s.name == wanted
                ]
        return out


class RuntimeMetrics:
    """Gru's view of its backend: each metric created once, each failure reported once."""

    def __init__(self, backend: Metrics, report: Callable[[str, BaseException], None]) -> None:
        self.backend = backend
        self._report = report
        self._metrics: dict[str, Any] = {}
        self._trusted = isinstance(backend, PrometheusMetrics | NoOpMetrics)
        self._tallied = isinstance(backend, PrometheusMetrics)

    def child(self, spec: MetricSpec, **labels: str) -> Any:
        """The bound metric for one label set; keep it and call ``inc``/``set``/``observe``.
        Bind once, off the hot path: binding is a lookup, the calls are what must be cheap."""
        try:
            metric = self._metrics.get(spec.name)
            if metric is None:
                metric = self.backend.create_metric(spec.name, list(spec.labels), spec.kind)
                self._metrics[spec.name] = metric
            bound = metric.labels(**labels) if spec.labels else metric
        except Exception as exc:
            self._failed(spec.name, exc)
            return _NOOP
        if self._tallied and spec.kind != "gauge":
            front = tally.front(bound)  # None for a subclass's own objects: used directly
            if front is not None:
                return front
        return bound if self._trusted else _Guarded(bound, spec.name, self._failed)

    @staticmethod
    def flush() -> None:
        """Hand the hot path's pending counts to prometheus-client (Gru's timer, shutdown)."""
        tally.flush()

    def _failed(self, name: str, exc: BaseException) -> None:
        self._metrics[name] = _NOOP
        self._report(f"metrics backend {type(self.backend).__name__} failed on {name}", exc)


class _Guarded:
    """A third-party backend's bound metric: the first error disables it instead of raising."""

    __slots__ = ("_failed", "_inner", "_name")

    def __init__(self, inner: Any, name: str, failed: Callable[[str, BaseException], None]) -> None:
        self._inner = inner
        self._name = name
        self._failed = failed

    def _call(self, method: str, value: float) -> None:
        if self._inner is None:
            return
        try:
            getattr(self._inner, method)(value)
        except Exception as exc:
            self._inner = None
            self._failed(self._name, exc)

    def inc(self, amount: float = 1) -> None:
        self._call("inc", amount)

    def set(self, value: float) -> None:
        self._call("set", value)

    def observe(self, value: float) -> None:
        self._call("observe", value)
