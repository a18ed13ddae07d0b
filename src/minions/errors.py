"""Every error Minions raises to user code.

All are subclasses of :class:`MinionsError`. Worker-call errors carry the facts an operator needs
(worker id, pid, method, signal, remote stack) as attributes *and* in the message, so a log line
alone tells what happened and what to do next.
"""

from __future__ import annotations

import signal as _signal


class MinionsError(Exception):
    """Base class of every error raised by Minions."""


# --- worker calls ---------------------------------------------------------------------------


class WorkerCallError(MinionsError):
    """Base class of the errors a ``pool.call(...)`` can end with."""


class RemoteError(WorkerCallError):
    """The worker ran (or refused to run) the call and reported a failure; the worker lives on.

    ``kind`` tells which: ``"exception"`` (the handler raised), ``"invalid-args"`` (arguments did
    not match the handler's annotations), ``"unknown-method"``, ``"unencodable-result"`` (msgspec
    could not encode what the handler returned), or ``"invalid-result"`` (the result does not
    match the handler's declared return type, or could not be decoded at all).
    """

    def __init__(
        self,
        *,
        kind: str,
        type_name: str,
        message: str,
        remote_traceback: str = "",
        method: str = "",
        worker_id: int | None = None,
    ) -> None:
        self.kind = kind
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.method = method
        self.worker_id = worker_id
        super().__init__(
            f"{method}() failed in worker {worker_id} [{kind}]: {type_name}: {message}"
        )

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text


def signal_name(signum: int | None) -> str | None:
    """``11`` -> ``"SIGSEGV"``; ``None`` stays ``None``."""
    if signum is None:
        return None
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _WorkerEnded(WorkerCallError):
    """What the errors of a call whose worker process ended share: where it ran, and the Python
    stack faulthandler wrote (at death, or just before the pool's kill)."""

    _stack_heading = "worker stack"

    def __init__(
        self, text: str, *, pool: str, worker_id: int, pid: int, method: str, stack: str
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.pid = pid
        self.method = method
        self.stack = stack
        super().__init__(text)

    def __str__(self) -> str:
        text = super().__str__()
        if self.stack:
            text += f"\n--- {self._stack_heading} ---\n" + self.stack.rstrip()
        return text


class WorkerCrashed(_WorkerEnded):
    """The worker process died while running the call (segfault, abort, exit, OOM kill).

    ``signal``/``exit_code`` say how it died, ``stack`` holds the Python stack faulthandler wrote
    at the moment of death (empty if the process was killed with SIGKILL). The pool has already
    started a replacement worker. Also raised for a call that is not idempotent whose worker
    died before its reply arrived (``during`` then says so): it may have run, and was not run
    again.
    """

    _stack_heading = "worker stack at death"

    def __init__(
        self,
        *,
        pool: str,
        worker_id: int,
        pid: int,
        method: str,
        signal: int | None,
        exit_code: int | None,
        reason: str,
        stack: str = "",
        attempts: int = 1,
        hint: str = "",
        during: str = "",
        cause: str = "",
        host: str = "",
    ) -> None:
        self.signal = signal
        self.exit_code = exit_code
        self.reason = reason
        self.attempts = attempts
        self.cause = cause  # the verdict's cause: "signal", "exit", "host_lost", ...
        self.host = host  # the worker host it ran on; "" for a local worker
        where = f"pid {pid} on host {host!r}" if host else f"pid {pid}"
        how = (
            "host_lost" if cause == "host_lost" else signal_name(signal) or f"exit code {exit_code}"
        )
        text = (
            f"worker {worker_id} ({where}) of pool {pool!r} died of {how} ({reason}) "
            f"{during or f'while running {method}()'}"
        )
        if attempts > 1:
            text += f" on attempt {attempts}"
        if hint:
            text += f"; {hint}"
        super().__init__(text, pool=pool, worker_id=worker_id, pid=pid, method=method, stack=stack)


class PoisonCall(WorkerCrashed):
    """This method+arguments combination has crashed workers too often and is not retried.

    Raised after a call crashed ``retries_on_crash + 1`` workers, and immediately (without
    dispatch) for the same fingerprint during the pool's quarantine period.
    """


class CallTimeout(_WorkerEnded):
    """The call ran longer than its deadline on the worker; that worker was SIGKILLed and replaced.

    ``stack`` holds where the worker was stuck (dumped by faulthandler on the pool's request just
    before the kill), when it could be captured.
    """

    _stack_heading = "worker stack when killed"

    def __init__(
        self, *, pool: str, worker_id: int, pid: int, method: str, timeout_s: float, stack: str = ""
    ) -> None:
        self.timeout_s = timeout_s
        text = (
            f"{method}() exceeded its {timeout_s:g}s deadline on worker {worker_id} (pid {pid}) of "
            f"pool {pool!r}; the worker was killed and replaced. Raise call_timeout_s if the work "
            "is legitimately slow; the call was not retried because it may hang again."
        )
        super().__init__(text, pool=pool, worker_id=worker_id, pid=pid, method=method, stack=stack)


class PoolUnavailable(WorkerCallError):
    """The pool cannot serve calls: it is crash-looping past its restart intensity (circuit open),
    shutting down, or not started. ``retry_after_s`` says when it will try to recover."""

    def __init__(self, pool: str, reason: str, retry_after_s: float | None = None) -> None:
        self.pool = pool
        self.reason = reason
        self.retry_after_s = retry_after_s
        text = f"pool {pool!r} is unavailable: {reason}"
        if retry_after_s is not None:
            text += f"; it retries in {retry_after_s:.1f}s"
        super().__init__(text)


class Overloaded(WorkerCallError):
    """The call was refused before dispatch to protect the host: the pool's queue is full
    (``max_queue``) or memory pressure is critical. Nothing was sent to a worker; retry later."""

    def __init__(self, pool: str, reason: str) -> None:
        self.pool = pool
        self.reason = reason
        super().__init__(f"pool {pool!r} shed the call: {reason}; nothing was dispatched")


class ProtocolError(MinionsError):
    """A frame on the wire did not decode or broke the protocol (bad version, wrong token).

    Counted and logged by the receiving side, which drops the frame and keeps running; raised to
    user code only when a peer speaks an incompatible protocol version."""


# --- orchestration ---------------------------------------------------------------------------


class AbortWorkflow(MinionsError):
    """Raised by a step to end its workflow on purpose; the checkpoint is deleted, not an error."""


class GruError(MinionsError):
    """Misuse of the Gru lifecycle (a second live Gru, calling ``Gru()`` directly, ...)."""


class StateStoreError(MinionsError):
    """The state database cannot be used safely (corrupt, locked by another Gru, newer schema).

    Minions never overwrites or empties such a database; move it aside or fix it, then restart."""
