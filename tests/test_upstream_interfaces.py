"""A store, a logger and a metrics backend written only against ``minions.interfaces``, as the
established docs describe them, plugged into Gru; and the shipped ones behind the same classes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from apps.harness import Ev, GatedMinion, PlainMinion, QPipeline, RecMinion, use_harness
from conftest import run
from minions import Gru
from minions.interfaces import ERROR, Logger, Metrics, StateStore, StoredWorkflowContext


class DictStore(StateStore):
    """The established contract: opaque blobs keyed by workflow id."""

    def __init__(self) -> None:
        super().__init__(logger=None)
        self.blobs: dict[str, StoredWorkflowContext] = {}
        self.started = self.stopped = 0
        self.calls: list[str] = []

    async def startup(self) -> None:
        self.started += 1

    async def shutdown(self) -> None:
        self.stopped += 1

    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        self.calls.append("save")
        self.blobs[workflow_id] = StoredWorkflowContext(workflow_id, orchestration_id, context)

    async def delete_context(self, workflow_id: str) -> None:
        self.calls.append("delete")
        self.blobs.pop(workflow_id, None)

    async def get_contexts_for_orchestration(self, orchestration_id: str) -> list[Any]:
        return [c for c in self.blobs.values() if c.orchestration_id == orchestration_id]

    async def get_all_contexts(self) -> list[Any]:
        return list(self.blobs.values())


class ListLogger(Logger):
    """Skips super().__init__(), as the established NoOpLogger does."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str, dict[str, Any]]] = []

    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        self.records.append((level, msg, kwargs))


class _Child:
    def __init__(self, sink: list[tuple[str, dict[str, str], str, float]], name: str) -> None:
        self.sink, self.name, self.bound = sink, name, {}

    def labels(self, **labels: str) -> _Child:
        child = type(self)(self.sink, self.name)
        child.bound = labels
        return child

    def inc(self, amount: float = 1) -> None:
        self.sink.append((self.name, self.bound, "inc", amount))

    def set(self, value: float) -> None:
        self.sink.append((self.name, self.bound, "set", value))

    def observe(self, value: float) -> None:
        self.sink.append((self.name, self.bound, "observe", value))


class ListMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__(None)
        self.created: dict[str, tuple[list[str], str]] = {}
        self.values: list[tuple[str, dict[str, str], str, float]] = []

    def create_metric(self, metric_name: str, label_names: list[str], kind: Any) -> Any:
        self.created[metric_name] = (label_names, kind)
        return _Child(self.values, metric_name)


def test_custom_store_logger_and_metrics_run_and_resume_workflows() -> None:
    store, logger, metrics = DictStore(), ListLogger(), ListMetrics()

    async def first_life() -> str:
        harness = use_harness()
        gru = await Gru.create(store, logger, metrics, grace_period_s=0.0)
        try:
            result = await gru.start_orchestration(QPipeline, GatedMinion)
            assert result.success and result.orchestration_id, result.reason
            harness.events.put_nowait(Ev(1))
            assert await harness.take(harness.started, 1) == [1]  # parked in its first step
        finally:
            await gru.shutdown()  # the grace period ends: cancelled, checkpoint kept
        return result.orchestration_id

    oid = run(first_life())
    assert store.started == store.stopped == 1
    assert [c.orchestration_id for c in store.blobs.values()] == [oid]

    async def second_life() -> None:
        harness = use_harness()
        harness.release.set()
        gru = await Gru.create(store, logger, metrics, grace_period_s=0.0)
        try:
            result = await gru.start_orchestration(QPipeline, GatedMinion)
            assert result.resumed == 1
            done = await harness.take(harness.finished, 1)
            assert done == [("GatedMinion", 1, ["gate", "after"])]  # from the step-0 checkpoint
        finally:
            await gru.shutdown()

    run(second_life(), timeout=30)
    assert store.blobs == {} and store.calls[-1] == "delete"
    messages = [msg for _, msg, _ in logger.records]
    assert any(m.startswith("orchestration started") for m in messages)
    assert all("orchestration" in fields for _, _, fields in logger.records)
    assert metrics.created["minions_workflows_total"] == (["orchestration", "event"], "counter")
    resumed = [v for v in metrics.values if v[0] == "minions_workflows_total"
               and v[1] == {"orchestration": oid, "event": "resumed"}]  # fmt: skip
    assert resumed == [("minions_workflows_total", {"orchestration": oid, "event": "resumed"},
                        "inc", 1)]  # fmt: skip
    gauge = [v[3] for v in metrics.values if v[0] == "minions_workflows_in_flight"]
    assert 1 in gauge and gauge[-1] == 0  # set() on every change: no set_function here


