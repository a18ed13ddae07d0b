"""Worker services used only by tests, for failures the demo extension does not model."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import msgspec

from minions.workers import WorkerService, expose


class BrokenSetup(WorkerService):
    """A service whose native library cannot be opened."""

    def setup(self) -> None:
        raise RuntimeError("cannot open the device")

    @expose
    def ping(self, x: int) -> int:
        return x


class SlowBoot(WorkerService):
    """A service whose device never answers during setup()."""

    def setup(self) -> None:
        import time

        time.sleep(3600)


class Liar(WorkerService):
    """A handler that returns something other than what it declares."""

    @expose
    def answer(self) -> int:
        return "forty-two"  # type: ignore[return-value]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ itself fails")


class Hostile(WorkerService):
    """Handlers that return or raise what a worker must survive (found by fuzzing)."""

    @expose
    def unprintable(self) -> None:
        raise Unprintable()

    @expose
    def deep(self, depth: int) -> Any:
        value: list[Any] = []
        for _ in range(depth):
            value = [value]
        return value

    @expose
    def deep_raw(self, depth: int) -> Any:
        """Pre-encoded msgpack nested ``depth`` deep: the bytes reach the parent as they are."""
        return msgspec.Raw(b"\x91" * depth + b"\x90")

    @expose
    def ping(self, x: int) -> int:
        return x


class Pipelined(WorkerService):
    """A cheap native call that segfaults on request: once its cost is measured, calls to it
    are pipelined, so calls really are queued on a worker behind one that crashes."""

    _n: ModuleType

    def setup(self) -> None:
        from native_demo import _native  # type: ignore[attr-defined]

        self._n = _native

    @expose
    def step(self, i: int, crash: bool = False) -> int:
        if crash:
            self._n.segfault()
        return self._n.ping(i)


def _in_worker() -> bool:
    """True in a worker process, or in the zygote that forks workers (it imports this module
    once for all of them)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("minions.ipc.worker", "minions.ipc.zygote")


class Drifted(WorkerService):
    """Its workers expose a method the parent's copy does not: a worker from another deploy."""

    @expose
    def ping(self, x: int) -> int:
        return x

    if _in_worker():

        @expose
        def added_by_a_later_deploy(self) -> None:
            return None


class Stubborn(WorkerService):
    """A call that ignores SIGTERM (as some native libraries do): only SIGKILL ends it."""

    @expose
    def hold(self, seconds: float) -> None:
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(seconds)

    @expose
    def ping(self, x: int) -> int:
        return x


class Probe(WorkerService):
    """Reports what a worker process holds, from inside it: descriptors and imported modules."""

    @expose
    def fds(self) -> dict[int, str]:
        """Every open descriptor and what it points at (``pipe:[inode]``, a path, ...)."""
        out = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the listing's own descriptor, closed already
                continue
        return out

    @expose
    def imported(self, names: list[str]) -> list[str]:
        """Which of ``names`` this worker has imported."""
        return sorted(n for n in names if n in sys.modules)
