"""Cancelling an awaiting caller, with real workers: a queued call never runs, a running call
finishes with its result dropped (the default) or its worker is killed (``cancel="kill"``).

Handlers wait on a gate file the test creates, so "the call is running" and "the call may
finish" are events, not durations; the journal file says what really ran in the worker.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from call_services import Journal, lines
from conftest import eventually, run
from minions.ops import metrics
from minions.workers import WorkerPool
from pools import running_pid


class OneJournal(WorkerPool[Journal]):
    workers = 1
    call_timeout_s = 20.0


class TwoJournals(WorkerPool[Journal]):
    workers = 2
    call_timeout_s = 20.0


def calls(pool: str, method: str, outcome: str) -> float:
    return metrics.WORKER_CALLS.labels(pool, method, outcome)._value.get()


def counter(family: metrics.Counter, *labels: str) -> float:
    return family.labels(*labels)._value.get()


async def cancelled(task: asyncio.Task[object]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_queued_call_whose_caller_gives_up_never_runs(tmp_path: Path) -> None:
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")

    async def scenario() -> None:
        before = calls("OneJournal", "record", "cancelled")
        async with OneJournal() as pool:
            busy = asyncio.create_task(pool.call(Journal.hold, gate, journal, "first"))
            await eventually(lambda: running_pid(pool, "hold"))
            queued = asyncio.create_task(pool.call(Journal.record, journal, "withdrawn"))
            await eventually(lambda: pool.snapshot().queue_depth == 1)  # really queued
            await cancelled(queued)
            assert pool.snapshot().queue_depth == 0
            Path(gate).touch()
            await busy
            await pool.call(Journal.record, journal, "after")  # the worker serves in order
        assert lines(journal) == ["first", "after"]
        assert calls("OneJournal", "record", "cancelled") == before + 1

    run(scenario())


def test_a_running_call_finishes_and_its_result_is_dropped(tmp_path: Path) -> None:
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")

    async def scenario() -> None:
        before = calls("OneJournal", "hold", "cancelled")
        unexpected = counter(metrics.PROTOCOL_ERRORS, "OneJournal", "unexpected")
        async with OneJournal() as pool:
            task = asyncio.create_task(pool.call(Journal.hold, gate, journal, "held"))
            await eventually(lambda: running_pid(pool, "hold"))
            pid = running_pid(pool, "hold")
            await cancelled(task)
            assert running_pid(pool, "hold") == pid  # still running on the same worker
            Path(gate).touch()
            await eventually(lambda: lines(journal) == ["held"])  # it ran to completion
            assert await pool.call(Journal.record, journal, "next") == pid  # same worker
            assert pool.snapshot().restarts == 0
        assert calls("OneJournal", "hold", "cancelled") == before + 1
        assert counter(metrics.PROTOCOL_ERRORS, "OneJournal", "unexpected") == unexpected

    run(scenario())


def test_cancel_kill_kills_the_worker_and_costs_no_other_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung native call whose caller gives up: its worker is killed and replaced at once
    (not a crash: no restart counted, no backoff), and the other worker's call is untouched."""
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")

    async def scenario() -> None:
        cancelled_before = calls("TwoJournals", "hold", "cancelled")
        recycled = counter(metrics.WORKER_RECYCLES, "TwoJournals", "cancelled")
        crashes = counter(metrics.WORKER_CRASHES, "TwoJournals", "SIGKILL")
        async with TwoJournals() as pool:
            other = asyncio.create_task(pool.call(Journal.hold, gate, journal, "other"))
            await eventually(lambda: running_pid(pool, "hold"))
            other_pid = running_pid(pool, "hold")
            killing = pool.options(cancel="kill")
            hung = asyncio.create_task(killing.call(Journal.hold, gate + "-never", journal, "x"))
            await eventually(lambda: sum(w.running == "hold" for w in pool.snapshot().workers) == 2)
            hung_pid = next(w.pid for w in pool.snapshot().workers if w.pid != other_pid)
            with caplog.at_level(logging.INFO, logger="minions.pool"):
                await cancelled(hung)
                await eventually(lambda: hung_pid not in pool.worker_pids())
                assert await pool.wait_ready()
            Path(gate).touch()
            assert await other == other_pid  # the other caller never noticed
            snap = pool.snapshot()
            assert snap.restarts == 0 and snap.circuit.value == "closed"
            assert other_pid in snap.pids and len(snap.pids) == 2
        assert lines(journal) == ["other"]  # the killed call never got past its gate
        assert calls("TwoJournals", "hold", "cancelled") == cancelled_before + 1
        assert counter(metrics.WORKER_RECYCLES, "TwoJournals", "cancelled") == recycled + 1
        assert counter(metrics.WORKER_CRASHES, "TwoJournals", "SIGKILL") == crashes
        about = [r.getMessage() for r in caplog.records if f"(pid {hung_pid})" in r.getMessage()]
        assert len(about) == 2, about  # the decision, then the one line of its death
        assert "the caller of hold() cancelled it" in about[0]
        assert about[1].endswith(f"(pid {hung_pid}) stopped (cancelled)"), about

    run(scenario())


def test_cancel_kill_of_a_queued_call_only_withdraws_it(tmp_path: Path) -> None:
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")

    async def scenario() -> None:
        async with OneJournal() as pool:
            busy = asyncio.create_task(pool.call(Journal.hold, gate, journal, "first"))
            await eventually(lambda: running_pid(pool, "hold"))
            pid = running_pid(pool, "hold")
            killing = pool.options(cancel="kill")
            queued = asyncio.create_task(killing.call(Journal.record, journal, "withdrawn"))
            await eventually(lambda: pool.snapshot().queue_depth == 1)
            await cancelled(queued)
            Path(gate).touch()
            assert await busy == pid
            assert pool.worker_pids() == [pid]  # nobody was killed
        assert lines(journal) == ["first"]

    run(scenario())
