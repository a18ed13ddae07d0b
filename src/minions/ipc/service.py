"""What a worker serves: ``WorkerService`` subclasses and their ``@expose``d handlers.

Both sides of the boundary read the same description of a service (:func:`describe`): the worker
validates arguments against each handler's annotations before running it, the parent decodes
results to the declared return type. Reading the description imports the service *module* only;
the risky native library must be imported in ``setup()``, which runs in the worker alone.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NewType, TypeVar

import msgspec

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


def expose(func: F) -> F:
    """Mark a ``WorkerService`` method as callable through ``pool.call(name, ...)``.

    Handlers take annotated positional-or-keyword parameters (no ``*args``/``**kwargs``) so the
    worker can validate every call before running native code.
    """
    for param in list(inspect.signature(func).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(
                f"@expose {func.__qualname__}: parameter {param.name!r} must be an ordinary "
                "positional-or-keyword or keyword-only parameter"
            )
    setattr(func, _EXPOSED, True)
    return func


class WorkerService:
    """Base class of a service that runs inside worker processes.

    The worker constructs it with no arguments, calls :meth:`setup` once (import native
    libraries here, never at module level), serves calls one at a time, and calls
    :meth:`teardown` on a clean shutdown (not after a crash).
    """

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


def _args_struct(cls: type, name: str, func: Callable[..., Any]) -> tuple[tuple[str, ...], type]:
    hints = typing.get_type_hints(func)
    fields: list[Any] = []
    params: list[str] = []
    for param in list(inspect.signature(func).parameters.values())[1:]:
        ann = hints.get(param.name, Any)
        params.append(param.name)
        if param.default is inspect.Parameter.empty:
            fields.append((param.name, ann))
        else:
            fields.append((param.name, ann, param.default))
    struct = msgspec.defstruct(
        f"{cls.__name__}.{name}.args", fields, array_like=True, forbid_unknown_fields=True
    )
    return tuple(params), struct


def describe(cls: type[WorkerService]) -> dict[str, MethodSpec]:
    """Every ``@expose``d handler of ``cls`` by name."""
    specs: dict[str, MethodSpec] = {}
    for name, func in inspect.getmembers(cls, inspect.isfunction):
        if not getattr(func, _EXPOSED, False):
            continue
        params, args_type = _args_struct(cls, name, func)
        result_type = typing.get_type_hints(func).get("return", Any)
        specs[name] = MethodSpec(name, params, args_type, result_type)
    return specs


def load_service(path: str) -> type[WorkerService]:
    """Import ``"module:Class"`` and check it is a ``WorkerService`` subclass."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"service must be 'module:Class', got {path!r}")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, WorkerService)):
        raise TypeError(f"service {path!r} is not a WorkerService subclass")
    return obj
