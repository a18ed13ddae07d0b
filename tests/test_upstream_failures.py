"""Failures a user can see, and the workflow persistence failure policies.

The console tests are real processes: the established README example with a typo in a step,
and the same example copied literally (no ``wait_closed()``), which must not exit silently.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from apps.harness import Ev, h, use_harness
from conftest import run
from minions import Gru, Minion, Pipeline, minion_step
from minions.implementations import MemoryStateStore, NoOpLogger
from minions.interfaces import Logger, WorkflowRecord
from minions.ops.metrics import REGISTRY
from minions.runtime.console import Failures

README = """
import asyncio
from dataclasses import dataclass

from minions import Gru, Minion, Pipeline, minion_step


@dataclass
class MyEvent:
    greeting: str = "hello world"


class MyPipeline(Pipeline[MyEvent]):
    async def produce_event(self):
        return MyEvent()


@dataclass
class MyContext:
    last_greeting: str | None = None


class MyMinion(Minion[MyEvent, MyContext]):
    @minion_step
    async def step_1(self):
        self.context.last_greeting = self.event.greeting

    @minion_step
    async def step_2(self):
        print(self.context.last_greeting)


async def main():
    gru = await Gru.create()
    await gru.start_orchestration(MyPipeline, MyMinion)


if __name__ == "__main__":
    asyncio.run(main())
