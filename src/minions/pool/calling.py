"""Typed calls and per-call options: a pool's call API, and the machinery behind it.

Design note. ``await pool.call(NativeDemo.crc32, data)`` passes the handler itself, which is
only a name and a type. ``@expose`` returns the function unchanged, so mypy checks the arguments
against its signature (``ParamSpec``) and gives the call its return type; ``WorkerPool[NativeDemo]``
binds ``S``, so a handler of another service does not fit ``Callable[Concatenate[S, P], R]``. At
run time the function is found by identity among the service's exposed handlers (one dict
lookup) and travels as its name, exactly like the string form, which stays for dynamic use.

Options are a value (:class:`~minions.pool.calls.CallOptions`) held by a view,
``pool.options(timeout_s=...)``, not keyword arguments of ``call()``: every keyword of ``call()``
belongs to the handler, so no handler parameter can ever collide with an option, and a view can be
kept and reused (``patient = pool.options(timeout_s=300)``). A view is validated when made and
resolved to one :class:`~minions.pool.calls.CallPolicy` per method, cached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterable
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from minions.errors import PoolUnavailable, RemoteError, WorkerCallError, signal_name
from minions.ipc import messages as m
from minions.ipc.service import MethodSpec, WorkerService
from minions.ops import metrics, tally
from minions.pool.calls import CallOptions, CallPolicy, Cancel, PendingCall
from minions.pool.config import PoolConfig
from minions.pool.dispatcher import Dispatcher
from minions.pool.mapping import ResultStream
from minions.pool.states import outcome_label

log = logging.getLogger("minions.pool")

S = TypeVar("S", bound=WorkerService)
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_UNKNOWN_METHOD = "<unknown>"  # one metric label for every name the service does not expose
_MAX_RESOLVED = 1024  # cached (options, method) policies; options computed per call stay bounded


class CallFront:
    """The pool's side of every call: method name, policy, encoding, admission, metrics.

    One per pool, on its event loop; used by ``call()``, by options views and by map streams.
    """

    def __init__(
        self, pool_name: str, dispatcher: Dispatcher, check_accepting: Callable[[], None]
    ) -> None:
        self.pool_name = pool_name
        self._dispatcher = dispatcher
        self._check_accepting = check_accepting
        self._service_name = "the service"
        self._names: dict[Callable[..., Any] | str, str] = {}  # handler or its name -> name
        self._policies: dict[str, CallPolicy] = {}
        self._resolved: dict[tuple[CallOptions, str], CallPolicy] = {}
        self._ok: dict[str, tuple[Any, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.default_in_flight = 1

    def bind(
        self,
        service: type[WorkerService],
        specs: dict[str, MethodSpec],
        config: PoolConfig,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The pool loaded its service: learn its handlers and their default policies."""
        self._service_name = service.__qualname__
        self._names = {getattr(service, name): name for name in specs}
        self._names.update((name, name) for name in specs)  # one lookup for both forms
        self._policies = {
            name: CallPolicy(
                timeout_s=config.call_timeout_s,
                retries_on_crash=config.retries_on_crash if spec.idempotent else 0,
                idempotent=spec.idempotent,
            )
            for name, spec in specs.items()
        }
        self._ok = {  # counted in plain numbers, handed to prometheus-client in batches
            name: (
                _counted(metrics.WORKER_CALLS.labels(self.pool_name, name, "ok")),
                _counted(metrics.WORKER_CALL_SECONDS.labels(self.pool_name, name)),
            )
            for name in specs
        }
        self._loop = loop
        # see map(); a pool served only by worker hosts (workers = 0) counts as one worker
        self.default_in_flight = 2 * max(1, config.workers) * config.pipeline_depth

    def name_of(self, method: str | Callable[..., Any]) -> str:
        """The exposed name ``method`` stands for. An unknown string is the worker's
        ``RemoteError`` (unknown-method); a function that is not one of the service's exposed
        handlers is the caller's ``TypeError``."""
        name = self._lookup(method)
        if name is not None:
            return name
        if isinstance(method, str):
            raise RemoteError(
                kind=m.FailureKind.UNKNOWN_METHOD.value,
                type_name="LookupError",
                message=f"unknown method {method!r}; exposed: {sorted(self._policies)}",
                method=method,
            )
        what = getattr(method, "__qualname__", None) or repr(method)
        raise TypeError(
            f"{what} is not an @expose'd handler of {self._service_name}, the service of pool "
            f"{self.pool_name!r}: pass {self._service_name}.<name> with <name> one of "
            f"{sorted(self._policies)}, or the name as a string"
        )

    def _lookup(self, method: str | Callable[..., Any]) -> str | None:
        try:
            return self._names.get(method)
        except TypeError:  # unhashable: certainly not a handler
            return None

    def policy(self, name: str, options: CallOptions | None) -> CallPolicy:
        if options is None:
            return self._policies[name]
        key = (options, name)
        policy = self._resolved.get(key)
        if policy is None:
            if len(self._resolved) >= _MAX_RESOLVED:
                self._resolved.clear()
            policy = self._resolved[key] = options.resolve(name, self._policies[name])
        return policy

    def start(
        self,
        method: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: CallOptions | None,
        dispatch: bool = True,
    ) -> PendingCall:
        """Admit one call and dispatch (or leave that to :meth:`flush`, to send a batch in one
        pass); nothing is sent if this raises (``TypeError`` for arguments msgspec cannot
        encode, ``ValueError`` for contradictory options)."""
        self._check_accepting()
        name = self._lookup(method) or self.name_of(method)
        policy = self._policies[name] if options is None else self.policy(name, options)
        assert self._loop is not None  # bound: _check_accepting passed
        try:  # encodes the call, once
            call = self._dispatcher.admit(name, args, kwargs, self._loop.create_future(), policy)
        except RecursionError:
            raise TypeError(f"{name}(): arguments nested too deeply to encode") from None
        if dispatch:
            self._dispatcher.kick()
        return call

    def flush(self) -> None:
        """Dispatch what :meth:`start` admitted with ``dispatch=False``."""
        self._dispatcher.dispatch()

    async def call(
        self,
        method: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: CallOptions | None,
    ) -> Any:
        """One call, start to end, counted in the call metrics (``cancelled`` included)."""
        started = time.perf_counter()
        try:
            call = self.start(method, args, kwargs, options)
            try:
                value = await call.future
            except asyncio.CancelledError:
                self.abandon(call)
                raise
        except (WorkerCallError, asyncio.CancelledError) as exc:
            label = self._lookup(method) or _UNKNOWN_METHOD
            metrics.WORKER_CALLS.labels(self.pool_name, label, outcome_label(exc)).inc()
            metrics.WORKER_CALL_SECONDS.labels(self.pool_name, label).observe(
                time.perf_counter() - started
            )
            raise
        ok, seconds = self._ok[call.method]
        ok.inc()
        seconds.observe(time.perf_counter() - started)
        return value

    def abandon(self, call: PendingCall) -> None:
        """Its caller gave up: a queued call never runs; a sent one runs on with its answer
        dropped, or its worker is killed (``cancel="kill"``)."""
        call.future.cancel()
        self._dispatcher.withdraw(call)

    def ended(self, call: PendingCall) -> None:
        """Count a call of a map stream that ended (``call()`` counts its own)."""
        future = call.future
        if future.cancelled():
            outcome = "cancelled"
        else:
            exc = future.exception()
            if exc is None:
                ok, seconds = self._ok[call.method]
                ok.inc()
                seconds.observe(time.monotonic() - call.submitted_at)
                return
            outcome = outcome_label(exc)
        metrics.WORKER_CALLS.labels(self.pool_name, call.method, outcome).inc()
        metrics.WORKER_CALL_SECONDS.labels(self.pool_name, call.method).observe(
            time.monotonic() - call.submitted_at
        )


