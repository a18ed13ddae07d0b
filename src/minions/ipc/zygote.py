"""The zygote: a fresh interpreter that imports a service once and forks workers from it.

Design note. Starting a worker by exec costs an interpreter start plus the imports of msgspec,
pyzmq and the service module on every respawn. The pool's zygote pays that once: it is started
by the pool as ``python -m minions.ipc.zygote`` (never a fork of Gru, so it holds none of Gru's
threads, sockets or locks), imports the worker machinery and the service module, but never runs
``setup()`` or imports the native extension, and then forks a worker for each request. The
worker runs ``setup()`` after the fork, so native state is never shared between workers.

What must hold before each fork, checked by the zygote itself: one thread only (a fork copies
the forking thread alone; a lock held by another thread would stay locked in the child for
good), no ZeroMQ context (it would hold I/O threads; each worker makes its own), no faulthandler
(each worker enables its own, on its own crash file). A service whose import starts a thread is
refused (:class:`Refused`) and the pool spawns it with exec from then on.

Who is the worker's parent? Exact exit statuses need ``waitid``, which only a parent can call,
and ``PR_SET_PDEATHSIG`` fires on the parent's death. If the zygote were the parent, a zygote
crash would kill (or orphan) every worker, and Gru could not read their statuses. So Gru is a
child subreaper and the zygote forks twice: an intermediate process forks the worker and exits
at once, the kernel re-parents the worker to Gru, and the zygote reports the worker's pid once it
has reaped the intermediate (requests queued together, as at a pool's start, share one
intermediate). The worker then waits on a pipe from Gru (the *go* pipe, sent with
the request) before it does anything: Gru writes ``GO`` after it opened a pidfd on its new child;
EOF instead (Gru gave the request up, or died) makes the worker exit. Only then does it arm
``PR_SET_PDEATHSIG`` (against Gru, its parent now) and check ``getppid()`` again. The zygote's
own death therefore costs no worker; Gru notices it on the zygote's pidfd, spawns by exec
meanwhile and restarts it.

The wire between Gru and the zygote is a ``SOCK_SEQPACKET`` socket pair (one datagram per
message, file descriptors passed with ``SCM_RIGHTS``: the go pipe first, then the extra
descriptors the worker is handed), carrying one msgspec Struct per message like the worker wire.
The pool's token travels in each :class:`Spawn`, never in the zygote's environment.
"""

from __future__ import annotations

import array
import faulthandler
import gc
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

import msgspec

from minions.ipc import worker
from minions.ipc.exits import ORPHANED_EXIT, ZYGOTE_REFUSED_EXIT
from minions.ipc.service import describe, load_service

ZYGOTE_PROTOCOL = 1
GO = b"g"
MAX_MESSAGE = 65536
MAX_FDS = 64  # the go pipe plus the extra descriptors of one worker
MAX_BATCH = 64  # requests forked by one intermediate process


class Ready(msgspec.Struct, frozen=True, tag="ready", array_like=True):
    """The zygote imported the service and forks on request from now on."""

    pid: int
    protocol: int = ZYGOTE_PROTOCOL


class Refused(msgspec.Struct, frozen=True, tag="refused", array_like=True):
    """The zygote will not fork this service (it could not import it, or its import started a
    thread); it exits after sending this and the pool spawns with exec from then on."""

    reason: str


class Spawn(msgspec.Struct, frozen=True, tag="spawn", array_like=True):
    """Fork a worker with these arguments (``WorkerArgs.argv()`` without ``--fds``: the zygote
    adds the numbers the descriptors received with this message have)."""

    worker_id: int
    argv: tuple[str, ...]
    token: str


class Spawned(msgspec.Struct, frozen=True, tag="spawned", array_like=True):
    """The worker exists, is Gru's child by now, and waits for the go pipe."""

    worker_id: int
    pid: int


class SpawnFailed(msgspec.Struct, frozen=True, tag="spawn_failed", array_like=True):
    """No worker was forked for this request (fork failed: out of memory or pids)."""

    worker_id: int
    error: str


FromZygote = Ready | Refused | Spawned | SpawnFailed

encoder = msgspec.msgpack.Encoder()
request_decoder: msgspec.msgpack.Decoder[Spawn] = msgspec.msgpack.Decoder(Spawn)
reply_decoder: msgspec.msgpack.Decoder[FromZygote] = msgspec.msgpack.Decoder(FromZygote)


