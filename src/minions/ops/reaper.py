"""Reaping orphans when Gru is PID 1 (a container without an init) or a child subreaper.

Design note. A process whose parent dies is re-parented to the nearest ancestor that is a child
subreaper, else to PID 1 of its PID namespace, and only that new parent can collect its exit
status. Native libraries start helpers, and a helper of a crashed worker outlives its parent: in
a container without an init, Gru is PID 1, inherits all of them, and each one that exits stays a
zombie (a PID-table slot, counted against the container's ``pids.max``) until Gru waits for it.

The obvious init loop, ``waitpid(-1)``, is wrong inside Gru: it would also collect the children
that have an owner in this process. A pool reaps each worker itself (its pidfd fires, then
``Popen.wait()`` reads the status that the crash verdict is made of), and user code waits for its
own subprocesses (``subprocess.run``, asyncio's child watcher). A status stolen from them is lost
for good: ``Popen.wait()`` then sees ``ECHILD`` and reports exit code 0. So this reaper only
collects zombies that nobody else will:

- **claimed children are never touched.** An owner that spawns a child and reaps it later calls
  :func:`claim` right after spawning and :func:`release` after reaping; the pool does so for its
  workers. Claims and the reaper's check-then-reap share one lock, so a claim made before a
  zombie's grace has run out always wins.
- **an unclaimed zombie is reaped only once it has stayed a zombie for** ``grace_s``. An owner
  that waits for its child (a thread blocked in ``waitpid``, a pidfd reader on the loop) collects
  it within microseconds of its exit; an orphan's new parent never had an owner, so it is still a
  zombie a grace later. Only an owner that leaves its own dead child unreaped for longer than the
  grace (``Popen.poll()`` every few seconds, a forgotten ``multiprocessing.Process``) loses the
  status; such code should :func:`claim` its children, or run under an init (``docker run
  --init``) so that Gru is not PID 1.
- **the zombie is named by a pidfd**, opened when it is first seen and used to reap it
  (``waitid(P_PIDFD)``): if its owner reaped it in between and the PID was reused, the pidfd
  still names the old process and the new one is not touched.

The reaper is independent of how workers are spawned: it knows no pool, only claims. It sweeps on
Gru's event loop every ``interval_s`` and is active only while this process is PID 1 or a child
subreaper, checked on every sweep (one ``getpid`` and one ``prctl``), so a component that makes
Gru a subreaper later (a zygote that forks workers) needs no hook. A sweep with no zombie child
costs one ``waitid(WNOWAIT)`` syscall; only when some child is a zombie does it list the children.

This module does not handle signals: Gru's own SIGTERM/SIGINT handlers are what PID 1 needs (the
kernel sends PID 1 only the signals it has a handler for).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from minions.errors import signal_name

INTERVAL_S = 1.0
GRACE_S = 2.0
_PR_GET_CHILD_SUBREAPER = 37


class _Logger(Protocol):
    """What the reaper logs through: Gru's logger (or any ``logging.Logger``)."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def info(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None: ...


_claims: set[int] = set()
_claims_lock = threading.Lock()


def claim(pid: int) -> None:
    """Mark ``pid`` (a child of this process) as reaped by its owner: the reaper leaves it.

    Call it right after spawning, from any thread; pair it with :func:`release` after reaping.
    """
    with _claims_lock:
        _claims.add(pid)


def release(pid: int) -> None:
    """The owner has reaped ``pid``; its number may now be reused by anyone."""
    with _claims_lock:
        _claims.discard(pid)


def is_claimed(pid: int) -> bool:
    """Whether an owner has claimed ``pid`` and not yet released it."""
    with _claims_lock:
        return pid in _claims


class ReaperRole(enum.Enum):
    """Why orphans are re-parented to this process."""

    INIT = "PID 1 of its PID namespace"
    SUBREAPER = "a child subreaper"


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc/musl Linux
        return None


_prctl = _libc_prctl()


def reaper_role() -> ReaperRole | None:
    """This process's role for orphans, or ``None`` when they go to someone else."""
    if os.getpid() == 1:
        return ReaperRole.INIT
    if _prctl is not None:
        flag = ctypes.c_int(0)
        if _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value:
            return ReaperRole.SUBREAPER
    return None


