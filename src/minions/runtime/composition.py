"""Checks run by ``start_orchestration`` before anything starts, each failing with a reason.

A reason is a sentence the user can act on ("MyMinion has no @minion_step methods"), carried by
:class:`CompositionError` and returned in ``StartResult.reason``; nothing here has side effects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect

from minions.runtime.minion import Minion, step_names
from minions.runtime.pipeline import Pipeline


class CompositionError(Exception):
    """An orchestration cannot be composed; ``str(exc)`` is the user-facing reason."""


@dataclass(frozen=True, slots=True)
class Composition:
    """A validated (pipeline, minion, config) triple and what Gru needs to run it."""

    pipeline_cls: type[Pipeline[Any]]
    minion_cls: type[Minion[Any, Any]]
    event_type: type
    context_type: type
    steps: tuple[str, ...]
    config: Mapping[str, Any] | str | None
    orchestration_id: str


def import_path(cls: type) -> str:
    """``"package.module:Qualified.Name"``: the stable identity of a component class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(spec: object, base: type, what: str) -> type:
    """Accept a class or a ``"module:Class"`` string and check it subclasses ``base``."""
    cls = _import_spec(spec, what) if isinstance(spec, str) else spec
    if not isinstance(cls, type) or not issubclass(cls, base) or cls is base:
        raise CompositionError(f"{what} must be a subclass of {base.__name__}, got {spec!r}")
    return cls


def _import_spec(spec: str, what: str) -> object:
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise CompositionError(f"{what} {spec!r} is not of the form 'package.module:ClassName'")
    try:
        obj: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CompositionError(f"cannot import {what} {spec!r}: {exc}") from exc
    return obj


def type_arguments(cls: type, generic_base: type) -> tuple[Any, ...]:
    """What ``cls`` passed to ``generic_base``: ``MyPipeline(Pipeline[MyEvent])`` -> MyEvent."""
    for klass in cls.__mro__:
        for base in klass.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is generic_base:
                return typing.get_args(base)
    return ()


def check_record_type(tp: Any, role: str, owner: type) -> type:
    """``tp`` must be a dataclass or msgspec Struct whose fields msgspec can encode."""
    if isinstance(tp, typing.TypeVar) or not isinstance(tp, type):
        raise CompositionError(
            f"{owner.__name__} does not declare its {role} type; subclass it with a concrete type, "
            f"e.g. {owner.__mro__[1].__name__}[MyEvent{', MyContext' if role == 'context' else ''}]"
        )
    if not (dataclasses.is_dataclass(tp) or issubclass(tp, msgspec.Struct)):
        raise CompositionError(
            f"{role} type {tp.__name__} of {owner.__name__} must be a @dataclass or a "
            "msgspec.Struct so it can be checkpointed"
        )
    try:
        custom = _custom_types(msgspec.inspect.type_info(tp), set())
    except (TypeError, NameError) as exc:
        custom = [str(exc)]
    if custom:
        raise CompositionError(
            f"{role} type {tp.__name__} of {owner.__name__} has a field msgspec cannot "
            f"encode: {', '.join(custom)}"
        )
    return tp


def _custom_types(info: object, seen: set[int]) -> list[str]:
    """Names of the types inside ``info`` msgspec would need custom hooks for."""
    if id(info) in seen:
        return []
    seen.add(id(info))
    if isinstance(info, msgspec.inspect.CustomType):
        return [getattr(info.cls, "__name__", repr(info.cls))]
    found: list[str] = []
    for attr in ("type", "item_type", "key_type", "value_type"):
        if (child := getattr(info, attr, None)) is not None:
            found += _custom_types(child, seen)
    for attr in ("types", "item_types", "fields"):
        for child in getattr(info, attr, ()) or ():
            found += _custom_types(child, seen)
    return found


def check_context_factory(ctx: type, owner: type) -> None:
    """A fresh ``Ctx()`` is built per workflow, so it must construct and round-trip."""
    try:
        value = ctx()
        msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=ctx)
    except Exception as exc:
        raise CompositionError(
            f"context type {ctx.__name__} of {owner.__name__} must be constructible with no "
            f"arguments and encodable (give every field a default): {exc!r}"
        ) from exc


def orchestration_id(pipeline_cls: type, minion_cls: type, config: object) -> str:
    """Stable digest of the component import paths and config: the same orchestration started
    after a restart finds its saved workflows under the same id."""
    try:
        config_bytes = msgspec.json.encode(config, order="sorted")
    except (TypeError, msgspec.EncodeError) as exc:
        raise CompositionError(f"minion_config must be JSON-encodable: {exc}") from exc
    digest = hashlib.sha256()
    for part in (import_path(pipeline_cls), import_path(minion_cls)):
        digest.update(part.encode() + b"\0")
    digest.update(config_bytes)
    return digest.hexdigest()[:16]


def compose(pipeline: object, minion: object, config: object) -> Composition:
    """Resolve and validate one orchestration; raise :class:`CompositionError` with a reason."""
    if config is not None and not isinstance(config, Mapping | str):
        raise CompositionError(
            f"minion_config must be a mapping, a string or None, got {type(config).__name__}"
        )
    pipeline_cls = resolve_class(pipeline, Pipeline, "pipeline")
    minion_cls = resolve_class(minion, Minion, "minion")
    (pipe_event,) = type_arguments(pipeline_cls, Pipeline) or (None,)
    event_type = check_record_type(pipe_event, "event", pipeline_cls)
    minion_args = type_arguments(minion_cls, Minion) or (None, None)
    minion_event = check_record_type(minion_args[0], "event", minion_cls)
    context_type = check_record_type(minion_args[1], "context", minion_cls)
    if minion_event is not event_type:
        raise CompositionError(
            f"{minion_cls.__name__} handles {minion_event.__name__} but {pipeline_cls.__name__} "
            f"produces {event_type.__name__}"
        )
    check_context_factory(context_type, minion_cls)
    steps = step_names(minion_cls)
    if not steps:
        raise CompositionError(f"{minion_cls.__name__} has no @minion_step methods")
    if isinstance(config, Mapping):
        config = dict(config)
    return Composition(
        pipeline_cls=pipeline_cls,
        minion_cls=minion_cls,
        event_type=event_type,
        context_type=context_type,
        steps=steps,
        config=config,
        orchestration_id=orchestration_id(pipeline_cls, minion_cls, config),
    )
