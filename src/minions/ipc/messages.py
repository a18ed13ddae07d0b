"""The wire between Gru and its workers: one tagged union of frozen msgspec Structs.

Design note. Every ZeroMQ message is exactly one msgpack-encoded Struct; the Struct's tag tells
its kind, and each side decodes with one prebuilt ``Decoder`` for the union it may receive, then
``match``es on the type. Nothing is pickled. Structs are ``array_like`` (compact, fast); follow
msgspec's schema-evolution rules: only *append* fields, always with defaults, and bump
``PROTOCOL_VERSION`` for anything incompatible. Call arguments and results travel as
``msgspec.Raw`` so that each side decodes them with the handler's own types (the worker
validates arguments against annotations, the parent decodes results to the declared return type).
"""

from __future__ import annotations

import enum

import msgspec

PROTOCOL_VERSION = 2

#: msgpack encoding of an empty map: the ``kwargs`` of a call that has none.
EMPTY_MAP = b"\x80"


class FailureKind(enum.Enum):
    """Why a worker reports a call as failed while staying alive."""

    EXCEPTION = "exception"
    INVALID_ARGS = "invalid-args"
    UNKNOWN_METHOD = "unknown-method"
    UNENCODABLE_RESULT = "unencodable-result"


class Hello(msgspec.Struct, frozen=True, tag="hello", array_like=True):
    """First message of a worker, sent once ``setup()`` succeeded. Must carry the pool's token;
    the pool refuses a worker whose protocol, pid, service or method list is not what it
    expects (a worker left over from an older deploy)."""

    protocol: int
    worker_id: int
    pid: int
    service: str
    methods: tuple[str, ...]
    token: str


class Call(msgspec.Struct, frozen=True, tag="call", array_like=True):
    """Run ``method(*args, **kwargs)``. Deadlines are the parent's alone: it kills a worker
    whose call overran, which is the only way to end a native call stuck holding the GIL."""

    call_id: int
    method: str
    args: msgspec.Raw
    kwargs: msgspec.Raw


class Result(msgspec.Struct, frozen=True, tag="result", array_like=True):
    """The handler returned; ``value`` is its msgpack encoding."""

    call_id: int
    value: msgspec.Raw


class Failure(msgspec.Struct, frozen=True, tag="failure", array_like=True):
    """The call failed inside a worker that keeps serving."""

    call_id: int
    kind: FailureKind
    type_name: str
    message: str
    traceback: str = ""


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat", array_like=True):
    """Liveness ping an idle worker sends every ``heartbeat_s``; the parent notes when it last
    heard from each worker and does not answer. A worker learns of its parent's death from
    ``PR_SET_PDEATHSIG`` and its idle-time ``getppid()`` check, not from heartbeats."""

    sent_at: float = 0.0


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown", array_like=True):
    """Ask a worker to exit cleanly after its current call."""

    reason: str = ""


ToWorker = Call | Heartbeat | Shutdown
ToParent = Hello | Result | Failure | Heartbeat

encoder = msgspec.msgpack.Encoder()
"""Shared encoder: stateless apart from its buffer, safe to reuse on one thread."""

worker_decoder: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)
parent_decoder: msgspec.msgpack.Decoder[ToParent] = msgspec.msgpack.Decoder(ToParent)
