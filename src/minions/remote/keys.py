"""CURVE keys and the pool's allow-list, in ZeroMQ's own certificate format.

Key files are what ``zmq.auth.create_certificates`` writes: ``NAME.key`` (public) and
``NAME.key_secret`` (public and secret). A pool accepts a worker host whose public key is in its
allow-list directory, and the host's name is that file's stem: the name is configuration, so it
is a bounded metric label, and a host cannot claim another's name because ZeroMQ hands us the
name the key authenticated as (the ZAP ``User-Id``), never what the host says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("minions.remote")

ZAP_DOMAIN = "minions"


class KeyFileError(ValueError):
    """A key file is missing or is not a ZeroMQ CURVE certificate (raised at start, named)."""


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in ``directory``; refuse to overwrite."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeyFileError(f"a key name is a host or pool name ([A-Za-z0-9._-]), got {name!r}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    public, secret = path / f"{name}.key", path / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists():
            raise KeyFileError(f"{existing} exists; remove it first to make a new key")
    made_public, made_secret = zmq.auth.create_certificates(str(path), name)
    Path(made_secret).chmod(0o600)
    return Path(made_public), Path(made_secret)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the secret key {path}: {exc}") from None
    if not secret:
        raise KeyFileError(f"{path} holds no secret key: pass the .key_secret file, not .key")
    return public, secret


def load_public(path: str | Path) -> bytes:
    """The public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the public key {path}: {exc}") from None
    return public


def load_allowed(
    directory: str | Path, skip: Callable[[KeyFileError], None] | None = None
) -> dict[bytes, str]:
    """Allowed host keys: z85 public key -> host name (the file's stem). A file that is not a
    key raises, or with ``skip`` is reported to it and left out (a key being copied in)."""
    path = Path(directory)
    if not path.is_dir():
        raise KeyFileError(f"host_keys_dir {str(path)!r} is not a directory")
    allowed: dict[bytes, str] = {}
    for cert in sorted(path.glob("*.key")):
        try:
            allowed[load_public(cert)] = cert.stem
        except KeyFileError as exc:
            if skip is None:
                raise
            skip(exc)
    return allowed


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What a CURVE server socket needs: its secret key and the allow-list directory."""

    secret_file: Path
    hosts_dir: Path

    def check(self) -> None:
        """Fail now, with the file named, rather than when the first host connects."""
        load_secret(self.secret_file)
        load_allowed(self.hosts_dir)

    def configure(
        self, context: zmq.Context[zmq.Socket[bytes]], sock: zmq.Socket[bytes]
    ) -> Callable[[], None]:
        """Make ``sock`` a CURVE server with a ZAP handler on ``context``; returns the function
        that stops the handler (before the context is terminated)."""
        public, secret = load_secret(self.secret_file)
        auth = HostAuthenticator(context, self.hosts_dir)
        auth.start()
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        return auth.stop


class HostAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, with host keys re-read when the directory changes and each
    accepted key's ``User-Id`` set to its host name."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], directory: Path) -> None:
        super().__init__(context, log=logging.getLogger("minions.remote.zap"))
        self._directory = directory
        self._mtime = -1.0
        self._hosts: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self.reload()
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def reload(self) -> None:
        """Re-read the allow-list if the directory changed (adding a key needs no restart)."""
        try:
            mtime = self._directory.stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            try:  # never raise here: an exception ends the ZAP thread, and every host with it
                allowed = load_allowed(self._directory, self._skip)
            except KeyFileError as exc:  # the directory itself went away
                log.error("%s; keeping the hosts allowed before", exc)
                return
            with self._lock:
                self._hosts, self._mtime = allowed, mtime

    @staticmethod
    def _skip(exc: KeyFileError) -> None:
        log.error("host_keys_dir: %s; that host is not allowed until its key file is whole", exc)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP thread: is this client key allowed? (Refusals are counted by the socket
        monitor of the pool, which sees every failed handshake, plaintext ones included.)"""
        self.reload()
        with self._lock:
            return z85_key in self._hosts

    def curve_user_id(self, client_public_key: bytes) -> str:
        with self._lock:
            return self._hosts.get(z85.encode(client_public_key), "")


def client_options(
    secret_file: str | Path, server_key_file: str | Path
) -> Callable[[zmq.Socket[bytes]], None]:
    """A configure hook that makes a DEALER a CURVE client of the pool whose public key is in
    ``server_key_file``."""
    public, secret = load_secret(secret_file)
    server = load_public(server_key_file)

    def configure(sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)

    return configure
