"""``pool.map`` with real workers: order, bounded memory over an endless iterable, stopping on
the first error or collecting errors, and cancelling what is left when the consumer stops."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from call_services import Entry, Journal, lines
from conftest import eventually, run
from minions.errors import RemoteError
from minions.ops import metrics
from minions.workers import WorkerPool
from native_demo.service import NativeDemo
from pools import running_pid


class MapPool(WorkerPool[NativeDemo]):
    workers = 2


class MapJournal(WorkerPool[Journal]):
    workers = 1
    call_timeout_s = 20.0


class Counted:
    """An iterable that counts how many items were taken from it."""

    def __init__(self, items: Iterator[object]) -> None:
        self.items = items
        self.taken = 0

    def __iter__(self) -> Iterator[object]:
        for item in self.items:
            self.taken += 1
            yield item


def cancelled_calls(pool: str, method: str) -> float:
    return metrics.WORKER_CALLS.labels(pool, method, "cancelled")._value.get()


class TwoJournals(MapJournal):
    workers = 2


def test_results_come_in_order() -> None:
    async def scenario() -> None:
        async with MapPool() as pool:
            ordered = [r async for r in pool.map(NativeDemo.ping, range(200))]
            assert ordered == list(range(200))
            assert [r async for r in pool.map("ping", [])] == []

    run(scenario())


def test_unordered_results_come_as_they_complete(tmp_path: Path) -> None:
    """The first item holds one worker until its gate opens; the other three, served by the
    second worker meanwhile, are yielded first."""
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")
    entries = [Entry(journal, "held", gate), *(Entry(journal, f"e{i}") for i in range(3))]

    async def scenario() -> None:
        async with TwoJournals() as pool:
            got = []
            async for tag in pool.map(Journal.entry, entries, ordered=False):
                got.append(tag)
                if len(got) == 3:
                    assert lines(journal) == ["e0", "e1", "e2"]  # "held" waits at its gate
                    Path(gate).touch()
            assert got == ["e0", "e1", "e2", "held"]

    run(scenario())


def test_an_endless_iterable_is_taken_only_as_results_are_consumed() -> None:
    async def scenario() -> None:
        async with MapPool() as pool:
            source = Counted(itertools.count())
            yielded = 0
            async for value in pool.map(NativeDemo.ping, source, max_in_flight=8):
                assert value == yielded
                yielded += 1
                assert source.taken <= yielded + 8  # never more than the window ahead
                if yielded == 300:
                    break
            taken = source.taken
            assert pool.snapshot().queue_depth == 0  # what was left was withdrawn at once
            await eventually(lambda: pool.snapshot().in_flight == 0)
            assert source.taken == taken  # and nothing more was taken

    run(scenario())


class UnpipelinedJournal(MapJournal):
    pipeline_depth = 1  # a sent call is running: the others stay in the queue


def test_breaking_out_of_async_for_cancels_what_is_left_at_once(tmp_path: Path) -> None:
    """One worker: e0 is yielded while e1 runs (held by its gate) and e2..e4 wait in the
    queue. Leaving the loop drops the stream, which withdraws the queued ones right away."""
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")
    entries = [Entry(journal, "e0"), *(Entry(journal, f"e{i}", gate) for i in range(1, 50))]

    async def scenario() -> None:
        async with UnpipelinedJournal() as pool:
            async for tag in pool.map(Journal.entry, entries, max_in_flight=4):
                assert tag == "e0"
                await eventually(lambda: running_pid(pool, "entry"))  # e1 at its gate
                assert pool.snapshot().queue_depth == 3
                break
            assert pool.snapshot().queue_depth == 0  # no garbage collection needed
            Path(gate).touch()
            await eventually(lambda: pool.snapshot().in_flight == 0)
        assert lines(journal) == ["e0", "e1"]

    run(scenario())


def test_the_first_error_ends_the_stream_after_the_results_before_it() -> None:
    async def scenario() -> None:
        async with TwoJournals() as pool:
            source = Counted(iter([0, 1, 2, -3, *range(4, 10_000)]))
            got = []
            with pytest.raises(RemoteError, match="negative: -3"):
                async for value in pool.map(Journal.positive, source, max_in_flight=16):
                    got.append(value)
            assert got == [0, 1, 2]
            assert source.taken <= 4 + 16
            await eventually(lambda: pool.snapshot().in_flight == 0)
            assert pool.snapshot().queue_depth == 0

    run(scenario())


def test_an_error_stops_taking_items_before_the_consumer_reaches_it(tmp_path: Path) -> None:
    """The first item waits at its gate while the second fails: no item is taken any more and
    nothing more is started, though the consumer still gets the first. (Items already taken
    may still have been sent to the freed worker while the burst that delivered the failure
    was handled, before the stream saw it; they run, their results dropped.)"""
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")
    bad = Entry(str(tmp_path / "no-such-dir" / "journal"), "bad")
    items = [Entry(journal, "e0", gate), bad, *(Entry(journal, f"e{i}") for i in range(2, 99))]

    async def scenario() -> None:
        async with TwoJournals() as pool:
            source = Counted(iter(items))
            stream = pool.map(Journal.entry, source, max_in_flight=4)
            first = asyncio.create_task(stream.__anext__())
            await eventually(lambda: pool.snapshot().queue_depth == 0 and source.taken == 4)
            await eventually(lambda: pool.snapshot().in_flight == 1)  # "bad" failed, e0 holds
            Path(gate).touch()
            assert await first == "e0"
            with pytest.raises(RemoteError, match="FileNotFoundError"):
                await stream.__anext__()
            assert source.taken == 4
        ran = lines(journal)
        assert ran[-1] == "e0" and set(ran) <= {"e0", "e2", "e3"}  # nothing beyond the window

    run(scenario())


def test_unordered_the_first_error_ends_the_stream_too() -> None:
    async def scenario() -> None:
        async with TwoJournals() as pool:
            stream = pool.map(Journal.positive, [1, -1, *range(2, 500)], ordered=False)
            with pytest.raises(RemoteError, match="negative: -1"):
                async for _ in stream:
                    pass
            assert [r async for r in stream] == []  # ended for good

    run(scenario())


def test_return_exceptions_yields_errors_in_their_place() -> None:
    async def scenario() -> None:
        async with TwoJournals() as pool:
            items: list[object] = [1, -2, object(), 4]  # object() cannot even be encoded
            out = [r async for r in pool.map("positive", items, return_exceptions=True)]
            assert out[0] == 1 and out[3] == 4
            assert isinstance(out[1], RemoteError) and out[1].kind == "exception"
            assert isinstance(out[2], TypeError)

    run(scenario())


def test_an_item_refused_before_dispatch_fails_in_its_place() -> None:
    async def scenario() -> None:
        async with MapPool() as pool:
            got = []
            with pytest.raises(TypeError):
                async for value in pool.map(NativeDemo.ping, [1, 2, object(), 4]):
                    got.append(value)
            assert got == [1, 2]

    run(scenario())


def test_a_consumer_that_is_cancelled_cancels_every_call_in_flight(tmp_path: Path) -> None:
    """One worker: the first item runs (held by its gate), three wait in the queue. Cancelling
    the consumer withdraws the three (they never run) and drops the first one's result."""
    gate, journal = str(tmp_path / "gate"), str(tmp_path / "journal")
    entries = [Entry(journal, f"e{i}", gate) for i in range(100)]

    async def scenario() -> None:
        before = cancelled_calls("MapJournal", "entry")
        async with MapJournal() as pool:

            async def consume() -> None:
                async for _ in pool.map(Journal.entry, entries, max_in_flight=4):
                    raise AssertionError("nothing can finish while the gate is shut")

            consumer = asyncio.create_task(consume())
            await eventually(lambda: running_pid(pool, "entry"))
            await eventually(lambda: pool.snapshot().queue_depth == 3)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
            assert pool.snapshot().queue_depth == 0
            Path(gate).touch()
            await eventually(lambda: pool.snapshot().in_flight == 0)
            await pool.call(Journal.record, journal, "after")
        assert lines(journal) == ["e0", "after"]
        assert cancelled_calls("MapJournal", "entry") == before + 4

    run(scenario())


