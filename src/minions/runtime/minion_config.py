"""Minion configuration: from a file, inline as a typed object, or from ``load_config``.

Design note. A minion declares the type it wants (``config: MyConfig``, a dataclass or
``msgspec.Struct``). The value comes from one of three sources, decided at
``start_orchestration``:

- ``minion_config_path="configs/a.toml"``: TOML (stdlib ``tomllib``) or JSON, converted to the
  declared type by msgspec, so a wrong field is refused naming the file and the field. YAML and
  other formats are not read by Minions (the standard library has no parser, and a dependency is
  not worth it): override ``async def load_config(self, path)`` and parse them there.
- ``minion_config=MyConfig(...)`` (or a mapping, converted the same way).
- ``load_config(path)``: when the minion overrides it, Gru calls it with the path instead of
  reading the file itself, and checks the result against the declared type.

A file may carry ``_minions_config_id = "<uuid>"`` at top level: the config's durable identity,
part of the orchestration id, so the file can move. Without it the identity is the path relative
to the working directory. The key is removed before conversion.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from minions.runtime.identity import validate_component_id

CONFIG_ID_KEY = "_minions_config_id"
_READERS = {".toml": "toml", ".json": "json"}


class ConfigError(Exception):
    """The configuration cannot be used; ``str(exc)`` names the file and field, and what to do."""


@dataclass(frozen=True, slots=True)
class FileConfig:
    """A config file, read once at ``start_orchestration``. ``data`` is ``None`` for a format
    Minions does not read (the minion's ``load_config`` must)."""

    path: Path
    identity: str
    data: dict[str, Any] | None
    source: str  # the path as the caller wrote it, for messages


def read_config_file(raw_path: str | os.PathLike[str]) -> FileConfig:
    """Read and parse a config file (blocking: call it in a thread)."""
    path = Path(os.fspath(raw_path)).expanduser().resolve()
    shown = os.fspath(raw_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read minion config file {shown}: {exc.strerror or exc}") from exc
    reader = _READERS.get(path.suffix.lower())
    data: dict[str, Any] | None = None
    if reader is not None:
        data = _parse(text, reader, shown)
    config_id = data.pop(CONFIG_ID_KEY, None) if data is not None else None
    if config_id is not None:
        try:
            identity = "config_id:" + validate_component_id(config_id, what="config id")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{shown}: {CONFIG_ID_KEY}: {exc}") from None
    else:
        identity = _relative(path)
    return FileConfig(path, identity, data, shown)


def _parse(text: str, reader: str, shown: str) -> dict[str, Any]:
    try:
        value = tomllib.loads(text) if reader == "toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown} is not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{shown} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"{shown} must hold a table/object of settings, got {type(value).__name__}"
        )
    return value


def _relative(path: Path) -> str:
    try:
        return "config_path:" + path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return "config_path:" + path.as_posix()


def declared_type(minion_cls: type) -> Any:
    """The ``config`` annotation of a minion class, or ``None`` when it declares none."""
    try:
        return typing.get_type_hints(minion_cls).get("config")
    except Exception:  # unresolvable annotations are reported by composition
        return None


def overrides_load_config(minion_cls: type) -> bool:
    from minions.runtime.minion import Minion

    return getattr(minion_cls, "load_config", None) is not Minion.load_config


def convert(value: object, minion_cls: type, source: str) -> object:
    """Check or convert ``value`` to the minion's declared config type.

    A mapping is converted field by field (a wrong type names the field); an instance of the
    declared class is taken as is; anything else is refused. Without a declared type the value
    is kept unchanged, so minions that read a plain mapping go on working.
    """
    target = declared_type(minion_cls)
    if target is None or target is Any:
        return value
    if isinstance(target, type) and isinstance(value, target):
        return value
    name = minion_cls.__name__
    if not isinstance(value, Mapping):
        expected = getattr(target, "__name__", repr(target))
        raise ConfigError(
            f"{source}: {name}.config is declared as {expected}, got {type(value).__name__}; "
            f"pass {expected}(...) or a mapping of its fields"
        )
    try:
        return msgspec.convert(dict(value), target)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc} (checked against {name}.config)") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: {name}.config type cannot hold settings: {exc}") from None


def check_loaded(value: object, minion_cls: type) -> object:
    """What ``load_config`` returned must be (or convert to) the declared type."""
    return convert(value, minion_cls, f"{minion_cls.__name__}.load_config()")


def unreadable_format(config: FileConfig, minion_cls: type) -> ConfigError:
    return ConfigError(
        f"{config.source}: Minions reads TOML and JSON config files only (the standard "
        "library has no YAML parser); override `async def load_config(self, path)` on "
        f"{minion_cls.__name__} to parse this format, or convert the file"
    )
