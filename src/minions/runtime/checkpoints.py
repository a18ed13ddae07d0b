"""One orchestration's checkpoint writes, under the workflow persistence failure policy.

Design note. The common path is one call into the store per step and nothing else: the policy
only runs once a save or delete has failed. Then:

- the failure is counted (``minions_checkpoint_failures_total``) and reported (log, and the
  console the first time);
- ``continue-on-failure`` lets the workflow run its step anyway: the previous checkpoint is
  still in the store, so a crash resumes from an earlier step (at-least-once holds);
- ``idle-until-persisted`` retries with capped exponential backoff and jitter, counting the
  workflow in ``minions_workflows_blocked`` while it waits, warning every
  ``warning_interval_s`` and logging an error once ``error_after_s`` has passed. Cancellation
  (shutdown past its grace period) ends the wait and keeps the last durable checkpoint.

A terminal delete is queued without waiting when the store can queue and the policy is
``continue-on-failure``: waiting would buy nothing, since a crash before the commit re-runs the
last step exactly as a crash just before the delete does.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable

from minions.runtime import telemetry
from minions.runtime.config import PersistencePolicy
from minions.runtime.console import Failures
from minions.runtime.log import ERROR, WARNING, ids
from minions.runtime.store_contract import StateStore, WorkflowRecord
from minions.runtime.telemetry import RuntimeMetrics


class Unencodable(Exception):
    """A workflow's context no longer encodes: not retryable, the workflow cannot go on."""


class Checkpoints:
    """Saves and deletes of one orchestration; see the module note."""

    def __init__(
        self,
        orchestration_id: str,
        store: StateStore,
        policy: PersistencePolicy,
        failures: Failures,
        metrics: RuntimeMetrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.id = orchestration_id
        self.store = store
        self.policy = policy
        self._failures = failures
        self._metrics = metrics
        self._sleep = sleep
        self._idle = policy.on_failure == "idle-until-persisted"
        # The idle policy must see each delete succeed, so it never queues one.
        self._delete_nowait = None if self._idle else store.delete_nowait
        self._blocked = {
            op: metrics.child(telemetry.BLOCKED, orchestration=orchestration_id, operation=op)
            for op in ("save", "delete")
        }
        self._blocked_counts = {"save": 0, "delete": 0}
        # Queued deletes by the future they settle with (shared by a store's whole batch).
        self._forgetting: dict[asyncio.Future[None], list[str]] = {}

    # --- saves --------------------------------------------------------------------------------

    async def save_failed(self, record: WorkflowRecord, step: str, exc: Exception) -> bool:
        """A save raised ``exc``: report it, then retry (idle policy) or give up. True once the
        record is durable after all."""
        self._report("save", "save", exc, record.workflow_id, f"before step {step}")
        if not self._idle:
            return False
        await self._retry("save", record.workflow_id, functools.partial(self.store.save, record))
        return True

    def unencodable(self, workflow_id: str, step: str, exc: Exception) -> None:
        self._report("save", "serialize", exc, workflow_id, f"before step {step}")

    # --- deletes ------------------------------------------------------------------------------

    def forget(self, workflow_id: str) -> Awaitable[None] | None:
        """End a finished workflow's checkpoint: ``None`` when the delete was queued (its
        failure is reported when it settles), else an awaitable to wait on.

        A store may hand the same future to several queued deletes (the SQLite store does, for
        one turn of the loop): they are watched with one callback, and a failure names each.
        """
        if self._delete_nowait is not None:
            future = self._delete_nowait(self.id, workflow_id)
            if future is not None:
                waiting = self._forgetting.get(future)
                if waiting is None:
                    self._forgetting[future] = [workflow_id]
                    future.add_done_callback(self._on_forgotten)
                else:
                    waiting.append(workflow_id)
                return None
        return self._forget(workflow_id)

    async def _forget(self, workflow_id: str) -> None:
        try:
            await self.store.delete(self.id, workflow_id)
        except Exception as exc:
            self._report("delete", "delete", exc, workflow_id, "after it ended")
            if self._idle:
                await self._retry(
                    "delete",
                    workflow_id,
                    functools.partial(self.store.delete, self.id, workflow_id),
                )

    def _on_forgotten(self, future: asyncio.Future[None]) -> None:
        workflow_ids = self._forgetting.pop(future, [])
        if not future.cancelled() and (exc := future.exception()) is not None:
            assert isinstance(exc, Exception)
            for workflow_id in workflow_ids:
                self._report("delete", "delete", exc, workflow_id, "after it ended")

    # --- failures -----------------------------------------------------------------------------

    def _report(self, operation: str, stage: str, exc: Exception, wid: str, where: str) -> None:
        self._metrics.child(
            telemetry.CHECKPOINT_FAILURES, orchestration=self.id, operation=operation, stage=stage
        ).inc()
        if stage == "serialize":
            what = (
                f"workflow context no longer encodes {where}: {exc}; the workflow stopped and "
                "its last checkpoint is kept (fix the type of the field the step set, then "
                "restart to resume it)"
            )
        elif operation == "save":
            then = {
                "continue-on-failure": "the step runs anyway and a crash would resume it from "
                "its previous checkpoint",
                "idle-until-persisted": "the workflow waits, retrying, until the save succeeds",
            }[self.policy.on_failure]
            what = f"checkpoint save failed {where}: {exc!r}; {then}"
        else:
            what = (
                f"could not delete the finished workflow's checkpoint: {exc!r}; it would re-run "
                "its last step on resume"
            )
        self._failures(
            ("checkpoint", self.id, stage, type(exc).__name__), what, exc,
            extra=ids(self.id, wid)["extra"],
        )  # fmt: skip

    async def _retry(
        self, operation: str, wid: str, attempt: Callable[[], Awaitable[None]]
    ) -> None:
        """Until ``attempt`` succeeds, with backoff; counted as blocked meanwhile."""
        policy = self.policy
        started = last_warning = time.monotonic()
        delay = 0.0
        self._set_blocked(operation, +1)
        try:
            while True:
                delay = policy.next_delay(delay)
                jitter = delay * policy.jitter_ratio
                await self._sleep(max(0.0, delay + random.uniform(-jitter, jitter)))
                try:
                    await attempt()
                    return
                except Exception as exc:
                    now = time.monotonic()
                    if now - last_warning >= policy.warning_interval_s:
                        last_warning = now
                        late = (
                            policy.error_after_s is not None
                            and now - started >= policy.error_after_s
                        )
                        self._failures.logger.emit(
                            ERROR if late else WARNING,
                            f"checkpoint {operation} still failing after {now - started:.0f}s, "
                            f"workflow idle until it is persisted: {exc!r}",
                            None, ids(self.id, wid)["extra"],
                        )  # fmt: skip
        finally:
            self._set_blocked(operation, -1)

    def _set_blocked(self, operation: str, change: int) -> None:
        self._blocked_counts[operation] += change
        self._blocked[operation].set(self._blocked_counts[operation])
