"""The hot path's tallies: what prometheus-client shows is exactly what direct calls would give,
a scrape never waits for the timer, and Gru's timer and shutdown hand the counts over."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conftest import eventually, run
from minions import Gru, Minion, Pipeline, minion_step
from minions.implementations import NoOpLogger, PrometheusMetrics
from minions.ops import metrics as declared
from minions.ops import tally
from minions.runtime import operations, telemetry
from minions.runtime.telemetry import RuntimeMetrics

BUCKETS = (0.0005, 0.001, 0.01, 1.0)
# Every bound exactly (v <= bound belongs to that bucket), both sides of each, zero, +Inf's own.
VALUES = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.0011, 0.01, 0.5, 1.0, 1.0001, 7.0, 1e9]


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if family.name == name and not s.name.endswith("_created")
    }


def test_a_tallied_histogram_exposes_what_direct_observes_would() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["k"], buckets=BUCKETS, registry=registry)
    fronted = Histogram("fronted_seconds", "f", ["k"], buckets=BUCKETS, registry=registry)
    front = tally.front(fronted.labels("x"))
    assert isinstance(front, tally.HistogramTally)
    for value in VALUES:
        direct.labels("x").observe(value)
        front.observe(value)
    assert registry.get_sample_value("fronted_seconds_count", {"k": "x"}) == 0  # batched
    tally.flush()
    want = {(n.replace("direct", "fronted"), labels): v
            for (n, labels), v in _samples(registry, "direct_seconds").items()}  # fmt: skip
    assert _samples(registry, "fronted_seconds") == want
    assert want[("fronted_seconds_count", (("k", "x"),))] == len(VALUES)


def test_a_tallied_counter_and_repeated_fronts_share_one_count() -> None:
    registry = CollectorRegistry()
    counter = Counter("things", "t", ["k"], registry=registry)
    first, again = tally.front(counter.labels("a")), tally.front(counter.labels("a"))
    assert first is again  # one tally per child, however often it is bound
    assert first is not None
    for _ in range(5):
        first.inc()
    again.inc(2.5)
    tally.flush()
    tally.flush()  # a second flush adds nothing
    assert registry.get_sample_value("things_total", {"k": "a"}) == 7.5
    with pytest.raises(ValueError, match="non-negative"):
        first.inc(-1)  # refused at the call, as prometheus-client refuses it, not in a scrape
    assert tally.front(Gauge("level", "l", registry=registry)) is None  # gauges stay direct


def test_a_scrape_sees_every_count_without_a_flush() -> None:
    child = declared.WORKFLOWS.labels("tally-scrape", "started")
    front = tally.front(child)
    assert front is not None
    labels = {"orchestration": "tally-scrape", "event": "started"}
    before = declared.REGISTRY.get_sample_value("minions_workflows_total", labels) or 0.0
    for _ in range(3):
        front.inc()
    assert declared.REGISTRY.get_sample_value("minions_workflows_total", labels) == before + 3
    front.inc()
    served = declared.WithoutCreated().restricted_registry(["minions_workflows_total"])
    value = next(
        s.value
        for family in served.collect()
        for s in family.samples
        if s.name == "minions_workflows_total" and s.labels == labels
    )
    assert value == before + 4  # the filtered endpoint (?name[]=) flushes too


def test_counts_made_while_another_thread_flushes_are_all_kept() -> None:
    registry = CollectorRegistry()
    counter = Counter("raced", "r", registry=registry)
    histogram = Histogram("raced_seconds", "r", buckets=BUCKETS, registry=registry)
    count, observe = tally.front(counter), tally.front(histogram)
    assert isinstance(count, tally.CounterTally) and isinstance(observe, tally.HistogramTally)
    done = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not done.is_set():
            tally.flush()
            flushes += 1

    thread = threading.Thread(target=flusher)
    thread.start()
    n = 200_000
    try:
        for i in range(n):
            count.inc()
            observe.observe(VALUES[i % len(VALUES)])
    finally:
        done.set()
        thread.join()
    tally.flush()
    assert flushes > 1  # the flusher really ran during the increments
    assert registry.get_sample_value("raced_total") == n
    assert registry.get_sample_value("raced_seconds_count") == n


def test_custom_backends_see_every_call_and_prometheus_children_get_fronts() -> None:
    class Recording(telemetry.Metrics):
        def __init__(self) -> None:
            self.calls: list[tuple[str, float]] = []

        def create_metric(self, metric_name: str, label_names: list[str], kind: str) -> object:
            backend = self

            class Child:
                def labels(self, **_: str) -> Child:
                    return self

                def inc(self, amount: float = 1) -> None:
                    backend.calls.append(("inc", amount))

                def observe(self, value: float) -> None:
                    backend.calls.append(("observe", value))

            return Child()

    custom = Recording()
    bound = RuntimeMetrics(custom, lambda *_: None).child(
        telemetry.WORKFLOWS, orchestration="o", event="started"
    )
    bound.inc()
    assert custom.calls == [("inc", 1)]  # at once, no flush: the backend owns its timing
    prometheus = RuntimeMetrics(PrometheusMetrics(serve=False), lambda *_: None)
    assert isinstance(
        prometheus.child(telemetry.STEP_SECONDS, orchestration="o", step="s"),
        tally.HistogramTally,
    )
    gauge = prometheus.child(telemetry.IN_FLIGHT, orchestration="o")
    assert gauge is declared.WORKFLOWS_IN_FLIGHT.labels("o")


# --- under Gru: the timer and the last flush at shutdown ------------------------------------


@dataclass
class Tick:
    n: int = 0


@dataclass
class Ctx:
    n: int = 0


class ThreeTicks(Pipeline[Tick]):
    """Three events once the test opens the gate, then nothing."""

    gate: asyncio.Event
    produced = 0

    async def produce_event(self) -> Tick:
        await ThreeTicks.gate.wait()
        if ThreeTicks.produced >= 3:
            await asyncio.Event().wait()
        ThreeTicks.produced += 1
        return Tick(ThreeTicks.produced)


class Counted(Minion[Tick, Ctx]):
    @minion_step
    async def only(self) -> None:
        self.context.n = self.event.n


async def _start(gru: Gru) -> str:
    ThreeTicks.gate, ThreeTicks.produced = asyncio.Event(), 0
    result = await gru.start_orchestration(ThreeTicks, Counted)
    assert result.success and result.orchestration_id
    return result.orchestration_id


def _handed(oid: str) -> tuple[float, float]:
    """Steps and successes prometheus-client holds, read without a collection (no flush)."""
    steps = sum(b.get() for b in declared.STEP_SECONDS.labels(oid, "only")._buckets)
    return steps, declared.WORKFLOWS.labels(oid, "succeeded")._value.get()


async def _run_three(gru: Gru) -> None:
    ThreeTicks.gate.set()
    await eventually(lambda: gru.status().orchestrations[0].succeeded == 3)


def test_gru_hands_counts_to_prometheus_client_on_its_timer(monkeypatch) -> None:
    monkeypatch.setattr(operations, "_FLUSH_INTERVAL_S", 0.05)

    async def main() -> None:
        gru = await Gru.create(None, NoOpLogger(), None, handle_signals=False)
        try:
            oid = await _start(gru)
            tally.flush()  # what earlier tests counted for this orchestration id
            steps, succeeded = _handed(oid)
            await _run_three(gru)
            await eventually(lambda: _handed(oid) == (steps + 3, succeeded + 3))
        finally:
            await gru.shutdown()

    run(main())


def test_gru_hands_the_last_counts_over_at_shutdown(monkeypatch) -> None:
    monkeypatch.setattr(operations, "_FLUSH_INTERVAL_S", 3600.0)  # the timer never fires

    async def main() -> None:
        gru = await Gru.create(None, NoOpLogger(), None, handle_signals=False)
        try:
            oid = await _start(gru)
            tally.flush()
            steps, succeeded = _handed(oid)
            await _run_three(gru)
            assert _handed(oid) == (steps, succeeded)  # still in the tallies
        finally:
            await gru.shutdown()
        assert _handed(oid) == (steps + 3, succeeded + 3)

    run(main())
