"""The SQLite store's writer: one statement per batch, deletes as tombstones nobody else sees, a
loop turn's unawaited deletes behind one future, and what a failed commit does to them."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually, run
from minions import Gru, Minion, Pipeline, minion_step
from minions.errors import StateStoreError
from minions.interfaces import Logger
from minions.ops.metrics import REGISTRY
from minions.runtime.state import MemoryStateStore, SQLiteStateStore, read_workflows
from test_state import hold_writer, rec


def _writer_call(store: SQLiteStateStore, sql: str) -> Any:
    return store._call_in_writer(lambda conn: conn.execute(sql).fetchall())


async def _trace(store: SQLiteStateStore) -> list[str]:
    """The first word of what the writer's connection runs from now on (SQLite reports a
    statement again for each trigger it runs, so only the words, not their count, say much)."""
    seen: list[str] = []

    def install(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(lambda sql: seen.append(sql.split()[0].upper()))

    await store._call_in_writer(install)
    return seen


def _file_view(path: Path) -> tuple[int, int]:
    """(tombstone rows, triggers) as any other reader of the file sees it."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tombstones = conn.execute("SELECT count(*) FROM workflows WHERE step_index < 0")
        triggers = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'")
        return tombstones.fetchone()[0], triggers.fetchone()[0]


def test_a_batch_is_one_statement_and_its_tombstones_never_reach_the_file(tmp_path):
    path = tmp_path / "minions.db"

    async def main():
        async with SQLiteStateStore(path) as store:
            await store.save(rec("old"))
            traced = await _trace(store)
            release, parked = await hold_writer(store)
            before = store.commits
            waiters = [
                store.save(rec("a")), store.save(rec("b")), store.delete_nowait("orch", "old"),
                store.delete("orch", "never-saved"), store.save(rec("c")),
                store.delete("orch", "b"), store.save(rec("c", step=2)),
            ]  # fmt: skip
            release.set()
            await parked
            await asyncio.gather(*waiters)
            assert store.commits == before + 1
            assert set(traced) == {"INSERT"}  # autocommit: one statement, no BEGIN, no COMMIT
            assert await store.load("orch") == [rec("a"), rec("c", step=2)]
            assert _file_view(path) == (0, 0)  # no tombstone stays, no trigger in the schema

    run(main())
    assert [r.workflow_id for r in read_workflows(path)] == ["a", "c"]


