"""The raw floor: the least any msgspec-over-ZeroMQ worker pool could cost.

Parent side: a plain (non-asyncio) ``zmq.ROUTER`` socket driven by ``loop.add_reader`` on its
``zmq.FD``. Child side (``python raw_floor.py ENDPOINT``): a blocking ``DEALER`` loop. One child,
no supervision, no deadlines, no validation: whatever Minions adds on top of this is overhead.

The ``zmq.FD`` is edge-triggered and only says "events may have changed": every readiness callback
drains while ``EVENTS & POLLIN``, and after every send we re-check ``EVENTS`` ourselves, because the
send itself may have consumed the edge that announced a reply already queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

STOP = b"stop"
HELLO = b"hello"
Frame = tuple[int, int]  # (call id, value) both ways


class RawFloor:
    """One ROUTER in the parent, one DEALER child, ``ping`` only."""

    name = "raw floor"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="minions-bench-")
        self._endpoint = f"ipc://{self._tmp.name}/floor.sock"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(Frame)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._peer: bytes | None = None
        self._hello: asyncio.Future[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.bind(self._endpoint)
        self._hello = self._loop.create_future()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__)), self._endpoint])
        self._peer = await asyncio.wait_for(self._hello, 30)

    async def ping(self, x: int) -> int:
        assert self._loop is not None and self._peer is not None
        call_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[call_id] = fut
        self._sock.send_multipart([self._peer, self._enc.encode((call_id, x))], zmq.NOBLOCK)
        self._recheck()
        return await fut

    def _recheck(self) -> None:
        """A send can swallow the FD's edge for a reply that is already queued: look ourselves."""
        if not self._drain_scheduled and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sock = self._sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            peer, payload = sock.recv_multipart(zmq.NOBLOCK)
            if payload == HELLO:
                if self._hello is not None and not self._hello.done():
                    self._hello.set_result(peer)
                continue
            call_id, value = self._dec.decode(payload)
            fut = self._pending.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(value)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        if self._proc is not None:
            if self._peer is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart([self._peer, STOP], zmq.NOBLOCK)
            try:
                await asyncio.to_thread(self._proc.wait, 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        self._sock.close(0)
        self._ctx.term()
        self._tmp.cleanup()


def _exit_with_parent(parent: int) -> None:
    """Not supervision, just hygiene: never outlive a benchmark that crashed (checked once a second,
    in a thread, so the request loop pays nothing for it)."""
    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(1)


def child_main(endpoint: str) -> None:
    """The DEALER loop: decode, call the C ``ping``, encode, reply; exit on ``STOP``."""
    from native_demo import _native

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(HELLO)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(Frame)
    ping = _native.ping
    while True:
        payload = sock.recv()
        if payload == STOP:
            break
        call_id, x = dec.decode(payload)
        sock.send(enc.encode((call_id, ping(x))))
    sock.close(0)
    ctx.term()


if __name__ == "__main__":
    child_main(sys.argv[1])
