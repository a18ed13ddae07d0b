"""The state store interface (``minions.interfaces.StateStore``) and the record Gru saves.

Design note. There is one interface, in two layers, so that a store written for the established
Minions API works unchanged and the shipped stores keep their fast paths:

- The **primitives** every store implements (the established contract): ``save_context``,
  ``delete_context``, ``get_contexts_for_orchestration`` and ``get_all_contexts`` over opaque
  bytes keyed by workflow id, plus optional ``startup``/``shutdown``. A write returns only once
  it is durable.
- The **record methods** Gru calls: ``save``, ``delete``, ``delete_nowait``, ``move``, ``load``
  and ``list_all`` over :class:`WorkflowRecord`, and ``open``/``close``. Their defaults here are
  built on the primitives (the record is the blob, encoded by :func:`encode_record`). The SQLite
  and in-memory stores override them with their native paths (group commit, queued deletes),
  and implement the primitives on top of those, so both layers work on every store.

Gru calls a store only from its event loop.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import msgspec

from minions.errors import StateStoreError


class WorkflowRecord(msgspec.Struct, frozen=True, gc=False):
    """One unfinished workflow. ``event``/``context`` are opaque msgpack bytes to the store.

    ``gc=False``: only str, bytes and numbers, so never part of a cycle; thousands are alive
    while their saves wait for a commit, and the cyclic GC need not scan any of them.
    """

    orchestration_id: str
    workflow_id: str
    event: bytes
    context: bytes
    step_index: int  # index of the NEXT step to run (never negative)
    created_at: float  # time.time() of the workflow's first save
    updated_at: float


@dataclass(frozen=True)
class StoredWorkflowContext:
    """One saved workflow as a store holds it: lookup keys and the runtime's opaque blob."""

    workflow_id: str
    orchestration_id: str
    context: bytes


_FORMAT = 1
_Blob = tuple[int, str, str, bytes, bytes, int, float, float]
_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder: msgspec.msgpack.Decoder[_Blob] = msgspec.msgpack.Decoder(_Blob)


def encode_record(record: WorkflowRecord) -> bytes:
    """The blob a primitive store persists: a versioned msgpack array of the record's fields."""
    return _blob_encoder.encode((_FORMAT, *msgspec.structs.astuple(record)))


def decode_record(blob: bytes) -> WorkflowRecord:
    try:
        fmt, oid, wid, event, context, step, created, updated = _blob_decoder.decode(blob)
    except msgspec.DecodeError as exc:
        raise StateStoreError(f"a saved workflow is not a Minions workflow blob: {exc}") from exc
    if fmt != _FORMAT:
        raise StateStoreError(
            f"a saved workflow was written in blob format {fmt}, this Minions reads {_FORMAT}; "
            "upgrade Minions to resume it"
        )
    return WorkflowRecord(oid, wid, event, context, step, created, updated)


def check_record(record: WorkflowRecord) -> None:
    """Reject a malformed record in the caller, before it can fail a whole batch of others.

    Runs before every checkpoint, so the common case is a handful of exact type tests; only a
    record that fails them (a subclass, or a real mistake) pays for the precise checks.
    """
    if (
        type(record) is WorkflowRecord
        and type(record.orchestration_id) is str
        and type(record.workflow_id) is str
        and type(record.event) is bytes
        and type(record.context) is bytes
        and type(record.step_index) is int
        and record.step_index >= 0
    ):
        return
    if not isinstance(record, WorkflowRecord):
        raise TypeError(f"expected a WorkflowRecord, got {type(record).__name__}")
    fields = (record.orchestration_id, record.workflow_id, record.event, record.context)
    if not all(isinstance(v, t) for v, t in zip(fields, (str, str, bytes, bytes), strict=True)):
        raise TypeError("WorkflowRecord ids must be str and event/context must be bytes")
    if not isinstance(record.step_index, int) or isinstance(record.step_index, bool):
        raise TypeError("WorkflowRecord.step_index must be an int")
    if record.step_index < 0:  # the SQLite store's writer reads a negative step as a delete
        raise ValueError(f"WorkflowRecord.step_index must be >= 0, got {record.step_index}")


