"""One running orchestration: its workflows, their checkpoints, and resume.

Design note — durability contract. Before step *i* of a workflow runs, the record (event,
context, next step index *i*) is saved and the save returns only once durable. When the process
dies, the workflow resumes at step *i* the next time its orchestration starts, so **the step that
was interrupted runs again** (at-least-once; completed steps never re-run; make step effects
idempotent or tolerate a repeat). Success, ``AbortWorkflow`` and failure delete the record.

Stopping is cooperative first: once draining, a durable workflow finishes the step it is in,
checkpoints the next one and parks; whatever is still running when the grace period ends is
cancelled, keeping its last checkpoint. Stateless workflows have nothing to park in, so they run
on until the grace period ends.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import os
import sys
import time
import traceback
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from minions.errors import AbortWorkflow
from minions.ops.metrics import STEP_SECONDS, WORKFLOWS, WORKFLOWS_IN_FLIGHT
from minions.runtime.composition import Composition, import_path
from minions.runtime.log import LoggerLike, ids
from minions.runtime.minion import CURRENT_WORKFLOW, Minion, WorkflowScope
from minions.runtime.results import OrchestrationState, OrchestrationStatus
from minions.runtime.state import SQLiteStateStore, StateStore, WorkflowRecord

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_LIBRARY_DIRS = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    PARKED = "parked"


@dataclass(slots=True)
class _Workflow:
    workflow_id: str
    event: Any
    event_bytes: bytes | None
    context: Any
    step_index: int
    created_at: float
    saved: bool = False


class Orchestration:
    """Runs workflows of one (pipeline, minion, config) composition; a pipeline subscriber."""

    def __init__(
        self,
        composition: Composition,
        minion: Minion[Any, Any],
        store: StateStore | None,
        logger: LoggerLike,
        max_in_flight: int,
    ) -> None:
        self.id = composition.orchestration_id
        self.composition = composition
        self.minion = minion
        self.state = OrchestrationState.STARTING
        self.max_in_flight = max_in_flight
        self.counts = {outcome: 0 for outcome in Outcome}
        self._store = store
        self._delete_nowait = store.delete_nowait if isinstance(store, SQLiteStateStore) else None
        self._logger = logger
        self._steps = [getattr(minion, name) for name in composition.steps]
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self._draining = False
        self._encoder = msgspec.msgpack.Encoder()
        self._event_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            composition.event_type
        )
        self._context_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            composition.context_type
        )
        self._step_timers = [STEP_SECONDS.labels(self.id, name) for name in composition.steps]
        self._lifecycle = {e: WORKFLOWS.labels(self.id, e) for e in _EVENTS}
        self._gauge = WORKFLOWS_IN_FLIGHT.labels(self.id)
        self._gauge.set_function(lambda: len(self._tasks))  # read at scrape time, not per step
        # Workflow ids: a random prefix per start plus a counter, unique across restarts and far
        # cheaper than a uuid4 per workflow.
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_counter = itertools.count(1)

    # --- pipeline subscriber -----------------------------------------------------------------

    @property
    def needs_encoding(self) -> bool:
        return self._store is not None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_capacity(self) -> None:
        """Block the pipeline while this orchestration is full (the backpressure point)."""
        while len(self._tasks) >= self.max_in_flight and not self._draining:
            self._room.clear()
            await self._room.wait()

    def submit(self, event: Any, encoded: bytes | None, fanned_out: bool) -> None:
        """Start a workflow for a freshly produced event (even while draining: a durable
        workflow then checkpoints step 0 and parks, so an event already taken is never lost)."""
        if encoded is None and self._store is not None:
            encoded = self._encoder.encode(event)
        context = self.composition.context_type()
        workflow_id = f"{self._id_prefix}{next(self._id_counter):x}"
        workflow = _Workflow(workflow_id, event, encoded, context, 0, time.time())
        self._lifecycle["started"].inc()
        self._spawn(workflow)

    # --- resume ------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Restart this orchestration's saved workflows at their stored step; returns the count.

        A record that no longer decodes (the event or context type changed incompatibly) is
        logged and left in the store for an operator, never silently deleted.
        """
        if self._store is None:
            return 0
        resumed = 0
        for record in await self._store.load(self.id):
            try:
                event = self._event_decoder.decode(record.event)
                context = self._context_decoder.decode(record.context)
            except msgspec.DecodeError as exc:
                self._logger.error(
                    "saved workflow no longer decodes, left in the store: %s", exc,
                    **ids(self.id, record.workflow_id),
                )  # fmt: skip
                continue
            workflow = _Workflow(
                record.workflow_id, event, record.event, context, record.step_index,
                record.created_at, saved=True,
            )  # fmt: skip
            self._lifecycle["resumed"].inc()
            self._spawn(workflow)
            resumed += 1
        return resumed

    # --- stopping ----------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """No new steps for durable workflows; wake a pipeline waiting for room."""
        self.state = OrchestrationState.STOPPING
        self._draining = True
        self._room.set()

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self._tasks

    async def cancel_remaining(self) -> int:
        """Cancel workflows still running after the grace period; their checkpoints stay."""
        remaining = list(self._tasks)
        for task in remaining:
            task.cancel()
        await asyncio.gather(*remaining, return_exceptions=True)
        self._gauge.set_function(lambda: 0.0)  # release this object; the series reads 0
        return len(remaining)

    def status(self) -> OrchestrationStatus:
        return OrchestrationStatus(
            orchestration_id=self.id,
            pipeline=import_path(self.composition.pipeline_cls),
            minion=import_path(self.composition.minion_cls),
            state=self.state,
            in_flight=len(self._tasks),
            max_in_flight=self.max_in_flight,
            succeeded=self.counts[Outcome.SUCCEEDED],
            failed=self.counts[Outcome.FAILED],
            aborted=self.counts[Outcome.ABORTED],
        )

    # --- workflows ---------------------------------------------------------------------------

    def _spawn(self, workflow: _Workflow) -> None:
        task = asyncio.create_task(self._run(workflow), name=f"minions-wf:{workflow.workflow_id}")
        self._tasks.add(task)
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._logger.error("workflow task crashed: %r", exc, exc_info=exc, **ids(self.id))

    async def _run(self, workflow: _Workflow) -> None:
        CURRENT_WORKFLOW.set(WorkflowScope(workflow.workflow_id, workflow.event, workflow.context))
        outcome = await self._run_steps(workflow)
        self.counts[outcome] += 1
        if outcome is Outcome.PARKED:
            return
        self._lifecycle[outcome.value].inc()
        if workflow.saved:
            if self._delete_nowait is None:
                await self._forget(workflow)
            else:
                self._forget_soon(workflow.workflow_id)

    async def _run_steps(self, workflow: _Workflow) -> Outcome:
        index = workflow.step_index
        try:
            for index in range(workflow.step_index, len(self._steps)):
                if self._store is not None:
                    await self._checkpoint(workflow, index)
                    workflow.saved = True
                    if self._draining:
                        return Outcome.PARKED
                started = time.perf_counter()
                await self._steps[index]()
                self._step_timers[index].observe(time.perf_counter() - started)
        except AbortWorkflow as exc:
            self._logger.info(
                "workflow aborted in step %s: %s", self.composition.steps[index], exc,
                **ids(self.id, workflow.workflow_id),
            )  # fmt: skip
            return Outcome.ABORTED
        except Exception as exc:
            self._log_failure(workflow, index, exc)
            return Outcome.FAILED
        return Outcome.SUCCEEDED

    def _checkpoint(self, workflow: _Workflow, index: int) -> Awaitable[None]:
        """The save before step ``index``, for the caller to await. A plain call, not a
        coroutine: every waiting workflow then holds one coroutine fewer for the GC to scan."""
        assert self._store is not None and workflow.event_bytes is not None  # encoded once
        record = WorkflowRecord(  # positional: this runs before every step
            self.id, workflow.workflow_id, workflow.event_bytes,
            self._encoder.encode(workflow.context), index, workflow.created_at, time.time(),
        )  # fmt: skip
        return self._store.save(record)

    async def _forget(self, workflow: _Workflow) -> None:
        assert self._store is not None
        try:
            await self._store.delete(self.id, workflow.workflow_id)
        except Exception as exc:
            self._log_forget_failure(workflow.workflow_id, exc)

    def _forget_soon(self, workflow_id: str) -> None:
        """Queue the delete and end the workflow without waiting for its commit.

        Waiting would buy nothing: a crash before the commit re-runs the last step, exactly as
        a crash just before the delete does. It saves every workflow a third suspension and
        keeps its objects from outliving a whole commit. A failure is still logged, and the
        store's loads queue behind the delete, so a restarted orchestration never sees it.
        """
        assert self._delete_nowait is not None
        future = self._delete_nowait(self.id, workflow_id)
        future.add_done_callback(functools.partial(self._on_forgotten, workflow_id))

    def _on_forgotten(self, workflow_id: str, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            self._log_forget_failure(workflow_id, exc)

    def _log_forget_failure(self, workflow_id: str, exc: BaseException) -> None:
        self._logger.error(
            "could not delete the finished workflow's checkpoint (it will re-run its last "
            "step on resume): %r", exc, exc_info=exc, **ids(self.id, workflow_id),
        )  # fmt: skip

    def _log_failure(self, workflow: _Workflow, index: int, exc: Exception) -> None:
        filename, lineno = user_frame(exc)
        self._logger.error(
            "workflow failed in step %s at %s:%d: %s: %s",
            self.composition.steps[index], filename, lineno, type(exc).__name__, exc,
            exc_info=exc, **ids(self.id, workflow.workflow_id),
        )  # fmt: skip


_EVENTS = ("started", "succeeded", "failed", "aborted", "resumed")


def user_frame(exc: BaseException) -> tuple[str, int]:
    """File and line of the innermost traceback frame in user code (not Minions, not libraries),
    falling back to the innermost frame: where the user should look first."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if not name.startswith(_PACKAGE_DIR) and not name.startswith(_LIBRARY_DIRS):
            return name, frame.lineno or 0
    if frames:
        return frames[-1].filename, frames[-1].lineno or 0
    return "<unknown>", 0