def test_custom_logger_gets_failures_with_their_traceback() -> None:
    logger = ListLogger()

    async def main() -> None:
        harness = use_harness()
        gru = await Gru.create(None, logger, None)
        try:
            await gru.start_orchestration(QPipeline, RecMinion)
            harness.events.put_nowait(Ev(-1))
            harness.events.put_nowait(Ev(2))
            await harness.take(harness.finished, 1)
        finally:
            await gru.shutdown()

    run(main())
    (failure,) = [(msg, f) for level, msg, f in logger.records if level == ERROR]
    assert "workflow failed in step first of RecMinion" in failure[0]
    assert failure[1]["error_type"] == "ValueError" and "Traceback" in failure[1]["traceback"]


class BrokenLogger(Logger):
    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        raise OSError("log sink is down")


class _Exploding(_Child):
    def inc(self, amount: float = 1) -> None:
        raise ConnectionError("statsd is gone")


class BrokenMetrics(Metrics):
    """Refuses one metric outright, and fails on every counter increment."""

    def create_metric(self, metric_name: str, label_names: list[str], kind: Any) -> Any:
        if metric_name == "minions_step_duration_seconds":
            raise RuntimeError("backend refuses histograms")
        if metric_name == "minions_workflows_total":
            return _Exploding([], metric_name)
        return _Child([], metric_name)


def test_broken_user_backends_never_fail_a_workflow(capfd: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        harness = use_harness()
        gru = await Gru.create(None, BrokenLogger(), BrokenMetrics())
        try:
            assert (await gru.start_orchestration(QPipeline, PlainMinion)).success
            for n in range(3):
                harness.events.put_nowait(Ev(n))
            assert len(await harness.take(harness.finished, 3)) == 3
            (status,) = gru.status().orchestrations
            assert (status.succeeded, status.failed) == (3, 0)
        finally:
            await gru.shutdown()

    run(main())
    err = capfd.readouterr().err
    assert "BrokenLogger.log raised OSError('log sink is down')" in err
    reports = [line for line in err.splitlines() if line.startswith("minions: metrics backend")]
    assert len(reports) == 2, reports  # once per metric, though every workflow records both
    assert "BrokenMetrics failed on minions_step_duration_seconds" in reports[0]
    assert "failed on minions_workflows_total: ConnectionError('statsd is gone')" in reports[1]


def test_the_shipped_sqlite_store_implements_the_blob_primitives(tmp_path: Path) -> None:
    from minions.implementations import SQLiteStateStore
    from minions.runtime.store_contract import WorkflowRecord, encode_record

    async def main() -> None:
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            record = WorkflowRecord("orch", "wf-1", b"\x90", b"\x90", 1, 10.0, 11.0)
            await store.save_context("wf-1", "orch", encode_record(record))
            (got,) = await store.get_contexts_for_orchestration("orch")
            assert (got.workflow_id, got.orchestration_id) == ("wf-1", "orch")
            assert await store.load("orch") == [record]
            await store.delete_context("wf-1")
            assert await store.get_all_contexts() == []

    run(main())
    with sqlite3.connect(tmp_path / "minions.db") as db:
        assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)


def test_a_blob_that_is_not_a_minions_workflow_is_refused_clearly() -> None:
    store = DictStore()

    async def main() -> None:
        from minions.errors import StateStoreError

        await store.save_context("x", "orch", b"not msgpack")
        with pytest.raises(StateStoreError, match="not a Minions workflow blob"):
            await store.load("orch")

    run(main())


def test_a_custom_store_that_is_not_a_state_store_is_refused() -> None:
    class Duck:
        async def save(self, record: object) -> None: ...

    async def main() -> None:
        with pytest.raises(TypeError, match=r"minions\.interfaces\.StateStore subclass"):
            await Gru.create(Duck(), None, None)

    run(main())
