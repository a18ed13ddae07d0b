"""The app the real-systemd test installs as ``ExecStart``: a pipeline producing a few events a
second and a minion calling a real worker pool (the demo's C extension) for each.

Run by ``minions run /srv/minions-test/systemd_app.py:main`` as the unit's dynamic user, with
the system's Python, from a venv of the project: it imports nothing from the test suite.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field

from minions import Gru, Minion, Pipeline, minion_step
from minions.workers import WorkerPool


@dataclass
class Tick:
    n: int = 0


@dataclass
class Sums:
    crcs: list[int] = field(default_factory=list)


class NativePool(WorkerPool):
    service = "native_demo.service:NativeDemo"
    workers = 2


_numbers = itertools.count(1)


class TickPipeline(Pipeline[Tick]):
    async def produce_event(self) -> Tick:
        await asyncio.sleep(0.2)  # the production rate of this app's "source"
        return Tick(next(_numbers))


class CrcMinion(Minion[Tick, Sums]):
    native: NativePool

    @minion_step
    async def crc(self) -> None:
        self.context.crcs.append(await self.native.call("crc32", b"tick %d" % self.event.n))


async def main() -> None:
    # Sharded replicas get their port from the template; the single unit would take 8081,
    # which the machine running the sandbox may be using (it shares its network): any port.
    gru = await Gru.create(metrics_port=None if "MINIONS_METRICS_PORT" in os.environ else 0)
    started = await gru.start_orchestration(TickPipeline, CrcMinion)
    if not started.success:
        raise RuntimeError(started.reason)
