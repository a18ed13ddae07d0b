"""Shared test plumbing: an event-loop runner and the no-orphans guarantee.

Every test has a timeout (pytest-timeout, set in pyproject.toml). After each test module, and
once at the end of the session, no child process of the test run may be left alive, and the
test process may map no worker's shared-memory arena.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 50.0) -> T:
    """Run one coroutine on a fresh event loop with an upper bound; tests stay synchronous."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(fact: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``fact()`` is truthy, checking every few milliseconds: for facts that change
    in another process (a worker's call marker) with no event in this one to await."""
    deadline = time.monotonic() + timeout
    while not fact():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {fact}")
        await asyncio.sleep(0.002)


def _live_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture(autouse=True, scope="module")
def _no_orphans_per_module() -> Iterator[None]:
    yield
    _, alive = psutil.wait_procs(_live_children(), timeout=10)
    leftovers = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    assert not leftovers, f"child processes left behind by this module: {leftovers}"
    maps = Path("/proc/self/maps").read_text().splitlines()
    arenas = {line.split(maxsplit=5)[-1] for line in maps if "memfd:minions-arena" in line}
    assert not arenas, f"worker arenas left mapped by this module: {sorted(arenas)}"
