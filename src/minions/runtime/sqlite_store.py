"""Group commit for :class:`minions.runtime.state.SQLiteStateStore`.

:class:`GroupCommitWriter` owns the only writing connection on one thread (sqlite3 connections
are thread-bound). It takes everything queued (up to ``max_batch``), keeps the last write per key,
applies the batch in one transaction, pays one fsync (``synchronous=FULL`` in WAL mode syncs the
WAL on every commit) and then settles every waiting asyncio future with one wake-up of the loop.
A thousand concurrent workflows cost a handful of fsyncs, not a thousand. Opening (and refusing)
the file is :mod:`minions.runtime.sqlite_open`'s.

Design note: one statement per commit. The writer shares the GIL with a busy event loop, and
every time it comes back from SQLite it must wait for the loop to let go of the GIL (up to a
switch interval, 5 ms). ``conn.execute`` comes back twice or three times per statement, so a
transaction of BEGIN, an upsert, a delete and COMMIT cost a dozen of those waits, and the loop
sat idle while the writer queued for the GIL. So a batch is a single autocommit statement on a
long-lived cursor: a delete travels as a *tombstone* row (``step_index = -1``) in the same
multi-row upsert, and two TEMP triggers on the writer's connection remove a tombstone as soon
as it lands. TEMP triggers live only in this connection: the file's schema is unchanged, no
other reader ever sees a tombstone, and records with a negative step are refused before they
are queued. Only a batch larger than one statement (``rows_per_statement``) is wrapped in
BEGIN/COMMIT.

Rows cross this module as plain tuples in column order; the record type belongs to ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minions.errors import StateStoreError
from minions.runtime.sqlite_open import COLUMNS, TABLE, Row

# Statement sizes (rows) a batch is padded up to; see _statements. At most x1.25 apart from 64 on
# (padding rows are real work for SQLite, about 2 us each), and few enough that SQLite's statement
# cache holds every shape.
_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384,
          512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096)  # fmt: skip
_PARAMS_PER_ROW = len(COLUMNS.split(","))

_TRIGGERS = f"""
CREATE TEMP TRIGGER IF NOT EXISTS minions_tombstone_inserted
AFTER INSERT ON main.{TABLE} WHEN NEW.step_index < 0
BEGIN DELETE FROM {TABLE} WHERE rowid = NEW.rowid; END;
CREATE TEMP TRIGGER IF NOT EXISTS minions_tombstone_updated
AFTER UPDATE OF step_index ON main.{TABLE} WHEN NEW.step_index < 0
BEGIN DELETE FROM {TABLE} WHERE rowid = NEW.rowid; END;
"""


def install_tombstones(conn: sqlite3.Connection) -> None:
    """Teach the writer's connection to treat a row with a negative step as a delete (see the
    module note). Run once, when the store opens; TEMP objects touch no file."""
    conn.executescript(_TRIGGERS)


def rows_per_statement(conn: sqlite3.Connection) -> int:
    """The largest statement shape this SQLite accepts (bound parameters are limited)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _PARAMS_PER_ROW
    return max(size for size in _SIZES if size <= limit)


@functools.cache
def _upsert_sql(rows: int) -> str:
    """Insert-or-update ``rows`` rows; ON CONFLICT DO UPDATE keeps the rowid, so ties on
    created_at keep first-insert order. A key repeated in one statement is updated again."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"""
INSERT INTO {TABLE} ({COLUMNS}) VALUES {values}
ON CONFLICT (orchestration_id, workflow_id) DO UPDATE SET
    event = excluded.event, context = excluded.context, step_index = excluded.step_index,
    created_at = excluded.created_at, updated_at = excluded.updated_at"""


Key = tuple[str, str]


def delete_workflow(workflow_id: str, conn: sqlite3.Connection) -> None:
    """Delete a workflow by its id alone (the store interface's key; a table scan, so Gru's own
    deletes use the primary key instead). Run on the writer's connection: one autocommit."""
    try:
        conn.execute(f"DELETE FROM {TABLE} WHERE workflow_id = ?", (workflow_id,))
    except sqlite3.Error as exc:
        raise StateStoreError(f"could not delete workflow {workflow_id}: {exc}") from exc


