"""A call on its way through the pool, and the fingerprints used to quarantine poison calls."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minions.ipc.payload import Request


class PendingCall:
    """One ``pool.call``: encoded once (``request``), possibly sent to several workers if
    crashes are retried.

    Lives in the Dispatcher's queue, then in exactly one worker's lane, until its future is
    resolved. ``crashes`` counts workers this call was running on when they died. ``region`` is
    the offset of its buffers in that worker's arena while it holds space there.
    """

    __slots__ = (
        "args", "call_id", "crashes", "expected_s", "future", "kwargs", "method", "region",
        "request", "submitted_at", "timeout_s",
    )  # fmt: skip

    def __init__(
        self,
        call_id: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: asyncio.Future[Any],
        request: Request,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.request = request
        self.region: int | None = None
        self.future = future
        self.crashes = 0
        self.expected_s = 0.0  # predicted run time when sent; see Dispatcher._pick_lane
        self.timeout_s = 0.0  # longest it may run on a worker; set by the Dispatcher
        self.submitted_at = time.monotonic()

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.method, *self.request.encoded_arguments())

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def fingerprint(method: str, args: bytes, kwargs: bytes) -> bytes:
    """Identity of "the same call" for poison quarantine: method and exact encoded arguments."""
    h = hashlib.blake2b(method.encode(), digest_size=16)
    h.update(b"\0")
    h.update(args)
    h.update(b"\0")
    h.update(kwargs)
    return h.digest()
