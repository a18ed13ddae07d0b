"""Which call a worker was running when it died, told through shared memory.

Why not trust the order of replies? A worker sends a result, ZeroMQ's I/O thread flushes it
later; if the next call segfaults first, that earlier result never leaves the process and the
parent would blame the wrong call. So before running a call the worker writes ``+call_id`` into
a small ``MAP_SHARED`` file, and ``-call_id`` once the handler returned. Stores into a shared
mapping are visible to the parent the instant they happen and survive any death of the writer.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_FORMAT = struct.Struct("<q")


def marker_path(crash_file: str | Path) -> Path:
    return Path(crash_file).with_suffix(".call")


class CallMarker:
    """Worker side: a one-slot shared record of the call being run."""

    def __init__(self, path: str | Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _FORMAT.size)
            self._map = mmap.mmap(fd, _FORMAT.size, mmap.MAP_SHARED, mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def running(self, call_id: int) -> None:
        _FORMAT.pack_into(self._map, 0, call_id)

    def finished(self, call_id: int) -> None:
        _FORMAT.pack_into(self._map, 0, -call_id)


def read_running_call(path: str | Path) -> int | None:
    """Parent side, after death: the id of the call that was running, if one was."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < _FORMAT.size:
        return None
    (value,) = _FORMAT.unpack_from(data)
    return value if value > 0 else None
