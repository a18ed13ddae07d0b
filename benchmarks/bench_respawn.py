"""Respawn and start-up: workers forked from the zygote vs exec'd, against a bare interpreter.

Run: ``.venv/bin/python benchmarks/bench_respawn.py [--quick] [--rounds N]``

Everything is measured in ONE process, in interleaved rounds whose order rotates, so machine noise
lands on every row alike; the baseline, ``python -c pass`` with the same interpreter, is measured
in the same rounds. See README.md for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

from minions.errors import WorkerCrashed
from minions.workers import WorkerPool

SERVICE = "native_demo.service:NativeDemo"
MODES = ("zygote", "exec")
SIZES = (1, 16, 32)
STEP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    respawns: int  # crash -> ping repetitions per pool and round
    start_rounds: int  # rounds of the start-up table (32 exec'd workers take seconds)


FULL = Plan(rounds=6, respawns=5, start_rounds=3)
QUICK = Plan(rounds=2, respawns=3, start_rounds=1)

_T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def pool_class(mode: str, workers: int, spares: int) -> type[WorkerPool]:
    return type(
        f"{mode.capitalize()}{workers}w{spares}s",
        (WorkerPool,),
        {
            "service": SERVICE,
            "workers": workers,
            "spare_workers": spares,
            "spawn": mode,
            "restart_intensity": 100_000,  # a benchmark crashes on purpose, again and again
            "boot_timeout_s": STEP_TIMEOUT_S,
        },
    )


# --- measurements -------------------------------------------------------------------------------


def bare_interpreter_ms() -> float:
    """One ``python -c pass``: interpreter start-up and site, nothing imported."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - t0) * 1000


async def respawn_ms(pool: WorkerPool) -> float:
    """SIGSEGV in the only active worker, then time until a ``ping`` succeeds again."""
    await pool.wait_ready(STEP_TIMEOUT_S)  # spares booted: the next crash starts from a full pool
    t0 = time.perf_counter()
    try:
        await pool.call("segfault")
    except WorkerCrashed:
        pass
    else:
        raise AssertionError("segfault() returned")
    if await pool.call("ping", 7) != 7:
        raise AssertionError("wrong ping result")
    return (time.perf_counter() - t0) * 1000


@dataclass(frozen=True)
class Start:
    seconds: float
    uss_mib: float  # median unique set size of one worker, right after start-up
    zygote_uss_mib: float


async def start_pool(mode: str, workers: int) -> Start:
    pool = pool_class(mode, workers, 0)()
    t0 = time.perf_counter()
    await asyncio.wait_for(pool.startup(), STEP_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    try:
        uss = [psutil.Process(p).memory_full_info().uss / 2**20 for p in pool.worker_pids()]
        zygote = pool.snapshot().zygote_pid
        zygote_uss = psutil.Process(zygote).memory_full_info().uss / 2**20 if zygote else 0.0
        if mode == "zygote" and not zygote:
            raise AssertionError("zygote pool without a zygote")
    finally:
        await pool.shutdown()
    return Start(seconds, statistics.median(uss), zygote_uss)


async def rotate(steps: list[tuple[str, Callable[[], Awaitable[None]]]], rounds: int) -> None:
    for r in range(rounds):
        shift = r % len(steps)
        for _, step in steps[shift:] + steps[:shift]:
            await asyncio.wait_for(step(), STEP_TIMEOUT_S)
        progress(f"round {r + 1}/{rounds} done")


async def run_respawns(plan: Plan) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"python -c pass": []}
    pools: dict[str, WorkerPool] = {}
    for mode in MODES:
        for spares in (0, 1):
            name = f"{mode}, spare {spares}"
            pools[name] = pool_class(mode, 1, spares)()
            await pools[name].startup()
            samples[name] = []

    def bare() -> Awaitable[None]:
        async def go() -> None:
            for _ in range(plan.respawns):
                samples["python -c pass"].append(bare_interpreter_ms())

        return go()

    def crash(name: str) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            for _ in range(plan.respawns):
                samples[name].append(await respawn_ms(pools[name]))

        return go

    try:
        await rotate([("bare", bare)] + [(n, crash(n)) for n in pools], plan.rounds)
    finally:
        for pool in pools.values():
            await pool.shutdown()
    return samples


async def run_starts(plan: Plan) -> dict[tuple[str, int], list[Start]]:
    results: dict[tuple[str, int], list[Start]] = {(m, n): [] for m in MODES for n in SIZES}

    def step(key: tuple[str, int]) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            results[key].append(await start_pool(*key))

        return go

    await rotate([(f"{m}x{n}", step((m, n))) for m, n in results], plan.start_rounds)
    return results


# --- report -------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_respawns(samples: dict[str, list[float]], plan: Plan) -> dict[str, float]:
    med = {n: statistics.median(s) for n, s in samples.items()}
    base = med["python -c pass"]
    print(
        f"\nSIGSEGV -> next successful call, one-worker pools; median of "
        f"{plan.rounds * plan.respawns} per row, {plan.rounds} interleaved rounds\n"
    )
    head = f"{'row':<18}{'p50 ms':>9}{'p90 ms':>9}{'/ python -c pass':>18}"
    print(head)
    print("-" * len(head))
    for n, s in samples.items():
        p90 = statistics.quantiles(s, n=10)[-1] if len(s) > 1 else s[0]
        print(f"{n:<18}{med[n]:>9.1f}{p90:>9.1f}{med[n] / base:>17.2f}x")
    return med


def print_starts(results: dict[tuple[str, int], list[Start]], plan: Plan) -> dict[str, float]:
    rounds = plan.start_rounds
    print(f"\npool start-up (startup() until every worker said hello), median of {rounds}")
    print()
    head = f"{'workers':>8}{'zygote s':>10}{'exec s':>9}{'zygote/exec':>13}{'USS MiB z/e':>14}"
    print(head)
    print("-" * len(head))
    out = {}
    for n in SIZES:
        z = results[("zygote", n)]
        e = results[("exec", n)]
        zs, es = statistics.median(s.seconds for s in z), statistics.median(s.seconds for s in e)
        zu, eu = statistics.median(s.uss_mib for s in z), statistics.median(s.uss_mib for s in e)
        print(f"{n:>8}{zs:>10.3f}{es:>9.3f}{zs / es:>12.2f}x{zu:>8.1f} /{eu:>4.1f}")
        out[f"start{n}"] = zs / es
    zygote_uss = statistics.median(s.zygote_uss_mib for s in results[("zygote", SIZES[-1])])
    print(f"\nthe zygote itself: {zygote_uss:.1f} MiB USS (shared with the workers it forked)")
    return out


async def amain(args: argparse.Namespace) -> None:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(args.rounds, plan.respawns, plan.start_rounds)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {sys.executable}")
    med = print_respawns(await run_respawns(plan), plan)
    starts = print_starts(await run_starts(plan), plan)
    base = med["python -c pass"]
    r = med["zygote, spare 0"] / base
    print("\ntargets (ratios in this run):")
    print(f"  respawn, zygote, spare 0: {r:5.2f}x python -c pass  (<= 0.60x)  {verdict(r <= 0.6)}")
    r = starts["start32"]
    print(f"  32 workers start, zygote: {r:5.2f}x exec spawn      (<= 0.25x)  {verdict(r <= 0.25)}")
    print(f"\ntotal wall time {time.perf_counter() - _T0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: about 30 s")
    parser.add_argument("--rounds", type=int, help="override the rounds of the respawn table")
    asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
