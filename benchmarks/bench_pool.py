"""Worker-pool overhead from asyncio: Minions vs the raw ZeroMQ floor and the usual executors.

Run: ``.venv/bin/python benchmarks/bench_pool.py [--quick] [--only floor,minions,remote,...]``

All contenders run in ONE process and are measured in interleaved rounds (the order rotates every
round), so machine noise lands on all of them alike. Each does the same work per call: one
``native_demo._native.ping`` in a child process. See README.md for what each column means. The
``remote`` row is the same pool with its workers on a ``minions worker-host`` process over
loopback tcp with CURVE (``remote_host.py``), compared with the local ipc pool of the same run. The
map table compares ``pool.map`` with ``ProcessPoolExecutor.map(chunksize=...)`` the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bench_tasks
import contenders as cs
from remote_host import RemoteHostPool

IN_FLIGHT = 64
STEP_TIMEOUT_S = 60.0  # a hung contender fails the run instead of hanging it
TARGETS = (
    "latency <= 1.5x floor; throughput >= 0.5x floor and >= 3x ProcessPoolExecutor; "
    "parent CPU per call <= 1.15x floor"
)


@dataclass(frozen=True)
class Plan:
    rounds: int
    latency_calls: int  # sequential calls per round
    calls_per_lane: int  # x IN_FLIGHT concurrent lanes per round
    crash_reps: int
    settle_s: float  # pause after a crash subject starts, so spare workers can boot
    map_rounds: int = 5
    map_items: int = 10_000  # pings per map, per subject, per round


FULL = Plan(rounds=10, latency_calls=400, calls_per_lane=30, crash_reps=5, settle_s=0.5)
QUICK = Plan(
    rounds=3, latency_calls=150, calls_per_lane=12, crash_reps=2, settle_s=0.3,
    map_rounds=2, map_items=3_000,
)  # fmt: skip
# name accepted by --only -> factory; table order. ``remote`` is the local ``minions`` pool's
# worker count on a worker host over tcp (remote_host.py).
CONTENDERS: dict[str, Callable[[], cs.Contender]] = {
    **cs.LATENCY_CONTENDERS,
    "remote": RemoteHostPool,
}
PPE_CHUNKSIZES = (1, 16, 256)
MINIONS_WINDOWS = (None, 16, 256)  # max_in_flight; None: the default, 2 * workers * pipeline_depth


@dataclass
class Samples:
    latency_us: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # parent CPU per call, throughput step


_T0 = time.perf_counter()


def progress(text: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- measurements -------------------------------------------------------------------------------


async def measure_latency(c: cs.Contender, n: int) -> list[float]:
    """One call outstanding at a time; per-call round trip in microseconds."""
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        got = await c.ping(i)
        out.append((clock() - t0) / 1000)
        if got != i:
            raise AssertionError(f"{c.name}: ping({i}) returned {got!r}")
    return out


async def measure_throughput(c: cs.Contender, per_lane: int) -> tuple[float, float]:
    """``IN_FLIGHT`` lanes each issue ``per_lane`` calls back to back: calls per second, and
    the parent's CPU time per call (all its threads: the loop, ZeroMQ's I/O thread, an
    executor's helpers) in microseconds."""

    async def lane(base: int) -> None:
        for i in range(base, base + per_lane):
            if await c.ping(i) != i:
                raise AssertionError(f"{c.name}: wrong ping result")

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(k * per_lane) for k in range(IN_FLIGHT)))
    calls = IN_FLIGHT * per_lane
    cpu_us = (time.process_time() - cpu0) * 1e6 / calls
    return calls / (time.perf_counter() - t0), cpu_us


