"""What the worker-host tests serve: real native faults, and calls that say where they ran."""

from __future__ import annotations

import os
import time
import zlib
from types import ModuleType

from minions.workers import WorkerService, expose


class Remote(WorkerService):
    _n: ModuleType

    def setup(self) -> None:
        from native_demo import _native  # type: ignore[attr-defined]  # a C extension

        self._n = _native

    @expose
    def ping(self, x: int) -> int:
        return self._n.ping(x)

    @expose
    def crc32(self, data: bytes) -> int:
        return zlib.crc32(data)

    @expose
    def echo(self, data: bytes) -> bytes:
        return data

    @expose
    def pid_after(self, seconds: float) -> int:
        """Sleep, then say which process ran the call."""
        time.sleep(seconds)
        return os.getpid()

    @expose
    def segfault(self) -> None:
        self._n.segfault()
