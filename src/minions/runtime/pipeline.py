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
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from minions.ops.metrics import PIPELINE_ERRORS, PIPELINE_EVENTS
from minions.runtime.log import LoggerLike

E = TypeVar("E")


class Pipeline(Generic[E]):
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
        logger: LoggerLike,
        backoff: tuple[float, float],
    ) -> None:
        self.pipeline = pipeline
        self.name = name
        self.state = RunnerState.IDLE
        self._event_type = event_type
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(event_type)
        self._logger = logger
        self._backoff = backoff
        self._subscribers: list[Subscriber] = []
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._events = PIPELINE_EVENTS.labels(name)
        self._errors = PIPELINE_ERRORS.labels(name)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def subscribe(self, subscriber: Subscriber) -> None:
        """Add an orchestration; the production task starts with the first one."""
        self._subscribers.append(subscriber)
        self._changed.set()
        if self._task is None:
            self.state = RunnerState.RUNNING
            self._task = asyncio.create_task(self._run(), name=f"minions-pipeline:{self.name}")

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
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
            subscribers = await self._wait_ready()
            try:
                event = await self.pipeline.produce_event()
                self._check_type(event)
                encoded = self._encode_for(event, subscribers)
            except Exception as exc:
                delay = self._next_delay(delay)
                self._report_error(exc, delay)
                await asyncio.sleep(delay)
                continue
            delay = 0.0
            self._events.inc()
            # Orchestrations that stopped while produce_event() was pending do not get the event.
            current = [s for s in subscribers if s in self._subscribers]
            self._fan_out(event, encoded if current == subscribers else None, current)

    async def _wait_ready(self) -> list[Subscriber]:
        """Wait until unpaused, subscribed, and every subscriber has room."""
        while True:
            await self._unpaused.wait()
            if not self._subscribers:
                self._changed.clear()
                await self._changed.wait()
                continue
            subscribers = list(self._subscribers)
            for sub in subscribers:
                await sub.wait_capacity()
            if self._unpaused.is_set():
                return subscribers

    def _encode_for(self, event: Any, subscribers: list[Subscriber]) -> bytes | None:
        """Encode once when a subscriber checkpoints or the event must be copied."""
        if len(subscribers) > 1 or any(s.needs_encoding for s in subscribers):
            return self._encoder.encode(event)
        return None

    def _fan_out(self, event: Any, encoded: bytes | None, subs: list[Subscriber]) -> None:
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
        self._logger.error(
            "pipeline %s: produce_event() raised %r; retrying in %.2fs",
            self.name,
            exc,
            delay,
            exc_info=exc,
            extra={"orchestration": "-", "workflow": "-"},
        )
