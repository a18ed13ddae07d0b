"""Group commit for :class:`minions.runtime.state.SQLiteStateStore`.

:class:`GroupCommitWriter` owns the only writing connection on one thread (sqlite3 connections
are thread-bound). It takes everything queued (up to ``max_batch``), keeps the last write per key,
applies the batch in one transaction, pays one fsync (``synchronous=FULL`` in WAL mode syncs the
WAL on every commit) and then settles every waiting asyncio future. A thousand concurrent
workflows cost a handful of fsyncs, not a thousand. Opening (and refusing) the file is
:mod:`minions.runtime.sqlite_open`'s.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minions.errors import StateStoreError
from minions.runtime.sqlite_open import COLUMNS, TABLE, Row

# Statement sizes (rows) a batch is padded up to; see _upserts. Roughly x1.5 apart, so padding
# adds at most half and SQLite's statement cache holds every shape.
_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


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


@functools.cache
def _delete_sql(rows: int) -> str:
    """Delete ``rows`` workflow ids of one orchestration (a primary-key search each)."""
    ids = ", ".join(["?"] * rows)
    return f"DELETE FROM {TABLE} WHERE orchestration_id = ? AND workflow_id IN ({ids})"


Key = tuple[str, str]


def delete_workflow(workflow_id: str, conn: sqlite3.Connection) -> None:
    """Delete a workflow by its id alone (the store interface's key; a table scan, so Gru's own
    deletes use the primary key instead). Run on the writer's connection: one autocommit."""
    try:
        conn.execute(f"DELETE FROM {TABLE} WHERE workflow_id = ?", (workflow_id,))
    except sqlite3.Error as exc:
        raise StateStoreError(f"could not delete workflow {workflow_id}: {exc}") from exc


# --- group commit -----------------------------------------------------------------------------


@dataclass(slots=True)
class Write:
    """One save (``row`` set) or delete (``row`` None), and the future its caller awaits."""

    key: Key
    row: Row | None
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Stop:
    future: asyncio.Future[None]


_Op = Write | _Call | _Stop


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
        self._path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="minions-state-writer", daemon=True)
        self.commits = 0
        self.failed_commits = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: Write) -> None:
        self._queue.put(write)

    def call(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]) -> None:
        """Run ``fn(conn)`` on the writer thread, in queue order (maintenance, fault injection)."""
        self._queue.put(_Call(fn, future))

    def stop(self, future: asyncio.Future[None]) -> None:
        """Commit everything queued before this, then end the thread and settle ``future``."""
        self._queue.put(_Stop(future))

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            while self._run_batch(self._take_batch()):
                pass
        finally:
            self._fail_leftovers()

    def _take_batch(self) -> list[_Op]:
        batch = [self._queue.get()]
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run_batch(self, batch: list[_Op]) -> bool:
        """Commit runs of writes between calls/stops, keeping queue order; False on stop."""
        writes: list[Write] = []
        for op in batch:
            if isinstance(op, Write):
                writes.append(op)
                continue
            self._commit(writes)
            writes = []
            if isinstance(op, _Stop):
                _settle([op.future], None, None)
                return False
            self._call(op)
        self._commit(writes)
        return True

    def _commit(self, writes: list[Write]) -> None:
        if not writes:
            return
        latest: dict[Key, Row | None] = {w.key: w.row for w in writes}  # last write wins
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in _upserts([row for row in latest.values() if row is not None]):
                conn.execute(sql, params)
            for sql, params in _deletes([key for key, row in latest.items() if row is None]):
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            self.failed_commits += 1
            _settle([w.future for w in writes], None, self._write_error(len(writes), exc))
            return
        self.commits += 1
        _settle([w.future for w in writes], None, None)

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

    def _call(self, op: _Call) -> None:
        try:
            result = op.fn(self._conn)
        except Exception as exc:
            _settle([op.future], None, exc)
        else:
            _settle([op.future], result, None)

    def _fail_leftovers(self) -> None:
        """Nothing queued may vanish: anything behind a stop (or a crash) fails loudly."""
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            _settle([op.future], None, f"state store {self._path} was closed before this write")


def _upserts(rows: list[Row]) -> Iterator[tuple[str, list[Any]]]:
    """Multi-row statements for a batch of saves: one call into SQLite per few hundred rows.

    ``executemany`` steps once per row, and sqlite3 releases the GIL around every step; each
    time the busy event loop thread takes it, the writer waits up to a switch interval (5 ms)
    to get it back. Padding repeats the last row (an idempotent second update), so a handful
    of statement shapes serve every batch size.
    """
    for start in range(0, len(rows), _SIZES[-1]):
        chunk = rows[start : start + _SIZES[-1]]
        size = _padded(len(chunk))
        chunk.extend([chunk[-1]] * (size - len(chunk)))
        yield _upsert_sql(size), list(itertools.chain.from_iterable(chunk))


def _deletes(keys: list[Key]) -> Iterator[tuple[str, list[Any]]]:
    """Multi-row deletes, one orchestration at a time; padding repeats the last id."""
    by_orchestration: dict[str, list[str]] = {}
    for orchestration_id, workflow_id in keys:
        by_orchestration.setdefault(orchestration_id, []).append(workflow_id)
    for orchestration_id, workflow_ids in by_orchestration.items():
        for start in range(0, len(workflow_ids), _SIZES[-1]):
            chunk = workflow_ids[start : start + _SIZES[-1]]
            size = _padded(len(chunk))
            chunk.extend([chunk[-1]] * (size - len(chunk)))
            yield _delete_sql(size), [orchestration_id, *chunk]


def _padded(rows: int) -> int:
    return next(size for size in _SIZES if size >= rows)


def _settle(
    futures: list[asyncio.Future[Any]], result: Any, error: str | BaseException | None
) -> None:
    """Resolve futures from the writer thread: one ``call_soon_threadsafe`` per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Any]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve_all, group, result, error)


def _resolve_all(
    futures: list[asyncio.Future[Any]], result: Any, error: str | BaseException | None
) -> None:
    for future in futures:
        if future.done():  # the waiting task was cancelled; the write itself still happened
            continue
        if error is None:
            future.set_result(result)
        elif isinstance(error, str):
            future.set_exception(StateStoreError(error))  # a fresh exception per waiter
        else:
            future.set_exception(error)
