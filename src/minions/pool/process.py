"""One worker process as the pool sees it: watch for death, signal, reap.

Death detection is event-driven: a pidfd (Linux >= 5.3) becomes readable the moment the child
exits, and the pool puts it on the event loop with ``add_reader``; no polling, no SIGCHLD
handler, no watcher thread. Workers are fresh interpreters or forks of the pool's zygote (see
``spawn.py``), never forks of Gru, so they inherit none of its threads, sockets or locks. Either
way the worker is a child of this process (a forked one is adopted: Gru is a child subreaper),
so :meth:`WorkerProcess.reap` reads its exact exit status with ``waitid`` on the pidfd.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minions.ipc.arena import ParentArena
from minions.ipc.marker import marker_path, read_running_call
from minions.ops import reaper
from minions.pool.config import SpawnMode
from minions.pool.events import WorkerRef

if TYPE_CHECKING:
    from minions.pool.verdict import DeathCause

log = logging.getLogger("minions.pool")

#: What :meth:`WorkerProcess.reap` reports when the exit status was taken by someone else.
LOST_STATUS = 255


class Role(enum.Enum):
    ACTIVE = "active"  # receives calls
    SPARE = "spare"  # booted and idle, promoted the moment an active worker goes


class Phase(enum.Enum):
    BOOTING = "booting"  # spawned, no hello yet
    READY = "ready"  # serving
    RETIRING = "retiring"  # finishing its calls, then told to shut down
    KILLED = "killed"  # signalled by the pool, waiting for the pidfd
    DEAD = "dead"  # reaped


@dataclass(eq=False)
class WorkerProcess:
    """A spawned worker process, as the Supervisor tracks it (the calls it owes are the
    Dispatcher's: see ``dispatcher.Lane``)."""

    worker_id: int
    identity: bytes
    pid: int
    pidfd: int
    crash_file: Path
    role: Role
    via: SpawnMode = SpawnMode.EXEC  # how it was spawned
    popen: subprocess.Popen[bytes] | None = None  # exec spawns only; told the status at reap
    phase: Phase = Phase.BOOTING
    spawned_at: float = field(default_factory=time.monotonic)
    calls_served: int = 0
    killed_for: DeathCause | None = None
    said_hello: bool = False
    rss_bytes: int = 0
    last_heard: float = 0.0  # monotonic time of its last frame of any kind
    arena: ParentArena | None = None  # its shared memory: created at spawn, dropped after death
    ref: WorkerRef = field(init=False)  # how the Dispatcher and events name it

    def __post_init__(self) -> None:
        self.ref = WorkerRef(self.worker_id, self.pid, self.identity, self.arena)

    @property
    def dispatchable(self) -> bool:
        return self.phase is Phase.READY and self.role is Role.ACTIVE

    def send_signal(self, signum: int) -> None:
        """Signal the process unless it is already reaped (pidfd_send_signal is race-free)."""
        if self.phase is Phase.DEAD:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def drop_arena(self) -> None:
        """Unmap the arena once the death was settled (its last results were read); with the
        worker gone, that frees its memory."""
        if self.arena is not None:
            self.arena.close()

    def reap(self) -> int:
        """Collect the exit status once the pidfd said it exited; close the pidfd. Returns it
        the way ``subprocess`` does: the exit code, or minus the signal that killed it."""
        returncode = wait_pidfd(self.pidfd)
        reaper.release(self.pid)
        if returncode is None:
            log.error(
                "worker %d (pid %d): its exit status was collected by someone else in this "
                "process (a waitpid(-1) loop?); reported as exit code %d",
                self.worker_id, self.pid, LOST_STATUS,
            )  # fmt: skip
            returncode = LOST_STATUS
        if self.popen is not None:
            self.popen.returncode = returncode  # it must never wait for the pid again
        os.close(self.pidfd)
        self.pidfd = -1
        self.phase = Phase.DEAD
        return returncode

    def running_call(self) -> int | None:
        """Id of the call the worker is running now (or was, when it died): its marker."""
        return read_running_call(marker_path(self.crash_file))

    def read_running_call(self) -> int | None:
        """After death: the call it had started and not finished; the marker is removed."""
        try:
            return self.running_call()
        finally:
            marker_path(self.crash_file).unlink(missing_ok=True)

    def read_stack(self) -> str:
        """What faulthandler (or a failed boot) wrote; the file is removed afterwards."""
        try:
            text = self.crash_file.read_text(errors="replace")
        except OSError:
            return ""
        finally:
            self.crash_file.unlink(missing_ok=True)
        return text.strip()


def wait_pidfd(pidfd: int) -> int | None:
    """Reap the exited child ``pidfd`` names; ``None`` if it is not (or no longer) our child."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        return None
    if result is None:  # only with WNOHANG; kept for the type checker
        return None
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
