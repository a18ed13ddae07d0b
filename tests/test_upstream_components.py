"""Component APIs of the established docs: ``safe_create_task``, ``@Resource.untracked`` and
``runtime_state_snapshot()``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from apps.harness import Api, Cache, Ctx, Db, Ev, QPipeline, RecMinion, h, running_gru, use_harness
from conftest import run
from minions import Minion, Pipeline, Resource, minion_step, resource_id
from minions.ops.metrics import REGISTRY
from minions.runtime.identity import import_path


@dataclass
class Job:
    n: int = 0


@dataclass
class JobCtx:
    notes: list[str] = field(default_factory=list)


class Prices(Resource):
    """A user resource: public async methods are tracked unless marked."""

    async def get_price(self, symbol: str) -> float:
        if symbol == "BAD":
            raise LookupError(symbol)
        return 1.5

    @Resource.untracked
    async def ping(self) -> str:
        return "pong"

    @Resource.untracked()
    async def ping_again(self) -> str:
        return "pong"


class JobPipeline(Pipeline[Job]):
    async def produce_event(self) -> Job:
        return Job((await h().events.get()).n)


class PriceMinion(Minion[Job, JobCtx]):
    prices: Prices

    @minion_step
    async def quote(self) -> None:
        await self.prices.ping()
        await self.prices.ping_again()
        try:
            await self.prices.get_price("BAD" if self.event.n < 0 else "ACME")
        except LookupError:
            pass
        h().finished.put_nowait(self.event.n)


def _calls(method: str, outcome: str) -> float:
    labels = {"resource": "Prices", "method": method, "outcome": outcome}
    return REGISTRY.get_sample_value("minions_resource_calls_total", labels) or 0.0


def test_public_async_resource_methods_are_tracked_unless_marked_untracked() -> None:
    async def main() -> None:
        harness = use_harness()
        before = {(m, o): _calls(m, o) for m in ("get_price", "ping") for o in ("ok", "error")}
        async with running_gru() as gru:
            await gru.start_orchestration(JobPipeline, PriceMinion)
            for n in (1, -1, 2):
                harness.events.put_nowait(Ev(n))
            await harness.take(harness.finished, 3)
        assert _calls("get_price", "ok") - before[("get_price", "ok")] == 2
        assert _calls("get_price", "error") - before[("get_price", "error")] == 1
        assert _calls("ping", "ok") == before[("ping", "ok")] == 0
        labels = {"resource": "Prices", "method": "ping_again"}
        assert (
            REGISTRY.get_sample_value("minions_resource_call_duration_seconds_count", labels)
            is None
        )

    run(main())


def test_untracked_refuses_a_plain_function() -> None:
    with pytest.raises(TypeError, match=r"marks async methods; .*sync_method is not async"):

        class Bad(Resource):
            @Resource.untracked
            def sync_method(self) -> None: ...  # type: ignore[type-var]


# --- safe_create_task -----------------------------------------------------------------------------


class Beacon(Resource):
    """Owns a background task that runs until the resource stops."""

    async def startup(self) -> None:
        self.cancelled = asyncio.Event()
        self.task = self.safe_create_task(self._beat(), name="beat")

    async def _beat(self) -> None:
        try:
            h().started.put_nowait(1)
            await asyncio.Event().wait()
        finally:
            h().lifecycle.append("beat cancelled")


class TaskMinion(Minion[Job, JobCtx]):
    beacon: Beacon

    @minion_step
    async def spawn(self) -> None:
        self.safe_create_task(self._report(self.event.n), name=f"report-{self.event.n}")

    async def _report(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"bad job {n}")
        h().finished.put_nowait((n, self.workflow_handle.workflow_id != ""))


def test_safe_create_task_runs_reports_failures_and_is_drained_on_stop(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async def main() -> None:
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(JobPipeline, TaskMinion)
            assert await harness.take(harness.started, 1) == [1]  # the resource's task runs
            harness.events.put_nowait(Ev(-1))
            harness.events.put_nowait(Ev(5))
            assert await harness.take(harness.finished, 1) == [(5, True)]  # sees its workflow
            assert result.orchestration_id
            assert (await gru.stop_orchestration(result.orchestration_id)).success
            assert harness.lifecycle == ["beat cancelled"]  # cancelled when the resource stopped

    run(main())
    err = capfd.readouterr().err
    assert "TaskMinion task report--1 (safe_create_task) raised ValueError('bad job -1')" in err
    assert "Traceback" in err


class Stubborn(Resource):
    async def startup(self) -> None:
        self.safe_create_task(self._refuse(), name="stubborn")

    async def _refuse(self) -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if h().release.is_set():
                    raise
                h().lifecycle.append("refused")


class StubbornMinion(Minion[Job, JobCtx]):
    stubborn: Stubborn

    @minion_step
    async def noop(self) -> None:
        pass


def test_a_task_that_ignores_cancellation_is_named_in_the_stop_result(monkeypatch) -> None:
    from minions.runtime import resources

    monkeypatch.setattr(resources, "_TASK_GRACE_S", 0.05)

    async def main() -> None:
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(JobPipeline, StubbornMinion)
            assert result.orchestration_id
            stopped = await gru.stop_orchestration(result.orchestration_id)
            assert not stopped.success and harness.lifecycle == ["refused"]
            (error,) = stopped.errors.values()
            assert "TaskCancellationTimeoutError" in error and "stubborn" in error
            (left,) = [t for t in asyncio.all_tasks() if t.get_name() == "stubborn"]
            harness.release.set()  # now it lets itself be cancelled
            left.cancel()
            await asyncio.gather(left, return_exceptions=True)

    run(main())


# --- runtime_state_snapshot ---------------------------------------------------------------


@resource_id("77777777-7777-4777-8777-777777777777")
class StampedDb(Resource):
    pass


class StampedMinion(Minion[Ev, Ctx]):
    db: StampedDb
    api: Api

    @minion_step
    async def noop(self) -> None:
        pass


def test_runtime_state_snapshot_names_the_graph_by_identity() -> None:
    async def main() -> None:
        use_harness()
        async with running_gru() as gru:
            assert (await gru.runtime_state_snapshot()).is_empty
            rec = await gru.start_orchestration(QPipeline, RecMinion)
            assert rec.orchestration_id
            snap = await gru.runtime_state_snapshot()
            db, cache, api = import_path(Db), import_path(Cache), import_path(Api)
            assert snap.orchestrations == {rec.orchestration_id}
            assert snap.pipelines == {import_path(QPipeline)}
            assert snap.resources == {db, cache, api}
            instance = snap.minion_instance_for_orchestration(rec.orchestration_id)
            assert instance in snap.minion_instances
            assert snap.pipeline_for_orchestration(rec.orchestration_id) == import_path(QPipeline)
            assert snap.resources_for_minion(instance or "") == {api}
            assert snap.resources_for_pipeline(import_path(QPipeline)) == {db}
            assert snap.dependencies_for_resource(api) == {cache, db}
            assert snap.dependents_for_resource(db) == {cache, api}
            # db: the pipeline, Cache and Api hold it; api: the minion; cache: Api
            assert (snap.resource_refcount(db), snap.resource_refcount(api),
                    snap.resource_refcount(cache)) == (3, 1, 1)  # fmt: skip
            with pytest.raises(TypeError):
                snap.resource_reference_counts[db] = 0  # type: ignore[index]
            assert (await gru.stop_orchestration(rec.orchestration_id)).success
            assert (await gru.runtime_state_snapshot()).is_empty

    run(main())


def test_a_stamped_resource_appears_under_its_id() -> None:
    async def main() -> None:
        use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(QPipeline, StampedMinion)
            assert result.success, result.reason
            snap = await gru.runtime_state_snapshot()
            assert "77777777-7777-4777-8777-777777777777" in snap.resources

    run(main())
