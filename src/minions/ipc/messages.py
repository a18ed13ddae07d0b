"""The wire between Gru and its workers: one tagged union of frozen msgspec Structs.

Design note. Every ZeroMQ message is exactly one msgpack-encoded Struct; the Struct's tag tells
its kind, and each side decodes with one prebuilt ``Decoder`` for the union it may receive, then
``match``es on the type. Nothing is pickled. Structs are ``array_like`` (compact, fast); follow
msgspec's schema-evolution rules: only *append* fields, always with defaults, and bump
``PROTOCOL_VERSION`` for anything incompatible. Call arguments and results travel as
``msgspec.Raw`` so that each side decodes them with the handler's own types (the worker
validates arguments against annotations, the parent decodes results to the declared return type).

Each message is encoded once: the sender writes :class:`CallOut`/:class:`ResultOut`, which have the
same tag and fields as :class:`Call`/:class:`Result` but carry the values themselves, so
arguments and results are not first encoded on their own and then copied into the message.
Buffers big enough to be worth it travel through the worker's shared-memory arena instead
(:mod:`minions.ipc.arena`): the message then holds ``None`` in their place and a :class:`Ref`
saying where they lie.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

PROTOCOL_VERSION = 3

#: msgpack encoding of an empty map: the ``kwargs`` of a call that has none.
EMPTY_MAP = b"\x80"

#: Frames at least this big are sent zero-copy (ZeroMQ keeps a reference instead of copying).
#: Below it the copy is cheaper than zero-copy's tracker and the wake-ups of pyzmq's garbage
#: thread, which compete with the event loop for the GIL (``benchmarks/thresholds.py``).
ZERO_COPY_MIN_BYTES = 512 * 1024


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


class Ref(msgspec.Struct, frozen=True, array_like=True):
    """Where a buffer lies in the worker's arena. ``slot`` is the argument it fills (a position
    in ``args``, or a keyword of ``kwargs``); a result's is 0. The receiver checks the bounds
    before it reads anything."""

    offset: int
    length: int
    slot: int | str = 0


class Call(msgspec.Struct, frozen=True, tag="call", array_like=True):
    """Run ``method(*args, **kwargs)``. Deadlines are the parent's alone: it kills a worker
    whose call overran, which is the only way to end a native call stuck holding the GIL.
    ``buffers`` are arguments that lie in the arena (their slots hold ``None``)."""

    call_id: int
    method: str
    args: msgspec.Raw
    kwargs: msgspec.Raw
    buffers: tuple[Ref, ...] = ()


class Result(msgspec.Struct, frozen=True, tag="result", array_like=True):
    """The handler returned; ``value`` is its msgpack encoding, or ``None`` when the value is the
    bytes at ``buffer`` in the arena."""

    call_id: int
    value: msgspec.Raw
    buffer: Ref | None = None


class CallOut(msgspec.Struct, frozen=True, tag="call", array_like=True):
    """How the parent writes a :class:`Call`: the arguments themselves, encoded once."""

    call_id: int
    method: str
    args: Any
    kwargs: Any
    buffers: tuple[Ref, ...] = ()


class ResultOut(msgspec.Struct, frozen=True, tag="result", array_like=True):
    """How a worker writes a :class:`Result`: the value itself, encoded once."""

    call_id: int
    value: Any
    buffer: Ref | None = None


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


def buffer_bytes(obj: Any) -> memoryview:
    """The encoder's hook for types msgspec does not know: any object exposing the buffer
    protocol (a NumPy array, ``array.array``, ``mmap``) is sent as its bytes; anything else is
    the ``TypeError`` msgspec would raise."""
    try:
        view = memoryview(obj)
    except TypeError:
        name = type(obj).__qualname__
        raise TypeError(f"Encoding objects of type {name} is unsupported") from None
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


encoder = msgspec.msgpack.Encoder(enc_hook=buffer_bytes)
"""Shared encoder: stateless apart from its buffer, safe to reuse on one thread."""

worker_decoder: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)
parent_decoder: msgspec.msgpack.Decoder[ToParent] = msgspec.msgpack.Decoder(ToParent)
