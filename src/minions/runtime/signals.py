"""Gru's signal handling: handlers only queue, a task does the work.

``loop.add_signal_handler`` callbacks record the signal and wake one task, which hands each
signal to Gru's ``handle_term``. No logging or I/O happens in signal context.

A signal-driven shutdown must also end the process. An app that awaits ``gru.wait_closed()``
(``minions run``, the README's ``main``) exits on its own once Gru has closed; one whose ``main``
does anything else would outlive Gru until systemd's ``TimeoutStopSec`` SIGKILL. For that one,
:func:`end_process_unless_awaited` raises ``SystemExit`` on the loop: ``asyncio.run`` then
cancels the remaining tasks as it does for Ctrl-C (their ``finally`` blocks run) and the process
exits 0, which systemd records as a clean stop (1 if the shutdown reported errors, as
``minions run`` does).
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Callable
from typing import Any

from minions.runtime.results import ShutdownResult

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


def end_process_unless_awaited(result: ShutdownResult, awaited: bool, logger: Any) -> None:
    """After a signal's shutdown: if no task awaits Gru's closing, end the process (module note).

    ``SystemExit`` is raised from a plain loop callback rather than the calling task: it leaves
    the loop either way, but a task would also keep it as an exception nobody retrieves.
    """
    if awaited:
        return
    code = 0 if result.success else 1
    logger.info("nothing awaits gru.wait_closed(): ending the process (exit %d)", code)
    asyncio.get_running_loop().call_soon(_exit, code)


def _exit(code: int) -> None:
    raise SystemExit(code)
