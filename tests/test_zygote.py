"""Workers forked from a zygote: every promise checked on real forks, crashes and SIGKILLs.

What a zygote holds (threads, ZeroMQ, faulthandler, the native extension) is read from outside,
in ``/proc/<pid>``, never taken from the zygote's word. Two tests drive the zygote process over
its real control socket with a real ROUTER for the workers' hellos, the rest go through pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq

from conftest import eventually, run
from minions.errors import WorkerCrashed
from minions.ipc import messages as m
from minions.ipc import zygote as wire
from minions.ipc.exits import ORPHANED_EXIT
from minions.ipc.worker import WorkerArgs, parse_args
from minions.ops import metrics
from minions.pool import zygote as parent_side
from minions.pool.process import wait_pidfd
from minions.pool.spawn import WorkerSpec, become_subreaper, child_env, spawn_exec
from minions.workers import PoolConfig, WorkerPool
from pools import SERVICE, DemoPool, running_pid

IMPORTS_A_WORKER_MUST_NOT_MAKE = [
    "argparse", "asyncio", "minions.pool", "minions.runtime", "prometheus_client", "psutil",
    "sqlite3",
]  # fmt: skip


class ZygotePool(DemoPool):
    spawn = "zygote"


class ExecPool(DemoPool):
    spawn = "exec"


class ProbePool(WorkerPool):
    service = "services:Probe"
    workers = 1


# --- reading a process from outside ------------------------------------------------------------


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return links


def caught_signals(pid: int) -> set[int]:
    """Signals the process has a handler for (faulthandler catches SIGSEGV, for one)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError("no SigCgt line")


def live_children() -> list[psutil.Process]:
    """Our children that still run (orphans this subreaper adopted may be zombies)."""
    alive = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # it ended since it was listed
        return []


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def spawns(pool: str, via: str) -> float:
    labels = {"pool": pool, "via": via}
    return metrics.REGISTRY.get_sample_value("minions_worker_spawns_total", labels) or 0.0