async def run_rounds(contenders: list[cs.Contender], plan: Plan) -> dict[str, Samples]:
    samples = {c.name: Samples() for c in contenders}
    for r in range(plan.rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            lat = await asyncio.wait_for(measure_latency(c, plan.latency_calls), STEP_TIMEOUT_S)
            samples[c.name].latency_us.extend(lat)
        for c in order:
            tp, cpu = await asyncio.wait_for(
                measure_throughput(c, plan.calls_per_lane), STEP_TIMEOUT_S
            )
            samples[c.name].throughput.append(tp)
            samples[c.name].cpu_us.append(cpu)
        progress(f"round {r + 1}/{plan.rounds} done")
    return samples


@dataclass
class CrashSamples:
    label: str
    detect_ms: list[float] = field(default_factory=list)
    recover_ms: list[float] = field(default_factory=list)
    error: str = ""
    failure: str = ""


async def crash_once(factory: Callable[[], cs.CrashSubject], plan: Plan, out: CrashSamples) -> None:
    """Fresh one-worker pool; SIGSEGV its worker; time until a ping succeeds again."""
    subject = factory()
    await subject.start()
    try:
        await asyncio.sleep(plan.settle_s)
        t0 = time.perf_counter()
        exc = await asyncio.wait_for(subject.crash(), STEP_TIMEOUT_S)
        t1 = time.perf_counter()
        out.error = type(exc).__name__
        await subject.recover()
        while True:
            try:
                if await asyncio.wait_for(subject.ping(7), STEP_TIMEOUT_S) == 7:
                    break
            except Exception:
                if time.perf_counter() - t1 > STEP_TIMEOUT_S:
                    raise
                await asyncio.sleep(0.001)  # e.g. the pool refuses calls while it respawns
        t2 = time.perf_counter()
    finally:
        await subject.close()
    out.detect_ms.append((t1 - t0) * 1000)
    out.recover_ms.append((t2 - t1) * 1000)


async def run_crashes(names: list[str], plan: Plan) -> list[CrashSamples]:
    """Every subject once per repetition, order rotating, like the latency rounds."""
    subjects = [
        (CrashSamples(label), f) for n in names for label, f in cs.CRASH_SUBJECTS.get(n, [])
    ]
    for rep in range(plan.crash_reps):
        shift = rep % max(1, len(subjects))
        for samples, factory in subjects[shift:] + subjects[:shift]:
            if samples.failure:
                continue
            try:
                await crash_once(factory, plan, samples)
            except Exception as exc:
                samples.failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:100]
        progress(f"crash repetition {rep + 1}/{plan.crash_reps} done")
    return [s for s, _ in subjects]


# --- map throughput -----------------------------------------------------------------------------


class MapSubjects:
    """``ProcessPoolExecutor(2).map`` and a two-worker Minions pool's ``map``, same pings."""

    def __init__(self) -> None:
        self.ppe: concurrent.futures.ProcessPoolExecutor | None = None
        self.pool: Any = None
        self.ping: Any = None

    def start_ppe(self) -> None:
        """Before any ZeroMQ thread exists: the executor forks its two children here."""
        self.ppe = concurrent.futures.ProcessPoolExecutor(2)
        assert list(self.ppe.map(bench_tasks.ping, range(64))) == list(range(64))

    async def start_minions(self) -> None:
        from minions.workers import WorkerPool
        from native_demo.service import NativeDemo

        class MapBenchPool(WorkerPool[NativeDemo]):
            workers = 2

        self.pool = await MapBenchPool().__aenter__()
        self.ping = NativeDemo.ping
        assert [r async for r in self.pool.map(self.ping, range(64))] == list(range(64))

    def rows(self) -> list[tuple[str, Callable[[int], Any]]]:
        rows: list[tuple[str, Callable[[int], Any]]] = []
        if self.ppe is not None:
            rows += [(f"ProcessPoolExecutor.map cs={c}", self._ppe_map(c)) for c in PPE_CHUNKSIZES]
        if self.pool is not None:
            rows += [
                (f"minions map in_flight={w or 'default'}", self._map(w)) for w in MINIONS_WINDOWS
            ]
        return rows

    def _ppe_map(self, chunksize: int) -> Callable[[int], Any]:
        async def run(n: int) -> list[int]:
            assert self.ppe is not None
            ex = self.ppe
            return await asyncio.to_thread(
                lambda: list(ex.map(bench_tasks.ping, range(n), chunksize=chunksize))
            )

        return run

    def _map(self, window: int | None) -> Callable[[int], Any]:
        async def run(n: int) -> list[int]:
            return [r async for r in self.pool.map(self.ping, range(n), max_in_flight=window)]

        return run

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.__aexit__(None, None, None)
        if self.ppe is not None:
            await asyncio.to_thread(self.ppe.shutdown, True)