def fork_hazard() -> str:
    """Why forking this process now would be unsafe, or ``""``: threads and faulthandler."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: count what Python knows about
        import threading

        threads = threading.active_count()
    if threads > 1:
        return (
            f"importing the service left {threads} threads running in the zygote; forking a "
            "process with threads is unsafe (a lock another thread holds stays locked in the "
            "child). Workers of this pool are spawned with exec instead: set spawn = 'exec' on "
            "the pool to say so, or move what starts the thread into setup()"
        )
    if faulthandler.is_enabled():  # an import turned it on: each worker enables its own
        faulthandler.disable()
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m minions.ipc.zygote --service M:C --control-fd N --parent-pid P``."""
    opts = dict(zip(*[iter(sys.argv[1:] if argv is None else argv)] * 2, strict=True))
    parent_pid = int(opts["--parent-pid"])
    worker.arm_parent_death(parent_pid)
    worker.name_process("minions-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to Gru, which stops us
    control = socket.socket(fileno=int(opts["--control-fd"]))
    try:
        cls = load_service(opts["--service"])
        preloaded: worker.Preloaded = (cls, describe(cls))
    except BaseException:
        _send(control, Refused(f"cannot import the service:\n{_traceback()}"))
        return ZYGOTE_REFUSED_EXIT
    hazard = fork_hazard()
    if hazard:
        _send(control, Refused(hazard))
        return ZYGOTE_REFUSED_EXIT
    gc.collect()
    gc.freeze()  # what the import made is never collected, so workers keep sharing its pages
    _send(control, Ready(os.getpid()))
    return serve(control, preloaded)


Request = tuple[Spawn, list[int]]  # a request and the descriptors that came with it


def serve(control: socket.socket, preloaded: worker.Preloaded) -> int:
    """Fork workers on request until Gru closes the socket (or dies). Requests that are
    already queued when one arrives are forked together (a pool's start asks for all its
    workers at once): one intermediate process for the batch instead of one per worker."""
    while True:
        batch, more = _receive(control)
        if batch is None:
            _send(control, Refused("undecodable request from the pool: a Gru of another version?"))
            return ZYGOTE_REFUSED_EXIT
        hazard = fork_hazard()
        if hazard:
            for _, fds in batch:
                _close(fds)
            _send(control, Refused(hazard))
            return ZYGOTE_REFUSED_EXIT
        try:
            replies = fork_workers(batch, control, preloaded) if batch else []
        finally:
            for _, fds in batch:
                _close(fds)
        for reply in replies:
            _send(control, reply)
        if not more:
            return 0


def _receive(control: socket.socket) -> tuple[list[Request] | None, bool]:
    """One blocking request plus whatever else is queued; ``(batch, False)`` once Gru closed
    its end, ``(None, _)`` for an undecodable request."""
    batch: list[Request] = []
    flags = 0
    while len(batch) < MAX_BATCH:
        try:
            data, fds = _recv(control, flags)
        except BlockingIOError:
            break
        if not data:
            _close(fds)
            return batch, False
        try:
            request = request_decoder.decode(data)
        except msgspec.MsgspecError:
            _close(fds)
            for _, other in batch:
                _close(other)
            return None, False
        if fds:
            batch.append((request, fds))
        else:
            _send(control, SpawnFailed(request.worker_id, "the request had no go pipe"))
        flags = socket.MSG_DONTWAIT
    return batch, True


def _recv(control: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``, which ignores its ``flags`` before Python 3.12."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = control.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize), flags
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def fork_workers(
    batch: list[Request], control: socket.socket, preloaded: worker.Preloaded
) -> list[Spawned | SpawnFailed]:
    """Double-fork: an intermediate forks the workers, reports their pids and exits, so each
    worker is re-parented to the nearest subreaper, Gru, by the time this returns."""
    report_r, report_w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(report_r)
        os.close(report_w)
        return [SpawnFailed(request.worker_id, f"fork failed: {exc}") for request, _ in batch]
    if middle == 0:
        os.close(report_r)
        _intermediate(report_w, batch, control, preloaded)
    os.close(report_w)
    report = b""
    while chunk := os.read(report_r, 4096):
        report += chunk
    os.close(report_r)
    os.waitpid(middle, 0)
    replies: list[Spawned | SpawnFailed] = []
    for i, (request, _) in enumerate(batch):
        record = report[8 * i : 8 * i + 8]
        pid = int.from_bytes(record, "little", signed=True) if len(record) == 8 else 0
        if pid > 0:
            replies.append(Spawned(request.worker_id, pid))
        else:
            why = os.strerror(-pid) if pid < 0 else "the intermediate process died"
            replies.append(SpawnFailed(request.worker_id, f"fork failed: {why}"))
    return replies


def _intermediate(
    report: int, batch: list[Request], control: socket.socket, preloaded: worker.Preloaded
) -> NoReturn:
    """Fork one worker per request, write each pid (or minus errno), exit: never return."""
    try:
        for request, fds in batch:
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -(exc.errno or 1)
            if pid == 0:
                os.close(report)
                for _, other in batch:  # a worker holds its own descriptors only
                    if other is not fds:
                        _close(other)
                _become_worker(request, fds, control, preloaded)
            os.write(report, pid.to_bytes(8, "little", signed=True))
    finally:
        os._exit(0)


def _become_worker(
    request: Spawn, fds: list[int], control: socket.socket, preloaded: worker.Preloaded
) -> NoReturn:
    """In the forked worker: wait for Gru's go, then boot and serve; never return."""
    go, extra = fds[0], fds[1:]
    argv = [*request.argv, *(["--fds", ",".join(map(str, extra))] if extra else [])]
    code = 1
    try:
        control.close()
        if os.read(go, 1) != GO:  # EOF: Gru gave this spawn up, or died
            code = ORPHANED_EXIT
        else:
            os.close(go)
            code = worker.run(worker.parse_args(argv), request.token, preloaded)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        print(_traceback(), file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _traceback() -> str:
    import traceback  # only on failure paths

    return traceback.format_exc()


def _send(control: socket.socket, msg: msgspec.Struct) -> None:
    try:
        control.send(encoder.encode(msg))
    except OSError:  # Gru is gone: our next recv sees EOF, or PDEATHSIG already came
        pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
