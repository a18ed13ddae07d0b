"""One worker process as the pool sees it: spawn, watch for death, signal, reap.

Death detection is event-driven: a pidfd (Linux >= 5.3) becomes readable the moment the child
exits, and the pool puts it on the event loop with ``add_reader``; no polling, no SIGCHLD
handler, no watcher thread. Workers are fresh interpreters (``python -m minions.ipc.worker``),
never forks of Gru, so they inherit none of its threads, sockets or locks.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minions.ipc.arena import ParentArena
from minions.ipc.marker import marker_path, read_running_call
from minions.ipc.worker import TOKEN_ENV
from minions.ops import reaper
from minions.pool.events import WorkerRef

if TYPE_CHECKING:
    from minions.pool.verdict import DeathCause


class Role(enum.Enum):
    ACTIVE = "active"  # receives calls
    SPARE = "spare"  # booted and idle, promoted the moment an active worker goes


class Phase(enum.Enum):
    BOOTING = "booting"  # spawned, no hello yet
    READY = "ready"  # serving
    RETIRING = "retiring"  # finishing its calls, then told to shut down
    KILLED = "killed"  # signalled by the pool, waiting for the pidfd
    DEAD = "dead"  # reaped


def _worker_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env[TOKEN_ENV] = token
    # The worker must import what the parent can: its sys.path, '' made explicit.
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


@dataclass(eq=False)
class WorkerProcess:
    """A spawned worker process, as the Supervisor tracks it (the calls it owes are the
    Dispatcher's: see ``dispatcher.Lane``)."""

    worker_id: int
    identity: bytes
    popen: subprocess.Popen[bytes]
    pidfd: int
    crash_file: Path
    role: Role
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
        self.ref = WorkerRef(self.worker_id, self.popen.pid, self.identity, self.arena)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def dispatchable(self) -> bool:
        return self.phase is Phase.READY and self.role is Role.ACTIVE

    @classmethod
    def spawn(
        cls,
        *,
        worker_id: int,
        identity: bytes,
        role: Role,
        service: str,
        endpoint: str,
        token: str,
        crash_file: Path,
        heartbeat_s: float,
        arena: ParentArena | None = None,
    ) -> WorkerProcess:
        argv = [
            sys.executable,
            "-m",
            "minions.ipc.worker",
            "--endpoint",
            endpoint,
            "--service",
            service,
            "--worker-id",
            str(worker_id),
            "--identity",
            identity.decode(),
            "--crash-file",
            str(crash_file),
            "--parent-pid",
            str(os.getpid()),
            "--heartbeat-s",
            str(heartbeat_s),
        ]
        fds = (arena.fd,) if arena is not None else ()  # the worker inherits these, by number
        argv += [f"--arena-fd={fd}" for fd in fds]
        try:
            popen = subprocess.Popen(
                argv, env=_worker_env(token), stdin=subprocess.DEVNULL, pass_fds=fds
            )
        finally:
            if arena is not None:
                arena.close_fd()  # the worker holds its own copy now (or never will)
        reaper.claim(popen.pid)  # reap() reads its exit status: the orphan reaper must not
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            reaper.release(popen.pid)
            raise
        return cls(worker_id, identity, popen, pidfd, crash_file, role, arena=arena)

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
        """Collect the exit status once the pidfd said it exited; close the pidfd."""
        returncode = self.popen.wait()
        reaper.release(self.pid)
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
