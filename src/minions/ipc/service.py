"""What a worker serves: ``WorkerService`` subclasses and their ``@expose``d handlers.

Both sides of the boundary read the same description of a service (:func:`describe`): the worker
validates arguments against each handler's annotations before running it, the parent decodes
results to the declared return type. Reading the description imports the service *module* only;
the risky native library must be imported in ``setup()``, which runs in the worker alone, and
:func:`native_modules_imported_by` is how the pool checks that (in a fresh interpreter).

``expose`` returns the handler itself, so ``NativeDemo.crc32`` keeps its exact signature: that
is what lets ``pool.call(NativeDemo.crc32, data)`` be type-checked against it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NewType, TypeVar, overload

import msgspec

from minions._importing import import_object

F = TypeVar("F", bound=Callable[..., Any])

Buffer = NewType("Buffer", memoryview)
Buffer.__doc__ = """Annotate a handler parameter with ``Buffer`` to receive a big bytes-like
argument without a copy: a ``memoryview`` of the worker's shared-memory arena, writable.

The view is valid **during the call only**: the arena space is reused once the call ends, so do
not keep it (or a NumPy array made from it) past the handler's return; the worker releases it
then, and a kept ``memoryview`` raises ``ValueError`` on use. Copy what must outlive the call
(``bytes(view)``). A handler may fill the view in place and return it: the result then travels
back without any copy in the worker. Small arguments (below the pool's ``arena_min_bytes``)
arrive as a read-only ``memoryview`` of the message instead, which stays valid; check
``view.readonly`` before writing to it.

As a return annotation, ``Buffer`` says the result is bytes-like: return ``bytes``, a
``memoryview``, a NumPy array or any other buffer; it is copied once into the arena, or not at
all if it already lies there. The caller receives a ``memoryview`` of its own private copy.
"""

_EXPOSED = "__minions_exposed__"


@overload
def expose(func: F, /) -> F: ...
@overload
def expose(*, idempotent: bool = True) -> Callable[[F], F]: ...
def expose(func: F | None = None, /, *, idempotent: bool = True) -> F | Callable[[F], F]:
    """Mark a ``WorkerService`` method as callable through ``pool.call(Service.method, ...)``.

    Handlers take annotated positional-or-keyword parameters (no ``*args``/``**kwargs``) so the
    worker can validate every call before running native code. ``@expose(idempotent=False)``
    says running it twice is not harmless (it charges, sends, appends): the pool then never
    runs a call of it a second time, after a crash or a lost reply (see the failure contract).
    """
    if not isinstance(idempotent, bool):
        raise TypeError(f"@expose(idempotent=...) must be True or False, got {idempotent!r}")

    def mark(handler: F) -> F:
        for param in list(inspect.signature(handler).parameters.values())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise TypeError(
                    f"@expose {handler.__qualname__}: parameter {param.name!r} must be an "
                    "ordinary positional-or-keyword or keyword-only parameter"
                )
        setattr(handler, _EXPOSED, idempotent)
        return handler

    return mark if func is None else mark(func)


class WorkerService:
    """Base class of a service that runs inside worker processes.

    The worker constructs it with no arguments, calls :meth:`setup` once (import native
    libraries here, never at module level), serves calls one at a time, and calls
    :meth:`teardown` on a clean shutdown (not after a crash).

    Gru imports the service's module to read the handlers' types; a pool refuses to start if
    that import loads compiled extension modules other than the standard library's and
    Minions' own. ``parent_safe`` names top-level packages whose compiled modules may load in
    Gru anyway (known not to crash or hold state at import).
    """

    parent_safe: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:
        """Prepare the worker; raising here fails the worker's boot (reported to the pool)."""

    def teardown(self) -> None:
        """Release resources on a clean shutdown."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """How one exposed handler is called: argument and result types, built once per process."""

    name: str
    params: tuple[str, ...]
    args_type: type[msgspec.Struct]
    result_type: Any
    idempotent: bool = True  # from @expose(idempotent=...)
    positional: int = -1  # how many of ``params`` may be passed by position (-1: all)


def _args_struct(
    cls: type, name: str, func: Callable[..., Any]
) -> tuple[tuple[str, ...], type, int]:
    hints = typing.get_type_hints(func)
    fields: list[Any] = []
    params: list[str] = []
    positional = 0
    for param in list(inspect.signature(func).parameters.values())[1:]:
        ann = hints.get(param.name, Any)
        params.append(param.name)
        positional += param.kind is param.POSITIONAL_OR_KEYWORD
        if param.default is not inspect.Parameter.empty:
            fields.append((param.name, ann, param.default))
        elif any(len(f) == 3 for f in fields):  # required keyword-only after an optional one:
            fields.append((param.name, ann, msgspec.UNSET))  # UNSET marks it required
        else:
            fields.append((param.name, ann))
    struct = msgspec.defstruct(
        f"{cls.__name__}.{name}.args", fields, array_like=True, forbid_unknown_fields=True
    )
    return tuple(params), struct, positional


def describe(cls: type[WorkerService]) -> dict[str, MethodSpec]:
    """Every ``@expose``d handler of ``cls`` by name."""
    specs: dict[str, MethodSpec] = {}
    for name, func in inspect.getmembers(cls, inspect.isfunction):
        idempotent = getattr(func, _EXPOSED, None)
        if idempotent is None:
            continue
        params, args_type, positional = _args_struct(cls, name, func)
        result_type = typing.get_type_hints(func).get("return", Any)
        specs[name] = MethodSpec(name, params, args_type, result_type, idempotent, positional)
    return specs


def load_service(path: str) -> type[WorkerService]:
    """Import ``"module:Class"`` and check it is a ``WorkerService`` subclass."""
    obj = import_object(path, what="service")
    if not (isinstance(obj, type) and issubclass(obj, WorkerService)):
        raise TypeError(f"service {path!r} is not a WorkerService subclass")
    return obj


def native_modules_imported_by(path: str) -> list[str]:
    """Compiled extension modules that importing the service at ``path`` (and reading its
    handlers) loads, beyond those already loaded and the standard library's.

    Runs in a fresh interpreter that first imported ``minions.workers`` (so Minions' own
    msgspec, pyzmq and psutil count as already loaded): the pool's probe, see
    ``minions.pool.calling.check_parent_safe``.
    """
    before = set(sys.modules)
    cls = load_service(path)
    describe(cls)
    allowed = set(sys.stdlib_module_names) | set(cls.parent_safe)
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name not in before
        and name.partition(".")[0] not in allowed
        and isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
    )
