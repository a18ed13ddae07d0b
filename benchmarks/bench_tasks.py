"""Module-level task functions for the executor contenders (they must be importable by pickle).

Each task goes through the same C call as ``NativeDemo`` so every contender does identical work;
the extension is imported inside the task, i.e. only in the executor's child process.
"""

from __future__ import annotations


def ping(x: int) -> int:
    """Return ``x`` via ``native_demo._native.ping``."""
    from native_demo import _native

    return _native.ping(x)


def segfault() -> None:
    """Kill the executing child process with SIGSEGV."""
    from native_demo import _native

    _native.segfault()
