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
import itertools
import os
import sys
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import msgspec

from minions.errors import AbortWorkflow
from minions.runtime import telemetry
from minions.runtime.checkpoints import Checkpoints, Unencodable
from minions.runtime.composition import Composition
from minions.runtime.config import PersistencePolicy
from minions.runtime.console import Failures
from minions.runtime.identity import import_path
from minions.runtime.log import ids
from minions.runtime.minion import CURRENT_WORKFLOW, Minion, WorkflowScope
from minions.runtime.results import OrchestrationState, OrchestrationStatus
from minions.runtime.store_contract import StateStore, WorkflowRecord
from minions.runtime.telemetry import RuntimeMetrics

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_LIBRARY_DIRS = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    PARKED = "parked"


class _Workflow(WorkflowScope, gc=False):
    """One workflow: what its steps see (the scope) plus what its checkpoints need."""

    event_bytes: bytes | None = None  # the event encoded once, for every checkpoint
    step_index: int = 0
    created_at: float = 0.0
    saved: bool = False  # a checkpoint of it is in the store: delete it when it ends


class Orchestration:
    """Runs workflows of one (pipeline, minion, config) composition; a pipeline subscriber."""

    def __init__(
        self,
        composition: Composition,
        minion: Minion[Any, Any],
        store: StateStore | None,
        failures: Failures,
        metrics: RuntimeMetrics,
        max_in_flight: int,
        policy: PersistencePolicy,
    ) -> None:
        self.id = composition.orchestration_id
        self.composition = composition
        self.minion = minion
        self.state = OrchestrationState.STARTING
        self.max_in_flight = max_in_flight
        self.counts = {outcome: 0 for outcome in Outcome}  # SUCCEEDED is self.succeeded
        self.succeeded = 0
        self._store = store
        self._checkpoints = (
            Checkpoints(self.id, store, policy, failures, metrics) if store is not None else None
        )
        self._failures = failures
        self._metrics = metrics
        self._steps = [getattr(minion, name) for name in composition.steps]
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by workflow id (one task each)
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
        self._step_timers = [
            metrics.child(telemetry.STEP_SECONDS, orchestration=self.id, step=name)
            for name in composition.steps
        ]
        self._lifecycle = {
            e: metrics.child(telemetry.WORKFLOWS, orchestration=self.id, event=e) for e in _EVENTS
        }
        self._started = self._lifecycle["started"]
        self._succeeded = self._lifecycle["succeeded"]
        self._new_context = composition.context_type
        self._loop = asyncio.get_running_loop()
        self._gauge = metrics.child(telemetry.IN_FLIGHT, orchestration=self.id)
        self._gauge_live = callable(getattr(self._gauge, "set_function", None))
        if self._gauge_live:  # read at scrape time, not per workflow
            self._gauge.set_function(lambda: len(self._tasks))
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

    def has_room(self) -> bool:
        """True while another workflow may start now (the pipeline's fast path)."""
        return len(self._tasks) < self.max_in_flight or self._draining

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
        workflow = _Workflow(
            f"{self._id_prefix}{next(self._id_counter):x}", event, self._new_context(), self.id,
            encoded, 0, time.time(),
        )  # fmt: skip
        self._started.inc()
        self._spawn(workflow)

    # --- resume ------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Restart this orchestration's saved workflows at their stored step; returns the count.

        Workflows saved under the id the same components had before they were stamped are
        adopted (re-keyed to this id first). A record that no longer decodes (the event or
        context type changed incompatibly) is logged and left in the store for an operator,
        never silently deleted.
        """
        if self._store is None:
            return 0
        resumed = 0
        records = [(self.id, r) for r in await self._store.load(self.id)]
        for old_id in self.composition.adopt_from:
            records += [(old_id, r) for r in await self._store.load(old_id)]
        for saved_under, record in records:
            try:
                event = self._event_decoder.decode(record.event)
                context = self._context_decoder.decode(record.context)
            except msgspec.DecodeError as exc:
                self._failures.logger.error(
                    "saved workflow no longer decodes, left in the store: %s", exc,
                    **ids(saved_under, record.workflow_id),
                )  # fmt: skip
                continue
            if saved_under != self.id:
                record = msgspec.structs.replace(record, orchestration_id=self.id)
                await self._store.move(record, saved_under)
            workflow = _Workflow(
                record.workflow_id, event, context, self.id, record.event, record.step_index,
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
        return set(self._tasks.values())

    async def cancel_remaining(self) -> int:
        """Cancel workflows still running after the grace period; their checkpoints stay."""
        remaining = list(self._tasks.values())
        for task in remaining:
            task.cancel()
        await asyncio.gather(*remaining, return_exceptions=True)
        if self._gauge_live:
            self._gauge.set_function(lambda: 0.0)  # release this object; the series reads 0
        else:
            self._gauge.set(0)
        return len(remaining)

    def status(self) -> OrchestrationStatus:
        return OrchestrationStatus(
            orchestration_id=self.id,
            pipeline=import_path(self.composition.pipeline_cls),
            minion=import_path(self.composition.minion_cls),
            state=self.state,
            in_flight=len(self._tasks),
            max_in_flight=self.max_in_flight,
            succeeded=self.succeeded,
            failed=self.counts[Outcome.FAILED],
            aborted=self.counts[Outcome.ABORTED],
        )

    # --- workflows ---------------------------------------------------------------------------

    def _spawn(self, workflow: _Workflow) -> None:
        name = f"minions-wf:{workflow.workflow_id}"
        task = self._loop.create_task(self._run(workflow), name=name)
        self._tasks[workflow.workflow_id] = task
        if not self._gauge_live:
            self._gauge.set(len(self._tasks))

    async def _run(self, workflow: _Workflow) -> None:
        """One workflow's task: each step after its checkpoint, then the accounting.

        The task ends by removing itself from the orchestration, so no done-callback (one more
        loop turn per workflow) is needed; a crash of this bookkeeping itself is reported.
        """
        CURRENT_WORKFLOW.set(workflow)
        outcome = Outcome.SUCCEEDED
        index = workflow.step_index
        try:
            try:
                for index in range(workflow.step_index, len(self._steps)):
                    if self._store is not None:
                        try:
                            await self._checkpoint(workflow, index)
                            durable: bool | None = True
                        except Exception as exc:
                            durable = await self._save_failed(workflow, index, exc)
                        if durable is None:  # the context no longer encodes: stop here
                            outcome = Outcome.FAILED
                            break
                        if durable:
                            workflow.saved = True
                            if self._draining:
                                outcome = Outcome.PARKED
                                break
                    started = time.perf_counter()
                    await self._steps[index]()
                    self._step_timers[index].observe(time.perf_counter() - started)
            except AbortWorkflow as exc:
                outcome = self._aborted(workflow, index, exc)
            except Exception as exc:
                outcome = self._failed(workflow, index, exc)
            pending = self._ended(workflow, outcome)
            if pending is not None:
                await pending
        except Exception as exc:
            self._failures(
                ("workflow-task", self.id, type(exc).__name__),
                f"workflow task crashed: {exc!r}", exc, extra=ids(self.id)["extra"],
            )  # fmt: skip
        finally:
            self._tasks.pop(workflow.workflow_id, None)
            self._room.set()
            if not self._gauge_live:
                self._gauge.set(len(self._tasks))

    def _ended(self, workflow: _Workflow, outcome: Outcome) -> Awaitable[None] | None:
        """Count the outcome; a finished workflow's checkpoint goes (awaitable, or ``None``
        when the delete was queued without waiting)."""
        if outcome is Outcome.SUCCEEDED:  # the hot path: no enum hashing
            self._succeeded.inc()
            self.succeeded += 1
        else:
            self.counts[outcome] += 1
            if outcome is Outcome.PARKED:
                return None
            self._lifecycle[outcome.value].inc()
        if not workflow.saved:
            return None
        assert self._checkpoints is not None
        return self._checkpoints.forget(workflow.workflow_id)

    def _checkpoint(self, workflow: _Workflow, index: int) -> Awaitable[None]:
        """The save before step ``index``, for the caller to await. A plain call, not a
        coroutine: every waiting workflow then holds one coroutine fewer for the GC to scan."""
        assert self._store is not None and workflow.event_bytes is not None  # encoded once
        try:
            context = self._encoder.encode(workflow.context)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise Unencodable(str(exc)) from exc
        record = WorkflowRecord(  # positional: this runs before every step
            self.id, workflow.workflow_id, workflow.event_bytes, context, index,
            workflow.created_at, time.time(),
        )  # fmt: skip
        return self._store.save(record)

    async def _save_failed(self, workflow: _Workflow, index: int, exc: Exception) -> bool | None:
        """The save before step ``index`` raised: the policy decides (see ``checkpoints``).
        True once durable after all, False to run the step anyway, None to stop the workflow
        (its context no longer encodes: not retryable, its last durable checkpoint is kept)."""
        assert self._checkpoints is not None and workflow.event_bytes is not None
        step = self.composition.steps[index]
        if isinstance(exc, Unencodable):
            self._checkpoints.unencodable(workflow.workflow_id, step, exc)
            workflow.saved = False  # nothing to delete: the last good checkpoint stays
            return None
        record = WorkflowRecord(
            self.id, workflow.workflow_id, workflow.event_bytes,
            self._encoder.encode(workflow.context), index, workflow.created_at, time.time(),
        )  # fmt: skip
        return await self._checkpoints.save_failed(record, step, exc)

    def _aborted(self, workflow: _Workflow, index: int, exc: AbortWorkflow) -> Outcome:
        self._step_ended(index, "aborted")
        self._failures.logger.info(
            "workflow aborted in step %s: %s", self.composition.steps[index], exc,
            **ids(self.id, workflow.workflow_id),
        )  # fmt: skip
        return Outcome.ABORTED

    def _failed(self, workflow: _Workflow, index: int, exc: Exception) -> Outcome:
        self._step_ended(index, "failed")
        self._log_failure(workflow, index, exc)
        return Outcome.FAILED

    def _step_ended(self, index: int, outcome: str) -> None:
        step = self.composition.steps[index]
        self._metrics.child(
            telemetry.STEP_FAILURES, orchestration=self.id, step=step, outcome=outcome
        ).inc()

    def _log_failure(self, workflow: _Workflow, index: int, exc: Exception) -> None:
        filename, lineno = user_frame(exc)
        step = self.composition.steps[index]
        minion = self.composition.minion_cls.__name__
        self._failures(
            ("workflow", self.id, step, type(exc).__name__, f"{filename}:{lineno}"),
            f"workflow failed in step {step} of {minion} at {filename}:{lineno}: "
            f"{type(exc).__name__}: {exc}",
            exc, extra=ids(self.id, workflow.workflow_id)["extra"],
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
