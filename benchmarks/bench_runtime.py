"""Gru throughput: workflows/s through a 2-step minion with 1,000 workflows in flight.

Runs the same orchestration stateless and with the default SQLite store in one process and
prints the ratio (target: durable costs at most 2x, thanks to group commit), then the same with
each step calling a worker pool. Every workflow saves a checkpoint before each of its 2 steps and
deletes it at the end: 3 durable writes per workflow. The store alone (those writes without Gru)
runs in the same interleaved rounds: Gru / store is how close the runtime comes to it.

    python benchmarks/bench_runtime.py [--workflows 20000] [--in-flight 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

from minions import Gru, Minion, Pipeline, minion_step
from minions.runtime.state import SQLiteStateStore, WorkflowRecord

try:
    from minions.workers import WorkerPool
except ImportError:  # the pool lands separately; the pool rows are skipped without it
    WorkerPool = None  # type: ignore[assignment,misc]


@dataclass
class Tick:
    n: int = 0


@dataclass
class Ctx:
    total: int = 0


class Budget:
    """How many events the pipeline may still produce (set per run)."""

    remaining = 0


class TickPipeline(Pipeline[Tick]):
    async def produce_event(self) -> Tick:
        if Budget.remaining <= 0:
            await asyncio.Event().wait()
        Budget.remaining -= 1
        return Tick(Budget.remaining)


class TwoSteps(Minion[Tick, Ctx]):
    @minion_step
    async def first(self) -> None:
        self.context.total += self.event.n

    @minion_step
    async def second(self) -> None:
        self.context.total += 1


if WorkerPool is not None:

    class BenchPool(WorkerPool):
        service = "native_demo.service:NativeDemo"
        workers = 2

    class PoolSteps(Minion[Tick, Ctx]):
        native: BenchPool

        @minion_step
        async def first(self) -> None:
            self.context.total = await self.native.call("ping", self.event.n)

        @minion_step
        async def second(self) -> None:
            self.context.total += await self.native.call("ping", 1)


async def measure(minion: type, workflows: int, in_flight: int, durable: bool) -> float:
    """Workflows per second from start_orchestration until all have finished."""
    with tempfile.TemporaryDirectory() as tmp:
        store = {"db_path": os.path.join(tmp, "minions.db")} if durable else {"state_store": None}
        gru = await Gru.create(
            **store, log_file=os.path.join(tmp, "minions.log"), max_in_flight=in_flight,
            handle_signals=False,
        )  # fmt: skip
        try:
            Budget.remaining = workflows
            started = time.perf_counter()
            result = await gru.start_orchestration(TickPipeline, minion)
            assert result.success, result.reason
            while gru.status().orchestrations[0].succeeded < workflows:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
        finally:
            await gru.shutdown()
    return workflows / elapsed


async def store_floor(workflows: int, in_flight: int) -> float:
    """The same 3 durable writes per workflow straight into the store, without Gru: the floor
    the durable rows cannot beat. ``in_flight`` lanes each run workflows back to back; like Gru,
    a workflow awaits its 2 saves and queues its delete without waiting (the close at the end
    still commits every delete)."""

    async def lane(store: SQLiteStateStore, numbers: range) -> None:
        for n in numbers:
            wid = str(n)
            for step in (0, 1):
                await store.save(
                    WorkflowRecord("bench", wid, b"\x91\x00", b"\x91\x00", step, 0.0, 0.0)
                )
            store.delete_nowait("bench", wid)

    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteStateStore(os.path.join(tmp, "floor.db")) as store:
            lanes = [range(i, workflows, in_flight) for i in range(in_flight)]
            started = time.perf_counter()
            await asyncio.gather(*(lane(store, numbers) for numbers in lanes))
            return workflows / (time.perf_counter() - started)


SCENARIOS = ("stateless", "SQLite", "store alone")


async def one_round(minion: type, count: int, in_flight: int, order: list[str]) -> dict[str, float]:
    """Each scenario once, in ``order``: workflows per second."""
    out = {}
    for name in order:
        if name == "store alone":
            out[name] = await store_floor(count, in_flight)
        else:
            out[name] = await measure(minion, count, in_flight, durable=name == "SQLite")
    return out


async def compare(
    minion: type, count: int, args: argparse.Namespace, floor: bool
) -> dict[str, float]:
    """Median workflows/s of each scenario over interleaved rounds whose order rotates, so a
    load drift on the machine lands on every scenario alike."""
    names = list(SCENARIOS if floor else SCENARIOS[:2])
    await measure(minion, min(count, 2000), args.in_flight, durable=False)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name, rate in (await one_round(minion, count, args.in_flight, order)).items():
            samples[name].append(rate)
    return {name: statistics.median(rates) for name, rates in samples.items()}


async def main(args: argparse.Namespace) -> None:
    print(f"2-step minion, {args.in_flight} in flight, median of {args.rounds} interleaved rounds")
    print(f"{'scenario':<46}{'workflows/s':>12}{'cost vs stateless':>19}{'Gru / store':>13}")
    rows = [("no-op steps", TwoSteps, args.workflows, True)]
    if WorkerPool is None:
        print("(worker pool rows skipped: minions.workers is not importable yet)")
    elif args.pool_workflows > 0:
        rows.append(("each step calls a 2-worker pool", PoolSteps, args.pool_workflows, False))
    for label, minion, count, floor in rows:
        rates = await compare(minion, count, args, floor)
        stateless, durable = rates["stateless"], rates["SQLite"]
        print(f"{label + ', stateless':<46}{stateless:>12,.0f}{'1.00x':>19}")
        cells = f"{durable:>12,.0f}{stateless / durable:>18.2f}x"
        if floor:
            cells += f"{durable / rates['store alone']:>12.2f}x"
        print(f"{label + ', SQLite':<46}{cells}")
        if floor:
            print(
                f"{'SQLite store alone, same 3 writes/workflow':<46}{rates['store alone']:>12,.0f}"
            )
    print("cost vs stateless: how many times longer a durable workflow takes (target <= 2)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--pool-workflows", type=int, default=5_000)
    parser.add_argument("--in-flight", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
