"""The demo's orchestration: a pipeline of jobs, a minion whose steps call a native worker pool.

Design note. Gru builds pipelines, minions and resources itself (``cls()``), so the settings of
one demo run reach them through :func:`active_run`, set by the runner around the run. Faults are
placed deterministically: with rate *f*, event *i* carries a fault when ``floor((i+1)f)`` steps
up, and the kinds rotate segfault, abort, hang. So ``--events 60 --fault-rate 0.1`` injects
exactly two of each, evenly spread, and a run is reproducible from its seed.

Every call is typed (``pool.call(NativeDemo.crc32, data)``): mypy checks the arguments and the
result against the handler. Importing ``NativeDemo`` reads its annotations only; the C
extension loads in the workers' ``setup()``.

An injected fault must end as the typed error the failure contract promises (a segfault or abort
as ``WorkerCrashed``/``PoisonCall`` with that signal, a hang as ``CallTimeout``). The minion then
ends the workflow on purpose (``AbortWorkflow``), as a real application would dead-letter a bad
input. Anything else (a wrong checksum, a fault that did not fault, a healthy call that failed)
raises, so Gru counts the workflow as failed, and the demo reports it as lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import signal
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import msgspec

from minions import AbortWorkflow, Minion, Pipeline, minion_step
from minions.errors import CallTimeout, Overloaded, PoolUnavailable, WorkerCrashed
from minions.workers import PoolConfig, WorkerPool
from native_demo.service import NativeDemo

P = ParamSpec("P")
R = TypeVar("R")

#: Injected fault kinds, in rotation: the ``NativeDemo`` method each one calls.
FAULTS = ("segfault", "abort", "spin")
_FAULT_METHODS: dict[str, Callable[[NativeDemo], None]] = {
    "segfault": NativeDemo.segfault,
    "abort": NativeDemo.abort,
    "spin": NativeDemo.spin,
}
_FAULT_SIGNALS = {"segfault": signal.SIGSEGV, "abort": signal.SIGABRT}
_PAYLOAD_BYTES = 64 * 1024
_PRIMES_RANGE = (3_000_000, 12_000_000)  # ~20-80 ms of sieve per call on one core


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """One demo run, validated by the CLI. ``events=None`` means run until a signal."""

    events: int | None = 300
    fault_rate: float = 0.03
    workers: int = 2
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8081
    seed: int = 0
    max_in_flight: int = 16

    def __post_init__(self) -> None:
        if self.events is not None and self.events < 1:
            raise ValueError(f"events must be at least 1, got {self.events}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, got {self.fault_rate}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be between 1 and 64, got {self.workers}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be between 0 and 65535, got {self.metrics_port}")


@dataclass(slots=True)
class DemoRun:
    """What the pipeline handed out: the demo's own witness, independent of Gru's counters."""

    settings: DemoSettings
    emitted: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def exhausted(self) -> bool:
        return self.settings.events is not None and self.emitted >= self.settings.events


_active: DemoRun | None = None


@contextlib.contextmanager
def activate(run: DemoRun) -> Iterator[DemoRun]:
    """Make ``run`` the one the demo's components read while Gru builds and runs them."""
    global _active
    if _active is not None:
        raise RuntimeError("a demo run is already active in this process")
    _active = run
    try:
        yield run
    finally:
        _active = None


def active_run() -> DemoRun:
    if _active is None:
        raise RuntimeError("the demo components only run inside minions.demo.app.activate()")
    return _active


def fault_for(seq: int, rate: float) -> str:
    """The fault event ``seq`` carries ("" for none): evenly spread, kinds in rotation."""
    before = math.floor(seq * rate + 1e-9)
    after = math.floor((seq + 1) * rate + 1e-9)
    return FAULTS[before % len(FAULTS)] if after > before else ""


def expected_failure(fault: str, exc: BaseException) -> bool:
    """Whether ``exc`` is exactly the typed error the failure contract promises for ``fault``."""
    if fault == "spin":
        return isinstance(exc, CallTimeout)
    wanted = _FAULT_SIGNALS.get(fault)
    return wanted is not None and isinstance(exc, WorkerCrashed) and exc.signal == wanted


class WrongResult(Exception):
    """A worker answered, but not what the parent computed itself: data was corrupted."""


class FaultDidNotFault(Exception):
    """An injected fault returned normally or failed another way: the contract was broken."""


# --- the orchestration ----------------------------------------------------------------------


class DemoEvent(msgspec.Struct, frozen=True):
    seq: int
    primes_below: int
    fault: str = ""


class DemoContext(msgspec.Struct):
    crc: int = 0
    primes: int = 0


class DemoPool(WorkerPool[NativeDemo]):
    """``NativeDemo`` workers, configured to show the contract quickly rather than to be safe.

    ``retries_on_crash = 1``: a crashing call gets one fresh worker, then is a ``PoisonCall``.
    ``poison_ttl_s = 0``: every injected fault is a distinct event meant to reach a worker, so
    the fail-fast quarantine (60 s by default) is off. ``call_timeout_s = 1``: hangs die fast.
    ``restart_intensity = 30``: the default fault rate never opens the circuit; high rates do,
    and the minion then waits for it to close. ``restart_backoff_max_s = 1``: back-to-back
    crashes delay respawns by at most a second (5 s by default), so ``--fault-rate 1`` moves.
    """

    workers = 2
    spare_workers = 1
    retries_on_crash = 1
    call_timeout_s = 1.0
    poison_ttl_s = 0.0
    restart_intensity = 30
    restart_period_s = 10.0
    restart_backoff_max_s = 1.0
    shutdown_grace_s = 5.0

    def __init__(self) -> None:
        workers = active_run().settings.workers
        super().__init__(PoolConfig.from_class(type(self), workers=workers))


class DemoPipeline(Pipeline[DemoEvent]):
    """Hands out the run's events, then waits until Gru stops it (``--forever``: never ends)."""

    async def startup(self) -> None:
        self._run = active_run()
        self._rng = random.Random(self._run.settings.seed)

    async def produce_event(self) -> DemoEvent:
        run = self._run
        if run.exhausted:
            await asyncio.Future()  # the source is drained; Gru cancels this at shutdown
        seq = run.emitted
        fault = fault_for(seq, run.settings.fault_rate)
        event = DemoEvent(seq, self._rng.randint(*_PRIMES_RANGE), fault)
        run.emitted += 1
        if fault:
            run.faults[fault] += 1
        return event


class DemoMinion(Minion[DemoEvent, DemoContext]):
    """checksum -> native_fault -> count_primes, every step a real call into a worker."""

    native: DemoPool

    @minion_step
    async def checksum(self) -> None:
        data = random.Random(self.event.seq).randbytes(_PAYLOAD_BYTES)
        crc = await _call(self.native, NativeDemo.crc32, data)
        if crc != zlib.crc32(data):
            raise WrongResult(
                f"crc32 of event {self.event.seq}: worker {crc}, parent {zlib.crc32(data)}"
            )
        self.context.crc = crc

    @minion_step
    async def native_fault(self) -> None:
        fault = self.event.fault
        if not fault:
            return
        try:
            await _call(self.native, _FAULT_METHODS[fault])
        except (WorkerCrashed, CallTimeout) as exc:
            if expected_failure(fault, exc):
                raise AbortWorkflow(f"injected {fault} ended as {type(exc).__name__}") from exc
            raise FaultDidNotFault(f"injected {fault} ended as {exc!r}") from exc
        raise FaultDidNotFault(f"injected {fault} returned normally")

    @minion_step
    async def count_primes(self) -> None:
        primes = await _call(self.native, NativeDemo.count_primes, self.event.primes_below)
        self.context.primes = primes


async def _call(
    pool: DemoPool,
    method: Callable[Concatenate[NativeDemo, P], R],
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """``pool.call`` that waits out an open circuit or memory shedding instead of failing:
    what a real step does with errors that say "retry later" (nothing ran in a worker)."""
    while True:
        try:
            return await pool.call(method, *args, **kwargs)
        except PoolUnavailable as exc:
            if exc.retry_after_s is None:  # shutting down or not started: not "later"
                raise
            await asyncio.sleep(max(0.05, exc.retry_after_s))
        except Overloaded:
            await asyncio.sleep(0.25)
