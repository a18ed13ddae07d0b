"""Worker services for the payload tests: big arguments and results, and what can go wrong with
them inside a real worker (a crash in the middle of writing a result, a forged reference)."""

from __future__ import annotations

import ctypes
import mmap
import os
from types import ModuleType
from typing import Any

from minions.ipc import arena as arena_module
from minions.workers import Buffer, WorkerService, expose


class Payloads(WorkerService):
    """Bytes in, bytes out, through the real native extension where it matters."""

    _n: ModuleType
    _kept: Any = None

    def setup(self) -> None:
        from native_demo import _native  # type: ignore[attr-defined]

        self._n = _native

    @expose
    def length(self, data: bytes) -> int:
        return len(data)

    @expose
    def crc(self, data: Buffer) -> int:
        """CRC-32 computed by C straight from the arena (touches every page, copies none)."""
        return self._n.crc32(data)

    @expose
    def echo(self, data: bytes) -> bytes:
        return data

    @expose
    def echo_view(self, data: Buffer) -> Buffer:
        return data

    @expose
    def invert(self, data: Buffer) -> Buffer:
        """Rewrite the argument in place and return it: no copy in the worker at all."""
        for i in range(0, len(data), 4096):  # one byte per page is enough to prove in place
            data[i] = 255 - data[i]
        return data

    @expose
    def fill(self, n: int, byte: int) -> bytes:
        return bytes([byte]) * n

    @expose
    def typed(self, data: bytearray, view: memoryview, anything: Any) -> list[str]:
        return [type(data).__name__, type(view).__name__, type(anything).__name__]

    @expose
    def join(self, head: bytes, tail: Buffer, sep: bytes = b"|") -> bytes:
        return head + sep + bytes(tail)

    @expose
    def fail(self, data: bytes) -> None:
        raise ValueError(f"refused {len(data)} bytes")

    @expose
    def spin(self, data: Buffer) -> None:
        self._n.spin()

    @expose
    def segfault(self, data: Buffer) -> None:
        self._n.segfault()

    @expose
    def crash_once(self, data: Buffer, flag: str) -> int:
        """Segfault on the first worker that runs it (``flag`` does not exist yet); on the next
        one, the CRC-32 of ``data``: a retried call must bring its buffer along."""
        if not os.path.exists(flag):
            open(flag, "w").close()
            self._n.segfault()
        return self._n.crc32(data)

    @expose
    def keep(self, data: Buffer) -> None:
        self._kept = data  # a broken promise: the view is only valid during the call

    @expose
    def read_kept(self) -> int:
        return self._kept[0]

    @expose
    def crash_while_writing(self, n: int) -> Buffer:
        """Return ``2n`` bytes whose second half is unmapped: copying them into the arena
        segfaults half way, in the middle of writing the result."""
        size = 2 * n
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
        )
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        address = libc.mmap(None, size, prot, flags, -1, 0)
        ctypes.memset(address, 7, n)
        libc.munmap(ctypes.c_void_p(address + n), ctypes.c_size_t(n))
        return memoryview((ctypes.c_char * size).from_address(address)).cast("B")  # type: ignore[return-value]

    @expose
    def forge(self, n: int, where: str) -> bytes:
        """Return ``n`` bytes, but make the worker's own arena path report them at a place the
        parent must refuse (``where``: past-end, straddles-end, header, negative). Only this
        result is forged; the next is placed honestly."""
        honest = arena_module.WorkerArena.place

        def forged(arena: arena_module.WorkerArena, data: memoryview) -> int:
            arena_module.WorkerArena.place = honest  # type: ignore[method-assign]
            honest(arena, data)
            return {
                "past-end": arena.size,
                "straddles-end": arena.size - n // 2,
                "header": 0,
                "negative": -64,
            }[where]

        arena_module.WorkerArena.place = forged  # type: ignore[method-assign]
        return b"\x01" * n

    @expose
    def pid(self) -> int:
        return os.getpid()
