"""A call's arguments and result on their way across the boundary: in the message, or in the arena.

Design note. Every call is encoded once, when the pool admits it (``TypeError`` before anything
is sent). A buffer argument (``bytes``, ``bytearray``, ``memoryview`` or any other object with
the buffer protocol, such as a NumPy array) at least ``min_bytes`` long, passed directly as one
of the call's arguments, is not encoded: the message holds ``None`` in its slot and, once the
Dispatcher has picked the worker, a :class:`~minions.ipc.messages.Ref` to where the bytes were
copied in that worker's arena. That is the only copy on the parent's side. The worker hands the
handler a view of the arena for a parameter annotated :data:`~minions.ipc.service.Buffer` (no
copy) and a private copy for any other annotation; the usual validation then runs on the real
values. A buffer returned by a handler travels back the same way.

What stays a message: small buffers (below ``min_bytes``, where the arena costs more than it
saves: see ``docs/deployment/performance.md``), buffers nested inside other values, and buffers
that do not fit in the arena's half right now or ever. Those are encoded into the message and
big messages are sent zero-copy. That is the fallback for a payload larger than the arena: it
works, at socket speed instead of memory speed.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minions.ipc import messages as m
from minions.ipc.arena import ALIGN, ArenaError, ParentArena, WorkerArena
from minions.ipc.service import Buffer

Slot = int | str

_EXACT_BUFFERS = (bytes, bytearray, memoryview)
# values that are never sent as raw bytes (msgspec.Raw is pre-encoded msgpack, sent as it is)
_PLAIN = frozenset(
    {int, float, str, bool, type(None), list, dict, tuple, set, frozenset, msgspec.Raw}
)
_has_buffer: dict[type, bool] = {}  # does this type expose the buffer protocol (asked once)


def byte_view(value: Any, min_bytes: int) -> memoryview | None:
    """``value`` as a flat byte view if it is a buffer of at least ``min_bytes``, else ``None``.

    Called on every argument of every call, so plain values cost one set lookup."""
    kind = type(value)
    if kind in _PLAIN:
        return None
    if kind not in _EXACT_BUFFERS:
        known = _has_buffer.get(kind)
        if known is None:
            try:
                memoryview(value).release()
                known = True
            except TypeError:
                known = False
            _has_buffer[kind] = known
        if not known:
            return None
    view = m.buffer_bytes(value)
    return view if view.nbytes >= min_bytes else None


def _find_buffers(
    args: tuple[Any, ...], kwargs: dict[str, Any], min_bytes: int
) -> list[tuple[Slot, memoryview]] | None:
    """The arguments that go to the arena, by slot; ``None`` for most calls, cheaply."""
    plain = _PLAIN
    for value in args:
        if type(value) not in plain:
            break
    else:
        if not kwargs:
            return None
    found: list[tuple[Slot, memoryview]] | None = None
    for i, value in enumerate(args):
        if type(value) not in _PLAIN and (view := byte_view(value, min_bytes)) is not None:
            found = found or []
            found.append((i, view))
    for name, value in kwargs.items():
        if type(value) not in _PLAIN and (view := byte_view(value, min_bytes)) is not None:
            found = found or []
            found.append((name, view))
    return found


_NO_SKELETON = (b"", b"")


def _aligned(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


def _encode(value: Any) -> bytes:
    try:
        return m.encoder.encode(value)
    except RecursionError:
        raise TypeError("arguments nested too deeply to encode") from None


class Request:
    """A call's arguments, encoded once at admission and sendable to any worker (a retry or a
    requeue sends it again, copying its buffers into the next worker's arena)."""

    __slots__ = ("args", "kwargs", "message", "nbytes", "skeleton", "slots", "views")

    def __init__(
        self,
        call_id: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        min_bytes: int,
        max_bytes: int,
    ) -> None:
        """Encode the call; ``TypeError`` if msgspec cannot. Buffers of ``min_bytes`` or more
        go to the arena if together they fit in ``max_bytes`` (0: no arena)."""
        self.args = args
        self.kwargs = kwargs
        self.slots: tuple[Slot, ...] = ()
        self.views: tuple[memoryview, ...] = ()
        found = _find_buffers(args, kwargs, min_bytes) if max_bytes else None
        nbytes = sum(_aligned(v.nbytes) for _, v in found) if found else 0
        if not found or nbytes > max_bytes:  # the common case: the whole call is one message
            self.nbytes, self.skeleton = 0, _NO_SKELETON
            self.message = _encode(m.CallOut(call_id, method, args, kwargs or {}))
            return
        self.message = b""
        self.slots = tuple(slot for slot, _ in found)
        self.views = tuple(view for _, view in found)
        self.nbytes = nbytes
        positional = list(args)
        keywords = dict(kwargs)
        for slot in self.slots:
            if isinstance(slot, int):
                positional[slot] = None
            else:
                keywords[slot] = None
        self.skeleton = (_encode(positional), _encode(keywords) if keywords else m.EMPTY_MAP)

    def inline(self, call_id: int, method: str) -> bytes:
        """The whole call as one message, buffers included (no arena, or too big for it)."""
        return _encode(m.CallOut(call_id, method, self.args, self.kwargs or {}))

    def place(self, arena: ParentArena, at: int, call_id: int, method: str) -> bytes:
        """Copy the buffers into ``arena`` from offset ``at`` (space the caller allocated) and
        return the message that points at them."""
        refs = []
        for slot, view in zip(self.slots, self.views, strict=True):
            arena.write(at, view)
            refs.append(m.Ref(at, view.nbytes, slot))
            at += _aligned(view.nbytes)
        args, kwargs = self.skeleton
        return _encode(
            m.CallOut(call_id, method, msgspec.Raw(args), msgspec.Raw(kwargs), tuple(refs))
        )

    def encoded_arguments(self) -> tuple[bytes, bytes]:
        """The arguments encoded on their own, buffers included: what a poison fingerprint
        hashes (asked only while something is quarantined, or when a call crashed)."""
        return _encode(self.args), _encode(self.kwargs) if self.kwargs else b""


