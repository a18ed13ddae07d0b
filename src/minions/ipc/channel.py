"""Parent side of the wire: one ROUTER socket per pool, driven by the asyncio loop.

Design note. We use a plain (non-asyncio) pyzmq socket and ``loop.add_reader`` on its
``zmq.FD``: measured about 2x the pipelined throughput of ``zmq.asyncio`` on this kind of
machine, because there is no future per recv. The FD is edge-triggered and only says "socket
state changed", so (1) on wake we drain with non-blocking recv until ``zmq.Again``, and (2) after
every send we schedule one more drain, since a send can consume the edge that announced incoming
messages. Frames are handed to the owner whole; decoding and authentication are the owner's job.
A pool's tcp channel for worker hosts is the same class made a CURVE server (``secure``): it
also notes the name each connection authenticated as (the ZAP ``User-Id`` of its first frame)
and counts failed handshakes (unknown key, plaintext client, wrong server key) from a socket
monitor.

Frames of ``ZERO_COPY_MIN_BYTES`` or more are sent zero-copy (ZeroMQ holds a reference to the
immutable bytes until its I/O thread has written them); smaller ones are cheaper to copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from minions.ipc import messages as m

log = logging.getLogger("minions.ipc")

_DRAIN_BATCH = 256  # messages handled per loop callback before yielding to other tasks
# Plain ints: pyzmq's enum flags cost an Enum construction per use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)
_ZERO_COPY_MIN = m.ZERO_COPY_MIN_BYTES


#: Makes a socket a CURVE server on a context; returns what stops its ZAP handler.
Secure = Callable[[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]], Callable[[], None]]

_HANDSHAKE_FAILURES = {
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",  # ZAP refused the key
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake",  # plaintext client, bad server key
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake",
}


_WHY = {
    "auth": "its CURVE key is not in host_keys_dir",
    "handshake": "no CURVE (a plaintext client), or it encrypts for another server key",
}
_WARN_EVERY_S = 10.0
_HANDSHAKE_MS = 3000


def _pending_input(sock: zmq.Socket[bytes]) -> int:
    return sock.getsockopt(_EVENTS) & _POLLIN  # type: ignore[operator]  # EVENTS is an int


class RouterChannel:
    """Bind a ROUTER at ``address``; call ``on_frames(identity, payloads)`` for each message.

    A message is ``[identity, payload, payload, ...]``: each payload is one encoded Struct, and
    several travel together when a side has several ready at once (one flush of the pipe instead
    of one per call). ``on_drained()`` runs after each batch of received messages, so the owner
    can answer a burst with one batch. ``on_bad(kind)`` counts shapes the protocol never sends.
    Must be used from the thread running the event loop.

    With ``secure`` the socket is a CURVE server: :meth:`peer_name` tells the name a
    connection authenticated as, a failed handshake is counted as ``on_bad("auth")`` or
    ``on_bad("handshake")``, and ``on_disconnect()`` runs when some peer's connection closed
    (the monitor does not say whose: with ``ROUTER_MANDATORY`` a send to it now fails).
    """

    def __init__(
        self,
        address: str,
        on_frames: Callable[[bytes, list[bytes]], None],
        on_bad: Callable[[str], None],
        on_drained: Callable[[], None],
        secure: Secure | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self._secure = secure
        self._on_disconnect = on_disconnect
        self._names: dict[bytes, str] | None = {} if secure is not None else None
        self._stop_auth: Callable[[], None] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._monitor_fd = -1
        self._warned_at: dict[str, float] = {}
        self._on_frames = on_frames
        self._on_bad = on_bad
        self._on_drained = on_drained
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._fd = -1
        self._drain_scheduled = False

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone worker raises, not drops
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._secure is not None:
            self._stop_auth = self._secure(self._ctx, sock)
            sock.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)  # a mute peer is dropped too
            events = sum(_HANDSHAKE_FAILURES) | int(zmq.EVENT_DISCONNECTED)
            self._monitor = sock.get_monitor_socket(events)
            self._monitor_fd = int(self._monitor.getsockopt(zmq.FD))
            self._loop.add_reader(self._monitor_fd, self._read_monitor)
            self._loop.call_soon(self._read_monitor)  # read it empty once: that arms its edge
        sock.bind(self.address)
        self._sock = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def bound(self) -> str:
        """The address actually bound (a ``tcp://host:0`` address gets its port here)."""
        assert self._sock is not None, "channel not open"
        return str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def peer_name(self, identity: bytes) -> str:
        """The name the connection ``identity`` authenticated as (``""`` if not known)."""
        return self._names.get(identity, "") if self._names is not None else ""

    def forget(self, identity: bytes) -> None:
        """The owner is done with a connection: drop its name."""
        if self._names is not None:
            self._names.pop(identity, None)

    def _read_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, _NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            if int(event["event"]) == zmq.EVENT_DISCONNECTED:
                if self._on_disconnect is not None:  # which peer is not said: the owner probes
                    self._on_disconnect()
                continue
            kind = _HANDSHAKE_FAILURES.get(int(event["event"]))
            if kind is not None:
                self._on_bad(kind)
                now = time.monotonic()
                if now - self._warned_at.get(kind, -_WARN_EVERY_S) >= _WARN_EVERY_S:
                    self._warned_at[kind] = now
                    log.warning(
                        "refused a connection on %s: %s (each attempt counts in "
                        "minions_protocol_errors_total{kind=%r}; this warning repeats every 10 s "
                        "at most)",
                        self.address, _WHY[kind], kind,
                    )  # fmt: skip

    def send(self, identity: bytes, payloads: list[bytes]) -> bool:
        """Queue payloads for one worker as one message; ``False`` if it is not connected."""
        sock = self._sock
        assert sock is not None, "channel not open"
        try:
            sock.send(identity, _SEND_MORE)
            last = len(payloads) - 1
            for i, payload in enumerate(payloads):
                flags = _NOBLOCK if i == last else _SEND_MORE
                # big frames zero-copy: ZeroMQ keeps a reference (the bytes are immutable)
                sock.send(payload, flags, copy=len(payload) < _ZERO_COPY_MIN)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        finally:
            # A send can swallow the FD edge announcing replies already queued: look ourselves.
            if not self._drain_scheduled and _pending_input(sock):
                self._schedule_drain()
        return True

    def poll(self) -> None:
        """Handle what has arrived right now, synchronously (the pool does this before settling
        a dead worker's calls, so answers it delivered before dying are not lost)."""
        if self._sock is not None:
            self._drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Read until the socket has nothing more, handing each message over.

        pyzmq spends about a microsecond on each ``EVENTS`` check and about 2.5 on a
        ``zmq.Again``: the first two messages of a drain are looked for with ``EVENTS`` (most
        drains hold one, on the latency path), the rest by reading until ``zmq.Again`` (a drain
        under load holds dozens). Either way the socket is read empty, which re-arms its
        edge-triggered FD; sends check ``EVENTS`` themselves (see :meth:`send`)."""
        self._drain_scheduled = False
        sock = self._sock
        if sock is None:
            return
        looks = 2  # EVENTS checks left before reading until zmq.Again
        try:
            for _ in range(_DRAIN_BATCH):
                if looks:
                    looks -= 1
                    if not _pending_input(sock):
                        break
                try:
                    identity = sock.recv(_NOBLOCK)
                except zmq.Again:
                    break
                # A ROUTER message is never the identity alone (a peer sends at least one
                # frame), so its first payload is read without asking: one getsockopt fewer.
                if self._names is not None and identity not in self._names:
                    first = sock.recv(_NOBLOCK, copy=False)
                    self._names[identity] = str(first.get("User-Id") or "")
                    payloads = [first.bytes]
                else:
                    payloads = [sock.recv(_NOBLOCK)]
                while sock.getsockopt(_RCVMORE):
                    payloads.append(sock.recv(_NOBLOCK))
                try:
                    self._on_frames(identity, payloads)
                except Exception:  # the owner's bug must not stop the drain mid-batch
                    log.exception("handling a message failed; it was dropped")
                    self._on_bad("handler")
            else:  # a full batch: more may be waiting; let other callbacks run first
                self._on_drained()
                self._schedule_drain()
                return
        except zmq.ZMQError as exc:  # socket closed under us during shutdown
            log.debug("router recv failed: %s", exc)
            return
        self._on_drained()

    def close(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        if self._monitor is not None:
            if self._loop is not None and self._monitor_fd >= 0:
                self._loop.remove_reader(self._monitor_fd)
                self._monitor_fd = -1
            if self._sock is not None:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._stop_auth is not None:
            self._stop_auth()
            self._stop_auth = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
