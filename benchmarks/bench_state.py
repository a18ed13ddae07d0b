"""Checkpoint throughput of the SQLite state store: group commit vs one fsync per save.

    .venv/bin/python benchmarks/bench_state.py [--seconds 2] [--dir /var/tmp]

For 1, 100 and 1000 concurrent savers (each awaiting its own save in a loop, as workflows do)
it prints saves/s, commits/s and saves per commit, for the default store (its default
``max_batch``) and for ``max_batch=1`` (the floor: every save pays its own fsync). Put
``--dir`` on the disk you will deploy on; tmpfs makes fsync free and the comparison meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import tempfile
import time
from pathlib import Path

from minions.runtime.state import SQLiteStateStore, WorkflowRecord

CONTEXT = b"\x85" + b"c" * 300  # a typical small msgpack context
DEFAULT_BATCH = inspect.signature(SQLiteStateStore).parameters["max_batch"].default


async def measure(path: Path, savers: int, max_batch: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    async with SQLiteStateStore(path, max_batch=max_batch) as store:
        deadline = time.monotonic() + seconds

        async def saver(lane: int) -> None:
            step = 0
            while time.monotonic() < deadline:
                now = time.time()
                record = WorkflowRecord("bench", f"w{lane}", b"ev", CONTEXT, step, now, now)
                started = time.perf_counter()
                await store.save(record)
                latencies.append(time.perf_counter() - started)
                step += 1

        commits_before = store.commits
        started = time.perf_counter()
        await asyncio.gather(*(saver(lane) for lane in range(savers)))
        elapsed = time.perf_counter() - started
        commits = store.commits - commits_before
    latencies.sort()
    return {
        "saves/s": len(latencies) / elapsed,
        "commits/s": commits / elapsed,
        "saves/commit": len(latencies) / max(commits, 1),
        "p50 ms": statistics.median(latencies) * 1e3,
        "p99 ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--dir", default=None, help="directory for the database (real disk)")
    args = parser.parse_args()
    columns = ["saves/s", "commits/s", "saves/commit", "p50 ms", "p99 ms"]
    print(f"{'savers':>7} {'max_batch':>9} " + " ".join(f"{c:>12}" for c in columns) + "  speedup")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for savers in (1, 100, 1000):
            floor = 0.0
            for max_batch in (1, DEFAULT_BATCH):
                path = Path(tmp) / f"bench-{savers}-{max_batch}.db"
                row = asyncio.run(measure(path, savers, max_batch, args.seconds))
                floor = floor or row["saves/s"]
                cells = " ".join(f"{row[c]:>12.1f}" for c in columns)
                print(f"{savers:>7} {max_batch:>9} {cells}  {row['saves/s'] / floor:>6.1f}x")


if __name__ == "__main__":
    main()