def _records(stored: Iterable[Any]) -> list[WorkflowRecord]:
    """Decode a primitive store's answer, oldest first. Accepts any object with a ``context``
    blob, so a store that builds its own result type still works."""
    records = [decode_record(item.context) for item in stored]
    return sorted(records, key=lambda r: r.created_at)  # stable: ties keep the store's order


class StateStore(ABC):
    """Base class of workflow checkpoint stores; subclass it to write your own.

    Implement the four primitives. ``save_context`` and ``delete_context`` must return only
    once the change is durable, not when it is merely queued. Override ``startup``/``shutdown``
    when the store needs async setup or cleanup. The record methods below have working
    defaults; a store keyed by (orchestration, workflow) instead of by workflow id must also
    override :meth:`move`.
    """

    def __init__(self, logger: object = None) -> None:
        """``logger`` is accepted for compatibility and unused: Gru logs store failures."""
        return None

    # --- primitives ---------------------------------------------------------------------------

    @abstractmethod
    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        """Insert or replace the blob of ``workflow_id``; return once durable."""

    @abstractmethod
    async def delete_context(self, workflow_id: str) -> None:
        """Forget ``workflow_id`` durably; deleting an absent one is not an error."""

    @abstractmethod
    async def get_contexts_for_orchestration(
        self, orchestration_id: str
    ) -> list[StoredWorkflowContext]:
        """Every saved workflow of one orchestration."""

    @abstractmethod
    async def get_all_contexts(self) -> list[StoredWorkflowContext]:
        """Every saved workflow."""

    async def startup(self) -> None:
        """Open or validate the store; raise :class:`StateStoreError` if it is unusable."""
        return None

    async def shutdown(self) -> None:
        """Flush pending writes and release the store; idempotent."""
        return None

    # --- what Gru calls ----------------------------------------------------------------------

    async def open(self) -> None:
        await self.startup()

    async def close(self) -> None:
        await self.shutdown()

    def save(self, record: WorkflowRecord) -> Awaitable[None]:
        """Checkpoint ``record``; the awaitable settles once it is durable."""
        check_record(record)
        return self.save_context(record.workflow_id, record.orchestration_id, encode_record(record))

    def delete(self, orchestration_id: str, workflow_id: str) -> Awaitable[None]:
        """Forget a finished workflow; the awaitable settles once that is durable."""
        return self.delete_context(workflow_id)

    def delete_nowait(self, orchestration_id: str, workflow_id: str) -> asyncio.Future[None] | None:
        """Queue a delete and return a future that settles once it is durable, or ``None`` if
        this store cannot queue (Gru then awaits :meth:`delete`). Several queued deletes may
        share one future (settled when all are durable, failed if any is not). A store that
        queues must make later loads wait for queued deletes."""
        return None

    async def move(self, record: WorkflowRecord, old_orchestration_id: str) -> None:
        """Re-key a saved workflow to ``record.orchestration_id`` (Gru adopting the workflows an
        orchestration saved before its components were stamped). Stores keyed by workflow id
        re-key by saving it again."""
        await self.save(record)

    async def load(self, orchestration_id: str) -> list[WorkflowRecord]:
        """Unfinished workflows of one orchestration, oldest ``created_at`` first."""
        return _records(await self.get_contexts_for_orchestration(orchestration_id))

    async def list_all(self) -> list[WorkflowRecord]:
        """Every unfinished workflow, oldest first (``minions workflows``)."""
        return _records(await self.get_all_contexts())

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def stored(records: Iterable[WorkflowRecord]) -> list[StoredWorkflowContext]:
    """Records as the primitives return them (for stores whose native form is the record)."""
    return [
        StoredWorkflowContext(r.workflow_id, r.orchestration_id, encode_record(r)) for r in records
    ]
