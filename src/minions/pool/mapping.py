"""``pool.map``: one bounded stream of calls over an iterable.

Design note. No task per item: each item becomes one call started through the pool's call front
(the same admission, policy and metrics as ``call()``), and the stream keeps at most
``max_in_flight`` of them started and not yet yielded, which bounds its memory whatever the
length of the iterable. Items are taken lazily, in the consumer's task, only when there is room.
A window is refilled as a whole and dispatched once, so calls bound for one worker travel as one
message. Done callbacks count each call's outcome and, unordered, queue it for the consumer.

The callbacks point at the stream's state (:class:`_Window`), never at the :class:`ResultStream`
the consumer holds: so when the consumer drops the stream (``break`` out of ``async for``) its
reference count reaches zero at once and ``__del__`` cancels what is left, with no wait for the
garbage collector. ``aclose()`` and ``async with`` do the same explicitly.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from minions.pool.calls import CallOptions, PendingCall

R = TypeVar("R")


class Front(Protocol):
    """What a stream needs of the pool (``calling.CallFront``)."""

    default_in_flight: int

    def start(
        self,
        method: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: CallOptions | None,
        dispatch: bool = True,
    ) -> PendingCall: ...
    def flush(self) -> None: ...
    def abandon(self, call: PendingCall) -> None: ...
    def ended(self, call: PendingCall) -> None: ...


class _Failed:
    """An item whose call was refused before dispatch (bad argument, pool overloaded...)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_Entry = PendingCall | _Failed


class _Window:
    """The calls of one stream: started, finished, not yet yielded."""

    def __init__(
        self,
        front: Front,
        method: str | Callable[..., Any],
        items: Iterator[Any],
        options: CallOptions | None,
        ordered: bool,
        limit: int,
        return_exceptions: bool,
    ) -> None:
        self.front = front
        self.method = method
        self.items = items
        self.options = options
        self.ordered = ordered
        self.limit = limit
        self.return_exceptions = return_exceptions
        self.taking = True  # False once the items ran out or a call failed (stop on error)
        self.closed = False
        self.window: collections.deque[_Entry] = collections.deque()  # ordered: input order
        self.running: set[PendingCall] = set()  # unordered: not finished yet
        self.done: collections.deque[_Entry] = collections.deque()  # unordered: finished
        self.wakeup: asyncio.Future[None] | None = None

    def size(self) -> int:
        return len(self.window) if self.ordered else len(self.running) + len(self.done)

    def fill(self) -> None:
        """Start calls until the window is full; exceptions of the iterable propagate."""
        started = False
        while self.taking and self.size() < self.limit:
            try:
                item = next(self.items)
            except StopIteration:
                self.taking = False
                break
            try:
                call = self.front.start(self.method, (item,), {}, self.options, dispatch=False)
            except Exception as exc:  # refused before dispatch: that item's outcome
                self._finished(_Failed(exc))
                self.taking = self.taking and self.return_exceptions
                continue
            started = True
            call.future.add_done_callback(functools.partial(self.on_done, call))
            if self.ordered:
                self.window.append(call)
            else:
                self.running.add(call)
        if started:
            self.front.flush()

    def _finished(self, entry: _Entry) -> None:
        (self.window if self.ordered else self.done).append(entry)

    def on_done(self, call: PendingCall, _future: asyncio.Future[Any]) -> None:
        self.front.ended(call)
        if self.closed or call.future.cancelled():
            return
        failed = call.future.exception() is not None
        if failed and not self.return_exceptions:
            self.taking = False
            if self.ordered:
                self._cancel_after(call)  # the results before it are still yielded
        if not self.ordered:
            self.running.discard(call)
            self.done.append(call)
            if self.wakeup is not None and not self.wakeup.done():
                self.wakeup.set_result(None)

    def _cancel_after(self, call: PendingCall) -> None:
        while self.window and self.window[-1] is not call:
            entry = self.window.pop()
            if isinstance(entry, PendingCall):
                self.front.abandon(entry)

    async def next(self) -> Any:
        if self.closed:
            raise StopAsyncIteration
        try:
            self.fill()
            entry = await (self._next_ordered() if self.ordered else self._next_completed())
            value = self._outcome(entry)
            self.fill()  # keep the pool busy while the consumer works on this result
            return value
        except BaseException:  # the end, an error, the consumer cancelled: nothing left over
            self.close()
            raise

    async def _next_ordered(self) -> _Entry:
        if not self.window:
            raise StopAsyncIteration
        head = self.window[0]
        if isinstance(head, PendingCall) and not head.future.done():
            try:
                await head.future
            except Exception:
                pass  # read by _outcome
        return self.window.popleft()

    async def _next_completed(self) -> _Entry:
        while not self.done:
            if not self.running or self.closed:
                raise StopAsyncIteration
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        return self.done.popleft()

    def _outcome(self, entry: _Entry) -> Any:
        if isinstance(entry, _Failed):
            error = entry.error
        else:
            exc = entry.future.exception()
            if exc is None:
                return entry.future.result()
            assert isinstance(exc, Exception)
            error = exc
        if self.return_exceptions:
            return error
        raise error

    def close(self) -> None:
        """Cancel every call not yielded yet; the stream ends."""
        if self.closed:
            return
        self.closed = True
        self.taking = False
        pending = [e for e in (*self.window, *self.running) if isinstance(e, PendingCall)]
        self.window.clear()
        self.running.clear()
        self.done.clear()
        for call in reversed(pending):
            if not call.future.done():
                self.front.abandon(call)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)


class ResultStream(Generic[R]):
    """The async iterator ``pool.map(...)`` returns; also an async context manager that
    cancels what is left on exit. See ``WorkerPool.map``."""

    __slots__ = ("_window",)

    def __init__(
        self,
        front: Front,
        method: str | Callable[..., Any],
        items: Iterable[Any],
        options: CallOptions | None,
        *,
        ordered: bool,
        max_in_flight: int | None,
        return_exceptions: bool,
    ) -> None:
        if not isinstance(items, Iterable):
            hint = (
                " (an async iterable: call() in a TaskGroup instead)"
                if hasattr(items, "__aiter__")
                else ""
            )
            raise TypeError(f"map() takes an iterable of arguments, got {items!r}{hint}")
        limit = front.default_in_flight if max_in_flight is None else max_in_flight
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        for name, flag in (("ordered", ordered), ("return_exceptions", return_exceptions)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self._window = _Window(
            front, method, iter(items), options, ordered, limit, return_exceptions
        )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> R:
        value: R = await self._window.next()
        return value

    async def aclose(self) -> None:
        """Stop: cancel every call not yielded yet (as ``call()`` cancels)."""
        self._window.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._window.close()

    def __del__(self) -> None:
        window = getattr(self, "_window", None)  # unset if __init__ refused the arguments
        try:
            if window is not None:
                window.close()
        except RuntimeError:  # its event loop is closed: the pool and its calls went with it
            pass
