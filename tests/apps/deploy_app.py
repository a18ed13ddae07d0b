"""A real Gru under a process supervisor: ``minions run tests/apps/deploy_app.py``.

The test talks to it through the directory ``$APP_DIR``:

- ``jobs``, a FIFO the test creates and writes jobs into, one ``<n> <op>`` per line, where op is
  ``crc`` (a native call), ``segfault`` (kills the worker running it), ``orphan`` (the worker
  starts a helper that outlives its parent) or ``hold`` (the worker notes ``<n> holding <pid>``
  and stays busy until the test creates ``release-<n>``), see ``orphan_service``;
- ``effects``, where the app appends one fsync'd line per fact: ``launching <pid>`` as the launch
  function starts, ``started <pid> <metrics port>`` once Gru serves the orchestration, and
  ``<n> <op> <outcome>`` when a job's workflow has done its call.

``APP_SUBREAPER=1`` makes the process a child subreaper before Gru starts: orphans are then
re-parented to Gru as they are to PID 1 in a container, without needing root. ``APP_HOLD=1`` makes
the launch function wait forever before creating Gru (a slow import, as seen by a signal).
The metrics port comes from ``$MINIONS_METRICS_PORT`` (the tests use 0: any free port).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import msgspec

from minions import Gru, Minion, Pipeline, minion_step
from minions.errors import WorkerCrashed, signal_name
from minions.workers import WorkerPool

_PR_SET_CHILD_SUBREAPER = 36


class Job(msgspec.Struct):
    n: int
    op: str


class JobContext(msgspec.Struct):
    pass


class OrphanPool(WorkerPool):
    service = "orphan_service:OrphanMaker"
    workers = 2
    call_timeout_s = 20.0


def control_dir() -> Path:
    return Path(os.environ["APP_DIR"])


def record(line: str) -> None:
    fd = os.open(control_dir() / "effects", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class FifoPipeline(Pipeline[Job]):
    """One event per line of the ``jobs`` FIFO, read on the loop without a thread."""

    async def startup(self) -> None:
        # O_RDWR: the FIFO never reports end-of-file while this process holds a writer too.
        fd = os.open(control_dir() / "jobs", os.O_RDWR | os.O_NONBLOCK)
        self.reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(self.reader)
        self.transport, _ = await loop.connect_read_pipe(
            lambda: protocol, os.fdopen(fd, "rb", buffering=0)
        )

    async def produce_event(self) -> Job:
        n, op = (await self.reader.readline()).decode().split()
        return Job(int(n), op)

    async def shutdown(self) -> None:
        self.transport.close()


class JobMinion(Minion[Job, JobContext]):
    pool: OrphanPool

    @minion_step
    async def call(self) -> None:
        job = self.event
        try:
            if job.op == "orphan":
                outcome = f"pid {await self.pool.call('spawn_orphan')}"
            elif job.op == "hold":
                effects = str(control_dir() / "effects")
                outcome = f"served {await self.pool.call('hold', effects, job.n)}"
            elif job.op == "segfault":
                await self.pool.call("segfault")
                outcome = "returned"
            else:
                outcome = f"crc {await self.pool.call('crc32', b'job %d' % job.n)}"
        except WorkerCrashed as exc:
            outcome = f"crashed {signal_name(exc.signal) or f'exit-{exc.exit_code}'}"
        # In this step, not the next: a shutdown lets the step in flight finish, and no other.
        record(f"{job.n} {job.op} {outcome}")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


async def main() -> None:
    record(f"launching {os.getpid()}")
    if os.environ.get("APP_HOLD") == "1":
        await asyncio.Event().wait()
    if os.environ.get("APP_SUBREAPER") == "1":
        become_subreaper()
    gru = await Gru.create(grace_period_s=5.0)
    result = await gru.start_orchestration(FifoPipeline, JobMinion)
    if not result.success:
        raise RuntimeError(f"orchestration did not start: {result.reason}")
    record(f"started {os.getpid()} {gru.metrics_port}")
