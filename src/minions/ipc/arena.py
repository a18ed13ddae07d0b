"""The per-worker shared-memory arena that big arguments and results travel through.

Design note. Each worker gets one ``memfd`` (an anonymous file that exists only while a process
holds it: it cannot be left behind in ``/dev/shm`` by a SIGKILL), created by the parent when it
spawns the worker, sealed against resizing, and mapped once by both sides. A message then carries
only ``Ref(offset, length)``; the bytes are copied once into the arena by the sender and once out
of it (or viewed in place) by the receiver.

Layout: one header page, then two halves. The *request* half is written by the parent alone (a
call's buffer arguments) and the *reply* half by the worker alone (buffer results), so neither
side ever allocates in space the other allocates in. Both halves are :class:`Ring` allocators:
workers answer calls strictly in order, so space is always freed oldest first. A ring that empties
starts again at its beginning, so the pages in use (resident memory) follow the high-water mark of
payloads in flight, not the arena's size.

Who frees what, and when:

- request space is freed by the parent's Dispatcher when the call's answer arrives; a worker that
  dies takes its whole arena with it (the parent drops its mapping once the death is settled), and
  calls that go back to the queue copy their buffers again into the next worker's arena;
- reply space is freed by the worker once the parent says it has read the result: the parent
  counts the buffer results it has consumed in the header (``consumed``), the worker reads that
  count before it allocates. The count is a plain aligned 8-byte store, which both x86-64 and
  AArch64 perform atomically. Stores reach the other side in order on x86-64 (TSO); on weaker
  CPUs the window is the time between the parent's copy and its counter store, while the worker
  would have to finish a whole other call to reuse that space.

Safety: every reference that arrives is checked against the arena's bounds before anything is
read (:class:`ArenaError`, a protocol error: never an out-of-bounds read); the parent reads a
result only after the worker's message says it is complete, so a worker that dies mid-write
leaves nothing the parent reads; the memfd is sealed against shrinking, so a worker cannot make
the parent's mapping fault (SIGBUS) by truncating it.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import mmap
import os
import struct

from minions.errors import ProtocolError

PAGE = mmap.PAGESIZE
HEADER = PAGE  # the header page: the consumed count, the rest reserved
ALIGN = 64  # each buffer starts on a cache line (and is aligned for any NumPy dtype)
MIN_ARENA = HEADER + 2 * PAGE
_CONSUMED = struct.Struct("<Q")  # at offset 0: buffer results the parent has read
_MIN_BYTES = struct.Struct("<Q")  # at offset 8: the smallest buffer worth the arena
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ArenaError(ProtocolError):
    """A reference does not lie inside the arena's data area: the peer broke the protocol."""


def arena_size(megabytes: float) -> int:
    """Bytes of an arena of ``megabytes`` MiB, whole pages, or 0 when the arena is off."""
    if megabytes <= 0:
        return 0
    size = -(-int(megabytes * 2**20) // PAGE) * PAGE
    return max(size, MIN_ARENA)


def halves(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The request and the reply half of an arena of ``size`` bytes, as (start, end)."""
    half = (size - HEADER) // 2 // PAGE * PAGE
    return (HEADER, HEADER + half), (HEADER + half, size)


class Ring:
    """A first-in first-out allocator over ``[start, end)``: allocate at the newest end, free
    the oldest. Each allocation carries a ``tag`` (a call id, a result sequence number) so the
    owner can tell which one is oldest. Pure bookkeeping, no memory access."""

    __slots__ = ("_used", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self._used: collections.deque[tuple[int, int, int]] = collections.deque()  # tag, lo, hi

    @property
    def capacity(self) -> int:
        return self.end - self.start

    @property
    def empty(self) -> bool:
        return not self._used

    @property
    def in_use(self) -> int:
        """Bytes allocated and not yet freed."""
        return sum(hi - lo for _, lo, hi in self._used)

    def oldest_tag(self) -> int | None:
        return self._used[0][0] if self._used else None

    def alloc(self, size: int, tag: int) -> int | None:
        """Offset of ``size`` free bytes, or ``None`` if they do not fit right now."""
        size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        used = self._used
        if not used:
            at = self.start if size <= self.capacity else None
        else:
            oldest, newest = used[0][1], used[-1][2]
            if used[-1][1] >= oldest:  # not wrapped: free space at the end, then at the start
                if newest + size <= self.end:
                    at = newest
                elif self.start + size <= oldest:
                    at = self.start
                else:
                    at = None
            else:  # wrapped: the only free space is between the newest and the oldest
                at = newest if newest + size <= oldest else None
        if at is not None:
            used.append((tag, at, at + size))
        return at

    def free_oldest(self) -> int:
        """Free the oldest allocation; returns its tag."""
        return self._used.popleft()[0]

    def clear(self) -> None:
        self._used.clear()


class _Mapping:
    """One side's mapping of an arena; bounds-checked access to its data area."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.requests, self.replies = halves(size)

    def check(self, offset: int, length: int) -> None:
        """Raise :class:`ArenaError` unless ``[offset, offset+length)`` lies in the data area."""
        if not (length >= 0 and offset >= HEADER and offset + length <= self.size):
            raise ArenaError(
                f"reference ({offset}, {length}) lies outside the arena's data area "
                f"[{HEADER}, {self.size})"
            )

    def resident_bytes(self) -> int:
        """Bytes of the arena held in memory (touched by either side): what it adds to the
        host's and the cgroup's memory use, and to the RSS of each process that touched it."""
        pages = self.size // PAGE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(self.map)  # an export of the map, released below
        try:
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), self.size, vec)
        finally:
            del anchor
        return sum(b & 1 for b in vec) * PAGE if rc == 0 else 0


