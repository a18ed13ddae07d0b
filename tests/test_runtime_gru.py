"""Gru lifecycle in-process: creation rules, start/stop/rollback, sharing, failures, resume."""

from __future__ import annotations

import asyncio
import logging

import pytest

from apps.harness import (
    Api,
    Cache,
    Ctx,
    Db,
    Ev,
    FlakyPipeline,
    GatedMinion,
    LonelyMinion,
    OtherPipeline,
    PlainMinion,
    QPipeline,
    RecMinion,
    running_gru,
    use_harness,
)
from conftest import eventually, run
from minions import Gru, GruState, OrchestrationState
from minions.errors import GruError
from minions.ops.levels import MemoryLevel
from minions.runtime.state import MemoryStateStore, WorkflowRecord


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_calling_gru_directly_names_create():
    with pytest.raises(GruError, match=r"Gru\.create"):
        Gru()  # type: ignore[call-arg]


def test_one_live_gru_per_process_and_a_new_one_after_shutdown():
    async def main():
        first = await Gru.create(state_store=None, metrics=False)
        with pytest.raises(GruError, match="already running"):
            await Gru.create(state_store=None, metrics=False)
        result = await first.shutdown()
        assert result.success and first.state is GruState.CLOSED
        second = await Gru.create(state_store=None, metrics=False)
        assert (await second.shutdown()).success

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"state_store": "minions.db"}, TypeError, "state_store"),
        ({"state_store": MemoryStateStore}, TypeError, "state_store"),
        ({"logger": "debug"}, TypeError, "logger"),
        ({"metrics": 1}, TypeError, "metrics"),
        ({"metrics_port": "8081"}, TypeError, "metrics_port"),
        ({"metrics_port": 70000}, ValueError, "metrics_port"),
        ({"max_in_flight": 0}, ValueError, "max_in_flight"),
        ({"max_in_flight": 2.5}, TypeError, "max_in_flight"),
        ({"grace_period_s": -1}, ValueError, "grace_period_s"),
        ({"grace_period_s": float("nan")}, ValueError, "grace_period_s"),
    ],
)
def test_bad_arguments_raise_and_leave_no_gru(kwargs, error, match):
    async def main():
        with pytest.raises(error, match=match):
            await Gru.create(**kwargs)
        gru = await Gru.create(state_store=None, metrics=False)  # the failed create freed the slot
        await gru.shutdown()

    run(main())


def test_readme_style_orchestration_runs_and_logs_to_minions_log(tmp_path):
    async def main():
        harness = use_harness()
        async with running_gru(state_store=MemoryStateStore()) as gru:
            result = await gru.start_orchestration(QPipeline, RecMinion)
            assert result.success, result.reason
            for n in range(3):
                harness.events.put_nowait(Ev(n))
            done = await harness.take(harness.finished, 3)
            assert sorted(done) == [("RecMinion", n, ["first", "second"]) for n in range(3)]
            status = gru.status()
            (orch,) = status.orchestrations
            assert orch.succeeded == 3 and orch.state is OrchestrationState.RUNNING
        return result.orchestration_id

    orch_id = run(main())
    log = (tmp_path / "minions.log").read_text()
    assert f"orchestration={orch_id}" in log and "level=INFO" in log


def test_orchestration_id_is_stable_and_strings_work():
    async def main():
        use_harness()
        async with running_gru() as gru:
            by_class = await gru.start_orchestration(QPipeline, PlainMinion)
            again = await gru.start_orchestration(
                "apps.harness:QPipeline", "apps.harness:PlainMinion"
            )
            configured = await gru.start_orchestration(
                QPipeline, PlainMinion, minion_config={"mode": "b"}
            )
        return by_class, again, configured

    by_class, again, configured = run(main())
    assert by_class.success and not again.success
    assert "already running" in again.reason and by_class.orchestration_id in again.reason
    assert configured.success and configured.orchestration_id != by_class.orchestration_id