@dataclass(frozen=True, slots=True)
class Reaped:
    """One orphan the reaper collected, with how it ended."""

    pid: int
    name: str
    exit_code: int | None
    signal: int | None

    def describe(self) -> str:
        how = f"killed by {signal_name(self.signal)}" if self.signal else f"exit {self.exit_code}"
        return f"pid {self.pid} ({self.name or '?'}), {how}"


@dataclass(slots=True)
class _Sighting:
    pidfd: int
    since: float


def _has_zombie_child() -> bool:
    """One syscall: is any child waitable? ``WNOWAIT`` leaves it for whoever reaps it."""
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_ALL, 0, flags) is not None
    except ChildProcessError:
        return False


def _zombie_children() -> Iterable[psutil.Process]:
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                yield child


class OrphanReaper:
    """Collects unclaimed zombie children past their grace; one per Gru, on Gru's loop."""

    def __init__(
        self,
        logger: _Logger,
        *,
        interval_s: float = INTERVAL_S,
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or grace_s < 0:
            raise ValueError(f"need interval_s > 0 and grace_s >= 0, got {interval_s}, {grace_s}")
        self._logger = logger
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._clock = clock
        self._seen: dict[int, _Sighting] = {}
        self._announced: ReaperRole | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping on the running loop (a sweep is a no-op unless a role applies)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="minions-gru-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._forget(list(self._seen))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            role = reaper_role()
            if role is None:
                continue
            if role is not self._announced:
                self._announced = role
                self._logger.info(
                    "this process is %s: reaping orphaned processes it inherits", role.value
                )
            try:
                for done in self.sweep():
                    self._logger.debug("reaped orphan %s", done.describe())
            except (OSError, psutil.Error) as exc:  # e.g. out of descriptors: retry next sweep
                self._logger.warning("reaping orphans failed, will retry: %r", exc)

    def sweep(self) -> list[Reaped]:
        """One pass: note new zombies, reap unclaimed ones older than the grace, forget the
        ones their owners reaped. Called on the loop by the sweeping task (and by tests)."""
        zombies = {p.pid: p for p in _zombie_children()} if _has_zombie_child() else {}
        self._forget([pid for pid in self._seen if pid not in zombies])
        now = self._clock()
        reaped: list[Reaped] = []
        for pid, proc in zombies.items():
            sighting = self._seen.get(pid)
            if sighting is None:
                self._note(pid, now)
            elif now - sighting.since >= self.grace_s:
                done = self._reap(pid, sighting, proc)
                if done is not None:
                    reaped.append(done)
        return reaped

    def _note(self, pid: int, now: float) -> None:
        with _claims_lock:
            if pid in _claims:
                return
        try:
            self._seen[pid] = _Sighting(os.pidfd_open(pid), now)
        except ProcessLookupError:  # reaped by its owner since we listed it
            pass

    def _reap(self, pid: int, sighting: _Sighting, proc: psutil.Process) -> Reaped | None:
        name = ""
        with contextlib.suppress(psutil.Error):
            name = proc.name()
        with _claims_lock:  # a claim and this check-then-reap never interleave
            if pid in _claims:
                result = None
            else:
                try:
                    result = os.waitid(os.P_PIDFD, sighting.pidfd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:  # its owner was quicker: nothing to do
                    result = None
        self._forget([pid])
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            return Reaped(pid, name, result.si_status, None)
        return Reaped(pid, name, None, result.si_status)

    def _forget(self, pids: list[int]) -> None:
        for pid in pids:
            sighting = self._seen.pop(pid, None)
            if sighting is not None:
                os.close(sighting.pidfd)

    @property
    def watched(self) -> int:
        """Unclaimed zombies seen and not yet past their grace."""
        return len(self._seen)


_shared: OrphanReaper | None = None
_holders = 0


def hold(logger: _Logger) -> None:
    """Keep one reaper sweeping for this process while anyone holds it: Gru does, and so does
    every pool that makes the process a child subreaper (a standalone pool forking workers from
    its zygote adopts orphans too, with no Gru to reap them). On the running loop."""
    global _shared, _holders
    _holders += 1
    if _shared is None:
        _shared = OrphanReaper(logger)
        _shared.start()


async def unhold() -> None:
    """Give up a :func:`hold`; the last holder stops the reaper."""
    global _shared, _holders
    _holders = max(0, _holders - 1)
    if _holders == 0 and _shared is not None:
        reaper, _shared = _shared, None
        await reaper.stop()
