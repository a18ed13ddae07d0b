"""The control endpoint and its commands, end to end: a real Gru with a real pool on this
test's loop, the real ``minions`` CLI in child processes talking to it over the real socket."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import zmq

from apps.control_app import Bench, ControlPool, Tick, TickMinion, TickPipeline, use_bench
from conftest import run
from minions import Gru
from minions.control import messages as m
from minions.control.endpoint import SOCKET_NAME, pointer_path

MINIONS = str(Path(sys.executable).with_name("minions"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``minions ARGS`` as a child process while this loop keeps serving Gru."""
    proc = await asyncio.create_subprocess_exec(
        MINIONS, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def gru_with_workflows(db: Path, count: int) -> AsyncIterator[tuple[Gru, Bench, str]]:
    """A durable Gru whose orchestration has ``count`` workflows in flight, each past its real
    worker call and holding at the bench's gate."""
    b = use_bench()
    # A short grace: a stop cancels the held workflows (keeping their checkpoints) soon.
    gru = await Gru.create(db_path=str(db), metrics=False, log_file=str(db.with_suffix(".log")),
                           grace_period_s=0.5)  # fmt: skip
    try:
        started = await gru.start_orchestration(TickPipeline, TickMinion)
        assert started.success, started.reason
        for n in range(count):
            b.ticks.put_nowait(Tick(n))
        assert sorted([await asyncio.wait_for(b.called.get(), 30) for _ in range(count)]) == list(
            range(count)
        )
        yield gru, b, started.orchestration_id
    finally:
        b.gate.set()
        await gru.shutdown()


def pool_of(gru: Gru) -> ControlPool:
    (pool,) = [r for r in gru.live_resources() if isinstance(r, ControlPool)]
    return pool


def test_status_shows_orchestrations_workflows_pools_and_workers(tmp_path: Path) -> None:
    db = tmp_path / "minions.db"

    async def main() -> None:
        async with gru_with_workflows(db, 3) as (gru, _, oid):
            code, out, err = await cli("status", "--json", "--db", str(db))
            assert code == 0, err
            status = json.loads(out)
            assert status["pid"] == os.getpid() and status["state"] == "running"
            assert status["workflows_in_flight"] == 3 and status["durable"] is True
            assert status["memory_level"] == "NORMAL"
            (orch,) = status["orchestrations"]
            assert orch["orchestration_id"] == oid and orch["in_flight"] == 3
            (pool,) = status["pools"]
            snap = pool_of(gru).snapshot()
            assert pool["name"] == "ControlPool" and pool["circuit"] == "closed"
            assert pool["restarts"] == snap.restarts == 0
            assert {w["pid"] for w in pool["workers"]} == {w.pid for w in snap.workers}
            assert sum(w["calls_served"] for w in pool["workers"]) == 3
            assert all({"rss_bytes", "role", "phase", "in_flight"} <= w.keys()
                       for w in pool["workers"])  # fmt: skip
            # The text form carries the same facts.
            code, text, err = await cli("status", "--db", str(db))
            assert code == 0, err
            assert oid in text and "3 workflows in flight" in text
            assert "pool ControlPool: running, circuit closed, 0 restarts" in text
            for w in snap.workers:
                assert str(w.pid) in text

    run(main())


def test_pools_restart_replaces_every_worker_failing_no_call(tmp_path: Path) -> None:
    db = tmp_path / "minions.db"

    async def main() -> None:
        async with gru_with_workflows(db, 2) as (gru, bench, _):
            before = {w.pid for w in pool_of(gru).snapshot().workers}
            restarting = asyncio.ensure_future(cli("pools", "restart", "ControlPool", "--db",
                                                   str(db)))  # fmt: skip
            # Calls keep coming, one workflow after another, until the restart has answered
            # (each workflow then ends: max_in_flight must not stall the stream).
            bench.gate.set()
            during = 0
            while not restarting.done():
                bench.ticks.put_nowait(Tick(100 + during))
                await asyncio.wait_for(bench.called.get(), 30)
                during += 1
            code, out, err = await restarting
            assert code == 0, err
            assert out.strip() == "pool ControlPool: replaced 2 workers"
            assert during >= 1
            after = {w.pid for w in pool_of(gru).snapshot().workers}
            assert len(after) == 2 and not before & after, (before, after)
            assert bench.failures == [], "a call failed during the rolling restart"
            bench.ticks.put_nowait(Tick(999))  # the new workers serve
            assert await asyncio.wait_for(bench.called.get(), 30) == 999

    run(main())


def test_orchestrations_stop_by_id_and_refusals(tmp_path: Path) -> None:
    db = tmp_path / "minions.db"

    async def main() -> None:
        async with gru_with_workflows(db, 2) as (gru, _, oid):
            code, out, err = await cli("orchestrations", "stop", "nope", "--db", str(db))
            assert code == 2 and out == ""
            assert err.count("\n") == 1 and "no running orchestration 'nope'" in err
            code, out, err = await cli("pools", "restart", "Nope", "--db", str(db))
            assert code == 2 and err.count("\n") == 1
            assert "no pool named 'Nope'" in err and "ControlPool" in err
            assert len(gru.status().orchestrations) == 1  # refusals changed nothing
            code, out, err = await cli("orchestrations", "stop", oid, "--db", str(db))
            assert code == 0, err
            assert f"orchestration {oid} stopped (2 workflows cancelled" in out
            assert gru.status().orchestrations == ()

    run(main())


def test_garbage_on_the_socket_is_refused_and_gru_serves_on(tmp_path: Path) -> None:
    db = tmp_path / "minions.db"

    async def main() -> None:
        async with gru_with_workflows(db, 1) as (_gru, _, _oid):
            path = Path(pointer_path(db).read_text().strip())
            replies = await asyncio.to_thread(_raw_exchanges, path)
            assert [type(r) for r in replies] == [m.Refused, m.Refused, m.Status]
            assert "not a control request" in replies[0].reason
            code, out, err = await cli("status", "--json", "--db", str(db))
            assert code == 0 and json.loads(out)["workflows_in_flight"] == 1, err

    run(main())


def _raw_exchanges(path: Path) -> list[m.Reply]:
    """Junk bytes, a well-formed message of an unknown kind, a malformed multipart from a
    DEALER (dropped), then a real status request."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"ipc://{path}")
        dealer.send_multipart([b"no", b"delimiter", b"frames"])  # no reply expected
        dealer.close(linger=1000)
        out = []
        for payload in (b"\x00junk", msgspec.msgpack.encode({"type": "format-disk"}),
                        m.encoder.encode(m.StatusRequest())):  # fmt: skip
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.RCVTIMEO, 10_000)
            req.connect(f"ipc://{path}")
            req.send(payload)
            out.append(m.reply_decoder.decode(req.recv()))
            req.close(linger=0)
        return out
    finally:
        ctx.term()


def test_no_gru_is_one_line_and_exit_2(tmp_path: Path) -> None:
    stale_dir = tmp_path / "run"
    stale_dir.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_dir / SOCKET_NAME))  # bound, never listening: as a killed Gru leaves it
    stale.close()

    async def main() -> None:
        cases = [
            (("status", "--db", str(tmp_path / "absent.db")), "no Gru is running for"),
            (("status", "--runtime-dir", str(stale_dir)), "left by one that died"),
            (("status", "--socket", str(tmp_path / "nowhere.sock")), "no control socket at"),
            (("pools", "restart", "X", "--timeout", "-1"), "not between 0 and 86400"),
            (("orchestrations",), "required"),
        ]
        for args, needle in cases:
            code, out, err = await cli(*args)
            assert code == 2, (args, err)
            assert out == "" and err.count("\n") == 1 and "Traceback" not in err, (args, err)
            assert needle in err, (args, err)

    run(main())


def test_found_from_runtime_directory_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "run-minions"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    db = tmp_path / "state" / "minions.db"
    db.parent.mkdir()

    async def main() -> Path:
        async with gru_with_workflows(db, 1) as (_gru, _, _oid):
            sock = runtime / SOCKET_NAME
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert pointer_path(db).read_text().strip() == str(sock)
            # As under the unit: $RUNTIME_DIRECTORY alone finds it, from any directory.
            code, out, err = await cli("status", "--json", env={"RUNTIME_DIRECTORY": str(runtime)})
            assert code == 0 and json.loads(out)["workflows_in_flight"] == 1, err
            return sock

    sock = run(main())
    assert not sock.exists() and not pointer_path(db).exists()
    assert runtime.is_dir(), "systemd's directory is systemd's to remove"


def test_a_private_directory_admits_only_gru_s_uid(tmp_path: Path) -> None:
    """Without $RUNTIME_DIRECTORY Gru makes its own 0700 directory; another uid cannot connect,
    and the client says so in one line."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    db = tmp_path / "minions.db"
    os.chmod(tmp_path, 0o755)  # others may reach the pointer, never the socket

    async def main() -> Path:
        async with gru_with_workflows(db, 1) as _:
            sock = Path(pointer_path(db).read_text().strip())
            mode = stat.S_IMODE(sock.parent.stat().st_mode)
            assert mode == 0o700 and sock.parent.stat().st_uid == os.getuid()
            probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
                     "s.connect(sys.argv[1])")  # fmt: skip
            nobody = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", probe, str(sock), user=65534,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(nobody.communicate(), 30)
            assert nobody.returncode != 0 and b"PermissionError" in err
            return sock.parent

    private = run(main())
    assert not private.exists(), "Gru removes the directory it made"


