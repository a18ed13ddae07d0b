"""The SQLite mechanics behind :class:`minions.runtime.state.SQLiteStateStore`.

Two ideas live here, both about one file on disk:

* **Refuse, never repair.** :func:`open_database` takes an exclusive ``flock`` on the sidecar
  ``<db>.lock`` (held for the store's lifetime; the kernel drops it if the holder dies), then
  inspects an existing file through a *read-only* connection: header, ``user_version`` and
  ``PRAGMA quick_check``. Only a file that passes is opened for writing, so a corrupt file, a
  stranger's database or one from a newer Minions is left byte-identical and reported with a
  :class:`StateStoreError` that says what to do. The judging connection is ``immutable`` unless
  a write-ahead log is present, so a refusal creates no ``-wal``/``-shm`` beside the file. A new
  store is created only where no file exists, complete (schema committed) under a temporary name
  and then renamed into place: an empty file at the path is never one of ours, so it is refused
  (it may be the real store, truncated) until ``minions init-store`` initialises it on purpose.
* **Group commit.** :class:`GroupCommitWriter` owns the only writing connection on one thread
  (sqlite3 connections are thread-bound). It takes everything queued (up to ``max_batch``),
  keeps the last write per key, applies the batch in one transaction, pays one fsync
  (``synchronous=FULL`` in WAL mode syncs the WAL on every commit) and then settles every
  waiting asyncio future. A thousand concurrent workflows cost a handful of fsyncs, not a
  thousand.

Rows cross this module as plain tuples in column order; the record type belongs to ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minions.errors import StateStoreError

SCHEMA_VERSION = 1
TABLE = "workflows"
COLUMNS = "orchestration_id, workflow_id, event, context, step_index, created_at, updated_at"
_CREATE = f"""
CREATE TABLE {TABLE} (
    orchestration_id TEXT NOT NULL,
    workflow_id      TEXT NOT NULL,
    event            BLOB NOT NULL,
    context          BLOB NOT NULL,
    step_index       INTEGER NOT NULL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    PRIMARY KEY (orchestration_id, workflow_id)
)"""
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


SELECT_ORCHESTRATION = (
    f"SELECT {COLUMNS} FROM {TABLE} WHERE orchestration_id = ? ORDER BY created_at, rowid"
)
SELECT_ALL = f"SELECT {COLUMNS} FROM {TABLE} ORDER BY created_at, rowid"

Key = tuple[str, str]
Row = tuple[str, str, bytes, bytes, int, float, float]


# --- opening safely ---------------------------------------------------------------------------


@dataclass(slots=True)
class OpenDatabase:
    """Everything a live store holds on to: the lock and its two connections."""

    path: Path
    lock_fd: int
    writer: sqlite3.Connection
    reader: sqlite3.Connection

    def close(self) -> None:
        """Close the reader first so the writer is the last connection and checkpoints the WAL."""
        self.reader.close()
        self.writer.close()
        release_lock(self.lock_fd)


def open_database(path: Path, *, initialise_empty: bool = False) -> OpenDatabase:
    """Lock, validate (or create, where no file exists) the database; blocking, run in a thread.

    ``initialise_empty`` is ``minions init-store``: a zero-length file is then replaced by a new
    store instead of refused.
    """
    _check_directory(path)
    lock_fd = acquire_lock(path)
    try:
        if path.exists() and not (initialise_empty and _is_zero_length(path)):
            _validate_existing(path)
        else:
            _check_no_stray_wal(path)
            _create_new(path)
        writer = _connect_writer(path)
        try:
            reader = connect_read_only(path, check_same_thread=False)
        except BaseException:
            writer.close()
            raise
    except BaseException:
        release_lock(lock_fd)
        raise
    return OpenDatabase(path, lock_fd, writer, reader)


def initialise(path: Path) -> bool:
    """``minions init-store``: make ``path`` an empty store on purpose; ``False`` if it already
    is one (left untouched). A missing or zero-length file becomes a new store; anything else
    that is not a store is refused as :func:`open_database` refuses it."""
    existed = path.exists() and not _is_zero_length(path)
    open_database(path, initialise_empty=True).close()
    return not existed


def _check_directory(path: Path) -> None:
    if not path.parent.is_dir():
        raise StateStoreError(
            f"cannot open state database {path}: directory {path.parent} does not exist; "
            "create it or pass another state path"
        )


def _check_no_stray_wal(path: Path) -> None:
    """A WAL whose database is gone would be replayed into the new file: refuse instead."""
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StateStoreError(
            f"state database {path} is missing but its write-ahead log {wal} is not; restore "
            f"the database next to it, or move {wal} aside to start with an empty store"
        )


def lock_path(path: Path) -> Path:
    """The sidecar lock file; never the database itself, so locking cannot touch its bytes."""
    return path.with_name(path.name + ".lock")


def acquire_lock(path: Path) -> int:
    """Take the exclusive per-database lock without waiting, recording our pid in it."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateStoreError(f"cannot create lock file {lock} for {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateStoreError(
            f"state database {path} is in use by another Gru (pid {holder}, holding {lock}); "
            "stop that process or give this one a different state path: two Grus must never "
            "share one state file"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Forget our pid and drop the lock; the file stays (unlinking a lock file races)."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def connect_read_only(
    path: Path, *, check_same_thread: bool = True, immutable: bool = False
) -> sqlite3.Connection:
    """A connection that cannot write the file: used to judge it and for every read.

    ``immutable`` also keeps SQLite from creating ``-wal``/``-shm`` for a WAL-mode file; only
    correct while nobody writes it and no write-ahead log holds content (we judge a file under
    our lock, before any writer exists).
    """
    uri = path.absolute().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=check_same_thread)