def test_leaving_async_with_cancels_what_is_left(tmp_path: Path) -> None:
    """e0 has its own gate; once it is yielded, e1 runs (held by the second gate) and e2, e3
    wait in the queue: leaving the block withdraws them, and e1 finishes with nobody waiting."""
    first_gate, gate, journal = str(tmp_path / "g0"), str(tmp_path / "g1"), str(tmp_path / "j")
    entries = [
        Entry(journal, "e0", first_gate),
        *(Entry(journal, f"e{i}", gate) for i in (1, 2, 3)),
    ]

    async def scenario() -> None:
        async with UnpipelinedJournal() as pool:
            async with pool.map(Journal.entry, entries, max_in_flight=3) as stream:
                assert pool.snapshot().in_flight == 0  # lazy: nothing starts before asked
                first = asyncio.create_task(stream.__anext__())
                await eventually(lambda: pool.snapshot().queue_depth == 2)
                Path(first_gate).touch()
                assert await first == "e0"
                await eventually(lambda: running_pid(pool, "entry"))  # e1, at the second gate
                assert pool.snapshot().queue_depth == 2  # e2 and e3
            assert pool.snapshot().queue_depth == 0
            Path(gate).touch()
            await eventually(lambda: pool.snapshot().in_flight == 0)
            assert [r async for r in stream] == []
        assert lines(journal) == ["e0", "e1"]  # e2 and e3 never ran

    run(scenario())


def test_bad_arguments_are_refused_at_once() -> None:
    pool = MapPool()

    async def source() -> object:  # an async generator function
        yield 1  # type: ignore[misc]

    with pytest.raises(ValueError, match="max_in_flight"):
        pool.map(NativeDemo.ping, [1], max_in_flight=0)
    with pytest.raises(ValueError, match="ordered"):
        pool.map(NativeDemo.ping, [1], ordered=None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="TaskGroup"):
        pool.map(NativeDemo.ping, source())  # type: ignore[arg-type]