@pytest.mark.parametrize("failing", ["Db", "Cache", "Api", "QPipeline", "RecMinion"])
def test_failed_start_is_rolled_back_and_gru_stays_usable(failing):
    async def main():
        harness = use_harness()
        harness.fail_startup.add(failing)
        async with running_gru() as gru:
            result = await gru.start_orchestration(QPipeline, RecMinion)
            assert not result.success and f"{failing} refuses to start" in result.reason
            started = [e.split()[1] for e in harness.lifecycle if e.startswith("start")]
            stopped = [e.split()[1] for e in harness.lifecycle if e.startswith("stop")]
            assert stopped == list(reversed(started)), harness.lifecycle
            assert gru.status().resources == () and gru.status().orchestrations == ()
            harness.fail_startup.clear()
            retry = await gru.start_orchestration(QPipeline, RecMinion)
            assert retry.success, retry.reason
            harness.events.put_nowait(Ev(1))
            assert (await harness.take(harness.finished, 1))[0][1] == 1

    run(main())


def test_resources_and_pipelines_are_shared_refcounted_and_stopped_in_reverse():
    async def main():
        harness = use_harness()
        async with running_gru() as gru:
            a = await gru.start_orchestration(QPipeline, RecMinion)
            b = await gru.start_orchestration(QPipeline, PlainMinion)
            assert a.success and b.success
            assert harness.lifecycle == [
                "start Db", "start Cache", "start Api", "start QPipeline", "start RecMinion"
            ]  # fmt: skip
            refs = {r.resource.rsplit(":")[1]: r.refs for r in gru.status().resources}
            assert refs == {"Db": 2, "Cache": 1, "Api": 1}
            harness.events.put_nowait(Ev(7))  # one event fans out to both orchestrations
            done = await harness.take(harness.finished, 2)
            assert sorted(d[0] for d in done) == ["PlainMinion", "RecMinion"]
            harness.lifecycle.clear()
            assert (await gru.stop_orchestration(a.orchestration_id)).success
            assert harness.lifecycle == ["stop RecMinion", "stop Api", "stop Cache"]
            harness.events.put_nowait(Ev(8))  # the shared pipeline still feeds the other one
            assert await harness.take(harness.finished, 1) == [("PlainMinion", 8, ["only"])]
            harness.lifecycle.clear()
        assert harness.lifecycle == ["stop QPipeline", "stop Db"]

    run(main())


def test_stop_leaves_unrelated_orchestrations_running():
    async def main():
        harness = use_harness()
        async with running_gru() as gru:
            a = await gru.start_orchestration(QPipeline, PlainMinion)
            b = await gru.start_orchestration(OtherPipeline, PlainMinion)
            stopped = await gru.stop_orchestration(a.orchestration_id)
            assert stopped.success and stopped.orchestration_id == a.orchestration_id
            assert [o.orchestration_id for o in gru.status().orchestrations] == [b.orchestration_id]
            harness.other_events.put_nowait(Ev(5))
            assert await harness.take(harness.finished, 1) == [("PlainMinion", 5, ["only"])]
            missing = await gru.stop_orchestration(a.orchestration_id)
            assert not missing.success and "no running orchestration" in missing.reason

    run(main())


def test_in_flight_bound_stops_asking_the_pipeline():
    async def main():
        harness = use_harness()
        async with running_gru(grace_period_s=0) as gru:
            res = await gru.start_orchestration(QPipeline, GatedMinion, max_in_flight=3)
            for n in range(10):
                harness.events.put_nowait(Ev(n))
            assert sorted(await harness.take(harness.started, 3)) == [0, 1, 2]
            await asyncio.sleep(0)  # let the pipeline task observe that the orchestration is full
            assert harness.events.qsize() == 7  # no event was taken beyond the bound
            (orch,) = gru.status().orchestrations
            assert orch.in_flight == 3 and orch.orchestration_id == res.orchestration_id
            harness.release.set()
            done = await harness.take(harness.finished, 10)
            assert sorted(d[1] for d in done) == list(range(10))

    run(main())


