"""Where a pool listens: a private ``ipc://`` socket and the token its workers must present.

Each pool gets its own directory, created with mode 0700 under ``$XDG_RUNTIME_DIR`` when set
(systemd's per-service runtime dir) or the system temp dir, so only the same user can even reach
the socket; the random per-pool token in every worker's hello keeps out other processes of that
user. The directory also holds the workers' faulthandler crash files and is removed on close.

A Gru killed with SIGKILL cannot remove its directories. So each directory holds an ``owner``
file that its process keeps locked (``flock``) for as long as the pool lives, and
:meth:`Endpoint.create` first removes every ``minions-*`` directory of this user whose owner file
it can lock: the kernel drops a lock the moment its holder dies, whatever the cause, and unlike a
recorded pid a lock means the same thing from every PID namespace that shares the directory (two
containers, or a test's own namespace, on one ``/tmp``). Directories without an owner file (not
ours, or from an older version) are left alone.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# sun_path is 108 bytes on Linux, including "ipc://"-less path and the NUL.
_MAX_SOCKET_PATH = 100
_OWNER = "owner"  # locked by the owning process for the directory's whole life


def _hold_owner_lock(directory: Path) -> int:
    """Create ``directory/owner`` already locked (locked under a temporary name, then renamed,
    so a sweeper never sees it unlocked) and return the descriptor that holds the lock."""
    fd = os.open(directory / ".owner", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"locked by pid {os.getpid()}\n".encode())  # for a human: the lock counts
    os.rename(directory / ".owner", directory / _OWNER)
    return fd


def _owner_gone(directory: Path) -> bool:
    try:
        fd = os.open(directory / _OWNER, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # no owner file: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its owner lives
    finally:
        os.close(fd)
    return True


def sweep_stale(base: str | None) -> list[Path]:
    """Remove the ``minions-*`` directories under ``base`` (or the temp dir) that belong to this
    user and whose owner process is gone; returns what was removed."""
    root = Path(base or tempfile.gettempdir())
    removed = []
    for directory in root.glob("minions-*"):
        try:
            if directory.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _owner_gone(directory):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _runtime_base() -> str | None:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
        return base
    return None


@dataclass
class Endpoint:
    """A pool's private directory, socket address and auth token. Owned by the parent."""

    directory: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    _lock_fd: int = -1

    @classmethod
    def create(cls, name: str) -> Endpoint:
        """Make a fresh 0700 directory for pool ``name``."""
        safe = "".join(c if c.isalnum() else "-" for c in name)[:24]
        base = _runtime_base()
        sweep_stale(base)
        directory = Path(tempfile.mkdtemp(prefix=f"minions-{safe}-", dir=base))
        if len(str(directory / "pool.sock")) > _MAX_SOCKET_PATH and base is not None:
            shutil.rmtree(directory, ignore_errors=True)
            sweep_stale(None)
            directory = Path(tempfile.mkdtemp(prefix=f"minions-{safe}-"))
        os.chmod(directory, 0o700)  # mkdtemp already does; state it, umask-proof
        return cls(directory, _lock_fd=_hold_owner_lock(directory))

    @property
    def address(self) -> str:
        return f"ipc://{self.directory / 'pool.sock'}"

    def crash_file(self, worker_id: int, generation: int) -> Path:
        """Where worker ``worker_id``'s faulthandler writes; unique per spawned process."""
        return self.directory / f"crash-{worker_id}-{generation}.txt"

    def remove(self) -> None:
        """Delete the directory and everything in it (socket, crash files), then let go of it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