def test_init_store_does_what_the_refusal_says(tmp_path: Path) -> None:
    """A truncated store is refused by Gru with a message naming `minions init-store`; running
    that command gives a store Gru then opens, and the command never overwrites anything else."""
    db = tmp_path / "minions.db"
    db.touch()

    async def main() -> None:
        with pytest.raises(Exception, match="minions init-store --db") as refused:
            await Gru.create(db_path=str(db), metrics=False, log_file=str(tmp_path / "g.log"))
        command = str(refused.value).split("`")[1].split()
        assert command[:2] == ["minions", "init-store"]
        code, out, err = await cli(*command[1:])
        assert code == 0 and out.strip() == f"initialised an empty state database at {db}", err
        code, out, err = await cli(*command[1:])
        assert code == 0 and "already a Minions state database" in out, err
        gru = await Gru.create(db_path=str(db), metrics=False, log_file=str(tmp_path / "g.log"))
        await gru.shutdown()
        other = tmp_path / "notes.db"
        other.write_bytes(b"my own notes, not SQLite" * 100)
        code, out, err = await cli("init-store", "--db", str(other))
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "not a readable SQLite database" in err
        assert other.read_bytes() == b"my own notes, not SQLite" * 100

    run(main())


def test_a_live_socket_in_the_runtime_directory_is_never_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Grus given one runtime directory: the second serves from a private one instead of
    unlinking the first one's socket (a stale socket, nobody listening, is replaced)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(runtime / SOCKET_NAME))
    other.listen(1)
    db = tmp_path / "minions.db"

    async def main() -> None:
        async with gru_with_workflows(db, 1) as _:
            ours = Path(pointer_path(db).read_text().strip())
            assert ours.parent != runtime and ours.exists()
            assert (runtime / SOCKET_NAME).exists()
            code, out, err = await cli("status", "--json", "--db", str(db))
            assert code == 0 and json.loads(out)["workflows_in_flight"] == 1, err

    try:
        run(main())
    finally:
        other.close()


def test_a_control_socket_that_cannot_bind_is_one_error_and_gru_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from minions.control import endpoint

    gone = endpoint.Place(tmp_path / "no-such-dir", owned=False)
    monkeypatch.setattr(endpoint, "choose_place", lambda environ: gone)

    async def main() -> None:
        gru = await Gru.create(db_path=str(tmp_path / "minions.db"), metrics=False,
                               logger=logging.getLogger("test.control"))  # fmt: skip
        try:
            assert gru.status().state.value == "running"
            assert not pointer_path(tmp_path / "minions.db").exists()
        finally:
            await gru.shutdown()

    with caplog.at_level(logging.ERROR, logger="test.control"):
        run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "control endpoint disabled" in errors[0], errors
    assert str(gone.socket) in errors[0]
