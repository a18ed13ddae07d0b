"""Gru's signal handling: handlers only queue, a task does the work.

``loop.add_signal_handler`` callbacks record the signal and wake one task, which hands each
signal to Gru's ``handle_term``. No logging or I/O happens in signal context.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalQueue:
    """Installs SIGTERM/SIGINT handlers on the running loop and feeds them to ``handle``."""

    def __init__(self, handle: Callable[[int], None]) -> None:
        self._handle = handle
        self._pending: collections.deque[int] = collections.deque()
        self._wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Raise ``RuntimeError``/``ValueError`` when not on the main thread's loop."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        self.task = asyncio.create_task(self._deliver(), name="minions-gru-signals")

    def remove(self) -> None:
        if self.task is None:
            return
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        """Signal context: only queue and wake."""
        self._pending.append(signum)
        self._wakeup.set()

    async def _deliver(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                self._handle(self._pending.popleft())