async def run_maps(subjects: MapSubjects, plan: Plan) -> dict[str, list[float]]:
    """Every map row once per round, order rotating: items per second."""
    rows = subjects.rows()
    rates: dict[str, list[float]] = {label: [] for label, _ in rows}
    for r in range(plan.map_rounds):
        for label, run in rows[r % len(rows) :] + rows[: r % len(rows)]:
            t0 = time.perf_counter()
            got = await asyncio.wait_for(run(plan.map_items), STEP_TIMEOUT_S)
            rates[label].append(plan.map_items / (time.perf_counter() - t0))
            if got != list(range(plan.map_items)):
                raise AssertionError(f"{label}: wrong map results")
        progress(f"map round {r + 1}/{plan.map_rounds} done")
    return rates


def print_map_table(rates: dict[str, list[float]], plan: Plan) -> None:
    print(
        f"\nmap of {plan.map_items:,} pings, 2 workers; median of {plan.map_rounds} interleaved "
        "rounds\n"
    )
    median = {label: statistics.median(r) for label, r in rates.items()}
    ppe = [v for label, v in median.items() if label.startswith("ProcessPool")]
    base = median.get("ProcessPoolExecutor.map cs=1")
    best = max(ppe) if ppe else None
    head = f"{'subject':<34}{'items/s':>10}{'/PPE cs=1':>11}{'/best PPE':>11}"
    print(head)
    print("-" * len(head))
    for label, value in median.items():
        print(f"{label:<34}{value:>10,.0f}{ratio(value, base):>11}{ratio(value, best):>11}")


# --- report -------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_table(samples: dict[str, Samples], plan: Plan) -> None:
    lat = {n: statistics.median(s.latency_us) for n, s in samples.items()}
    p90 = {n: statistics.quantiles(s.latency_us, n=10)[-1] for n, s in samples.items()}
    tput = {n: statistics.median(s.throughput) for n, s in samples.items()}
    cpu = {n: statistics.median(s.cpu_us) for n, s in samples.items()}
    floor, ppe = cs.Floor.name, cs.StdlibPool.name
    print(
        f"\nping round trip from asyncio; {plan.rounds} interleaved rounds; latency = median of "
        f"{plan.rounds * plan.latency_calls} calls, throughput = median of {plan.rounds} rounds "
        f"of {IN_FLIGHT * plan.calls_per_lane} calls with {IN_FLIGHT} in flight\n"
    )
    head = (
        f"{'contender':<22}{'lat p50 us':>11}{'p90 us':>9}{'/floor':>8}{'/PPE':>8}"
        f"{'calls/s':>10}{'/floor':>8}{'/PPE':>8}{'cpu us':>8}{'/floor':>8}"
    )
    print(head)
    print("-" * len(head))
    for n in samples:
        print(
            f"{n:<22}{lat[n]:>11.1f}{p90[n]:>9.1f}{ratio(lat[n], lat.get(floor)):>8}"
            f"{ratio(lat[n], lat.get(ppe)):>8}{tput[n]:>10,.0f}"
            f"{ratio(tput[n], tput.get(floor)):>8}{ratio(tput[n], tput.get(ppe)):>8}"
            f"{cpu[n]:>8.1f}{ratio(cpu[n], cpu.get(floor)):>8}"
        )
    for n in samples:
        if not n.startswith("minions") or n == RemoteHostPool.name:
            continue
        print(f"\ntargets for {n} ({TARGETS}):")
        if floor in lat:
            r = lat[n] / lat[floor]
            print(f"  latency    {r:5.2f}x floor  (target <= 1.50x)  {verdict(r <= 1.5)}")
            r = tput[n] / tput[floor]
            print(f"  throughput {r:5.2f}x floor  (target >= 0.50x)  {verdict(r >= 0.5)}")
            r = cpu[n] / cpu[floor]
            print(f"  parent CPU {r:5.2f}x floor  (target <= 1.15x)  {verdict(r <= 1.15)}")
        if ppe in tput:
            r = tput[n] / tput[ppe]
            print(f"  throughput {r:5.2f}x PPE    (target >= 3.00x)  {verdict(r >= 3)}")
    print_remote_ratios(lat, tput)


