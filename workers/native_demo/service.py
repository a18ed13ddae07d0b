"""``NativeDemo``: the worker service wrapping ``native_demo._native``.

This module is imported in two places: by the parent, only to read handler annotations (so it must
not import the extension), and by each worker process, where :meth:`NativeDemo.setup` loads the
extension. The pure-Python helpers exist so tests can provoke every entry of the failure contract
(handler error, clean exit, slow call, unencodable result) without native code.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

from minions.ipc.service import WorkerService, expose


class NativeDemo(WorkerService):
    """Real native work (crc32, count_primes) plus deliberate native faults, one call at a time."""

    _n: ModuleType

    def setup(self) -> None:
        """Load the extension; runs once, inside the worker process only."""
        from native_demo import _native  # type: ignore[attr-defined]  # a C extension

        self._n = _native

    # --- real native work -------------------------------------------------------------------

    @expose
    def crc32(self, data: bytes) -> int:
        """CRC-32 of ``data`` (same value as ``zlib.crc32``)."""
        return self._n.crc32(data)

    @expose
    def count_primes(self, n: int) -> int:
        """Number of primes below ``n``; CPU-bound, releases the GIL."""
        return self._n.count_primes(n)

    @expose
    def ping(self, x: int) -> int:
        """Return ``x`` through the extension: the cheapest possible round trip."""
        return self._n.ping(x)

    # --- native faults ----------------------------------------------------------------------

    @expose
    def segfault(self) -> None:
        """Die of SIGSEGV (NULL write in C)."""
        self._n.segfault()

    @expose
    def abort(self) -> None:
        """Die of SIGABRT (C ``abort()``)."""
        self._n.abort()

    @expose
    def leak(self, mib: int) -> int:
        """Leak ``mib`` MiB of touched memory; return the MiB leaked so far by this worker."""
        return self._n.leak(mib)

    @expose
    def spin(self) -> None:
        """Loop forever holding the GIL; only the parent's SIGKILL ends this worker."""
        self._n.spin()

    # --- pure-Python helpers for tests ------------------------------------------------------

    @expose
    def fail(self, message: str) -> None:
        """Raise ``ValueError(message)``: a handler error the worker survives."""
        raise ValueError(message)

    @expose
    def exit(self, code: int) -> None:
        """Exit immediately with ``code``, skipping all cleanup (like a native ``exit()``)."""
        os._exit(code)

    @expose
    def sleep(self, seconds: float) -> None:
        """Block the worker for ``seconds`` (a slow but interruptible call)."""
        time.sleep(seconds)

    @expose
    def unencodable(self) -> int:
        """Return an object msgspec cannot encode, so the worker's result encoding fails."""
        result: Any = object()
        return result

    @expose
    def rss_mb(self) -> float:
        """Resident set size of this worker process, in MiB."""
        import psutil  # here, not at the top: every worker would import it at boot

        return psutil.Process().memory_info().rss / (1024 * 1024)

    @expose
    def pid(self) -> int:
        """Process id of this worker."""
        return os.getpid()
