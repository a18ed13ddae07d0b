"""The worker process: a fresh interpreter serving one ``WorkerService`` over a DEALER socket.

Started by the pool as ``python -m minions.ipc.worker ...`` (never a fork of Gru). Order of
boot matters: arm parent-death signalling first (so a Gru killed at any moment leaves no
orphan), then faulthandler to the per-worker crash file (so a segfault in ``setup()`` is already
explained), then import the service and run ``setup()``, and only then say hello. Calls are
served strictly one at a time, in arrival order; the pool relies on that order to know which
call killed a worker.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any

import msgspec
import zmq

from minions.errors import ProtocolError
from minions.ipc import messages as m
from minions.ipc.arena import WorkerArena
from minions.ipc.marker import CallMarker, marker_path
from minions.ipc.payload import decode_keywords, decode_list, encode_result, fill_buffers
from minions.ipc.service import MethodSpec, describe, load_service
from minions.pool.verdict import BOOT_FAILED_EXIT, ORPHANED_EXIT

_PR_SET_PDEATHSIG = 1
TOKEN_ENV = "MINIONS_WORKER_TOKEN"


def arm_parent_death(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the idle-time getppid() check still works
        pass
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT)


def prefer_oom_kill(score: int = 500) -> None:
    """Offer ourselves to the kernel OOM killer before Gru: at a cgroup's MemoryMax the kernel
    then kills a worker (one respawn, one failed call) rather than the supervisor."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:  # not Linux, or a sandbox that forbids it: the pool still works
        pass


class _Handler:
    """One exposed method, ready to validate and run a call."""

    __slots__ = ("args_decoder", "declared", "fields", "func", "spec")

    def __init__(self, spec: MethodSpec, func: Callable[..., Any]) -> None:
        self.spec = spec
        self.func = func
        self.args_decoder = msgspec.msgpack.Decoder(spec.args_type)
        self.fields = msgspec.structs.fields(spec.args_type)
        # each parameter's type by position and by name: what an arena buffer becomes
        self.declared: dict[int | str, Any] = {f.name: f.type for f in self.fields}
        self.declared.update(enumerate(f.type for f in self.fields))

    def bind(
        self, call: m.Call, arena: WorkerArena | None, views: list[memoryview]
    ) -> tuple[Any, ...]:
        """Decode and type-check the arguments; raises ``msgspec.ValidationError``/``TypeError``
        (``ArenaError`` for a buffer reference outside the arena). Views of the arena given to
        the handler are added to ``views``."""
        if call.buffers:
            return self._bind(*fill_buffers(call, arena, self.declared, views))
        if len(call.kwargs) == 1:  # msgpack's empty map is the only one-byte map
            return msgspec.structs.astuple(self.args_decoder.decode(call.args))
        return self._bind(decode_list(call.args), decode_keywords(call.kwargs))

    def _bind(self, positional: list[Any], keywords: dict[str, Any]) -> tuple[Any, ...]:
        if len(positional) > len(self.fields):
            raise TypeError(f"takes {len(self.fields)} arguments, got {len(positional)}")
        values: list[Any] = list(positional)
        for f in self.fields[len(positional) :]:
            if f.name in keywords:
                values.append(keywords.pop(f.name))
            elif f.required:
                raise TypeError(f"missing required argument {f.name!r}")
            else:
                values.append(f.default if f.default is not msgspec.NODEFAULT else None)
        if keywords:
            raise TypeError(f"unexpected or duplicate keyword arguments {sorted(keywords)}")
        return msgspec.structs.astuple(msgspec.convert(values, self.spec.args_type))