def wait_exit(pid: int, pidfd: int, timeout: float = 10.0) -> int | None:
    """Exit status of our child ``pid`` once it ended, ``None`` if it is still alive."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    if not readable:
        return None
    try:
        return wait_pidfd(pidfd)
    finally:
        os.close(pidfd)


# --- the zygote and its workers, from outside --------------------------------------------------


def test_zygote_holds_no_thread_zeromq_faulthandler_or_extension_and_workers_make_their_own() -> (
    None
):
    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = pool.snapshot().zygote_pid
            assert zygote and psutil.Process(zygote).ppid() == os.getpid()
            with pytest.raises(WorkerCrashed):  # one more fork from the same zygote
                await pool.call("segfault")
            assert await pool.wait_ready()  # the replacement said hello: it is fully booted
            assert threads(zygote) == 1
            links = fd_links(zygote)
            assert not [x for x in links if "eventfd" in x or "eventpoll" in x], links  # no ZMQ
            assert sum(x.startswith("socket:") for x in links) == 1  # its control socket only
            assert signal.SIGSEGV not in caught_signals(zygote)  # no faulthandler
            assert "_native" not in maps(zygote)  # setup() never ran here
            assert psutil.Process(zygote).name() == "minions-zygote"
            for pid in pool.worker_pids():
                worker = psutil.Process(pid)
                assert worker.ppid() == os.getpid()  # re-parented to us: we reap it
                assert worker.name().startswith("minions-w")
                assert worker.cmdline()[1:3] == ["-m", "minions.ipc.zygote"]  # a fork of it
                assert threads(pid) > 1 and any("eventfd" in x for x in fd_links(pid))
                assert signal.SIGSEGV in caught_signals(pid)
                assert "_native" in maps(pid)

    run(scenario())


def test_the_token_is_in_no_zygote_environment_or_command_line() -> None:
    async def scenario() -> None:
        async with ZygotePool() as pool:
            token = pool._endpoint.token  # type: ignore[union-attr]
            zygote = pool.snapshot().zygote_pid
            assert pool.snapshot().workers_ready == 2  # so the token reached each worker
            environ = Path(f"/proc/{zygote}/environ").read_bytes()
            cmdline = Path(f"/proc/{zygote}/cmdline").read_bytes()
            assert token.encode() not in environ + cmdline
            assert b"MINIONS_WORKER_TOKEN" not in environ

    run(scenario())


@pytest.mark.parametrize("via", ["zygote", "exec"])
def test_each_worker_gets_its_own_token_and_the_descriptors_it_was_handed(via: str) -> None:
    with router() as (ctx_dir, sock):
        if via == "zygote":
            control, zygote = start_raw_zygote("services:Probe")
        handed = [os.pipe() for _ in range(2)]
        pidfds = []
        try:
            gos = []
            for n, token in ((1, "first-token"), (2, "second-token")):
                args = worker_args(ctx_dir, n, "services:Probe")
                extra = (handed[n - 1][1],)
                if via == "zygote":  # both asked before either is answered: one batch
                    gos.append(raw_request(control, args, token, extra))
                else:
                    spawned = spawn_exec(WorkerSpec(args, token, extra))
                    pidfds.append((spawned.pid, spawned.pidfd))
            for go in gos:
                reply = raw_reply(control)
                pidfds.append((reply.pid, os.pidfd_open(reply.pid)))
                os.write(go, wire.GO)
                os.close(go)
            hellos = dict(receive_hello(sock) for _ in range(2))
            assert {h.worker_id: h.token for h in hellos.values()} == {
                1: "first-token",
                2: "second-token",
            }
            for identity, hello in hellos.items():
                pipe = os.readlink(f"/proc/self/fd/{handed[hello.worker_id - 1][1]}")
                held = call(sock, identity, "fds", dict[int, str])
                assert pipe in held.values(), (pipe, held)
                other = os.readlink(f"/proc/self/fd/{handed[2 - hello.worker_id][1]}")
                assert other not in held.values()  # only what its own request carried
                sock.send_multipart([identity, m.encoder.encode(m.Shutdown("test"))])
            assert [wait_exit(pid, fd) for pid, fd in pidfds] == [0, 0]
        finally:
            for r, w in handed:
                os.close(r)
                os.close(w)
            if via == "zygote":
                control.close()
                assert zygote.wait(timeout=10) == 0  # EOF on its socket: a clean exit


def test_a_forked_worker_waits_for_go_and_exits_unbooted_when_gru_gives_it_up() -> None:
    with router() as (ctx_dir, _sock):
        control, zygote = start_raw_zygote("services:Probe")
        try:
            args = worker_args(ctx_dir, 7, "services:Probe")
            pid, pidfd, go = raw_spawn(control, args, "token", ())
            assert psutil.Process(pid).ppid() == os.getpid()  # adopted before we heard of it
            assert wait_exit(pid, os.dup(pidfd), timeout=0.2) is None  # waiting for go
            assert not Path(args.crash_file).exists()  # it has not started booting
            os.close(go)  # gave up: EOF
            assert wait_exit(pid, pidfd) == ORPHANED_EXIT
            assert not Path(args.crash_file).exists()
        finally:
            control.close()
            zygote.wait(timeout=10)


# --- the zygote's death and the exec fallback --------------------------------------------------


def test_zygote_sigkilled_while_the_pool_is_busy_costs_no_worker_and_no_call() -> None:
    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = pool.snapshot().zygote_pid
            before_exec = spawns("ZygotePool", "exec")
            os.kill(zygote, signal.SIGSTOP)  # it takes requests now, and answers none
            busy = [asyncio.ensure_future(pool.call("ping", i)) for i in range(300)]
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")  # its replacement is asked of the stopped zygote
            survivor = pool.worker_pids()
            assert len(survivor) == 1 and pool.snapshot().booting == 1
            os.kill(zygote, signal.SIGKILL)
            assert await asyncio.gather(*busy) == list(range(300))
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert set(survivor) <= set(pool.worker_pids())  # the zygote's death killed none
            assert spawns("ZygotePool", "exec") == before_exec + 1  # the one it never answered
            await eventually(lambda: pool.snapshot().zygote_pid not in (0, zygote))
            assert pool.snapshot().zygote_restarts == 1
            before_fork = spawns("ZygotePool", "zygote")
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await pool.call("ping", 5) == 5
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert spawns("ZygotePool", "zygote") == before_fork + 1  # forked again

    run(scenario())


def test_a_zygote_that_stops_answering_is_killed_and_replaced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(parent_side, "FORK_REPLY_S", 0.3)

    async def scenario() -> None:
        async with ZygotePool() as pool:
            zygote = psutil.Process(pool.snapshot().zygote_pid)
            zygote.suspend()
            with pytest.raises(WorkerCrashed):
                await pool.call("segfault")
            assert await pool.call("ping", 2) == 2
            await eventually(lambda: pool.snapshot().workers_ready == 2)
            assert not zygote.is_running()  # killed, and reaped by the pool
            await eventually(lambda: pool.snapshot().zygote_pid not in (0, zygote.pid))
        assert "died of SIGKILL: the pool killed it because it did not answer" in caplog.text

    with caplog.at_level(logging.WARNING, logger="minions.pool"):
        run(scenario())


def test_a_service_that_starts_a_thread_at_import_is_refused_and_spawned_by_exec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Threaded(WorkerPool):
        service = "threaded_service:StartsThreadAtImport"
        workers = 2

    async def scenario() -> None:
        before = spawns("Threaded", "exec")
        async with Threaded() as pool:
            assert await pool.call("ping", 3) == 3
            assert pool.snapshot().zygote_pid == 0
            for pid in pool.worker_pids():
                assert psutil.Process(pid).cmdline()[1:3] == ["-m", "minions.ipc.worker"]
            assert spawns("Threaded", "exec") == before + 2
            assert spawns("Threaded", "zygote") == 0
        assert "will not fork threaded_service:StartsThreadAtImport" in caplog.text
        assert "threads running in the zygote" in caplog.text

    with caplog.at_level(logging.ERROR, logger="minions.pool"):
        run(scenario())


class Recorder:
    """Stands in for the Spawner: records what a real zygote handle reports."""

    def __init__(self) -> None:
        self.exited: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

    def forked(self, worker_id: int, pid: int, pidfd: int) -> None:
        raise AssertionError("a stopped zygote forked")

    def fork_failed(self, worker_id: int, why: str) -> None:
        raise AssertionError(why)

    def zygote_exited(self, zygote: Any, returncode: int, unanswered: list[int]) -> None:
        self.exited.set_result(unanswered)


def test_more_requests_than_the_socket_holds_wait_and_none_is_lost_when_the_zygote_dies() -> None:
    async def scenario() -> None:
        become_subreaper()
        events = Recorder()
        zygote = parent_side.Zygote(SERVICE, child_env(None), events)
        zygote.start()
        await eventually(lambda: zygote.state is parent_side.ZygoteState.READY)
        os.kill(zygote.pid, signal.SIGSTOP)  # it reads nothing more: the socket fills up
        fds_before = len(os.listdir("/proc/self/fd"))
        argv = worker_args("/nonexistent", 1, SERVICE).argv()
        assert all(zygote.submit(i, argv, "token", ()) for i in range(1, 401))
        assert zygote.unanswered == 400
        await asyncio.sleep(0)  # a turn of the loop: a writer callback would run now
        assert psutil.Process(zygote.pid).status() == psutil.STATUS_STOPPED  # waited, not killed
        os.kill(zygote.pid, signal.SIGKILL)
        unanswered = await asyncio.wait_for(events.exited, 10)
        assert sorted(unanswered) == list(range(1, 401))  # every one handed back
        # every go pipe closed, and the handle's control socket and pidfd on the zygote too
        assert len(os.listdir("/proc/self/fd")) == fds_before - 2

    run(scenario())


def test_a_refusal_is_read_even_when_the_zygote_is_gone_before_the_loop_looks() -> None:
    """It exits leaving our request unread, so the kernel reports ECONNRESET on our end first;
    what it said before exiting is still there and must be read."""

    async def scenario() -> None:
        become_subreaper()
        events = Recorder()
        zygote = parent_side.Zygote(
            "threaded_service:StartsThreadAtImport", child_env(None), events
        )
        zygote.start()
        assert zygote.submit(1, worker_args("/nonexistent", 1, SERVICE).argv(), "token", ())
        stat = Path(f"/proc/{zygote.pid}/stat")
        deadline = time.monotonic() + 20
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":  # the loop does not run
            assert time.monotonic() < deadline, "the zygote did not exit"
            time.sleep(0.005)
        assert await asyncio.wait_for(events.exited, 10) == [1]
        assert "threads running in the zygote" in zygote.refusal

    run(scenario())


# --- exit statuses, the exec setting, the parent's death ---------------------------------------

STATUSES = [
    ("segfault", (), {"signal": signal.SIGSEGV, "exit_code": None}),
    ("abort", (), {"signal": signal.SIGABRT, "exit_code": None}),
    ("exit", (7,), {"signal": None, "exit_code": 7}),
    ("kill", (), {"signal": signal.SIGKILL, "exit_code": None}),
]


@pytest.mark.parametrize("pool_cls", [ZygotePool, ExecPool], ids=["zygote", "exec"])
@pytest.mark.parametrize(("how", "args", "expected"), STATUSES, ids=[s[0] for s in STATUSES])
def test_exact_exit_statuses_reach_the_caller(
    pool_cls: type[WorkerPool], how: str, args: tuple[Any, ...], expected: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with pool_cls() as pool:
            if how == "kill":  # from outside, like the OOM killer
                call = asyncio.ensure_future(pool.call("sleep", 30.0))
                await eventually(lambda: running_pid(pool, "sleep"))
                os.kill(running_pid(pool, "sleep") or 0, signal.SIGKILL)
            else:
                call = asyncio.ensure_future(pool.call(how, *args))
            with pytest.raises(WorkerCrashed) as info:
                await call
            for name, value in expected.items():
                assert getattr(info.value, name) == value, (name, info.value)

    run(scenario())


def test_exec_spawn_is_a_setting_with_no_zygote() -> None:
    async def scenario() -> None:
        async with ExecPool() as pool:
            assert pool.snapshot().zygote_pid == 0
            for pid in pool.worker_pids():
                worker = psutil.Process(pid)
                assert worker.ppid() == os.getpid()
                assert worker.cmdline()[1:3] == ["-m", "minions.ipc.worker"]
            assert not [p for p in live_children() if "minions.ipc.zygote" in cmdline(p)]

    run(scenario())
    with pytest.raises(ValueError, match="spawn must be one of"):
        PoolConfig(SERVICE, spawn="vfork")


def test_sigkilled_gru_leaves_neither_zygote_nor_workers() -> None:
    """A worker stuck in native code never runs its idle parent check: only PDEATHSIG, armed
    against Gru after the re-parenting, ends it."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import eventually
        from pools import DemoPool, running_pid

        async def main():
            async with DemoPool() as pool:
                spin = asyncio.ensure_future(pool.call("spin"))
                await eventually(lambda: running_pid(pool, "spin"))
                print(pool.snapshot().zygote_pid, *pool.worker_pids(), flush=True)
                await spin

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, os.path.dirname(__file__)], stdout=subprocess.PIPE, text=True
    )
    procs: list[psutil.Process] = []
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and pids[0] != 0  # the zygote and two workers
        procs = [psutil.Process(p) for p in pids]
        assert [p.ppid() for p in procs] == [parent.pid] * 3
        parent.kill()
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, f"survived Gru: {alive}"
    finally:
        parent.kill()
        parent.wait()
        for proc in procs:  # survivors of a failed run are no longer our children: end them
            with contextlib.suppress(psutil.Error):
                proc.kill()


