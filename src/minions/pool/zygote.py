"""Gru's side of one zygote process: start it, ask it for workers, notice when it ends.

Design note. The zygote (``minions.ipc.zygote``) is a child of Gru, started by exec, watched
like a worker: its pidfd sits on the event loop and :meth:`Zygote.on_exit` reaps it the moment
it ends. Requests are asynchronous: :meth:`Zygote.submit` writes a ``Spawn`` to the control
socket with a fresh go pipe and returns; the zygote's answer arrives on the loop. On ``Spawned``
the new worker is already Gru's child (adopted through the subreaper), so a pidfd is opened on
it and only then is ``GO`` written to its go pipe: the worker cannot run, let alone die and have
its pid reused, before Gru holds that pidfd. A request the zygote never answers (it died, hung,
or refused) is handed back to the owner with its go pipe closed, so a worker that was forked
for it reads EOF and exits without booting; the owner spawns it again another way.

This module knows nothing of pools or exec: requests are named by worker id, and the owner
(:class:`~minions.pool.spawn.Spawner`) decides what to do with what comes back.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from minions.errors import signal_name
from minions.ipc import zygote as wire
from minions.ops import reaper
from minions.pool.process import wait_pidfd

log = logging.getLogger("minions.pool")

FORK_REPLY_S = 5.0  # a ready zygote answers in about a millisecond; this long means it is stuck


class ZygoteState(enum.Enum):
    STARTING = "starting"  # launched, importing the service
    READY = "ready"  # forks on request
    DEAD = "dead"  # reaped


class ZygoteEvents(Protocol):
    """What a zygote reports to its owner, on the event loop."""

    def forked(self, worker_id: int, pid: int, pidfd: int) -> None: ...
    def fork_failed(self, worker_id: int, why: str) -> None: ...
    def zygote_exited(self, zygote: Zygote, returncode: int, unanswered: list[int]) -> None: ...


@dataclass(slots=True)
class _Request:
    go: int  # our end of the worker's go pipe
    sent_at: float


class Zygote:
    """One zygote process and the spawn requests it has not answered yet."""

    def __init__(self, service: str, env: dict[str, str], events: ZygoteEvents) -> None:
        self.service = service
        self.state = ZygoteState.STARTING
        self.refusal = ""  # why it refused to fork this service, if it did
        self._env = env
        self._events = events
        self._requests: dict[int, _Request] = {}
        self._outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._writing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: socket.socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._started_at = 0.0
        self._killed_for = ""

    @property
    def pid(self) -> int:
        return self._popen.pid if self._popen is not None else 0

    @property
    def unanswered(self) -> int:
        return len(self._requests)

    def start(self) -> None:
        """Launch ``python -m minions.ipc.zygote``; raises ``OSError`` if it cannot."""
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [
                sys.executable, "-m", "minions.ipc.zygote", "--service", self.service,
                "--control-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            self._popen = subprocess.Popen(
                argv, env=self._env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),)
            )
            reaper.claim(self._popen.pid)  # on_exit reads its status
            self._pidfd = os.pidfd_open(self._popen.pid)
        except OSError:
            ours.close()
            if self._popen is not None:
                self._popen.kill()
                self._popen.wait()
                reaper.release(self._popen.pid)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._started_at = time.monotonic()
        self._loop.add_reader(ours, self._on_readable)
        self._loop.add_reader(self._pidfd, self.on_exit)

    # --- requests ------------------------------------------------------------------------------

    def submit(self, worker_id: int, argv: Sequence[str], token: str, fds: Sequence[int]) -> bool:
        """Ask for a worker; ``False`` if this zygote is gone (spawn another way). ``fds`` must
        stay open until the answer came. A request that cannot be written at once waits in an
        outbox until the socket is writable; one that fails is answered by the zygote's death
        (it is killed, and :meth:`on_exit` hands the request back)."""
        if self._control is None or self.state is ZygoteState.DEAD:
            return False
        go_r, go_w = os.pipe()
        data = wire.encoder.encode(wire.Spawn(worker_id, tuple(argv), token))
        self._requests[worker_id] = _Request(go_w, time.monotonic())
        self._outbox.append((data, [go_r, *fds]))
        self._flush()
        return True

    def _flush(self) -> None:
        """Write queued requests until the socket is full (then wait until it is writable)."""
        control = self._control
        while control is not None and self._outbox:
            data, fds = self._outbox[0]
            try:
                socket.send_fds(control, [data], fds)
            except BlockingIOError:  # a big pool asks for more than the socket buffers
                if not self._writing and self._loop is not None:
                    self._loop.add_writer(control, self._flush)
                    self._writing = True
                return
            except OSError as exc:  # EPIPE: it is gone; its pidfd fires
                self.kill(f"cannot send it a request: {exc}")
                return
            self._outbox.popleft()
            os.close(fds[0])  # our copy of the go pipe's read end: the zygote has its own
        if self._writing and control is not None and self._loop is not None:
            self._loop.remove_writer(control)
            self._writing = False

    def check(self, now: float, boot_timeout_s: float) -> None:
        """On the pool's tick: kill a zygote that does not become ready or stopped answering."""
        if self.state is ZygoteState.STARTING and now - self._started_at > boot_timeout_s:
            self.kill(f"it did not import the service within boot_timeout_s={boot_timeout_s:g}s")
        elif self.state is ZygoteState.READY and self._requests:
            oldest = min(r.sent_at for r in self._requests.values())
            if now - oldest > FORK_REPLY_S:
                self.kill(f"it did not answer a spawn request within {FORK_REPLY_S:g}s")

    def _on_readable(self) -> None:
        control = self._control
        while control is not None:
            try:
                data = control.recv(wire.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:  # it exited leaving requests unread; the kernel says
                continue  # so once, and what it sent before is still queued: read on
            except OSError:
                data = b""
            if not data:  # it closed its end: it is exiting, its pidfd will say how
                self._stop_reading()
                return
            try:
                reply = wire.reply_decoder.decode(data)
            except msgspec.MsgspecError as exc:
                self.kill(f"it sent an undecodable reply: {exc}")
                return
            self._handle(reply)

    def _handle(self, reply: wire.FromZygote) -> None:
        match reply:
            case wire.Ready():
                if reply.pid != self.pid or reply.protocol != wire.ZYGOTE_PROTOCOL:
                    self.kill(f"it says it is pid {reply.pid}, protocol {reply.protocol}")
                else:
                    self.state = ZygoteState.READY
            case wire.Spawned():
                self._adopt(reply.worker_id, reply.pid)
            case wire.SpawnFailed():
                request = self._requests.pop(reply.worker_id, None)
                if request is not None:
                    os.close(request.go)
                    self._events.fork_failed(reply.worker_id, reply.error)
            case wire.Refused():
                self.refusal = reply.reason  # it exits next; on_exit hands the requests back

    def _adopt(self, worker_id: int, pid: int) -> None:
        request = self._requests.pop(worker_id, None)
        if request is None:
            return
        try:
            pidfd = os.pidfd_open(pid)
            reaper.claim(pid)  # adopted: its Supervisor reaps it (WorkerProcess.reap releases)
        except OSError as exc:  # it waits for GO, so it cannot have been reaped: not our child
            os.close(request.go)
            self._events.fork_failed(worker_id, f"cannot watch the forked pid {pid}: {exc}")
            return
        try:
            os.write(request.go, wire.GO)
        except OSError:  # EPIPE: someone killed it already; its pidfd fires and it is reaped
            pass
        finally:
            os.close(request.go)
        self._events.forked(worker_id, pid, pidfd)

    # --- ending --------------------------------------------------------------------------------

    def kill(self, why: str) -> None:
        """End it now (SIGKILL); :meth:`on_exit` follows on the loop."""
        if self.state is ZygoteState.DEAD or self._pidfd < 0:
            return
        self._killed_for = why
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Ask it to exit: it reads EOF on its control socket once it has answered what it was
        asked; we keep reading, so a worker it forked meanwhile is still adopted (and stopped)."""
        if self._control is not None:
            try:
                self._control.shutdown(socket.SHUT_WR)
            except OSError:  # it is gone already: its pidfd fires
                pass

    def on_exit(self) -> None:
        """Its pidfd fired: reap it, hand back every unanswered request."""
        if self.state is ZygoteState.DEAD:
            return
        assert self._loop is not None and self._popen is not None
        self._loop.remove_reader(self._pidfd)
        self._on_readable()  # answers it sent before it died still count
        self._stop_reading()
        returncode = wait_pidfd(self._pidfd)
        reaper.release(self._popen.pid)
        self._popen.returncode = -signal.SIGKILL if returncode is None else returncode
        os.close(self._pidfd)
        self._pidfd = -1
        self.state = ZygoteState.DEAD
        unanswered = list(self._requests)
        for request in self._requests.values():
            os.close(request.go)  # a worker it forked for one of these reads EOF and exits
        self._requests.clear()
        self._events.zygote_exited(self, self._popen.returncode, unanswered)

    def describe_exit(self, returncode: int) -> str:
        """Why it ended, in words, for the pool's one log line about it."""
        how = signal_name(-returncode) if returncode < 0 else None
        how = how or f"exit code {returncode}"
        if self._killed_for:
            return f"{how}: the pool killed it because {self._killed_for}"
        if self.refusal:
            return f"{how}: it refused to fork: {self.refusal}"
        return how

    def _stop_reading(self) -> None:
        for _data, fds in self._outbox:
            os.close(fds[0])
        self._outbox.clear()
        if self._control is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._control)
                if self._writing:
                    self._loop.remove_writer(self._control)
                    self._writing = False
            self._control.close()
            self._control = None
