"""The worker process: a fresh interpreter, or a fork of the pool's zygote, serving one
``WorkerService`` over a DEALER socket.

Started by the pool either as ``python -m minions.ipc.worker ...`` (exec spawn) or forked by the
pool's zygote (``minions.ipc.zygote``), which calls :func:`run` in the new process; never a fork
of Gru. Order of boot matters: arm parent-death signalling first (so a Gru killed at any moment
leaves no orphan), then faulthandler to the per-worker crash file (so a segfault in ``setup()`` is
already explained), then import the service and run ``setup()``, and only then make the ZeroMQ
context and say hello. Calls are served strictly one at a time, in arrival order; the pool relies
on that order to know which call killed a worker.

The import chain is kept short because an exec-spawned worker pays for it on every respawn:
no argparse (a dozen fixed options), ``traceback`` only when something failed, nothing of the
parent's side (``minions.pool``, psutil, Prometheus, asyncio).
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import msgspec
import zmq

from minions.errors import ProtocolError
from minions.ipc import messages as m
from minions.ipc.arena import WorkerArena
from minions.ipc.exits import BOOT_FAILED_EXIT, ORPHANED_EXIT
from minions.ipc.marker import CallMarker, marker_path
from minions.ipc.payload import decode_keywords, decode_list, encode_result, fill_buffers
from minions.ipc.service import MethodSpec, WorkerService, describe, load_service

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
TOKEN_ENV = "MINIONS_WORKER_TOKEN"
USAGE = (
    "usage: minions worker --endpoint ADDR --service MODULE:CLASS --worker-id N --identity ID "
    "--crash-file PATH --parent-pid PID [--heartbeat-s S] [--fds FD,FD...] [--arena-slot I]"
)


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """A worker's arguments: rendered by the pool (:meth:`argv`), parsed by the worker
    (:func:`parse_args`). The token is never among them: it travels in the environment (exec)
    or in the zygote's spawn request, so it never shows in ``ps``."""

    endpoint: str
    service: str
    worker_id: int
    identity: str
    crash_file: str
    parent_pid: int
    heartbeat_s: float = 1.0
    fds: tuple[int, ...] = ()  # descriptors the pool handed over, as numbered here
    arena_slot: int = -1  # which of ``fds`` is the worker's shared-memory arena (-1: none)

    def argv(self) -> list[str]:
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fds":
                if not value:
                    continue
                value = ",".join(str(fd) for fd in value)
            out += [f"--{f.name.replace('_', '-')}", str(value)]
        return out


