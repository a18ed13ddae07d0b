"""A call on its way through the pool, its policy, and the fingerprints of poison calls."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from minions.ipc.payload import Request

Cancel = Literal["finish", "kill"]


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """How the pool treats one call, resolved once from the pool's settings, the handler's
    ``@expose(idempotent=...)`` and the caller's ``pool.options(...)``; the Dispatcher reads it.

    ``idempotent=False`` means at most once: the call is never sent to a worker a second time,
    neither after it crashed one (``retries_on_crash`` is then 0) nor when its worker died
    before its reply arrived. ``kill_on_cancel`` (``cancel="kill"``) kills the worker running
    the call when its caller gives up; such a call only goes to an idle worker and nothing is
    pipelined behind it, so that kill costs no other call anything.
    """

    timeout_s: float
    retries_on_crash: int
    idempotent: bool = True
    kill_on_cancel: bool = False

    def __post_init__(self) -> None:
        if self.retries_on_crash and not self.idempotent:
            raise ValueError("a call that is not idempotent cannot be retried after a crash")


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What a caller asked for with ``pool.options(...)``; ``None`` keeps the default (the
    pool's setting, or the handler's ``@expose(idempotent=...)``). Validated here, once."""

    timeout_s: float | None = None
    retries_on_crash: int | None = None
    idempotent: bool | None = None
    cancel: Cancel | None = None

    def __post_init__(self) -> None:
        t = self.timeout_s
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0
        ):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {t!r}")
        r = self.retries_on_crash
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"retries_on_crash must be an int >= 0, got {r!r}")
        if self.idempotent is not None and not isinstance(self.idempotent, bool):
            raise ValueError(f"idempotent must be True or False, got {self.idempotent!r}")
        if self.cancel not in (None, "finish", "kill"):
            raise ValueError(f"cancel must be 'finish' or 'kill', got {self.cancel!r}")
        if self.idempotent is False and r:
            raise ValueError(
                f"retries_on_crash={r} runs a call again after it crashed a worker, which "
                "idempotent=False forbids; drop one of the two"
            )

    def merged(self, newer: CallOptions) -> CallOptions:
        """These options with every value ``newer`` sets replacing ours."""
        return CallOptions(
            *(n if n is not None else o for o, n in zip(_values(self), _values(newer), strict=True))
        )

    def resolve(self, method: str, base: CallPolicy) -> CallPolicy:
        """The policy of a call of ``method`` whose defaults are ``base``. Raises ``ValueError``
        if the caller asked for crash retries of a handler declared not idempotent."""
        idempotent = base.idempotent if self.idempotent is None else self.idempotent
        if self.retries_on_crash is not None:
            retries = self.retries_on_crash
        else:
            retries = base.retries_on_crash if idempotent else 0
        if retries and not idempotent:
            raise ValueError(
                f"{method}() is declared @expose(idempotent=False), so it is never run twice; "
                f"retries_on_crash={retries} would. Pass idempotent=True too if re-running this "
                "call is safe"
            )
        return CallPolicy(
            timeout_s=base.timeout_s if self.timeout_s is None else self.timeout_s,
            retries_on_crash=retries,
            idempotent=idempotent,
            kill_on_cancel=base.kill_on_cancel if self.cancel is None else self.cancel == "kill",
        )


def _values(options: CallOptions) -> tuple[Any, ...]:
    return (options.timeout_s, options.retries_on_crash, options.idempotent, options.cancel)


class PendingCall:
    """One ``pool.call``: encoded once (``request``), possibly sent to several workers if
    crashes are retried.

    Lives in the Dispatcher's queue, then in exactly one worker's lane, until its future is
    resolved. ``crashes`` counts workers this call was running on when they died. ``region`` is
    the offset of its buffers in that worker's arena while it holds space there.
    """

    __slots__ = (
        "args", "call_id", "crashes", "expected_s", "future", "kwargs", "method", "policy",
        "region", "request", "submitted_at",
    )  # fmt: skip

    policy: CallPolicy  # set by the Dispatcher when it admits the call

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
        self.submitted_at = time.monotonic()

    @property
    def timeout_s(self) -> float:
        """Longest it may run on a worker (the Dispatcher's deadline check reads it)."""
        return self.policy.timeout_s

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
