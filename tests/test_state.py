"""The durable workflow state store: contract, group commit, durability, refusing bad files."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import run
from minions.errors import StateStoreError
from minions.runtime.sqlite_open import initialise
from minions.runtime.state import (
    MemoryStateStore,
    SQLiteStateStore,
    StateStore,
    WorkflowRecord,
    read_workflows,
)


def rec(wid: str, *, oid: str = "orch", step: int = 0, at: float = 1.0, ctx: bytes = b"c"):
    return WorkflowRecord(oid, wid, b"\x00ev" + wid.encode(), ctx, step, at, at + step)


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path) -> StateStore:
    if request.param == "memory":
        return MemoryStateStore()
    return SQLiteStateStore(tmp_path / "minions.db")


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --- the contract, for both stores -----------------------------------------------------------


def test_both_stores_implement_the_protocol(tmp_path):
    assert isinstance(MemoryStateStore(), StateStore)
    assert isinstance(SQLiteStateStore(tmp_path / "x.db"), StateStore)


def test_save_load_delete_round_trip(store):
    async def main():
        await store.open()
        first, second = rec("a", at=1.0), rec("b", at=2.0, ctx=bytes(range(256)) * 10)
        await store.save(first)
        await store.save(second)
        await store.save(rec("z", oid="other"))
        assert await store.load("orch") == [first, second]
        await store.delete("orch", "a")
        await store.delete("orch", "never-saved")  # absent keys are not an error
        assert await store.load("orch") == [second]
        assert await store.load("nobody") == []
        await store.close()

    run(main())


def test_save_upserts_by_key(store):
    async def main():
        await store.open()
        await store.save(rec("a", step=0))
        await store.save(rec("a", step=3, ctx=b"later"))
        assert await store.load("orch") == [rec("a", step=3, ctx=b"later")]
        await store.close()

    run(main())


def test_load_and_list_all_are_oldest_first_with_ties_in_insert_order(store):
    async def main():
        await store.open()
        for wid, at in [("late", 30.0), ("tie1", 10.0), ("early", 5.0), ("tie2", 10.0)]:
            await store.save(rec(wid, at=at))
        await store.save(rec("x", oid="other", at=7.0))
        await store.save(rec("tie1", at=10.0, step=2))  # an update keeps its place
        assert [r.workflow_id for r in await store.load("orch")] == [
            "early",
            "tie1",
            "tie2",
            "late",
        ]
        assert [r.workflow_id for r in await store.list_all()] == [
            "early",
            "x",
            "tie1",
            "tie2",
            "late",
        ]
        await store.close()

    run(main())


def test_malformed_record_is_refused_before_it_reaches_the_store(store):
    async def main():
        await store.open()
        with pytest.raises(TypeError, match="bytes"):
            await store.save(WorkflowRecord("o", "w", "not bytes", b"", 0, 1.0, 1.0))  # type: ignore[arg-type]
        assert await store.list_all() == []
        await store.close()

    run(main())


# --- SQLite: group commit ---------------------------------------------------------------------


def test_thousand_concurrent_saves_are_durable_and_group_committed(tmp_path):
    path = tmp_path / "minions.db"
    saves = 1000

    async def main():
        store = SQLiteStateStore(path)
        await store.open()
        tasks = [
            asyncio.ensure_future(store.save(rec(f"w{i:04}", at=float(i)))) for i in range(saves)
        ]
        await asyncio.gather(*tasks)
        commits = store.commits
        await store.close()
        return commits

    commits = run(main())
    assert 1 <= commits < saves / 5
    assert [r.workflow_id for r in read_workflows(path)] == [f"w{i:04}" for i in range(saves)]

    async def reopen():
        async with SQLiteStateStore(path) as store:
            return await store.load("orch")

    assert len(run(reopen())) == saves


async def hold_writer(store: SQLiteStateStore) -> tuple[threading.Event, asyncio.Future]:
    """Park the writer thread inside a call so the test decides exactly what one batch holds."""
    entered, release = threading.Event(), threading.Event()

    def park(_conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    parked = asyncio.ensure_future(store._call_in_writer(park))
    assert await asyncio.to_thread(entered.wait, 10)
    return release, parked


def test_superseded_writes_coalesce_into_one_commit_and_all_waiters_resolve(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            await store.save(rec("gone"))
            release, parked = await hold_writer(store)
            before = store.commits
            waiters = [asyncio.ensure_future(store.save(rec("a", step=i))) for i in range(5)]
            waiters.append(asyncio.ensure_future(store.delete("orch", "gone")))
            waiters.append(asyncio.ensure_future(store.save(rec("gone", step=9))))
            waiters.append(asyncio.ensure_future(store.delete("orch", "gone")))
            waiters.append(asyncio.ensure_future(store.save(rec("b"))))
            release.set()
            await parked
            assert await asyncio.gather(*waiters) == [None] * len(waiters)
            assert store.commits == before + 1
            assert await store.load("orch") == [rec("a", step=4), rec("b")]

    run(main())


def test_max_batch_bounds_each_transaction(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db", max_batch=3) as store:
            release, parked = await hold_writer(store)
            waiters = [asyncio.ensure_future(store.save(rec(f"w{i}"))) for i in range(10)]
            release.set()
            await parked
            await asyncio.gather(*waiters)
            assert store.commits == 4  # 3 + 3 + 3 + 1
            assert len(await store.list_all()) == 10

    run(main())


def test_large_mixed_batch_commits_once_through_padded_multi_row_statements(tmp_path):
    # 700 saves span two statements (512 + padding); deletes span two orchestrations.
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db", max_batch=2000) as store:
            for wid in ("x", "y"):
                await store.save(rec(wid, oid="other"))
            release, parked = await hold_writer(store)
            before = store.commits
            waiters = [
                asyncio.ensure_future(store.save(rec(f"w{i:03}", oid=f"o{i % 2}", at=float(i))))
                for i in range(700)
            ]
            waiters += [
                asyncio.ensure_future(store.delete(f"o{i % 2}", f"w{i:03}"))
                for i in range(0, 700, 3)
            ]
            waiters += [asyncio.ensure_future(store.delete("other", "x"))]
            waiters += [asyncio.ensure_future(store.save(rec("w003", oid="o1", step=7, at=3.0)))]
            queued = store._writer._queue  # type: ignore[union-attr]
            while queued.qsize() < len(waiters):  # every write queued before the writer resumes
                await asyncio.sleep(0)
            release.set()
            await parked
            assert await asyncio.gather(*waiters) == [None] * len(waiters)
            assert store.commits == before + 1
            kept = {
                (r.orchestration_id, r.workflow_id, r.step_index) for r in await store.list_all()
            }
            expected = {(f"o{i % 2}", f"w{i:03}", 0) for i in range(700) if i % 3}
            assert kept == expected | {("o1", "w003", 7), ("other", "y", 0)}

    run(main())


def test_delete_nowait_settles_after_commit_and_loads_never_see_it_again(tmp_path):
    async def main():
        async with SQLiteStateStore(tmp_path / "minions.db") as store:
            await store.save(rec("a"))
            await store.save(rec("b"))
            release, parked = await hold_writer(store)
            forgotten = store.delete_nowait("orch", "a")
            loading = asyncio.ensure_future(store.load("orch"))
            await asyncio.sleep(0.05)  # room for the read to finish, were it not queued
            assert not forgotten.done() and not loading.done()  # both wait for the writer
            release.set()
            await parked
            assert await loading == [rec("b")]
            assert forgotten.done() and forgotten.exception() is None

    run(main())


def test_close_drains_pending_writes(tmp_path):
    path = tmp_path / "minions.db"

    async def main():
        store = SQLiteStateStore(path)
        await store.open()
        release, parked = await hold_writer(store)
        queued = store._writer._queue  # type: ignore[union-attr]
        waiters = [asyncio.ensure_future(store.save(rec(f"w{i}"))) for i in range(50)]
        closing = asyncio.ensure_future(store.close())
        while queued.qsize() < 51:  # wait until the stop sits behind all 50 saves
            await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        release.set()
        await closing
        await parked
        assert all(w.done() and w.exception() is None for w in waiters)
        await store.close()  # idempotent
        with pytest.raises(StateStoreError, match="closed"):
            await store.save(rec("late"))

    run(main())
    assert not Path(f"{path}-wal").exists()  # the last connection checkpointed on close
    assert len(read_workflows(path)) == 50


def test_cancelled_close_still_drains_and_releases_the_lock(tmp_path):
    path = tmp_path / "minions.db"

    async def main():
        store = SQLiteStateStore(path)
        await store.open()
        release, parked = await hold_writer(store)
        queued = store._writer._queue  # type: ignore[union-attr]
        waiters = [asyncio.ensure_future(store.save(rec(f"w{i}"))) for i in range(20)]
        first = asyncio.ensure_future(store.close())
        while queued.qsize() < 21:
            await asyncio.sleep(0)
        first.cancel()
        second = asyncio.ensure_future(store.close())  # a concurrent close waits for the drain
        release.set()
        await second
        await parked
        assert first.cancelled()
        assert [w.result() for w in waiters] == [None] * 20
        async with SQLiteStateStore(path) as again:  # lock released
            return len(await again.list_all())

    assert run(main()) == 20


def test_using_a_store_that_is_not_open_is_a_clear_error(tmp_path):
    store = SQLiteStateStore(tmp_path / "minions.db")
    with pytest.raises(StateStoreError, match="not open"):
        run(store.save(rec("a")))
    with pytest.raises(StateStoreError, match="not open"):
        run(store.load("orch"))
    with pytest.raises(ValueError, match="max_batch"):
        SQLiteStateStore(tmp_path / "minions.db", max_batch=0)


@pytest.mark.timeout(30)
def test_write_error_fails_the_save_and_the_writer_recovers(tmp_path):
    path = tmp_path / "minions.db"

    def page_count(conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA page_count").fetchone()[0]

    def limit_pages(n: int) -> Callable[[sqlite3.Connection], object]:
        return lambda conn: conn.execute(f"PRAGMA max_page_count={n}").fetchone()

    async def main():
        async with SQLiteStateStore(path) as store:
            await store.save(rec("small"))
            await store._call_in_writer(limit_pages(await store._call_in_writer(page_count)))
            big = rec("big", ctx=os.urandom(200_000))
            with pytest.raises(StateStoreError, match="SQLITE_FULL") as failed:
                await store.save(big)
            assert str(path) in str(failed.value)
            await store._call_in_writer(limit_pages(1_000_000))  # the disk has room again
            await store.save(big)
            assert [r.workflow_id for r in await store.list_all()] == ["small", "big"]

    run(main())
    assert [r.workflow_id for r in read_workflows(path)] == ["small", "big"]


# --- SQLite: opening, creating and refusing ---------------------------------------------------


def test_missing_file_is_created_with_schema_version_wal_and_full_sync(tmp_path):
    path = tmp_path / "new.db"

    async def main():
        async with SQLiteStateStore(path) as store:
            assert path.exists()
            return await store._call_in_writer(
                lambda c: [
                    c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous")
                ]
            )

    assert run(main()) == ["wal", 2]  # 2 == FULL
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StateStoreError, match="does not exist"):
        run(SQLiteStateStore(missing / "minions.db").open())
    assert not missing.exists()


def make_store_file(path: Path, n: int = 300) -> None:
    async def main():
        async with SQLiteStateStore(path) as store:
            await asyncio.gather(*(store.save(rec(f"w{i}", ctx=os.urandom(500))) for i in range(n)))

    run(main())


def corrupt_pages(path: Path) -> None:
    make_store_file(path)
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page : 5 * page] = b"\xa5" * (3 * page)  # wreck b-tree pages, keep the header valid
    path.write_bytes(bytes(data))


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(16 * 1024))


def newer_schema(path: Path) -> None:
    make_store_file(path, n=3)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()


def foreign_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()


UNUSABLE = [
    (corrupt_pages, r"is corrupt \(PRAGMA quick_check"),
    (random_bytes, "not a readable SQLite database"),
    (newer_schema, "schema version 99, newer"),
    (foreign_database, "not a Minions state store"),
]


@pytest.mark.parametrize(("make", "message"), UNUSABLE, ids=[m.__name__ for m, _ in UNUSABLE])
def test_unusable_database_is_refused_and_left_byte_identical(tmp_path, make, message):
    path = tmp_path / "minions.db"
    make(path)
    assert not Path(f"{path}-wal").exists()
    before = snapshot(path)
    for _ in range(2):  # refusing twice changes nothing either
        with pytest.raises(StateStoreError, match=message) as refused:
            run(SQLiteStateStore(path).open())
        assert str(path) in str(refused.value)
        assert re.search("-wal and -shm files\\) aside|another state path", str(refused.value))
        assert siblings(path) <= {"minions.db", "minions.db.lock"}, "refusing created files"
    with pytest.raises(StateStoreError):
        read_workflows(path)
    assert snapshot(path) == before
    assert siblings(path) <= {"minions.db", "minions.db.lock"}, "reading created files"
    # doing what the message says works: the refusal released the lock, a fresh store opens
    for sibling in tmp_path.glob("minions.db*"):
        move_aside(sibling)
    make_store_file(path, n=1)
    assert [r.workflow_id for r in read_workflows(path)] == ["w0"]


def move_aside(file: Path) -> None:
    aside = file.parent / "aside"
    aside.mkdir(exist_ok=True)
    file.rename(aside / file.name)


def test_stray_wal_without_its_database_is_refused(tmp_path):
    path = tmp_path / "minions.db"
    make_store_file(path, n=1)
    wal = Path(f"{path}-wal")

    async def crash_leaving_a_wal():  # copy the WAL while the store is still open
        async with SQLiteStateStore(path) as store:
            await store.save(rec("in-the-wal"))
            return wal.read_bytes()

    wal_bytes = run(crash_leaving_a_wal())
    path.unlink()
    wal.write_bytes(wal_bytes)
    with pytest.raises(StateStoreError, match="write-ahead log"):
        run(SQLiteStateStore(path).open())
    assert not path.exists() and wal.read_bytes() == wal_bytes


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir() if p.name.startswith(path.name)}


def test_empty_file_is_refused_naming_the_file_and_the_command(tmp_path):
    """A truncated store must not silently become a new one: its workflows would be gone."""
    path = tmp_path / "minions.db"
    path.touch()
    for attempt in (lambda: run(SQLiteStateStore(path).open()), lambda: read_workflows(path)):
        with pytest.raises(StateStoreError, match=r"empty file \(0 bytes\)") as refused:
            attempt()
        assert str(path) in str(refused.value)
        assert f"minions init-store --db {path}" in str(refused.value)
    assert path.stat().st_size == 0
    assert siblings(path) <= {"minions.db", "minions.db.lock"}
    # Initialising it on purpose, as the message says, gives a working empty store.
    assert initialise(path) is True
    assert read_workflows(path) == []
    assert initialise(path) is False, "a second init leaves the store as it is"


def test_sqlite_file_without_our_table_is_refused(tmp_path):
    path = tmp_path / "minions.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()  # header only, no tables
    assert path.stat().st_size > 0
    before = snapshot(path)
    with pytest.raises(StateStoreError, match="without Minions' table"):
        run(SQLiteStateStore(path).open())
    assert snapshot(path) == before


def test_a_new_store_appears_complete_under_its_name(tmp_path):
    path = tmp_path / "minions.db"
    stale = tmp_path / ".minions.db.creating"
    stale.write_bytes(b"half a database from a crash")

    async def main():
        async with SQLiteStateStore(path) as store:
            await store.save(rec("a"))

    run(main())
    assert not stale.exists()
    assert read_workflows(path) == [rec("a")]
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_initialise_refuses_what_is_not_a_store(tmp_path):
    path = tmp_path / "minions.db"
    random_bytes(path)
    before = snapshot(path)
    with pytest.raises(StateStoreError, match="not a readable SQLite database"):
        initialise(path)
    assert snapshot(path) == before


# --- SQLite: across processes -----------------------------------------------------------------

CHILD_PRELUDE = """
import asyncio, sys, time
from minions.runtime.state import SQLiteStateStore, WorkflowRecord
def rec(wid):
    return WorkflowRecord("orch", wid, b"e", b"c" * 200, 1, time.time(), time.time())
