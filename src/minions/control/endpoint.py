"""Where Gru's control socket lives, and how ``minions status`` finds it.

Design note. The socket sits in a directory only Gru's uid can enter (0700, owned by it): the
kernel's permission check on ``connect()`` is the access control, so only that uid and root get
in. Under systemd that directory is the unit's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``,
created 0700 for the service user); elsewhere Gru makes a private one under ``$XDG_RUNTIME_DIR``
or the temp dir. Gru also leaves a pointer file beside its state database (``minions.db`` ->
``minions.db.control``, holding the socket's path), so an operator can find it from the state
directory. A client looks, in order: an explicit socket, ``$RUNTIME_DIRECTORY``, the pointer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "control.sock"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes, with the NUL


class ControlUnavailable(Exception):
    """No Gru answers where we looked; the message says where, and what to try."""


def pointer_path(db_path: str | os.PathLike[str]) -> Path:
    """``minions.db`` -> ``minions.db.control``: where Gru records its socket's path."""
    path = Path(db_path)
    return path.with_name(path.name + ".control")


def is_private_directory(path: Path) -> bool:
    """A directory of our uid that nobody else may enter (no group or other bits)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def runtime_directory(environ: Mapping[str, str]) -> Path | None:
    """systemd's ``$RUNTIME_DIRECTORY`` (the first, if it lists several), if set."""
    first = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(first) if first else None


@dataclass(frozen=True, slots=True)
class Place:
    """Where this Gru binds: ``socket`` inside ``directory``; ``owned`` directories are ours to
    remove on shutdown (a systemd runtime directory is systemd's)."""

    directory: Path
    owned: bool

    @property
    def socket(self) -> Path:
        return self.directory / SOCKET_NAME

    @property
    def address(self) -> str:
        return f"ipc://{self.socket}"

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)


def choose_place(environ: Mapping[str, str]) -> Place:
    """The unit's private runtime directory when usable and free, else a fresh private one."""
    runtime = runtime_directory(environ)
    if runtime is not None and is_private_directory(runtime):
        candidate = Place(runtime, owned=False)
        if len(str(candidate.socket)) <= _MAX_SOCKET_PATH and _claim(candidate.socket):
            return candidate
    base = environ.get("XDG_RUNTIME_DIR") or None
    if base is not None and not os.access(base, os.W_OK | os.X_OK):
        base = None
    directory = Path(tempfile.mkdtemp(prefix="minions-gru-", dir=base))
    if len(str(directory / SOCKET_NAME)) > _MAX_SOCKET_PATH and base is not None:
        directory.rmdir()
        directory = Path(tempfile.mkdtemp(prefix="minions-gru-"))
    os.chmod(directory, 0o700)  # mkdtemp does; say it, umask-proof
    return Place(directory, owned=True)


def _claim(path: Path) -> bool:
    """Whether ``path`` is free to bind: absent, or a stale socket nobody listens on (removed).
    A live one belongs to another Gru sharing the directory, which must keep it."""
    if not path.exists():
        return True
    if probe(path) is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    return False


def probe(path: Path) -> OSError | None:
    """Connect once to the socket file: ``None`` if something listens, else why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            return exc
    return None


def write_pointer(pointer: Path, place: Place) -> bool:
    """Record the socket's path beside the state database (0600, atomically); ``False`` if the
    state directory is not writable (the runtime directory still works)."""
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{place.socket}\n")
        os.replace(tmp, pointer)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def remove_pointer(pointer: Path, place: Place) -> None:
    """Remove the pointer if it still names our socket (a newer Gru may have replaced it)."""
    with contextlib.suppress(OSError):
        if pointer.read_text().strip() == str(place.socket):
            pointer.unlink()


def find_socket(
    *, socket_path: str | None, runtime_dir: str | None, db: str | None, environ: Mapping[str, str]
) -> Path:
    """The socket a client should use: ``--socket``, then ``--runtime-dir`` (default
    ``$RUNTIME_DIRECTORY``), then the pointer beside ``--db`` (default ``./minions.db``)."""
    if socket_path:
        return Path(socket_path)
    runtime = Path(runtime_dir) if runtime_dir else None
    if runtime is None and db is None:
        runtime = runtime_directory(environ)
    if runtime is not None:
        return runtime / SOCKET_NAME
    pointer = pointer_path(db or "minions.db")
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        raise ControlUnavailable(
            f"no Gru is running for {pointer.with_suffix('')} (no {pointer}); give the state "
            "database with --db, or the unit's runtime directory with --runtime-dir"
        ) from None
    except OSError as exc:
        raise ControlUnavailable(f"cannot read {pointer}: {exc.strerror}") from None
    return Path(text)


def check_reachable(path: Path) -> None:
    """Raise :class:`ControlUnavailable` saying why ``path`` has no Gru behind it."""
    failure = probe(path)
    if failure is None:
        return
    if failure.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = f"no Gru is running (no control socket at {path})"
    elif failure.errno == errno.ECONNREFUSED:
        reason = f"no Gru is running (nothing listens on {path}: it was left by one that died)"
    elif failure.errno == errno.EACCES:
        owner = _owner(path)
        reason = (
            f"permission denied for {path}: Gru's control socket admits only its own user"
            f"{owner}; run this as that user or as root"
        )
    else:
        reason = f"cannot reach Gru at {path}: {failure.strerror or failure}"
    raise ControlUnavailable(reason)


def _owner(path: Path) -> str:
    for candidate in (path, path.parent, path.parent.parent):
        with contextlib.suppress(OSError):
            return f" (uid {candidate.stat().st_uid})"
    return ""