_libc = ctypes.CDLL(None, use_errno=True)


class ParentArena(_Mapping):
    """The parent's side of one worker's arena. Created by the Supervisor at spawn, dropped when
    the worker was reaped and its death settled; the Dispatcher allocates request space in it."""

    def __init__(self, fd: int, size: int, min_bytes: int) -> None:
        super().__init__(fd, size)
        self.fd = fd  # open until the worker has inherited it: see close_fd()
        self.consumed = 0
        _MIN_BYTES.pack_into(self.map, _CONSUMED.size, min_bytes)

    @classmethod
    def create(cls, size: int, name: str, min_bytes: int) -> ParentArena:
        """A fresh sealed memfd of ``size`` bytes (close-on-exec: only the worker it is passed
        to inherits it), mapped here. ``min_bytes`` tells the worker which results to put in
        it."""
        fd = os.memfd_create(f"minions-arena:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, size, min_bytes)
        except BaseException:
            os.close(fd)
            raise

    def close_fd(self) -> None:
        """Close the creating descriptor once the worker holds its own. The mapping keeps a
        private close-on-exec duplicate (CPython's ``mmap`` does) until :meth:`close`, so no
        other child can inherit the arena, and nothing of it outlives both processes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, offset: int, data: memoryview) -> None:
        """Copy ``data`` (bytes, format ``B``) into request space: the one copy on this side."""
        self.map[offset : offset + data.nbytes] = data

    def read(
        self, offset: int, length: int, kind: type[bytes] | type[bytearray]
    ) -> bytes | bytearray:
        """A private copy of a result the worker wrote: bounds-checked, the one copy on this
        side. Counts the result as consumed, so the worker may reuse its space."""
        self.discard()
        self.check(offset, length)
        if kind is bytes:
            return self.map[offset : offset + length]
        with memoryview(self.map) as view:
            return bytearray(view[offset : offset + length])

    def discard(self) -> None:
        """Count a result as consumed without reading it (nobody waits for it any more)."""
        self.consumed += 1
        _CONSUMED.pack_into(self.map, 0, self.consumed)

    def close(self) -> None:
        self.close_fd()
        if not self.map.closed:
            self.map.close()


class WorkerArena(_Mapping):
    """The worker's side: views of request space for handlers, reply space for results."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, os.fstat(fd).st_size)
        os.close(fd)  # the mapping keeps the memfd alive (and its own close-on-exec duplicate)
        (self.min_bytes,) = _MIN_BYTES.unpack_from(self.map, _CONSUMED.size)
        self._view = memoryview(self.map)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._ring = Ring(*self.replies)
        self._sent = 0  # buffer results sent; the parent's consumed count catches up

    def close(self) -> None:
        """Unmap (a worker never needs to: its arena ends with it; tests that map both sides in
        one process do). Raises ``BufferError`` while a view of it is still held."""
        self._view.release()
        self.map.close()

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``[offset, offset+length)``, bounds-checked."""
        self.check(offset, length)
        return self._view[offset : offset + length]

    def place(self, data: memoryview) -> int | None:
        """Put a result (bytes, format ``B``) in the arena; its offset, or ``None`` if it does
        not fit now (the caller falls back to a frame). A view that already lies in the arena,
        such as a handler's own argument returned as it is, is not copied at all."""
        offset = self._offset_of(data)
        self._sent += 1
        if offset is None:
            self._reclaim()
            offset = self._ring.alloc(data.nbytes, self._sent)
            if offset is None:
                self._sent -= 1
                return None
            self._view[offset : offset + data.nbytes] = data
        return offset

    def _reclaim(self) -> None:
        (consumed,) = _CONSUMED.unpack_from(self.map, 0)
        ring = self._ring
        while (tag := ring.oldest_tag()) is not None and tag <= consumed:
            ring.free_oldest()

    def _offset_of(self, data: memoryview) -> int | None:
        if data.readonly or not data.contiguous:
            return None
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        except (TypeError, ValueError):
            return None
        offset = address - self._base
        if offset >= HEADER and offset + data.nbytes <= self.size:
            return offset
        return None