# --- the worker's boot path -------------------------------------------------------------------


@pytest.mark.parametrize("pool_cls", [ZygotePool, ExecPool], ids=["zygote", "exec"])
def test_workers_import_nothing_of_the_parent_side(pool_cls: type[WorkerPool]) -> None:
    class Probing(ProbePool):
        spawn = pool_cls.spawn

    async def scenario() -> None:
        async with Probing() as probe:
            assert await probe.call("imported", IMPORTS_A_WORKER_MUST_NOT_MAKE) == []
        async with pool_cls() as pool:  # the demo service too: psutil only if a call needs it
            for pid in pool.worker_pids():
                assert "_psutil_linux" not in maps(pid)

    run(scenario())


def test_worker_arguments_round_trip_and_a_bad_command_line_says_what_is_wrong(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = WorkerArgs("ipc:///x/p.sock", SERVICE, 3, "w3-ab", "/x/c.txt", 42, 0.5, (7, 9))
    assert parse_args(args.argv()) == args
    for bad in (["--worker-id", "x"], ["--nope", "1"], ["--endpoint"], args.argv()[2:]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2
        assert "usage: minions worker" in capsys.readouterr().err


# --- plumbing for the raw-protocol tests -------------------------------------------------------


@contextlib.contextmanager
def router() -> Iterator[tuple[str, zmq.Socket[bytes]]]:
    """A ROUTER where workers connect, as a pool's channel would (blocking, with a timeout)."""
    directory = tempfile.mkdtemp(prefix="mz")  # short: the socket path must fit in sun_path
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{directory}/p.sock")
    try:
        yield directory, sock
    finally:
        sock.close()
        ctx.term()
        shutil.rmtree(directory, ignore_errors=True)


def worker_args(directory: str, worker_id: int, service: str) -> WorkerArgs:
    return WorkerArgs(
        f"ipc://{directory}/p.sock", service, worker_id, f"w{worker_id}",
        f"{directory}/crash-{worker_id}.txt", os.getpid(), 0.2,
    )  # fmt: skip


def start_raw_zygote(service: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    assert become_subreaper()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = subprocess.Popen(
        [
            sys.executable, "-m", "minions.ipc.zygote", "--service", service,
            "--control-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()),
        ],
        env=child_env(None),
        pass_fds=(theirs.fileno(),),
    )  # fmt: skip
    theirs.close()
    ours.settimeout(20)
    ready = wire.reply_decoder.decode(ours.recv(wire.MAX_MESSAGE))
    assert ready == wire.Ready(zygote.pid), ready
    return ours, zygote


def raw_request(
    control: socket.socket, args: WorkerArgs, token: str, extra: tuple[int, ...]
) -> int:
    """Ask the zygote for a worker; returns our end of its go pipe."""
    go_r, go_w = os.pipe()
    request = wire.Spawn(args.worker_id, tuple(args.argv()), token)
    socket.send_fds(control, [wire.encoder.encode(request)], [go_r, *extra])
    os.close(go_r)
    return go_w


def raw_reply(control: socket.socket) -> wire.Spawned:
    reply = wire.reply_decoder.decode(control.recv(wire.MAX_MESSAGE))
    assert isinstance(reply, wire.Spawned), reply
    return reply


def raw_spawn(
    control: socket.socket, args: WorkerArgs, token: str, extra: tuple[int, ...]
) -> tuple[int, int, int]:
    """One request and its answer: the worker's pid, a pidfd on it, our end of its go pipe."""
    go = raw_request(control, args, token, extra)
    reply = raw_reply(control)
    assert reply.worker_id == args.worker_id, reply
    return reply.pid, os.pidfd_open(reply.pid), go


def receive_hello(sock: zmq.Socket[bytes]) -> tuple[bytes, m.Hello]:
    """The next hello; heartbeats of workers that said theirs already are skipped."""
    while True:
        identity, payload = sock.recv_multipart()
        msg = m.parent_decoder.decode(payload)
        if isinstance(msg, m.Hello):
            return identity, msg
        assert isinstance(msg, m.Heartbeat), msg


def call(sock: zmq.Socket[bytes], identity: bytes, method: str, result_type: Any) -> Any:
    no_args = msgspec.Raw(m.encoder.encode(()))
    request = m.Call(1, method, no_args, msgspec.Raw(m.EMPTY_MAP))
    sock.send_multipart([identity, m.encoder.encode(request)])
    while True:
        sender, payload = sock.recv_multipart()
        reply = m.parent_decoder.decode(payload)
        if isinstance(reply, m.Result) and sender == identity:
            return msgspec.msgpack.decode(reply.value, type=result_type)
        assert isinstance(reply, m.Heartbeat), reply