def _is_zero_length(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == 0


def _wal_has_content(path: Path) -> bool:
    wal = path.with_name(path.name + "-wal")
    return wal.exists() and wal.stat().st_size > 0


def _create_new(path: Path) -> None:
    """Build a complete empty store under a temporary name, then rename it to ``path``.

    Called with the lock held. A crash leaves at worst the temporary file (removed on the next
    open), never a partial file at ``path``: so an empty file found there is not ours to reuse.
    """
    tmp = path.with_name(f".{path.name}.creating")
    for stale in (tmp, tmp.with_name(tmp.name + "-journal")):
        stale.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_CREATE)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        os.replace(tmp, path)
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise StateStoreError(f"cannot create state database {path}: {exc}") from exc
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename is durable before any workflow is acknowledged
    finally:
        os.close(dir_fd)


def _refuse_empty(path: Path, what: str) -> StateStoreError:
    return StateStoreError(
        f"state database {path} is {what}. If it was the real store, its workflows are gone: "
        "restore it from a backup. Minions creates a store only where no file exists and will "
        f"not reuse this one by itself; to start with an empty store on purpose, run "
        f"`minions init-store --db {path}` (or remove the file), then restart"
    )


def _validate_existing(path: Path) -> None:
    """Judge an existing file through a read-only connection; raise rather than touch it."""
    if _is_zero_length(path):
        raise _refuse_empty(path, "an empty file (0 bytes)")
    try:
        conn = connect_read_only(path, immutable=not _wal_has_content(path))
        try:
            version = check_version(conn, path)
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                found = "; ".join(problems).replace("\n", "; ")
                raise StateStoreError(
                    f"state database {path} is corrupt (PRAGMA quick_check: {found}). Minions "
                    "will not modify it: restore it from a backup, or move it (with its -wal and "
                    "-shm files) aside to start with an empty store, then restart"
                )
            if not check_tables(conn, path, version):
                raise _refuse_empty(path, "a SQLite database without Minions' table")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from exc


def check_version(conn: sqlite3.Connection, path: Path) -> int:
    """``PRAGMA user_version``, refusing a schema written by a newer Minions."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StateStoreError(
            f"state database {path} has schema version {version}, newer than this Minions "
            f"understands ({SCHEMA_VERSION}). Upgrade Minions to resume its workflows, or move "
            "it (with its -wal and -shm files) aside to start with an empty store; it was left "
            "untouched"
        )
    return version


def check_tables(conn: sqlite3.Connection, path: Path, version: int) -> bool:
    """True if our table exists; an empty file is fine, anyone else's database is refused."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and not tables:
        return False
    if version == SCHEMA_VERSION and TABLE in tables:
        return True
    raise StateStoreError(
        f"{path} is a SQLite database but not a Minions state store (user_version {version}, "
        f"tables {sorted(tables)}). Minions will not modify it: pass another state path"
    )


def _unreadable(path: Path, exc: sqlite3.Error) -> StateStoreError:
    return StateStoreError(
        f"state database {path} is not a readable SQLite database "
        f"({getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}). Minions will not "
        "overwrite it: restore it from a backup, or move it (with its -wal and -shm files) "
        "aside to start with an empty store, then restart"
    )


def _connect_writer(path: Path) -> sqlite3.Connection:
    """The one writing connection: WAL, fsync on every commit, schema created if absent."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    except sqlite3.Error as exc:
        raise _unreadable(path, exc) from exc
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateStoreError(
                f"state database {path} cannot use WAL journaling (got {mode!r}); put it on a "
                "local filesystem"
            )
        conn.execute("PRAGMA synchronous=FULL")
        if not check_tables(conn, path, check_version(conn, path)):
            raise _refuse_empty(path, "a SQLite database without Minions' table")
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise _unreadable(path, exc) from exc
        raise
    return conn


def read_rows(path: Path, sql: str = SELECT_ALL, params: Iterable[Any] = ()) -> list[Row]:
    """Read without the lock and without writing: safe next to a live Gru (WAL readers).

    Without a ``-wal`` file no Gru has the store open, and the read is ``immutable`` so it
    leaves no ``-wal``/``-shm`` behind; a Gru starting meanwhile writes only to its new WAL
    (the main file changes at a checkpoint, a thousand pages later), so the read stays whole.
    """
    if not path.is_file():
        raise StateStoreError(f"no state database at {path}; check the path (nothing saved yet?)")
    if _is_zero_length(path):
        raise _refuse_empty(path, "an empty file (0 bytes)")
    wal = path.with_name(path.name + "-wal")
    try:
        conn = connect_read_only(path, immutable=not wal.exists())
        try:
            if not check_tables(conn, path, check_version(conn, path)):
                raise _refuse_empty(path, "a SQLite database without Minions' table")
            return conn.execute(sql, tuple(params)).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from exc


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
