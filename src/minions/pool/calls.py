"""A call on its way through the pool, and the fingerprints used to quarantine poison calls."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any


class PendingCall:
    """One ``pool.call``: encoded once, possibly sent to several workers if crashes are retried.

    Lives in the Dispatcher's queue, then in exactly one worker's lane, until its future is
    resolved. ``crashes`` counts workers this call was running on when they died.
    """

    __slots__ = (
        "args", "call_id", "crashes", "expected_s", "future", "kwargs", "method", "submitted_at",
        "timeout_s",
    )  # fmt: skip

    def __init__(
        self, call_id: int, method: str, args: bytes, kwargs: bytes, future: asyncio.Future[Any]
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.future = future
        self.crashes = 0
        self.expected_s = 0.0  # predicted run time when sent; see Dispatcher._pick_lane
        self.timeout_s = 0.0  # longest it may run on a worker; set by the Dispatcher
        self.submitted_at = time.monotonic()

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.method, self.args, self.kwargs)

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
