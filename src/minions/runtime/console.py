"""Failures a user can see: the first of each kind goes to the console, the rest are counted.

Design note. Gru logs every failure (a workflow whose step raised, a pipeline whose
``produce_event`` raised, a start that was refused, a store that cannot write), but a log file is
invisible to someone running their first app: a typo that fails every workflow looks like a hang.
So :class:`Failures` also prints the **first** failure of each kind to stderr, with its
traceback, and afterwards one line per ``interval_s`` counting the repeats (never one line per
failure: ten thousand failing workflows must not flood a terminal or a journal). A kind is where
it happened plus the exception type and the user's file and line, so two different bugs are two
first reports.

When the logger already writes to the console (``minions run`` sends it to stderr, the journal
under systemd), nothing is repeated here. :func:`abandoned_message` covers the other silent
case: a ``main()`` that returns right after ``start_orchestration`` ends the event loop and the
process with Gru still running; at exit it says so and how to wait.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from minions.runtime.log import ERROR, Logger

_MAX_KINDS = 200


@dataclass(slots=True)
class _Seen:
    message: str
    repeats: int
    since: float


class Failures:
    """Log a failure and, the first time its kind is seen, print it to the console."""

    def __init__(
        self,
        logger: Logger,
        *,
        log_hint: str = "the log",
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        stream: Callable[[], TextIO] = lambda: sys.stderr,
    ) -> None:
        self.logger = logger
        self._hint = log_hint
        self._interval = interval_s
        self._clock = clock
        self._stream = stream
        self._seen: dict[tuple[str, ...], _Seen] = {}

    def __call__(
        self,
        kind: tuple[str, ...],
        message: str,
        exc: BaseException | None = None,
        *,
        level: int = ERROR,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.logger.emit(level, message, exc, extra)
        if self.logger.reaches_console:
            return
        seen = self._seen.get(kind)
        now = self._clock()
        if seen is None:
            if len(self._seen) >= _MAX_KINDS:
                seen = self._seen.setdefault(("other",), _Seen("other failures", 0, now))
            else:
                self._seen[kind] = _Seen(message, 0, now)
                self._print_first(message, exc)
                return
        seen.repeats += 1
        if now - seen.since >= self._interval:
            self._print_repeats(seen, now)

    def flush(self) -> None:
        """At shutdown: say how many repeats were not printed."""
        now = self._clock()
        for seen in self._seen.values():
            if seen.repeats:
                self._print_repeats(seen, now)

    def _print_first(self, message: str, exc: BaseException | None) -> None:
        lines = [f"minions: {message}"]
        if exc is not None:
            lines += [
                "    " + line for line in "".join(traceback.format_exception(exc)).splitlines()
            ]
        lines.append(
            f"minions: (shown once; repeats of this failure are counted here every "
            f"{self._interval:g}s and each one is in {self._hint})"
        )
        self._write("\n".join(lines))

    def _print_repeats(self, seen: _Seen, now: float) -> None:
        first_line = seen.message.splitlines()[0] if seen.message else ""
        self._write(
            f"minions: {seen.repeats} more like this in the last {now - seen.since:.1f}s: "
            f"{first_line[:160]} (see {self._hint})"
        )
        seen.repeats = 0
        seen.since = now

    def _write(self, text: str) -> None:
        try:
            stream = self._stream()
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # a closed or broken console: the log still has it
            pass


def abandoned_message(orchestrations: int, finished: int, in_flight: int) -> str:
    return (
        f"minions: the program is exiting while Gru still runs {orchestrations} "
        f"orchestration(s) ({finished} workflows finished, {in_flight} in flight): the event "
        "loop ended because main() returned. Add `await gru.wait_closed()` after "
        "start_orchestration() to keep serving until SIGTERM/SIGINT (Gru then shuts down "
        "gracefully). Saved checkpoints resume at the next start."
    )