def parse_args(argv: Sequence[str]) -> WorkerArgs:
    """Parse ``--name value`` pairs; a bad command line exits with status 2 and the usage."""
    if "--help" in argv or "-h" in argv:
        print(f"{USAGE}\n\nServe a WorkerService; started by a pool, not by hand.")
        raise SystemExit(0)
    fields = {f"--{f.name.replace('_', '-')}": f for f in dataclasses.fields(WorkerArgs)}
    values: dict[str, Any] = {}
    try:
        if len(argv) % 2:
            raise ValueError(f"option {argv[-1]!r} has no value")
        for flag, text in zip(argv[::2], argv[1::2], strict=True):
            f = fields.get(flag)
            if f is None:
                raise ValueError(f"unknown option {flag!r}")
            if f.name == "fds":
                values[f.name] = tuple(int(fd) for fd in text.split(",") if fd)
            else:
                values[f.name] = {"int": int, "float": float}.get(str(f.type), str)(text)
        return WorkerArgs(**values)
    except (ValueError, TypeError) as exc:  # TypeError: a required option is missing
        print(f"minions worker: {exc}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None


def _prctl(option: int, arg: int | bytes) -> bool:
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux
        return False


def arm_parent_death(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies; exit now if it already has.

    The check comes after arming: a parent that died just before would otherwise be missed.
    For a forked worker the parent is Gru, which adopted it (child subreaper) before telling it
    to boot, so ``parent_pid`` is Gru's pid in both spawn modes."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # not Linux: the idle getppid() check still works
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT)


def name_process(name: str) -> None:
    """Set the name ``ps -o comm`` and ``top`` show (at most 15 bytes): a forked worker still
    carries the zygote's command line, its name tells it apart."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


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

    __slots__ = ("args_decoder", "declared", "fields", "func", "keyword_only", "positional", "spec")

    def __init__(self, spec: MethodSpec, func: Callable[..., Any]) -> None:
        self.spec = spec
        self.func = func
        self.args_decoder = msgspec.msgpack.Decoder(spec.args_type)
        self.fields = msgspec.structs.fields(spec.args_type)
        # each parameter's type by position and by name: what an arena buffer becomes
        self.declared: dict[int | str, Any] = {f.name: f.type for f in self.fields}
        self.declared.update(enumerate(f.type for f in self.fields))
        self.positional = spec.positional if spec.positional >= 0 else len(self.fields)
        self.keyword_only = spec.params[self.positional :]  # passed by name, never by position

    def bind(
        self, call: m.Call, arena: WorkerArena | None, views: list[memoryview]
    ) -> tuple[Any, ...]:
        """Decode and type-check the arguments; raises ``msgspec.ValidationError``/``TypeError``
        (``ArenaError`` for a buffer reference outside the arena). Views of the arena given to
        the handler are added to ``views``."""
        if call.buffers:
            return self._bind(*fill_buffers(call, arena, self.declared, views))
        if len(call.kwargs) == 1 and not self.keyword_only:  # the only one-byte map is {}
            return msgspec.structs.astuple(self.args_decoder.decode(call.args))
        return self._bind(decode_list(call.args), decode_keywords(call.kwargs))

    def run(self, args: tuple[Any, ...]) -> Any:
        """Call the handler with bound arguments, keyword-only ones by name."""
        if not self.keyword_only:
            return self.func(*args)
        n = self.positional
        return self.func(*args[:n], **dict(zip(self.keyword_only, args[n:], strict=True)))

    def _bind(self, positional: list[Any], keywords: dict[str, Any]) -> tuple[Any, ...]:
        if len(positional) > self.positional:
            raise TypeError(f"takes {self.positional} positional arguments, got {len(positional)}")
        values: list[Any] = list(positional)
        for f in self.fields[len(positional) :]:
            if f.name in keywords:
                values.append(keywords.pop(f.name))
            elif f.required or f.default is msgspec.UNSET:  # UNSET: see service._args_struct
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
    import traceback  # only once something failed: not on every worker's boot path

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
            value = handler.run(args)
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


Preloaded = tuple[type[WorkerService], dict[str, MethodSpec]]
"""A service class and its handler specs, imported and described before the fork (zygote)."""


def _boot(
    service_path: str, crash: IO[str], preloaded: Preloaded | None
) -> tuple[WorkerService, dict[str, _Handler]]:
    """Import the service (unless the zygote did) and run ``setup()``; on failure write why to
    the crash file and exit."""
    try:
        if preloaded is None:
            cls = load_service(service_path)
            specs = describe(cls)
        else:
            cls, specs = preloaded
        service = cls()
        service.setup()
        handlers = {name: _Handler(spec, getattr(service, name)) for name, spec in specs.items()}
    except BaseException:
        crash.write(_traceback())
        crash.flush()
        os._exit(BOOT_FAILED_EXIT)
    return service, handlers


def run(args: WorkerArgs, token: str, preloaded: Preloaded | None = None) -> int:
    """Boot, say hello, serve until told to stop or the parent is gone.

    Called in the worker process: by :func:`main` after an exec, by the zygote after a fork
    (with the service it already imported). ``token`` is the pool's, for the hello."""
    arm_parent_death(args.parent_pid)
    name_process(f"minions-w{args.worker_id}")
    prefer_oom_kill()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to Gru, which stops us
    crash = open(args.crash_file, "w", buffering=1)  # noqa: SIM115 - lives as long as we do
    faulthandler.enable(file=crash, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=crash, all_threads=True, chain=False)
    service, handlers = _boot(args.service, crash, preloaded)
    marker = CallMarker(marker_path(args.crash_file))
    arena = WorkerArena(args.fds[args.arena_slot]) if args.arena_slot >= 0 else None

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
    args: WorkerArgs,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point after an exec spawn: the token comes in the environment, which is then
    cleared of it so that nothing the service starts inherits it."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args, os.environ.pop(TOKEN_ENV, ""))


if __name__ == "__main__":
    sys.exit(main())
