"""Big payloads from asyncio: Minions vs the floors, the usual executors and a plain memcpy.

Run: ``.venv/bin/python benchmarks/bench_payload.py [--quick] [--only a,b,...] [--no-rss]``

Every contender answers ``len`` (bytes in, their length back) and ``echo`` (bytes in, the same
bytes back) for payloads of 64 B to 64 MiB, with one call and with eight calls in flight. All run
in ONE process, in interleaved rounds (the order rotates every round), so machine noise lands on
all of them alike. Then each contender is started afresh for the peak RSS of one 256 MiB call.
See README.md for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import payload_tasks
from payload_floors import FramesFloor, ShmFloor

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
MODES = ["len", "echo"]
IN_FLIGHT = [1, 8]
RSS_SIZE = 256 * MiB
STEP_TIMEOUT_S = 300.0
ARENA_MB = 160.0  # the benchmark's pools: room for a 64 MiB payload in each half


class Contender(Protocol):
    name: str

    async def start(self) -> None: ...
    async def call(self, mode: str, data: bytes) -> Any: ...
    async def close(self) -> None: ...
    def child_pids(self) -> list[int]: ...


# --- contenders ---------------------------------------------------------------------------------


class Memcpy:
    """No process at all: the copies the shared-memory floor makes (one in; echo one more out)."""

    name = "memcpy"

    def __init__(self, max_bytes: int) -> None:
        self._buf = bytearray(max_bytes)
        self._view = memoryview(self._buf)

    async def start(self) -> None:
        self._buf[:] = bytes(len(self._buf))  # touch every page once

    async def call(self, mode: str, data: bytes) -> Any:
        n = len(data)
        self._view[:n] = data
        return n if mode == "len" else bytes(self._view[:n])

    async def close(self) -> None:
        self._view.release()

    def child_pids(self) -> list[int]:
        return []


class Executor:
    """An executor whose ``submit`` returns a ``concurrent.futures.Future``."""

    def __init__(self, name: str, make: Callable[[], Any], submit: str = "submit") -> None:
        self.name = name
        self._make = make
        self._submit = submit
        self._ex: Any = None
        self._before: set[int] = set()

    async def start(self) -> None:
        self._before = _children()
        self._ex = self._make()
        await asyncio.gather(*(self.call("len", b"x") for _ in range(8)))

    async def call(self, mode: str, data: bytes) -> Any:
        fn = payload_tasks.length if mode == "len" else payload_tasks.echo
        if self._submit == "schedule":
            return await asyncio.wrap_future(self._ex.schedule(fn, args=(data,)))
        return await asyncio.wrap_future(self._ex.submit(fn, data))

    async def close(self) -> None:
        if self._submit == "schedule":
            self._ex.close()
            await asyncio.to_thread(self._ex.join)
        else:
            await asyncio.to_thread(self._ex.shutdown, True)

    def child_pids(self) -> list[int]:
        return sorted(_children() - self._before)


def _ppe() -> Executor:
    return Executor("PPE", lambda: concurrent.futures.ProcessPoolExecutor(2))


def _loky() -> Executor:
    import loky

    return Executor("loky", lambda: loky.get_reusable_executor(max_workers=2))


def _pebble() -> Executor:
    import pebble

    return Executor("pebble", lambda: pebble.ProcessPool(max_workers=2), "schedule")


class Minions:
    """A ``WorkerPool`` of two workers serving ``PayloadBench``."""

    def __init__(self, name: str, arena_mb: float, typed: str = "") -> None:
        from minions.workers import WorkerPool

        self.name = name
        self._methods = {"len": "length" + typed, "echo": "echo" + typed}
        attrs = {"service": "payload_tasks:PayloadBench", "workers": 2, "arena_mb": arena_mb}
        attrs["call_timeout_s"] = STEP_TIMEOUT_S
        self._cm = type(f"Bench{abs(hash(name))}", (WorkerPool,), attrs)()
        self._pool: Any = None

    async def start(self) -> None:
        self._pool = await self._cm.__aenter__()
        await asyncio.gather(*(self.call("len", b"x") for _ in range(8)))

    async def call(self, mode: str, data: bytes) -> Any:
        return await self._pool.call(self._methods[mode], data)

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)

    def child_pids(self) -> list[int]:
        return self._pool.worker_pids() if self._pool is not None else []


def contenders(max_bytes: int) -> dict[str, Callable[[], Contender]]:
    """Name accepted by --only -> factory. Fork-based executors first (before any thread)."""
    return {
        "ppe": _ppe,
        "pebble": _pebble,
        "loky": _loky,
        "memcpy": lambda: Memcpy(max_bytes),
        "floor": lambda: FramesFloor(max_bytes),
        "shm": lambda: ShmFloor(max_bytes),
        "minions": lambda: Minions("minions", ARENA_MB),
        "minions-bytes": lambda: Minions("minions bytes", ARENA_MB, "_bytes"),
        "minions-frames": lambda: Minions("minions frames", 0),
    }


# --- measurements -------------------------------------------------------------------------------

_T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


async def measure(c: Contender, mode: str, data: bytes, in_flight: int, budget_s: float) -> float:
    """Seconds per call with ``in_flight`` calls outstanding: batches of ``in_flight`` calls
    until ``budget_s`` of wall time has passed (at least one batch)."""

    async def lane(n: int) -> None:
        for _ in range(n):
            await c.call(mode, data)

    calls, per_lane = 0, 1
    t0 = time.perf_counter()
    while True:
        await asyncio.gather(*(lane(per_lane) for _ in range(in_flight)))
        calls += per_lane * in_flight
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            return elapsed / calls
        per_lane = min(64, per_lane * 2)


async def check(c: Contender, mode: str, data: bytes) -> None:
    got = await c.call(mode, data)
    want: Any = len(data) if mode == "len" else data
    if got != want:
        raise AssertionError(f"{c.name}: wrong {mode} result for {len(data)} bytes")


Cell = tuple[int, str, int]  # size, mode, in flight


@dataclass
class Results:
    seconds: dict[tuple[str, Cell], list[float]] = field(default_factory=dict)

    def add(self, name: str, cell: Cell, s: float) -> None:
        self.seconds.setdefault((name, cell), []).append(s)

    def median(self, name: str, cell: Cell) -> float | None:
        s = self.seconds.get((name, cell))
        return statistics.median(s) if s else None


async def run_rounds(cs: list[Contender], rounds: int, quick: bool, sizes: list[int]) -> Results:
    results = Results()
    budget_s = 0.04 if quick else 0.12
    payloads = {n: os.urandom(min(n, MiB)) * max(1, n // MiB) for n in sizes}
    for r in range(rounds):
        for n in sizes:
            data = payloads[n]
            for mode in MODES:
                for in_flight in IN_FLIGHT:
                    shift = (r + len(results.seconds)) % len(cs)
                    for c in cs[shift:] + cs[:shift]:
                        if r == 0:
                            await asyncio.wait_for(check(c, mode, data), STEP_TIMEOUT_S)
                        s = await asyncio.wait_for(
                            measure(c, mode, data, in_flight, budget_s), STEP_TIMEOUT_S
                        )
                        results.add(c.name, (n, mode, in_flight), s)
            progress(f"round {r + 1}/{rounds}: {_size(n)} done")
    return results


# --- peak RSS -----------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


async def peak_rss(factory: Callable[[], Contender], mode: str, data: bytes) -> tuple[str, ...]:
    """(name, parent peak, worker peak, seconds): peaks above the RSS before the call, in
    payloads, and how long the call took."""
    c = factory()
    await c.start()
    try:
        await c.call(mode, b"x" * 1024)
        me, kids = os.getpid(), c.child_pids()
        pids = [me, *kids]
        for pid in pids:
            _reset_peak(pid)
        base = {pid: _status_kib(pid, "VmRSS") for pid in pids}
        t0 = time.perf_counter()
        got = await asyncio.wait_for(c.call(mode, data), STEP_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        assert (got == len(data)) if mode == "len" else (len(got) == len(data))
        del got
        peak = {pid: (_status_kib(pid, "VmHWM") - base[pid]) * KiB / len(data) for pid in pids}
    finally:
        await c.close()
    worker = max((peak[p] for p in kids), default=0.0)
    return c.name, f"{peak[me]:.2f}", f"{worker:.2f}" if kids else "-", f"{seconds:.3f}"


# --- report -------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


def _mbs(n: int, s: float | None) -> str:
    if not s:
        return "-"
    rate = n / s / 1e6
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}" if rate < 10 else f"{rate:.1f}"


def print_tables(results: Results, names: list[str], sizes: list[int]) -> None:
    for mode in MODES:
        for in_flight in IN_FLIGHT:
            print(f"\n{mode}, {in_flight} in flight: MB/s of payload (higher is better)\n")
            head = f"{'payload':>8}" + "".join(f"{n[:14]:>15}" for n in names)
            print(head)
            print("-" * len(head))
            for n in sizes:
                row = [_mbs(n, results.median(name, (n, mode, in_flight))) for name in names]
                print(f"{_size(n):>8}" + "".join(f"{v:>15}" for v in row))
    print_ratios(results, sizes)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b else "-"


def print_ratios(results: Results, sizes: list[int]) -> None:
    ppe, shm, mn = "PPE", "shm floor", "minions"
    print(f"\n{mn}: how many times faster than PPE and than `minions frames`; its time")
    print("over the shm floor's (lower is better)\n")
    head = f"{'payload':>8}{'mode':>6}{'flight':>7}{'x PPE':>9}{'/ shm floor':>13}"
    head += f"{'x frames':>11}"
    print(head)
    print("-" * len(head))
    for n in sizes:
        for mode in MODES:
            for fl in IN_FLIGHT:
                cell = (n, mode, fl)
                t = results.median(mn, cell)
                print(
                    f"{_size(n):>8}{mode:>6}{fl:>7}{_ratio(t, results.median(ppe, cell)):>9}"
                    f"{_ratio(results.median(shm, cell), t):>13}"
                    f"{_ratio(t, results.median('minions frames', cell)):>11}"
                )
    print("\ntargets (one call in flight):")
    for n, goal in ((16 * MiB, 10.0), (1 * MiB, 3.0)):
        for mode in MODES:
            t, p = results.median(mn, (n, mode, 1)), results.median(ppe, (n, mode, 1))
            if t and p:
                ok = "meets" if p / t >= goal else "MISSES"
                print(f"  {_size(n)} {mode:<4} {p / t:6.2f}x faster than PPE (>= {goal:g}x)  {ok}")
    for mode in MODES:
        t, s = results.median(mn, (16 * MiB, mode, 1)), results.median(shm, (16 * MiB, mode, 1))
        if t and s:
            ok = "meets" if t / s <= 2 else "MISSES"
            print(f"  16 MiB {mode:<4} {t / s:6.2f}x the shm floor's time (<= 2x)  {ok}")


# --- main ---------------------------------------------------------------------------------------


async def start_all(factories: dict[str, Callable[[], Contender]]) -> list[Contender]:
    started = []
    for name, factory in factories.items():
        try:
            c = factory()
            await asyncio.wait_for(c.start(), 60)
        except Exception as exc:
            print(f"skipped {name}: failed to start ({type(exc).__name__}: {exc})")
            continue
        started.append(c)
        progress(f"started {c.name}")
    return started


async def amain(args: argparse.Namespace) -> None:
    sizes = [n for n in SIZES if n <= args.max_mib * MiB]
    factories = {k: f for k, f in contenders(max(sizes)).items() if k in args.only}
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{'quick' if args.quick else 'full'} run, {args.rounds} rounds, "
        f"pools of 2 workers (arena_mb={ARENA_MB:g}), floors of 1 child"
    )
    t0 = time.perf_counter()
    if not args.rss_only:
        cs = await start_all(factories)
        try:
            results = await run_rounds(cs, args.rounds, args.quick, sizes)
        finally:
            for c in reversed(cs):
                await c.close()
        print_tables(results, [c.name for c in cs], sizes)
    if not args.no_rss:
        print(f"\npeak RSS during one {_size(RSS_SIZE)} call, above RSS before it, in payloads\n")
        rss = contenders(RSS_SIZE) | {
            "minions": lambda: Minions("minions, arena_mb=600", 600.0),
            "minions-frames": lambda: Minions("minions, arena_mb=64 (frames)", 64.0),
        }
        data = os.urandom(MiB) * (RSS_SIZE // MiB)
        print(f"{'contender':<34}{'mode':>6}{'parent':>9}{'worker':>9}{'call s':>9}")
        for key in ("floor", "shm", "ppe", "loky", "pebble", "minions", "minions-frames"):
            if key not in args.only and not key.startswith("minions"):
                continue
            for mode in MODES:
                name, parent, worker, seconds = await peak_rss(rss[key], mode, data)
                print(f"{name:<34}{mode:>6}{parent:>9}{worker:>9}{seconds:>9}")
            progress(f"peak RSS of {key} done")
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f}s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = list(contenders(1))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, smaller budgets")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--only", default=",".join(names), help=f"subset of {','.join(names)}")
    parser.add_argument("--max-mib", type=int, default=64, help="largest payload, MiB")
    parser.add_argument("--no-rss", action="store_true", help="skip the 256 MiB peak RSS table")
    parser.add_argument("--rss-only", action="store_true", help="only the peak RSS table")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(args.only) - set(names):
        parser.error(f"unknown contender(s) {sorted(unknown)}; pick from {names}")
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