# --- what the loop queues ---------------------------------------------------------------------


@dataclass(slots=True)
class DeleteGroup:
    """The deletes queued without waiting during one turn of the loop, sharing one future.

    Nobody awaits such a delete, so a future (and a loop turn to settle it) per delete would buy
    nothing: the group's future settles once all of them are committed, with the first failure.
    """

    future: asyncio.Future[None]
    error: str | None = None  # set by the writer thread before the future is settled


# A write: (key, row or None for a delete, the Future its caller awaits or its DeleteGroup).
Write = tuple[Key, Row | None, "asyncio.Future[None] | DeleteGroup"]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Stop:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Close:
    """Queued behind the last delete of a group: settle it once everything before is in."""

    group: DeleteGroup


_Op = tuple[Any, ...] | _Call | _Stop | _Close
# What one wake-up of the loop settles: futures, each group with its error (None: success).
_Settlement = list[tuple[list[asyncio.Future[Any]], Any, str | BaseException | None]]


# --- group commit -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    """What the writer took from the queue, and what it owes the loop afterwards."""

    writes: list[Write] = field(default_factory=list)
    owed: _Settlement = field(default_factory=list)
    closed: list[DeleteGroup] = field(default_factory=list)  # settled after the last commit


class GroupCommitWriter:
    """The single writer thread; see the module note. Fed from the event loop, never blocks it."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        max_batch: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop  # the loop whose futures writes settle
        self._conn = conn
        self._cursor = conn.cursor()  # a cursor of its own: one GIL hand-off fewer per execute
        self._rows_per_statement = rows_per_statement(conn)
        self._path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self.put = self._queue.put  # the loop's one call per write
        self._thread = threading.Thread(target=self._run, name="minions-state-writer", daemon=True)
        self.commits = 0
        self.failed_commits = 0

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]) -> None:
        """Run ``fn(conn)`` on the writer thread, in queue order (maintenance, fault injection)."""
        self.put(_Call(fn, future))

    def close_group(self, group: DeleteGroup) -> None:
        """The group's last delete is queued: settle it after everything queued so far."""
        self.put(_Close(group))

    def stop(self, future: asyncio.Future[None]) -> None:
        """Commit everything queued before this, then end the thread and settle ``future``."""
        self.put(_Stop(future))

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            while self._run_batch(self._take_batch()):
                pass
        finally:
            self._fail_leftovers()

    def _take_batch(self) -> list[_Op]:
        get = self._queue.get_nowait
        batch = [self._queue.get()]
        with contextlib.suppress(queue.Empty):
            for _ in range(self._max_batch - 1):
                batch.append(get())
        return batch

    def _run_batch(self, ops: list[_Op]) -> bool:
        """Commit runs of writes between calls/stops, keeping queue order, then settle all of
        it with one wake-up of the loop; False on stop."""
        batch = _Batch()
        going = True
        for i, op in enumerate(ops):
            if type(op) is tuple:
                batch.writes.append(op)
            elif isinstance(op, _Close):
                batch.closed.append(op.group)
            else:
                self._commit(batch)
                if isinstance(op, _Stop):
                    batch.owed.append(([op.future], None, None))
                    batch.owed += self._refused(ops[i + 1 :])  # nothing may vanish
                    going = False
                    break
                assert isinstance(op, _Call)
                batch.owed.append(self._call(op))
        self._commit(batch)
        batch.owed += [([group.future], None, group.error) for group in batch.closed]
        _settle(self.loop, batch.owed)
        return going

    def _commit(self, batch: _Batch) -> None:
        """Commit the writes taken so far; their futures are owed to the loop afterwards."""
        writes, batch.writes = batch.writes, []
        if not writes:
            return
        latest: dict[Key, Row | None] = {}
        waiters: list[asyncio.Future[None]] = []
        for key, row, waiter in writes:
            latest[key] = row  # last write wins
            if type(waiter) is not DeleteGroup:
                waiters.append(waiter)  # type: ignore[arg-type]
        rows = [_tombstone(key) if row is None else row for key, row in latest.items()]
        try:
            self._execute(rows)
        except Exception as exc:
            self._rollback()
            self.failed_commits += 1
            error = self._write_error(len(writes), exc)
            for _key, _row, waiter in writes:
                if type(waiter) is DeleteGroup:
                    waiter.error = waiter.error or error
            batch.owed.append((waiters, None, error))
            return
        self.commits += 1
        batch.owed.append((waiters, None, None))

    def _execute(self, rows: list[Row]) -> None:
        statements = list(_statements(rows, self._rows_per_statement))
        if len(statements) == 1:  # the common case: autocommit, one trip into SQLite
            self._cursor.execute(*statements[0])
            return
        cursor = self._cursor
        cursor.execute("BEGIN IMMEDIATE")
        for sql, params in statements:
            cursor.execute(sql, params)
        cursor.execute("COMMIT")

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL); nothing left to undo

    def _write_error(self, count: int, exc: Exception) -> str:
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        return (
            f"could not commit {count} checkpoint write(s) to {self._path}: {name}: {exc}. "
            "They were not durably saved; check free disk space and the filesystem. The store "
            "keeps running and later saves are attempted normally"
        )

    def _call(self, op: _Call) -> tuple[list[asyncio.Future[Any]], Any, Any]:
        try:
            result = op.fn(self._conn)
        except Exception as exc:
            return [op.future], None, exc
        return [op.future], result, None

    def _fail_leftovers(self) -> None:
        """Nothing queued may vanish: anything behind a stop (or a crash) fails loudly."""
        leftovers: list[_Op] = []
        with contextlib.suppress(queue.Empty):
            while True:
                leftovers.append(self._queue.get_nowait())
        _settle(self.loop, self._refused(leftovers))

    def _refused(self, ops: list[_Op]) -> _Settlement:
        error = f"state store {self._path} was closed before this write"
        owed: _Settlement = []
        for op in ops:
            if type(op) is tuple:
                waiter = op[2]
                if type(waiter) is DeleteGroup:
                    waiter.error = waiter.error or error
                else:
                    owed.append(([waiter], None, error))
            elif isinstance(op, _Close):
                owed.append(([op.group.future], None, op.group.error))
            else:
                assert isinstance(op, _Call | _Stop)
                owed.append(([op.future], None, error))
        return owed