"""


def _python(tmp_path: Path, source: str) -> subprocess.Popen[str]:
    (tmp_path / "example.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, MINIONS_METRICS_PORT="0")  # the code is the README's; the port is ours
    return subprocess.Popen(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_the_readme_example_without_wait_closed_says_why_it_stopped(tmp_path: Path) -> None:
    proc = _python(tmp_path, README)
    _, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err
    assert "the program is exiting while Gru still runs 1 orchestration(s)" in err
    assert "Add `await gru.wait_closed()` after start_orchestration()" in err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_the_first_failing_step_reaches_stderr_once_with_its_traceback(tmp_path: Path) -> None:
    typo = README.replace("print(self.context.last_greeting)", "print(self.context.last_greting)")
    typo = typo.replace(
        "await gru.start_orchestration(MyPipeline, MyMinion)",
        "await gru.start_orchestration(MyPipeline, MyMinion)\n    await gru.wait_closed()",
    )
    proc = _python(tmp_path, typo)
    source = (tmp_path / "example.py").read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(source) if "last_greting" in text)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "workflow failed in step step_2 of MyMinion at " in first, first
        assert f"example.py:{line}: AttributeError: 'MyContext' object has no attribute" in first
        shown = [first]
        while "(shown once;" not in shown[-1]:
            shown.append(proc.stderr.readline())
        proc.send_signal(15)
        rest = "".join(shown) + proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert rest.count("Traceback (most recent call last)") == 1  # the first one only
    assert f'example.py", line {line}, in step_2' in rest
    (summary,) = [line for line in rest.splitlines() if "more like this" in line]
    assert int(summary.split()[1]) > 10  # thousands failed; the console got two reports
    log = (tmp_path / "minions.log").read_text()
    assert log.count("workflow failed in step step_2") > 10  # every one is in the log


# --- Failures, with a fake clock ----------------------------------------------------------------


class _Console(Logger):
    def __init__(self, reaches: bool) -> None:
        self.reaches = reaches
        self.emitted: list[str] = []

    @property
    def reaches_console(self) -> bool:
        return self.reaches

    def emit(self, level: int, msg: str, exc_info: BaseException | None = None,
             extra: Any = None) -> None:  # fmt: skip
        self.emitted.append(msg)

    async def log(self, level: int, msg: str, **kwargs: Any) -> None:
        raise AssertionError("emit is overridden")


def _failures(reaches: bool = False) -> tuple[Failures, _Console, io.StringIO, list[float]]:
    now = [100.0]
    out = io.StringIO()
    logger = _Console(reaches)
    failures = Failures(logger, log_hint="app.log", interval_s=30.0, clock=lambda: now[0],
                        stream=lambda: out)  # fmt: skip
    return failures, logger, out, now


def _boom() -> ValueError:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        return exc


def test_each_kind_is_printed_once_then_counted_per_interval() -> None:
    failures, logger, out, now = _failures()
    for _ in range(5):
        failures(("step", "a"), "step a failed", _boom())
    assert out.getvalue().count("minions: step a failed") == 1
    assert "Traceback" in out.getvalue() and "ValueError: boom" in out.getvalue()
    assert len(logger.emitted) == 5  # the log gets every one
    failures(("step", "b"), "step b failed", _boom())
    assert out.getvalue().count("minions: step b failed") == 1  # another kind: its own first
    now[0] += 30.0
    failures(("step", "a"), "step a failed", _boom())
    (summary,) = [line for line in out.getvalue().splitlines() if "more like this" in line]
    assert summary.startswith("minions: 5 more like this in the last 30.0s: step a failed")
    assert "(see app.log)" in summary
    failures(("step", "a"), "step a failed", _boom())
    failures.flush()
    assert out.getvalue().splitlines()[-1].startswith("minions: 1 more like this")


def test_nothing_is_repeated_when_the_logger_already_writes_to_the_console() -> None:
    failures, logger, out, _ = _failures(reaches=True)
    failures(("step", "a"), "step a failed", _boom())
    assert out.getvalue() == "" and logger.emitted == ["step a failed"]


def test_a_stream_handler_on_stderr_counts_as_reaching_the_console() -> None:
    import logging

    from minions.implementations import LoggingLogger

    quiet = logging.getLogger("test.upstream.quiet")
    quiet.propagate = False
    assert not LoggingLogger(quiet).reaches_console
    loud = logging.getLogger("test.upstream.loud")
    loud.addHandler(logging.StreamHandler(sys.stderr))
    assert LoggingLogger(loud).reaches_console


# --- persistence failure policies ---------------------------------------------------------------


class FlakyStore(MemoryStateStore):
    """Fails the next ``fail_saves`` saves (or deletes) and tells the test each attempt."""

    def __init__(self, fail_saves: int = 0, fail_deletes: int = 0) -> None:
        super().__init__()
        self.fail_saves, self.fail_deletes = fail_saves, fail_deletes
        self.attempts: asyncio.Queue[str] = asyncio.Queue()

    async def save(self, record: WorkflowRecord) -> None:
        self.attempts.put_nowait(f"save {record.step_index}")
        if self.fail_saves > 0:
            self.fail_saves -= 1
            raise OSError("store unreachable")
        await super().save(record)

    async def delete(self, orchestration_id: str, workflow_id: str) -> None:
        self.attempts.put_nowait("delete")
        if self.fail_deletes > 0:
            self.fail_deletes -= 1
            raise OSError("store unreachable")
        await super().delete(orchestration_id, workflow_id)


class Unencodable:
    pass


@dataclass
class Note:
    n: int = 0


@dataclass
class NoteCtx:
    trail: list[Any] = field(default_factory=list)


class NotePipeline(Pipeline[Note]):
    async def produce_event(self) -> Note:
        return Note((await h().events.get()).n)


class NoteMinion(Minion[Note, NoteCtx]):
    @minion_step
    async def first(self) -> None:
        self.context.trail.append("first")
        if self.event.n == 99:
            self.context.trail.append(Unencodable())

    @minion_step
    async def second(self) -> None:
        h().finished.put_nowait((self.event.n, list(self.context.trail)))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _gru(store: FlakyStore, **kwargs: Any) -> Gru:
    return await Gru.create(store, NoOpLogger(), None, **kwargs)


def test_continue_on_failure_runs_the_step_anyway_and_counts_the_failure() -> None:
    async def main() -> None:
        harness = use_harness()
        store = FlakyStore(fail_saves=1)
        gru = await _gru(store)
        try:
            result = await gru.start_orchestration(NotePipeline, NoteMinion)
            assert result.orchestration_id
            labels = {
                "orchestration": result.orchestration_id,
                "operation": "save",
                "stage": "save",
            }
            before = _sample("minions_checkpoint_failures_total", **labels)
            harness.events.put_nowait(Ev(1))
            assert await harness.take(harness.finished, 1) == [(1, ["first"])]
            after = _sample("minions_checkpoint_failures_total", **labels)
            assert after == before + 1
            assert [await store.attempts.get() for _ in range(3)] == ["save 0", "save 1", "delete"]
        finally:
            await gru.shutdown()

    run(main())


def test_idle_until_persisted_waits_for_the_store_and_counts_the_workflow_blocked() -> None:
    async def main() -> None:
        harness = use_harness()
        store = FlakyStore(fail_saves=2)
        gru = await _gru(
            store, workflow_persistence_failure_policy="idle-until-persisted",
            workflow_persistence_retry_delay_seconds=0.01,
            workflow_persistence_retry_max_delay_seconds=0.02,
        )  # fmt: skip
        try:
            result = await gru.start_orchestration(NotePipeline, NoteMinion)
            assert result.orchestration_id
            harness.events.put_nowait(Ev(2))
            assert await store.attempts.get() == "save 0"  # failed
            assert await store.attempts.get() == "save 0"  # the first retry, failed too
            blocked = _sample("minions_workflows_blocked", orchestration=result.orchestration_id,
                              operation="save")  # fmt: skip
            assert blocked == 1 and harness.finished.empty()  # step 0 has not run
            assert await harness.take(harness.finished, 1) == [(2, ["first"])]
            assert _sample("minions_workflows_blocked", orchestration=result.orchestration_id,
                           operation="save") == 0  # fmt: skip
        finally:
            await gru.shutdown()

    run(main())


def test_idle_until_persisted_retries_the_final_delete() -> None:
    async def main() -> None:
        harness = use_harness()
        store = FlakyStore(fail_deletes=1)
        gru = await _gru(store, workflow_persistence_failure_policy="idle-until-persisted",
                         workflow_persistence_retry_delay_seconds=0.01)  # fmt: skip
        try:
            await gru.start_orchestration(NotePipeline, NoteMinion)
            harness.events.put_nowait(Ev(3))
            await harness.take(harness.finished, 1)
            attempts = [await store.attempts.get() for _ in range(4)]
            assert attempts == ["save 0", "save 1", "delete", "delete"]
            assert await store.list_all() == []
        finally:
            await gru.shutdown()

    run(main())


def test_a_context_that_no_longer_encodes_stops_the_workflow_and_keeps_its_checkpoint() -> None:
    async def main() -> None:
        harness = use_harness()
        store = FlakyStore()
        gru = await _gru(store)
        try:
            result = await gru.start_orchestration(NotePipeline, NoteMinion)
            harness.events.put_nowait(Ev(99))
            assert await store.attempts.get() == "save 0"
            harness.events.put_nowait(Ev(4))  # a healthy workflow after it still runs
            assert await harness.take(harness.finished, 1) == [(4, ["first"])]
            (status,) = gru.status().orchestrations
            assert (status.failed, status.succeeded) == (1, 1)
            (kept,) = await store.list_all()
            assert kept.step_index == 0  # the last durable checkpoint, for a fixed version
            oid = result.orchestration_id or ""
            labels = {"orchestration": oid, "operation": "save", "stage": "serialize"}
            assert _sample("minions_checkpoint_failures_total", **labels) == 1
        finally:
            await gru.shutdown()

    run(main())
