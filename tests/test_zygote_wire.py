"""The zygote's wire and Gru's handle of it, driven directly on real processes.

A real zygote over its real control socket, a real ROUTER where its workers say hello as they
would to a pool, a real ``Zygote`` handle on the event loop with a recorder standing in for the
Spawner: per-request tokens and descriptors, the go pipe, a full socket, a refusal read after
the zygote died, and the worker's command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq

from conftest import eventually, run
from minions.ipc import messages as m
from minions.ipc import zygote as wire
from minions.ipc.exits import ORPHANED_EXIT
from minions.ipc.worker import WorkerArgs, parse_args
from minions.pool import zygote as parent_side
from minions.pool.process import wait_pidfd
from minions.pool.spawn import WorkerSpec, become_subreaper, child_env, spawn_exec
from pools import SERVICE


def wait_exit(pid: int, pidfd: int, timeout: float = 10.0) -> int | None:
    """Exit status of our child ``pid`` once it ended, ``None`` if it is still alive."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    if not readable:
        return None
    try:
        return wait_pidfd(pidfd)
    finally:
        os.close(pidfd)


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
