"""Opening the SQLite state database safely: refuse, never repair.

:func:`open_database` takes an exclusive ``flock`` on the sidecar ``<db>.lock`` (held for the
store's lifetime; the kernel drops it if the holder dies), then inspects an existing file through
a *read-only* connection: header, ``user_version`` and ``PRAGMA quick_check``. Only a file that
passes is opened for writing, so a corrupt file, a stranger's database or one from a newer
Minions is left byte-identical and reported with a :class:`StateStoreError` that says what to
do. The judging connection is ``immutable`` unless a write-ahead log is present, so a refusal
creates no ``-wal``/``-shm`` beside the file.

A new store is created only where no file exists, complete (schema committed) under a temporary
name and then renamed into place: an empty file at the path is never one of ours, so it is
refused (it may be the real store, truncated) until ``minions init-store`` initialises it on
purpose. :func:`read_rows` is the lock-free reader behind ``minions workflows``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable
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

SELECT_ORCHESTRATION = (
    f"SELECT {COLUMNS} FROM {TABLE} WHERE orchestration_id = ? ORDER BY created_at, rowid"
)
SELECT_ALL = f"SELECT {COLUMNS} FROM {TABLE} ORDER BY created_at, rowid"

Row = tuple[str, str, bytes, bytes, int, float, float]


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
