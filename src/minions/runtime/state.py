"""Durable workflow checkpoints: the two shipped implementations of the store interface.

Gru checkpoints a workflow (encoded event + context + index of the next step) *before* each
step and deletes it when the workflow ends, so after a crash every unfinished workflow resumes
at the step it was about to run. ``save`` therefore returns only once the write would survive
power loss, not merely a process crash: SQLite in WAL mode with ``synchronous=FULL``.

An fsync costs milliseconds, and a busy Gru has hundreds of workflows checkpointing at once.
So writes never run on the event loop and never one fsync each: every save and delete is
queued to one writer thread that commits whatever has piled up as a single transaction
(group commit; see ``sqlite_store``) and then wakes all of their awaiting tasks. Reads are rare
(orchestration start, CLI): one waits for the writes queued before it (so a delete nobody
waited for is never read back), then reads through its own read-only WAL connection in a
worker thread, never delaying a commit.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from minions.errors import StateStoreError
from minions.runtime import sqlite_open as _open
from minions.runtime import sqlite_store as _sql
from minions.runtime.store_contract import (
    StateStore,
    StoredWorkflowContext,
    WorkflowRecord,
    check_record,
    decode_record,
    stored,
)

T = TypeVar("T")
_astuple = msgspec.structs.astuple  # the row in column order, built in C

__all__ = [
    "MemoryStateStore",
    "NoOpStateStore",
    "SQLiteStateStore",
    "StateStore",
    "StoredWorkflowContext",
    "WorkflowRecord",
    "read_workflows",
]


class MemoryStateStore(StateStore):
    """The contract without a disk: resume works only within this process (and in tests).

    Saves are immediate; the data survives ``close()``/``open()`` of the same object, so one
    store can be handed to successive Grus of one process.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], WorkflowRecord] = {}

    async def save(self, record: WorkflowRecord) -> None:
        check_record(record)
        self._records[(record.orchestration_id, record.workflow_id)] = record

    async def delete(self, orchestration_id: str, workflow_id: str) -> None:
        self._records.pop((orchestration_id, workflow_id), None)

    async def move(self, record: WorkflowRecord, old_orchestration_id: str) -> None:
        await self.save(record)
        self._records.pop((old_orchestration_id, record.workflow_id), None)

    async def load(self, orchestration_id: str) -> list[WorkflowRecord]:
        mine = [r for r in self._records.values() if r.orchestration_id == orchestration_id]
        return sorted(mine, key=lambda r: r.created_at)  # stable: ties keep insertion order

    async def list_all(self) -> list[WorkflowRecord]:
        return sorted(self._records.values(), key=lambda r: r.created_at)

    # the interface's primitives, on the records

    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        await self.save(_keyed(decode_record(context), workflow_id, orchestration_id))

    async def delete_context(self, workflow_id: str) -> None:
        for key in [k for k in self._records if k[1] == workflow_id]:
            del self._records[key]

    async def get_contexts_for_orchestration(
        self, orchestration_id: str
    ) -> list[StoredWorkflowContext]:
        return stored(await self.load(orchestration_id))

    async def get_all_contexts(self) -> list[StoredWorkflowContext]:
        return stored(await self.list_all())


def _keyed(record: WorkflowRecord, workflow_id: str, orchestration_id: str) -> WorkflowRecord:
    """A blob saved through the primitives is filed under the keys it was given."""
    return msgspec.structs.replace(
        record, workflow_id=workflow_id, orchestration_id=orchestration_id
    )