def _tombstone(key: Key) -> Row:
    """A delete as a row of the batch's one statement (see the module note)."""
    return (key[0], key[1], b"", b"", -1, 0.0, 0.0)


def _statements(rows: list[Row], most: int) -> Iterator[tuple[str, list[Any]]]:
    """Multi-row statements for a batch: one call into SQLite per ``most`` rows.

    ``executemany`` steps once per row, and sqlite3 releases the GIL around every step (see the
    module note for what each return costs). Padding repeats the last row (an idempotent second
    update, or a second tombstone), so a handful of statement shapes serve every batch size.
    """
    for start in range(0, len(rows), most):
        chunk = rows[start : start + most]
        size = next(size for size in _SIZES if size >= len(chunk))
        chunk.extend([chunk[-1]] * (size - len(chunk)))
        yield _upsert_sql(size), list(itertools.chain.from_iterable(chunk))


def _settle(loop: asyncio.AbstractEventLoop, owed: _Settlement) -> None:
    """Resolve futures from the writer thread: one ``call_soon_threadsafe`` for all of them."""
    if owed:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve_all, owed)


def _resolve_all(owed: _Settlement) -> None:
    for futures, result, error in owed:
        for future in futures:
            if future.done():  # the waiting task was cancelled; the write itself happened
                continue
            if error is None:
                future.set_result(result)
            elif isinstance(error, str):
                future.set_exception(StateStoreError(error))  # a fresh exception per waiter
            else:
                future.set_exception(error)
