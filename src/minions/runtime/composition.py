"""Checks run by ``start_orchestration`` before anything starts, each failing with a reason.

A reason is a sentence the user can act on ("MyMinion has no @minion_step methods"), carried by
:class:`CompositionError` and returned in ``StartResult.reason``; nothing here has side effects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect

from minions._importing import ImportTargetError, attribute, import_module, split_target
from minions.runtime import minion_config
from minions.runtime.identity import component_identity, import_path
from minions.runtime.minion import Minion, step_names
from minions.runtime.minion_config import FileConfig
from minions.runtime.pipeline import Pipeline

__all__ = ["Composition", "CompositionError", "compose", "import_path", "orchestration_id"]


class CompositionError(Exception):
    """An orchestration cannot be composed; ``str(exc)`` is the user-facing reason."""


@dataclass(frozen=True, slots=True)
class Composition:
    """A validated (pipeline, minion, config) triple and what Gru needs to run it.

    ``config`` is the inline value converted to the minion's declared type (``None`` for a file
    config, which is read when the minion starts). ``adopt_from`` lists the orchestration id the
    same components had before they were stamped: saved workflows under it are adopted.
    """

    pipeline_cls: type[Pipeline[Any]]
    minion_cls: type[Minion[Any, Any]]
    event_type: type
    context_type: type
    steps: tuple[str, ...]
    config: Any
    orchestration_id: str
    config_file: FileConfig | None = None
    adopt_from: tuple[str, ...] = ()
    config_label: str = "none"  # the config's identity, as ``minions_orchestration_info`` shows


_INLINE_CONFIG = (Mapping, str)


def resolve_class(spec: object, base: type, what: str) -> type:
    """Accept a class, a ``"module:Class"`` string or a plain module path, and check the result
    subclasses ``base``. A module path names the module's ``minion =``/``pipeline =`` variable,
    else its one locally defined subclass of ``base``."""
    try:
        cls = _resolve_string(spec, base, what) if isinstance(spec, str) else spec
    except ImportTargetError as exc:
        raise CompositionError(str(exc)) from exc
    if not isinstance(cls, type) or not issubclass(cls, base) or cls is base:
        raise CompositionError(f"{what} must be a subclass of {base.__name__}, got {spec!r}")
    return cls


def _resolve_string(spec: str, base: type, what: str) -> object:
    module_name, qualname = split_target(spec, what=what)
    module = import_module(module_name, what=what)
    if qualname is not None:
        return attribute(module, qualname, what=what)
    named = getattr(module, what, None)
    if named is not None:
        return named
    local = {
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base
        and obj.__module__ == module.__name__
    }  # fmt: skip
    if len(local) == 1:
        return local.pop()
    kind = base.__name__
    if not local:
        raise CompositionError(
            f"module {module_name!r} defines no {kind} subclass; define one there, set "
            f"`{what} = My{kind}` in it, or pass '{module_name}:My{kind}'"
        )
    names = ", ".join(sorted(c.__qualname__ for c in local))
    raise CompositionError(
        f"module {module_name!r} defines several {kind} subclasses ({names}); set "
        f"`{what} = <the one to run>` in it, or pass '{module_name}:ClassName'"
    )


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


def config_identity(config: object) -> bytes:
    """What an orchestration id takes from its config: a file's id (or path), else the inline
    value's JSON with sorted keys (so ``{"a": 1}`` and ``Cfg(a=1)`` address the same one)."""
    if isinstance(config, FileConfig):
        return b"\x00" + config.identity.encode()
    try:
        return msgspec.json.encode(config, order="sorted")
    except (TypeError, msgspec.EncodeError) as exc:
        raise CompositionError(f"minion_config must be JSON-encodable: {exc}") from exc


def _digest(pipeline: str, minion: str, config: bytes) -> str:
    digest = hashlib.sha256()
    for part in (pipeline, minion):
        digest.update(part.encode() + b"\0")
    digest.update(config)
    return digest.hexdigest()[:16]


def orchestration_id(pipeline_cls: type, minion_cls: type, config: object) -> str:
    """Stable digest of the component identities and the config: the same orchestration started
    after a restart finds its saved workflows under the same id. An id-less component's
    identity is its import path, so moving it changes the id; a stamped one's does not."""
    return _digest(
        component_identity(pipeline_cls), component_identity(minion_cls), config_identity(config)
    )


def fallback_orchestration_id(pipeline_cls: type, minion_cls: type, config: object) -> str:
    """The id the same components have without their stamped ids (the import-path fallback)."""
    return _digest(import_path(pipeline_cls), import_path(minion_cls), config_identity(config))


def compose(
    pipeline: object, minion: object, config: object, config_file: FileConfig | None = None
) -> Composition:
    """Resolve and validate one orchestration; raise :class:`CompositionError` with a reason."""
    if config is not None and config_file is not None:
        raise CompositionError(
            "pass minion_config or minion_config_path, not both (the file would be ignored)"
        )
    if config is not None and not (isinstance(config, _INLINE_CONFIG) or is_record(config)):
        raise CompositionError(
            "minion_config must be a mapping, a dataclass or msgspec.Struct instance, a string "
            f"or None, got {type(config).__name__}"
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
    identity_source = config_file if config_file is not None else config
    oid = orchestration_id(pipeline_cls, minion_cls, identity_source)
    fallback = fallback_orchestration_id(pipeline_cls, minion_cls, identity_source)
    return Composition(
        pipeline_cls=pipeline_cls,
        minion_cls=minion_cls,
        event_type=event_type,
        context_type=context_type,
        steps=steps,
        config=_file_value(config_file, minion_cls)
        if config_file
        else _converted(config, minion_cls),
        orchestration_id=oid,
        config_file=config_file,
        adopt_from=(fallback,) if fallback != oid else (),
        config_label=_config_label(identity_source),
    )


def is_record(value: object) -> bool:
    """A dataclass or msgspec.Struct instance (a typed config)."""
    return isinstance(value, msgspec.Struct) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


def _config_label(config: object) -> str:
    if isinstance(config, FileConfig):
        return config.identity
    if config is None:
        return "none"
    return "inline:" + hashlib.sha256(config_identity(config)).hexdigest()[:16]


def _file_value(config_file: FileConfig, minion_cls: type) -> Any:
    """The converted file contents; ``None`` when the minion's ``load_config`` reads the file
    (Gru calls it as the minion starts)."""
    if minion_config.overrides_load_config(minion_cls):
        return None
    if config_file.data is None:
        raise CompositionError(str(minion_config.unreadable_format(config_file, minion_cls)))
    try:
        return minion_config.convert(config_file.data, minion_cls, config_file.source)
    except minion_config.ConfigError as exc:
        raise CompositionError(str(exc)) from exc


def _converted(config: object, minion_cls: type) -> Any:
    if config is None or isinstance(config, str):
        return config
    try:
        return minion_config.convert(config, minion_cls, "minion_config")
    except minion_config.ConfigError as exc:
        raise CompositionError(str(exc)) from exc