class SQLiteStateStore(StateStore):
    """The default store: one SQLite file, one exclusive owner, group-committed durable writes.

    ``open()`` refuses (with :class:`StateStoreError`, file untouched) a database that another
    live Gru holds, that is corrupt or not a database, or that has a newer schema. A save or
    delete whose commit fails (disk full, I/O error) raises :class:`StateStoreError`; the
    writer keeps going. A save whose awaiting task is cancelled may still become durable.
    Saves and deletes belong to the event loop that opened the store.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "minions.db",
        *,
        max_batch: int = 1024,
        db_path: str | os.PathLike[str] | None = None,
        logger: object = None,
    ) -> None:
        """``db_path=`` and ``logger=`` are the established spellings (``logger`` is unused:
        Gru reports store failures)."""
        if db_path is not None:
            path = db_path
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.path = Path(os.fspath(path))
        self._max_batch = max_batch
        self._db: _open.OpenDatabase | None = None
        self._writer: _sql.GroupCommitWriter | None = None
        self._put: Callable[[Any], None] = self._not_open  # the writer's queue, once open
        self._deletes: _sql.DeleteGroup | None = None  # this loop turn's unawaited deletes
        self._read_lock = threading.Lock()  # the read connection is shared by to_thread workers
        self._opening = asyncio.Lock()  # binds to a loop only if two open() calls overlap
        self._closing: asyncio.Future[None] | None = None
        self._last_commits = 0

    @property
    def commits(self) -> int:
        """Transactions committed so far: with group commit, far fewer than saves."""
        return self._writer.commits if self._writer else self._last_commits

    async def startup(self) -> None:
        async with self._opening:
            if self._closing is not None:
                raise StateStoreError(f"state store {self.path} was closed; create a new store")
            if self._writer is not None:
                return
            db = await asyncio.to_thread(_open_for_writing, self.path)
            self._db = db
            self._writer = _sql.GroupCommitWriter(
                db.writer, self.path, self._max_batch, asyncio.get_running_loop()
            )
            self._writer.start()
            self._put = self._writer.put

    def save(self, record: WorkflowRecord) -> asyncio.Future[None]:
        """Queue ``record``; the returned future settles once it is committed (durable).

        A plain function returning the writer's future, not a coroutine: it runs before every
        step, and every suspended coroutine is one more object for the cyclic GC to scan.
        """
        check_record(record)
        return self._submit((record.orchestration_id, record.workflow_id), _astuple(record))

    def delete(self, orchestration_id: str, workflow_id: str) -> asyncio.Future[None]:
        """Queue a delete, in order with saves; the future settles once it is committed."""
        return self._submit((orchestration_id, workflow_id), None)

    def delete_nowait(self, orchestration_id: str, workflow_id: str) -> asyncio.Future[None]:
        """Queue a delete; the returned future settles (or fails) once it is committed.

        For a caller with nothing to do after the delete (Gru ending a workflow). The future is
        shared by every delete queued in the same turn of the loop: it settles once all of them
        are committed, failing if any commit did. Loads queue behind it, so they never see the
        record again.
        """
        group = self._deletes
        if group is None:
            writer = self._require_writer()
            group = self._deletes = _sql.DeleteGroup(writer.loop.create_future())
            writer.loop.call_soon(self._close_deletes)
        self._put(((orchestration_id, workflow_id), None, group))
        return group.future

    def _close_deletes(self) -> None:
        group, self._deletes = self._deletes, None
        if group is not None and self._writer is not None:
            self._writer.close_group(group)

    async def move(self, record: WorkflowRecord, old_orchestration_id: str) -> None:
        """Save under the new key and drop the old one, queued together (one commit, usually;
        a crash between the two leaves both, and adopting again is an idempotent upsert)."""
        check_record(record)
        saved = self._submit((record.orchestration_id, record.workflow_id), _astuple(record))
        dropped = self._submit((old_orchestration_id, record.workflow_id), None)
        await saved
        await dropped

    # the interface's primitives, on the records

    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        await self.save(_keyed(decode_record(context), workflow_id, orchestration_id))

    async def delete_context(self, workflow_id: str) -> None:
        await self._call_in_writer(functools.partial(_sql.delete_workflow, workflow_id))

    async def get_contexts_for_orchestration(
        self, orchestration_id: str
    ) -> list[StoredWorkflowContext]:
        return stored(await self.load(orchestration_id))

    async def get_all_contexts(self) -> list[StoredWorkflowContext]:
        return stored(await self.list_all())

    def _submit(self, key: _sql.Key, row: _open.Row | None) -> asyncio.Future[None]:
        """Queue one write and return the future the writer settles after its commit."""
        writer = self._require_writer()
        future: asyncio.Future[None] = writer.loop.create_future()  # get_running_loop: a syscall
        writer.put((key, row, future))
        return future

    async def load(self, orchestration_id: str) -> list[WorkflowRecord]:
        await self._call_in_writer(_flushed)
        return await asyncio.to_thread(self._read, _open.SELECT_ORCHESTRATION, (orchestration_id,))

    async def list_all(self) -> list[WorkflowRecord]:
        await self._call_in_writer(_flushed)
        return await asyncio.to_thread(self._read, _open.SELECT_ALL, ())

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[WorkflowRecord]:
        with self._read_lock:
            if self._db is None:
                raise StateStoreError(f"state store {self.path} was closed during a read")
            try:
                rows = self._db.reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StateStoreError(f"cannot read state database {self.path}: {exc}") from exc
        return [WorkflowRecord(*row) for row in rows]

    async def shutdown(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shut_down())
        if not self._closing.done():  # shielded: a cancelled close() does not abandon the drain
            await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        """Drain the queue, end the writer thread, close both connections, drop the lock."""
        self._close_deletes()  # this turn's deletes settle before the writer stops
        writer, self._writer = self._writer, None
        self._put = self._not_open
        if writer is None:
            return
        self._last_commits = writer.commits
        drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer.stop(drained)
        await drained
        await asyncio.to_thread(self._release, writer)

    def _release(self, writer: _sql.GroupCommitWriter) -> None:
        writer.join()
        with self._read_lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    def _require_writer(self) -> _sql.GroupCommitWriter:
        if self._writer is None:
            self._not_open()
        assert self._writer is not None
        return self._writer

    def _not_open(self, *_: object) -> None:
        state = "was closed" if self._closing is not None else "is not open"
        raise StateStoreError(f"state store {self.path} {state}; await store.open() first")

    async def _call_in_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer's connection in queue order (tests inject faults this way)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._require_writer().call(fn, future)
        return await future


def _open_for_writing(path: Path) -> _open.OpenDatabase:
    """Open (or refuse) the file, then teach the writer's connection its tombstones."""
    db = _open.open_database(path)
    try:
        _sql.install_tombstones(db.writer)
    except sqlite3.Error as exc:
        db.close()
        raise StateStoreError(f"cannot prepare state database {path} for writing: {exc}") from exc
    return db


def _flushed(_conn: sqlite3.Connection) -> None:
    """A no-op in the writer's queue: once it runs, every write queued before it is committed."""


def read_workflows(path: str | os.PathLike[str] = "minions.db") -> list[WorkflowRecord]:
    """Every unfinished workflow in ``path``, oldest first, for the CLI.

    Synchronous and read-only: takes no lock and writes nothing, so it works while a Gru owns
    the file. Raises :class:`StateStoreError` if the file is missing, corrupt or newer.
    """
    return [WorkflowRecord(*row) for row in _open.read_rows(Path(os.fspath(path)))]


class NoOpStateStore(StateStore):
    """Keeps nothing: every save succeeds at once and nothing is ever resumed. The same as
    ``state_store=None`` for workflows, for code that wants a store object."""

    async def save_context(self, workflow_id: str, orchestration_id: str, context: bytes) -> None:
        return None

    async def delete_context(self, workflow_id: str) -> None:
        return None

    async def get_contexts_for_orchestration(
        self, orchestration_id: str
    ) -> list[StoredWorkflowContext]:
        return []

    async def get_all_contexts(self) -> list[StoredWorkflowContext]:
        return []
