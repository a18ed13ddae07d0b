"""Reading what workers say: results, failures, hellos and heartbeats, for any worker.

Design note. A worker's frames arrive whole from a channel (the pool's ipc socket, or relayed by
a worker host over tcp); :class:`Replies` decodes each one once, hands a result or failure to
the call the Dispatcher says it answers, and a hello to the worker's owner. Decoding never
raises out of here: a frame that does not decode fails the call it must have answered (workers
answer strictly in order), a result that does not match the declared type fails its call as
``invalid-result``, and a reference outside the worker's arena is counted and never read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

from minions.errors import ProtocolError, RemoteError
from minions.ipc import messages as m
from minions.ipc.arena import ArenaError, ParentArena
from minions.ipc.payload import read_result
from minions.ipc.service import MethodSpec
from minions.pool.calls import PendingCall
from minions.pool.dispatcher import Dispatcher

log = logging.getLogger("minions.pool")


class Peer(Protocol):
    """What frame handling needs of a worker, local (a process) or remote (on a host)."""

    @property
    def identity(self) -> bytes: ...
    @property
    def worker_id(self) -> int: ...
    @property
    def said_hello(self) -> bool: ...
    @property
    def arena(self) -> ParentArena | None: ...


W = TypeVar("W", bound=Peer, contravariant=True)


class PeerOwner(Protocol[W]):
    """The owner of a kind of worker: the Supervisor (local) or the Hosts (remote)."""

    def on_hello(self, worker: W, hello: m.Hello) -> None: ...
    def served(self, worker: W, answers: int) -> None: ...


class Replies:
    """Decodes frames of workers of one pool and settles the calls they answer."""

    def __init__(
        self, pool_name: str, dispatcher: Dispatcher, count_bad: Callable[[str], None]
    ) -> None:
        self.pool_name = pool_name
        self._dispatcher = dispatcher
        self._bad = count_bad
        self._specs: dict[str, MethodSpec] = {}
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}

    def bind(self, specs: dict[str, MethodSpec]) -> None:
        """The service's methods: each result is decoded to its handler's declared type."""
        self._specs = specs
        self._decoders = {n: msgspec.msgpack.Decoder(s.result_type) for n, s in specs.items()}

    def handle(self, worker: W, payloads: list[bytes], owner: PeerOwner[W]) -> None:
        """Every frame of one message from ``worker``; ``owner`` admits hellos and counts
        answers (the Supervisor for a local worker, the Hosts for a remote one)."""
        answered = 0
        for payload in payloads:
            try:
                answered += self._on_message(worker, payload, owner)
            except Exception:  # a bug here must not stop the drain of the other frames
                log.exception(
                    "pool %s: handling a frame of worker %d failed",
                    self.pool_name,
                    worker.worker_id,
                )
                self._bad("handler")
        if answered:
            owner.served(worker, answered)

    def _on_message(self, worker: W, payload: bytes, owner: PeerOwner[W]) -> int:
        """Handle one frame; returns 1 if it answered a call."""
        try:
            msg = m.parent_decoder.decode(payload)
        except Exception as exc:  # DecodeError, ValidationError, RecursionError (too deep)
            return self._undecodable(worker, exc)
        match msg:
            case m.Result():
                call = self._take(worker, msg.call_id)
                if call is not None and not call.future.done():
                    self._resolve(worker, call, msg)
                elif msg.buffer is not None and worker.arena is not None:
                    worker.arena.discard()  # nobody reads it; the worker may reuse the space
                return 0 if call is None else 1
            case m.Failure():
                call = self._take(worker, msg.call_id)
                if call is not None:
                    call.fail(
                        RemoteError(
                            kind=msg.kind.value,
                            type_name=msg.type_name,
                            message=msg.message,
                            remote_traceback=msg.traceback,
                            method=call.method,
                            worker_id=worker.worker_id,
                        )
                    )
                    return 1
            case m.Hello():
                owner.on_hello(worker, msg)
            case m.Heartbeat():
                pass  # heard() already noted it
        return 0

    def _take(self, worker: Peer, call_id: int) -> PendingCall | None:
        call = self._dispatcher.take(worker.identity, call_id) if worker.said_hello else None
        if call is None:
            self._bad("unexpected")
        return call

    def _resolve(self, worker: Peer, call: PendingCall, result: m.Result) -> None:
        try:
            if result.buffer is None:
                value = self._decoders[call.method].decode(result.value)
            else:
                declared = self._specs[call.method].result_type
                value = read_result(worker.arena, result.buffer, declared)
        except ArenaError as exc:  # never read: the reference lies outside the arena
            log.warning("pool %s: worker %d: %r", self.pool_name, worker.worker_id, exc)
            self._bad("reference")
            call.fail(
                RemoteError(
                    kind="invalid-result", type_name="ProtocolError", message=str(exc),
                    method=call.method, worker_id=worker.worker_id,
                )
            )  # fmt: skip
        except Exception as exc:  # ValidationError, DecodeError, RecursionError: never escapes
            call.fail(
                RemoteError(
                    kind="invalid-result",
                    type_name=type(exc).__name__,
                    message=f"result does not match the declared type: {exc}",
                    method=call.method,
                )
            )
        else:
            call.resolve(value)

    def _undecodable(self, worker: Peer, exc: Exception) -> int:
        """A frame from one of our workers did not decode. Workers answer strictly in order and
        only a result carries handler-made structure, so it is the answer to the oldest call the
        worker owes: that call fails now instead of waiting for its timeout."""
        why = f"{type(exc).__name__}: {exc}"
        log.warning(
            "pool %s: dropped %r",
            self.pool_name,
            ProtocolError(f"undecodable frame from worker {worker.worker_id}: {why}"),
        )
        self._bad("decode")
        call = self._dispatcher.take(worker.identity, None) if worker.said_hello else None
        if call is None:
            return 0
        call.fail(
            RemoteError(
                kind="invalid-result",
                type_name=type(exc).__name__,
                message=f"the worker's reply could not be decoded ({why}); a handler that "
                "returns msgspec.Raw must return valid msgpack no more than ~1000 levels deep",
                method=call.method,
                worker_id=worker.worker_id,
            )
        )
        return 1