def test_a_batch_larger_than_one_statement_is_one_transaction(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            store._writer._rows_per_statement = 4  # type: ignore[union-attr]
            traced = await _trace(store)
            release, parked = await hold_writer(store)
            before = store.commits
            waiters = [store.save(rec(f"w{i}", at=float(i))) for i in range(10)]
            waiters += [store.delete("orch", "w3"), store.delete("orch", "w7")]
            release.set()
            await parked
            await asyncio.gather(*waiters)
            assert store.commits == before + 1
            assert traced[0] == "BEGIN" and traced[-1] == "COMMIT"  # 10 keys / 4: 3 statements
            assert set(traced[1:-1]) == {"INSERT"} and traced.count("BEGIN") == 1
            kept = [r.workflow_id for r in await store.load("orch")]
            assert kept == [f"w{i}" for i in range(10) if i not in (3, 7)]

    run(main())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_negative_step_is_refused_before_it_is_queued(tmp_path, kind):
    async def main():
        store = MemoryStateStore() if kind == "memory" else SQLiteStateStore(tmp_path / "m.db")
        async with store:
            await store.save(rec("a"))
            with pytest.raises(ValueError, match="step_index must be >= 0"):
                await store.save(rec("a", step=-1))  # would read as a delete in the writer
            assert await store.load("orch") == [rec("a")]

    run(main())


def test_deletes_queued_in_one_loop_turn_share_one_future(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            for wid in ("a", "b", "c"):
                await store.save(rec(wid))
            release, parked = await hold_writer(store)
            first, second = store.delete_nowait("orch", "a"), store.delete_nowait("orch", "b")
            assert first is second
            await asyncio.sleep(0)  # the next turn of the loop opens a new group
            third = store.delete_nowait("orch", "c")
            assert third is not first
            assert not first.done() and not third.done()  # nothing is committed yet
            release.set()
            await parked
            await asyncio.gather(first, third)
            assert await store.load("orch") == []

    run(main())


def test_a_failed_commit_fails_the_shared_delete_future_and_the_writer_recovers(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            await store.save(rec("a"))
            await _writer_call(store, "PRAGMA query_only = 1")  # every write now fails
            forgotten = store.delete_nowait("orch", "a")
            with pytest.raises(StateStoreError, match="SQLITE_READONLY"):
                await store.save(rec("b"))
            with pytest.raises(StateStoreError, match="SQLITE_READONLY"):
                await forgotten
            assert await store.load("orch") == [rec("a")]  # nothing half-applied
            await _writer_call(store, "PRAGMA query_only = 0")
            await store.delete("orch", "a")
            assert await store.load("orch") == []

    run(main())


def test_closing_in_the_same_turn_settles_the_open_delete_group(tmp_path):
    path = tmp_path / "minions.db"

    async def main():
        store = SQLiteStateStore(path)
        await store.open()
        await store.save(rec("a"))
        forgotten = store.delete_nowait("orch", "a")
        await store.close()
        assert forgotten.done() and forgotten.exception() is None

    run(main())
    assert read_workflows(path) == []


def test_a_write_taken_in_the_same_batch_as_the_stop_fails_instead_of_vanishing(tmp_path):
    async def main():
        store = SQLiteStateStore(tmp_path / "minions.db")
        await store.open()
        writer = store._writer
        assert writer is not None
        release, parked = await hold_writer(store)
        loop = asyncio.get_running_loop()
        stopped, late = loop.create_future(), loop.create_future()
        writer.stop(stopped)
        writer.put((("orch", "late"), None, late))  # a delete queued behind the stop
        release.set()
        await parked
        await asyncio.wait({stopped, late}, timeout=10)
        assert stopped.done() and stopped.exception() is None
        assert late.done() and isinstance(late.exception(), StateStoreError)
        store._writer = None  # the thread has ended: release the file as close() would
        await asyncio.to_thread(store._release, writer)

    run(main())


# --- through Gru: a failed queued delete is reported for each workflow ---------------------


@dataclass
class Job:
    n: int = 0


@dataclass
class JobCtx:
    n: int = 0


class Gate:
    open: asyncio.Event
    waiting = 0
    produced = 0


class TwoJobs(Pipeline[Job]):
    async def produce_event(self) -> Job:
        if Gate.produced >= 2:
            await asyncio.Event().wait()
        Gate.produced += 1
        return Job(Gate.produced)


class GatedFinish(Minion[Job, JobCtx]):
    @minion_step
    async def first(self) -> None:
        self.context.n = self.event.n

    @minion_step
    async def last(self) -> None:
        Gate.waiting += 1
        await Gate.open.wait()  # both wake in one turn, so both deletes share one group


class Lines(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, dict[str, Any]]] = []

    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        self.lines.append((msg, kwargs))


def test_each_workflow_whose_queued_delete_failed_is_reported(tmp_path):
    path = tmp_path / "minions.db"

    async def main() -> tuple[str, list[str]]:
        Gate.open, Gate.waiting, Gate.produced = asyncio.Event(), 0, 0
        store, logger = SQLiteStateStore(path), Lines()
        gru = await Gru.create(store, logger, None, handle_signals=False)
        try:
            result = await gru.start_orchestration(TwoJobs, GatedFinish)
            assert result.success and result.orchestration_id
            oid = result.orchestration_id
            labels = {"orchestration": oid, "operation": "delete", "stage": "delete"}
            before = REGISTRY.get_sample_value("minions_checkpoint_failures_total", labels) or 0
            await eventually(lambda: Gate.waiting == 2)  # both checkpointed before `last`
            await _writer_call(store, "PRAGMA query_only = 1")
            Gate.open.set()
            await eventually(lambda: gru.status().orchestrations[0].succeeded == 2)
            await eventually(
                lambda: (
                    REGISTRY.get_sample_value("minions_checkpoint_failures_total", labels)
                    == before + 2
                )
            )
            await _writer_call(store, "PRAGMA query_only = 0")
        finally:
            await gru.shutdown()
        reported = [
            kwargs["workflow"]
            for msg, kwargs in logger.lines
            if "could not delete the finished workflow's checkpoint" in msg
        ]
        return oid, reported

    oid, reported = run(main())
    kept = read_workflows(path)  # each would re-run its last step on resume, as reported
    assert sorted(reported) == sorted(r.workflow_id for r in kept) and len(kept) == 2
    assert {(r.orchestration_id, r.step_index) for r in kept} == {(oid, 1)}
