"""Where a pool listens: a private ``ipc://`` socket and the token its workers must present.

Each pool gets its own directory, created with mode 0700 under ``$XDG_RUNTIME_DIR`` when set
(systemd's per-service runtime dir) or the system temp dir, so only the same user can even reach
the socket; the random per-pool token in every worker's hello keeps out other processes of that
user. The directory also holds the workers' faulthandler crash files and is removed on close.

A Gru killed with SIGKILL cannot remove its directories, so each one records its owner (pid and
the kernel's start time of that pid, which tells a reused pid apart) and :meth:`Endpoint.create`
first removes every ``minions-*`` directory of ours whose owner is gone, and only those.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# sun_path is 108 bytes on Linux, including "ipc://"-less path and the NUL.
_MAX_SOCKET_PATH = 100
_OWNER = "owner"  # "<pid> <starttime>" of the process that created the directory


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), ``None`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after "(comm)" start at field 3


def _owner_stamp() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}"


def sweep_stale(base: str | None) -> list[Path]:
    """Remove the ``minions-*`` directories under ``base`` (or the temp dir) that belong to this
    user and record an owner process that no longer exists; returns what was removed."""
    root = Path(base or tempfile.gettempdir())
    removed = []
    for directory in root.glob("minions-*"):
        try:
            if directory.stat().st_uid != os.getuid():
                continue
            pid_text, _, started = (directory / _OWNER).read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not one of ours, or from a version without an owner file: leave it
        if _start_time(pid) != started.strip():
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
        (directory / _OWNER).write_text(_owner_stamp())
        return cls(directory)

    @property
    def address(self) -> str:
        return f"ipc://{self.directory / 'pool.sock'}"

    def crash_file(self, worker_id: int, generation: int) -> Path:
        """Where worker ``worker_id``'s faulthandler writes; unique per spawned process."""
        return self.directory / f"crash-{worker_id}-{generation}.txt"

    def remove(self) -> None:
        """Delete the directory and everything in it (socket, crash files)."""
        shutil.rmtree(self.directory, ignore_errors=True)
