"""A real Gru process for the signal and kill -9 tests: ``python -m apps.durable_app``.

Settings come from the environment: ``APP_DB`` (state database), ``APP_EFFECTS`` (effects file),
``APP_EVENTS`` (how many jobs exist), ``APP_MINION`` (``work`` or ``hang``), ``APP_GRACE``
(grace period seconds), ``APP_IN_FLIGHT``. Every step appends ``"<seq> <step> <pid>"`` to the
effects file with fsync *after* its worker call returned, so the file is the ground truth of
which steps ran, in which process. The pipeline produces each job exactly once across restarts:
at startup it skips jobs that already left a trace (an effect or a saved checkpoint).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import msgspec

from minions import Gru, Minion, Pipeline, minion_step
from minions.runtime.state import read_workflows
from minions.workers import WorkerPool


class Job(msgspec.Struct):
    seq: int


class JobContext(msgspec.Struct):
    crc: int = 0
    primes: int = 0
    steps: list[str] = []


class NativePool(WorkerPool):
    service = "native_demo.service:NativeDemo"
    workers = 2


def _effects_path() -> Path:
    return Path(os.environ["APP_EFFECTS"])


def record_effect(seq: int, step: str) -> None:
    fd = os.open(_effects_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{seq} {step} {os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def traced_jobs() -> set[int]:
    """Jobs that already ran a step or hold a checkpoint: never produced again."""
    seen = set()
    if _effects_path().exists():
        seen = {int(line.split()[0]) for line in _effects_path().read_text().splitlines()}
    decoder = msgspec.msgpack.Decoder(Job)
    return seen | {decoder.decode(r.event).seq for r in read_workflows(os.environ["APP_DB"])}


class JobPipeline(Pipeline[Job]):
    async def startup(self) -> None:
        traced = traced_jobs()
        self.pending = [n for n in range(int(os.environ["APP_EVENTS"])) if n not in traced]

    async def produce_event(self) -> Job:
        if not self.pending:
            await asyncio.Event().wait()  # the source is exhausted; wait for shutdown
        return Job(self.pending.pop(0))


class WorkMinion(Minion[Job, JobContext]):
    native: NativePool

    @minion_step
    async def a(self) -> None:
        self.context.crc = await self.native.call("crc32", f"job {self.event.seq}".encode())
        record_effect(self.event.seq, "a")

    @minion_step
    async def b(self) -> None:
        self.context.primes = await self.native.call("count_primes", 20_000 + self.event.seq)
        record_effect(self.event.seq, "b")

    @minion_step
    async def c(self) -> None:
        assert await self.native.call("ping", self.event.seq) == self.event.seq
        record_effect(self.event.seq, "c")


class HangMinion(Minion[Job, JobContext]):
    """Step ``a`` hangs (while ``APP_HANG=1``) after recording its effect."""

    native: NativePool

    @minion_step
    async def a(self) -> None:
        await self.native.call("ping", 1)
        record_effect(self.event.seq, "a")
        if os.environ.get("APP_HANG") == "1":
            await asyncio.Event().wait()

    @minion_step
    async def b(self) -> None:
        record_effect(self.event.seq, "b")


async def main() -> int:
    gru = await Gru.create(
        db_path=os.environ["APP_DB"],
        grace_period_s=float(os.environ.get("APP_GRACE", "10")),
        max_in_flight=int(os.environ.get("APP_IN_FLIGHT", "4")),
        metrics=False,
    )
    minion = {"work": WorkMinion, "hang": HangMinion}[os.environ["APP_MINION"]]
    result = await gru.start_orchestration(JobPipeline, minion)
    if not result.success:
        print(f"start failed: {result.reason}", file=sys.stderr)
        await gru.shutdown()
        return 2
    # Tell the test Gru is up (signal handlers installed) before it may send SIGTERM.
    with open(os.environ["APP_EFFECTS"] + ".started", "w") as marker:
        marker.write(str(os.getpid()))
    await gru.wait_closed()
    shutdown = await gru.shutdown()  # idempotent: the result of the signal-driven shutdown
    print(f"shutdown: {shutdown}", file=sys.stderr)
    return 0 if shutdown.success else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