# --- the worker's side ---------------------------------------------------------------------

decode_list = msgspec.msgpack.Decoder(list).decode
decode_keywords = msgspec.msgpack.Decoder(dict[str, Any]).decode


def materialize(view: memoryview, declared: Any) -> Any:
    """What a handler parameter of type ``declared`` receives for a buffer in the arena: the
    view itself for :data:`Buffer`, valid during the call only; a private copy otherwise."""
    if declared is Buffer:
        return view
    if declared is bytearray:
        return bytearray(view)
    return bytes(view)


def fill_buffers(
    call: m.Call,
    arena: WorkerArena | None,
    declared: dict[Slot, Any],
    handed_out: list[memoryview],
) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments with its arena buffers in their slots (views handed to the handler
    are appended to ``handed_out``, to be released after the call). Raises ``ArenaError`` for a
    reference outside the arena, ``TypeError`` for a slot the arguments do not have."""
    positional = decode_list(call.args)
    keywords = decode_keywords(call.kwargs)
    if arena is None:
        raise TypeError("the call references an arena, but this worker has none")
    for ref in call.buffers:
        view = arena.view(ref.offset, ref.length)
        value = materialize(view, declared.get(ref.slot))
        if value is view:
            handed_out.append(view)
        slot = ref.slot
        if isinstance(slot, int) and 0 <= slot < len(positional) and positional[slot] is None:
            positional[slot] = value
        elif isinstance(slot, str) and keywords.get(slot, 0) is None:
            keywords[slot] = value
        else:
            raise TypeError(f"the call's buffer slot {slot!r} is not a placeholder")
    return positional, keywords


def encode_result(call_id: int, value: Any, arena: WorkerArena | None) -> bytes:
    """A handler's return value as one Result message: a big buffer through the arena when it
    fits, anything else encoded inline. Raises what msgspec raises for an unencodable value."""
    if arena is not None:
        view = byte_view(value, arena.min_bytes)
        if view is not None:
            offset = arena.place(view)
            if offset is not None:
                return m.encoder.encode(m.ResultOut(call_id, None, m.Ref(offset, view.nbytes)))
    return m.encoder.encode(m.ResultOut(call_id, value))


# --- the parent's side ---------------------------------------------------------------------


def read_result(arena: ParentArena | None, ref: m.Ref, declared: Any) -> Any:
    """A result that lies in the arena, copied out once and validated against ``declared``.
    Raises ``ArenaError`` (bad reference) or ``msgspec.ValidationError``."""
    if arena is None:
        raise ArenaError("the reply references an arena, but this worker has none")
    data = arena.read(ref.offset, ref.length, bytearray if declared is bytearray else bytes)
    return msgspec.convert(data, declared)