def _describe(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<{type(exc).__qualname__} with an unprintable message: {type(inner).__name__}>"


def _traceback() -> str:
    try:
        return traceback.format_exc()
    except Exception:  # formatting calls __str__ again; the type and frames still help
        return f"<traceback could not be formatted>\n{''.join(traceback.format_stack())}"


def _failure(call_id: int, kind: m.FailureKind, exc: BaseException, tb: str = "") -> bytes:
    return m.encoder.encode(m.Failure(call_id, kind, type(exc).__qualname__, _describe(exc), tb))


def serve_call(
    handlers: dict[str, _Handler], call: m.Call, arena: WorkerArena | None = None
) -> bytes:
    """Run one call and return the encoded Result or Failure. Never raises ``Exception``:
    whatever the handler raises or returns, the worker lives on."""
    handler = handlers.get(call.method)
    if handler is None:
        unknown = LookupError(f"unknown method {call.method!r}; exposed: {sorted(handlers)}")
        return _failure(call.call_id, m.FailureKind.UNKNOWN_METHOD, unknown)
    views: list[memoryview] = []
    try:
        try:
            args = handler.bind(call, arena, views)
        except Exception as exc:  # ValidationError, DecodeError, TypeError, ArenaError, ...
            return _failure(call.call_id, m.FailureKind.INVALID_ARGS, exc)
        try:
            value = handler.func(*args)
        except Exception as exc:
            return _failure(call.call_id, m.FailureKind.EXCEPTION, exc, _traceback())
        try:
            return encode_result(call.call_id, value, arena)
        except Exception as exc:  # TypeError, OverflowError, RecursionError (too deeply nested)
            return _failure(call.call_id, m.FailureKind.UNENCODABLE_RESULT, exc)
    finally:
        _release(views)


def _release(views: list[memoryview]) -> None:
    """End the handler's access to arena space it was lent (see ``Buffer``): a view it kept
    raises on use instead of showing the bytes of a later call. A view something else still
    exports (a NumPy array made from it) cannot be released; that is the handler's promise."""
    for view in views:
        try:
            view.release()
        except BufferError:
            pass


def _boot(service_path: str, crash: IO[str]) -> tuple[Any, dict[str, _Handler]]:
    """Import the service and run ``setup()``; on failure write why to the crash file and exit."""
    try:
        cls = load_service(service_path)
        service = cls()
        service.setup()
        handlers = {
            name: _Handler(spec, getattr(service, name)) for name, spec in describe(cls).items()
        }
    except BaseException:
        crash.write(traceback.format_exc())
        crash.flush()
        os._exit(BOOT_FAILED_EXIT)
    return service, handlers


def run(args: argparse.Namespace) -> int:
    """Boot, say hello, serve until told to stop or the parent is gone."""
    arm_parent_death(args.parent_pid)
    prefer_oom_kill()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to Gru, which stops us
    crash = open(args.crash_file, "w", buffering=1)  # noqa: SIM115 - lives as long as we do
    faulthandler.enable(file=crash, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=crash, all_threads=True, chain=False)
    token = os.environ.pop(TOKEN_ENV, "")
    service, handlers = _boot(args.service, crash)
    marker = CallMarker(marker_path(args.crash_file))
    arena = WorkerArena(args.arena_fd) if args.arena_fd >= 0 else None

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, args.identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(args.endpoint)
    hello = m.Hello(
        m.PROTOCOL_VERSION, args.worker_id, os.getpid(), args.service, tuple(handlers), token
    )
    sock.send(m.encoder.encode(hello))
    try:
        _serve(sock, handlers, marker, arena, args)
        service.teardown()
    finally:
        sock.close(linger=2000)
        ctx.term()
    return 0


def _serve(
    sock: zmq.Socket[bytes],
    handlers: dict[str, _Handler],
    marker: CallMarker,
    arena: WorkerArena | None,
    args: argparse.Namespace,
) -> None:
    sock.setsockopt(zmq.RCVTIMEO, int(args.heartbeat_s * 1000))  # idle -> heartbeat
    heartbeat = m.encoder.encode(m.Heartbeat())
    while True:
        try:
            frames = sock.recv_multipart()  # copying: measured 2 us faster per call than Frames
        except zmq.Again:
            if os.getppid() != args.parent_pid:
                os._exit(ORPHANED_EXIT)
            sock.send(heartbeat)
            continue
        for frame in frames:
            try:
                msg = m.worker_decoder.decode(frame)
            except Exception as exc:  # DecodeError, ValidationError, RecursionError
                error = ProtocolError(f"undecodable frame from the pool: {exc}")
                print(f"minions worker {args.worker_id}: dropped {error!r}", file=sys.stderr)
                continue
            match msg:
                case m.Call():
                    marker.running(msg.call_id)
                    reply = serve_call(handlers, msg, arena)
                    marker.finished(msg.call_id)
                    sock.send(reply, 0, copy=len(reply) < m.ZERO_COPY_MIN_BYTES)
                case m.Shutdown():
                    return
                case m.Heartbeat():
                    pass


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minions worker", description="Serve a WorkerService.")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--worker-id", type=int, required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--crash-file", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--arena-fd", type=int, default=-1, help="inherited memfd of the arena")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
