"""The arena on its own: the ring allocator, bounds checks, placement and reclaim of results,
and the worker's handling of bad references, over real memfds mapped twice in this process
(the parent's mapping and the worker's, exactly as the two processes hold them)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator

import msgspec
import pytest

from minions.ipc import messages as m
from minions.ipc.arena import ALIGN, HEADER, ArenaError, ParentArena, Ring, WorkerArena
from minions.ipc.payload import Request, encode_result
from minions.ipc.service import Buffer, describe, expose
from minions.ipc.worker import _Handler, serve_call
from minions.workers import WorkerService

SIZE = HEADER + 2 * 65536


@pytest.fixture
def pair() -> Iterator[tuple[ParentArena, WorkerArena]]:
    parent = ParentArena.create(SIZE, "test", 1024)
    worker = WorkerArena(os.dup(parent.fd))  # what the worker does with its inherited fd
    parent.close_fd()
    yield parent, worker
    worker.close()
    parent.close()


# --- the ring --------------------------------------------------------------------------------


def test_the_ring_never_overlaps_stays_in_bounds_and_frees_oldest_first() -> None:
    """Random sizes against a model of what is allocated: no two live allocations overlap,
    each lies inside the ring, frees come back oldest first, and an empty ring starts over."""
    rng = random.Random(8)
    ring = Ring(1000, 1000 + 64 * 100)
    live: list[tuple[int, int, int]] = []  # tag, lo, hi
    fits = 0
    for tag in range(5000):
        if live and (rng.random() < 0.45 or len(live) > 30):
            assert ring.free_oldest() == live.pop(0)[0]
        size = rng.choice([1, 64, 65, 500, 1300, 3000])
        at = ring.alloc(size, tag)
        if at is None:
            continue
        fits += 1
        hi = at + max(ALIGN, -(-size // ALIGN) * ALIGN)
        assert ring.start <= at and hi <= ring.end and at % ALIGN == 1000 % ALIGN
        assert all(hi <= lo or at >= h for _, lo, h in live), "overlap"
        if not live:
            assert at == ring.start  # empty: back to the start (resident pages stay few)
        live.append((tag, at, hi))
        assert ring.in_use == sum(h - lo for _, lo, h in live)
    assert fits > 2500  # the space really was reused, many times over its size


def test_a_full_ring_refuses_until_the_oldest_is_freed() -> None:
    ring = Ring(0, 256)
    assert [ring.alloc(64, t) for t in range(4)] == [0, 64, 128, 192]
    assert ring.alloc(1, 9) is None
    ring.free_oldest()
    assert ring.alloc(64, 10) == 0  # wrapped into the space the oldest left
    assert ring.alloc(64, 11) is None
    assert ring.alloc(257, 12) is None and Ring(0, 256).alloc(257, 1) is None


# --- bounds ----------------------------------------------------------------------------------

OUTSIDE = [
    ("header", 0, 16),
    ("negative offset", -64, 16),
    ("negative length", HEADER, -1),
    ("past the end", SIZE, 1),
    ("straddles the end", SIZE - 8, 16),
    ("huge length", HEADER, 2**63),
]


@pytest.mark.parametrize(
    ("offset", "length"), [c[1:] for c in OUTSIDE], ids=[c[0] for c in OUTSIDE]
)
def test_a_reference_outside_the_data_area_is_refused_on_both_sides(
    pair: tuple[ParentArena, WorkerArena], offset: int, length: int
) -> None:
    parent, worker = pair
    with pytest.raises(ArenaError, match="outside the arena"):
        parent.read(offset, length, bytes)
    with pytest.raises(ArenaError, match="outside the arena"):
        worker.view(offset, length)
    assert parent.read(SIZE - 16, 16, bytes) == bytes(16)  # the last bytes are fine


def test_the_memfd_is_sealed_and_the_worker_keeps_no_descriptor() -> None:
    parent = ParentArena.create(SIZE, "sealed", 1024)
    try:
        with pytest.raises(PermissionError) as info:
            os.ftruncate(parent.fd, HEADER)  # would make the parent's mapping SIGBUS
        assert info.value.errno == errno.EPERM
        fd = os.dup(parent.fd)
        WorkerArena(fd).close()
        with pytest.raises(OSError):
            os.fstat(fd)  # closed once mapped
    finally:
        parent.close()


# --- placing results and reclaiming them -----------------------------------------------------


def test_a_result_is_copied_once_and_its_space_comes_back_only_when_the_parent_read_it(
    pair: tuple[ParentArena, WorkerArena],
) -> None:
    parent, worker = pair
    lo, hi = worker.replies
    chunk = (hi - lo) // 4
    offsets = [worker.place(memoryview(bytes([i]) * chunk)) for i in range(4)]
    assert offsets == [lo, lo + chunk, lo + 2 * chunk, lo + 3 * chunk]
    assert worker.place(memoryview(b"x" * chunk)) is None  # full: the caller sends a frame
    assert parent.read(lo, chunk, bytes) == b"\x00" * chunk  # the parent consumed the first
    assert worker.place(memoryview(b"\x09" * chunk)) == lo  # ... so its space is reused
    assert worker.place(memoryview(b"x" * chunk)) is None


def test_a_view_already_in_the_arena_is_returned_without_a_copy(
    pair: tuple[ParentArena, WorkerArena],
) -> None:
    parent, worker = pair
    start = parent.requests[0]
    parent.write(start, memoryview(b"abc" * 1000))
    view = worker.view(start, 3000)
    assert worker.place(view[3:]) == start + 3  # where it lies: no copy, no reply space
    assert worker.place(view.toreadonly()) == worker.replies[0]  # cannot tell: copied
    assert parent.read(start + 3, 2997, bytes) == (b"abc" * 1000)[3:]


# --- the worker's side of a call, in process ------------------------------------------------


class Bytes(WorkerService):
    @expose
    def size(self, data: bytes) -> int:
        return len(data)

    @expose
    def view(self, data: Buffer) -> Buffer:
        return data


def _handlers() -> dict[str, _Handler]:
    service = Bytes()
    return {n: _Handler(s, getattr(service, n)) for n, s in describe(Bytes).items()}


def _serve(call: m.Call, worker: WorkerArena) -> m.ToParent:
    return m.parent_decoder.decode(serve_call(_handlers(), call, worker))


def _call(method: str, refs: tuple[m.Ref, ...], args: object = (None,)) -> m.Call:
    raw = msgspec.Raw(m.encoder.encode(args))
    return m.Call(1, method, raw, msgspec.Raw(m.EMPTY_MAP), refs)


def test_the_worker_reads_buffers_the_parent_placed(pair: tuple[ParentArena, WorkerArena]) -> None:
    parent, worker = pair
    request = Request(1, "view", (b"z" * 5000,), {}, 1024, 65536)
    frame = request.place(parent, parent.requests[0], 1, "view")
    reply = _serve(m.worker_decoder.decode(frame), worker)
    assert isinstance(reply, m.Result) and reply.buffer is not None
    assert reply.buffer.offset == parent.requests[0]  # the argument itself, not a copy
    assert parent.read(reply.buffer.offset, reply.buffer.length, bytes) == b"z" * 5000


@pytest.mark.parametrize(
    ("refs", "args", "why"),
    [
        ((m.Ref(SIZE, 10, 0),), (None,), "outside the arena"),
        ((m.Ref(0, 10, 0),), (None,), "outside the arena"),
        ((m.Ref(HEADER, 10, 3),), (None,), "not a placeholder"),
        ((m.Ref(HEADER, 10, 0),), (b"not a placeholder",), "not a placeholder"),
        ((m.Ref(HEADER, 10, "nope"),), (None,), "not a placeholder"),
    ],
    ids=["past-end", "header", "no-such-position", "filled-slot", "no-such-keyword"],
)
def test_a_bad_reference_from_the_parent_is_invalid_args_not_a_read(
    pair: tuple[ParentArena, WorkerArena], refs: tuple[m.Ref, ...], args: object, why: str
) -> None:
    _, worker = pair
    reply = _serve(_call("size", refs, args), worker)
    assert isinstance(reply, m.Failure) and reply.kind is m.FailureKind.INVALID_ARGS
    assert why in reply.message


def test_small_results_and_results_without_room_stay_in_the_message(
    pair: tuple[ParentArena, WorkerArena],
) -> None:
    _, worker = pair
    small = m.parent_decoder.decode(encode_result(1, b"s" * 1023, worker))
    assert isinstance(small, m.Result) and small.buffer is None
    assert msgspec.msgpack.decode(small.value) == b"s" * 1023
    huge = m.parent_decoder.decode(encode_result(2, b"h" * SIZE, worker))
    assert isinstance(huge, m.Result) and huge.buffer is None  # bigger than the reply half
    assert len(msgspec.msgpack.decode(huge.value)) == SIZE
