"""systemd's notify protocol, spoken natively, and a watchdog driven by the event loop.

Design note. ``sd_notify`` is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without that variable
every function here is a cheap no-op, so Gru calls them unconditionally. A failed send is logged
once and reported as ``False``, never raised: telling systemd how we feel must not be what kills
the service.

The watchdog ping is sent by a task *on the event loop that it vouches for*. If a step blocks the
loop (a GIL-holding native call made in-process, a synchronous sleep), the task does not run, no
``WATCHDOG=1`` arrives, and systemd kills and restarts the service after ``WatchdogSec``. A thread
would keep pinging through such a hang, which is exactly what the watchdog exists to catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

from minions.ops import metrics

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _address(environ: Mapping[str, str]) -> str | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: ``@name`` becomes ``\\0name`` (abstract)."""
    raw = environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # vsock:... and relative paths are not used for services; say so once and stay quiet.
    _warn_once(raw, "NOTIFY_SOCKET=%r is not an AF_UNIX path or @name; notifications disabled", raw)
    return None


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``$NOTIFY_SOCKET`` names a socket: lets a caller skip building a ``STATUS=`` line
    (or running a task to refresh it) when nobody listens."""
    return _address(os.environ if environ is None else environ) is not None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` lines in one datagram; ``True`` if systemd's socket took it.

    Called from Gru's process only (``NotifyAccess=main`` makes systemd ignore anyone else).
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        _warn_once(f"send:{address}:{exc.errno}", "sd_notify to %r failed: %s", address, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1``: Gru has started its orchestrations; ``systemctl start`` returns now."""
    lines = ["READY=1"]
    if status is not None:
        lines.append("STATUS=" + _one_line(status))
    return notify(*lines)


def status(text: str) -> bool:
    """``STATUS=``: the one-line summary ``systemctl status`` shows. Newlines are flattened."""
    return notify("STATUS=" + _one_line(text))


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun; systemd shows the unit as deactivating."""
    lines = ["STOPPING=1"]
    if status is not None:
        lines.append("STATUS=" + _one_line(status))
    return notify(*lines)


def watchdog() -> bool:
    """``WATCHDOG=1``: one keep-alive ping. Prefer :class:`Watchdog`, which pings on schedule."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC``: ask for more time to start or stop (e.g. a long resume)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or ``None`` if no watchdog is asked for.

    ``$WATCHDOG_PID`` names the process the watchdog is meant for; a child that inherited the
    environment (a worker) must not ping on Gru's behalf, so any other pid gets ``None``.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        _warn_once("WATCHDOG_USEC", "ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2_000_000


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds from a task on the running event loop.

    ``healthy`` (optional) is asked before each ping; returning ``False`` skips it, so Gru can let
    systemd restart a process whose loop runs but whose work is wedged. Start it from Gru's loop
    and :meth:`stop` it before sending ``STOPPING=1``.
    """

    def __init__(
        self, interval: float | None = None, *, healthy: Callable[[], bool] | None = None
    ) -> None:
        self.interval = watchdog_interval() if interval is None else interval
        if self.interval is not None and self.interval <= 0:
            raise ValueError(f"Watchdog interval must be > 0 seconds, got {self.interval!r}")
        self._healthy = healthy
        self._task: asyncio.Task[None] | None = None
        self.pings = 0

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for a watchdog (``WATCHDOG_USEC`` set for this pid)."""
        return self.interval is not None

    def start(self) -> None:
        """Begin pinging on the running loop; a no-op when systemd asked for no watchdog."""
        if self.interval is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(self.interval), name="minions-sd-watchdog"
        )

    async def stop(self) -> None:
        """Cancel the ping task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self, interval: float) -> None:
        """Ping, then sleep. How late each wake-up is goes to ``minions_event_loop_lag_seconds``:
        a lag growing towards the interval is a loop about to miss the watchdog."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            metrics.EVENT_LOOP_LAG.set(max(0.0, loop.time() - due))
            if self._is_healthy() and watchdog():
                self.pings += 1
                metrics.WATCHDOG_LAST_PING.set_to_current_time()
            due = loop.time() + interval
            await asyncio.sleep(interval)

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("watchdog health check raised; skipping this ping")
            return False
