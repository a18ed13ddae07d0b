"""Durable component identity: ``@minion_id``, ``@pipeline_id`` and ``@resource_id``.

Design note. Gru keys saved workflows by an orchestration id digested from the identities of its
pipeline and minion (and its config). Without a stamped id a component's identity is its import
path, ``"package.module:ClassName"``: move or rename the class and its saved workflows no longer
match. A stamped id is a canonical UUID that travels with the class, so workflows persisted under
it resume after any move. ``minions stamp component-ids`` writes the decorators;
``minions doctor ids`` finds components without one and duplicates.

A duplicate id between two loaded classes is refused at decoration time (a copy-paste mistake
would otherwise merge two orchestrations' saved workflows); re-decorating a class with the same
import path, as a module reload does, is not a duplicate.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from minions.resource import Resource
from minions.runtime.minion import Minion
from minions.runtime.pipeline import Pipeline

ComponentKind = Literal["minion", "pipeline", "resource"]
C = TypeVar("C", bound=type[Any])

_ID_ATTR = "__minions_component_id__"
_BASES: dict[ComponentKind, type] = {"minion": Minion, "pipeline": Pipeline, "resource": Resource}
_LOADED: dict[tuple[ComponentKind, str], weakref.ref[type]] = {}


def import_path(cls: type) -> str:
    """``"package.module:Qualified.Name"``: the fallback identity of an id-less class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def new_component_id() -> str:
    return str(uuid.uuid4())


def validate_component_id(value: object, *, what: str = "component id") -> str:
    """A component (or config) id is a canonical (lowercase, hyphenated) UUID string."""
    if not isinstance(value, str):
        raise TypeError(f"a {what} must be a UUID string, got {type(value).__name__}")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise ValueError(
            f"{what} {value!r} is not a UUID; generate one with `minions stamp "
            "component-ids PATH` or python -c 'import uuid; print(uuid.uuid4())'"
        ) from None
    if canonical != value:
        raise ValueError(f"{what} {value!r} must be written canonically: {canonical!r}")
    return value


def _decorator(kind: ComponentKind, component_id: str) -> Callable[[C], C]:
    checked = validate_component_id(component_id)

    def decorate(cls: C) -> C:
        base = _BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"@{kind}_id can only decorate a {base.__name__} subclass, got {cls!r}")
        present = cls.__dict__.get(_ID_ATTR)
        if present is not None and present != (kind, checked):
            raise ValueError(f"{import_path(cls)} already has the component id {present[1]!r}")
        previous = _LOADED.get((kind, checked))
        other = previous() if previous is not None else None
        if other is not None and other is not cls and import_path(other) != import_path(cls):
            raise ValueError(
                f"duplicate {kind} id {checked!r}: {import_path(other)} and {import_path(cls)}; "
                "each component needs its own id (delete one decorator and run `minions stamp "
                "component-ids` again)"
            )
        _LOADED[(kind, checked)] = weakref.ref(cls)
        setattr(cls, _ID_ATTR, (kind, checked))
        return cls

    return decorate


def minion_id(component_id: str) -> Callable[[C], C]:
    """Give a Minion class a durable identity: its saved workflows survive moves and renames."""
    return _decorator("minion", component_id)


def pipeline_id(component_id: str) -> Callable[[C], C]:
    """Give a Pipeline class a durable identity (part of its orchestrations' ids)."""
    return _decorator("pipeline", component_id)


def resource_id(component_id: str) -> Callable[[C], C]:
    """Give a Resource class a durable identity (its name in snapshots and metrics)."""
    return _decorator("resource", component_id)


def component_id(cls: type) -> str | None:
    """The id stamped on ``cls`` itself (a subclass does not inherit its base's id)."""
    stamped = cls.__dict__.get(_ID_ATTR)
    return stamped[1] if stamped is not None else None


def component_identity(cls: type) -> str:
    """What an orchestration id is digested from: the stamped id, else the import path."""
    return component_id(cls) or import_path(cls)