def test_failing_step_fails_only_its_workflow_and_logs_user_line(tmp_path):
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test.runtime.injected")
    logger.addHandler(Collect())
    logger.propagate = False

    async def main():
        harness = use_harness()
        store = MemoryStateStore()
        async with running_gru(state_store=store, logger=logger) as gru:
            await gru.start_orchestration(QPipeline, RecMinion)
            for n in (-1, 2, 13, 3):
                harness.events.put_nowait(Ev(n))
            done = await harness.take(harness.finished, 2)
            assert sorted(d[1] for d in done) == [2, 3]
            (orch,) = gru.status().orchestrations
            assert (orch.failed, orch.aborted, orch.succeeded) == (1, 1, 2)
            assert await store.list_all() == []  # success, abort and failure delete checkpoints

    run(main())
    failures = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "harness.py:" in failures[0] and "ValueError" in failures[0] and "first" in failures[0]
    assert not (tmp_path / "minions.log").exists()  # the injected logger replaced the default


def test_a_crash_in_a_workflows_own_bookkeeping_is_reported_and_frees_its_slot(tmp_path):
    """A store whose queued delete raises: the workflow task's accounting fails after its steps.
    It is logged as a crashed workflow task, the slot is freed and the next workflow runs."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test.runtime.bookkeeping")
    logger.addHandler(Collect())
    logger.propagate = False

    class Broken(MemoryStateStore):
        def delete_nowait(self, orchestration_id, workflow_id):
            raise RuntimeError("queue gone")

    async def main():
        harness = use_harness()
        async with running_gru(state_store=Broken(), logger=logger) as gru:
            await gru.start_orchestration(QPipeline, PlainMinion, max_in_flight=1)
            for n in (1, 2):
                harness.events.put_nowait(Ev(n))
            assert sorted(d[1] for d in await harness.take(harness.finished, 2)) == [1, 2]
            (orch,) = gru.status().orchestrations
            assert orch.succeeded == 2
            await eventually(lambda: gru.status().orchestrations[0].in_flight == 0)

    run(main())
    crashed = [r.getMessage() for r in records if "workflow task crashed" in r.getMessage()]
    assert len(crashed) == 2 and "queue gone" in crashed[0]


def test_produce_event_errors_are_retried_with_backoff():
    async def main():
        harness = use_harness()
        harness.produce_failures = 3
        async with running_gru() as gru:
            await gru.start_orchestration(FlakyPipeline, PlainMinion)
            harness.events.put_nowait(Ev(1))
            assert await harness.take(harness.finished, 1) == [("PlainMinion", 1, ["only"])]
            assert harness.produce_failures == 0

    run(main())


def test_saved_workflows_resume_at_their_step():
    async def main():
        harness = use_harness()
        store = MemoryStateStore()
        async with running_gru(state_store=store) as gru:
            res = await gru.start_orchestration(QPipeline, RecMinion)
            orch_id = res.orchestration_id
        import msgspec

        record = WorkflowRecord(
            orchestration_id=orch_id, workflow_id="w1",
            event=msgspec.msgpack.encode(Ev(42)),
            context=msgspec.msgpack.encode(Ctx(trail=["first(before crash)"])),
            step_index=1, created_at=1.0, updated_at=1.0,
        )  # fmt: skip
        await store.save(record)
        async with running_gru(state_store=store) as gru:
            res = await gru.start_orchestration(QPipeline, RecMinion)
            assert res.success and res.resumed == 1 and res.orchestration_id == orch_id
            done = await harness.take(harness.finished, 1)
            assert done == [("RecMinion", 42, ["first(before crash)", "second"])]
        assert await store.list_all() == []

    run(main())


def test_shutdown_keeps_checkpoints_of_unfinished_workflows():
    async def main():
        harness = use_harness()
        store = MemoryStateStore()
        async with running_gru(state_store=store, grace_period_s=0.05) as gru:
            res = await gru.start_orchestration(QPipeline, GatedMinion)
            for n in range(4):
                harness.events.put_nowait(Ev(n))
            await harness.take(harness.started, 4)
            result = await gru.shutdown()
            assert result.success and result.cancelled == 4
        saved = await store.load(res.orchestration_id)
        assert sorted(r.step_index for r in saved) == [0, 0, 0, 0]

    run(main())


def test_resource_failure_stops_only_dependent_orchestrations():
    async def main():
        harness = use_harness()
        async with running_gru() as gru:
            lonely = await gru.start_orchestration(OtherPipeline, LonelyMinion)
            other = await gru.start_orchestration(QPipeline, RecMinion)
            (instance,) = [
                gru._set.graph.instance_of(cls) for cls, *_ in gru._set.graph.snapshot()
                if cls.__name__ == "Lonely"
            ]  # fmt: skip
            gru.resource_failed(instance, OSError("connection reset"))
            await asyncio.gather(*gru._tasks)
            ids = [o.orchestration_id for o in gru.status().orchestrations]
            assert ids == [other.orchestration_id] and lonely.orchestration_id not in ids
            harness.events.put_nowait(Ev(1))
            assert (await harness.take(harness.finished, 1))[0][0] == "RecMinion"

    run(main())


def test_memory_pressure_pauses_and_resumes_pipelines():
    async def main():
        harness = use_harness()
        async with running_gru() as gru:
            await gru.start_orchestration(QPipeline, PlainMinion)
            harness.events.put_nowait(Ev(1))
            await harness.take(harness.finished, 1)  # the runner is now waiting in produce
            gru.apply_memory_level(MemoryLevel.HIGH)
            assert gru.status().pipelines_paused
            harness.events.put_nowait(Ev(2))  # taken by the call already waiting
            assert await harness.take(harness.finished, 1) == [("PlainMinion", 2, ["only"])]
            harness.events.put_nowait(Ev(3))
            for _ in range(20):
                await asyncio.sleep(0)
            assert harness.events.qsize() == 1  # paused: not asked again
            gru.apply_memory_level(MemoryLevel.NORMAL)
            assert await harness.take(harness.finished, 1) == [("PlainMinion", 3, ["only"])]

    run(main())


def test_shared_resource_instance_is_the_same_object():
    async def main():
        use_harness()
        async with running_gru() as gru:
            await gru.start_orchestration(QPipeline, RecMinion)
            pipeline = gru._set.pipelines.get(QPipeline).pipeline
            api = gru._set.graph.instance_of(Api)
            assert pipeline.db is api.db is api.cache.db is gru._set.graph.instance_of(Db)
            assert isinstance(api.cache, Cache)

    run(main())


def test_metrics_address_comes_from_the_environment_when_omitted(monkeypatch):
    from minions.runtime.config import metrics_address

    monkeypatch.delenv("MINIONS_METRICS_HOST", raising=False)
    monkeypatch.delenv("MINIONS_METRICS_PORT", raising=False)
    assert metrics_address(None, None) == ("127.0.0.1", 8081)
    monkeypatch.setenv("MINIONS_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("MINIONS_METRICS_PORT", "8083")
    assert metrics_address(None, None) == ("0.0.0.0", 8083)
    assert metrics_address("::1", 9000) == ("::1", 9000)  # explicit arguments win
    monkeypatch.setenv("MINIONS_METRICS_PORT", "eighty")
    with pytest.raises(ValueError, match="MINIONS_METRICS_PORT"):
        metrics_address(None, None)


def test_current_names_the_live_gru():
    async def main():
        assert Gru.current() is None
        async with running_gru() as gru:
            assert Gru.current() is gru
        assert Gru.current() is None

    run(main())