"""

HOLDER = (
    CHILD_PRELUDE
    + """
async def main():
    store = SQLiteStateStore(sys.argv[1])
    await store.open()
    await asyncio.gather(*(store.save(rec(f"held{i}")) for i in range(5)))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await store.close()
    print("closed", flush=True)
asyncio.run(main())
"""
)

SAVER = (
    CHILD_PRELUDE
    + """
async def saver(store, lane):
    for i in range(100_000):
        await store.save(rec(f"{lane}-{i}"))
        print(f"{lane}-{i}", flush=True)
async def main():
    store = SQLiteStateStore(sys.argv[1])
    await store.open()
    await asyncio.gather(*(saver(store, lane) for lane in range(8)))
asyncio.run(main())
"""
)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)


def kill(child: subprocess.Popen[str]) -> str:
    """SIGKILL the child and return everything it had printed."""
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return out


@pytest.mark.timeout(30)
def test_every_acknowledged_save_survives_sigkill(tmp_path, spawn):
    path = tmp_path / "minions.db"
    child = spawn(SAVER, str(path))
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(400)]
    acknowledged += kill(child).split()
    assert len(acknowledged) >= 400 and "" not in acknowledged

    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()

    async def reopen():
        async with SQLiteStateStore(path) as store:
            return {r.workflow_id for r in await store.load("orch")}

    saved = run(reopen())
    assert set(acknowledged) <= saved


@pytest.mark.timeout(30)
def test_second_opener_is_refused_while_another_process_holds_the_store(tmp_path, spawn):
    path = tmp_path / "minions.db"
    holder = spawn(HOLDER, str(path))
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "ready"

    with pytest.raises(StateStoreError, match=f"in use by another Gru \\(pid {holder.pid}") as e:
        run(SQLiteStateStore(path).open())
    assert str(path) in str(e.value)
    assert [r.workflow_id for r in read_workflows(path)] == [f"held{i}" for i in range(5)]

    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "closed"
    assert holder.wait(timeout=10) == 0

    async def reopen():
        async with SQLiteStateStore(path) as store:
            return len(await store.list_all())

    assert run(reopen()) == 5


def test_second_opener_in_the_same_process_is_refused_until_close(tmp_path):
    path = tmp_path / "minions.db"

    async def main():
        first = SQLiteStateStore(path)
        await first.open()
        with pytest.raises(StateStoreError, match=f"pid {os.getpid()}"):
            await SQLiteStateStore(path).open()
        await first.close()
        async with SQLiteStateStore(path):
            pass

    run(main())


@pytest.mark.timeout(30)
def test_lock_is_released_when_the_holder_is_sigkilled(tmp_path, spawn):
    path = tmp_path / "minions.db"
    holder = spawn(HOLDER, str(path))
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready"
    with pytest.raises(StateStoreError, match="in use"):
        run(SQLiteStateStore(path).open())
    kill(holder)

    async def reopen():
        async with SQLiteStateStore(path) as store:
            return len(await store.load("orch"))

    assert run(reopen()) == 5


def test_read_workflows_refuses_a_missing_file(tmp_path):
    with pytest.raises(StateStoreError, match="no state database"):
        read_workflows(tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()
