"""A worker service for the call-API tests: every call leaves a line in a journal file, so a
test can see in the file whether a call ran, and how many times, whatever its caller saw."""

from __future__ import annotations

import os
import time
from types import ModuleType

import msgspec

from minions.workers import WorkerService, expose


class Entry(msgspec.Struct, frozen=True):
    """One map item: several arguments travel as one Struct."""

    path: str
    tag: str
    gate: str = ""  # if set, wait until this file exists first


def _journal(path: str, tag: str) -> None:
    with open(path, "a") as f:
        f.write(f"{tag}\n")


class Journal(WorkerService):
    _n: ModuleType

    def setup(self) -> None:
        from native_demo import _native  # type: ignore[attr-defined]

        self._n = _native

    @expose
    def record(self, path: str, tag: str) -> int:
        """Write ``tag`` to the journal; return this worker's pid."""
        _journal(path, tag)
        return os.getpid()

    @expose
    def hold(self, gate: str, path: str, tag: str) -> int:
        """Wait until the file ``gate`` exists (the test opens it), then record ``tag``."""
        while not os.path.exists(gate):
            time.sleep(0.002)
        return self.record(path, tag)

    @expose
    def record_then_crash(self, path: str, tag: str) -> None:
        """Record ``tag``, then die of a real SIGSEGV in native code."""
        _journal(path, tag)
        self._n.segfault()

    @expose(idempotent=False)
    def charge_then_crash(self, path: str, tag: str) -> None:
        """Like ``record_then_crash``, declared not idempotent: it must never run twice."""
        _journal(path, tag)
        self._n.segfault()

    @expose
    def step(self, path: str, tag: str, crash: bool = False) -> str:
        """A cheap call (so it is pipelined once measured) that may segfault after recording."""
        _journal(path, tag)
        if crash:
            self._n.segfault()
        return tag

    @expose
    def entry(self, e: Entry) -> str:
        """Record one map item (after its gate opens, if it has one); return its tag."""
        if e.gate:
            self.hold(e.gate, e.path, e.tag)
        else:
            _journal(e.path, e.tag)
        return e.tag

    @expose
    def positive(self, x: int) -> int:
        """``x``, or ``ValueError`` if it is negative: a failing item in a map."""
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x


def lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []
