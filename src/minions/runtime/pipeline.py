"""``Pipeline[E]`` and the loop that feeds its events to every subscribed orchestration.

Design note: one pipeline instance is shared by every orchestration that names its class, and one
task (:class:`PipelineRunner`) calls ``produce_event()`` in a loop. Before each call the runner
waits until *every* subscriber has room for another workflow: a full orchestration stops the
pipeline from being asked for more, which is the runtime's backpressure (the slowest subscriber
sets the pace, and no event is ever buffered outside a workflow). ``produce_event()`` raising is
logged, counted and retried with exponential backoff; it never stops the pipeline.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec

from minions._tasks import TaskOwner

if TYPE_CHECKING:
    from minions.runtime.console import Failures
    from minions.runtime.telemetry import RuntimeMetrics

E = TypeVar("E")


class Pipeline(TaskOwner, Generic[E]):
    """Base class of event sources: subclass as ``Pipeline[MyEvent]``.

    Gru calls :meth:`produce_event` in a loop, only when every subscribed orchestration has room
    for another workflow, and fans each event out to all of them.
    """

    async def produce_event(self) -> E:
        """Wait for and return the next event."""
        raise NotImplementedError(f"{type(self).__name__} must implement produce_event()")

    async def startup(self) -> None:
        """Called once, when the first orchestration using this pipeline starts."""

    async def shutdown(self) -> None:
        """Called once, when the last orchestration using this pipeline stops."""


class Subscriber(Protocol):
    """What the runner needs from an orchestration (implemented by ``Orchestration``)."""

    def has_room(self) -> bool:
        """True when another workflow may start now (checked before every event)."""

    async def wait_capacity(self) -> None:
        """Return once another workflow may start (or the subscriber is stopping)."""

    def submit(self, event: Any, encoded: bytes | None, fanned_out: bool) -> None:
        """Start one workflow for ``event`` (no-op when stopping)."""

    @property
    def needs_encoding(self) -> bool:
        """True when the subscriber checkpoints, so the event must be encoded anyway."""


class RunnerState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


class PipelineRunner:
    """Owns one shared pipeline instance, its subscribers and its production task."""

    def __init__(
        self,
        pipeline: Pipeline[Any],
        event_type: type,
        name: str,
        failures: Failures,
        metrics: RuntimeMetrics,
        backoff: tuple[float, float],
    ) -> None:
        self.pipeline = pipeline
        self.name = name
        self.state = RunnerState.IDLE
        self._event_type = event_type
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(event_type)
        self._failures = failures
        self._backoff = backoff
        # Replaced, never mutated, on every change: an event's subscribers are compared by
        # identity, and each event needs no copy of the list.
        self._subscribers: tuple[Subscriber, ...] = ()
        self._encode = False  # a subscriber checkpoints, or several share each event
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        from minions.runtime import telemetry

        self._events = metrics.child(telemetry.PIPELINE_EVENTS, pipeline=name)
        self._errors = metrics.child(telemetry.PIPELINE_ERRORS, pipeline=name)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def subscribe(self, subscriber: Subscriber) -> None:
        """Add an orchestration; the production task starts with the first one."""
        self._set_subscribers((*self._subscribers, subscriber))
        if self._task is None:
            self.state = RunnerState.RUNNING
            self._task = asyncio.create_task(self._run(), name=f"minions-pipeline:{self.name}")

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._set_subscribers(tuple(s for s in self._subscribers if s is not subscriber))

    def _set_subscribers(self, subscribers: tuple[Subscriber, ...]) -> None:
        self._subscribers = subscribers
        self._encode = len(subscribers) > 1 or any(s.needs_encoding for s in subscribers)
        self._changed.set()

    def pause(self) -> None:
        """Stop asking for events (memory pressure); a call already waiting is not interrupted."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    async def stop(self) -> None:
        """Cancel the production task and wait for it; idempotent."""
        self.state = RunnerState.STOPPED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.0
        while True:
            subscribers = self._ready() or await self._wait_ready()
            try:
                event = await self.pipeline.produce_event()
                self._check_type(event)
                # Encoded once when a subscriber checkpoints or each gets its own copy.
                encoded = self._encoder.encode(event) if self._encode else None
            except Exception as exc:
                delay = self._next_delay(delay)
                self._report_error(exc, delay)
                await asyncio.sleep(delay)
                continue
            delay = 0.0
            self._events.inc()
            if subscribers is self._subscribers:  # the common case: nobody came or went
                self._fan_out(event, encoded, subscribers)
                continue
            # Orchestrations that stopped while produce_event() was pending do not get the event.
            current = tuple(s for s in subscribers if s in self._subscribers)
            self._fan_out(event, encoded if current == subscribers else None, current)

    def _ready(self) -> tuple[Subscriber, ...]:
        """The subscribers, when an event may be produced right now (no await needed)."""
        subscribers = self._subscribers
        if self._unpaused.is_set() and all(s.has_room() for s in subscribers):
            return subscribers
        return ()

    async def _wait_ready(self) -> tuple[Subscriber, ...]:
        """Wait until unpaused, subscribed, and every subscriber has room."""
        while True:
            await self._unpaused.wait()
            subscribers = self._subscribers
            if not subscribers:
                self._changed.clear()
                await self._changed.wait()
                continue
            for sub in subscribers:
                await sub.wait_capacity()
            if self._unpaused.is_set():
                return subscribers

    def _fan_out(self, event: Any, encoded: bytes | None, subs: tuple[Subscriber, ...]) -> None:
        fanned = len(subs) > 1
        if encoded is None and fanned:
            encoded = self._encoder.encode(event)
        for index, sub in enumerate(subs):
            # Each extra subscriber gets its own decoded copy so workflows cannot see each
            # other's mutations of the event.
            own = event if index == 0 or encoded is None else self._decoder.decode(encoded)
            sub.submit(own, encoded, fanned)

    def _check_type(self, event: object) -> None:
        if not isinstance(event, self._event_type):
            raise TypeError(
                f"produce_event() returned {type(event).__name__}, expected "
                f"{self._event_type.__name__}"
            )

    def _next_delay(self, delay: float) -> float:
        initial, maximum = self._backoff
        return min(maximum, delay * 2 if delay else initial)

    def _report_error(self, exc: Exception, delay: float) -> None:
        self._errors.inc()
        self._failures(
            ("pipeline", self.name, type(exc).__name__),
            f"pipeline {self.name}: produce_event() raised {exc!r}; retrying in {delay:.2f}s",
            exc,
        )


@dataclass(slots=True)
class _Shared:
    runner: PipelineRunner
    holders: int


class PipelineSet:
    """Owns the running pipelines: one shared runner per pipeline class, counted by the
    orchestrations holding it. Gru serializes acquire/release, so no locking is needed."""

    def __init__(self) -> None:
        self._shared: dict[type, _Shared] = {}
        self.paused = False

    def get(self, cls: type) -> PipelineRunner | None:
        shared = self._shared.get(cls)
        return shared.runner if shared is not None else None

    def hold(self, cls: type) -> PipelineRunner | None:
        """Take another hold on a running pipeline, if ``cls`` has one."""
        shared = self._shared.get(cls)
        if shared is None:
            return None
        shared.holders += 1
        return shared.runner

    def add(self, cls: type, runner: PipelineRunner) -> None:
        """Register a freshly started pipeline with its first holder."""
        if self.paused:
            runner.pause()
        self._shared[cls] = _Shared(runner, 1)

    async def release(
        self, cls: type, stop_hook: Callable[[Pipeline[Any]], Awaitable[None]]
    ) -> None:
        """Drop one hold; the last one stops the runner and hands the pipeline to ``stop_hook``."""
        shared = self._shared[cls]
        shared.holders -= 1
        if shared.holders > 0:
            return
        del self._shared[cls]
        await shared.runner.stop()
        await stop_hook(shared.runner.pipeline)

    def pause(self) -> None:
        self.paused = True
        for shared in self._shared.values():
            shared.runner.pause()

    def resume(self) -> None:
        self.paused = False
        for shared in self._shared.values():
            shared.runner.resume()

    def items(self) -> list[tuple[type, PipelineRunner]]:
        return [(cls, shared.runner) for cls, shared in self._shared.items()]