class Calling(Generic[S]):
    """``call``, ``options`` and ``map``: what a pool and its options views offer."""

    def __init__(self, front: CallFront, options: CallOptions | None = None) -> None:
        self._call_front = front
        self._call_options = options

    @overload
    async def call(
        self, method: Callable[Concatenate[S, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...
    @overload
    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any: ...
    async def call(self, method: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``method(*args, **kwargs)`` in a worker and return its result.

        ``method`` is a handler of the pool's service (``NativeDemo.crc32``: type-checked) or
        its name (``"crc32"``). Ends with the value or a
        :class:`~minions.errors.WorkerCallError` subclass; arguments msgspec cannot encode, or
        a handler of another service, raise ``TypeError`` before anything is dispatched.
        Cancelling the awaiting task withdraws a queued call (it never runs); a running one
        runs to completion and its result is dropped, unless ``options(cancel="kill")``.
        """
        return await self._call_front.call(method, args, kwargs, self._call_options)

    def options(
        self,
        *,
        timeout_s: float | None = None,
        retries_on_crash: int | None = None,
        idempotent: bool | None = None,
        cancel: Cancel | None = None,
    ) -> Caller[S]:
        """A view of this pool whose calls use these options (``None`` keeps the default):

        - ``timeout_s``: run time allowed on a worker (default: the pool's ``call_timeout_s``);
        - ``retries_on_crash``: fresh workers a call that crashed one gets (the pool's setting);
        - ``idempotent``: ``False`` runs the call at most once: never again after a crash or a
          lost reply (default: the handler's ``@expose(idempotent=...)``, itself ``True``);
        - ``cancel``: ``"finish"`` (default) lets a running call finish when its caller gives
          up, its result dropped; ``"kill"`` kills its worker (the only end of a hung native
          call) and replaces it. Such a call only runs on an otherwise idle worker.

        Raises ``ValueError`` for a bad value. Views are cheap, immutable and reusable, and
        ``view.options(...)`` refines one.
        """
        new = CallOptions(timeout_s, retries_on_crash, idempotent, cancel)
        merged = new if self._call_options is None else self._call_options.merged(new)
        return Caller(self._call_front, merged)

    @overload
    def map(
        self,
        method: Callable[[S, T], R],
        items: Iterable[T],
        /,
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> ResultStream[R]: ...
    @overload
    def map(
        self,
        method: Callable[[S, T], R],
        items: Iterable[T],
        /,
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: bool,
    ) -> ResultStream[R | Exception]: ...
    @overload
    def map(
        self,
        method: str,
        items: Iterable[Any],
        /,
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: bool = ...,
    ) -> ResultStream[Any]: ...
    def map(
        self,
        method: Callable[..., Any] | str,
        items: Iterable[Any],
        /,
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        return_exceptions: bool = False,
    ) -> ResultStream[Any]:
        """``method(item)`` for every item, as an async iterator of results::

            async for crc in pool.map(NativeDemo.crc32, blobs):
                ...

        At most ``max_in_flight`` items are taken from ``items`` and not yet yielded (default:
        ``2 * workers * pipeline_depth``: every worker's pipeline stays full while the consumer
        catches up), so an endless iterable is fine. ``ordered=False`` yields
        results as they complete. The first error ends the stream: the results before it (in
        order) are yielded, then it is raised, and what is still in flight is cancelled;
        ``return_exceptions=True`` yields errors in their place instead. When the consumer
        stops (``break``, ``aclose()``, leaving ``async with``, cancellation), everything in
        flight is cancelled as ``call()`` would be.
        """
        return ResultStream(
            self._call_front,
            method,
            items,
            self._call_options,
            ordered=ordered,
            max_in_flight=max_in_flight,
            return_exceptions=return_exceptions,
        )


class Caller(Calling[S]):
    """A pool seen through ``pool.options(...)``: same ``call`` and ``map``, other options."""

    def __repr__(self) -> str:
        return f"<Caller of pool {self._call_front.pool_name!r} with {self._call_options}>"


# --- binding a pool class to its service -------------------------------------------------------


def bound_service(pool_cls: type) -> type[WorkerService] | None:
    """The service a pool class names among its own bases, as in ``WorkerPool[NativeDemo]``."""
    for base in pool_cls.__dict__.get("__orig_bases__", ()):
        for arg in typing.get_args(base):
            if isinstance(arg, type) and issubclass(arg, WorkerService):
                return arg
    return None


def service_path(service: type[WorkerService]) -> str:
    """``"module:Class"`` by which worker processes import ``service``."""
    if service.__module__ == "__main__" or "<locals>" in service.__qualname__:
        raise TypeError(
            f"{service.__qualname__} must be defined at the top level of an importable module "
            f"(not in __main__ or a function): worker processes import it by name"
        )
    return f"{service.__module__}:{service.__qualname__}"


# --- the service module must not load native code into Gru ------------------------------------

_PROBE = (
    "import sys, minions.workers\n"
    "from minions.ipc.service import native_modules_imported_by\n"
    "print('\\n'.join(native_modules_imported_by(sys.argv[1])))\n"
)
_parent_safe: set[str] = set()  # services checked in this process


async def check_parent_safe(pool_name: str, service: str, timeout_s: float) -> None:
    """Refuse (``PoolUnavailable``) a service whose module loads compiled code when imported.

    Gru imports the service module to read its handlers' types, so such code would load into
    Gru. Checked in a fresh interpreter, before Gru imports the module itself (so a module that
    crashes at import kills the probe, not Gru), once per service per process. A module that
    fails to import is left to the pool's own import, which reports why.
    """
    if service in _parent_safe:
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, service, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        raise PoolUnavailable(
            pool_name, f"importing {service!r} did not finish within {timeout_s:g}s"
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    module = service.partition(":")[0]
    if proc.returncode is not None and proc.returncode < 0:
        raise PoolUnavailable(
            pool_name,
            f"importing {module} killed a fresh interpreter with "
            f"{signal_name(-proc.returncode)}, so Gru did not import it: move native imports "
            "into the service's setup(), which runs only in workers",
        )
    if proc.returncode != 0:
        return
    native = out.decode().split()
    if native:
        raise PoolUnavailable(
            pool_name,
            f"importing {module} loads compiled extension modules {native}, and Gru imports "
            "that module to read the handlers' types: import them inside the service's "
            "setup(), which runs only in workers (or, if they are safe to load in Gru, list "
            "their top-level packages in the service's parent_safe)",
        )
    _parent_safe.add(service)


def _counted(child: Any) -> Any:
    """The batching front of a prometheus-client child (see :mod:`minions.ops.tally`): an
    ``inc``/``observe`` on every successful call is one or two additions, not a lock and a
    walk of the buckets."""
    return tally.front(child) or child
