"""The floors of ``bench_payload.py``: the least a process boundary can cost for a payload.

Both have ONE child running a blocking ``DEALER`` loop and a ``ROUTER`` in the parent driven by
``loop.add_reader`` (as ``raw_floor.py``); no supervision, no validation, no typing.

- :class:`FramesFloor` sends the payload as a ZeroMQ frame (zero-copy above 64 KiB, as pyzmq
  itself does) and the child echoes the very frame it received back: the floor for frames.
- :class:`ShmFloor` copies the payload into a memfd both processes map (one ``memcpy``) and sends
  only ``(offset, length)``; the child answers ``len`` or the same reference, and the parent
  copies an echoed payload out into ``bytes``: two copies for a round trip, none in the child.
  The floor for shared memory.

Run as a child: ``python payload_floors.py frames|shm ENDPOINT [FD]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

HELLO, STOP = b"hello", b"stop"
SLOTS = 8  # one region per call in flight (the most the benchmark puts in flight)
ZERO_COPY = 65536


class _Floor:
    name = "floor"
    kind = ""

    def __init__(self, max_bytes: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="minions-bench-")
        self._endpoint = f"ipc://{self._tmp.name}/floor.sock"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._enc = msgspec.msgpack.Encoder()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._peer: bytes | None = None
        self._hello: asyncio.Future[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.max_bytes = max_bytes

    def _child_args(self) -> tuple[list[str], tuple[int, ...]]:
        return [], ()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.bind(self._endpoint)
        self._hello = self._loop.create_future()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        extra, fds = self._child_args()
        argv = [sys.executable, str(Path(__file__)), self.kind, self._endpoint, *extra]
        self._proc = subprocess.Popen(argv, pass_fds=fds)
        self._peer = await asyncio.wait_for(self._hello, 30)

    def child_pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None else []

    def _send(self, frames: list[Any]) -> None:
        assert self._peer is not None
        sock = self._sock
        sock.send(self._peer, zmq.SNDMORE)
        for i, frame in enumerate(frames):
            last = i == len(frames) - 1
            sock.send(frame, 0 if last else zmq.SNDMORE, copy=len(frame) < ZERO_COPY)
        if not self._scheduled and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            if frames[1] == HELLO:
                if self._hello is not None and not self._hello.done():
                    self._hello.set_result(frames[0])
                continue
            call_id, value = self._answer(frames[1:])
            fut = self._pending.pop(call_id)
            fut.set_result(value)

    def _answer(self, frames: list[bytes]) -> tuple[int, Any]:
        raise NotImplementedError

    def _future(self) -> tuple[int, asyncio.Future[Any]]:
        assert self._loop is not None
        call_id = next(self._ids)
        fut = self._pending[call_id] = self._loop.create_future()
        return call_id, fut

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        if self._proc is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._send([STOP])
            try:
                await asyncio.to_thread(self._proc.wait, 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        self._sock.close(0)
        self._ctx.term()
        self._tmp.cleanup()


class FramesFloor(_Floor):
    name = "frames floor"
    kind = "frames"

    async def call(self, mode: str, data: bytes) -> Any:
        call_id, fut = self._future()
        self._send([self._enc.encode((call_id, mode)), data])
        return await fut

    def _answer(self, frames: list[bytes]) -> tuple[int, Any]:
        call_id, value = msgspec.msgpack.decode(frames[0])
        return call_id, frames[1] if len(frames) > 1 else value


class ShmFloor(_Floor):
    name = "shm floor"
    kind = "shm"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._size = SLOTS * max(max_bytes, mmap.PAGESIZE)
        self._fd = os.memfd_create("bench-shm-floor", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self._size)
        self._map = mmap.mmap(self._fd, self._size)
        self._free = list(range(SLOTS))  # lowest first: one call in flight reuses one region
        self._slot: dict[int, int] = {}

    def _child_args(self) -> tuple[list[str], tuple[int, ...]]:
        return [str(self._fd)], (self._fd,)

    async def start(self) -> None:
        await super().start()
        os.close(self._fd)

    async def call(self, mode: str, data: bytes) -> Any:
        call_id, fut = self._future()
        self._free.sort()
        slot = self._slot[call_id] = self._free.pop(0)
        offset = slot * self.max_bytes
        self._map[offset : offset + len(data)] = data
        self._send([self._enc.encode((call_id, mode, offset, len(data)))])
        return await fut

    def _answer(self, frames: list[bytes]) -> tuple[int, Any]:
        reply = msgspec.msgpack.decode(frames[0])
        self._free.append(self._slot.pop(reply[0]))
        if len(reply) == 2:
            return reply[0], reply[1]
        call_id, offset, n = reply
        return call_id, self._map[offset : offset + n]

    async def close(self) -> None:
        await super().close()
        self._map.close()


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(1)


def child_main(kind: str, endpoint: str, fd: int = -1) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    shared = mmap.mmap(fd, os.fstat(fd).st_size) if fd >= 0 else None
    view = memoryview(shared) if shared is not None else None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(HELLO)
    enc = msgspec.msgpack.Encoder()
    while True:
        frames = sock.recv_multipart(copy=False)
        header = frames[0].bytes
        if header == STOP:
            break
        if view is None:  # frames: the payload is the second frame
            call_id, mode = msgspec.msgpack.decode(header)
            data = frames[1]
            if mode == "len":
                sock.send(enc.encode((call_id, len(data.buffer))))
            else:
                sock.send_multipart([enc.encode((call_id, None)), data], copy=False)
        else:
            call_id, mode, offset, n = msgspec.msgpack.decode(header)
            payload = view[offset : offset + n]
            if mode == "len":
                sock.send(enc.encode((call_id, len(payload))))
            else:
                sock.send(enc.encode((call_id, offset, len(payload))))
            payload.release()
    sock.close(0)
    ctx.term()


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