def print_remote_ratios(lat: dict[str, float], tput: dict[str, float]) -> None:
    """The remote-host row against the local ipc pool of the same run (issue #11), and the floor."""
    remote, local, floor = RemoteHostPool.name, "minions", cs.Floor.name
    if remote not in lat or local not in lat:
        return
    print(
        f"\n{remote}: the {local} pool's worker count on one worker-host process, loopback "
        "tcp + CURVE, against the local ipc pool"
    )
    for what, values, better in (("latency", lat, "lower"), ("throughput", tput, "higher")):
        line = f"  {what:<10} {values[remote] / values[local]:5.2f}x {local}"
        if floor in values:
            line += f"  {values[remote] / values[floor]:5.2f}x floor"
        print(f"{line}  ({better} is better)")


def print_crash_table(results: list[CrashSamples], plan: Plan) -> None:
    print(
        f"\ncrash recovery, one-worker pools, median of {plan.crash_reps} repetitions "
        "(fresh pool each time)\n"
    )
    head = f"{'subject':<26}{'error seen':<22}{'crash->error ms':>16}{'error->ping ok ms':>19}"
    print(head)
    print("-" * len(head))
    for s in results:
        if s.failure and not s.recover_ms:
            print(f"{s.label:<26}FAILED: {s.failure}")
            continue
        detect = statistics.median(s.detect_ms)
        recover = statistics.median(s.recover_ms)
        print(f"{s.label:<26}{s.error:<22}{detect:>16.1f}{recover:>19.1f}")
        if s.failure:
            print(f"{'':<26}(a later repetition failed: {s.failure})")


# --- main ---------------------------------------------------------------------------------------


async def start_all(names: list[str]) -> list[cs.Contender]:
    """Start contenders in the given order; one that fails to start is reported and skipped.

    The fork-based executors are started first, before any ZeroMQ or loky thread exists.
    """
    started: dict[str, cs.Contender] = {}
    for name in sorted(names, key=["ppe", "pebble", "loky", "floor", "minions", "remote"].index):
        try:
            c = CONTENDERS[name]()
            await asyncio.wait_for(c.start(), STEP_TIMEOUT_S)
        except Exception as exc:
            print(f"skipped {name}: failed to start ({type(exc).__name__}: {exc})")
            continue
        started[name] = c
        progress(f"started {c.name}")
    return [started[n] for n in CONTENDERS if n in started]  # table order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: under 30 s")
    parser.add_argument(
        "--only",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of: {', '.join(CONTENDERS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--no-crash", action="store_true", help="skip the crash-recovery table")
    parser.add_argument("--no-map", action="store_true", help="skip the map throughput table")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(args.only) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s) {sorted(unknown)}; pick from {list(CONTENDERS)}")
    return args


async def amain(args: argparse.Namespace) -> None:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    names = list(args.only)
    pools = [n for n in ("minions", "remote") if n in names]
    if pools and (why := cs.minions_unavailable()):
        for name in pools:
            print(f"skipped {name}: {why}")
            names.remove(name)
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{'quick' if args.quick else 'full'} run, contenders: {', '.join(names)}"
    )
    t0 = time.perf_counter()
    maps = MapSubjects()
    if not args.no_map and "ppe" in names:
        maps.start_ppe()  # forks: before any contender starts a ZeroMQ or loky thread
    contenders = await start_all(names)
    try:
        samples = await run_rounds(contenders, plan) if contenders else {}
    finally:
        for c in reversed(contenders):
            await c.close()
    if samples:
        print_table(samples, plan)
    if not args.no_map and ("ppe" in names or "minions" in names):
        try:
            if "minions" in names:
                await maps.start_minions()
            print_map_table(await run_maps(maps, plan), plan)
        finally:
            await maps.close()
    if not args.no_crash:
        crash_names = [n for n in names if n in cs.CRASH_SUBJECTS]
        if crash_names:
            print_crash_table(await run_crashes(crash_names, plan), plan)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
