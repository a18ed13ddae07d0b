"""One verdict per worker death.

When a worker process ends, :func:`classify` turns what we know (its return code, whether we
asked it to stop or killed it for a reason, whether it ever said hello, what faulthandler wrote)
into one :class:`Verdict`. That single value feeds the log line, the metric label, the error
raised to the caller and the restart decision; nobody re-derives the reason elsewhere.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from minions.errors import signal_name


class DeathCause(enum.Enum):
    """Why a worker ended. ``planned`` causes are the pool's own doing and are not crashes."""

    SIGNAL = "signal"  # killed by a signal nobody in the pool sent (segfault, abort, OOM killer)
    EXIT = "exit"  # exited by itself (os._exit, SystemExit), unasked
    TIMEOUT = "timeout"  # the pool killed it: a call overran its deadline
    BOOT_FAILED = "boot_failed"  # died or hung before its hello
    LOST = "lost"  # its socket went away while it still looked alive; the pool killed it
    RECYCLED = "recycled"  # the pool retired it (max calls, RSS, memory pressure)
    STOPPED = "stopped"  # pool shutdown
    CANCELLED = "cancelled"  # the pool killed it: the caller of a cancel="kill" call gave up
    HOST_LOST = "host_lost"  # a remote worker whose host went away (stopped, killed, partitioned)

    @property
    def blames_head(self) -> bool:
        """No call marker says what ran: the oldest call it owed is taken to be the one."""
        return self in (DeathCause.TIMEOUT, DeathCause.HOST_LOST)

    @property
    def planned(self) -> bool:
        """The pool's own doing: not a crash, so no crash metric, no backoff and no count
        toward restart intensity (a caller cancelling calls must not open the circuit)."""
        return self in (DeathCause.RECYCLED, DeathCause.STOPPED, DeathCause.CANCELLED)


@dataclass(frozen=True, slots=True)
class Verdict:
    cause: DeathCause
    returncode: int
    stack: str = ""

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def exit_code(self) -> int | None:
        return self.returncode if self.returncode >= 0 else None

    @property
    def label(self) -> str:
        """Bounded metric label: a signal name, or the cause."""
        if self.cause is DeathCause.SIGNAL:
            return signal_name(self.signal) or "signal"
        return self.cause.value

    @property
    def explanation(self) -> str:
        """Why, in words, without the signal or code (see :meth:`describe`)."""
        if self.cause is DeathCause.SIGNAL:
            reasons: dict[int, str] = {
                signal.SIGKILL: "killed by someone else: perhaps the kernel OOM killer",
                signal.SIGSEGV: "segmentation fault in native code",
                signal.SIGABRT: "native code called abort()",
                signal.SIGBUS: "bus error in native code",
                signal.SIGFPE: "arithmetic fault in native code",
            }
            return reasons.get(self.signal or 0, "killed by a signal")
        return {
            DeathCause.EXIT: "the process exited on its own",
            DeathCause.TIMEOUT: "killed by the pool: call deadline exceeded",
            DeathCause.BOOT_FAILED: "failed to boot: service import or setup() failed",
            DeathCause.LOST: "killed by the pool: its connection was lost",
            DeathCause.RECYCLED: "recycled by the pool",
            DeathCause.STOPPED: "stopped by the pool",
            DeathCause.CANCELLED: "killed by the pool: its caller cancelled a cancel='kill' call",
            DeathCause.HOST_LOST: "its worker host went away (stopped, killed, or cut off by the "
            "network); the call may have run",
        }[self.cause]

    def describe(self) -> str:
        """Human phrase for log lines: ``SIGSEGV (segmentation fault in native code)``."""
        if self.cause is DeathCause.HOST_LOST:
            return f"host_lost ({self.explanation})"
        how = signal_name(self.signal) if self.signal is not None else f"exit code {self.exit_code}"
        return f"{how} ({self.explanation})"


def classify(
    returncode: int, *, killed_for: DeathCause | None, said_hello: bool, stack: str
) -> Verdict:
    """Decide why a worker ended. ``killed_for`` is set when the pool itself ended it."""
    if killed_for is not None:
        cause = killed_for
    elif not said_hello:
        cause = DeathCause.BOOT_FAILED
    elif returncode < 0:
        cause = DeathCause.SIGNAL
    else:
        cause = DeathCause.EXIT  # it ended on its own, even with code 0: not the pool's plan
    return Verdict(cause, returncode, stack)
